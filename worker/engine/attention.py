"""Attention over the paged KV cache, read where it lies: one interface, two implementations.

`paged_attention(q, k_cache, v_cache, meta, scale)` attends packed query rows (sequence after
sequence) to the first `kv_len[n]` positions of their own sequence in a paged cache, and
returns the output and the log-sum-exp of each row and head (`merge` joins it with attention
over keys kept elsewhere, as the drafter's block).

- `native`: a C++ kernel (`csrc/`, registered as `torch.ops.sparkgrid.paged_attention`) that
  streams each sequence's cache blocks in place. Portable code serves every query row and head
  sharing a kv head from one float32 copy of a block, summing scores and softmax denominators
  in one fixed order whatever the number of rows in the pass (a verify row gets the bits of
  the same position decoded alone, so greedy speculation reproduces plain decoding on an
  AVX2 CPU too); bfloat16 caches on CPUs with AVX512-BF16
  take `csrc/attention_bf16.h` (bfloat16 dot products, scores and accumulators in registers,
  several query vectors per pass over a sequence's blocks). Built
  with the machine's C++ compiler at first use (about 15 s) and cached per source, torch version
  and CPU in `~/.cache/sparkgrid/ext`, beside the profiled cost tables. CPU only.
- `torch`: the reference in plain torch ops (gather the contexts into a padded tensor, one
  masked softmax); used on other devices, where the native kernel cannot be built, or when
  `SPARKGRID_ATTENTION=torch` asks for it (tests run both).

Why a hand-written kernel on a CPU: measured on one core (16 sequences of 256 positions,
bfloat16 cache, one layer), gathering the contexts and a masked SDPA take 1.9 ms for one query
a sequence and 5.1 ms for eight; torch's `flex_attention` compiled for the CPU with a paged
block mask takes 3.9 ms plus 12 ms to build the mask each step; nested (jagged) tensors have no
CPU attention with GQA or holes; the CPU build of no serving library installs beside this
torch. The kernel did the same in 0.2 ms (1.0 ms for eight), and serves whole engine steps in
`bench/peers.py`. In a serving step the cache comes from memory, not from the CPU's caches:
64 sequences of 256 positions with every layer's cache cold take the portable code 1.1-1.2 ms,
the bfloat16 path 0.45-0.6 ms (it prefetches blocks a row at a time, a few blocks ahead),
against 0.39 ms for a plain sum of the same bytes. Knows: tensors and block tables. Does not
know: models, requests or budgets.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_BACKENDS = ("auto", "native", "torch")
_lock = threading.Lock()
_native_state: dict[str, object] = {}


@dataclass
class AttentionMeta:
    """Where each packed query row's keys are: shared by every layer of one forward."""

    block_tables: torch.Tensor  # [R, max_blocks] int32 cache blocks of each sequence
    cu_q: torch.Tensor          # [R + 1] int32: rows of sequence r are cu_q[r] .. cu_q[r+1]
    kv_len: torch.Tensor        # [N] int32: row n attends positions [0, kv_len[n])
    block_size: int
    max_kv_len: int             # max(kv_len), known on the host (no device sync)
    backend: str                # "native" or "torch"


def attention_meta(tables: torch.Tensor, rows: list[int], kv_len: list[int], block_size: int,
                   backend: str) -> AttentionMeta:
    """Sequence r owns `rows[r]` packed query rows (in order); row n sees `kv_len[n]` positions."""
    dev = tables.device
    cu = [0]
    for n in rows:
        cu.append(cu[-1] + n)
    return AttentionMeta(tables.to(torch.int32), torch.tensor(cu, dtype=torch.int32, device=dev),
                         torch.tensor(kv_len, dtype=torch.int32, device=dev), block_size,
                         max(kv_len), backend)


def requested_backend() -> str:
    value = os.environ.get("SPARKGRID_ATTENTION", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"SPARKGRID_ATTENTION: expected one of {_BACKENDS}, got {value!r}")
    return value


def backend_for(device: torch.device) -> str:
    """`native` where the kernel runs (a CPU that built it), else `torch`."""
    wanted = requested_backend()
    if wanted == "torch" or device.type != "cpu":
        if wanted == "native" and device.type != "cpu":
            raise ValueError("SPARKGRID_ATTENTION: 'native' is the CPU kernel; this device is "
                             f"{device.type} (use 'auto' or 'torch')")
        return "torch"
    if load_native():
        return "native"
    if wanted == "native":
        raise RuntimeError(f"SPARKGRID_ATTENTION=native, but the kernel did not build: "
                           f"{_native_state.get('error')}")
    return "torch"


