// Persistent SpikGRU2+ loops (SPEC.md 3): the whole time loop of a layer, forward or backward,
// in one cooperative launch, each block keeping its slice of the recurrent weights U in shared
// memory for all steps and the grid synchronising once per step. The CUDA kernels of
// neurokern::spikgru2plus_fwd / spikgru2plus_bwd (spikgru2plus_cuda.cu), with the contract of the
// C++ CPU ops (csrc/register.cpp), extended to D directions at once as the Triton ops
// (weight_hh [D, 3H, H], bias_hh [D, 3H], alpha [D, H], rows [D * B] direction-major, each
// direction in its processing order).
//
// Two kinds of loops, by the dtype W of U:
// - SIMT loops (W = T, float32 or float64; the products on the FMA units). Work split: block n
//   serves direction d = n / blocks_per_direction and the `units` hidden units j0 .. j0 + units
//   - 1, j0 = (n % blocks_per_direction) * units; its 3 * units "columns" c = g * units + jj are
//   the (r, z, i) rows g H + j0 + jj of U. Per step it computes, for every batch row of its
//   direction, chunk by chunk of `batch_chunk` rows:
//     forward:  gh[b][c] = sum_k s_{t-1}[b][k] U[g H + j][k]    (k < H, s_{t-1} from all blocks)
//               (written to gh_seq for the backward), then the cell of its units: r, z, i_t,
//               v_t, s_t (written for the next step);
//     backward: part[b][c] = sum_k dgh_{t+1}[b][g H + k] U[g H + k][j] (k < H, dgh from all
//               blocks) then ds_t = grad_s_t + reset path + sum_g part[b][g units + jj] and the
//               cell backward of its units (gates from gi_t and the forward's gh_t), writing
//               dgi_t, dgh_t (for the next step) and the carries.
//   Both are the same product: weights in shared memory as w[k][c] (k < H), the other factor
//   staged in shared memory k_chunk values of k at a time (the next round's values loaded into
//   registers while the block sums the current one), each thread summing one column for
//   kRowsPerThread batch rows (per k: one load of w, two 16-byte broadcast loads of the factor,
//   eight fused multiply-adds) over its slice of the round: the block's threads are k_split
//   groups ("slices") that each sum k_chunk / k_split values of k of every round, and the
//   slices' partial sums are added in shared memory at the end (k_split x more threads per
//   block than columns x row groups: more warps per SM to hide the latencies of the loads).
// - Tensor-core loops (T = float32, W = bfloat16/float16: U in the products' dtype of the other
//   backends under autocast): the same per-step structure with the products on the tensor cores
//   (WMMA 16 x 16 x 16, float32 accumulation), the factor staged by asynchronous copies, and
//   blocks that may split the batch too; see "Tensor-core loops" below. The spikes, their
//   factor, are exact in W (a W copy of them is written for it); the gate gradients dgh, the
//   backward's factor, are stored in W (as on the Triton backend); so is gh_seq (the float32
//   sums rounded to W: the backward's gates then see gh within W's rounding of the forward's).
// The products of the gate gradients over all steps (dU, db_hh) are single ATen products after
// the loop, as on the other backends. The state, gi and all cell arithmetic are in T.
// Variable lengths (lengths [D * B], or null): a row at a step t >= lengths[row] is frozen in
// the cells (forward_cell writes its state of step t - 1 again; backward_cell writes zero gate
// gradients and passes the carries and dL/ds_t on); the products still run for every row.
//
// The same source runs on the CPU in tests (tests/cuda_emulation.cpp): compiled without nvcc it
// takes its thread, block, barrier and shared-memory primitives from the includer, which runs each
// CUDA thread as an OS thread; the launch itself is a policy (`Launch`) of the host functions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "activations.h"

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
// at most 384 threads per block: the compiler keeps each thread within 168 registers
#define NEUROKERN_KERNEL __global__ __launch_bounds__(384)
#define NEUROKERN_DEVICE __device__ __forceinline__
#define NEUROKERN_HOST_DEVICE __host__ __device__
#define NEUROKERN_UNROLL _Pragma("unroll")
namespace neurokern::persistent {
NEUROKERN_DEVICE int thread_index() { return threadIdx.x; }
NEUROKERN_DEVICE int block_threads() { return blockDim.x; }
NEUROKERN_DEVICE int block_index() { return blockIdx.x; }
NEUROKERN_DEVICE void sync_block() { __syncthreads(); }
NEUROKERN_DEVICE void sync_grid() { cooperative_groups::this_grid().sync(); }
template <typename T>
NEUROKERN_DEVICE T* shared_memory() {
  extern __shared__ __align__(128) unsigned char shared[];
  return reinterpret_cast<T*>(shared);
}
// Data written by other blocks during this launch: read through L2 (L1 is not coherent).
template <typename T>
NEUROKERN_DEVICE T load_shared_by_grid(const T* p) { return __ldcg(p); }
NEUROKERN_DEVICE c10::BFloat16 load_shared_by_grid(const c10::BFloat16* p) {
  return {__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::BFloat16::from_bits()};
}
NEUROKERN_DEVICE c10::Half load_shared_by_grid(const c10::Half* p) {
  return {__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits()};
}
// x[0..3] = p[0..3], p 16-byte aligned: one vector load from shared memory (two for double)
NEUROKERN_DEVICE void load4(const float* p, float x[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
}
NEUROKERN_DEVICE void load4(const double* p, double x[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  x[0] = a.x, x[1] = a.y, x[2] = b.x, x[3] = b.y;
}

// The tensor-core loops' primitives (sm_80 and newer; the host refuses older devices).
NEUROKERN_DEVICE int warp_size() { return 32; }
NEUROKERN_DEVICE void zero16(void* dst) { *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0); }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
NEUROKERN_DEVICE void copy16_async(void*, const void*) { __trap(); }
NEUROKERN_DEVICE void copy_async_commit() {}
NEUROKERN_DEVICE void copy_async_wait(int) {}
#else
// 16 bytes global -> shared without registers, cached in L2 only (other blocks wrote them)
NEUROKERN_DEVICE void copy16_async(void* dst, const void* src) {
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(src) : "memory");
}
NEUROKERN_DEVICE void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// wait until at most `pending` (< 8) of this thread's committed groups are still in flight
template <int pending>
NEUROKERN_DEVICE void copy_async_wait_for() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}
NEUROKERN_DEVICE void copy_async_wait(int pending) {
  switch (pending) {
    case 0: return copy_async_wait_for<0>();
    case 1: return copy_async_wait_for<1>();
    case 2: return copy_async_wait_for<2>();
    case 3: return copy_async_wait_for<3>();
    case 4: return copy_async_wait_for<4>();
    case 5: return copy_async_wait_for<5>();
    case 6: return copy_async_wait_for<6>();
    default: return copy_async_wait_for<7>();
  }
}
#endif

template <typename W>
struct MmaElement;
template <>
struct MmaElement<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct MmaElement<c10::Half> {
  using type = __half;
};

// One warp's 16 x 16 x 16 tensor-core product with W (bf16 / fp16) factors and float32
// accumulation: c += a b, a [16][16] and b [16][16] row-major in shared memory.
template <typename W>
struct Mma {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // Before sm_80 mma.h has no bf16 fragments: empty stand-ins keep the loops compiling there
  // (for the SIMT loops' sake), and the host never launches a tensor-core loop on such a device.
  struct A {};
  struct B {};
  struct C {};
  static NEUROKERN_DEVICE void zero(C&) { __trap(); }
  static NEUROKERN_DEVICE void load_a(A&, const W*, int) {}
  static NEUROKERN_DEVICE void load_b(B&, const W*, int) {}
  static NEUROKERN_DEVICE void mma(C&, const A&, const B&) {}
  static NEUROKERN_DEVICE void store(float*, const C&, int) {}
#else
  using E = typename MmaElement<W>::type;
  using A = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, E,
                                   nvcuda::wmma::row_major>;
  using B = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, E,
                                   nvcuda::wmma::row_major>;
  using C = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static NEUROKERN_DEVICE void zero(C& c) { nvcuda::wmma::fill_fragment(c, 0.0f); }
  static NEUROKERN_DEVICE void load_a(A& a, const W* p, int ld) {
    nvcuda::wmma::load_matrix_sync(a, reinterpret_cast<const E*>(p), ld);
  }
  static NEUROKERN_DEVICE void load_b(B& b, const W* p, int ld) {
    nvcuda::wmma::load_matrix_sync(b, reinterpret_cast<const E*>(p), ld);
  }
  static NEUROKERN_DEVICE void mma(C& c, const A& a, const B& b) {
    nvcuda::wmma::mma_sync(c, a, b, c);
  }
  static NEUROKERN_DEVICE void store(float* p, const C& c, int ld) {
    nvcuda::wmma::store_matrix_sync(p, c, ld, nvcuda::wmma::mem_row_major);
  }
#endif
};
}  // namespace neurokern::persistent
#elif !defined(NEUROKERN_CUDA_EMULATION)
#error "spikgru2plus_persistent.cuh: compile with nvcc, or provide the emulation primitives"
#endif

