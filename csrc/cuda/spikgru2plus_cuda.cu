// CUDA kernels of neurokern::spikgru2plus_fwd and spikgru2plus_bwd: the persistent loops of
// spikgru2plus_persistent.cuh, each launched once per call as a cooperative kernel (the launch
// fails, rather than hangs, if its blocks cannot all be resident), on the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "cuda/spikgru2plus_persistent.cuh"

namespace {

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// The launch policy of the persistent kernels on gi's device, which it makes current for the
// op call.
struct CudaLaunch {
  c10::cuda::CUDAGuard guard;
  int device;

  explicit CudaLaunch(const at::Tensor& gi) : guard(gi.device()), device(gi.get_device()) {}

  // At most 32 batch rows x 256 values of k per round (each thread sums 8 rows of one column;
  // the staging registers cap a round further) and 8 slices of the block's threads.
  int batch_chunk() const { return 32; }
  int k_chunk() const { return 256; }
  int k_split() const { return 8; }

  // The tensor-core loops (16-bit U): 8 warps per block, rounds of 512 values of k.
  bool tensor_cores() const {
    return device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 8;
  }
  int warps() const { return 8; }
  int warp_size() const { return 32; }
  int k_round() const { return 512; }

  int multiprocessors() const {
    return device_attribute(cudaDevAttrMultiProcessorCount, device);
  }

  size_t max_shared_bytes() const {
    return static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  }

  template <typename Kernel>
  int max_threads(Kernel kernel) const {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    return attributes.maxThreadsPerBlock;  // fewer than 1024 for kernels of many registers
  }

  template <typename Kernel>
  int max_blocks(Kernel kernel, int threads, size_t shared_bytes) const {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
    int per_multiprocessor = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel,
                                                                 threads, shared_bytes));
    return per_multiprocessor * multiprocessors();
  }

  template <typename Kernel, typename Split, typename... Args>
  void run(Kernel kernel, const Split& p, size_t shared_bytes, Args&... args) const {
    TORCH_CHECK(device_attribute(cudaDevAttrCooperativeLaunch, device),
                "neurokern: the persistent SpikGRU2+ kernels need cooperative launches, which "
                "device ", device, " does not support; use backend=\"triton\"");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
    void* params[] = {const_cast<void*>(static_cast<const void*>(&args))...};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(p.blocks()),
                                               dim3(p.threads()), params, shared_bytes,
                                               c10::cuda::getCurrentCUDAStream(device).stream()));
  }
};

CudaLaunch cuda_launch(const at::Tensor& gi) { return CudaLaunch(gi); }

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CUDA, m) {
  m.impl("spikgru2plus_fwd", &neurokern::persistent::spikgru2plus_fwd<cuda_launch>);
  m.impl("spikgru2plus_bwd", &neurokern::persistent::spikgru2plus_bwd<cuda_launch>);
}
