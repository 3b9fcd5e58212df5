// Fused paged decode attention for the CPU (see engine_svc/runner/cpu_ops.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cmath>
#include <vector>

// One step of the online softmax of a query head: the running max m becomes mn (>= m), the
// running sum l takes this chunk's sum of exp(score - mn); returns the factor by which the
// accumulated output must be rescaled (1 for the first chunk).
static inline float online_update(bool first, float mn, float sum, float& m, float& l) {
  const float corr = first ? 1.f : std::exp(m - mn);
  l = first ? sum : l * corr + sum;
  m = mn;
  return corr;
}

// One (sequence, KV head): the scores of its G query heads against the context, softmax, and
// the weighted sum of V, block by block with an online softmax (running max m and sum l per
// query head; acc rescaled when the max grows), so each K and V block is read once, in place.
// GC, DC > 0 fix the group and head size at compile time: the loops unroll into vector
// registers and the exp loop vectorizes; 0 is the generic fallback. No infinities are used:
// the build has -ffast-math (finite math assumed), so the first block seeds m.
//
// An int8 cache (ksh / vsh not null) holds one float32 scale per token and KV head: the dot
// product with the int8 key is scaled after the sum, the softmax weight of a token takes its
// value scale, so nothing is dequantized up front.
template <typename cache_t, int GC, int DC>
static void decode_one(const float* __restrict qf, const cache_t* __restrict kh,
                       const cache_t* __restrict vh, const float* __restrict ksh,
                       const float* __restrict vsh, const int64_t* __restrict table, int64_t L,
                       int64_t Gr, int64_t Dr, int64_t BS, float* __restrict p,
                       float* __restrict m, float* __restrict l, float* __restrict acc) {
  const int64_t G = GC > 0 ? GC : Gr;
  const int64_t D = DC > 0 ? DC : Dr;
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t b = 0, start = 0; start < L; ++b, start += BS) {
    const int64_t nt = std::min(BS, L - start);
    const int64_t off = table[b] * BS * D;
    const cache_t* __restrict kb = kh + off;
    const cache_t* __restrict vb = vh + off;
    const float* __restrict ksb = ksh == nullptr ? nullptr : ksh + table[b] * BS;
    const float* __restrict vsb = vsh == nullptr ? nullptr : vsh + table[b] * BS;
    if (start + BS < L) {  // the next block is elsewhere in memory: start fetching it now
      const int64_t next = table[b + 1] * BS * D;
      __builtin_prefetch(kh + next);
      __builtin_prefetch(vh + next);
    }
    for (int64_t t = 0; t < nt; ++t) {
      const cache_t* __restrict k = kb + t * D;
      const float ks = ksb == nullptr ? 1.f : ksb[t];
      for (int64_t g = 0; g < G; ++g) {
        const float* __restrict qg = qf + g * D;
        float a = 0.f;
#pragma omp simd reduction(+ : a)
        for (int64_t d = 0; d < D; ++d) a += qg[d] * static_cast<float>(k[d]);
        p[g * BS + t] = ksb == nullptr ? a : a * ks;
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
      const float corr = online_update(start == 0, mn, sum, m[g], l[g]);
      if (corr != 1.f) {
        float* __restrict ag = acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
      }
    }
    for (int64_t t = 0; t < nt; ++t) {
      const cache_t* __restrict v = vb + t * D;
      const float vs = vsb == nullptr ? 1.f : vsb[t];
      for (int64_t g = 0; g < G; ++g) {
        const float pt = vsb == nullptr ? p[g * BS + t] : p[g * BS + t] * vs;
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

#if defined(__AVX512F__)
#include <immintrin.h>

// exp of float lanes: range reduction to x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for e^r, then scalef by 2^n, which underflows to 0 and overflows to inf by
// itself. No clamping: a NaN lane stays NaN (a NaN in K must reach the output, as in the
// generic path). Relative error about 2e-7.
static inline __m512 exp512(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// out[t] = sum of the 16 lanes of r[t], for t < 16: a transpose-and-add tree (45 ops instead
// of 16 separate horizontal reductions).
static inline __m512 hsum16(const __m512* r) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]),
                         _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                                  _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88),
                                  _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// decode_one for float32 with AVX-512, chunks of up to 16 tokens of one block at a time: the
// 16 scores of a chunk come out of one transpose-and-add tree (hsum16), the exp is vectorized,
// q and the accumulators live in registers. Same online softmax as decode_one.
template <int GC, int DC>
static void decode_one_avx512(const float* __restrict qf, const float* __restrict kh,
                              const float* __restrict vh, const int64_t* __restrict table,
                              int64_t L, int64_t BS, float* __restrict out /* [G, D] */) {
  constexpr int G = GC, C = DC / 16;
  __m512 acc[G][C];
  float m[G], l[G];
  alignas(64) float p[G][16];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t start = 0, nt = 0; start < L; start += nt) {
    const int64_t pos = start % BS;
    nt = std::min<int64_t>({16, L - start, BS - pos});
    const int64_t off = (table[start / BS] * BS + pos) * DC;
    const float* __restrict kb = kh + off;
    const float* __restrict vb = vh + off;
    // The next block lies elsewhere in memory: fetch it while this chunk is computed, one
    // token row of K and V per token processed here (spread out, so the line fill buffers
    // do not overflow).
    const float* nk = nullptr;
    const float* nv = nullptr;
    if (start + nt < L) {
      const int64_t npos = (start + nt) % BS;
      const int64_t noff = (table[(start + nt) / BS] * BS + npos) * DC;
      nk = kh + noff;
      nv = vh + noff;
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << nt) - 1);
    for (int g = 0; g < G; ++g) {
      __m512 r[16];
      for (int t = 0; t < 16; ++t) {
        if (t < nt) {
          const float* qg = qf + g * DC;
          __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(kb + t * DC));
          for (int c = 1; c < C; ++c)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * 16), _mm512_loadu_ps(kb + t * DC + c * 16), a);
          r[t] = a;
        } else {
          r[t] = _mm512_setzero_ps();
        }
      }
      const __m512 s = hsum16(r);
      const float bm = _mm512_mask_reduce_max_ps(valid, s);
      const float mn = start == 0 ? bm : std::max(m[g], bm);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(s, _mm512_set1_ps(mn))));
      const float sum = _mm512_reduce_add_ps(e);
      _mm512_store_ps(p[g], e);
      const float corr = online_update(start == 0, mn, sum, m[g], l[g]);
      if (corr != 1.f) {
        const __m512 cv = _mm512_set1_ps(corr);
        for (int c = 0; c < C; ++c) acc[g][c] = _mm512_mul_ps(acc[g][c], cv);
      }
    }
    for (int64_t t = 0; t < nt; ++t) {
      if (nk != nullptr) {
        for (int c = 0; c < C; ++c) {
          _mm_prefetch(reinterpret_cast<const char*>(nk + t * DC + c * 16), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(nv + t * DC + c * 16), _MM_HINT_T0);
        }
      }
      __m512 v[C];
      for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_ps(vb + t * DC + c * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 pt = _mm512_set1_ps(p[g][t]);
        for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(pt, v[c], acc[g][c]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(1.f / l[g]);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * DC + c * 16, _mm512_mul_ps(acc[g][c], inv));
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

// 8 cache values -> 8 float32 lanes.
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
#if defined(__F16C__)
static inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif
static inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <typename T>
constexpr bool avx2_loads = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                            std::is_same_v<T, int8_t>
#if defined(__F16C__)
                            || std::is_same_v<T, c10::Half>
#endif
    ;

// lane t = sum of the 8 lanes of r[t]: a transpose-and-add tree of horizontal adds.
static inline __m256 hsum8(const __m256* r) {
  const __m256 h01 = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
  const __m256 h23 = _mm256_hadd_ps(_mm256_hadd_ps(r[4], r[5]), _mm256_hadd_ps(r[6], r[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h01, h23, 0x20),
                       _mm256_permute2f128_ps(h01, h23, 0x31));
}

// exp of lanes x <= 0 (scores minus their running max): n = round(x / ln2), a degree-6
// polynomial for e^r, times 2^n built in the exponent bits; lanes below -87 (where 2^n would
// leave the normal range; e^-87 is below every weight that matters) are set to 0 by a bit
// mask afterwards. A NaN lane compares false, so it stays NaN, as in the generic path (no
// max/min clamp: under -ffast-math the compiler may swap their operands, which decides NaNs).
static inline __m256 exp256(__m256 x) {
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// decode_one with AVX2 + FMA, any cache type with an 8-lane load (float32, bf16, fp16 with
// F16C, int8 with scales), chunks of up to 8 tokens of one block: the 8 scores of a chunk come
// out of one horizontal-add tree, the exp is vectorized; V is summed one 8-column slice at a
// time with the G accumulators of the slice in registers. Same online softmax as decode_one.
template <typename cache_t, int GC, int DC>
static void decode_one_avx2(const float* __restrict qf, const cache_t* __restrict kh,
                            const cache_t* __restrict vh, const float* __restrict ksh,
                            const float* __restrict vsh, const int64_t* __restrict table,
                            int64_t L, int64_t BS, float* __restrict out /* [G, D] */) {
  constexpr int G = GC, C = DC / 8;
  alignas(32) float acc[G * DC];
  alignas(32) float p[G][8];
  float m[G], l[G];
  std::fill(acc, acc + G * DC, 0.f);
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t start = 0, nt = 0; start < L; start += nt) {
    const int64_t pos = start % BS, blk = table[start / BS];
    nt = std::min<int64_t>({8, L - start, BS - pos});
    const cache_t* __restrict kb = kh + (blk * BS + pos) * DC;
    const cache_t* __restrict vb = vh + (blk * BS + pos) * DC;
    alignas(32) float ks[8] = {1, 1, 1, 1, 1, 1, 1, 1}, vs[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    if (ksh != nullptr)
      for (int64_t t = 0; t < nt; ++t) {
        ks[t] = ksh[blk * BS + pos + t];
        vs[t] = vsh[blk * BS + pos + t];
      }
    // The next chunk, often in another block elsewhere in memory (and another page, where
    // the hardware prefetcher stops): fetch all of its K and V rows while this one is
    // computed, one token row per token here.
    const char* nk = nullptr;
    const char* nv = nullptr;
    int64_t nn = 0;
    if (start + nt < L) {
      const int64_t ns = start + nt;
      const int64_t noff = (table[ns / BS] * BS + ns % BS) * DC;
      nk = reinterpret_cast<const char*>(kh + noff);
      nv = reinterpret_cast<const char*>(vh + noff);
      nn = std::min<int64_t>({8, L - ns, BS - ns % BS});
    }
    constexpr int64_t row = DC * sizeof(cache_t);
    const __m256 valid = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(nt)), _CMP_LT_OQ);
    for (int g = 0; g < G; ++g) {
      const float* qg = qf + g * DC;
      __m256 r[8];
      for (int t = 0; t < 8; ++t) {
        if (t < nt) {
          __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qg), load8(kb + t * DC));
          for (int c = 1; c < C; ++c)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(qg + c * 8), load8(kb + t * DC + c * 8), a);
          r[t] = a;
        } else {
          r[t] = _mm256_setzero_ps();
        }
      }
      const __m256 sc = _mm256_mul_ps(hsum8(r), _mm256_load_ps(ks));
      _mm256_store_ps(p[g], sc);
      float bm = p[g][0];
      for (int64_t t = 1; t < nt; ++t) bm = std::max(bm, p[g][t]);
      const float mn = start == 0 ? bm : std::max(m[g], bm);
      const __m256 e = _mm256_and_ps(valid, exp256(_mm256_sub_ps(sc, _mm256_set1_ps(mn))));
      _mm256_store_ps(p[g], e);
      float sum = 0.f;
      for (int64_t t = 0; t < nt; ++t) sum += p[g][t];
      const float corr = online_update(start == 0, mn, sum, m[g], l[g]);
      if (corr != 1.f) {
        const __m256 cv = _mm256_set1_ps(corr);
        for (int c = 0; c < C; ++c)
          _mm256_store_ps(acc + g * DC + c * 8, _mm256_mul_ps(_mm256_load_ps(acc + g * DC + c * 8), cv));
      }
      if (vsh != nullptr) _mm256_store_ps(p[g], _mm256_mul_ps(e, _mm256_load_ps(vs)));
    }
    for (int64_t t = 0; t < nn; ++t)
      for (int64_t b = 0; b < row; b += 64) {
        _mm_prefetch(nk + t * row + b, _MM_HINT_T0);
        _mm_prefetch(nv + t * row + b, _MM_HINT_T0);
      }
    // S slices at a time, so that G * S accumulator chains (up to 12) hide the FMA latency.
    constexpr int S = std::max(1, std::min(C, 12 / G));
    for (int c0 = 0; c0 < C; c0 += S) {
      __m256 a[G][S];
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < S; ++j)
          if (c0 + j < C) a[g][j] = _mm256_load_ps(acc + g * DC + (c0 + j) * 8);
      for (int64_t t = 0; t < nt; ++t) {
        __m256 v[S];
        for (int j = 0; j < S; ++j)
          if (c0 + j < C) v[j] = load8(vb + t * DC + (c0 + j) * 8);
        for (int g = 0; g < G; ++g) {
          const __m256 pt = _mm256_set1_ps(p[g][t]);
          for (int j = 0; j < S; ++j)
            if (c0 + j < C) a[g][j] = _mm256_fmadd_ps(pt, v[j], a[g][j]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < S; ++j)
          if (c0 + j < C) _mm256_store_ps(acc + g * DC + (c0 + j) * 8, a[g][j]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m256 inv = _mm256_set1_ps(1.f / l[g]);
    for (int c = 0; c < C; ++c)
      _mm256_storeu_ps(out + g * DC + c * 8, _mm256_mul_ps(_mm256_load_ps(acc + g * DC + c * 8), inv));
  }
}
#endif

struct Scratch {  // per-thread buffers of decode_one
  float *qf, *p, *m, *l, *acc;
};

static std::atomic<bool> force_generic{false};

// Tests run both paths on an AVX-512 machine: true = always the portable decode_one.
void use_generic_decode(bool on) { force_generic = on; }

struct Heads {  // one KV head's cache and, for int8, its scales
  const void* k;
  const void* v;
  const float* ks;
  const float* vs;
};

template <typename cache_t, int GC, int DC>
static void decode_select(int64_t G, int64_t D, const Heads& h, const int64_t* t, int64_t L,
                          int64_t BS, const Scratch& s) {
  const cache_t* kh = static_cast<const cache_t*>(h.k);
  const cache_t* vh = static_cast<const cache_t*>(h.v);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<cache_t, float> && GC > 0 && DC > 0 && DC % 16 == 0) {
    if (!force_generic.load(std::memory_order_relaxed))
      return decode_one_avx512<GC, DC>(s.qf, kh, vh, t, L, BS, s.acc);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (avx2_loads<cache_t> && GC > 0 && DC > 0 && DC % 8 == 0) {
    if (!force_generic.load(std::memory_order_relaxed))
      return decode_one_avx2<cache_t, GC, DC>(s.qf, kh, vh, h.ks, h.vs, t, L, BS, s.acc);
  }
#endif
  decode_one<cache_t, GC, DC>(s.qf, kh, vh, h.ks, h.vs, t, L, G, D, BS, s.p, s.m, s.l, s.acc);
}

template <typename cache_t, int DC>
static void dispatch_g(int64_t G, int64_t D, const Heads& h, const int64_t* t, int64_t L,
                       int64_t BS, const Scratch& s) {
  switch (G) {
    case 1: return decode_select<cache_t, 1, DC>(G, D, h, t, L, BS, s);
    case 2: return decode_select<cache_t, 2, DC>(G, D, h, t, L, BS, s);
    case 3: return decode_select<cache_t, 3, DC>(G, D, h, t, L, BS, s);
    case 4: return decode_select<cache_t, 4, DC>(G, D, h, t, L, BS, s);
    case 8: return decode_select<cache_t, 8, DC>(G, D, h, t, L, BS, s);
    default: return decode_select<cache_t, 0, DC>(G, D, h, t, L, BS, s);
  }
}

template <typename cache_t>
static void dispatch(int64_t G, int64_t D, const Heads& h, const int64_t* t, int64_t L,
                     int64_t BS, const Scratch& s) {
  if (D == 64) return dispatch_g<cache_t, 64>(G, D, h, t, L, BS, s);
  if (D == 128) return dispatch_g<cache_t, 128>(G, D, h, t, L, BS, s);
  return dispatch_g<cache_t, 0>(G, D, h, t, L, BS, s);
}

template <typename scalar_t, typename cache_t>
static void decode_kernel(
    const scalar_t* q,        // [n, H, D]
    const cache_t* kc,        // [KVH, NB, BS, D]
    const cache_t* vc,        // [KVH, NB, BS, D]
    const float* ksc,         // [KVH, NB, BS] (int8 caches), else null
    const float* vsc,
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
        const Heads heads{kc + h * NB * BS * D, vc + h * NB * BS * D,
                          ksc == nullptr ? nullptr : ksc + h * NB * BS,
                          vsc == nullptr ? nullptr : vsc + h * NB * BS};
        dispatch<cache_t>(G, D, heads, tables + s * W, lens[s], BS, sc);
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d)
            out[(s * H + h * G + g) * D + d] = static_cast<scalar_t>(sc.acc[g * D + d]);
      }
    }
  });
}

