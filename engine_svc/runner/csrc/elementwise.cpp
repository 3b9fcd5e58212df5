// Fused float32 element-wise ops of the Llama layer, for the CPU (see engine_svc/runner/cpu_ops.py).
//
// Each replaces 2-10 torch ops (and their temporaries) by one pass over the rows: fewer ops per
// decode step (each torch op costs several microseconds however small) and less memory traffic
// in prefill. Same math as kernels/reference.py: statistics in float32, rotary as HF applies
// it (rotate halves), silu(gate) * up.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

namespace {

void check_rows(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, what,
              " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, what, " must be [rows, cols] with unit stride");
}

inline void norm_row(const float* __restrict r, const float* __restrict w, float* __restrict o,
                     int64_t H, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < H; ++j) ss += r[j] * r[j];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) o[j] = w[j] * (r[j] * inv);
}

}  // namespace

// RMSNorm of each row of x: w * (x / sqrt(mean(x^2) + eps)).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.numel() == x.size(1) &&
                  w.device().is_cpu() && w.scalar_type() == torch::kFloat32,
              "rms_norm: contiguous x [rows, H] and float32 weight [H]");
  auto out = torch::empty_like(x);
  const int64_t R = x.size(0), H = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * H, wp, op + r * H, H, (float)eps);
  });
  return out;
}

// residual += x (in place), then the RMSNorm of the new residual, returned.
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor w,
                            double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes() &&
                  w.is_contiguous() && w.numel() == x.size(1) && w.device().is_cpu() &&
                  w.scalar_type() == torch::kFloat32,
              "add_rms_norm_: contiguous x and residual [rows, H], float32 weight [H]");
  auto out = torch::empty_like(x);
  const int64_t R = x.size(0), H = x.size(1);
  const float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* __restrict res = rp + r * H;
      const float* __restrict xr = xp + r * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) res[j] += xr[j];
      norm_row(res, wp, op + r * H, H, (float)eps);
    }
  });
  return out;
}

// Rotary embedding, in place, on the first `heads` head_size-wide slices of each row of qkv
// (the q and k heads of the fused projection; v follows and is left alone). cos and sin are
// [rows, head_size]: each half repeated, as HF builds them.
void rotary_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads,
             int64_t head_size) {
  check_rows(qkv, "qkv");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  const int64_t R = qkv.size(0), D = head_size, half = D / 2;
  TORCH_CHECK(D % 2 == 0 && heads * D <= qkv.size(1), "rotary_: bad heads / head_size");
  TORCH_CHECK(cos.size(0) == R && sin.size(0) == R && cos.size(1) == D && sin.size(1) == D &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "rotary_: cos and sin must be contiguous [rows, head_size]");
  float* qp = qkv.data_ptr<float>();
  const int64_t ld = qkv.stride(0);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict c = cp + r * D;
      const float* __restrict s = sp + r * D;
      for (int64_t h = 0; h < heads; ++h) {
        float* __restrict x = qp + r * ld + h * D;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = x[j], x2 = x[j + half];
          x[j] = x1 * c[j] - x2 * s[j];
          x[j + half] = x2 * c[j + half] + x1 * s[j + half];
        }
      }
    }
  });
}

// silu(gate) * up for gate_up = [gate | up] of each row.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "silu_mul: contiguous [rows, 2 * inter]");
  const int64_t R = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({R, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict g = gp + r * 2 * I;
      const float* __restrict u = g + I;
      float* __restrict o = op + r * I;
      // exp's argument is capped so it stays finite: the fast-math reciprocal of an infinite
      // 1 + exp(-g) would be NaN, not 0. A NaN gate still gives NaN (it is the numerator).
#pragma omp simd
      for (int64_t j = 0; j < I; ++j)
        o[j] = g[j] / (1.f + std::exp(std::min(-g[j], 80.f))) * u[j];
    }
  });
  return out;
}
