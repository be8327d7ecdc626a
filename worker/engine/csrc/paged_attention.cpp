// Paged attention on a CPU, reading keys and values where they lie in the paged cache.
//
// Query rows are packed sequence after sequence (the engine's ragged layout): the rows of
// sequence r are cu_q[r] .. cu_q[r+1]. Row n attends the first kv_len[n] positions of its
// sequence; position j lives in cache slot block_tables[r][j / block_size] * block_size +
// j % block_size. Nothing is copied or padded: each (sequence, kv head) task streams its
// context block by block, converts it to float32 once, and serves every query row and every
// query head that shares the kv head from it (grouped-query attention), with an online
// softmax. It returns the attention output and the log-sum-exp of each row and head, so a
// caller can merge it with attention over keys that are not in the cache (the drafter's
// block).
//
// bfloat16 caches with blocks of 16 and heads of 64 or 128 take the AVX512-BF16 path of
// attention_bf16.h where the CPU has it. Registered as torch.ops.sparkgrid.paged_attention;
// built at first use by worker/engine/attention.py.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention_bf16.h"
#include "exp_approx.h"

namespace {

using sparkgrid_common::exp_nonpositive;  // float32 (exp_approx.h)
inline double exp_nonpositive(double x) { return std::exp(x); }  // float64: exact library exp

constexpr int64_t kLanes = 16;  // query vectors scored together, one per vector lane

// Every path computes a score in one fixed order, so that a row's attention does not depend on
// how many query vectors share its pass (a verify row gives the bits of the same position
// decoded alone, and greedy speculation reproduces plain decoding): eight partial sums, part j
// taking the dims d = j (mod 8) in increasing order, then ((p0 + p1) + (p2 + p3)) + ((p4 + p5)
// + (p6 + p7)). Softmax denominators are summed in key order on every path too.
constexpr int64_t kParts = 8;

template <typename acc_t>
inline acc_t tree8(acc_t p0, acc_t p1, acc_t p2, acc_t p3, acc_t p4, acc_t p5, acc_t p6,
                   acc_t p7) {
  return ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7));
}

template <typename acc_t>
inline acc_t dot_fixed(const acc_t* a, const acc_t* b, int64_t dim) {
  acc_t part[kParts] = {};
  int64_t d = 0;
  for (; d + kParts <= dim; d += kParts) {
#pragma omp simd
    for (int64_t j = 0; j < kParts; ++j) part[j] += a[d + j] * b[d + j];
  }
  for (int64_t j = 0; d < dim; ++d, ++j) part[j] += a[d] * b[d];
  return tree8(part[0], part[1], part[2], part[3], part[4], part[5], part[6], part[7]);
}

// p[t] = exp(s[t] - max) for the `visible` first keys (0 for the rest of the block's `bs`),
// and their sum in key order.
template <typename acc_t>
inline acc_t exp_weights(const acc_t* s, acc_t* p, int64_t visible, int64_t bs, acc_t max) {
#pragma omp simd
  for (int64_t t = 0; t < bs; ++t) p[t] = t < visible ? exp_nonpositive(s[t] - max) : acc_t(0);
  acc_t sum = 0;
  for (int64_t t = 0; t < visible; ++t) sum += p[t];
  return sum;
}

// The per-query state of an online softmax: running max, denominator, unnormalized output.
template <typename acc_t>
struct Softmax {
  std::vector<acc_t> mx, den, acc;
  void reset(int64_t count, int64_t dim) {
    mx.assign(count, -std::numeric_limits<acc_t>::infinity());
    den.assign(count, 0);
    acc.assign(count * dim, 0);
  }
};

// Folds one block's scores into query m's state: p = exp(s - new max) for the `visible`
// first keys, the old output rescaled, then p-weighted values added. `p` gets the weights.
template <typename acc_t, int64_t DIM>
inline void fold(Softmax<acc_t>& st, int64_t m, int64_t dim, const acc_t* s, acc_t* p,
                 int64_t visible, int64_t bs, acc_t chunk_max, const acc_t* vf) {
  const acc_t new_max = std::max(st.mx[m], chunk_max);
  const acc_t sum = exp_weights(s, p, visible, bs, new_max);
  const acc_t alpha = st.mx[m] == -std::numeric_limits<acc_t>::infinity()
      ? acc_t(0) : exp_nonpositive(st.mx[m] - new_max);
  acc_t* a = st.acc.data() + m * dim;
  acc_t a_local[DIM > 0 ? DIM : 1];  // registers when DIM > 0
  acc_t* ar = DIM > 0 ? a_local : a;
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) ar[d] = a[d] * alpha;
  for (int64_t t = 0; t < visible; ++t) {
    const acc_t pt = p[t];
    const acc_t* vv = vf + t * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) ar[d] += pt * vv[d];
  }
  if (DIM > 0) {
    for (int64_t d = 0; d < dim; ++d) a[d] = ar[d];
  }
  st.den[m] = st.den[m] * alpha + sum;
  st.mx[m] = new_max;
}

