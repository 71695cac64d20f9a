// The persistent SpikGRU2+ CUDA kernels (csrc/cuda/spikgru2plus_persistent.cuh), compiled for the
// CPU and run with one OS thread per CUDA thread, so that CI tests their indexing, work split and
// synchronisation without a GPU: every block's threads run at once, __syncthreads is a barrier
// of the block's threads, the grid synchronisation one of all threads, each block has its own
// shared memory (filled with NaN first, so a read of something never written shows). The host
// side (argument checks, the split, ATen products) is the header's own, with this launch policy.
// Built by tests/test_persistent_spikgru2plus.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#define NEUROKERN_CUDA_EMULATION 1
#define NEUROKERN_KERNEL
#define NEUROKERN_DEVICE inline
#define NEUROKERN_HOST_DEVICE
#define NEUROKERN_UNROLL

namespace neurokern::persistent {

struct ThreadContext {
  int thread, threads, block;
  std::barrier<>* block_barrier;
  std::barrier<>* grid_barrier;
  unsigned char* shared;
};
inline thread_local ThreadContext context;

inline int thread_index() { return context.thread; }
inline int block_threads() { return context.threads; }
inline int block_index() { return context.block; }
inline void sync_block() { context.block_barrier->arrive_and_wait(); }
inline void sync_grid() { context.grid_barrier->arrive_and_wait(); }
template <typename T>
T* shared_memory() { return reinterpret_cast<T*>(context.shared); }
template <typename T>
T load_shared_by_grid(const T* p) { return *p; }
template <typename T>
void load4(const T* p, T x[4]) {
  for (int m = 0; m < 4; ++m) x[m] = p[m];
}

// The tensor-core loops: a "warp" is one thread here, holding whole tiles.
inline int warp_size() { return 1; }
inline void zero16(void* dst) { std::memset(dst, 0, 16); }

// The asynchronous copies as late as cp.async allows them: each thread's copies wait in its
// committed groups and land, reading their source only then, when copy_async_wait lets them;
// from the issue on their destination holds NaN (all bits set, NaN in every W). So a read of a
// buffer before its wait (a wrong count, a missing wait or barrier), a refill of a buffer that
// is still being read, and a source changed between issue and wait all show in the results.
struct PendingCopy {
  void* dst;
  const void* src;
};
inline thread_local std::vector<PendingCopy> open_group;          // issued, not yet committed
inline thread_local std::deque<std::vector<PendingCopy>> pending;  // committed, oldest first
inline void copy16_async(void* dst, const void* src) {
  std::memset(dst, 0xff, 16);
  open_group.push_back({dst, src});
}
inline void copy_async_commit() {
  pending.push_back(std::move(open_group));
  open_group.clear();
}
inline void copy_async_wait(int most_pending) {
  for (; pending.size() > static_cast<size_t>(most_pending); pending.pop_front()) {
    for (const PendingCopy& copy : pending.front()) std::memcpy(copy.dst, copy.src, 16);
  }
}

// c += a b on 16 x 16 tiles: the factors as W values (converted exactly to float), the sums in
// float32 in k order (the tensor cores' order differs: float32 rounding apart)
template <typename W>
struct Mma {
  struct A {
    float x[16][16];
  };
  using B = A;
  using C = A;
  static void zero(C& c) { std::memset(c.x, 0, sizeof c.x); }
  static void load(A& a, const W* p, int ld) {
    for (int r = 0; r < 16; ++r) {
      for (int c = 0; c < 16; ++c) a.x[r][c] = static_cast<float>(p[r * ld + c]);
    }
  }
  static void load_a(A& a, const W* p, int ld) { load(a, p, ld); }
  static void load_b(B& b, const W* p, int ld) { load(b, p, ld); }
  static void mma(C& c, const A& a, const B& b) {
    for (int r = 0; r < 16; ++r) {
      for (int n = 0; n < 16; ++n) {
        float sum = c.x[r][n];
        for (int k = 0; k < 16; ++k) sum += a.x[r][k] * b.x[k][n];
        c.x[r][n] = sum;
      }
    }
  }
  static void store(float* p, const C& c, int ld) {
    for (int r = 0; r < 16; ++r) {
      for (int n = 0; n < 16; ++n) p[r * ld + n] = c.x[r][n];
    }
  }
};

}  // namespace neurokern::persistent

#include "cuda/spikgru2plus_persistent.cuh"

namespace {

// A small "device": `sms` SMs, one resident block each, so that small layers are split
// over several blocks per direction, and small tiles, so that the batch and k loops run more
// than one round (and, for the tensor-core loops, a small shared memory: more blocks).
struct EmulatedLaunch {
  int sms = 4;
  int batch_rows = 8;
  int k_values = 8;
  size_t shared_bytes = 48 * 1024;
  int slices = 4;

