// Paged prefill attention for the CPU (see engine_svc/runner/cpu_ops.py): one prompt chunk
// attends causally to its cached prefix and to itself, reading K and V through the block table.
//
// Flash-attention order: a tile of query tokens (all G query heads of one KV head) walks the
// keys in tiles of KT, with a float32 online softmax per query row, so the scores never leave
// the caches (the torch path writes a [rows, context] float32 score block and reads it four
// times: scale, mask, softmax, weights). Each key tile is gathered once per query tile from its
// blocks, widened to float32 (int8 times its scales) and K transposed, which is what the two
// register-tiled products want: S = Q K^T as MR query rows x 16 keys per inner step, and
// O += P V as MR rows x 16 head dimensions. The vectors are GCC vector extensions (8 floats):
// AVX2 + FMA registers under -march=native, SSE pairs on older CPUs, with no intrinsics.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace prefill {

typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

constexpr int64_t QT = 32;   // query tokens per tile (G rows each)
constexpr int64_t KT = 128;  // keys per key tile, a multiple of 16
constexpr int MR = 6;        // query rows per register tile

static inline v8 load(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline void store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
// One register holding x in every lane, made once and used for both halves of a 16-wide row:
// written as a scalar times a vector, GCC broadcasts again for every product.
static inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// e^x for x <= 0 (scores minus their row's max): x = n ln2 + r with |r| <= ln2 / 2, a degree-6
// polynomial for e^r, 2^n built in the exponent bits. x is clamped at -87 (e^-87 ~ 1.6e-38,
// a weight that cannot change a float32 sum), which keeps 2^n a normal float. Relative error
// about 2e-7.
static inline v8 exp8(v8 x) {
  x = x < -87.f ? v8{} - 87.f : x;
  const v8 t = x * 1.44269504088896341f;
  const v8i n = __builtin_convertvector(t + (t < 0.f ? v8{} - 0.5f : v8{} + 0.5f), v8i);
  const v8 nf = __builtin_convertvector(n, v8);
  v8 r = x - nf * 0.693145751953125f;
  r = r - nf * 1.428606765330187045e-06f;
  v8 p = v8{} + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const v8i bits = (n + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// s[r][j] = q[r] . kt[:, j] for R rows and keys j < nk16 (a multiple of 16), kt [D][KT].
template <int R>
static inline void scores_tile(const float* __restrict q, const float* __restrict kt, int64_t D,
                               int64_t nk16, float* __restrict s) {
  for (int64_t j = 0; j < nk16; j += 16) {
    v8 a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = v8{};
    for (int64_t d = 0; d < D; ++d) {
      const v8 k0 = load(kt + d * KT + j), k1 = load(kt + d * KT + j + 8);
      for (int r = 0; r < R; ++r) {
        const v8 qr = splat(q[r * D + d]);
        a[r][0] += qr * k0;
        a[r][1] += qr * k1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store(s + r * KT + j, a[r][0]);
      store(s + r * KT + j + 8, a[r][1]);
    }
  }
}

// acc[r] += sum over j < nk of p[r][j] * v[j] for R rows, v [KT][D], D a multiple of 16.
template <int R>
static inline void values_tile(const float* __restrict p, const float* __restrict v, int64_t D,
                               int64_t nk, float* __restrict acc) {
  for (int64_t d = 0; d < D; d += 16) {
    v8 a[R][2];
    for (int r = 0; r < R; ++r) {
      a[r][0] = load(acc + r * D + d);
      a[r][1] = load(acc + r * D + d + 8);
    }
    for (int64_t j = 0; j < nk; ++j) {
      const v8 v0 = load(v + j * D + d), v1 = load(v + j * D + d + 8);
      for (int r = 0; r < R; ++r) {
        const v8 pr = splat(p[r * KT + j]);
        a[r][0] += pr * v0;
        a[r][1] += pr * v1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store(acc + r * D + d, a[r][0]);
      store(acc + r * D + d + 8, a[r][1]);
    }
  }
}

// Rows [0, rows) in register tiles of MR, the last one narrower.
template <typename F6, typename F1>
static inline void by_rows(int64_t rows, F6 full, F1 one) {
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) full(r);
  for (; r < rows; ++r) one(r);
}

struct Cache {  // one KV head's blocks and, for an int8 cache, its scales
  const void* k;
  const void* v;
  const float* ks;
  const float* vs;
};

struct Scratch {  // per-thread buffers
  std::vector<float> q, acc, m, l, s, kt, v;
  Scratch(int64_t rows, int64_t D)
      : q(rows * D), acc(rows * D), m(rows), l(rows), s(rows * KT), kt(D * KT), v(KT * D) {}
};

// Keys [j0, j0 + nk) of one KV head, widened to float32: K transposed into kt [D][KT] (zero
// up to a multiple of 16 keys), V into v [KT][D].
template <typename cache_t>
static void gather_tile(const Cache& c, const int64_t* blocks, int64_t BS, int64_t D, int64_t j0,
                        int64_t nk, float* __restrict kt, float* __restrict v) {
  const cache_t* kh = static_cast<const cache_t*>(c.k);
  const cache_t* vh = static_cast<const cache_t*>(c.v);
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t slot = blocks[(j0 + j) / BS] * BS + (j0 + j) % BS;
    const cache_t* kr = kh + slot * D;
    const cache_t* vr = vh + slot * D;
    const float ks = c.ks == nullptr ? 1.f : c.ks[slot];
    const float vs = c.vs == nullptr ? 1.f : c.vs[slot];
    for (int64_t d = 0; d < D; ++d) kt[d * KT + j] = static_cast<float>(kr[d]) * ks;
    for (int64_t d = 0; d < D; ++d) v[j * D + d] = static_cast<float>(vr[d]) * vs;
  }
  const int64_t nk16 = (nk + 15) / 16 * 16;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = nk; j < nk16; ++j) kt[d * KT + j] = 0.f;
}

// Softmax step of one row over its nv valid scores of this key tile (nv >= 1); the weights
// replace the scores, the rest of the tile's row is zeroed. Returns the factor that rescales
// the row's accumulated output.
static inline float softmax_row(float* __restrict s, int64_t nv, int64_t nk, bool first,
                                float& m, float& l) {
  float bm = s[0];
  for (int64_t j = 1; j < nv; ++j) bm = std::max(bm, s[j]);
  const float mn = first ? bm : std::max(m, bm);
  v8 vsum{};
  int64_t j = 0;
  for (; j + 8 <= nv; j += 8) {
    const v8 e = exp8(load(s + j) - mn);
    store(s + j, e);
    vsum += e;
  }
  float sum = 0.f;
  for (int i = 0; i < 8; ++i) sum += vsum[i];
  for (; j < nv; ++j) {
    s[j] = std::exp(s[j] - mn);
    sum += s[j];
  }
  for (j = nv; j < nk; ++j) s[j] = 0.f;
  const float corr = first ? 1.f : std::exp(m - mn);
  l = first ? sum : l * corr + sum;
  m = mn;
  return corr;
}

// One query tile [t0, t1) of one KV head: rows r = t * G + g (token-major), so row r may see
// keys < ctx + t0 + r / G + 1.
template <typename scalar_t, typename cache_t>
static void tile(const scalar_t* q, int64_t q_stride, scalar_t* out, const Cache& c,
                 const int64_t* blocks, int64_t h, int64_t t0, int64_t t1, int64_t ctx,
                 int64_t H, int64_t G, int64_t D, int64_t BS, float scale, Scratch& w) {
  const int64_t rows = (t1 - t0) * G, kend = ctx + t1;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* qr = q + (t0 + r / G) * q_stride + (h * G + r % G) * D;
    for (int64_t d = 0; d < D; ++d) w.q[r * D + d] = static_cast<float>(qr[d]) * scale;
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows * D, 0.f);
  for (int64_t j0 = 0; j0 < kend; j0 += KT) {
    const int64_t nk = std::min(KT, kend - j0), nk16 = (nk + 15) / 16 * 16;
    gather_tile<cache_t>(c, blocks, BS, D, j0, nk, w.kt.data(), w.v.data());
    by_rows(
        rows, [&](int64_t r) { scores_tile<MR>(&w.q[r * D], w.kt.data(), D, nk16, &w.s[r * KT]); },
        [&](int64_t r) { scores_tile<1>(&w.q[r * D], w.kt.data(), D, nk16, &w.s[r * KT]); });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t nv = std::min(nk, ctx + t0 + r / G + 1 - j0);
      float* sr = &w.s[r * KT];
      if (nv <= 0) {  // every key of this tile is after the row's token
        std::fill(sr, sr + nk, 0.f);
        continue;
      }
      const float corr = softmax_row(sr, nv, nk, j0 == 0, w.m[r], w.l[r]);
      if (corr != 1.f)
        for (int64_t d = 0; d < D; ++d) w.acc[r * D + d] *= corr;
    }
    by_rows(
        rows, [&](int64_t r) { values_tile<MR>(&w.s[r * KT], w.v.data(), D, nk, &w.acc[r * D]); },
        [&](int64_t r) { values_tile<1>(&w.s[r * KT], w.v.data(), D, nk, &w.acc[r * D]); });
  }
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* o = out + ((t0 + r / G) * H + h * G + r % G) * D;
    const float inv = 1.f / w.l[r];
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(w.acc[r * D + d] * inv);
  }
}

