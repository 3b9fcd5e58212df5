// float32 linear layer over a pre-packed weight, for the CPU (see engine_svc/runner/cpu_ops.py).
//
// y[M, N] = x[M, K] @ W[N, K]^T. W is packed once at load time into panels of NR output
// columns, [ceil(N / NR), K, NR], each panel one contiguous stream. A tile keeps MR rows x NR
// columns of accumulators in vector registers and walks the panel once over k, broadcasting
// one x element per row: no packing per call (BLAS packs the weight on every call, which at
// decode batch sizes costs as much as the math), the panel read sequentially with software
// prefetch, so small batches run near memory bandwidth and large ones near the FMA rate.
//
// Every output element is the same sequence of FMAs over k whatever M is and wherever its row
// sits: a row's result does not depend on the rest of the batch (batch-invariant).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>

// Panel width (two 16-float vectors), also what pack_weight pads to.
constexpr int64_t NR = 32;

#if defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int64_t MR = 12;   // rows per tile: 24 accumulators + 2 weights + 1 broadcast
constexpr int64_t MC = 192;  // rows per chunk: the chunk of x stays in L2 across panels
constexpr int64_t PF = 32;   // prefetch distance in panel rows (4 KiB ahead)

template <int R>
inline void tile(const float* __restrict x, int64_t K, const float* __restrict panel,
                 const float* __restrict bias, float* __restrict out, int64_t ldo,
                 int64_t ncols) {
  __m512 a0[R], a1[R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    a0[i] = _mm512_setzero_ps();
    a1[i] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * NR);
    const __m512 w1 = _mm512_loadu_ps(panel + k * NR + 16);
    // Past the panel's end this touches the next panel, the next one streamed; prefetches
    // never fault.
    _mm_prefetch(reinterpret_cast<const char*>(panel + (k + PF) * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(panel + (k + PF) * NR + 16), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512 xi = _mm512_set1_ps(x[i * K + k]);
      a0[i] = _mm512_fmadd_ps(xi, w0, a0[i]);
      a1[i] = _mm512_fmadd_ps(xi, w1, a1[i]);
    }
  }
  const __mmask16 m0 = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1);
  const __mmask16 m1 =
      ncols <= 16 ? 0 : ncols >= 32 ? 0xFFFF : static_cast<__mmask16>((1u << (ncols - 16)) - 1);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (bias != nullptr) {
    b0 = _mm512_maskz_loadu_ps(m0, bias);
    b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    _mm512_mask_storeu_ps(out + i * ldo, m0, _mm512_add_ps(a0[i], b0));
    _mm512_mask_storeu_ps(out + i * ldo + 16, m1, _mm512_add_ps(a1[i], b1));
  }
}

void tile_rows(int64_t rows, const float* x, int64_t K, const float* panel, const float* bias,
               float* out, int64_t ldo, int64_t ncols) {
  switch (rows) {
#define PAGEDSERVE_TILE(R) \
  case R:                  \
    return tile<R>(x, K, panel, bias, out, ldo, ncols);
    PAGEDSERVE_TILE(1)
    PAGEDSERVE_TILE(2)
    PAGEDSERVE_TILE(3)
    PAGEDSERVE_TILE(4)
    PAGEDSERVE_TILE(5)
    PAGEDSERVE_TILE(6)
    PAGEDSERVE_TILE(7)
    PAGEDSERVE_TILE(8)
    PAGEDSERVE_TILE(9)
    PAGEDSERVE_TILE(10)
    PAGEDSERVE_TILE(11)
    PAGEDSERVE_TILE(12)
#undef PAGEDSERVE_TILE
    default:
      TORCH_CHECK(false, "tile of ", rows, " rows");
  }
}

}  // namespace

bool packed_linear_supported() { return true; }

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, int64_t N,
                            c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && packed.scalar_type() == torch::kFloat32,
              "packed_linear is float32 only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NR && packed.is_contiguous(),
              "packed weight must be a contiguous [panels, K, ", NR, "] tensor");
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "x has ", K, " columns, the weight ", packed.size(1));
  TORCH_CHECK(N > (P - 1) * NR && N <= P * NR, "N = ", N, " does not fit ", P, " panels");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == torch::kFloat32 &&
                    bias->dim() == 1 &&
                    bias->numel() == N && bias->is_contiguous(),
                "bias must be a contiguous float32 [N] vector");
    bp = bias->data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* pp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Threads split the panels (each weight byte is read by one thread).
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t c0 = 0; c0 < M; c0 += MC) {
      const int64_t c1 = std::min(M, c0 + MC);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t ncols = std::min(NR, N - p * NR);
        for (int64_t m = c0; m < c1; m += MR)
          tile_rows(std::min(MR, c1 - m), xp + m * K, K, pp + p * K * NR,
                    bp == nullptr ? nullptr : bp + p * NR, op + m * N + p * NR, N, ncols);
      }
    }
  });
  return out;
}

#else  // no AVX-512: the engine keeps torch's linear layers

bool packed_linear_supported() { return false; }

torch::Tensor packed_linear(torch::Tensor, torch::Tensor, int64_t, c10::optional<torch::Tensor>) {
  TORCH_CHECK(false, "packed_linear needs AVX-512 (built without it)");
}

#endif

int64_t packed_linear_panel_width() { return NR; }