  int batch_chunk() const { return batch_rows; }
  int k_chunk() const { return k_values; }
  int k_split() const {  // the SIMT loops: the most slices, a power of 2 (at most `slices`)
    int split = 1;
    while (2 * split <= slices) split *= 2;
    return split;
  }
  // the tensor-core loops: `slices` one-thread warps, rounds of k_values rounded up to 16
  bool tensor_cores() const { return true; }
  int warps() const { return slices; }
  int warp_size() const { return 1; }
  int k_round() const { return (k_values + 15) / 16 * 16; }
  size_t max_shared_bytes() const { return shared_bytes; }
  int multiprocessors() const { return sms; }
  template <typename Kernel>
  int max_threads(Kernel) const { return 1024; }
  template <typename Kernel>
  int max_blocks(Kernel, int, size_t) const { return sms; }

  // The kernels read and write the tensors' memory from CPU threads: CPU tensors only
  // (checked by emulated_launch).
  template <typename Kernel, typename Split, typename... Args>
  void run(Kernel kernel, const Split& p, size_t bytes, Args&... args) const {
    const int blocks = p.blocks(), threads = p.threads();
    std::barrier<> grid_barrier(int64_t(blocks) * threads);
    std::vector<std::unique_ptr<std::barrier<>>> block_barriers;
    std::vector<std::vector<double>> shared(blocks);  // double: aligned for any T
    for (int b = 0; b < blocks; ++b) {
      block_barriers.push_back(std::make_unique<std::barrier<>>(threads));
      shared[b].resize(bytes / sizeof(double) + 1);
      std::fill(shared[b].begin(), shared[b].end(), std::nan(""));
    }
    std::atomic<bool> copies_left{false};
    std::vector<std::thread> pool;
    pool.reserve(size_t(blocks) * threads);
    for (int b = 0; b < blocks; ++b) {
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, b, t] {
          neurokern::persistent::context = {
              t, threads, b, block_barriers[b].get(), &grid_barrier,
              reinterpret_cast<unsigned char*>(shared[b].data())};
          kernel(args...);
          if (!neurokern::persistent::open_group.empty() ||
              !neurokern::persistent::pending.empty()) {
            copies_left = true;
          }
        });
      }
    }
    for (auto& thread : pool) thread.join();
    TORCH_CHECK(!copies_left, "emulation: a thread ended with asynchronous copies never waited "
                "for");
  }
};

EmulatedLaunch launch;

void configure(int multiprocessors, int batch_chunk, int k_chunk, int64_t max_shared_bytes,
               int k_split) {
  TORCH_CHECK(batch_chunk % neurokern::persistent::kRowsPerThread == 0,
              "batch_chunk must be a multiple of kRowsPerThread");
  TORCH_CHECK(k_split >= 1, "k_split must be positive");
  launch = EmulatedLaunch{multiprocessors, batch_chunk, k_chunk,
                          static_cast<size_t>(max_shared_bytes), k_split};
}

// The policy of one op call: the configured device; CPU tensors only.
EmulatedLaunch emulated_launch(const at::Tensor& gi) {
  TORCH_CHECK(gi.is_cpu(), "the emulated CUDA kernels run CPU tensors only");
  return launch;
}

// The tensor-core loops' split of a layer on the configured device (bf16 weights): units per
// block, staging buffers, batch groups, rows per group, blocks, shared bytes.
std::vector<int64_t> mma_plan(int64_t steps, int64_t rows, int64_t hidden, int64_t directions,
                              bool forward) {
  using namespace neurokern::persistent;
  using Act = neurokern::Activation<float, true, true>;
  const auto p = plan_mma<c10::BFloat16>(
      launch, spikgru2plus_persistent_mma_fwd_kernel<c10::BFloat16, true, Act>, steps, rows,
      hidden, directions, forward, "mma_plan");
  return {p.units, p.stages, p.batch_groups, p.group_rows, p.blocks(),
          p.shared_bytes(sizeof(c10::BFloat16))};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("configure", &configure,
        "The emulated device: resident blocks, tiles, shared memory, most slices per block "
        "(SIMT loops: the largest power of 2 up to it) or warps (tensor-core loops).",
        pybind11::arg("multiprocessors"), pybind11::arg("batch_chunk"), pybind11::arg("k_chunk"),
        pybind11::arg("max_shared_bytes"), pybind11::arg("k_split") = 4);
  m.def("mma_plan", &mma_plan);
  // The ops' schemas (csrc/register.cpp) with lengths=None as their default, as torch.ops has it
  using pybind11::arg;
  m.def("spikgru2plus_fwd", &neurokern::persistent::spikgru2plus_fwd<emulated_launch>, arg("gi"),
        arg("weight_hh"), arg("bias_hh"), arg("alpha"), arg("v0"), arg("i0"), arg("s0"),
        arg("v_th"), arg("gamma"), arg("signed"), arg("reset_gate"), arg("spiking"),
        arg("lengths") = pybind11::none());
  m.def("spikgru2plus_bwd", &neurokern::persistent::spikgru2plus_bwd<emulated_launch>,
        arg("grad_s"), arg("grad_v_last"), arg("grad_i_last"), arg("grad_s_last"), arg("gi"),
        arg("weight_hh"), arg("bias_hh"), arg("alpha"), arg("s_seq"), arg("v_seq"), arg("i_seq"),
        arg("gh_seq"), arg("v0"), arg("i0"), arg("s0"), arg("v_th"), arg("gamma"), arg("signed"),
        arg("reset_gate"), arg("lengths") = pybind11::none());
}
