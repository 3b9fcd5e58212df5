// Fused paged decode attention for the CPU (see engine_svc/cpu_ops.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// One (sequence, KV head): the scores of its G query heads against the context, softmax, and
// the weighted sum of V, block by block with an online softmax (running max m and sum l per
// query head; acc rescaled when the max grows), so each K and V block is read once, in place.
// GC, DC > 0 fix the group and head size at compile time: the loops unroll into vector
// registers and the exp loop vectorizes; 0 is the generic fallback. No infinities are used:
// the build has -ffast-math (finite math assumed), so the first block seeds m.
template <typename scalar_t, int GC, int DC>
static void decode_one(const float* __restrict qf, const scalar_t* __restrict kh,
                       const scalar_t* __restrict vh, const int64_t* __restrict table, int64_t L,
                       int64_t Gr, int64_t Dr, int64_t BS, float* __restrict p,
                       float* __restrict m, float* __restrict l, float* __restrict acc) {
  const int64_t G = GC > 0 ? GC : Gr;
  const int64_t D = DC > 0 ? DC : Dr;
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t b = 0, start = 0; start < L; ++b, start += BS) {
    const int64_t nt = std::min(BS, L - start);
    const int64_t off = table[b] * BS * D;
    const scalar_t* __restrict kb = kh + off;
    const scalar_t* __restrict vb = vh + off;
    if (start + BS < L) {  // the next block is elsewhere in memory: start fetching it now
      const int64_t next = table[b + 1] * BS * D;
      __builtin_prefetch(kh + next);
      __builtin_prefetch(vh + next);
    }
    for (int64_t t = 0; t < nt; ++t) {
      const scalar_t* __restrict k = kb + t * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* __restrict qg = qf + g * D;
        float a = 0.f;
#pragma omp simd reduction(+ : a)
        for (int64_t d = 0; d < D; ++d) a += qg[d] * static_cast<float>(k[d]);
        p[g * BS + t] = a;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* __restrict pg = p + g * BS;
      float bm = pg[0];
      for (int64_t t = 1; t < nt; ++t) bm = std::max(bm, pg[t]);
      const float mn = start == 0 ? bm : std::max(m[g], bm);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < nt; ++t) {
        const float e = std::exp(pg[t] - mn);
        pg[t] = e;
        sum += e;
      }
      if (start == 0) {
        l[g] = sum;
      } else {
        const float corr = std::exp(m[g] - mn);
        l[g] = l[g] * corr + sum;
        if (corr != 1.f) {
          float* __restrict ag = acc + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
        }
      }
      m[g] = mn;
    }
    for (int64_t t = 0; t < nt; ++t) {
      const scalar_t* __restrict v = vb + t * D;
      for (int64_t g = 0; g < G; ++g) {
        const float pt = p[g * BS + t];
        float* __restrict ag = acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += pt * static_cast<float>(v[d]);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.f / l[g];
    for (int64_t d = 0; d < D; ++d) acc[g * D + d] *= inv;
  }
}

struct Scratch {  // per-thread buffers of decode_one
  float *qf, *p, *m, *l, *acc;
};

template <typename scalar_t, int DC>
static void dispatch_g(int64_t G, int64_t D, const scalar_t* kh, const scalar_t* vh,
                       const int64_t* t, int64_t L, int64_t BS, const Scratch& s) {
#define PAGEDSERVE_CALL(GC) \
  decode_one<scalar_t, GC, DC>(s.qf, kh, vh, t, L, G, D, BS, s.p, s.m, s.l, s.acc)
  switch (G) {
    case 1: return PAGEDSERVE_CALL(1);
    case 2: return PAGEDSERVE_CALL(2);
    case 3: return PAGEDSERVE_CALL(3);
    case 4: return PAGEDSERVE_CALL(4);
    case 8: return PAGEDSERVE_CALL(8);
    default: return PAGEDSERVE_CALL(0);
  }
#undef PAGEDSERVE_CALL
}

template <typename scalar_t>
static void dispatch(int64_t G, int64_t D, const scalar_t* kh, const scalar_t* vh,
                     const int64_t* t, int64_t L, int64_t BS, const Scratch& s) {
  if (D == 64) return dispatch_g<scalar_t, 64>(G, D, kh, vh, t, L, BS, s);
  if (D == 128) return dispatch_g<scalar_t, 128>(G, D, kh, vh, t, L, BS, s);
  return dispatch_g<scalar_t, 0>(G, D, kh, vh, t, L, BS, s);
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
  const int64_t G = H / KVH, items = n * KVH;
  // Decodes arrive sorted by context length, so contiguous item ranges would leave one thread
  // with all the long ones: thread r of T takes items r, r + T, r + 2T, ...
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::parallel_for(0, T, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(2 * G * D + G * BS + 2 * G);
    const Scratch sc{buf.data(), buf.data() + G * D, buf.data() + G * D + G * BS,
                     buf.data() + G * D + G * BS + G, buf.data() + G * D + G * BS + 2 * G};
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t idx = r; idx < items; idx += T) {
        const int64_t s = idx / KVH, h = idx % KVH;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d)
            sc.qf[g * D + d] = static_cast<float>(q[(s * H + h * G + g) * D + d]) * scale;
        dispatch<scalar_t>(G, D, kc + h * NB * BS * D, vc + h * NB * BS * D, tables + s * W,
                           lens[s], BS, sc);
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d)
            out[(s * H + h * G + g) * D + d] = static_cast<scalar_t>(sc.acc[g * D + d]);
      }
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