def reads_prefill_in_place(backend: str, dtype: torch.dtype, head_dim: int,
                           block_size: int) -> bool:
    """Whether a prefill should attend through the paged cache too (it is written before
    attention): where the kernel's bfloat16 path serves it (AVX512-BF16, blocks of 16, heads
    of 64 or 128). There it is ~4x a per-sequence float32 SDPA, and a prompt's positions come
    out with the bits they would have if decoded one at a time."""
    return (backend == "native" and dtype == torch.bfloat16 and block_size == 16
            and head_dim in (64, 128) and "avx512_bf16" in _cpu_flags().split())


def implementation_id(backend: str) -> str:
    """Names the attention code a cost profile was measured with: `torch`, or `native-` and a
    hash of the kernel's source (profiles cached on disk are keyed by it)."""
    if backend != "native":
        return backend
    return "native-" + hashlib.sha256(_source_bytes()).hexdigest()[:12]


def _source_bytes() -> bytes:
    """Every file the kernels are built from (sources and headers), in name order."""
    return b"".join(p.name.encode() + p.read_bytes() for p in sorted(_CSRC.iterdir())
                    if p.suffix in (".cpp", ".h"))


def native_ops_ready() -> bool:
    """Whether the native ops are loaded (without building them)."""
    return bool(_native_state.get("ok"))


def load_native() -> bool:
    """Build (once per source, torch and CPU) and load the CPU kernel; False if it cannot."""
    with _lock:
        if "ok" in _native_state:
            return bool(_native_state["ok"])
        try:
            _build_and_load()
            _native_state["ok"] = True
        except Exception as exc:  # no compiler, no headers: the torch path still serves
            _native_state.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            log.warning("paged attention: the native CPU kernel is unavailable (%s); using "
                        "the torch reference, which is several times slower", exc)
        return bool(_native_state["ok"])


def _build_and_load() -> None:
    if hasattr(torch.ops.sparkgrid, "paged_attention"):
        return
    from torch.utils import cpp_extension  # imported here: it pulls in setuptools

    ident = hashlib.sha256(_source_bytes() + torch.__version__.encode() + _cpu_flags().encode())
    name = f"sparkgrid_paged_attention_{ident.hexdigest()[:16]}"
    build_dir = Path.home() / ".cache" / "sparkgrid" / "ext" / name  # shared by every home
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in sorted(_CSRC.glob("*.cpp"))]
    cpp_extension.load(name=name, sources=sources, build_directory=str(build_dir),
                       extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)


@functools.cache
def _cpu_flags() -> str:
    """What the compiled kernel depends on besides its source (it is built for this CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMeta, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, heads, dim]; caches [slots, kv_heads, dim] (one layer) -> out [N, heads, dim]
    in q's dtype and lse [N, heads] float32 (-inf for a row that sees no key)."""
    if meta.backend == "native":
        return torch.ops.sparkgrid.paged_attention(q, k_cache, v_cache, meta.block_tables,
                                                   meta.cu_q, meta.kv_len, meta.block_size,
                                                   scale)
    return paged_attention_torch(q, k_cache, v_cache, meta, scale)


def paged_attention_torch(q, k_cache, v_cache, meta: AttentionMeta, scale: float):
    """The reference: gather every sequence's context into a padded tensor, then one masked
    softmax in float32 (or float64 for float64 inputs)."""
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    dev = q.device
    counts = meta.cu_q[1:] - meta.cu_q[:-1]
    seq_of = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts.long())
    length = max(1, meta.max_kv_len)
    pos = torch.arange(length, device=dev)
    bs = meta.block_size
    tables = meta.block_tables.long()
    blocks = (pos // bs).clamp(max=tables.shape[1] - 1)
    slots = tables[:, blocks] * bs + pos % bs  # [R, L]
    acc = torch.promote_types(q.dtype, torch.float32)
    k = k_cache[slots].to(acc)[seq_of]  # [N, L, kv_heads, dim]
    v = v_cache[slots].to(acc)[seq_of]
    group = heads // kv_heads  # query head h reads kv head h // group
    scores = torch.einsum("nhd,nlhd->nhl", q.to(acc), k.repeat_interleave(group, dim=2)) * scale
    visible = pos[None, :] < meta.kv_len.long()[:, None]  # [N, L]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [N, heads]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("nhl,nlhd->nhd", probs, v.repeat_interleave(group, dim=2))
    return out.to(q.dtype), lse.float()


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint key sets joined: outs [..., heads, dim], lses [..., heads]
    -> the softmax over the union of both key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    acc = torch.promote_types(out_a.dtype, torch.float32)
    return (out_a.to(acc) * wa + out_b.to(acc) * wb).to(out_a.dtype)


def cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                          dtype: torch.dtype) -> int:
    """Bytes one cached token takes: keys and values of every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