// Few query vectors (M <= 4, a one-token decode row of a GQA group) with the head size known
// at compile time: each key and value row is converted to float once, in registers, and
// serves all M vectors; the M outputs stay in registers across the block.
template <typename scalar_t, typename acc_t, int64_t M, int64_t DIM>
inline void small_block(Softmax<acc_t>& st, const acc_t* qf, const int32_t* m_len,
                        int64_t start, int64_t n_t, const scalar_t* kp, const scalar_t* vp,
                        int64_t base, int64_t kv_slot, int64_t g) {
  constexpr int64_t kMaxBlock = 64;
  acc_t s[M][kMaxBlock];
  acc_t p[M][kMaxBlock];
  int64_t visible[M];
  acc_t new_max[M], alpha[M];
  for (int64_t m = 0; m < M; ++m) visible[m] = std::min<int64_t>(n_t, m_len[m] - start);
  for (int64_t t = 0; t < n_t; ++t) {
    const scalar_t* ks = kp + (base + t) * kv_slot + g * DIM;
    acc_t kr[DIM];
#pragma omp simd
    for (int64_t d = 0; d < DIM; ++d) kr[d] = static_cast<acc_t>(ks[d]);
    for (int64_t m = 0; m < M; ++m) s[m][t] = dot_fixed(qf + m * DIM, kr, DIM);
  }
  for (int64_t m = 0; m < M; ++m) {
    acc_t chunk_max = -std::numeric_limits<acc_t>::infinity();
    for (int64_t t = 0; t < visible[m]; ++t) chunk_max = std::max(chunk_max, s[m][t]);
    new_max[m] = visible[m] > 0 ? std::max(st.mx[m], chunk_max) : st.mx[m];
    const acc_t nm = new_max[m];
    const int64_t vis = visible[m];
    const acc_t sum = exp_weights(s[m], p[m], vis, n_t, nm);
    alpha[m] = (vis <= 0) ? acc_t(1)
        : (st.mx[m] == -std::numeric_limits<acc_t>::infinity() ? acc_t(0)
                                                               : exp_nonpositive(st.mx[m] - nm));
    st.den[m] = st.den[m] * alpha[m] + sum;
    st.mx[m] = new_max[m];
  }
  acc_t a[M][DIM];
  for (int64_t m = 0; m < M; ++m) {
    const acc_t* src = st.acc.data() + m * DIM;
#pragma omp simd
    for (int64_t d = 0; d < DIM; ++d) a[m][d] = src[d] * alpha[m];
  }
  for (int64_t t = 0; t < n_t; ++t) {
    const scalar_t* vs = vp + (base + t) * kv_slot + g * DIM;
    acc_t vr[DIM];
#pragma omp simd
    for (int64_t d = 0; d < DIM; ++d) vr[d] = static_cast<acc_t>(vs[d]);
    for (int64_t m = 0; m < M; ++m) {
      const acc_t pm = p[m][t];
#pragma omp simd
      for (int64_t d = 0; d < DIM; ++d) a[m][d] += pm * vr[d];
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    acc_t* dst = st.acc.data() + m * DIM;
#pragma omp simd
    for (int64_t d = 0; d < DIM; ++d) dst[d] = a[m][d];
  }
}

// Few query vectors (a one-token decode) with a compiled head size: `small_block`, each key
// read in place. Otherwise each block of keys and values is converted to float32 once
// (contiguous rows, vectorized), then serves every query vector of the task: the vectors are
// staged transposed, so that one key scores eight of them in one vector per dim (verify rows,
// a draft block). Both sum a score in the same order (`dot_fixed`).
template <typename scalar_t, int64_t BS, int64_t DIM>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& cu_q, const at::Tensor& kv_len,
            int64_t block_size, double scale, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t num_seqs = cu_q.size(0) - 1;
  const int64_t heads = q.size(1), dim = DIM > 0 ? DIM : q.size(2);
  const int64_t kv_heads = k_cache.size(1);
  const int64_t group = heads / kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t bs = BS > 0 ? BS : block_size;  // BS > 0: the block size, known at compile time
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* cu = cu_q.data_ptr<int32_t>();
  const int32_t* lens = kv_len.data_ptr<int32_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  // strides in elements: q/out [N, heads, dim], cache [slots, kv_heads, dim]
  const int64_t q_row = heads * dim, kv_slot = kv_heads * dim;

  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    Softmax<acc_t> st;
    std::vector<acc_t> qf, qt, s_buf(bs * kLanes), p_buf(bs), kf(bs * dim), vf(bs * dim);
    std::vector<int32_t> m_len;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, g = task % kv_heads;
      const int64_t row0 = cu[r], rows = cu[r + 1] - cu[r];
      const int64_t m_count = rows * group;  // query vectors served by this kv head
      if (m_count == 0) continue;
      // few vectors with a compiled head size: small_block; otherwise the lanes (the other
      // sizes are a fallback, kept on one path so that its rows are batch-invariant too)
      const bool small = DIM > 0 && m_count <= 4 && bs <= 64;
      const int64_t chunks = (m_count + kLanes - 1) / kLanes;
      st.reset(m_count, dim);
      qf.assign(m_count * dim, 0);
      m_len.assign(chunks * kLanes, 0);
      int64_t ctx = 0;
      for (int64_t m = 0; m < m_count; ++m) {
        const int64_t i = m / group, h = g * group + m % group;
        m_len[m] = lens[row0 + i];
        ctx = std::max<int64_t>(ctx, m_len[m]);
        const scalar_t* src = qp + (row0 + i) * q_row + h * dim;
        for (int64_t d = 0; d < dim; ++d) qf[m * dim + d] = static_cast<acc_t>(src[d]) * scale;
      }
      if (!small) {  // qt[chunk][d][lane]
        qt.assign(chunks * dim * kLanes, 0);
        for (int64_t m = 0; m < m_count; ++m)
          for (int64_t d = 0; d < dim; ++d)
            qt[((m / kLanes) * dim + d) * kLanes + m % kLanes] = qf[m * dim + d];
      }
      TORCH_CHECK(ctx <= max_blocks * bs, "paged_attention: kv_len beyond the block table");
      const int32_t* table = tables + r * max_blocks;
      for (int64_t start = 0; start < ctx; start += bs) {
        const int64_t n_t = std::min(bs, ctx - start);
        const int64_t base = static_cast<int64_t>(table[start / bs]) * bs;
        if (start + bs < ctx) {  // the next block is elsewhere in the pool: fetch it early
          const int64_t next = static_cast<int64_t>(table[start / bs + 1]) * bs;
          const int64_t n_next = std::min(bs, ctx - start - bs);
          const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
          for (int64_t t = 0; t < n_next; ++t) {
            const char* kr = reinterpret_cast<const char*>(kp + (next + t) * kv_slot + g * dim);
            const char* vr = reinterpret_cast<const char*>(vp + (next + t) * kv_slot + g * dim);
            for (int64_t b = 0; b < row_bytes; b += 64) {  // every cache line of the row
              __builtin_prefetch(kr + b);
              __builtin_prefetch(vr + b);
            }
          }
        }
        if (small) {  // staged rows unused: read in place
          constexpr int64_t D = DIM > 0 ? DIM : 1;
          const acc_t* q0 = qf.data();
          switch (m_count) {
            case 1: small_block<scalar_t, acc_t, 1, D>(st, q0, m_len.data(), start, n_t, kp, vp, base, kv_slot, g); break;
            case 2: small_block<scalar_t, acc_t, 2, D>(st, q0, m_len.data(), start, n_t, kp, vp, base, kv_slot, g); break;
            case 3: small_block<scalar_t, acc_t, 3, D>(st, q0, m_len.data(), start, n_t, kp, vp, base, kv_slot, g); break;
            default: small_block<scalar_t, acc_t, 4, D>(st, q0, m_len.data(), start, n_t, kp, vp, base, kv_slot, g); break;
          }
          continue;
        }
        for (int64_t t = 0; t < n_t; ++t) {
          const scalar_t* ks = kp + (base + t) * kv_slot + g * dim;
          const scalar_t* vs = vp + (base + t) * kv_slot + g * dim;
          acc_t* kd = kf.data() + t * dim;
          acc_t* vd = vf.data() + t * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) {
            kd[d] = static_cast<acc_t>(ks[d]);
            vd[d] = static_cast<acc_t>(vs[d]);
          }
        }
        for (int64_t c = 0; c < chunks; ++c) {
          const acc_t* qc = qt.data() + c * dim * kLanes;
          acc_t* s = s_buf.data();  // s[t * kLanes + lane]
          constexpr int64_t kGroup = 8;  // lanes a pass: eight partial sums of eight lanes each
          for (int64_t t = 0; t < n_t; ++t) {
            const acc_t* kv = kf.data() + t * dim;
            for (int64_t l0 = 0; l0 < kLanes; l0 += kGroup) {
              acc_t sl[kParts][kGroup] = {};
              int64_t d = 0;
              for (; d + kParts <= dim; d += kParts) {
                for (int64_t j = 0; j < kParts; ++j) {  // unrolled: the parts stay in registers
                  const acc_t kd = kv[d + j];
                  const acc_t* qd = qc + (d + j) * kLanes + l0;
#pragma omp simd
                  for (int64_t l = 0; l < kGroup; ++l) sl[j][l] += kd * qd[l];
                }
              }
              for (int64_t j = 0; d < dim; ++d, ++j) {
                const acc_t kd = kv[d];
                const acc_t* qd = qc + d * kLanes + l0;
#pragma omp simd
                for (int64_t l = 0; l < kGroup; ++l) sl[j][l] += kd * qd[l];
              }
              for (int64_t l = 0; l < kGroup; ++l)
                s[t * kLanes + l0 + l] = tree8(sl[0][l], sl[1][l], sl[2][l], sl[3][l], sl[4][l],
                                               sl[5][l], sl[6][l], sl[7][l]);
            }
          }
          const int64_t m_end = std::min(kLanes, m_count - c * kLanes);
          acc_t col[BS > 0 ? BS : 1];
          std::vector<acc_t> col_buf(BS > 0 ? 0 : bs);
          acc_t* sc = BS > 0 ? col : col_buf.data();
          for (int64_t l = 0; l < m_end; ++l) {
            const int64_t m = c * kLanes + l;
            const int64_t visible = std::min<int64_t>(n_t, m_len[m] - start);
            if (visible <= 0) continue;
            acc_t chunk_max = kNegInf;
            for (int64_t t = 0; t < visible; ++t) {
              sc[t] = s[t * kLanes + l];
              chunk_max = std::max(chunk_max, sc[t]);
            }
            fold<acc_t, DIM>(st, m, dim, sc, p_buf.data(), visible, bs, chunk_max, vf.data());
          }
        }
      }
      for (int64_t m = 0; m < m_count; ++m) {
        const int64_t i = m / group, h = g * group + m % group;
        scalar_t* dst = op + (row0 + i) * q_row + h * dim;
        const acc_t* a = st.acc.data() + m * dim;
        const acc_t inv = st.den[m] > 0 ? acc_t(1) / st.den[m] : acc_t(0);
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(a[d] * inv);
        lp[(row0 + i) * heads + h] = st.den[m] > 0
            ? static_cast<float>(st.mx[m] + std::log(st.den[m]))
            : -std::numeric_limits<float>::infinity();
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> paged_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& cu_q, const at::Tensor& kv_len,
    int64_t block_size, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "paged_attention: q [N, heads, dim] and caches [slots, kv_heads, dim]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_attention: q and the caches must share a dtype");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "paged_attention: k and v caches differ in shape");
  TORCH_CHECK(q.size(2) == k_cache.size(2), "paged_attention: head_dim differs");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "paged_attention: heads not a multiple of kv_heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && cu_q.scalar_type() == at::kInt &&
                  kv_len.scalar_type() == at::kInt,
              "paged_attention: block_tables, cu_q and kv_len must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == cu_q.size(0) - 1,
              "paged_attention: one block table row per sequence");
  TORCH_CHECK(kv_len.size(0) == q.size(0), "paged_attention: one kv_len per query row");
  TORCH_CHECK(block_size >= 1, "paged_attention: block_size must be >= 1");
  auto qc = q.contiguous();
  auto kc = k_cache.contiguous();
  auto vc = v_cache.contiguous();
  auto tc = block_tables.contiguous();
  auto cc = cu_q.contiguous();
  auto lc = kv_len.contiguous();
  auto out = at::empty_like(qc);
  auto lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    const int64_t dim = q.size(2);
#ifdef SPARKGRID_BF16_ATTENTION
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (block_size == 16 && (dim == 64 || dim == 128)) {
        if (dim == 64) {
          sparkgrid_bf16::attend<64>(qc, kc, vc, tc, cc, lc, scale, out, lse);
        } else {
          sparkgrid_bf16::attend<128>(qc, kc, vc, tc, cc, lc, scale, out, lse);
        }
        return;
      }
    }
#endif
    if (block_size == 16 && dim == 64) {
      attend<scalar_t, 16, 64>(qc, kc, vc, tc, cc, lc, block_size, scale, out, lse);
    } else if (block_size == 16 && dim == 128) {
      attend<scalar_t, 16, 128>(qc, kc, vc, tc, cc, lc, block_size, scale, out, lse);
    } else {
      attend<scalar_t, 0, 0>(qc, kc, vc, tc, cc, lc, block_size, scale, out, lse);
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(sparkgrid, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor cu_q, Tensor kv_len, int block_size, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparkgrid, CPU, m) {
  m.impl("paged_attention", &paged_attention);
}
