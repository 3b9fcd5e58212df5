// The decoder layers of a decode-only step as one call, for the CPU (see
// engine_svc/runner/cpu_ops.py, DecodeStack).
//
// The CPU's counterpart of replaying a captured CUDA graph: at one token per sequence a step
// is some 300 small ops over 30 layers, and calling each from Python (module dispatch,
// argument parsing, views) costs about as much as the arithmetic of a 135M model at batch 1.
// This runs the same ops as LlamaModel.forward does over FusedCpuOps with packed linear
// layers, in the same order on the same kernels, from C++: the hidden states come out bit for
// bit the same (tests/test_cpu_ops.py checks it); only the Python between the ops is gone.
// Layer l: add + RMSNorm, qkv projection, rotary on q and k in place, k and v to their cache
// slots (write_kv_, in the cache's dtype), decode attention, o projection, add + RMSNorm, gate_up projection, silu * up, down
// projection; then the final add + RMSNorm.
#include <torch/extension.h>
#include <vector>

torch::Tensor paged_decode(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                           torch::Tensor, double, c10::optional<torch::Tensor>,
                           c10::optional<torch::Tensor>);
void write_kv_(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
               c10::optional<torch::Tensor>, c10::optional<torch::Tensor>);
torch::Tensor packed_linear(torch::Tensor, torch::Tensor, int64_t, c10::optional<torch::Tensor>,
                            c10::optional<torch::Tensor>);
torch::Tensor rms_norm(torch::Tensor, torch::Tensor, double);
torch::Tensor add_rms_norm_(torch::Tensor, torch::Tensor, torch::Tensor, double);
void rotary_(torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t);
torch::Tensor silu_mul(torch::Tensor);

namespace {

c10::optional<torch::Tensor> present(const torch::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return c10::nullopt;
  return t;
}

}  // namespace

