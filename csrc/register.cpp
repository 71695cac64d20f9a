// The one registration file of neurokern._C: declares the schemas of the `neurokern`
// torch.library ops and exposes what the extension was built with. Kernels register their
// implementations in their own source files with TORCH_LIBRARY_IMPL (CPU here, CUDA later);
// fake implementations and autograd are registered in Python (neurokern/spike_ops.py,
// neurokern/plif_ops.py). Semantics: SPEC.md 1 and 2, as neurokern.reference computes them.
#include <torch/extension.h>

TORCH_LIBRARY(neurokern, m) {
  // s = spike(x) or signed_spike(x) (smooth primitive if !spiking); shape and dtype of x.
  m.def("spike_fwd(Tensor x, float v_th, float gamma, bool signed, bool spiking) -> Tensor");
  // dx = grad_s * surrogate(x); shape and dtype of x.
  m.def("spike_bwd(Tensor grad_s, Tensor x, float v_th, float gamma, bool signed) -> Tensor");
  // Multi-step PLIF over x [T, B, C, *S] ([B, T, C, *S] if batch_first), N = B * C * prod(S).
  // alpha: [C] or 0-d. Returns s (x's shape and dtype, contiguous), v_seq ([T, N] membranes in
  // the compute dtype, float32 for half inputs; empty when !save_v), v_last and s_last
  // ([B, C, *S], x's dtype).
  m.def(
      "plif_fwd(Tensor x, Tensor alpha, Tensor? v0, Tensor? s0, float v_th, float gamma, "
      "bool signed, bool batch_first, bool spiking, bool save_v) "
      "-> (Tensor s, Tensor v_seq, Tensor v_last, Tensor s_last)");
  // Backward of plif_fwd from its saved v_seq. grad_v_last / grad_s_last may be None (zero).
  // Returns dx (x's shape and dtype, contiguous), dalpha_per_neuron ([N] in the compute dtype:
  // sum over t of dL/dv_t * v_{t-1}, reduced to alpha's shape by the caller), dv0 and ds0
  // ([B, C, *S], x's dtype).
  m.def(
      "plif_bwd(Tensor grad_s, Tensor? grad_v_last, Tensor? grad_s_last, Tensor v_seq, "
      "Tensor alpha, Tensor? v0, float v_th, float gamma, bool signed, bool batch_first, "
      "bool detach_reset) -> (Tensor dx, Tensor dalpha_per_neuron, Tensor dv0, Tensor ds0)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef NEUROKERN_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "neurokern C++/CUDA kernels, registered as torch.ops.neurokern.*";
  m.def("build_info", &build_info, "What this extension was built with.");
}
