// Python bindings of the CPU kernels (see engine_svc/runner/cpu_ops.py). Every op releases the GIL
// while it runs: the engine's IO thread (heartbeats, health probes, outputs) must keep going
// during a long call, as it does during torch's own ops.
torch::Tensor paged_decode(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                           torch::Tensor, double, c10::optional<torch::Tensor>,
                           c10::optional<torch::Tensor>);
torch::Tensor paged_prefill(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t,
                            double, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>);
void write_kv_(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
               c10::optional<torch::Tensor>, c10::optional<torch::Tensor>);
void use_generic_decode(bool);
torch::Tensor packed_linear(torch::Tensor, torch::Tensor, int64_t, c10::optional<torch::Tensor>,
                            c10::optional<torch::Tensor>);
bool packed_linear_supported();
int64_t packed_linear_panel_width();
torch::Tensor rms_norm(torch::Tensor, torch::Tensor, double);
torch::Tensor add_rms_norm_(torch::Tensor, torch::Tensor, torch::Tensor, double);
void rotary_(torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t);
torch::Tensor silu_mul(torch::Tensor);
void bind_decode_stack(pybind11::module&);  // decode_stack.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", torch::wrap_pybind_function_no_gil(paged_decode));
  m.def("paged_prefill", torch::wrap_pybind_function_no_gil(paged_prefill));
  m.def("use_generic_decode", &use_generic_decode);
  m.def("write_kv_", torch::wrap_pybind_function_no_gil(write_kv_));
  m.def("packed_linear", torch::wrap_pybind_function_no_gil(packed_linear));
  m.def("packed_linear_supported", &packed_linear_supported);
  m.def("packed_linear_panel_width", &packed_linear_panel_width);
  m.def("rms_norm", torch::wrap_pybind_function_no_gil(rms_norm));
  m.def("add_rms_norm_", torch::wrap_pybind_function_no_gil(add_rms_norm_));
  m.def("rotary_", torch::wrap_pybind_function_no_gil(rotary_));
  m.def("silu_mul", torch::wrap_pybind_function_no_gil(silu_mul));
  bind_decode_stack(m);
}
