// Writing each new token's K and V to its cache slot, for the CPU (see
// engine_svc/runner/cpu_ops.py, write_kv_).
//
// The cache is heads-outer, [kv_heads, blocks, block_size, head_size], in the model's dtype or
// narrower (--kv-cache-dtype): bfloat16, float16, or int8 with one float32 scale per token
// and head ([kv_heads, blocks, block_size]), symmetric: scale = max |x| / 127 over the head's
// values (1 for an all-zero head), q = round(x / scale), as kernels.reference.quantize_kv_int8.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>

namespace {

template <typename src_t, typename cache_t>
void write_rows(const torch::Tensor& x, torch::Tensor& cache, float* scales, const int64_t* slots,
                int64_t n, int64_t KVH, int64_t D, int64_t slots_per_head) {
  const src_t* src = x.data_ptr<src_t>();
  cache_t* dst = static_cast<cache_t*>(cache.data_ptr());
  const int64_t row = x.stride(0), head = x.stride(1);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < KVH; ++h) {
      const src_t* from = src + t * row + h * head;
      const int64_t slot = h * slots_per_head + slots[t];
      cache_t* to = dst + slot * D;
      if constexpr (std::is_same_v<cache_t, int8_t>) {
        float amax = 0.f;
        for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(static_cast<float>(from[d])));
        const float scale = amax > 0.f ? amax / 127.f : 1.f;
        for (int64_t d = 0; d < D; ++d) {
          const float q = std::nearbyint(static_cast<float>(from[d]) / scale);
          to[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, q)));
        }
        scales[slot] = scale;
      } else {
        for (int64_t d = 0; d < D; ++d) to[d] = static_cast<cache_t>(static_cast<float>(from[d]));
      }
    }
  }
}

}  // namespace

// key, value: [n, kv_heads, head_size], rows of any stride, heads packed (e.g. views into a
// qkv projection); caches [kv_heads, blocks, block_size, head_size]; scales for int8 caches.
void write_kv_(torch::Tensor key, torch::Tensor value, torch::Tensor key_cache,
               torch::Tensor value_cache, torch::Tensor slot_mapping,
               c10::optional<torch::Tensor> key_scales, c10::optional<torch::Tensor> value_scales) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "key and value must be [n, kv_heads, head_size]");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes() &&
                  key_cache.is_contiguous() && value_cache.is_contiguous(),
              "caches must be contiguous [kv_heads, blocks, block_size, head_size]");
  const int64_t n = key.size(0), KVH = key.size(1), D = key.size(2);
  TORCH_CHECK(key_cache.size(0) == KVH && key_cache.size(3) == D, "cache and key shapes differ");
  for (const auto* x : {&key, &value})
    TORCH_CHECK(x->stride(2) == 1 && x->stride(1) == D && x->scalar_type() == key.scalar_type(),
                "key and value rows must hold their heads packed, in one dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == n,
              "slot_mapping must be n contiguous int64");
  const int64_t per_head = key_cache.size(1) * key_cache.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < per_head, "slot ", slots[t], " out of range");
  const auto ct = key_cache.scalar_type();
  TORCH_CHECK(value_cache.scalar_type() == ct, "key and value caches differ in dtype");
  const bool int8 = ct == torch::kChar;
  float* ks = nullptr;
  float* vs = nullptr;
  TORCH_CHECK(int8 == key_scales.has_value() && int8 == value_scales.has_value(),
              "an int8 cache needs its key and value scales, other caches none");
  if (int8) {
    for (const auto* sc : {&*key_scales, &*value_scales})
      TORCH_CHECK(sc->scalar_type() == torch::kFloat32 && sc->is_contiguous() &&
                      sc->numel() == KVH * per_head,
                  "scales must be contiguous float32 [kv_heads, blocks, block_size]");
    ks = key_scales->data_ptr<float>();
    vs = value_scales->data_ptr<float>();
  }
  const auto st = key.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kBFloat16 || st == torch::kHalf,
              "key and value must be float32, bfloat16 or float16");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "write_kv_", [&] {
    auto run = [&](auto cache_zero) {
      using cache_t = decltype(cache_zero);
      write_rows<scalar_t, cache_t>(key, key_cache, ks, slots, n, KVH, D, per_head);
      write_rows<scalar_t, cache_t>(value, value_cache, vs, slots, n, KVH, D, per_head);
    };
    if (ct == torch::kFloat32) run(float{});
    else if (ct == torch::kBFloat16) run(c10::BFloat16{});
    else if (ct == torch::kHalf) run(c10::Half{});
    else if (ct == torch::kChar) run(int8_t{});
    else TORCH_CHECK(false, "cache dtype ", ct, ": float32, bfloat16, float16 or int8");
  });
}