template <typename scalar_t, typename cache_t>
static void run(const scalar_t* q, int64_t q_stride, scalar_t* out, const void* kc,
                const void* vc, const float* ksc, const float* vsc, const int64_t* blocks,
                int64_t T, int64_t ctx, int64_t H, int64_t KVH, int64_t D, int64_t NB, int64_t BS,
                float scale) {
  const int64_t G = H / KVH, tiles = (T + QT - 1) / QT, items = tiles * KVH;
  // Later tiles see more keys: pairing the first tile with the last (0, n-1, 1, n-2, ...) gives
  // each thread's contiguous range of items about the same work.
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    Scratch w(QT * G, D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t z = i / KVH, h = i % KVH;
      const int64_t t = z % 2 == 0 ? z / 2 : tiles - 1 - z / 2;
      const int64_t head = h * NB * BS;
      const Cache c{static_cast<const cache_t*>(kc) + head * D,
                    static_cast<const cache_t*>(vc) + head * D,
                    ksc == nullptr ? nullptr : ksc + head, vsc == nullptr ? nullptr : vsc + head};
      tile<scalar_t, cache_t>(q, q_stride, out, c, blocks, h, t * QT, std::min(T, (t + 1) * QT),
                              ctx, H, G, D, BS, scale, w);
    }
  });
}

}  // namespace prefill