namespace neurokern::persistent {

// Batch rows each thread sums per column (a multiple of 4: the factor is read 4 at a time).
constexpr int kRowsPerThread = 8;
// Values each thread stages per round (the round's k_chunk is capped so that they suffice): 8,
// so that a round of one k fits the smallest block (3 threads, 3 gates x 8 rows); with 16 the
// float32 kernels spilled within the 168 registers of 384 threads, with 8 they do not (the
// float64 ones spill up to 36 bytes).
template <typename T>
constexpr int kMaxStaged = 8;

// The shape of a launch: sizes, the work split and the tiles (see the top of this file).
struct Partition {
  int64_t steps, batch, hidden, directions;
  int units;                 // hidden units per block
  int blocks_per_direction;  // ceil(hidden / units)
  int batch_chunk;           // batch rows per pass, a power of 2 >= kRowsPerThread
  int k_chunk;               // values of k staged per round, a power of 2
  int b_shift, k_shift;      // their log2
  int k_split;               // slices of the block's threads, each summing k_chunk / k_split
                             // values of k per round: a power of 2 <= k_chunk

  NEUROKERN_HOST_DEVICE int blocks() const {
    return static_cast<int>(directions) * blocks_per_direction;
  }
  NEUROKERN_HOST_DEVICE int columns() const { return 3 * units; }
  // threads of one slice: one per column and group of kRowsPerThread batch rows
  NEUROKERN_HOST_DEVICE int slice_threads() const {
    return columns() * (batch_chunk / kRowsPerThread);
  }
  NEUROKERN_HOST_DEVICE int threads() const { return slice_threads() * k_split; }
  // staged rows are batch_chunk + 4 apart: 16-byte aligned, and staging stores (consecutive
  // k, stride batch_chunk + 4 words) spread over the banks
  NEUROKERN_HOST_DEVICE int tile_stride() const { return batch_chunk + 4; }
  // w [H][3 units] of `weight_size`-byte values, rounded up to 16 bytes (the tile after it is
  // read 16 bytes at a time)
  NEUROKERN_HOST_DEVICE int64_t weight_bytes(int64_t weight_size) const {
    return (hidden * columns() * weight_size + 15) / 16 * 16;
  }
  // values of the staging tile ([tile_gates][k_chunk][tile_stride]: the backward stages the
  // three gates' thirds of dgh), also holding the slices' partial sums at the end of a chunk
  // ([k_split][batch_chunk][columns])
  NEUROKERN_HOST_DEVICE int64_t tile_values(int tile_gates) const {
    const int64_t staging = int64_t(tile_gates) * k_chunk * tile_stride();
    const int64_t partial = k_split > 1 ? int64_t(k_split) * batch_chunk * columns() : 0;
    return staging > partial ? staging : partial;
  }
  // w, then in `value_size`-byte values the tile and the chunk's products [batch_chunk][columns]
  NEUROKERN_HOST_DEVICE int64_t shared_bytes(int64_t weight_size, int64_t value_size,
                                             int tile_gates) const {
    return weight_bytes(weight_size) +
           value_size * (tile_values(tile_gates) + int64_t(batch_chunk) * columns());
  }
};

template <typename T>
NEUROKERN_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// What the gates of hidden unit j read from memory: its row's gi_r (with the reset gate) and
// gi_z, b_hh's thirds (zeros without b_hh; b_r only with the reset gate) and the leak alpha.
template <typename T>
struct GateInputs {
  T gi_r, gi_z, b_r, b_z, b_i, alpha;
};

template <typename T, bool RESET_GATE>
NEUROKERN_DEVICE GateInputs<T> gate_inputs(const T* gi, const T* bias, const T* alpha,
                                           int64_t hidden, int64_t j) {
  GateInputs<T> in{T(0), gi[hidden + j], T(0), T(0), T(0), alpha[j]};
  if (RESET_GATE) in.gi_r = gi[j];
  if (bias != nullptr) {
    if (RESET_GATE) in.b_r = bias[j];
    in.b_z = bias[hidden + j];
    in.b_i = bias[2 * hidden + j];
  }
  return in;
}

// The gates from gh's thirds (U s_{t-1}): b_hh added to gh, r = sigmoid(gi_r + gh_r) (1 without
// the reset gate), z = sigmoid(gi_z + gh_z), and gh_i with b_hh; the forward step computes them
// and the backward step recomputes them here.
template <typename T>
struct CellGates {
  T r, z, gh_i;
};

template <typename T, bool RESET_GATE>
NEUROKERN_DEVICE CellGates<T> cell_gates(const GateInputs<T>& in, T gh_r, T gh_z, T gh_i) {
  return {RESET_GATE ? sigmoid(in.gi_r + (gh_r + in.b_r)) : T(1),
          sigmoid(in.gi_z + (gh_z + in.b_z)), gh_i + in.b_i};
}

// The staging of one round: value `idx` of the tile, [gate][kk][bb], is x(b0 + bb, gate, k0 + kk)
// = src[(row0 + b) src_row + gate src_gate + k] in T (0 beyond the batch or H, or if src is null).
// Each thread moves values tid, tid + threads, ..: up to kMaxStaged<T> of them, held in registers
// between the load (fetch) and the store to shared memory (store), so that the next round's
// loads are in flight while the block sums the current one.
struct Staging {
  Partition p;
  int tile_gates;
  int64_t src_row, src_gate, row0, b0;

  NEUROKERN_DEVICE int items() const { return tile_gates * p.batch_chunk * p.k_chunk; }

  template <typename S, typename T>
  NEUROKERN_DEVICE void fetch(const S* src, int64_t k0, T staged[kMaxStaged<T>]) const {
    const int kc = p.k_chunk, n = items();
    NEUROKERN_UNROLL
    for (int m = 0; m < kMaxStaged<T>; ++m) {
      const int idx = thread_index() + m * block_threads();
      const int kk = idx & (kc - 1), bb = (idx >> p.k_shift) & (p.batch_chunk - 1),
                gate = idx >> (p.k_shift + p.b_shift);
      const int64_t b = b0 + bb, k = k0 + kk;
      staged[m] = idx < n && src != nullptr && b < p.batch && k < p.hidden
                      ? static_cast<T>(load_shared_by_grid(
                            src + (row0 + b) * src_row + gate * src_gate + k))
                      : T(0);
    }
  }

  template <typename T>
  NEUROKERN_DEVICE void store(const T staged[kMaxStaged<T>], T* tile) const {
    const int kc = p.k_chunk, n = items(), stride = p.tile_stride();
    NEUROKERN_UNROLL
    for (int m = 0; m < kMaxStaged<T>; ++m) {
      const int idx = thread_index() + m * block_threads();
      const int kk = idx & (kc - 1), bb = (idx >> p.k_shift) & (p.batch_chunk - 1),
                gate = idx >> (p.k_shift + p.b_shift);
      if (idx < n) tile[(gate * kc + kk) * stride + bb] = staged[m];
    }
  }
};

// products[bb][c] = sum_{k < H} x(b0 + bb, g, k) w[k][c] for the chunk's batch rows bb and the
// block's columns c, x as staged by `staging` (see Staging) in rounds of k_chunk values of k,
// with g = 0 when tile_gates is 1 (every column reads the same factor, the forward), c / units
// when it is 3. Thread (slice, group, c) sums column c for the kRowsPerThread rows of its group
// over its slice's k_chunk / k_split values of each round; the slices' sums are then added in
// shared memory (in the tile, free by then). Starts and ends with the block synchronised.
template <typename T, typename W, typename S>
NEUROKERN_DEVICE void chunk_product(const Partition& p, const W* w, T* tile, const S* src,
                                    const Staging& staging, T* products) {
  const int columns = p.columns(), kc = p.k_chunk, stride = p.tile_stride();
  const int c = thread_index() % columns, group = (thread_index() / columns) %
                                                  (p.batch_chunk / kRowsPerThread);
  const int slice = thread_index() / p.slice_threads(), per_slice = kc / p.k_split;
  const int g = staging.tile_gates == 1 ? 0 : c / p.units;
  T acc[kRowsPerThread];
  for (int q = 0; q < kRowsPerThread; ++q) acc[q] = T(0);
  T staged[kMaxStaged<T>];
  staging.fetch(src, 0, staged);
  for (int64_t k0 = 0; k0 < p.hidden; k0 += kc) {
    sync_block();  // the previous round's readers are done with the tile
    staging.store(staged, tile);
    sync_block();
    if (k0 + kc < p.hidden) staging.fetch(src, k0 + kc, staged);
    const int first = slice * per_slice;
    const int last = static_cast<int>(std::min<int64_t>(first + per_slice, p.hidden - k0));
    const W* wk = w + k0 * columns + c;
    const T* xk = tile + g * kc * stride + kRowsPerThread * group;
    for (int kk = first; kk < last; ++kk) {
      const T u = static_cast<T>(wk[kk * columns]);
      for (int q = 0; q < kRowsPerThread; q += 4) {
        T x[4];
        load4(xk + kk * stride + q, x);
        for (int m = 0; m < 4; ++m) acc[q + m] += x[m] * u;
      }
    }
  }
  const int rows = p.batch_chunk * columns;
  T* mine = p.k_split == 1 ? products : tile + slice * rows;
  if (p.k_split > 1) sync_block();  // every slice is done with the last round's tile
  for (int q = 0; q < kRowsPerThread; ++q) {
    mine[(kRowsPerThread * group + q) * columns + c] = acc[q];
  }
  sync_block();
  if (p.k_split == 1) return;
  for (int idx = thread_index(); idx < rows; idx += block_threads()) {
    T sum = tile[idx];
    for (int other = 1; other < p.k_split; ++other) sum += tile[other * rows + idx];
    products[idx] = sum;
  }
  sync_block();
}

// What one block works on: its direction d, its first hidden unit j0, and its shared memory:
// w [H][columns] (W), the staging tile [tile_gates][k_chunk][tile_stride] and the chunk's
// products [batch_chunk][columns] (T).
template <typename T, typename W>
struct BlockSlice {
  int d;
  int64_t j0;
  W* w;
  T* tile;
  T* products;