// The cache may be stored narrower than the query: the query's own dtype, bfloat16, float16,
// or int8 with its scales ([KVH, NB, BS] float32 each for K and V). Checks that, and returns
// the key and value scales of an int8 cache (null for the others). Shared with paged_prefill.
std::pair<const float*, const float*> cache_scales(
    at::ScalarType qt, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
    const c10::optional<torch::Tensor>& key_scales,
    const c10::optional<torch::Tensor>& value_scales) {
  const auto ct = key_cache.scalar_type();
  TORCH_CHECK(value_cache.scalar_type() == ct, "key and value caches differ in dtype");
  TORCH_CHECK(ct == qt || ct == torch::kBFloat16 || ct == torch::kHalf || ct == torch::kChar,
              "cache dtype ", ct, " with query dtype ", qt,
              ": the cache is the query's dtype, bfloat16, float16 or int8");
  const bool int8 = ct == torch::kChar;
  TORCH_CHECK(int8 == (key_scales.has_value() && value_scales.has_value()) &&
                  (int8 || (!key_scales.has_value() && !value_scales.has_value())),
              "an int8 cache needs its key and value scales, other caches none");
  if (!int8) return {nullptr, nullptr};
  for (const auto* sc : {&*key_scales, &*value_scales})
    TORCH_CHECK(sc->scalar_type() == torch::kFloat32 && sc->is_contiguous() && sc->dim() == 3 &&
                    sc->size(0) == key_cache.size(0) && sc->size(1) == key_cache.size(1) &&
                    sc->size(2) == key_cache.size(2),
                "scales must be contiguous float32 [kv_heads, blocks, block_size]");
  return {key_scales->data_ptr<float>(), value_scales->data_ptr<float>()};
}

