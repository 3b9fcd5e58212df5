// Linear layers over pre-packed weights, for the CPU (see engine_svc/runner/cpu_ops.py).
//
// y[M, N] = x[M, K] @ W[N, K]^T (* scale[N]) (+ bias[N]), x and y float32. W is packed once at
// load time into panels of NR output columns, [ceil(N / NR), K, NR], each panel one contiguous
// stream, in float32 or in int8 (weight-only quantization: one float32 scale per output
// column, applied after the sum). A tile keeps MR rows x NR columns of accumulators in vector
// registers and walks the panel once over k, broadcasting one x element per row: no packing
// per call (BLAS packs the weight on every call, which at decode batch sizes costs as much as
// the math), the panel read sequentially with software prefetch, so small batches run near
// memory bandwidth and large ones near the FMA rate. int8 weights are widened to float32 in
// registers (exact), so the sum is the float32 sum over the dequantized weight divided by the
// scale: a quarter of the bytes to read, the same arithmetic per weight.
//
// Two instruction sets, one template: AVX-512 (NR 32, 12-row tiles) and AVX2 + FMA (NR 16,
// 6-row tiles). Every output element is the same sequence of FMAs over k whatever M is and
// wherever its row sits: a row's result does not depend on the rest of the batch
// (batch-invariant).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define PAGEDSERVE_PACKED 1

namespace {

#if defined(__AVX512F__)
struct Isa {
  using V = __m512;
  static constexpr int64_t W = 16;  // floats per vector
  static constexpr int64_t MR = 12;  // 24 accumulators + 2 weights + 1 broadcast of 32 zmm
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const int8_t* p) {  // 16 int8 -> 16 float32
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
#else
struct Isa {
  using V = __m256;
  static constexpr int64_t W = 8;
  static constexpr int64_t MR = 6;  // 12 accumulators + 2 weights + 1 broadcast of 16 ymm
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const int8_t* p) {  // 8 int8 -> 8 float32
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};
#endif

constexpr int64_t W = Isa::W;
constexpr int64_t NR = 2 * W;  // panel width: two vectors
constexpr int64_t MR = Isa::MR;
constexpr int64_t MC = 192;  // rows per chunk: the chunk of x stays in L2 across panels
constexpr int64_t PF_BYTES = 4096;  // software prefetch distance in the panel stream

// MR rows x NR columns. scale/bias point at the panel's NR entries (nullptr: none); columns
// past ncols (the last panel's padding) are computed but not stored.
template <int R, typename T>
inline void tile(const float* __restrict x, int64_t K, const T* __restrict panel,
                 const float* __restrict scale, const float* __restrict bias,
                 float* __restrict out, int64_t ldo, int64_t ncols) {
  typename Isa::V a0[R], a1[R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    a0[i] = Isa::zero();
    a1[i] = Isa::zero();
  }
  const char* stream = reinterpret_cast<const char*>(panel);
  for (int64_t k = 0; k < K; ++k) {
    const auto w0 = Isa::load(panel + k * NR);
    const auto w1 = Isa::load(panel + k * NR + W);
    // Past the panel's end this touches the next panel, the next one streamed; prefetches
    // never fault.
    // One prefetch per cache line of the stream.
    if constexpr (NR * sizeof(T) >= 64) {
      _mm_prefetch(stream + k * NR * sizeof(T) + PF_BYTES, _MM_HINT_T0);
      if constexpr (NR * sizeof(T) > 64)
        _mm_prefetch(stream + k * NR * sizeof(T) + PF_BYTES + 64, _MM_HINT_T0);
    } else if ((k * NR * sizeof(T)) % 64 == 0) {
      _mm_prefetch(stream + k * NR * sizeof(T) + PF_BYTES, _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const auto xi = Isa::set1(x[i * K + k]);
      a0[i] = Isa::fma(xi, w0, a0[i]);
      a1[i] = Isa::fma(xi, w1, a1[i]);
    }
  }
  const bool full = ncols == NR;
  auto s0 = Isa::zero(), s1 = Isa::zero(), b0 = Isa::zero(), b1 = Isa::zero();
  if (scale != nullptr) {
    s0 = Isa::load(scale);
    s1 = Isa::load(scale + W);
  }
  if (bias != nullptr) {
    b0 = Isa::load(bias);
    b1 = Isa::load(bias + W);
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    if (scale != nullptr) {
      a0[i] = Isa::mul(a0[i], s0);
      a1[i] = Isa::mul(a1[i], s1);
    }
    if (bias != nullptr) {
      a0[i] = Isa::add(a0[i], b0);
      a1[i] = Isa::add(a1[i], b1);
    }
    if (full) {
      Isa::store(out + i * ldo, a0[i]);
      Isa::store(out + i * ldo + W, a1[i]);
    } else {
      alignas(64) float row[NR];
      Isa::store(row, a0[i]);
      Isa::store(row + W, a1[i]);
      std::memcpy(out + i * ldo, row, ncols * sizeof(float));
    }
  }
}

template <typename T>
void tile_rows(int64_t rows, const float* x, int64_t K, const T* panel, const float* scale,
               const float* bias, float* out, int64_t ldo, int64_t ncols) {
  switch (rows) {
#define PAGEDSERVE_TILE(R) \
  case R:                  \
    return tile<R, T>(x, K, panel, scale, bias, out, ldo, ncols);
    PAGEDSERVE_TILE(1)
    PAGEDSERVE_TILE(2)
    PAGEDSERVE_TILE(3)
    PAGEDSERVE_TILE(4)
    PAGEDSERVE_TILE(5)
    PAGEDSERVE_TILE(6)
#if defined(__AVX512F__)
    PAGEDSERVE_TILE(7)
    PAGEDSERVE_TILE(8)
    PAGEDSERVE_TILE(9)
    PAGEDSERVE_TILE(10)
    PAGEDSERVE_TILE(11)
    PAGEDSERVE_TILE(12)
#endif
#undef PAGEDSERVE_TILE
    default:
      TORCH_CHECK(false, "tile of ", rows, " rows");
  }
}

template <typename T>
void run(int64_t M, int64_t N, int64_t K, int64_t P, const float* xp, const T* pp,
         const float* sp, const float* bp, float* op) {
  // Threads split the panels (each weight byte is read by one thread).
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t c0 = 0; c0 < M; c0 += MC) {
      const int64_t c1 = std::min(M, c0 + MC);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t ncols = std::min(NR, N - p * NR);
        for (int64_t m = c0; m < c1; m += MR)
          tile_rows<T>(std::min(MR, c1 - m), xp + m * K, K, pp + p * K * NR,
                       sp == nullptr ? nullptr : sp + p * NR,
                       bp == nullptr ? nullptr : bp + p * NR, op + m * N + p * NR, N, ncols);
      }
    }
  });
}