std::pair<const float*, const float*> cache_scales(  // paged_decode.cpp
    at::ScalarType, const torch::Tensor&, const torch::Tensor&,
    const c10::optional<torch::Tensor>&, const c10::optional<torch::Tensor>&);

// query [T, H, D] (rows of any stride, heads packed) are the chunk's tokens, the last T of a
// sequence of seq_len tokens whose K and V are already in the cache (written before attention,
// as for decodes). The cache is the query's dtype, bfloat16, float16, or int8 with its scales.
torch::Tensor paged_prefill(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                            torch::Tensor blocks, int64_t seq_len, double scale,
                            c10::optional<torch::Tensor> key_scales,
                            c10::optional<torch::Tensor> value_scales) {
  TORCH_CHECK(query.device().is_cpu() && key_cache.device().is_cpu() &&
                  value_cache.device().is_cpu() && blocks.device().is_cpu(),
              "CPU tensors only");
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2),
              "query heads must be packed ([tokens, heads, head_size], rows of any stride)");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(blocks.scalar_type() == torch::kInt64 && blocks.dim() == 1, "blocks must be int64 [n]");
  auto bl = blocks.contiguous();
  const int64_t T = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t KVH = key_cache.size(0), NB = key_cache.size(1), BS = key_cache.size(2);
  TORCH_CHECK(KVH > 0 && BS > 0 && H % KVH == 0 && key_cache.size(3) == D, "shape mismatch");
  TORCH_CHECK(D % 16 == 0, "head size ", D, " is not a multiple of 16");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "key and value caches differ in shape");
  TORCH_CHECK(T >= 1 && seq_len >= T, "seq_len ", seq_len, " shorter than the chunk (", T, ")");
  TORCH_CHECK(bl.numel() * BS >= seq_len, "too few blocks for seq_len ", seq_len);
  const int64_t* bp = bl.data_ptr<int64_t>();
  for (int64_t b = 0; b < (seq_len + BS - 1) / BS; ++b)
    TORCH_CHECK(bp[b] >= 0 && bp[b] < NB, "block id out of range");
  const auto qt = query.scalar_type(), ct = key_cache.scalar_type();
  const auto scales = cache_scales(qt, key_cache, value_cache, key_scales, value_scales);
  const float* ksp = scales.first;  // null unless the cache is int8
  const float* vsp = scales.second;
  auto out = torch::empty({T, H, D}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qt, "paged_prefill", [&] {
    auto go = [&](auto cache_zero) {
      using cache_t = decltype(cache_zero);
      prefill::run<scalar_t, cache_t>(query.data_ptr<scalar_t>(), query.stride(0),
                                      out.data_ptr<scalar_t>(), key_cache.data_ptr(),
                                      value_cache.data_ptr(), ksp, vsp, bp, T, seq_len - T, H,
                                      KVH, D, NB, BS, static_cast<float>(scale));
    };
    if (ct == qt) go(scalar_t{});
    else if (ct == torch::kBFloat16) go(c10::BFloat16{});
    else if (ct == torch::kHalf) go(c10::Half{});
    else go(int8_t{});
  });
  return out;
}
