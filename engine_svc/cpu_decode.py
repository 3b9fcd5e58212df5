"""A fused CPU decode-attention kernel (C++, built once with torch's cpp_extension).

On the CPU, torch has no op that reads K/V through a block table: the plain-torch path first
copies every sequence's blocks out of the paged cache (``index_select``) and then runs two
matmuls, so each step moves the whole context three times. This kernel reads each block in
place, once: per (sequence, KV head) it computes the scores of the head's query group, a
float32 softmax, and the weighted sum of V. Same math as ``kernels.reference.paged_attention``
for one query token per sequence (tested against it).

It is optional: when the build fails (no compiler, no ninja) or ``PAGEDSERVE_CPU_KERNEL=0`` is
set, ``load()`` returns None and the engine keeps the plain-torch path.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger("pagedserve.engine")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// One (sequence, KV head): scores of its G query heads, softmax, weighted sum of V.
// GC, DC > 0 fix the group size and head size at compile time, so the loops unroll into
// vector registers; 0 is the generic fallback.
template <typename scalar_t, int GC, int DC>
static void decode_one(const float* qf, const scalar_t* kh, const scalar_t* vh,
                       const int64_t* table, int64_t L, int64_t Gr, int64_t Dr, int64_t BS,
                       float* scores, float* acc) {
  const int64_t G = GC > 0 ? GC : Gr;
  const int64_t D = DC > 0 ? DC : Dr;
  for (int64_t t = 0; t < L; ++t) {
    const scalar_t* k = kh + (table[t / BS] * BS + t % BS) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t d = 0; d < D; ++d) a += qg[d] * static_cast<float>(k[d]);
      scores[g * L + t] = a;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * L;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < L; ++t) m = std::max(m, sg[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < L; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
  }
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t t = 0; t < L; ++t) {
    const scalar_t* v = vh + (table[t / BS] * BS + t % BS) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * L + t];
      float* ag = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += p * static_cast<float>(v[d]);
    }
  }
}

template <typename scalar_t, int DC>
static void dispatch_g(int64_t G, int64_t D, const float* qf, const scalar_t* kh,
                       const scalar_t* vh, const int64_t* t, int64_t L, int64_t BS, float* s,
                       float* a) {
  switch (G) {
    case 1: return decode_one<scalar_t, 1, DC>(qf, kh, vh, t, L, G, D, BS, s, a);
    case 2: return decode_one<scalar_t, 2, DC>(qf, kh, vh, t, L, G, D, BS, s, a);
    case 3: return decode_one<scalar_t, 3, DC>(qf, kh, vh, t, L, G, D, BS, s, a);
    case 4: return decode_one<scalar_t, 4, DC>(qf, kh, vh, t, L, G, D, BS, s, a);
    case 8: return decode_one<scalar_t, 8, DC>(qf, kh, vh, t, L, G, D, BS, s, a);
    default: return decode_one<scalar_t, 0, DC>(qf, kh, vh, t, L, G, D, BS, s, a);
  }
}

template <typename scalar_t>
static void dispatch(int64_t G, int64_t D, const float* qf, const scalar_t* kh,
                     const scalar_t* vh, const int64_t* t, int64_t L, int64_t BS, float* s,
                     float* a) {
  if (D == 64) return dispatch_g<scalar_t, 64>(G, D, qf, kh, vh, t, L, BS, s, a);
  if (D == 128) return dispatch_g<scalar_t, 128>(G, D, qf, kh, vh, t, L, BS, s, a);
  return dispatch_g<scalar_t, 0>(G, D, qf, kh, vh, t, L, BS, s, a);
}

template <typename scalar_t>
static void decode_kernel(
    const scalar_t* q,        // [n, H, D]
    const scalar_t* kc,       // [KVH, NB, BS, D]
    const scalar_t* vc,       // [KVH, NB, BS, D]
    const int64_t* tables,    // [n, W] block ids
    const int64_t* lens,      // [n] context length (including the new token)
    scalar_t* out,            // [n, H, D]
    int64_t n, int64_t H, int64_t KVH, int64_t D, int64_t NB, int64_t BS, int64_t W,
    float scale) {
  const int64_t G = H / KVH;
  at::parallel_for(0, n * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t s = idx / KVH, h = idx % KVH, L = lens[s];
      scores.resize(G * L);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = static_cast<float>(q[(s * H + h * G + g) * D + d]) * scale;
      const scalar_t* kh = kc + h * NB * BS * D;
      const scalar_t* vh = vc + h * NB * BS * D;
      const int64_t* table = tables + s * W;
      dispatch<scalar_t>(G, D, qf.data(), kh, vh, table, L, BS, scores.data(), acc.data());
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          out[(s * H + h * G + g) * D + d] = static_cast<scalar_t>(acc[g * D + d]);
    }
  });
}

torch::Tensor paged_decode(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                           torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && seq_lens.scalar_type() == torch::kInt64,
              "block_tables and seq_lens must be int64");
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty_like(query);
  const int64_t n = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t KVH = key_cache.size(0), NB = key_cache.size(1), BS = key_cache.size(2);
  TORCH_CHECK(H % KVH == 0 && key_cache.size(3) == D, "shape mismatch");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "key and value caches differ in shape");
  TORCH_CHECK(query.device().is_cpu() && key_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() &&
                  value_cache.scalar_type() == query.scalar_type(), "dtypes differ");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == n && lens.numel() == n,
              "block_tables / seq_lens do not have one row per query");
  {  // Every block the kernel will read exists: O(n * W), nothing next to the attention.
    const int64_t W = tables.size(1);
    const int64_t* tp = tables.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    for (int64_t s = 0; s < n; ++s) {
      TORCH_CHECK(lp[s] >= 1 && lp[s] <= W * BS, "seq_lens[", s, "] out of range");
      for (int64_t b = 0; b < (lp[s] + BS - 1) / BS; ++b)
        TORCH_CHECK(tp[s * W + b] >= 0 && tp[s * W + b] < NB, "block id out of range");
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(query.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(),
                            value_cache.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(),
                            lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), n, H, KVH, D, NB,
                            BS, tables.size(1), static_cast<float>(scale));
  });
  return out;
}
"""