  NEUROKERN_DEVICE BlockSlice(const Partition& p, int tile_gates)
      : d(block_index() / p.blocks_per_direction),
        j0(int64_t(block_index() % p.blocks_per_direction) * p.units),
        w(shared_memory<W>()),
        tile(reinterpret_cast<T*>(shared_memory<unsigned char>() + p.weight_bytes(sizeof(W)))),
        products(tile + p.tile_values(tile_gates)) {}
};

template <typename T, typename W, typename P = Partition>
struct FwdArgs {
  P p;
  const T* gi;  // [T, D * B, 3H], last dim contiguous
  int64_t gi_step, gi_row;
  const W* weight_hh;  // [D, 3H, H] contiguous
  const T* bias_hh;    // [D, 3H] or null
  const T* alpha;      // [D, H]
  const T* v0;         // [D * B, H] each, or null (zeros)
  const T* i0;
  const T* s0;
  T* s_seq;  // [T, D * B, H] out
  T* v_seq;
  T* i_seq;
  W* gh_seq;  // [T, D * B, 3H] out: U s_{t-1} without b_hh, rounded to the products' dtype
  T v_th;
  // tensor-core loops: the spikes again in W, the products' factor: [2][D * B][s_mm_row], step
  // t writing slot t % 2 (slot 1 holds s_0 before the loop when s0 is given)
  W* s_mm;
  int64_t s_mm_row;
  const int64_t* lengths;  // [D * B] steps each row runs, or null (all)
};

// The cell of hidden unit j of row `row` at step t, in two parts: what it reads from memory
// (forward_inputs: the tensor-core loops load it before the step's product, so that its latency
// overlaps the staging), then, given gh = U s_{t-1} (without b_hh), forward_cell:
// i_t = alpha i_{t-1} + gi_i + gh_i r, v_t = z v_{t-1} + (1 - z) i_t - v_th s_{t-1},
// s_t = act(v_t), with r = sigmoid(gi_r + gh_r) (1 without the reset gate),
// z = sigmoid(gi_z + gh_z) and gh = U s_{t-1} + b_hh. Writes s_t, v_t, i_t and gh (rounded to
// W, for the backward); returns s_t.
template <typename T>
struct ForwardInputs {
  GateInputs<T> g;
  T gi_i, vp, ip, sp;  // gi's i third; v, i and s after step t - 1
};

template <bool RESET_GATE, typename T, typename W, typename P>
NEUROKERN_DEVICE ForwardInputs<T> forward_inputs(const FwdArgs<T, W, P>& a, int64_t t,
                                                 int64_t row, int64_t j) {
  const int64_t hidden = a.p.hidden, rows = a.p.directions * a.p.batch, d = row / a.p.batch;
  const int64_t n = row * hidden + j, prev = (t - 1) * rows * hidden + n;
  const T* gi = a.gi + t * a.gi_step + row * a.gi_row;
  const T* bias = a.bias_hh == nullptr ? nullptr : a.bias_hh + d * 3 * hidden;
  return {gate_inputs<T, RESET_GATE>(gi, bias, a.alpha + d * hidden, hidden, j),
          gi[2 * hidden + j],
          t > 0 ? a.v_seq[prev] : a.v0 == nullptr ? T(0) : a.v0[n],
          t > 0 ? a.i_seq[prev] : a.i0 == nullptr ? T(0) : a.i0[n],
          t > 0 ? a.s_seq[prev] : a.s0 == nullptr ? T(0) : a.s0[n]};
}

template <bool RESET_GATE, typename T, typename W, typename P, typename Act>
NEUROKERN_DEVICE T forward_cell(const FwdArgs<T, W, P>& a, const Act& act,
                                const ForwardInputs<T>& in, int64_t t, int64_t row, int64_t j,
                                T gh_r, T gh_z, T gh_i) {
  const int64_t hidden = a.p.hidden, rows = a.p.directions * a.p.batch;
  const int64_t n = row * hidden + j;
  W* gh_out = a.gh_seq + (t * rows + row) * 3 * hidden + j;
  gh_out[0] = static_cast<W>(gh_r);
  gh_out[hidden] = static_cast<W>(gh_z);
  gh_out[2 * hidden] = static_cast<W>(gh_i);
  const CellGates<T> g = cell_gates<T, RESET_GATE>(in.g, gh_r, gh_z, gh_i);
  const T i = in.g.alpha * in.ip + in.gi_i + g.gh_i * g.r;
  const T v = g.z * in.vp + (T(1) - g.z) * i - a.v_th * in.sp;
  const int64_t out = t * rows * hidden + n;
  if (a.lengths != nullptr && t >= a.lengths[row]) {  // the row ended: its state stays
    a.i_seq[out] = in.ip;
    a.v_seq[out] = in.vp;
    a.s_seq[out] = in.sp;
    return in.sp;
  }
  const T s = act(v);
  a.i_seq[out] = i;
  a.v_seq[out] = v;
  a.s_seq[out] = s;
  return s;
}

// Forward (SIMT loops: T = W, float32 or float64).
template <typename T, typename W, bool RESET_GATE, typename Act>
NEUROKERN_KERNEL void spikgru2plus_persistent_fwd_kernel(FwdArgs<T, W> a, Act act) {
  const Partition& p = a.p;
  const int64_t hidden = p.hidden, batch = p.batch, rows = p.directions * batch;
  const int units = p.units, columns = p.columns(), threads = block_threads();
  const BlockSlice<T, W> block(p, 1);
  const int d = block.d;
  const int64_t j0 = block.j0;
  W* w = block.w;
  T* gh = block.products;
  const W* u = a.weight_hh + d * 3 * hidden * hidden;  // [3H, H]
  for (int64_t idx = thread_index(); idx < hidden * columns; idx += threads) {
    const int64_t c = idx / hidden, k = idx % hidden;      // reads along rows of U
    const int64_t j = j0 + c % units;
    w[k * columns + c] = j < hidden ? u[((c / units) * hidden + j) * hidden + k] : W(0);
  }
  const int64_t row0 = int64_t(d) * batch;
  for (int64_t t = 0; t < p.steps; ++t) {
    const T* s_prev = t == 0 ? a.s0 : a.s_seq + (t - 1) * rows * hidden;
    for (int64_t b0 = 0; b0 < batch; b0 += p.batch_chunk) {
      chunk_product(p, w, block.tile, s_prev, Staging{p, 1, hidden, 0, row0, b0}, gh);
      for (int idx = thread_index(); idx < p.batch_chunk * units; idx += threads) {
        const int bb = idx / units, jj = idx % units;
        const int64_t b = b0 + bb, j = j0 + jj;
        if (b >= batch || j >= hidden) continue;
        const T* g = gh + bb * columns + jj;
        forward_cell<RESET_GATE>(a, act, forward_inputs<RESET_GATE>(a, t, row0 + b, j), t,
                                 row0 + b, j, g[0], g[units], g[2 * units]);
      }
    }
    sync_grid();  // s_t complete: the next step's products read all of it
  }
}

template <typename T, typename W, typename P = Partition>
struct BwdArgs {
  P p;
  const T* grad_s;  // [T, D * B, H], last dim contiguous
  int64_t grad_s_step, grad_s_row;
  const T* gi;  // [T, D * B, 3H], last dim contiguous
  int64_t gi_step, gi_row;
  const W* gh;         // [T, D * B, 3H] contiguous: the forward's gh_seq (U s_{t-1})
  const W* weight_hh;  // [D, 3H, H] contiguous
  const T* bias_hh;    // [D, 3H] or null
  const T* alpha;      // [D, H]
  const T* v0;         // [D * B, H] or null (zeros)
  const T* i0;
  const T* v_seq;  // [T, D * B, H]
  const T* i_seq;
  T* ds;      // [D * B, H] in: dL/ds_{T-1} but the product path; out: dL/ds_0 (every path)
  T* dv;      // [D * B, H] in: dL/dv_{T-1} carry (grad_v_last); out: dL/dv_0
  T* di;      // [D * B, H] in: dL/di_{T-1} carry (grad_i_last); out: dL/di_0
  T* dgi;     // [T, D * B, 3H] out, contiguous
  W* dgh;     // [T, D * B, dgh_row] out, the first 3H of a row: the products' dtype
  T* dalpha;  // [D * B, H] zeros in; out: sum over t of dL/di_t i_{t-1}
  T v_th;
  int64_t dgh_row;  // 3H, or 3H rounded up to 8 values for the tensor-core loops' 16-byte copies
  const int64_t* lengths;  // [D * B] steps each row ran, or null (all)
};

// The cell backward of hidden unit j of row `row` at step t >= 0, in two parts as the forward's:
// what it reads (backward_inputs), then, given the product path of dL/ds_t (dgh_{t+1} U),
// backward_cell with dL/ds_t = ds + that and the carries dv = z_{t+1} dL/dv_{t+1},
// di = alpha dL/di_{t+1}:
//   dv_t = ds f'(v_t) + dv,  di_t = (1 - z) dv_t + di,  d(gi_i) = di_t,  d(gh_i) = di_t r,
//   d(a_r) = di_t gh_i r (1 - r),  d(a_z) = dv_t (v_{t-1} - i_t) z (1 - z),
//   carries z dv_t and alpha di_t, reset path -v_th dv_t onto dL/ds_{t-1} (into a.ds).
template <typename T>
struct BackwardInputs {
  GateInputs<T> g;
  T gh_r, gh_z, gh_i;  // the forward's U s_{t-1}
  T vp, ip, v, i;      // the state after steps t - 1 and t
  T ds, dv, di;        // dL/ds_t but its product path, and the carries
  T dalpha, grad_prev;  // dalpha's running sum; the output gradient of s_{t-1} (0 at t = 0)
};

template <bool RESET_GATE, typename T, typename W, typename P>
NEUROKERN_DEVICE BackwardInputs<T> backward_inputs(const BwdArgs<T, W, P>& a, int64_t t,
                                                   int64_t row, int64_t j) {
  const int64_t hidden = a.p.hidden, rows = a.p.directions * a.p.batch, d = row / a.p.batch;
  const int64_t n = row * hidden + j, gates = 3 * hidden;
  const int64_t step = t * rows * hidden, before = step - rows * hidden + n;  // after t - 1
  const T* gi = a.gi + t * a.gi_step + row * a.gi_row;
  const W* gh = a.gh + (t * rows + row) * gates;
  const T* bias = a.bias_hh == nullptr ? nullptr : a.bias_hh + d * gates;
  return {gate_inputs<T, RESET_GATE>(gi, bias, a.alpha + d * hidden, hidden, j),
          static_cast<T>(gh[j]),
          static_cast<T>(gh[hidden + j]),
          static_cast<T>(gh[2 * hidden + j]),
          t == 0 ? (a.v0 == nullptr ? T(0) : a.v0[n]) : a.v_seq[before],
          t == 0 ? (a.i0 == nullptr ? T(0) : a.i0[n]) : a.i_seq[before],
          a.v_seq[step + n],
          a.i_seq[step + n],
          a.ds[n],
          a.dv[n],
          a.di[n],
          a.dalpha[n],
          t > 0 ? a.grad_s[(t - 1) * a.grad_s_step + row * a.grad_s_row + j] : T(0)};
}

template <bool RESET_GATE, typename T, typename W, typename P, typename Surr>
NEUROKERN_DEVICE void backward_cell(const BwdArgs<T, W, P>& a, const Surr& surrogate,
                                    const BackwardInputs<T>& in, int64_t t, int64_t row,
                                    int64_t j, T ds_product) {
  const int64_t hidden = a.p.hidden, rows = a.p.directions * a.p.batch;
  const int64_t n = row * hidden + j, gates = 3 * hidden;
  const CellGates<T> g = cell_gates<T, RESET_GATE>(in.g, in.gh_r, in.gh_z, in.gh_i);
  const T z = g.z, r = g.r;
  const T ds = in.ds + ds_product;
  T* dgi = a.dgi + (t * rows + row) * gates;
  W* dgh = a.dgh + (t * rows + row) * a.dgh_row;
  if (a.lengths != nullptr && t >= a.lengths[row]) {  // a frozen step: the gradients pass on
    for (int g3 = 0; g3 < 3; ++g3) {
      dgi[g3 * hidden + j] = T(0);
      dgh[g3 * hidden + j] = W(0);
    }
    a.ds[n] = t > 0 ? ds + in.grad_prev : ds;
    return;
  }
  const T dv = ds * surrogate(in.v) + in.dv;
  const T di = (T(1) - z) * dv + in.di;
  const T da_z = dv * (in.vp - in.i) * z * (T(1) - z);
  const T da_r = RESET_GATE ? di * g.gh_i * r * (T(1) - r) : T(0);
  dgi[j] = da_r;
  dgh[j] = static_cast<W>(da_r);
  dgi[hidden + j] = da_z;
  dgh[hidden + j] = static_cast<W>(da_z);
  dgi[2 * hidden + j] = di;
  dgh[2 * hidden + j] = static_cast<W>(di * r);
  a.dv[n] = z * dv;
  a.di[n] = in.g.alpha * di;
  a.dalpha[n] = in.dalpha + di * in.ip;
  T ds_prev = -a.v_th * dv;
  if (t > 0) ds_prev += in.grad_prev;
  a.ds[n] = ds_prev;
}

// Backward (SIMT loops), per step t = T-1 .. 0, then once more to add the product path of s_0.
template <typename T, typename W, bool RESET_GATE, typename Surr>
NEUROKERN_KERNEL void spikgru2plus_persistent_bwd_kernel(BwdArgs<T, W> a, Surr surrogate) {
  const Partition& p = a.p;
  const int64_t hidden = p.hidden, batch = p.batch, rows = p.directions * batch;
  const int units = p.units, columns = p.columns(), threads = block_threads();
  const BlockSlice<T, W> block(p, 3);
  const int d = block.d;
  const int64_t j0 = block.j0;
  W* w = block.w;
  T* part = block.products;
  const W* u = a.weight_hh + d * 3 * hidden * hidden;  // [3H, H]
  for (int64_t idx = thread_index(); idx < hidden * columns; idx += threads) {
    const int64_t jj = idx % units, k = (idx / units) % hidden, g = idx / (units * hidden);
    const int64_t j = j0 + jj;  // reads along rows of U
    w[k * columns + g * units + jj] = j < hidden ? u[(g * hidden + k) * hidden + j] : W(0);
  }
  const int64_t row0 = int64_t(d) * batch;
  for (int64_t t = p.steps - 1; t >= -1; --t) {
    const W* dgh_next = t + 1 < p.steps ? a.dgh + (t + 1) * rows * a.dgh_row : nullptr;
    for (int64_t b0 = 0; b0 < batch; b0 += p.batch_chunk) {
      chunk_product(p, w, block.tile, dgh_next, Staging{p, 3, a.dgh_row, hidden, row0, b0},
                    part);
      for (int idx = thread_index(); idx < p.batch_chunk * units; idx += threads) {
        const int bb = idx / units, jj = idx % units;
        const int64_t b = b0 + bb, j = j0 + jj;
        if (b >= batch || j >= hidden) continue;
        const T* pb = part + bb * columns + jj;
        const T product = pb[0] + pb[units] + pb[2 * units];
        if (t < 0) {  // after step 0: dL/ds_0 with its product path
          a.ds[(row0 + b) * hidden + j] += product;
        } else {
          backward_cell<RESET_GATE>(a, surrogate, backward_inputs<RESET_GATE>(a, t, row0 + b, j),
                                    t, row0 + b, j, product);
        }
      }
    }
    if (t >= 0) sync_grid();  // dgh_t complete: the next step's products read all of it
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core loops: U in bf16/fp16 (autocast), products on the tensor cores with float32
// accumulation (the spikes, the forward's factor, are exact in W; the gate gradients dgh, the
// backward's, are stored in W as on the Triton backend), everything else as above in float32.
//
// Work split: block n serves direction d, `units` hidden units from j0 and the batch rows of one
// of `batch_groups` groups (`group_rows` each: U's slice is held by every group's block, which
// halves or quarters the factor each block stages per step). Per step and chunk of kMmaRows
// rows of its group it computes one product out[r][c] = sum_{k < K} x[r][k] w[k][c]:
//   forward:  K = H, x = s_{t-1} (W copy), c = g units + jj: w[k][c] = U[g H + j0 + jj][k];
//   backward: K = 3H, x = dgh_{t+1}, c = jj: w[k][c] = U[k][j0 + jj], the three gates' paths of
//             dL/ds summed by the one product;
// w [K16][N16] (K and N = the columns rounded up to 16, zeros beyond) stays in shared memory
// for all steps; x is staged a round of k_round values of k at a time into a ring of `stages`
// buffers with 16-byte asynchronous copies (cp.async, L2 only: other blocks wrote it), up to
// stages - 1 rounds ahead of the one the warps multiply (where the ring holds all of a step's
// rounds, the step's whole factor is in flight at once: the loops wait on L2 latency once per
// step, not once per round). Warp q takes the k steps of 16
// q, q + warps, .. of every round and all N16 / 16 column tiles (one 16 x 16 float32
// accumulator each, the A fragment loaded once per k step); the warps' sums are added in shared
// memory at the end. Then the cell of the chunk's units, as the SIMT loops', and once per step
// the grid barrier.
// ---------------------------------------------------------------------------------------------

constexpr int kMmaRows = 16;  // batch rows per product (the tensor-core tile's M)
constexpr int kMaxTiles = 8;  // column tiles of 16 per warp: N16 <= 128
constexpr int kMaxStages = 8;  // staging buffers: copy_async_wait counts up to 7 pending rounds

NEUROKERN_HOST_DEVICE constexpr int64_t round_up(int64_t n, int64_t to) {
  return (n + to - 1) / to * to;
}

struct MmaPartition {
  int64_t steps, batch, hidden, directions;
  int units;                 // hidden units per block
  int blocks_per_direction;  // ceil(hidden / units)
  int batch_groups;          // blocks per direction and unit group
  int group_rows;            // batch rows of a group (the last may have fewer)
  int inner, columns;        // K and N of the block's product (see above)
  int k_round;               // values of k staged per round, a multiple of 16
  int stages;                // staging buffers (rounds in flight + 1), <= kMaxStages
  int warps, warp_threads;    // warps per block, threads per warp

  NEUROKERN_HOST_DEVICE int blocks() const {
    return static_cast<int>(directions) * blocks_per_direction * batch_groups;
  }
  NEUROKERN_HOST_DEVICE int threads() const { return warps * warp_threads; }
  NEUROKERN_HOST_DEVICE int inner16() const { return static_cast<int>(round_up(inner, 16)); }
  NEUROKERN_HOST_DEVICE int columns16() const { return static_cast<int>(round_up(columns, 16)); }
  NEUROKERN_HOST_DEVICE int tile_stride() const { return k_round + 8; }  // + 16 bytes: banks
  // each part rounded up to 128 bytes (the tensor-core loads want 32-byte aligned tiles)
  NEUROKERN_HOST_DEVICE int64_t weight_bytes(int64_t weight_size) const {
    return round_up(int64_t(inner16()) * columns16() * weight_size, 128);
  }
  NEUROKERN_HOST_DEVICE int rounds() const { return (inner + k_round - 1) / k_round; }
  NEUROKERN_HOST_DEVICE int64_t tile_bytes(int64_t weight_size) const {
    return round_up(int64_t(stages) * kMmaRows * tile_stride() * weight_size, 128);
  }
  // the warps' float32 sums [warps][kMmaRows][N16]; the first holds the chunk's products
  NEUROKERN_HOST_DEVICE int64_t shared_bytes(int64_t weight_size) const {
    return weight_bytes(weight_size) + tile_bytes(weight_size) +
           int64_t(warps) * kMmaRows * columns16() * 4;
  }
};

// What one block of the tensor-core loops works on, and its shared memory.
template <typename W>
struct MmaBlock {
  int d;
  int64_t j0, first, last;  // its units j0 ..; its batch rows first .. last - 1
  W* w;
  W* tile;
  float* products;

  NEUROKERN_DEVICE explicit MmaBlock(const MmaPartition& p) {
    const int per_direction = p.blocks_per_direction * p.batch_groups;
    const int n = block_index() % per_direction;
    d = block_index() / per_direction;
    j0 = int64_t(n % p.blocks_per_direction) * p.units;
    first = int64_t(n / p.blocks_per_direction) * p.group_rows;
    last = std::min<int64_t>(first + p.group_rows, p.batch);
    w = shared_memory<W>();
    tile = reinterpret_cast<W*>(shared_memory<unsigned char>() + p.weight_bytes(sizeof(W)));
    products = reinterpret_cast<float*>(shared_memory<unsigned char>() +
                                         p.weight_bytes(sizeof(W)) + p.tile_bytes(sizeof(W)));
  }
};

// products[r][c] = sum_{k < K} x[r][k] w[k][c] for r < kMmaRows, c < N16, x's row r at
// src + (first_row + r) src_row (r < rows; zeros beyond), rows of at least round_up(K, 8) values,
// zeros past K, 16-byte aligned; src null: zeros. Starts and ends with the block synchronised.
template <typename W>
NEUROKERN_DEVICE void mma_chunk_product(const MmaPartition& p, const MmaBlock<W>& block,
                                        const W* src, int64_t src_row, int64_t first_row,
                                        int rows) {
  using M = Mma<W>;
  const int n16 = p.columns16(), tiles = n16 / 16, stride = p.tile_stride();
  const int warp = thread_index() / warp_size();
  float* mine = block.products + warp * kMmaRows * n16;
  if (src == nullptr) {
    sync_block();  // the previous chunk's cell is done with the products
    for (int idx = thread_index(); idx < kMmaRows * n16; idx += block_threads()) {
      block.products[idx] = 0.0f;
    }
    sync_block();
    return;
  }
  const int per_row = p.k_round / 8, pieces = kMmaRows * per_row;
  const int rounds = p.rounds(), stages = p.stages;
  auto issue = [&](int round) {  // the copies of one round into buffer round % stages
    W* buf = block.tile + (round % stages) * kMmaRows * stride;
    for (int idx = thread_index(); idx < pieces; idx += block_threads()) {
      const int r = idx / per_row, kk = (idx % per_row) * 8;
      const int64_t k = int64_t(round) * p.k_round + kk;
      if (r < rows && k < p.inner) {
        copy16_async(buf + r * stride + kk, src + (first_row + r) * src_row + k);
      } else {
        zero16(buf + r * stride + kk);
      }
    }
    copy_async_commit();
  };
  typename M::C acc[kMaxTiles];
  NEUROKERN_UNROLL
  for (int nt = 0; nt < kMaxTiles; ++nt) {
    if (nt < tiles) M::zero(acc[nt]);
  }
  for (int round = 0; round < std::min(stages - 1, rounds); ++round) issue(round);
  for (int round = 0; round < rounds; ++round) {
    // into the buffer the previous round used (the block synchronised after it)
    if (round + stages - 1 < rounds) issue(round + stages - 1);
    copy_async_wait(std::min(stages - 1, rounds - 1 - round));  // rounds issued after this one
    sync_block();  // every thread's copies of this round have landed
    const W* buf = block.tile + (round % stages) * kMmaRows * stride;
    const int k0 = round * p.k_round;
    const int steps = (std::min(p.k_round, p.inner16() - k0) + 15) / 16;
    for (int ks = warp; ks < steps; ks += p.warps) {
      typename M::A a;
      M::load_a(a, buf + ks * 16, stride);
      const W* wk = block.w + int64_t(k0 + ks * 16) * n16;
      NEUROKERN_UNROLL
      for (int nt = 0; nt < kMaxTiles; ++nt) {
        if (nt < tiles) {
          typename M::B b;
          M::load_b(b, wk + nt * 16, n16);
          M::mma(acc[nt], a, b);
        }
      }
    }
    sync_block();  // every warp is done with this buffer before a later round refills it
  }
  NEUROKERN_UNROLL
  for (int nt = 0; nt < kMaxTiles; ++nt) {
    if (nt < tiles) M::store(mine + nt * 16, acc[nt], n16);
  }
  sync_block();
  for (int idx = thread_index(); idx < kMmaRows * n16; idx += block_threads()) {
    float sum = block.products[idx];
    for (int q = 1; q < p.warps; ++q) sum += block.products[q * kMmaRows * n16 + idx];
    block.products[idx] = sum;
  }
  sync_block();
}

// One step of a tensor-core loop for the block: per chunk of its batch rows, the product of the
// factor `src` with the block's columns of U, then cell(row, j, products of the cell's row from
// its unit's column, inputs) for each of the chunk's cells, with inputs = load(row, j); each
// thread's first cell of a chunk has its inputs loaded before the product, so that their
// latency overlaps the staging.
template <typename W, typename Load, typename Cell>
NEUROKERN_DEVICE void mma_step(const MmaPartition& p, const MmaBlock<W>& block, const W* src,
                               int64_t src_row, Load load, Cell cell) {
  const int units = p.units;
  const int64_t row0 = int64_t(block.d) * p.batch;
  for (int64_t b0 = block.first; b0 < block.last; b0 += kMmaRows) {
    const int chunk = static_cast<int>(std::min<int64_t>(kMmaRows, block.last - b0));
    const int first = thread_index();
    const int64_t first_j = block.j0 + first % units;
    decltype(load(row0, first_j)) early{};
    if (first < chunk * units && first_j < p.hidden) {
      early = load(row0 + b0 + first / units, first_j);
    }
    mma_chunk_product(p, block, src, src_row, row0 + b0, chunk);
    for (int idx = first; idx < chunk * units; idx += block_threads()) {
      const int r = idx / units, jj = idx % units;
      const int64_t row = row0 + b0 + r, j = block.j0 + jj;
      if (j >= p.hidden) continue;
      cell(row, j, block.products + r * p.columns16() + jj, idx == first ? early : load(row, j));
    }
  }
}

// Forward on the tensor cores: per step, the product of s_{t-1} (s_mm slot (t + 1) % 2) with
// the block's columns of U, then the cells, which also write s_t to slot t % 2.
template <typename W, bool RESET_GATE, typename Act>
NEUROKERN_KERNEL void spikgru2plus_persistent_mma_fwd_kernel(FwdArgs<float, W, MmaPartition> a,
                                                             Act act) {
  const MmaPartition& p = a.p;
  const int64_t hidden = p.hidden, rows = p.directions * p.batch;
  const int units = p.units, n16 = p.columns16(), k16 = p.inner16();
  const MmaBlock<W> block(p);
  const W* u = a.weight_hh + block.d * 3 * hidden * hidden;  // [3H, H]
  for (int64_t idx = thread_index(); idx < int64_t(k16) * n16; idx += block_threads()) {
    const int64_t c = idx / k16, k = idx % k16, j = block.j0 + c % units;  // along rows of U
    block.w[k * n16 + c] = c < 3 * units && j < hidden && k < hidden
                               ? u[((c / units) * hidden + j) * hidden + k]
                               : W(0);
  }
  for (int64_t t = 0; t < p.steps; ++t) {
    const W* s_prev =
        t == 0 && a.s0 == nullptr ? nullptr : a.s_mm + ((t + 1) & 1) * rows * a.s_mm_row;
    W* s_next = a.s_mm + (t & 1) * rows * a.s_mm_row;
    mma_step(
        p, block, s_prev, a.s_mm_row,
        [&](int64_t row, int64_t j) { return forward_inputs<RESET_GATE>(a, t, row, j); },
        [&](int64_t row, int64_t j, const float* g, const ForwardInputs<float>& in) {
          const float s = forward_cell<RESET_GATE>(a, act, in, t, row, j, g[0], g[units],
                                                   g[2 * units]);
          s_next[row * a.s_mm_row + j] = static_cast<W>(s);
        });
    sync_grid();  // s_t complete: the next step's products read all of it
  }
}

// Backward on the tensor cores, per step t = T-1 .. 0 and once more for s_0's product path.
template <typename W, bool RESET_GATE, typename Surr>
NEUROKERN_KERNEL void spikgru2plus_persistent_mma_bwd_kernel(BwdArgs<float, W, MmaPartition> a,
                                                             Surr surrogate) {
  const MmaPartition& p = a.p;
  const int64_t hidden = p.hidden, rows = p.directions * p.batch;
  const int units = p.units, n16 = p.columns16(), k16 = p.inner16();
  const MmaBlock<W> block(p);
  const W* u = a.weight_hh + block.d * 3 * hidden * hidden;  // [3H, H]
  for (int64_t idx = thread_index(); idx < int64_t(k16) * n16; idx += block_threads()) {
    const int64_t k = idx / n16, c = idx % n16, j = block.j0 + c;  // along rows of U
    block.w[idx] = c < units && j < hidden && k < 3 * hidden ? u[k * hidden + j] : W(0);
  }
  for (int64_t t = p.steps - 1; t >= -1; --t) {
    const W* dgh_next = t + 1 < p.steps ? a.dgh + (t + 1) * rows * a.dgh_row : nullptr;
    mma_step(
        p, block, dgh_next, a.dgh_row,
        [&](int64_t row, int64_t j) {
          return t < 0 ? BackwardInputs<float>{} : backward_inputs<RESET_GATE>(a, t, row, j);
        },
        [&](int64_t row, int64_t j, const float* product, const BackwardInputs<float>& in) {
          if (t < 0) {  // after step 0: dL/ds_0 with its product path
            a.ds[row * hidden + j] += product[0];
          } else {
            backward_cell<RESET_GATE>(a, surrogate, in, t, row, j, product[0]);
          }
        });
    if (t >= 0) sync_grid();  // dgh_t complete: the next step's products read all of it
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: argument checks, the work split, the launches. The ops take the launch policy as
// a template argument, `make_launch(gi)`, called once per op call (the CUDA policy also holds
// the device guard for the call); the policy provides
//   int multiprocessors()                           the device's SMs
//   int max_threads(kernel)                         threads a block of `kernel` may have
//   int max_blocks(kernel, threads, shared_bytes)  blocks that can be resident at once
//   size_t max_shared_bytes()                       shared memory one block may use
//   int batch_chunk(), k_chunk()                    the tiles (most rows, most values of k)
//   int k_split()                                   the most slices of a block (a power of 2)
//   void run(kernel, partition, shared_bytes, args...)
// ---------------------------------------------------------------------------------------------

using NamedState = std::pair<const char*, const std::optional<at::Tensor>*>;

inline void check_layer(const at::Tensor& gi, const at::Tensor& weight_hh,
                        const std::optional<at::Tensor>& bias_hh, const at::Tensor& alpha,
                        std::initializer_list<NamedState> states, const char* op) {
  TORCH_CHECK(gi.dim() == 3 && gi.size(2) % 3 == 0, op, ": gi must be [T, D * B, 3H], got ",
              gi.sizes());
  TORCH_CHECK(gi.scalar_type() == at::kFloat || gi.scalar_type() == at::kDouble, op,
              ": gi must be float32 or float64, got ", gi.scalar_type());
  const int64_t hidden = gi.size(2) / 3;
  TORCH_CHECK(weight_hh.dim() == 2 || weight_hh.dim() == 3, op,
              ": weight_hh must be [3H, H] or [D, 3H, H], got ", weight_hh.sizes());
  const int64_t directions = weight_hh.dim() == 3 ? weight_hh.size(0) : 1;
  TORCH_CHECK(directions >= 1 && gi.size(1) % directions == 0, op, ": the ", gi.size(1),
              " rows of gi are not ", directions, " directions of equal batch");
  auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.device() == gi.device(), op, ": ", name, " is on ", t.device(),
                " but gi is on ", gi.device());
    // weight_hh may hold the products' lower dtype (autocast) when gi is float32
    const bool lower = &t == &weight_hh && gi.scalar_type() == at::kFloat &&
                       (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf);
    TORCH_CHECK(t.scalar_type() == gi.scalar_type() || lower, op, ": ", name, " is ",
                t.scalar_type(), " but gi is ", gi.scalar_type());
    TORCH_CHECK(t.numel() == c10::multiply_integers(shape), op, ": ", name, " must be ", shape,
                " (the leading 1 optional), got ", t.sizes());
  };
  check(weight_hh, "weight_hh", {directions, 3 * hidden, hidden});
  check(alpha, "alpha", {directions, hidden});
  if (bias_hh) check(*bias_hh, "bias_hh", {directions, 3 * hidden});
  for (const auto& [name, state] : states) {
    if (*state) check(**state, name, {gi.size(1), hidden});
  }
}

// The smallest number of units per block whose launch fits the device: at most one block per
// SM (each block stages the whole factor of every step from L2, so more blocks cost more
// traffic, not more FMA lanes), all blocks resident at once (the grid synchronises) and the
// block's weights in shared memory; for it, the most slices (k_split, at most the policy's) that
// fit the kernel's thread limit, the shared memory and the residency.
template <typename T, typename W, class Launch, class Kernel>
Partition plan(const Launch& launch, Kernel kernel, int64_t steps, int64_t rows, int64_t hidden,
               int64_t directions, int tile_gates, const char* op) {
  Partition p{steps, rows / directions, hidden, directions, 1, 0, 0, 0, 0, 0, 1};
  auto ceil_log2 = [](int64_t n) {
    int shift = 0;
    while ((int64_t(1) << shift) < n) ++shift;
    return shift;
  };
  const int most_rows = launch.batch_chunk();
  TORCH_CHECK(most_rows >= kRowsPerThread && (1 << ceil_log2(most_rows)) == most_rows, op,
              ": the launch's batch_chunk must be a power of 2 >= ", kRowsPerThread);
  // the batch rounded up to a power of 2, at most most_rows
  p.b_shift = std::min(ceil_log2(most_rows),
                       ceil_log2(std::max<int64_t>(p.batch, kRowsPerThread)));
  p.batch_chunk = 1 << p.b_shift;
  const size_t limit = launch.max_shared_bytes();
  const int max_threads = launch.max_threads(kernel);
  // k_chunk: a power of 2 with each thread staging at most kMaxStaged<T> values of a round
  auto set_k_chunk = [&] {
    const int cap = std::min(launch.k_chunk(),
                             kMaxStaged<T> * p.threads() / (tile_gates * p.batch_chunk));
    p.k_shift = ceil_log2(cap + 1) - 1;  // floor(log2(cap))
    p.k_chunk = 1 << p.k_shift;
  };
  for (int64_t units = 1; units <= hidden; ++units) {
    p.units = static_cast<int>(units);
    p.blocks_per_direction = static_cast<int>((hidden + units - 1) / units);
    p.k_split = 1;
    set_k_chunk();
    const size_t bytes = p.shared_bytes(sizeof(W), sizeof(T), tile_gates);
    TORCH_CHECK(bytes <= limit, op, ": the persistent kernel needs ", bytes,
                " bytes of shared memory per block for H = ", hidden, ", D = ", directions,
                " (", units, " hidden units per block, ", sizeof(W) * 8,
                "-bit weights) but a block may use ", limit,
                "; use backend=\"triton\" for this size");
    if (p.threads() > max_threads) break;
    if (p.blocks() > launch.multiprocessors()) continue;
    for (int split = launch.k_split(); split >= 1; split /= 2) {
      p.k_split = split;
      set_k_chunk();
      if (p.threads() > max_threads || p.k_chunk < split) continue;
      const size_t split_bytes = p.shared_bytes(sizeof(W), sizeof(T), tile_gates);
      if (split_bytes <= limit &&
          p.blocks() <= launch.max_blocks(kernel, p.threads(), split_bytes)) {
        return p;
      }
    }
  }
  TORCH_CHECK(false, op, ": no split of H = ", hidden, " over D = ", directions,
              " directions keeps every block of the persistent kernel resident, one per SM, "
              "with at most ", max_threads,
              " threads per block; use backend=\"triton\" for this size");
  return p;
}

// The tensor-core loops' split, for units per block among H itself (if its 3H forward columns fit
// the accumulators), 32 and 16 (the backward's columns are `units`, rounded up to 16): blocks at
// most one per SM, all resident, U's slice, the warps' sums and a ring of at least 2 staging
// buffers (1 for a single round) in shared memory; with as many buffers as fit, up to the rounds
// of a step. The largest `units` whose ring holds a step's whole factor (fewer blocks reading
// each step's factor, less L2 traffic, and no wait on L2 latency per round), else the split with
// the most rounds in flight (then the most units). Then as many batch groups as the SMs allow
// (less staged per block). B = 32, H = 1024 on an H100: 16 units; 32 would leave no room for
// the backward's ring of its 6 rounds (192 KiB of U).
template <typename W, class Launch, class Kernel>
MmaPartition plan_mma(const Launch& launch, Kernel kernel, int64_t steps, int64_t rows,
                      int64_t hidden, int64_t directions, bool forward, const char* op) {
  TORCH_CHECK(launch.tensor_cores(), op, ": bf16/fp16 weights (autocast) run on the tensor "
              "cores, which need compute capability 8.0 or newer; use backend=\"triton\"");
  MmaPartition p{steps, rows / directions, hidden, directions};
  p.warps = launch.warps();
  p.warp_threads = launch.warp_size();
  p.k_round = launch.k_round();
  TORCH_CHECK(p.k_round >= 16 && p.k_round % 16 == 0, op,
              ": the launch's k_round must be a positive multiple of 16");
  std::vector<int64_t> candidates;
  if (3 * hidden <= 16 * kMaxTiles) candidates.push_back(hidden);
  for (int64_t units : {32, 16}) {
    if (units < hidden && 3 * units <= 16 * kMaxTiles) candidates.push_back(units);
  }
  const int sms = launch.multiprocessors();
  std::optional<MmaPartition> best;
  size_t smallest = 0;
  for (const int64_t units : candidates) {
    p.units = static_cast<int>(units);
    p.blocks_per_direction = static_cast<int>((hidden + units - 1) / units);
    p.inner = static_cast<int>(forward ? hidden : 3 * hidden);
    p.columns = static_cast<int>(forward ? 3 * units : units);
    p.batch_groups = 1;
    p.group_rows = static_cast<int>(p.batch);
    const int64_t slices = directions * p.blocks_per_direction;
    const int fewest = std::min(2, p.rounds());
    p.stages = fewest;
    smallest = p.shared_bytes(sizeof(W));
    if (slices > sms) continue;
    int64_t resident = 0;
    for (p.stages = std::min(p.rounds(), kMaxStages); p.stages >= fewest; --p.stages) {
      const size_t bytes = p.shared_bytes(sizeof(W));
      if (bytes > launch.max_shared_bytes()) continue;
      resident = std::min<int64_t>(sms, launch.max_blocks(kernel, p.threads(), bytes));
      if (slices <= resident) break;
    }
    if (p.stages < fewest) continue;
    const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(p.batch, resident / slices));
    p.group_rows = static_cast<int>((p.batch + groups - 1) / groups);
    p.batch_groups = static_cast<int>((p.batch + p.group_rows - 1) / p.group_rows);
    if (p.stages == p.rounds()) return p;
    if (!best || p.stages > best->stages) best = p;
  }
  TORCH_CHECK(best, op, ": no split of H = ", hidden, " over D = ", directions,
              " directions fits the tensor-core persistent kernel on this device (", sms,
              " SMs, ", launch.max_shared_bytes(), " bytes of shared memory per block; ",
              smallest, " needed with ", candidates.empty() ? 0 : candidates.back(),
              " units per block); use backend=\"triton\" for this size");
  return *best;
}

// fn(W{}) with W the C++ type of the weights: T itself, or bf16/fp16 with T = float (autocast).
template <typename T, typename Fn>
void dispatch_weight(at::ScalarType weight_type, Fn&& fn) {
  if constexpr (std::is_same_v<T, float>) {
    if (weight_type == at::kBFloat16) return fn(at::BFloat16{});
    if (weight_type == at::kHalf) return fn(at::Half{});
  }
  fn(T{});
}

// lengths [D * B] int64 on gi's device, contiguous (rows = gi.size(1)); undefined if absent.
inline at::Tensor checked_lengths(const std::optional<at::Tensor>& lengths, const at::Tensor& gi,
                                  const char* op) {
  if (!lengths || !lengths->defined()) return at::Tensor();
  TORCH_CHECK(lengths->device() == gi.device() && lengths->scalar_type() == at::kLong, op,
              ": lengths must be int64 on gi's device");
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == gi.size(1), op,
              ": lengths must be [D * B] = [", gi.size(1), "], got ", lengths->sizes());
  return lengths->contiguous();
}

inline const int64_t* lengths_ptr(const at::Tensor& lengths) {
  return lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

template <auto make_launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spikgru2plus_fwd(
    const at::Tensor& gi_in, const at::Tensor& weight_hh_in,
    const std::optional<at::Tensor>& bias_hh_in, const at::Tensor& alpha_in,
    const std::optional<at::Tensor>& v0_in, const std::optional<at::Tensor>& i0_in,
    const std::optional<at::Tensor>& s0_in, double v_th, double gamma, bool signed_,
    bool reset_gate, bool spiking, const std::optional<at::Tensor>& lengths_in) {
  constexpr const char* op = "neurokern::spikgru2plus_fwd (CUDA)";
  const auto launch = make_launch(gi_in);
  check_layer(gi_in, weight_hh_in, bias_hh_in, alpha_in,
              {{"v0", &v0_in}, {"i0", &i0_in}, {"s0", &s0_in}}, op);
  const at::Tensor gi = gi_in.stride(2) == 1 ? gi_in : gi_in.contiguous();
  const at::Tensor weight_hh = weight_hh_in.contiguous(), alpha = alpha_in.contiguous();
  const auto bias_hh = contiguous(bias_hh_in), v0 = contiguous(v0_in), i0 = contiguous(i0_in),
             s0 = contiguous(s0_in);
  const int64_t steps = gi.size(0), rows = gi.size(1), hidden = gi.size(2) / 3;
  const int64_t directions = weight_hh.dim() == 3 ? weight_hh.size(0) : 1;
  at::Tensor s_seq = at::empty({steps, rows, hidden}, gi.options());
  at::Tensor v_seq = at::empty_like(s_seq), i_seq = at::empty_like(s_seq);
  at::Tensor gh_seq = at::empty({steps, rows, 3 * hidden}, weight_hh.options());
  const at::Tensor lengths = checked_lengths(lengths_in, gi, op);
  if (steps == 0 || rows == 0 || hidden == 0) return {s_seq, v_seq, i_seq, gh_seq};
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "spikgru2plus_persistent_fwd", [&] {
    using T = scalar_t;
    dispatch_weight<T>(weight_hh.scalar_type(), [&](auto weight_type) {
      using W = decltype(weight_type);
      constexpr bool tensor_cores = !std::is_same_v<T, W>;  // 16-bit U
      using P = std::conditional_t<tensor_cores, MmaPartition, Partition>;
      FwdArgs<T, W, P> args{P{}, gi.data_ptr<T>(), gi.stride(0), gi.stride(1),
                            weight_hh.data_ptr<W>(), optional_ptr<T>(bias_hh),
                            alpha.data_ptr<T>(), optional_ptr<T>(v0), optional_ptr<T>(i0),
                            optional_ptr<T>(s0), s_seq.data_ptr<T>(), v_seq.data_ptr<T>(),
                            i_seq.data_ptr<T>(), gh_seq.data_ptr<W>(), static_cast<T>(v_th),
                            nullptr, 0, lengths_ptr(lengths)};
      at::Tensor s_mm;  // the tensor-core loop's factor: [2, D * B, H rounded up to 8], in W
      if constexpr (tensor_cores) {
        const int64_t row = round_up(hidden, 8);  // 16-byte rows; the padding stays zero
        s_mm = at::zeros({2, rows, row}, weight_hh.options());
        if (s0) s_mm[1].narrow(1, 0, hidden).copy_(*s0);
        args.s_mm = s_mm.data_ptr<W>();
        args.s_mm_row = row;
      }
      dispatch_bools(signed_, spiking, [&](auto is_signed, auto is_spiking) {
        using Act = Activation<T, decltype(is_signed)::value, decltype(is_spiking)::value>;
        const Act act(v_th, gamma);
        auto go = [&](auto kernel) {
          if constexpr (tensor_cores) {
            args.p = plan_mma<W>(launch, kernel, steps, rows, hidden, directions, true, op);
            launch.run(kernel, args.p, args.p.shared_bytes(sizeof(W)), args, act);
          } else {
            args.p = plan<T, W>(launch, kernel, steps, rows, hidden, directions, 1, op);
            launch.run(kernel, args.p, args.p.shared_bytes(sizeof(W), sizeof(T), 1), args, act);
          }
        };
        if constexpr (tensor_cores) {
          if (reset_gate) {
            go(spikgru2plus_persistent_mma_fwd_kernel<W, true, Act>);
          } else {
            go(spikgru2plus_persistent_mma_fwd_kernel<W, false, Act>);
          }
        } else if (reset_gate) {
          go(spikgru2plus_persistent_fwd_kernel<T, W, true, Act>);
        } else {
          go(spikgru2plus_persistent_fwd_kernel<T, W, false, Act>);
        }
      });
    });
  });
  return {s_seq, v_seq, i_seq, gh_seq};
}

template <auto make_launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
spikgru2plus_bwd(const at::Tensor& grad_s_in,
                 const std::optional<at::Tensor>& grad_v_last,
                 const std::optional<at::Tensor>& grad_i_last,
                 const std::optional<at::Tensor>& grad_s_last, const at::Tensor& gi_in,
                 const at::Tensor& weight_hh_in, const std::optional<at::Tensor>& bias_hh_in,
                 const at::Tensor& alpha_in, const at::Tensor& s_seq, const at::Tensor& v_seq_in,
                 const at::Tensor& i_seq_in, const at::Tensor& gh_seq_in,
                 const std::optional<at::Tensor>& v0_in,
                 const std::optional<at::Tensor>& i0_in, const std::optional<at::Tensor>& s0,
                 double v_th, double gamma, bool signed_, bool reset_gate,
                 const std::optional<at::Tensor>& lengths_in) {
  constexpr const char* op = "neurokern::spikgru2plus_bwd (CUDA)";
  const auto launch = make_launch(gi_in);
  check_layer(gi_in, weight_hh_in, bias_hh_in, alpha_in,
              {{"v0", &v0_in}, {"i0", &i0_in}, {"s0", &s0}, {"grad_v_last", &grad_v_last},
               {"grad_i_last", &grad_i_last}, {"grad_s_last", &grad_s_last}},
              op);
  const int64_t steps = gi_in.size(0), rows = gi_in.size(1), hidden = gi_in.size(2) / 3;
  const int64_t directions = weight_hh_in.dim() == 3 ? weight_hh_in.size(0) : 1;
  const int64_t batch = rows / directions;
  TORCH_CHECK(steps >= 1, op, ": gi has no time steps");
  for (const auto& [name, t] : {std::pair{"grad_s", &grad_s_in}, std::pair{"s_seq", &s_seq},
                                std::pair{"v_seq", &v_seq_in}, std::pair{"i_seq", &i_seq_in}}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({steps, rows, hidden}), op, ": ", name,
                " must be [T, D * B, H] = ", at::IntArrayRef({steps, rows, hidden}), ", got ",
                t->sizes());
    TORCH_CHECK(t->device() == gi_in.device() && t->scalar_type() == gi_in.scalar_type(), op,
                ": ", name, " must be on gi's device in gi's dtype");
  }
  TORCH_CHECK(gh_seq_in.sizes() == at::IntArrayRef({steps, rows, 3 * hidden}), op,
              ": gh_seq must be [T, D * B, 3H] = ", at::IntArrayRef({steps, rows, 3 * hidden}),
              ", got ", gh_seq_in.sizes());
  TORCH_CHECK(gh_seq_in.device() == gi_in.device() &&
                  gh_seq_in.scalar_type() == weight_hh_in.scalar_type(),
              op, ": gh_seq must be on gi's device in weight_hh's dtype");
  const at::Tensor gi = gi_in.stride(2) == 1 ? gi_in : gi_in.contiguous();
  const at::Tensor grad_s = grad_s_in.stride(2) == 1 ? grad_s_in : grad_s_in.contiguous();
  const at::Tensor weight_hh = weight_hh_in.contiguous().view({directions, 3 * hidden, hidden});
  const at::Tensor gh_seq = gh_seq_in.contiguous();
  const auto bias_hh = contiguous(bias_hh_in);
  const at::Tensor alpha = alpha_in.contiguous(), v_seq = v_seq_in.contiguous(),
                   i_seq = i_seq_in.contiguous();
  const auto v0 = contiguous(v0_in), i0 = contiguous(i0_in);
  const at::Tensor lengths = checked_lengths(lengths_in, gi, op);
  auto zeros = [&] { return at::zeros({rows, hidden}, gi.options()); };
  auto state_or_zeros = [&](const std::optional<at::Tensor>& t) {
    return t ? t->reshape({rows, hidden})
                   .to(gi.options(), false, true, at::MemoryFormat::Contiguous)
             : zeros();
  };
  // S_prev = [s_0, s_1 .. s_{T-1}], the right factor of dU after the loop (in weight_hh's
  // dtype, as on the Triton backend)
  at::Tensor s_prev = at::cat({state_or_zeros(s0).unsqueeze(0), s_seq.narrow(0, 0, steps - 1)});
  at::Tensor s_dirs = s_prev.view({steps, directions, batch, hidden}).to(weight_hh.scalar_type());
  at::Tensor dgi = at::empty({steps, rows, 3 * hidden}, gi.options());
  // the products' dtype; with 16-bit U (the tensor-core loop, 16-byte copies) rows of 3H
  // rounded up to 8 values, the padding zero
  const int64_t dgh_row =
      weight_hh.scalar_type() != gi.scalar_type() ? round_up(3 * hidden, 8) : 3 * hidden;
  at::Tensor dgh_rows = dgh_row == 3 * hidden
                            ? at::empty({steps, rows, dgh_row}, weight_hh.options())
                            : at::zeros({steps, rows, dgh_row}, weight_hh.options());
  at::Tensor dgh = dgh_rows.narrow(2, 0, 3 * hidden);
  at::Tensor ds = grad_s[steps - 1].clone();
  if (grad_s_last) ds += grad_s_last->reshape({rows, hidden});
  at::Tensor dv = state_or_zeros(grad_v_last), di = state_or_zeros(grad_i_last);
  at::Tensor dalpha = zeros();
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "spikgru2plus_persistent_bwd", [&] {
    using T = scalar_t;
    dispatch_weight<T>(weight_hh.scalar_type(), [&](auto weight_type) {
      using W = decltype(weight_type);
      constexpr bool tensor_cores = !std::is_same_v<T, W>;
      using P = std::conditional_t<tensor_cores, MmaPartition, Partition>;
      BwdArgs<T, W, P> args{P{}, grad_s.data_ptr<T>(), grad_s.stride(0), grad_s.stride(1),
                            gi.data_ptr<T>(), gi.stride(0), gi.stride(1), gh_seq.data_ptr<W>(),
                            weight_hh.data_ptr<W>(), optional_ptr<T>(bias_hh),
                            alpha.data_ptr<T>(), optional_ptr<T>(v0), optional_ptr<T>(i0),
                            v_seq.data_ptr<T>(), i_seq.data_ptr<T>(), ds.data_ptr<T>(),
                            dv.data_ptr<T>(), di.data_ptr<T>(), dgi.data_ptr<T>(),
                            dgh_rows.data_ptr<W>(), dalpha.data_ptr<T>(), static_cast<T>(v_th),
                            dgh_row, lengths_ptr(lengths)};
      auto go = [&](auto kernel, const auto& surrogate) {
        if constexpr (tensor_cores) {
          args.p = plan_mma<W>(launch, kernel, steps, rows, hidden, directions, false, op);
          launch.run(kernel, args.p, args.p.shared_bytes(sizeof(W)), args, surrogate);
        } else {
          args.p = plan<T, W>(launch, kernel, steps, rows, hidden, directions, 3, op);
          launch.run(kernel, args.p, args.p.shared_bytes(sizeof(W), sizeof(T), 3), args,
                     surrogate);
        }
      };
      dispatch_bools(signed_, reset_gate, [&](auto is_signed, auto has_reset) {
        using Surr = Surrogate<T, decltype(is_signed)::value>;
        constexpr bool reset = decltype(has_reset)::value;
        if constexpr (tensor_cores) {
          go(spikgru2plus_persistent_mma_bwd_kernel<W, reset, Surr>, Surr(v_th, gamma));
        } else {
          go(spikgru2plus_persistent_bwd_kernel<T, W, reset, Surr>, Surr(v_th, gamma));
        }
      });
    });
  });
  // all steps at once, per direction: dU = dgh^T S_prev, db_hh and dalpha summed over T and B
  at::Tensor dgh4 = dgh.view({steps, directions, batch, 3 * hidden});
  at::Tensor dweight_hh = at::einsum("tdbg,tdbh->dgh", {dgh4, s_dirs}).to(gi.scalar_type());
  at::Tensor dbias_hh = dgh4.sum(at::IntArrayRef{0, 2}, false, gi.scalar_type());
  at::Tensor dalpha_d = dalpha.view({directions, batch, hidden}).sum(1);
  if (weight_hh_in.dim() == 2) {
    dweight_hh = dweight_hh[0];
    dbias_hh = dbias_hh[0];
    dalpha_d = dalpha_d[0];
  }
  return {dgi, dweight_hh, dbias_hh, dalpha_d.reshape(alpha_in.sizes()), dv, di, ds};
}

}  // namespace neurokern::persistent