torch::Tensor paged_decode(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                           torch::Tensor block_tables, torch::Tensor seq_lens, double scale,
                           c10::optional<torch::Tensor> key_scales,
                           c10::optional<torch::Tensor> value_scales) {
  TORCH_CHECK(query.device().is_cpu() && key_cache.device().is_cpu() &&
                  value_cache.device().is_cpu() && block_tables.device().is_cpu() &&
                  seq_lens.device().is_cpu(),
              "CPU tensors only");
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
  TORCH_CHECK(KVH > 0 && BS > 0 && H % KVH == 0 && key_cache.size(3) == D, "shape mismatch");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "key and value caches differ in shape");
  const auto qt = query.scalar_type(), ct = key_cache.scalar_type();
  const auto scales = cache_scales(qt, key_cache, value_cache, key_scales, value_scales);
  const float* ksp = scales.first;  // null unless the cache is int8
  const float* vsp = scales.second;
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qt, "paged_decode", [&] {
    auto run = [&](auto cache_zero) {
      using cache_t = decltype(cache_zero);
      decode_kernel<scalar_t, cache_t>(
          query.data_ptr<scalar_t>(), static_cast<const cache_t*>(key_cache.data_ptr()),
          static_cast<const cache_t*>(value_cache.data_ptr()), ksp, vsp,
          tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), n, H,
          KVH, D, NB, BS, tables.size(1), static_cast<float>(scale));
    };
    if (ct == qt) run(scalar_t{});
    else if (ct == torch::kBFloat16) run(c10::BFloat16{});
    else if (ct == torch::kHalf) run(c10::Half{});
    else run(int8_t{});
  });
  return out;
}
