// The bfloat16 path of the paged attention kernel, for CPUs with AVX512-BF16 (included by
// paged_attention.cpp, which falls back to its portable code elsewhere).
//
// Same contract as the portable code: every query vector attends its first kv_len positions
// with an online softmax. What differs is how the work is cut and how a block of 16 keys is
// read:
// - one task a sequence; its query vectors, ordered (row, head), are taken kPass at a time
//   (4 for heads of 64, 2 for 128), each with its own kv head, so a pass reads whole cache
//   rows (every kv head) and a block comes from memory once a pass; the block kAhead blocks
//   on is prefetched, since blocks lie anywhere in the pool;
// - scores: each key row is dotted with the query in bfloat16 pairs (vdpbf16ps: exact
//   products, float32 sums), 16 keys' partial sums are reduced together by a transposing
//   tree into one vector of 16 scores, so the softmax of a block is one vector;
// - values: each row is widened to float32 in registers and added into the pass's float32
//   accumulators, which stay in registers for the whole context.
// A query vector's arithmetic does not depend on its pass-mates, so a verify row gives the
// same bits as the same position decoded alone (the engine's lossless tests rely on it).

#pragma once

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define SPARKGRID_BF16_ATTENTION 1
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace sparkgrid_bf16 {

// e^x for x <= 0, 16 lanes: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n from the
// exponent bits (the portable kernel's exp_nonpositive, vectorized; relative error ~2e-7).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// 16 bfloat16 values (32 bytes) widened to float32: the bits moved to the high half.
inline __m512 widen(const void* src) {
  const __m256i raw = _mm256_loadu_si256(static_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// v[t] holds 16 partial sums of key t's score; returns the 16 totals, key t in lane t.
inline __m512 transpose_sum(__m512 v[16]) {
  __m512 w[8], x[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [v2k_0+v2k_2, v2k+1_0+.., v2k_1+.., ..]
    w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                         _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: the lane's sums of keys 4k .. 4k+3
    const __m512d a = _mm512_castps_pd(w[2 * k]), b = _mm512_castps_pd(w[2 * k + 1]);
    x[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // sum the four 128-bit lanes: x[k] becomes lane k of the result
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88),
                                   _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88),
                                   _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88),
                       _mm512_shuffle_f32x4(z01, z23, 0xDD));
}

constexpr int64_t kBlock = 16;  // cache block size this path serves
constexpr int64_t kAhead = 3;   // blocks prefetched ahead of the one being read

// One pass: Q query vectors of one sequence (each with its own visible length and kv head
// g_of[m]) over that sequence's context; `next_table` / `next_blocks`: what the following
// pass reads first, prefetched near the end of this one. DIM: head size (64 or 128).
template <int64_t Q, int64_t DIM>
inline void pass(const at::BFloat16* const qrow[Q], const int32_t len[Q], const int64_t g_of[Q],
                 float scale, const at::BFloat16* kp, const at::BFloat16* vp,
                 const int32_t* table, int64_t kv_slot, const int32_t* next_table,
                 int64_t next_blocks, at::BFloat16* const orow[Q], float* const lrow[Q]) {
  constexpr int64_t NB = DIM / 32;  // bfloat16 vectors per row
  constexpr int64_t NV = DIM / 16;  // float32 vectors per row
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  __m512bh qv[Q][NB];
  __m512 acc[Q][NV];
  float mx[Q], den[Q];
  int64_t ctx = 0;
  for (int64_t m = 0; m < Q; ++m) {
    for (int64_t i = 0; i < NB; ++i)
      qv[m][i] = (__m512bh)_mm512_loadu_si512(qrow[m] + i * 32);
    for (int64_t i = 0; i < NV; ++i) acc[m][i] = _mm512_setzero_ps();
    mx[m] = kNegInf;
    den[m] = 0.0f;
    ctx = std::max<int64_t>(ctx, len[m]);
  }
  alignas(64) float p[Q][kBlock];
  const int64_t blocks = (ctx + kBlock - 1) / kBlock;
  const int64_t row_bytes = kv_slot * static_cast<int64_t>(sizeof(at::BFloat16));
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t start = 0; start < ctx; start += kBlock) {
    const int64_t n_t = std::min(kBlock, ctx - start);
    const int64_t base = static_cast<int64_t>(table[start / kBlock]) * kBlock;
    // the block kAhead on (in this pass, else in the next one), fetched a row at a time
    // while this block's values are added, so that requests to memory stay spread out
    const int64_t ahead = start / kBlock + kAhead;
    const char* pk = nullptr;
    const char* pv = nullptr;
    if (ahead < blocks || ahead - blocks < next_blocks) {
      const int64_t slot = static_cast<int64_t>(ahead < blocks ? table[ahead]
                                                : next_table[ahead - blocks]) * kBlock;
      pk = reinterpret_cast<const char*>(kp + slot * kv_slot);
      pv = reinterpret_cast<const char*>(vp + slot * kv_slot);
    }
    int64_t vis_max = 0;
    for (int64_t m = 0; m < Q; ++m) {
      const int64_t vis = std::min<int64_t>(n_t, std::max<int64_t>(0, len[m] - start));
      vis_max = std::max(vis_max, vis);
      if (vis == 0) {
        for (int64_t t = 0; t < kBlock; ++t) p[m][t] = 0.0f;
        continue;
      }
      __m512 part[kBlock];
      for (int64_t t = 0; t < kBlock; ++t) {
        if (t >= vis) {  // not read: another sequence's, or not yet written
          part[t] = _mm512_setzero_ps();
          continue;
        }
        const at::BFloat16* kr = kp + (base + t) * kv_slot + g_of[m] * DIM;
        __m512 d = _mm512_setzero_ps();
        for (int64_t i = 0; i < NB; ++i)
          d = _mm512_dpbf16_ps(d, qv[m][i], (__m512bh)_mm512_loadu_si512(kr + i * 32));
        part[t] = d;
      }
      const __mmask16 mask = static_cast<__mmask16>((1u << vis) - 1u);
      const __m512 s = _mm512_mul_ps(transpose_sum(part), vscale);
      const float new_max = std::max(mx[m], _mm512_mask_reduce_max_ps(mask, s));
      const __m512 e = _mm512_maskz_mov_ps(mask,
          exp_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(new_max))));
      const float alpha = mx[m] == kNegInf ? 0.0f
          : _mm512_cvtss_f32(exp_nonpositive(_mm512_set1_ps(mx[m] - new_max)));
      den[m] = den[m] * alpha + _mm512_reduce_add_ps(e);
      mx[m] = new_max;
      _mm512_store_ps(p[m], e);
      const __m512 va = _mm512_set1_ps(alpha);
      for (int64_t i = 0; i < NV; ++i) acc[m][i] = _mm512_mul_ps(acc[m][i], va);
    }
    for (int64_t t = 0; t < kBlock; ++t) {
      if (pk != nullptr) {
        for (int64_t b = 0; b < row_bytes; b += 64) {
          _mm_prefetch(pk + t * row_bytes + b, _MM_HINT_T2);
          _mm_prefetch(pv + t * row_bytes + b, _MM_HINT_T2);
        }
      }
      if (t >= vis_max) continue;
      const at::BFloat16* vr = vp + (base + t) * kv_slot;
      __m512 vf[NV];
      int64_t widened = -1;  // the kv head in vf (query vectors come ordered by head)
      for (int64_t m = 0; m < Q; ++m) {
        if (g_of[m] != widened) {
          widened = g_of[m];
          for (int64_t i = 0; i < NV; ++i) vf[i] = widen(vr + widened * DIM + i * 16);
        }
        const __m512 w = _mm512_set1_ps(p[m][t]);
        for (int64_t i = 0; i < NV; ++i) acc[m][i] = _mm512_fmadd_ps(w, vf[i], acc[m][i]);
      }
    }
  }
  for (int64_t m = 0; m < Q; ++m) {
    const __m512 inv = _mm512_set1_ps(den[m] > 0 ? 1.0f / den[m] : 0.0f);
    for (int64_t i = 0; i < NV; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow[m] + i * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[m][i], inv)));
    *lrow[m] = den[m] > 0 ? mx[m] + std::log(den[m]) : kNegInf;
  }
}