class DecodeStack {
 public:
  // Per layer, in this order, four linear layers: qkv, o, gate_up, down. `packed` holds their
  // pack_weight() tensors (4 per layer), `scales` and `biases` their padded vectors or empty
  // tensors (none), `out_features` their N.
  DecodeStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_size, double eps,
              double scale, std::vector<torch::Tensor> input_norm,
              std::vector<torch::Tensor> post_norm, torch::Tensor final_norm,
              std::vector<torch::Tensor> packed, std::vector<torch::Tensor> scales,
              std::vector<torch::Tensor> biases, std::vector<int64_t> out_features)
      : H_(num_heads), KVH_(num_kv_heads), D_(head_size), eps_(eps), scale_(scale),
        input_norm_(std::move(input_norm)), post_norm_(std::move(post_norm)),
        final_norm_(std::move(final_norm)), packed_(std::move(packed)) {
    const size_t L = input_norm_.size();
    TORCH_CHECK(L >= 1 && post_norm_.size() == L && packed_.size() == 4 * L &&
                    scales.size() == 4 * L && biases.size() == 4 * L &&
                    out_features.size() == 4 * L,
                "DecodeStack: 4 linear layers and 2 norms per layer");
    TORCH_CHECK(H_ > 0 && KVH_ > 0 && H_ % KVH_ == 0 && D_ > 0, "DecodeStack: bad head counts");
    TORCH_CHECK(out_features[0] == (H_ + 2 * KVH_) * D_, "DecodeStack: qkv width");
    for (size_t i = 0; i < 4 * L; ++i) {
      scales_.push_back(present(scales[i]));
      biases_.push_back(present(biases[i]));
    }
    out_ = std::move(out_features);
  }

  int64_t num_layers() const { return static_cast<int64_t>(input_norm_.size()); }

  // x: [n, hidden] float32 embeddings (a fresh tensor: it becomes the residual, updated in
  // place); kv_caches: [layers, 2, kv_heads, blocks, block_size, head_size] in the cache dtype
  // (float32, bfloat16, float16, or int8 with kv_scales [layers, 2, kv_heads, blocks,
  // block_size]); cos, sin: [n, head_size]; slot_mapping: [n] int64; block_tables
  // [n, max_blocks] and seq_lens [n] as paged_decode takes them. Returns the final norm's
  // output, [n, hidden].
  torch::Tensor run(torch::Tensor x, torch::Tensor kv_caches, c10::optional<torch::Tensor> kv_scales,
                    torch::Tensor cos, torch::Tensor sin, torch::Tensor slot_mapping,
                    torch::Tensor block_tables, torch::Tensor seq_lens) const {
    const int64_t L = num_layers();
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32,
                "x must be a contiguous float32 [n, hidden] matrix");
    TORCH_CHECK(kv_caches.dim() == 6 && kv_caches.size(0) == L && kv_caches.size(1) == 2 &&
                    kv_caches.size(2) == KVH_ && kv_caches.size(5) == D_ &&
                    kv_caches.is_contiguous(),
                "kv_caches must be a contiguous [", L, ", 2, ", KVH_,
                ", blocks, block_size, ", D_, "] tensor");
    if (kv_scales.has_value())
      TORCH_CHECK(kv_scales->dim() == 5 && kv_scales->size(0) == L && kv_scales->size(1) == 2,
                  "kv_scales must be [", L, ", 2, kv_heads, blocks, block_size]");
    const int64_t n = x.size(0), q_size = H_ * D_, kv_size = KVH_ * D_;

    torch::Tensor residual = x, out;
    for (int64_t l = 0; l < L; ++l) {
      torch::Tensor h = l == 0 ? rms_norm(residual, input_norm_[l], eps_)
                               : add_rms_norm_(out, residual, input_norm_[l], eps_);
      torch::Tensor qkv = linear(h, l, 0);
      rotary_(qkv, cos, sin, H_ + KVH_, D_);
      torch::Tensor cache = kv_caches.select(0, l);  // [2, kv_heads, blocks, block_size, D]
      c10::optional<torch::Tensor> ks, vs;
      if (kv_scales.has_value()) {
        ks = kv_scales->select(0, l).select(0, 0);
        vs = kv_scales->select(0, l).select(0, 1);
      }
      write_kv_(qkv.narrow(1, q_size, kv_size).view({n, KVH_, D_}),
                qkv.narrow(1, q_size + kv_size, kv_size).view({n, KVH_, D_}), cache.select(0, 0),
                cache.select(0, 1), slot_mapping, ks, vs);
      torch::Tensor q = qkv.narrow(1, 0, q_size).contiguous().view({n, H_, D_});
      torch::Tensor o = paged_decode(q, cache.select(0, 0), cache.select(0, 1), block_tables,
                                     seq_lens, scale_, ks, vs);
      out = linear(o.view({n, q_size}), l, 1);
      h = add_rms_norm_(out, residual, post_norm_[l], eps_);
      out = linear(silu_mul(linear(h, l, 2)), l, 3);
    }
    return add_rms_norm_(out, residual, final_norm_, eps_);
  }

 private:
  torch::Tensor linear(const torch::Tensor& x, int64_t layer, int64_t which) const {
    const size_t i = static_cast<size_t>(4 * layer + which);
    return packed_linear(x, packed_[i], out_[i], biases_[i], scales_[i]);
  }

  int64_t H_, KVH_, D_;
  double eps_, scale_;
  std::vector<torch::Tensor> input_norm_, post_norm_;
  torch::Tensor final_norm_;
  std::vector<torch::Tensor> packed_;
  std::vector<c10::optional<torch::Tensor>> scales_, biases_;
  std::vector<int64_t> out_;
};

void bind_decode_stack(pybind11::module& m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, double, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, torch::Tensor, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<int64_t>>())
      .def("num_layers", &DecodeStack::num_layers)
      .def("run", &DecodeStack::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