// A float32 vector of the panels' padded length (P * NR), or nullptr.
const float* padded_vector(const c10::optional<torch::Tensor>& v, int64_t P, const char* what) {
  if (!v.has_value()) return nullptr;
  TORCH_CHECK(v->device().is_cpu() && v->scalar_type() == torch::kFloat32 && v->dim() == 1 &&
                  v->numel() == P * NR && v->is_contiguous(),
              what, " must be a contiguous float32 vector of ", P * NR,
              " (N padded to whole panels)");
  return v->data_ptr<float>();
}

}  // namespace

bool packed_linear_supported() { return true; }

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, int64_t N,
                            c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> scale) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "packed_linear takes float32 input");
  const bool int8 = packed.scalar_type() == torch::kInt8;
  TORCH_CHECK(int8 || packed.scalar_type() == torch::kFloat32,
              "packed weight must be float32 or int8");
  TORCH_CHECK(int8 == scale.has_value(), "an int8 weight needs its scales, float32 none");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NR && packed.is_contiguous(),
              "packed weight must be a contiguous [panels, K, ", NR, "] tensor");
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "x has ", K, " columns, the weight ", packed.size(1));
  TORCH_CHECK(N > (P - 1) * NR && N <= P * NR, "N = ", N, " does not fit ", P, " panels");
  const float* bp = padded_vector(bias, P, "bias");
  const float* sp = padded_vector(scale, P, "scale");
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (int8)
    run<int8_t>(M, N, K, P, xp, packed.data_ptr<int8_t>(), sp, bp, op);
  else
    run<float>(M, N, K, P, xp, packed.data_ptr<float>(), sp, bp, op);
  return out;
}

int64_t packed_linear_panel_width() { return NR; }

#else  // neither AVX-512 nor AVX2 + FMA: the engine keeps torch's linear layers

bool packed_linear_supported() { return false; }

torch::Tensor packed_linear(torch::Tensor, torch::Tensor, int64_t, c10::optional<torch::Tensor>,
                            c10::optional<torch::Tensor>) {
  TORCH_CHECK(false, "packed_linear needs AVX-512 or AVX2 with FMA (built without them)");
}

int64_t packed_linear_panel_width() { return 16; }

#endif
