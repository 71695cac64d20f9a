// The one registration file of neurokern._C: declares the schemas of the `neurokern`
// torch.library ops and exposes what the extension was built with. Kernels register their
// implementations in their own source files with TORCH_LIBRARY_IMPL (CPU here, CUDA later);
// fake implementations and autograd are registered in Python (neurokern/spike_ops.py,
// neurokern/plif_ops.py). Semantics: SPEC.md 1 and 2, as neurokern.reference computes them.
#include <torch/extension.h>

// The generalised neuron's options of plif_fwd / plif_bwd (docs/neurons.md); the defaults are
// the paper's PLIF, which runs its own kernels.
#define NEUROKERN_NEURON_OPTIONS                                                         \
  "str reset='soft', float v_reset=0., bool reset_before_leak=False, "                 \
  "bool decay_input=False, bool strict_threshold=False, str surrogate='atan', " \
  "float surrogate_scale=1."

TORCH_LIBRARY(neurokern, m) {
  // s = spike(x) or signed_spike(x) (smooth primitive if !spiking); shape and dtype of x.
  m.def("spike_fwd(Tensor x, float v_th, float gamma, bool signed, bool spiking) -> Tensor");
  // dx = grad_s * surrogate(x); shape and dtype of x.
  m.def("spike_bwd(Tensor grad_s, Tensor x, float v_th, float gamma, bool signed) -> Tensor");
  // Multi-step PLIF over x [T, B, C, *S] ([B, T, C, *S] if batch_first), N = B * C * prod(S),
  // with the generalised neuron's options (the carried state v is h, or u with
  // reset_before_leak).
  // alpha: [C] or 0-d. Returns s (x's shape, contiguous, in spike_dtype: x's dtype if None, or
  // the compute dtype, float32 for half inputs, as snnTorch's spikes), v_saved (what the backward
  // needs, in the compute dtype, float32 for half inputs), v_last and s_last ([B, C, *S], x's
  // dtype). checkpoint = 0: nothing is saved (v_saved is empty); checkpoint = k >= 1: v_saved is
  // [ceil(T / k), N], row j the membrane after step min((j + 1) k, T) - 1 (k = 1: every step).
  m.def(
      "plif_fwd(Tensor x, Tensor alpha, Tensor? v0, Tensor? s0, float v_th, float gamma, "
      "bool signed, bool batch_first, bool spiking, int checkpoint, " NEUROKERN_NEURON_OPTIONS
      ", ScalarType? spike_dtype=None) -> (Tensor s, Tensor v_saved, Tensor v_last, "
      "Tensor s_last)");
  // Backward of plif_fwd from its v_saved (same checkpoint k >= 1). With k > 1 the membranes of
  // each chunk of k steps are recomputed from x and the checkpoint before it (v0/s0, zero if
  // None, before the first), bit-identically to the forward; with k = 1, x is not read.
  // grad_v_last / grad_s_last may be None (zero); grad_s has x's dtype or, after a forward with
  // spike_dtype, the compute dtype. Returns dx (x's shape and dtype, contiguous),
  // dalpha_per_neuron ([N] in the compute dtype: sum over t of dL/dv_t * v_{t-1}, reduced to
  // alpha's shape by the caller), dv0 and ds0 ([B, C, *S], x's dtype). leak_grad = False: the
  // caller needs no gradient of alpha, and dalpha_per_neuron's values are unspecified (the C++
  // kernels skip its sum and leave zeros; the Triton kernels compute it anyway).
  m.def(
      "plif_bwd(Tensor grad_s, Tensor? grad_v_last, Tensor? grad_s_last, Tensor x, "
      "Tensor v_saved, Tensor alpha, Tensor? v0, Tensor? s0, float v_th, float gamma, "
      "bool signed, bool batch_first, bool spiking, bool detach_reset, int checkpoint, "
      NEUROKERN_NEURON_OPTIONS ", bool leak_grad=True) -> (Tensor dx, "
      "Tensor dalpha_per_neuron, Tensor dv0, Tensor ds0)");
  // The recurrent loop of one SpikGRU2+ layer direction (SPEC.md 3) from the input projection
  // gi = x W^T + b_ih ([T, B, 3H], time-major, contiguous), which the caller computes in one
  // product for all steps. Returns s_seq, v_seq, i_seq ([T, B, H]; s in gi's dtype, v and i in
  // the compute dtype) and gh_seq ([T, B, 3H], s_{t-1} U^T of every step without b_hh, in
  // weight_hh's dtype): everything the backward needs besides gi and the weights.
  // lengths: [B] int64 on gi's device, or None (all T): row b runs steps t < lengths[b] and is
  // frozen after them (its state of step t - 1 written again as that of step t; gh_seq's rows
  // at those steps are not read by the backward).
  m.def(
      "spikgru2plus_fwd(Tensor gi, Tensor weight_hh, Tensor? bias_hh, Tensor alpha, "
      "Tensor? v0, Tensor? i0, Tensor? s0, float v_th, float gamma, bool signed, "
      "bool reset_gate, bool spiking, Tensor? lengths=None) -> (Tensor s_seq, Tensor v_seq, "
      "Tensor i_seq, Tensor gh_seq)");
  // Backward of spikgru2plus_fwd, from its outputs. Gradients of the final state may be None
  // (zero). Returns dgi ([T, B, 3H]; the caller turns it into dx, dW, db_ih with products over
  // all steps), dweight_hh, dbias_hh ([3H], zeros if bias_hh is None), dalpha, dv0, di0, ds0.
  // With lengths (as the forward's), a frozen step of a row passes the carries and dL/ds_t on
  // to step t - 1 unchanged (dL/ds_t = grad_s_t + the carry from step t + 1, as a step that
  // runs; the caller passes grad_s = 0 there, where the layer's spikes are constant zeros) and
  // writes zeros to dgi.
  m.def(
      "spikgru2plus_bwd(Tensor grad_s, Tensor? grad_v_last, Tensor? grad_i_last, "
      "Tensor? grad_s_last, Tensor gi, Tensor weight_hh, Tensor? bias_hh, Tensor alpha, "
      "Tensor s_seq, Tensor v_seq, Tensor i_seq, Tensor gh_seq, Tensor? v0, Tensor? i0, "
      "Tensor? s0, float v_th, float gamma, bool signed, bool reset_gate, "
      "Tensor? lengths=None) -> (Tensor dgi, Tensor dweight_hh, Tensor dbias_hh, "
      "Tensor dalpha, Tensor dv0, Tensor di0, Tensor ds0)");
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