_NAME = "pagedserve_cpu_decode_v5"  # bump when the source changes
STALE_LOCK_S = 600.0
_lock = threading.Lock()
_module = None
_tried = False


def load():
    """The compiled module, or None when it cannot be built (the torch path is used then)."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("PAGEDSERVE_CPU_KERNEL", "1") == "0":
            return None
        try:
            from torch.utils.cpp_extension import load_inline

            _remove_stale_lock(_NAME)
            log.info("building the CPU decode-attention kernel (once; cached by torch)")
            _module = load_inline(
                name=_NAME,
                cpp_sources=_SOURCE,
                functions=["paged_decode"],
                extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-ffast-math"],
                verbose=False,
            )
        except Exception as e:  # no compiler or ninja: keep the plain-torch path
            log.warning("CPU decode kernel unavailable (%s); using the torch path", e)
            _module = None
        return _module


def _remove_stale_lock(name: str) -> None:
    """A build killed mid-way (Ctrl-C during the first start) leaves torch's lock file, and
    every later build would wait on it forever; no real build takes STALE_LOCK_S."""
    import time

    from torch.utils import cpp_extension

    try:
        lock = os.path.join(cpp_extension._get_build_directory(name, False), "lock")
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            log.warning("removing a stale kernel build lock %s", lock)
            os.remove(lock)
    except (OSError, AttributeError):
        pass


def paged_decode(
    query: torch.Tensor,  # [n, num_heads, head_size]: one query token per sequence
    key_cache: torch.Tensor,  # [num_kv_heads, num_blocks, block_size, head_size]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [n, max_blocks] int64
    seq_lens: torch.Tensor,  # [n] int64, context length including the new token
    scale: float,
) -> torch.Tensor:  # [n, num_heads, head_size]
    return _module.paged_decode(query, key_cache, value_cache, block_tables, seq_lens, scale)