// Whole op for bfloat16 tensors, block size 16, head size DIM (64 or 128).
template <int64_t DIM>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& cu_q, const at::Tensor& kv_len,
            double scale, at::Tensor& out, at::Tensor& lse) {
  constexpr int64_t kPass = DIM <= 64 ? 4 : 2;  // accumulators: kPass * DIM / 16 registers
  const int64_t num_seqs = cu_q.size(0) - 1;
  const int64_t heads = q.size(1), kv_heads = k_cache.size(1), group = heads / kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const auto* qp = q.data_ptr<at::BFloat16>();
  const auto* kp = k_cache.data_ptr<at::BFloat16>();
  const auto* vp = v_cache.data_ptr<at::BFloat16>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* cu = cu_q.data_ptr<int32_t>();
  const int32_t* lens = kv_len.data_ptr<int32_t>();
  auto* op = out.data_ptr<at::BFloat16>();
  float* lp = lse.data_ptr<float>();
  const int64_t q_row = heads * DIM, kv_slot = kv_heads * DIM;
  const float fscale = static_cast<float>(scale);

  // one task a sequence: its query vectors ordered (row, head), kPass at a time, so that a
  // pass reads whole cache rows (every kv head) and each block is fetched from memory once
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row0 = cu[r], m_count = (cu[r + 1] - cu[r]) * heads;
      const int32_t* table = tables + r * max_blocks;
      for (int64_t m0 = 0; m0 < m_count; m0 += kPass) {
        const int64_t n = std::min(kPass, m_count - m0);
        const at::BFloat16* qrow[kPass];
        at::BFloat16* orow[kPass];
        float* lrow[kPass];
        int32_t len[kPass];
        int64_t g_of[kPass];
        for (int64_t j = 0; j < n; ++j) {
          const int64_t m = m0 + j, i = m / heads, h = m % heads;
          qrow[j] = qp + (row0 + i) * q_row + h * DIM;
          orow[j] = op + (row0 + i) * q_row + h * DIM;
          lrow[j] = lp + (row0 + i) * heads + h;
          len[j] = lens[row0 + i];
          g_of[j] = h / group;
          TORCH_CHECK(len[j] <= max_blocks * kBlock,
                      "paged_attention: kv_len beyond the block table");
        }
        // what the pass after this one reads first: this sequence again, or the next one
        const bool last = m0 + kPass >= m_count;
        const int64_t nr = last ? r + 1 : r;
        const int32_t* next_table = nr < end ? tables + nr * max_blocks : table;
        const int64_t next_blocks = nr < end && cu[nr + 1] > cu[nr]
            ? std::min<int64_t>((lens[cu[nr + 1] - 1] + kBlock - 1) / kBlock, max_blocks) : 0;
        switch (n) {
          case 1: pass<1, DIM>(qrow, len, g_of, fscale, kp, vp, table, kv_slot, next_table,
                             next_blocks, orow, lrow); break;
          case 2: pass<2, DIM>(qrow, len, g_of, fscale, kp, vp, table, kv_slot, next_table,
                             next_blocks, orow, lrow); break;
          case 3:
            if constexpr (kPass >= 3) {
              pass<3, DIM>(qrow, len, g_of, fscale, kp, vp, table, kv_slot, next_table,
                             next_blocks, orow, lrow);
            }
            break;
          default:
            if constexpr (kPass >= 4) {
              pass<4, DIM>(qrow, len, g_of, fscale, kp, vp, table, kv_slot, next_table,
                             next_blocks, orow, lrow);
            }
            break;
        }
      }
    }
  });
}

}  // namespace sparkgrid_bf16

#endif
