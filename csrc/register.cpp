// The one registration file of neurokern._C: declares the `neurokern` torch.library namespace
// and exposes what the extension was built with. Kernels register their implementations in
// their own source files with TORCH_LIBRARY_IMPL.
#include <torch/extension.h>

TORCH_LIBRARY(neurokern, m) {}

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
