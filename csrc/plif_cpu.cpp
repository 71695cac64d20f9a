// CPU kernels of the multi-step PLIF neuron (SPEC.md 2): neurokern::plif_fwd and plif_bwd.
//
// Work split: x is viewed as [T, B, M] with M = C * prod(S) neurons per batch row (all B * M
// neurons as one row when the batch rows lie back to back, see Chunking). Each row is cut into
// chunks of at most kMaxChunk neurons; at::parallel_for runs over the (row, chunk) pairs, and
// each task carries its chunk's state through all T steps in small local buffers, so the state
// never leaves the cache.
//
// Checkpoints: the forward saves the membrane only at the end of every chunk of k steps
// (v_saved [ceil(T/k), N]; k = 1 every step, the neurokern default is one chunk per sequence,
// see neurokern/plif_ops.py). With k > 1 the backward recomputes each time chunk's membranes
// from x and the checkpoint before it into a per-task buffer of [min(k, T) + 1, chunk] values
// that stays in L2 (its neuron chunk is shortened to fit, kBwdBufferBytes), with the forward's
// own step function, so they round identically; then it runs the reverse pass over them. That
// saves the [T, N] membrane tensor: its write in the forward (fresh pages) and its read in the
// backward, which reads x instead. The time loops prefetch the rows kPrefetchSteps ahead.
//
// Stores: outputs of 4 MiB or more (s, dx) do not fit in the caches; each step's row is computed
// into the task's buffer and written out with non-temporal stores (stream_row), which skip the
// read of every written line that a plain store costs (forward: 3 -> 2 tensor passes). Measured
// on the 2-core VM, [T=90, B=4, C=64, 11, 11] fp32: forward 1.3 -> 0.75 ms.
//
// Vectorisation: the innermost loop runs over the chunk's contiguous neuron index, without
// branches (spikes are comparisons producing 0/1), and vectorises; on x86-64 it is
// compiled for both SSE2 and AVX2 and the AVX2 copy runs where the CPU has it. Arithmetic follows
// neurokern.reference's operation order in the compute dtype (float32 for float16/bfloat16
// inputs), without fused multiply-adds, so float64 and float32 spikes and membranes equal the
// reference's bit for bit in spiking mode.
//
// Layouts: the time and batch dims may have any strides (a transposed [B, T] <-> [T, B] view is
// read in place). The trailing dims (C, *S) must form one contiguous run, as they do for both
// layouts of SPEC.md 2 and for any transpose of the first two dims; otherwise (channels-last,
// spatial slices) the input is first copied with .contiguous().
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "activations.h"
#include "cpu_isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

using neurokern::use_avx2;

using neurokern::Activation;
using neurokern::dispatch_bools;
using neurokern::Surrogate;


// Neurons per task: the task's buffers (a few arrays of this length) stay in L1/L2.
constexpr int64_t kMaxChunk = 1024;
// Fewer neurons per task than this is not worth a task of its own.
constexpr int64_t kMinChunk = 64;
// Bytes of the backward's per-task buffer of recomputed membranes ([min(k, T) + 1, chunk]): the
// neuron chunk is shortened so that it fits in L2 beside the streams of x, dL/ds and dx.
constexpr int64_t kBwdBufferBytes = 256 * 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of v_saved for T steps and checkpoint interval k >= 1: ceil(T / k), without overflow
// for a huge k (k = 1 << 30 or more means one chunk per sequence).
int64_t saved_rows(int64_t T, int64_t k) { return T == 0 ? 0 : (T - 1) / k + 1; }

// The [T, B, M] view of a [T, B, C, *S] (or [B, T, C, *S]) tensor: strides of time and batch,
// in elements; the M = C * prod(S) neurons of one (t, b) are contiguous.
struct SeqView {
  int64_t stride_t;
  int64_t stride_b;
};

SeqView seq_view(const at::Tensor& t, bool batch_first) {
  return {t.stride(batch_first ? 1 : 0), t.stride(batch_first ? 0 : 1)};
}

// Whether dims 2.. of t (C, *S) form one run of stride 1, so that they index as one flat M.
bool neurons_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// t itself if its neuron dims are one contiguous run, else a contiguous copy (see the header).
at::Tensor with_contiguous_neurons(const at::Tensor& t) {
  return neurons_contiguous(t) ? t : t.contiguous();
}

// Shape of one step's state, [B, C, *S], from a sequence shaped [T, B, C, *S] or [B, T, C, *S].
std::vector<int64_t> state_shape(const at::Tensor& seq, bool batch_first) {
  std::vector<int64_t> shape(seq.sizes().begin(), seq.sizes().end());
  shape.erase(shape.begin() + (batch_first ? 1 : 0));
  return shape;
}

// How the N = B * M neurons are cut into tasks (see the header). They are taken as `rows` runs
// of `row_len` neurons that are contiguous in every [T, B, M] view involved: one run per batch
// row, or a single run of all N neurons when the batch rows lie back to back in all the views
// (time-major contiguous tensors), which keeps the vector loops long when M is small.
struct Chunking {
  int64_t rows;
  int64_t row_len;
  int64_t chunk;    // neurons per task (the last task of a row may have fewer)
  int64_t per_row;  // tasks per row
};

Chunking make_chunking(int64_t B, int64_t M, std::initializer_list<SeqView> views,
                       int64_t max_chunk = kMaxChunk) {
  bool merge = B > 1;
  for (const SeqView& view : views) merge = merge && view.stride_b == M;
  const int64_t rows = merge ? 1 : B;
  const int64_t row_len = merge ? B * M : M;
  if (row_len == 0) return {rows, row_len, 1, 0};
  // Enough tasks to balance the threads (4 per thread), none longer than max_chunk, none
  // shorter than kMinChunk unless the row itself is.
  const int64_t wanted = ceil_div(4 * at::get_num_threads(), std::max<int64_t>(rows, 1));
  const int64_t per_row = std::max(ceil_div(row_len, max_chunk),
                                   std::min(wanted, ceil_div(row_len, kMinChunk)));
  // A multiple of 16 neurons, so that tasks start on the same vector alignment as their row.
  const int64_t chunk = std::min(ceil_div(ceil_div(row_len, per_row), 16) * 16, row_len);
  return {rows, row_len, chunk, ceil_div(row_len, chunk)};
}

// One task's neurons: positions [m0, m0 + L) of run `row`, neuron indices n0 .. n0 + L - 1.
struct TaskSpan {
  int64_t row, m0, L, n0;
};

NEUROKERN_INLINE TaskSpan task_span(const Chunking& ch, int64_t task) {
  const int64_t row = task / ch.per_row;
  const int64_t m0 = (task % ch.per_row) * ch.chunk;
  return {row, m0, std::min(ch.chunk, ch.row_len - m0), row * ch.row_len + m0};
}

void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

// The sequence an op is called with (x forward, grad_s backward), checked: its neuron dims made
// contiguous, its sizes and the compute dtype.
struct Sequence {
  at::Tensor t;                  // [T, B, C, *S] or [B, T, C, *S], neurons contiguous
  int64_t T, C, N;               // steps, channels, neurons per step
  std::vector<int64_t> st_shape;  // one step's state, [B, C, *S]
  at::ScalarType opmath;         // the compute dtype
};

Sequence checked_sequence(const at::Tensor& t_in, const char* op, const char* name,
                          bool batch_first, bool spiking, double gamma) {
  check_cpu_float(t_in, op, name);
  TORCH_CHECK(t_in.dim() >= 3, op, ": ", name, " must have rank >= 3 ([T, B, C, *S], or "
              "[B, T, C, *S] with batch_first), got shape ", t_in.sizes());
  TORCH_CHECK(spiking || gamma > 0, op, ": smooth mode needs gamma > 0, got ", gamma);
  Sequence seq{with_contiguous_neurons(t_in)};
  seq.T = seq.t.size(batch_first ? 1 : 0);
  seq.C = seq.t.size(2);
  seq.st_shape = state_shape(seq.t, batch_first);
  seq.N = c10::multiply_integers(seq.st_shape);
  seq.opmath = at::toOpMathType(t_in.scalar_type());
  return seq;
}

// alpha: [C] or 0-d, any floating dtype (converted to the compute dtype, as the reference does).
at::Tensor checked_alpha(const at::Tensor& alpha, int64_t C, at::ScalarType opmath,
                         const char* op) {
  check_cpu_float(alpha, op, "alpha");
  TORCH_CHECK(alpha.dim() == 0 || (alpha.dim() == 1 && alpha.size(0) == C), op,
              ": alpha must be a [C] tensor with C = ", C, " (dim 2 of the input) or a 0-d "
              "tensor, got shape ", alpha.sizes());
  return alpha.to(opmath).contiguous();
}

// An optional [B, C, *S] state or gradient: checked, and converted to a contiguous tensor in
// the compute dtype (one O(N) copy at most, negligible beside the O(T N) time loop).
std::optional<at::Tensor> checked_state(const std::optional<at::Tensor>& t,
                                        at::IntArrayRef shape, at::ScalarType opmath,
                                        const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  check_cpu_float(*t, op, name);
  TORCH_CHECK(t->sizes() == shape, op, ": ", name, " must have the shape [B, C, *S] = ", shape,
              ", got ", t->sizes());
  return t->to(opmath).contiguous();
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// Steps ahead whose rows the time loops prefetch: a task's row of one step is a short run (a
// few KB) at a new address every step, too short for the hardware prefetchers to catch on.
constexpr int64_t kPrefetchSteps = 4;

// Asks for the cache lines of row[0, L) (for writing if WRITE), without waiting for them.
template <bool WRITE = false, typename T>
NEUROKERN_INLINE void prefetch_row(const T* row, int64_t L) {
#if defined(__GNUC__) || defined(__clang__)
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  int64_t j = 0;
  // four lines per iteration: a loop of one prefetch was mostly the loop's own instructions
  for (; j + 3 * kLine < L; j += 4 * kLine) {
    __builtin_prefetch(row + j, WRITE ? 1 : 0);
    __builtin_prefetch(row + j + kLine, WRITE ? 1 : 0);
    __builtin_prefetch(row + j + 2 * kLine, WRITE ? 1 : 0);
    __builtin_prefetch(row + j + 3 * kLine, WRITE ? 1 : 0);
  }
  for (; j < L; j += kLine) __builtin_prefetch(row + j, WRITE ? 1 : 0);
#else
  (void)row;
  (void)L;
#endif
}

// Outputs of at least this many bytes are written with non-temporal stores (see stream_row): they
// do not fit in the caches anyway, and a normal store first reads each line it writes (a third
// of the traffic of a step that reads one tensor and writes one).
constexpr int64_t kStreamBytes = 4 << 20;

// Whether an output tensor of `bytes` goes out with non-temporal stores.
bool stream_output(int64_t bytes) { return bytes >= kStreamBytes; }

// dst[0, L) = src[0, L): src is a row computed in the task's buffer (in L1), dst its place in
// the output, written with non-temporal stores (SSE2, 16-byte aligned; the unaligned head and
// tail with plain stores). The task function ends with stream_fence().
template <typename T>
NEUROKERN_INLINE void stream_row(T* __restrict__ dst, const T* __restrict__ src, int64_t L) {
  const int64_t n = L * int64_t(sizeof(T));
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
#if defined(__SSE2__)
  const int64_t head = std::min<int64_t>(n, (16 - int64_t(reinterpret_cast<std::uintptr_t>(d) & 15)) & 15);
  std::memcpy(d, s, head);
  int64_t i = head;
  // a cache line (64 bytes) per iteration: the loop's own instructions were half of the copy's
  for (; i + 64 <= n; i += 64) {
    const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i v2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i v3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), v0);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), v1);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), v2);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), v3);
  }
  for (; i + 16 <= n; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
  std::memcpy(d + i, s + i, n - i);
#else
  std::memcpy(d, s, n);
#endif
}

// Orders this thread's non-temporal stores before whatever follows (the end of the parallel
// region).
NEUROKERN_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// a[j] = leak of neuron n0 + j (alpha[(n / P) % C], or the scalar alpha), j < L.
template <typename opmath_t>
NEUROKERN_INLINE void fill_leak(opmath_t* a, const opmath_t* alpha, bool scalar_alpha,
                                int64_t n0, int64_t L, int64_t C, int64_t P) {
  if (scalar_alpha) {
    std::fill(a, a + L, alpha[0]);
    return;
  }
  int64_t c = (n0 / P) % C;
  int64_t i = n0 % P;  // position within channel c
  for (int64_t j = 0; j < L;) {
    const int64_t run = std::min(L - j, P - i);
    std::fill(a + j, a + j + run, alpha[c]);
    j += run;
    i = 0;
    c = c + 1 == C ? 0 : c + 1;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Pointers and sizes of one plif_fwd call; the neuron index n = b * M + m is row-major in
// [B, C, *S], so neuron n has channel (n / P) % C. spike_t: the spikes' element type, x's or
// (spike_dtype, for float16/bfloat16 x) the compute dtype.
template <typename scalar_t, typename opmath_t, typename spike_t>
struct PlifFwdParams {
  const scalar_t* x;       // [T, B, M] view: x + t * x_view.stride_t + b * x_view.stride_b + m
  SeqView x_view;
  const opmath_t* alpha;   // [C], or [1] if scalar_alpha
  bool scalar_alpha;
  const opmath_t* v0;      // [N] or null (zeros)
  const opmath_t* s0;      // [N] or null (zeros)
  spike_t* s;              // [T, B, M] view like x, contiguous in x's logical layout
  SeqView s_view;
  opmath_t* v_saved;       // [ceil(T / k), N], or null with checkpoint = 0
  int64_t k;               // checkpoint interval (>= 1 when v_saved is set)
  scalar_t* v_last;        // [N]
  scalar_t* s_last;        // [N]
  bool stream;             // s written with non-temporal stores (stream_row)
  int64_t T, N, C, P;      // P = prod(S), neurons per channel
  opmath_t v_th;
  Chunking chunking;
};

// One time step for L neurons: v_out = a v_in + x - v_th s; s = act(v_out); the spikes also go
// to `out`. The forward and the backward's recomputation both call this very function (same
// template arguments), so the recomputed membranes equal the forward's bit for bit. v_in and
// v_out are distinct buffers: the recomputation writes each step's membranes straight into its
// own row, and the forward alternates between two.
template <typename scalar_t, typename opmath_t, typename Act, typename spike_t>
NEUROKERN_INLINE void plif_fwd_step(int64_t L, const scalar_t* __restrict__ x,
                                    const opmath_t* __restrict__ a,
                                    const opmath_t* __restrict__ v_in,
                                    opmath_t* __restrict__ v_out, opmath_t* __restrict__ s,
                                    spike_t* __restrict__ out, opmath_t v_th, const Act& act) {
  for (int64_t j = 0; j < L; ++j) {
    // Same order as the reference: (alpha * v + x_t) - v_th * s.
    const opmath_t vj = a[j] * v_in[j] + static_cast<opmath_t>(x[j]) - v_th * s[j];
    const opmath_t sj = act(vj);
    v_out[j] = vj;
    s[j] = sj;
    out[j] = static_cast<spike_t>(sj);
  }
}

// The paper's step (plif_fwd_step with act) as the time loops of plif_fwd_tasks call a step.
template <typename opmath_t, typename Act>
struct PaperStep {
  static constexpr int64_t kCoeffRows = 0;  // per-neuron coefficients besides the leak
  const Act& act;

  NEUROKERN_INLINE void coefficients(const opmath_t*, opmath_t*, int64_t) const {}

  template <typename scalar_t, typename spike_t>
  NEUROKERN_INLINE void operator()(int64_t L, const scalar_t* x, const opmath_t* a,
                                   const opmath_t*, const opmath_t* v_in, opmath_t* v_out,
                                   opmath_t* s, spike_t* out, opmath_t v_th) const {
    plif_fwd_step<scalar_t, opmath_t, Act, spike_t>(L, x, a, v_in, v_out, s, out, v_th, act);
  }
};

// The generalised neuron (docs/neurons.md), written for the kernels with two per-neuron
// coefficients beside the leak a = alpha_c: b = (1 - a) v_rest and c = 1 - a (decay_input) or 1,
// and the reset map in one branch-free form, R(h, s) = h (1 - k s) + r s with (k, r) = (0, -v_th)
// soft, (1, v_reset) hard, (0, 0) none, which rounds exactly as the reference's three forms
// (1 - 0 s = 1, h + (-v_th) s = h - v_th s, 0 s = 0). One step:
//   BEFORE = false (the paper's order, carried v = h):  h = R(a h + b + c x, s); s = fire(h)
//   BEFORE = true (SpikingJelly's, carried v = u):      h = a u + b + c x; s = fire(h);
//                                                       u = R(h, s)
// in the reference's operation order ((a v + b) + c x), so float64 spikes are exact.
template <typename opmath_t>
struct NeuronCoefficients {
  opmath_t reset_k, reset_r;  // R(h, s) = h (1 - reset_k s) + reset_r s
  opmath_t grad_k, grad_r;    // the same in dR/ds = grad_r - grad_k h: zero with detach_reset
  opmath_t v_rest;            // v_reset for a hard reset, else 0
  opmath_t decay;             // 1 with decay_input, else 0 (dc/dalpha = -decay)
  bool decay_input;
};

template <typename opmath_t, typename FireT, bool BEFORE>
struct GeneralStep {
  static constexpr int64_t kCoeffRows = 2;
  const FireT& fire;
  NeuronCoefficients<opmath_t> k;

  // coeffs [2, L] = (b, c) of the L neurons with leaks a.
  NEUROKERN_INLINE void coefficients(const opmath_t* a, opmath_t* coeffs, int64_t L) const {
    for (int64_t j = 0; j < L; ++j) {
      coeffs[j] = (opmath_t(1) - a[j]) * k.v_rest;
      coeffs[L + j] = k.decay_input ? opmath_t(1) - a[j] : opmath_t(1);
    }
  }

  // The step's input h = a v + b + c x (in the reference's order) and the reset map R(h, s).
  NEUROKERN_INLINE static opmath_t pre(opmath_t a, opmath_t v, opmath_t b, opmath_t c,
                                       opmath_t x) {
    return a * v + b + c * x;
  }
  NEUROKERN_INLINE static opmath_t reset(opmath_t h, opmath_t s, opmath_t reset_k,
                                         opmath_t reset_r) {
    return h * (opmath_t(1) - reset_k * s) + reset_r * s;
  }

  template <typename scalar_t, typename spike_t>
  NEUROKERN_INLINE void operator()(int64_t L, const scalar_t* __restrict__ x,
                                   const opmath_t* __restrict__ a,
                                   const opmath_t* __restrict__ coeffs,
                                   const opmath_t* __restrict__ v_in,
                                   opmath_t* __restrict__ v_out, opmath_t* __restrict__ s,
                                   spike_t* __restrict__ out, opmath_t) const {
    const opmath_t* __restrict__ b = coeffs;
    const opmath_t* __restrict__ c = coeffs + L;
    const opmath_t reset_k = k.reset_k, reset_r = k.reset_r;
    const FireT f = fire;  // a local copy: its thresholds stay in registers
    if constexpr (BEFORE) {
      // one pass: under -fno-trapping-math (_toolchain.CXX_FLAGS) GCC vectorises a spike
      // computed and multiplied in one loop
      for (int64_t j = 0; j < L; ++j) {
        const opmath_t h = pre(a[j], v_in[j], b[j], c[j], static_cast<opmath_t>(x[j]));
        const opmath_t sj = f(h);
        v_out[j] = reset(h, sj, reset_k, reset_r);
        s[j] = sj;
        out[j] = static_cast<spike_t>(sj);
      }
    } else {
      for (int64_t j = 0; j < L; ++j) {
        const opmath_t h = pre(a[j], v_in[j], b[j], c[j], static_cast<opmath_t>(x[j]));
        const opmath_t vj = reset(h, s[j], reset_k, reset_r);
        const opmath_t sj = f(vj);
        v_out[j] = vj;
        s[j] = sj;
        out[j] = static_cast<spike_t>(sj);
      }
    }
  }

  // BEFORE only, for the backward: operator()'s step (the same expressions, so the same
  // values) keeping the step's h (h_out) and spikes (s) in rows of their own, and writing no
  // spikes out; u (v_out) only if v_out is not null.
  template <typename scalar_t>
  NEUROKERN_INLINE void recompute(int64_t L, const scalar_t* __restrict__ x,
                                  const opmath_t* __restrict__ a,
                                  const opmath_t* __restrict__ coeffs,
                                  const opmath_t* __restrict__ v_in, opmath_t* __restrict__ v_out,
                                  opmath_t* __restrict__ h_out, opmath_t* __restrict__ s) const {
    static_assert(BEFORE, "the paper's order recomputes with operator()");
    const opmath_t* __restrict__ b = coeffs;
    const opmath_t* __restrict__ c = coeffs + L;
    const opmath_t reset_k = k.reset_k, reset_r = k.reset_r;
    const FireT f = fire;
    if (v_out) {
      for (int64_t j = 0; j < L; ++j) {
        const opmath_t h = pre(a[j], v_in[j], b[j], c[j], static_cast<opmath_t>(x[j]));
        const opmath_t sj = f(h);
        h_out[j] = h;
        s[j] = sj;
        v_out[j] = reset(h, sj, reset_k, reset_r);
      }
    } else {
      for (int64_t j = 0; j < L; ++j) {
        const opmath_t h = pre(a[j], v_in[j], b[j], c[j], static_cast<opmath_t>(x[j]));
        h_out[j] = h;
        s[j] = f(h);
      }
    }
  }
};

// Runs tasks [begin, end): each carries one chunk of neurons through all T steps.
// buffer: (4 + Step::kCoeffRows) * chunking.chunk elements; s_row: chunking.chunk elements
// (with p.stream).
template <typename scalar_t, typename opmath_t, typename spike_t, typename Step>
NEUROKERN_INLINE void plif_fwd_tasks(const PlifFwdParams<scalar_t, opmath_t, spike_t>& p,
                                     const Step& step, int64_t begin, int64_t end,
                                     opmath_t* buffer, spike_t* s_row) {
  const Chunking& ch = p.chunking;
  opmath_t* sp = buffer;                  // [chunk] last spikes
  opmath_t* a = sp + ch.chunk;            // [chunk] leak of each neuron
  opmath_t* coeffs = a + ch.chunk;        // [Step::kCoeffRows, chunk] the step's coefficients
  opmath_t* v_buffers = coeffs + Step::kCoeffRows * ch.chunk;  // [2, chunk] v before and after
  for (int64_t task = begin; task < end; ++task) {
    const TaskSpan span = task_span(ch, task);
    const int64_t row = span.row, m0 = span.m0, L = span.L, n0 = span.n0;
    fill_leak(a, p.alpha, p.scalar_alpha, n0, L, p.C, p.P);
    step.coefficients(a, coeffs, L);
    opmath_t* v = v_buffers;             // [L] membrane
    opmath_t* v_next = v_buffers + L;    // [L] the next step's
    for (int64_t j = 0; j < L; ++j) {
      v[j] = p.v0 ? p.v0[n0 + j] : opmath_t(0);
      sp[j] = p.s0 ? p.s0[n0 + j] : opmath_t(0);
    }
    for (int64_t t = 0; t < p.T; ++t) {
      const scalar_t* xt = p.x + t * p.x_view.stride_t + row * p.x_view.stride_b + m0;
      spike_t* st = p.s + t * p.s_view.stride_t + row * p.s_view.stride_b + m0;
      if (t + kPrefetchSteps < p.T) {
        prefetch_row(xt + kPrefetchSteps * p.x_view.stride_t, L);
        if (!p.stream) prefetch_row<true>(st + kPrefetchSteps * p.s_view.stride_t, L);
      }
      step(L, xt, a, coeffs, v, v_next, sp, p.stream ? s_row : st, p.v_th);
      if (p.stream) stream_row(st, s_row, L);
      std::swap(v, v_next);
      // the checkpoint at the end of each chunk of k steps (and after the last step)
      if (p.v_saved && ((t + 1) % p.k == 0 || t == p.T - 1)) {
        std::copy(v, v + L, p.v_saved + (t / p.k) * p.N + n0);
      }
    }
    for (int64_t j = 0; j < L; ++j) {
      p.v_last[n0 + j] = static_cast<scalar_t>(v[j]);
      p.s_last[n0 + j] = static_cast<scalar_t>(sp[j]);
    }
  }
  stream_fence();
}

// The same code compiled twice: for the baseline ISA and for AVX2 (see use_avx2()).
template <typename scalar_t, typename opmath_t, typename spike_t, typename Step>
void plif_fwd_tasks_default(const PlifFwdParams<scalar_t, opmath_t, spike_t>& p,
                            const Step& step, int64_t begin, int64_t end, opmath_t* buffer,
                            spike_t* s_row) {
  plif_fwd_tasks(p, step, begin, end, buffer, s_row);
}

#ifdef NEUROKERN_HAVE_AVX2_TARGET
template <typename scalar_t, typename opmath_t, typename spike_t, typename Step>
__attribute__((target("avx2"))) void plif_fwd_tasks_avx2(
    const PlifFwdParams<scalar_t, opmath_t, spike_t>& p, const Step& step, int64_t begin,
    int64_t end, opmath_t* buffer, spike_t* s_row) {
  plif_fwd_tasks(p, step, begin, end, buffer, s_row);
}
#endif

// Runs the forward's tasks over all threads with `step` (PaperStep or GeneralStep).
template <typename scalar_t, typename opmath_t, typename spike_t, typename Step>
void plif_fwd_run(const PlifFwdParams<scalar_t, opmath_t, spike_t>& p, const Step& step) {
  const bool avx2 = use_avx2();
  at::parallel_for(0, p.chunking.rows * p.chunking.per_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buffer((4 + Step::kCoeffRows) * p.chunking.chunk);
    std::vector<spike_t> s_row(p.stream ? p.chunking.chunk : 0);
#ifdef NEUROKERN_HAVE_AVX2_TARGET
    if (avx2) {
      plif_fwd_tasks_avx2(p, step, begin, end, buffer.data(), s_row.data());
      return;
    }
#endif
    plif_fwd_tasks_default(p, step, begin, end, buffer.data(), s_row.data());
  });
}

// The parameters of a plif_fwd call (everything but the neuron's step).
template <typename scalar_t, typename spike_t>
PlifFwdParams<scalar_t, at::opmath_type<scalar_t>, spike_t> plif_fwd_params(
    const at::Tensor& x, const at::Tensor& alpha, const std::optional<at::Tensor>& v0,
    const std::optional<at::Tensor>& s0, double v_th, bool batch_first, int64_t checkpoint,
    at::Tensor& s, at::Tensor& v_saved, at::Tensor& v_last, at::Tensor& s_last) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(batch_first ? 0 : 1);
  const int64_t C = x.size(2);
  const int64_t M = c10::multiply_integers(x.sizes().slice(2));
  PlifFwdParams<scalar_t, opmath_t, spike_t> p;
  p.x = x.const_data_ptr<scalar_t>();
  p.x_view = seq_view(x, batch_first);
  p.alpha = alpha.const_data_ptr<opmath_t>();
  p.scalar_alpha = alpha.dim() == 0;
  p.v0 = ptr_or_null<opmath_t>(v0);
  p.s0 = ptr_or_null<opmath_t>(s0);
  p.s = s.mutable_data_ptr<spike_t>();
  p.s_view = seq_view(s, batch_first);
  p.v_saved = checkpoint > 0 && v_saved.numel() > 0 ? v_saved.mutable_data_ptr<opmath_t>()
                                                     : nullptr;
  p.k = std::max<int64_t>(checkpoint, 1);
  p.v_last = v_last.mutable_data_ptr<scalar_t>();
  p.s_last = s_last.mutable_data_ptr<scalar_t>();
  p.T = x.size(batch_first ? 1 : 0);
  p.C = C;
  p.P = M / C;
  p.N = B * M;
  p.v_th = static_cast<opmath_t>(v_th);
  p.chunking = make_chunking(B, M, {p.x_view, p.s_view});
  p.stream = stream_output(s.nbytes());
  return p;
}

template <typename scalar_t, typename spike_t, bool SIGNED, bool SPIKING>
void plif_fwd_kernel(const at::Tensor& x,                  // [T, B, C, *S] or [B, T, C, *S]
                     const at::Tensor& alpha,              // [C] or 0-d, compute dtype
                     const std::optional<at::Tensor>& v0,  // [B, C, *S] compute dtype
                     const std::optional<at::Tensor>& s0,  // [B, C, *S] compute dtype
                     double v_th, double gamma, bool batch_first,
                     int64_t checkpoint,    // k >= 1, or 0: nothing saved
                     at::Tensor& s,         // x's shape, contiguous, spike_t
                     at::Tensor& v_saved,   // [ceil(T / k), N], or [0] with checkpoint = 0
                     at::Tensor& v_last,    // [B, C, *S]
                     at::Tensor& s_last) {  // [B, C, *S]
  using opmath_t = at::opmath_type<scalar_t>;
  using Act = Activation<opmath_t, SIGNED, SPIKING>;
  const auto p = plif_fwd_params<scalar_t, spike_t>(x, alpha, v0, s0, v_th, batch_first,
                                                    checkpoint, s, v_saved, v_last, s_last);
  const Act act(v_th, gamma);
  plif_fwd_run(p, PaperStep<opmath_t, Act>{act});
}

// The generalised neuron's options (docs/neurons.md) as the ops receive them.
struct NeuronOptions {
  int reset;  // 0 soft, 1 hard, 2 none
  double v_reset;
  bool before, decay_input, strict, sigmoid;
  double scale;

  // Whether these are the paper's PLIF (the defaults), which keeps its own kernels.
  bool paper() const {
    return reset == 0 && !before && !decay_input && !strict && !sigmoid && scale == 1.0;
  }

  // Whether these are the paper's equations with another threshold test or surrogate scale
  // (snnTorch's Leaky with a subtracted reset): the paper's kernels run them, with Fire and
  // FireSurrogate as the activation and surrogate (with b = 0, c = 1 and R(h, s) = h - v_th s
  // the general step rounds as the paper's: a v + 0 + 1 x = a v + x).
  bool paper_form() const { return reset == 0 && !before && !decay_input && !sigmoid; }

  template <typename opmath_t>
  NeuronCoefficients<opmath_t> coefficients(double v_th, bool detach_reset) const {
    NeuronCoefficients<opmath_t> k;
    k.reset_k = opmath_t(reset == 1 ? 1 : 0);
    k.reset_r = reset == 0 ? -static_cast<opmath_t>(v_th)
                           : reset == 1 ? static_cast<opmath_t>(v_reset) : opmath_t(0);
    k.grad_k = detach_reset ? opmath_t(0) : k.reset_k;
    k.grad_r = detach_reset ? opmath_t(0) : k.reset_r;
    k.v_rest = reset == 1 ? static_cast<opmath_t>(v_reset) : opmath_t(0);
    k.decay = opmath_t(decay_input ? 1 : 0);
    k.decay_input = decay_input;
    return k;
  }
};

NeuronOptions neuron_options(const char* op, c10::string_view reset, double v_reset,
                             bool reset_before_leak, bool decay_input, bool strict_threshold,
                             c10::string_view surrogate, double surrogate_scale,
                             bool is_signed) {
  NeuronOptions o;
  o.reset = reset == "soft" ? 0 : reset == "hard" ? 1 : reset == "none" ? 2 : -1;
  TORCH_CHECK(o.reset >= 0, op, ": reset must be 'soft', 'hard' or 'none', got '", reset, "'");
  TORCH_CHECK(surrogate == "atan" || surrogate == "sigmoid", op,
              ": surrogate must be 'atan' or 'sigmoid', got '", surrogate, "'");
  TORCH_CHECK(std::isfinite(v_reset), op, ": v_reset must be finite, got ", v_reset);
  TORCH_CHECK(surrogate_scale > 0 && std::isfinite(surrogate_scale), op,
              ": surrogate_scale must be positive and finite, got ", surrogate_scale);
  o.v_reset = v_reset;
  o.before = reset_before_leak;
  o.decay_input = decay_input;
  o.strict = strict_threshold;
  o.sigmoid = surrogate == "sigmoid";
  o.scale = surrogate_scale;
  TORCH_CHECK(!(is_signed && (o.reset == 1 || o.sigmoid)), op, ": signed spikes take neither "
              "reset='hard' nor surrogate='sigmoid'");
  return o;
}

// A null T*, which carries the type T into a generic lambda.
template <typename T>
T* tag() {
  return nullptr;
}

// Calls fn(tag<T>()) with T the element type of the spikes (plif_fwd's s) or of their gradient
// (plif_bwd's grad_s): x's scalar_t, or its compute dtype if `compute` (only float16/bfloat16
// differ: float32/float64 compile one kernel).
template <typename scalar_t, typename Fn>
void dispatch_spike_type(bool compute, Fn&& fn) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    fn(tag<scalar_t>());
  } else if (compute) {
    fn(tag<opmath_t>());
  } else {
    fn(tag<scalar_t>());
  }
}

// The spikes' dtype of plif_fwd: x's (spike_dtype None) or the compute dtype.
at::ScalarType checked_spike_dtype(const std::optional<at::ScalarType>& spike_dtype,
                                   at::ScalarType x_dtype, at::ScalarType opmath,
                                   const char* op) {
  if (!spike_dtype.has_value()) return x_dtype;
  TORCH_CHECK(*spike_dtype == x_dtype || *spike_dtype == opmath, op,
              ": spike_dtype must be x's dtype ", x_dtype, " or its compute dtype ", opmath,
              ", got ", *spike_dtype);
  return *spike_dtype;
}

// Calls fn(Fire type, FireSurrogate type, BEFORE) for the options: the forward's fire (the step,
// or the smooth primitive of the surrogate) and its surrogate.
template <typename opmath_t, typename Fn>
void dispatch_neuron(bool is_signed, bool spiking, const NeuronOptions& o, Fn&& fn) {
  auto with_order = [&](auto fire_tag, auto sur_tag) {
    if (o.before) {
      fn(fire_tag, sur_tag, std::true_type{});
    } else {
      fn(fire_tag, sur_tag, std::false_type{});
    }
  };
  using neurokern::Fire;
  using neurokern::FireSurrogate;
  if (is_signed) {
    using Sur = FireSurrogate<opmath_t, true, false>;
    if (spiking) {
      with_order(tag<Fire<opmath_t, true, neurokern::kFireStep>>(), tag<Sur>());
    } else {
      with_order(tag<Fire<opmath_t, true, neurokern::kFireSmoothAtan>>(), tag<Sur>());
    }
  } else if (o.sigmoid) {
    using Sur = FireSurrogate<opmath_t, false, true>;
    if (spiking) {
      with_order(tag<Fire<opmath_t, false, neurokern::kFireStep>>(), tag<Sur>());
    } else {
      with_order(tag<Fire<opmath_t, false, neurokern::kFireSmoothSigmoid>>(), tag<Sur>());
    }
  } else {
    using Sur = FireSurrogate<opmath_t, false, false>;
    if (spiking) {
      with_order(tag<Fire<opmath_t, false, neurokern::kFireStep>>(), tag<Sur>());
    } else {
      with_order(tag<Fire<opmath_t, false, neurokern::kFireSmoothAtan>>(), tag<Sur>());
    }
  }
}

// Whether the paper's kernels run a neuron of these types when NeuronOptions::paper_form():
// the paper's order, spikes by the step and the atan surrogate (smooth mode, for checks, keeps
// the general kernels).
template <typename FireT, typename Sur, bool BEFORE>
constexpr bool kPaperKernels = false;
template <typename T, bool SIGNED>
constexpr bool kPaperKernels<neurokern::Fire<T, SIGNED, neurokern::kFireStep>,
                             neurokern::FireSurrogate<T, SIGNED, false>, false> = true;

// The generalised neuron's forward: plif_fwd_kernel with GeneralStep (or PaperStep, see
// kPaperKernels).
template <typename scalar_t, typename spike_t>
void plif_general_fwd_kernel(const at::Tensor& x, const at::Tensor& alpha,
                             const std::optional<at::Tensor>& v0,
                             const std::optional<at::Tensor>& s0, double v_th, double gamma,
                             bool is_signed, bool batch_first, bool spiking,
                             const NeuronOptions& o, int64_t checkpoint, at::Tensor& s,
                             at::Tensor& v_saved, at::Tensor& v_last, at::Tensor& s_last) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto p = plif_fwd_params<scalar_t, spike_t>(x, alpha, v0, s0, v_th, batch_first,
                                                    checkpoint, s, v_saved, v_last, s_last);
  const auto k = o.coefficients<opmath_t>(v_th, false);
  dispatch_neuron<opmath_t>(is_signed, spiking, o, [&](auto* fire_tag, auto* sur_tag,
                                                       auto before) {
    using FireT = std::remove_pointer_t<decltype(fire_tag)>;
    using Sur = std::remove_pointer_t<decltype(sur_tag)>;
    const FireT fire(v_th, gamma, o.strict, o.scale);
    if constexpr (kPaperKernels<FireT, Sur, decltype(before)::value>) {
      if (o.paper_form()) {
        plif_fwd_run(p, PaperStep<opmath_t, FireT>{fire});
        return;
      }
    }
    plif_fwd_run(p, GeneralStep<opmath_t, FireT, decltype(before)::value>{fire, k});
  });
}

// For t = 0..T-1: v = alpha_c v + x_t - v_th s; s = act(v), from (v0, s0) (zeros if None), with
// the state in the compute dtype. Returns s (x's shape, contiguous, in spike_dtype: x's dtype if
// None, or the compute dtype), v_saved (in the
// compute dtype: [ceil(T / k), N], row j = v after step min((j + 1) k, T) - 1, for
// checkpoint = k >= 1; empty [0] for checkpoint = 0), v_last and s_last ([B, C, *S], x's dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plif_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& alpha_in, const std::optional<at::Tensor>& v0_in,
    const std::optional<at::Tensor>& s0_in, double v_th, double gamma, bool is_signed,
    bool batch_first, bool spiking, int64_t checkpoint, c10::string_view reset, double v_reset,
    bool reset_before_leak, bool decay_input, bool strict_threshold, c10::string_view surrogate,
    double surrogate_scale, std::optional<at::ScalarType> spike_dtype) {
  constexpr const char* op = "neurokern::plif_fwd";
  const NeuronOptions options =
      neuron_options(op, reset, v_reset, reset_before_leak, decay_input, strict_threshold,
                     surrogate, surrogate_scale, is_signed);
  TORCH_CHECK(checkpoint >= 0, op, ": checkpoint must be >= 0 (0: save nothing, k >= 1: the "
              "membrane after every k-th step), got checkpoint = ", checkpoint);
  const auto [x, T, C, N, st_shape, opmath] =
      checked_sequence(x_in, op, "x", batch_first, spiking, gamma);

  const at::Tensor alpha = checked_alpha(alpha_in, C, opmath, op);
  const auto v0 = checked_state(v0_in, st_shape, opmath, op, "v0");
  const auto s0 = checked_state(s0_in, st_shape, opmath, op, "s0");

  const at::ScalarType s_dtype = checked_spike_dtype(spike_dtype, x.scalar_type(), opmath, op);
  at::Tensor s = at::empty(x.sizes(), x.options().dtype(s_dtype));
  // With checkpoint = 0, v_saved is an empty [0] tensor (the shape plif_ops.py's fake gives it).
  at::Tensor v_saved = checkpoint > 0
      ? at::empty({saved_rows(T, checkpoint), N}, x.options().dtype(opmath))
      : at::empty({0}, x.options().dtype(opmath));
  at::Tensor v_last = at::empty(st_shape, x.options());
  at::Tensor s_last = at::empty(st_shape, x.options());
  if (N == 0) return {s, v_saved, v_last, s_last};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "plif_fwd_cpu",
                                  [&] {
    dispatch_spike_type<scalar_t>(s_dtype != x.scalar_type(), [&](auto* spike_tag) {
      using spike_t = std::remove_pointer_t<decltype(spike_tag)>;
      if (!options.paper()) {
        plif_general_fwd_kernel<scalar_t, spike_t>(x, alpha, v0, s0, v_th, gamma, is_signed,
                                                   batch_first, spiking, options, checkpoint, s,
                                                   v_saved, v_last, s_last);
        return;
      }
      dispatch_bools(is_signed, spiking, [&](auto signed_c, auto spiking_c) {
        plif_fwd_kernel<scalar_t, spike_t, decltype(signed_c)::value,
                        decltype(spiking_c)::value>(x, alpha, v0, s0, v_th, gamma, batch_first,
                                                    checkpoint, s, v_saved, v_last, s_last);
      });
    });
  });
  return {s, v_saved, v_last, s_last};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Pointers and sizes of one plif_bwd call (neuron index n = b * M + m as in the forward);
// grad_t: dL/ds's element type, x's or the compute dtype (the forward's spike_t).
template <typename scalar_t, typename opmath_t, typename grad_t>
struct PlifBwdParams {
  const grad_t* grad_s;         // [T, B, M] view
  SeqView g_view;
  const opmath_t* grad_v_last;  // [N] or null (zeros)
  const opmath_t* grad_s_last;  // [N] or null (zeros)
  const scalar_t* x;            // [T, B, M] view, the forward's input (read if k > 1)
  SeqView x_view;
  const opmath_t* v_saved;      // [ceil(T / k), N]
  int64_t k;                    // checkpoint interval
  const opmath_t* alpha;        // [C], or [1] if scalar_alpha
  bool scalar_alpha;
  const opmath_t* v0;           // [N] or null (zeros)
  const opmath_t* s0;           // [N] or null (zeros)
  scalar_t* dx;                 // [T, B, M] view, contiguous in x's logical layout
  SeqView dx_view;
  opmath_t* dalpha;             // [N]
  scalar_t* dv0;                // [N]
  scalar_t* ds0;                // [N]
  bool stream;                  // dx written with non-temporal stores (stream_row)
  bool leak_grad;               // dalpha wanted (its sum is skipped otherwise)
  int64_t T, N, C, P;
  opmath_t v_th, neg_v_th;
  Chunking chunking;
};

// Length of the per-task buffer of plif_bwd_tasks, in opmath_t elements (see there).
int64_t bwd_buffer_len(int64_t chunk, int64_t T, int64_t k) {
  const int64_t recompute = k > 1 ? (std::min(k, T) + 2) * chunk : 0;
  return 4 * chunk + recompute;
}

// The start of a backward task (plif_bwd_tasks and general_bwd_tasks): its neurons, their leaks
// a, the carries into step T-1 (dv from grad_v_last, ds from grad_s_last; zeros if None) and
// dalpha zeroed.
template <typename scalar_t, typename opmath_t, typename grad_t>
NEUROKERN_INLINE TaskSpan bwd_task_start(const PlifBwdParams<scalar_t, opmath_t, grad_t>& p,
                                         int64_t task, opmath_t* a, opmath_t* dv, opmath_t* ds,
                                         opmath_t* dalpha) {
  const TaskSpan span = task_span(p.chunking, task);
  const int64_t n0 = span.n0, L = span.L;
  fill_leak(a, p.alpha, p.scalar_alpha, n0, L, p.C, p.P);
  for (int64_t j = 0; j < L; ++j) {
    dv[j] = p.grad_v_last ? p.grad_v_last[n0 + j] : opmath_t(0);
    ds[j] = p.grad_s_last ? p.grad_s_last[n0 + j] : opmath_t(0);
    dalpha[j] = opmath_t(0);
  }
  return span;
}

// One reverse step for L neurons. dv_next holds dL/dv_{t+1} (all paths), from which the carries
// into step t follow: dL/ds_t += -v_th dv_{t+1} (unless DETACH), dL/dv_t += alpha dv_{t+1}.
// With EXPLICIT_CARRY (the last step, t = T-1) the carries are given instead: ds_carry, and
// dv_next holding the dv carry. On return dv_next holds dL/dv_t. HAS_PREV: v_prev holds v_{t-1}
// (otherwise v_{t-1} = 0, or dalpha is not wanted: dalpha gets nothing).
template <typename scalar_t, typename opmath_t, typename Sur, bool DETACH, bool EXPLICIT_CARRY,
          bool HAS_PREV, typename grad_t>
NEUROKERN_INLINE void plif_bwd_step(int64_t L, const grad_t* __restrict__ grad_s,
                                    const opmath_t* __restrict__ v_t,
                                    const opmath_t* __restrict__ v_prev,
                                    const opmath_t* __restrict__ a,
                                    const opmath_t* __restrict__ ds_carry,
                                    opmath_t* __restrict__ dv_next,
                                    opmath_t* __restrict__ dalpha, scalar_t* __restrict__ dx,
                                    opmath_t neg_v_th, const Sur& sur) {
  for (int64_t j = 0; j < L; ++j) {
    opmath_t ds = static_cast<opmath_t>(grad_s[j]);
    opmath_t dv_carry;
    if constexpr (EXPLICIT_CARRY) {
      ds = ds + ds_carry[j];
      dv_carry = dv_next[j];
    } else {
      if constexpr (!DETACH) ds = ds + neg_v_th * dv_next[j];
      dv_carry = a[j] * dv_next[j];
    }
    const opmath_t dv = ds * sur(v_t[j]) + dv_carry;
    dx[j] = static_cast<scalar_t>(dv);
    if constexpr (HAS_PREV) dalpha[j] += dv * v_prev[j];
    dv_next[j] = dv;
  }
}

template <typename scalar_t, typename opmath_t, typename Sur, bool DETACH, bool EXPLICIT_CARRY,
          typename grad_t>
NEUROKERN_INLINE void plif_bwd_step(int64_t L, const grad_t* grad_s, const opmath_t* v_t,
                                    const opmath_t* v_prev, const opmath_t* a,
                                    const opmath_t* ds_carry, opmath_t* dv_next,
                                    opmath_t* dalpha, scalar_t* dx, opmath_t neg_v_th,
                                    const Sur& sur) {
  if (v_prev) {
    plif_bwd_step<scalar_t, opmath_t, Sur, DETACH, EXPLICIT_CARRY, true>(
        L, grad_s, v_t, v_prev, a, ds_carry, dv_next, dalpha, dx, neg_v_th, sur);
  } else {
    plif_bwd_step<scalar_t, opmath_t, Sur, DETACH, EXPLICIT_CARRY, false>(
        L, grad_s, v_t, v_prev, a, ds_carry, dv_next, dalpha, dx, neg_v_th, sur);
  }
}

// The reverse pass over steps t_end-1 down to t_begin for one task's L neurons. v_row(t) gives
// v_t ([L], t_begin <= t < t_end); v_before(t) gives v_{t-1}, or null when that is the zero
// initial state. v_{t-1} serves only dalpha's sum, so without p.leak_grad it is not read.
template <typename scalar_t, typename opmath_t, typename Sur, bool DETACH, typename grad_t,
          typename VRow, typename VBefore>
NEUROKERN_INLINE void plif_bwd_steps(const PlifBwdParams<scalar_t, opmath_t, grad_t>& p,
                                     const Sur& sur, int64_t row, int64_t m0, int64_t L,
                                     int64_t t_begin, int64_t t_end, const VRow& v_row,
                                     const VBefore& v_before, const opmath_t* a,
                                     const opmath_t* ds_carry, opmath_t* dv, opmath_t* dalpha,
                                     scalar_t* dx_row) {
  for (int64_t t = t_end - 1; t >= t_begin; --t) {
    const grad_t* gt = p.grad_s + t * p.g_view.stride_t + row * p.g_view.stride_b + m0;
    scalar_t* dxt = p.dx + t * p.dx_view.stride_t + row * p.dx_view.stride_b + m0;
    scalar_t* out = p.stream ? dx_row : dxt;
    if (t - kPrefetchSteps >= 0) {
      prefetch_row(gt - kPrefetchSteps * p.g_view.stride_t, L);
      if (!p.stream) prefetch_row<true>(dxt - kPrefetchSteps * p.dx_view.stride_t, L);
      if (t - kPrefetchSteps >= t_begin) prefetch_row(v_row(t - kPrefetchSteps), L);
    }
    const opmath_t* v_prev = p.leak_grad ? v_before(t) : nullptr;
    if (t == p.T - 1) {
      plif_bwd_step<scalar_t, opmath_t, Sur, DETACH, true>(L, gt, v_row(t), v_prev, a, ds_carry,
                                                           dv, dalpha, out, p.neg_v_th, sur);
    } else {
      plif_bwd_step<scalar_t, opmath_t, Sur, DETACH, false>(L, gt, v_row(t), v_prev, a, nullptr,
                                                            dv, dalpha, out, p.neg_v_th, sur);
    }
    if (p.stream) stream_row(dxt, dx_row, L);
  }
}

// Runs tasks [begin, end): each carries one chunk of neurons from t = T-1 down to 0, reading the
// membranes from v_saved (k = 1) or, for k > 1, recomputing each time chunk's k membranes from x
// and the checkpoint before it with the forward's step function. buffer: bwd_buffer_len
// elements; scratch: chunking.chunk elements (the recomputed spikes, not needed, and with
// p.stream each step's dx row before stream_row writes it out).
template <typename scalar_t, typename opmath_t, typename Act, typename Sur, bool DETACH,
          typename grad_t>
NEUROKERN_INLINE void plif_bwd_tasks(const PlifBwdParams<scalar_t, opmath_t, grad_t>& p,
                                     const Act& act, const Sur& sur, int64_t begin, int64_t end,
                                     opmath_t* buffer, scalar_t* scratch) {
  const Chunking& ch = p.chunking;
  opmath_t* dv = buffer;                   // [chunk] dL/dv of the step after the current one
  opmath_t* ds_carry = dv + ch.chunk;      // [chunk] grad_s_last, the carry into step T-1
  opmath_t* dalpha = ds_carry + ch.chunk;  // [chunk] sum over t of dv_t * v_{t-1}
  opmath_t* a = dalpha + ch.chunk;         // [chunk] leak of each neuron
  // k > 1 only:
  opmath_t* sp = a + ch.chunk;             // [chunk] last spikes of the recomputation
  opmath_t* vs = sp + ch.chunk;            // [min(k, T) + 1, L]: row r = v_{t0 + r - 1}
  for (int64_t task = begin; task < end; ++task) {
    const TaskSpan span = bwd_task_start(p, task, a, dv, ds_carry, dalpha);
    const int64_t row = span.row, m0 = span.m0, L = span.L, n0 = span.n0;
    const opmath_t* v0 = p.v0 ? p.v0 + n0 : nullptr;
    if (p.k == 1) {
      const opmath_t* v_task = p.v_saved + n0;
      plif_bwd_steps<scalar_t, opmath_t, Sur, DETACH>(
          p, sur, row, m0, L, 0, p.T, [&](int64_t t) { return v_task + t * p.N; },
          [&](int64_t t) { return t > 0 ? v_task + (t - 1) * p.N : v0; }, a, ds_carry, dv,
          dalpha, scratch);
    } else {
      for (int64_t c = saved_rows(p.T, p.k) - 1; c >= 0; --c) {
        const int64_t t0 = c * p.k;
        const int64_t len = std::min(p.k, p.T - t0);
        // The state entering the chunk: the initial state, or the previous chunk's checkpoint
        // and its spikes.
        if (c == 0) {
          for (int64_t j = 0; j < L; ++j) {
            vs[j] = v0 ? v0[j] : opmath_t(0);
            sp[j] = p.s0 ? p.s0[n0 + j] : opmath_t(0);
          }
        } else {
          const opmath_t* v_in = p.v_saved + (c - 1) * p.N + n0;
          for (int64_t j = 0; j < L; ++j) {
            vs[j] = v_in[j];
            sp[j] = act(v_in[j]);
          }
        }
        for (int64_t r = 0; r < len; ++r) {
          const int64_t t = t0 + r;
          const scalar_t* xt = p.x + t * p.x_view.stride_t + row * p.x_view.stride_b + m0;
          if (r + kPrefetchSteps < len) prefetch_row(xt + kPrefetchSteps * p.x_view.stride_t, L);
          plif_fwd_step<scalar_t, opmath_t, Act>(L, xt, a, vs + r * L, vs + (r + 1) * L, sp,
                                                 scratch, p.v_th, act);
        }
        plif_bwd_steps<scalar_t, opmath_t, Sur, DETACH>(
            p, sur, row, m0, L, t0, t0 + len, [&](int64_t t) { return vs + (t - t0 + 1) * L; },
            [&](int64_t t) -> const opmath_t* {
              return t == 0 && !v0 ? nullptr : vs + (t - t0) * L;
            },
            a, ds_carry, dv, dalpha, scratch);
      }
    }
    for (int64_t j = 0; j < L; ++j) {
      p.dalpha[n0 + j] = dalpha[j];
      if (p.T == 0) {  // nothing to go through: the gradients of the state pass unchanged
        p.dv0[n0 + j] = static_cast<scalar_t>(dv[j]);
        p.ds0[n0 + j] = static_cast<scalar_t>(ds_carry[j]);
      } else {
        p.dv0[n0 + j] = static_cast<scalar_t>(a[j] * dv[j]);
        p.ds0[n0 + j] = static_cast<scalar_t>(DETACH ? opmath_t(0) : p.neg_v_th * dv[j]);
      }
    }
  }
  stream_fence();
}

template <typename scalar_t, typename opmath_t, typename Act, typename Sur, bool DETACH,
          typename grad_t>
void plif_bwd_tasks_default(const PlifBwdParams<scalar_t, opmath_t, grad_t>& p, const Act& act,
                            const Sur& sur, int64_t begin, int64_t end, opmath_t* buffer,
                            scalar_t* scratch) {
  plif_bwd_tasks<scalar_t, opmath_t, Act, Sur, DETACH>(p, act, sur, begin, end, buffer,
                                                       scratch);
}

#ifdef NEUROKERN_HAVE_AVX2_TARGET
template <typename scalar_t, typename opmath_t, typename Act, typename Sur, bool DETACH,
          typename grad_t>
__attribute__((target("avx2"))) void plif_bwd_tasks_avx2(
    const PlifBwdParams<scalar_t, opmath_t, grad_t>& p, const Act& act, const Sur& sur,
    int64_t begin, int64_t end, opmath_t* buffer, scalar_t* scratch) {
  plif_bwd_tasks<scalar_t, opmath_t, Act, Sur, DETACH>(p, act, sur, begin, end, buffer,
                                                       scratch);
}
#endif

// The parameters of a plif_bwd call; `rows`: rows of chunk neurons in each task's buffer of
// recomputed membranes (0: none); `reads_x`: the reverse pass reads x; `leak_grad`: dalpha's sum
// wanted.
template <typename scalar_t, typename grad_t>
PlifBwdParams<scalar_t, at::opmath_type<scalar_t>, grad_t> plif_bwd_params(
    const at::Tensor& grad_s, const std::optional<at::Tensor>& grad_v_last,
    const std::optional<at::Tensor>& grad_s_last, const at::Tensor& x,
    const at::Tensor& v_saved, const at::Tensor& alpha, const std::optional<at::Tensor>& v0,
    const std::optional<at::Tensor>& s0, double v_th, bool batch_first, int64_t checkpoint,
    at::Tensor& dx, at::Tensor& dalpha_per_neuron, at::Tensor& dv0, at::Tensor& ds0,
    int64_t rows, bool reads_x, bool leak_grad) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = grad_s.size(batch_first ? 0 : 1);
  const int64_t C = grad_s.size(2);
  const int64_t M = c10::multiply_integers(grad_s.sizes().slice(2));
  PlifBwdParams<scalar_t, opmath_t, grad_t> p;
  p.grad_s = grad_s.const_data_ptr<grad_t>();
  p.g_view = seq_view(grad_s, batch_first);
  p.grad_v_last = ptr_or_null<opmath_t>(grad_v_last);
  p.grad_s_last = ptr_or_null<opmath_t>(grad_s_last);
  p.x = x.const_data_ptr<scalar_t>();
  p.x_view = seq_view(x, batch_first);
  p.v_saved = v_saved.const_data_ptr<opmath_t>();
  p.k = checkpoint;
  p.alpha = alpha.const_data_ptr<opmath_t>();
  p.scalar_alpha = alpha.dim() == 0;
  p.v0 = ptr_or_null<opmath_t>(v0);
  p.s0 = ptr_or_null<opmath_t>(s0);
  p.dx = dx.mutable_data_ptr<scalar_t>();
  p.dx_view = seq_view(dx, batch_first);
  p.dalpha = dalpha_per_neuron.mutable_data_ptr<opmath_t>();
  p.dv0 = dv0.mutable_data_ptr<scalar_t>();
  p.ds0 = ds0.mutable_data_ptr<scalar_t>();
  p.T = grad_s.size(batch_first ? 1 : 0);
  p.C = C;
  p.P = M / C;
  p.N = B * M;
  p.v_th = static_cast<opmath_t>(v_th);
  p.neg_v_th = -p.v_th;
  // The buffer of `rows` rows of chunk neurons (recomputed membranes) must fit in
  // kBwdBufferBytes (none with rows = 0).
  const int64_t max_chunk = rows > 0
      ? std::clamp<int64_t>(kBwdBufferBytes / (rows * int64_t(sizeof(opmath_t))) / 16 * 16, 16,
                            kMaxChunk)
      : kMaxChunk;
  p.chunking = reads_x
      ? make_chunking(B, M, {p.g_view, p.dx_view, p.x_view}, max_chunk)
      : make_chunking(B, M, {p.g_view, p.dx_view});
  p.stream = stream_output(dx.nbytes());
  p.leak_grad = leak_grad;
  return p;
}

// The paper's backward over all threads, with the activation act and its surrogate sur
// (Activation and Surrogate, or Fire and FireSurrogate: see kPaperKernels).
template <typename scalar_t, typename grad_t, typename Act, typename Sur, bool DETACH>
void plif_bwd_run(const at::Tensor& grad_s,                      // x's shape, grad_t
                  const std::optional<at::Tensor>& grad_v_last,  // [B, C, *S] compute dtype
                  const std::optional<at::Tensor>& grad_s_last,  // [B, C, *S] compute dtype
                  const at::Tensor& x,                           // grad_s's shape
                  const at::Tensor& v_saved,                     // [ceil(T / k), N] compute
                  const at::Tensor& alpha,                       // [C] or 0-d compute dtype
                  const std::optional<at::Tensor>& v0,           // [B, C, *S] compute dtype
                  const std::optional<at::Tensor>& s0,           // [B, C, *S] compute dtype
                  double v_th, bool batch_first, int64_t checkpoint, bool leak_grad,
                  at::Tensor& dx,                 // x's shape, contiguous
                  at::Tensor& dalpha_per_neuron,  // [N] compute dtype
                  at::Tensor& dv0,                // [B, C, *S]
                  at::Tensor& ds0,                // [B, C, *S]
                  const Act& act, const Sur& sur) {
  using opmath_t = at::opmath_type<scalar_t>;
  // With recomputation, the buffer of min(k, T) + 2 rows of chunk neurons must fit in
  // kBwdBufferBytes (k = 1 needs no such buffer, and does not read x).
  const int64_t T = grad_s.size(batch_first ? 1 : 0);
  const auto p = plif_bwd_params<scalar_t, grad_t>(
      grad_s, grad_v_last, grad_s_last, x, v_saved, alpha, v0, s0, v_th, batch_first,
      checkpoint, dx, dalpha_per_neuron, dv0, ds0,
      checkpoint > 1 ? std::min(checkpoint, T) + 2 : 0, checkpoint > 1, leak_grad);
  const bool avx2 = use_avx2();

  at::parallel_for(0, p.chunking.rows * p.chunking.per_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buffer(bwd_buffer_len(p.chunking.chunk, p.T, p.k));
    std::vector<scalar_t> scratch(p.chunking.chunk);
#ifdef NEUROKERN_HAVE_AVX2_TARGET
    if (avx2) {
      plif_bwd_tasks_avx2<scalar_t, opmath_t, Act, Sur, DETACH>(p, act, sur, begin, end,
                                                                buffer.data(), scratch.data());
      return;
    }
#endif
    plif_bwd_tasks_default<scalar_t, opmath_t, Act, Sur, DETACH>(p, act, sur, begin, end,
                                                                 buffer.data(), scratch.data());
  });
}

template <typename scalar_t, typename grad_t, bool SIGNED, bool SPIKING, bool DETACH>
void plif_bwd_kernel(const at::Tensor& grad_s, const std::optional<at::Tensor>& grad_v_last,
                     const std::optional<at::Tensor>& grad_s_last, const at::Tensor& x,
                     const at::Tensor& v_saved, const at::Tensor& alpha,
                     const std::optional<at::Tensor>& v0, const std::optional<at::Tensor>& s0,
                     double v_th, double gamma, bool batch_first, int64_t checkpoint,
                     bool leak_grad, at::Tensor& dx, at::Tensor& dalpha_per_neuron,
                     at::Tensor& dv0, at::Tensor& ds0) {
  using opmath_t = at::opmath_type<scalar_t>;
  plif_bwd_run<scalar_t, grad_t, Activation<opmath_t, SIGNED, SPIKING>,
               Surrogate<opmath_t, SIGNED>, DETACH>(
      grad_s, grad_v_last, grad_s_last, x, v_saved, alpha, v0, s0, v_th, batch_first,
      checkpoint, leak_grad, dx, dalpha_per_neuron, dv0, ds0,
      Activation<opmath_t, SIGNED, SPIKING>(v_th, gamma), Surrogate<opmath_t, SIGNED>(v_th, gamma));
}

// ---------------------------------------------------------------------------------------------
// Backward of the generalised neuron (docs/neurons.md has the derivation)
// ---------------------------------------------------------------------------------------------
//
// With a = alpha_c, b = (1 - a) v_rest, c = 1 - a (decay_input) or 1, R(h, s) = h (1 - k s) + r s,
// dR/dh = 1 - k s, dR/ds = r - k h (the grad_ pair: zero with detach_reset), f' the surrogate,
// and dalpha's term d(a v + b + c x)/da = v - v_rest - decay x:
//
// Paper order (carried h; pre_t = a h_{t-1} + b + c x_t, h_t = R(pre_t, s_{t-1})), t = T-1..0,
// from ds_c = dL/ds_T, dh_c = dL/dh_T (the final state's gradients):
//   dh_t = (grad_s_t + ds_c) f'(h_t) + dh_c;     dpre = dh_t (1 - k s_{t-1})
//   dx_t = c dpre;  dalpha += dpre (h_{t-1} - v_rest - decay x_t)
//   ds_c = dh_t (grad_r - grad_k pre_t);         dh_c = a dpre
// and dv0 = dh_c, ds0 = ds_c.
// SpikingJelly order (carried u; h_t = a u_{t-1} + b + c x_t, s_t = f(h_t), u_t = R(h_t, s_t)),
// from du = dL/du_T:
//   ds = grad_s_t + du (grad_r - grad_k h_t) (+ dL/ds_T at t = T-1)
//   dh_t = du (1 - k s_t) + ds f'(h_t);  dx_t = c dh_t
//   dalpha += dh_t (u_{t-1} - v_rest - decay x_t)
//   du = a dh_t
// and dv0 = du, ds0 = 0 (s_0 is not used).
// The reverse pass recomputes pre_t / h_t from the carried state before the step and x_t, with
// the forward's expression (so bit-identically), and s_{t-1} = fire(h_{t-1}) (s_0 at t = 0).

// body(std::true_type) if leak_grad, else body(std::false_type): a reverse step's loop compiled
// with and without the leak gradient's sum (plif_bwd's leak_grad = False skips it).
template <typename Body>
NEUROKERN_INLINE void with_leak_grad(bool leak_grad, const Body& body) {
  if (leak_grad) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// The spikes fire(v) of a row of L neurons (a pass of its own: see GeneralStep).
template <typename opmath_t, typename FireT>
NEUROKERN_INLINE void fire_row(int64_t L, const opmath_t* __restrict__ v,
                               opmath_t* __restrict__ s, const FireT& fire) {
  const FireT f = fire;
  for (int64_t j = 0; j < L; ++j) s[j] = f(v[j]);
}

// One reverse step of the paper order for L neurons (see above). v_prev: h_{t-1}; v_t: h_t;
// s_prev: s_{t-1}.
template <typename scalar_t, typename opmath_t, typename Sur, typename grad_t>
NEUROKERN_INLINE void general_bwd_step_paper(
    int64_t L, const grad_t* __restrict__ grad_s, const scalar_t* __restrict__ x,
    const opmath_t* __restrict__ v_t, const opmath_t* __restrict__ v_prev,
    const opmath_t* __restrict__ s_prev, const opmath_t* __restrict__ a,
    const opmath_t* __restrict__ coeffs, opmath_t* __restrict__ ds_c,
    opmath_t* __restrict__ dh_c, opmath_t* __restrict__ dalpha, scalar_t* __restrict__ dx,
    const NeuronCoefficients<opmath_t>& k, const Sur& sur, bool leak_grad) {
  const opmath_t* __restrict__ b = coeffs;
  const opmath_t* __restrict__ c = coeffs + L;
  const opmath_t reset_k = k.reset_k, grad_k = k.grad_k, grad_r = k.grad_r;
  const opmath_t v_rest = k.v_rest, decay = k.decay;
  with_leak_grad(leak_grad, [&](auto leak_c) NEUROKERN_INLINE_LAMBDA {
    for (int64_t j = 0; j < L; ++j) {
      const opmath_t hp = v_prev[j];
      const opmath_t xj = static_cast<opmath_t>(x[j]);
      const opmath_t pre = a[j] * hp + b[j] + c[j] * xj;
      const opmath_t sp = s_prev[j];
      const opmath_t dh = (static_cast<opmath_t>(grad_s[j]) + ds_c[j]) * sur(v_t[j]) + dh_c[j];
      const opmath_t dpre = dh * (opmath_t(1) - reset_k * sp);
      dx[j] = static_cast<scalar_t>(c[j] * dpre);
      if constexpr (decltype(leak_c)::value) dalpha[j] += dpre * ((hp - v_rest) - decay * xj);
      ds_c[j] = dh * (grad_r - grad_k * pre);
      dh_c[j] = a[j] * dpre;
    }
  });
}

// One reverse step of the SpikingJelly order (see above). h_t, s_t: the step's h and spikes,
// as the forward computed them; u_prev: u_{t-1}; LAST: t = T-1, where ds_c holds dL/ds_T.
template <typename scalar_t, typename opmath_t, typename Sur, bool LAST, typename grad_t>
NEUROKERN_INLINE void general_bwd_step_before(
    int64_t L, const grad_t* __restrict__ grad_s, const scalar_t* __restrict__ x,
    const opmath_t* __restrict__ h_t, const opmath_t* __restrict__ s_t,
    const opmath_t* __restrict__ u_prev, const opmath_t* __restrict__ a,
    const opmath_t* __restrict__ coeffs, const opmath_t* __restrict__ ds_c,
    opmath_t* __restrict__ du_c, opmath_t* __restrict__ dalpha, scalar_t* __restrict__ dx,
    const NeuronCoefficients<opmath_t>& k, const Sur& sur, bool leak_grad) {
  const opmath_t* __restrict__ c = coeffs + L;
  const opmath_t reset_k = k.reset_k, grad_k = k.grad_k, grad_r = k.grad_r;
  const opmath_t v_rest = k.v_rest, decay = k.decay;
  with_leak_grad(leak_grad, [&](auto leak_c) NEUROKERN_INLINE_LAMBDA {
    for (int64_t j = 0; j < L; ++j) {
      const opmath_t h = h_t[j];
      const opmath_t du = du_c[j];
      opmath_t ds = static_cast<opmath_t>(grad_s[j]) + du * (grad_r - grad_k * h);
      if constexpr (LAST) ds = ds + ds_c[j];
      const opmath_t dh = du * (opmath_t(1) - reset_k * s_t[j]) + ds * sur(h);
      dx[j] = static_cast<scalar_t>(c[j] * dh);
      if constexpr (decltype(leak_c)::value) {
        dalpha[j] += dh * ((u_prev[j] - v_rest) - decay * static_cast<opmath_t>(x[j]));
      }
      du_c[j] = a[j] * dh;
    }
  });
}

// The row pointers of step t of one task (x, dL/ds, dx) and the prefetch of the rows
// kPrefetchSteps steps earlier, for the reverse passes below (x's only with k = 1: with k > 1
// the recomputation has just read the chunk's rows of x, which are still in the cache).
template <typename scalar_t, typename grad_t>
struct ReverseRows {
  const grad_t* g;
  const scalar_t* x;
  scalar_t* dx;
};

template <typename scalar_t, typename opmath_t, typename grad_t>
NEUROKERN_INLINE ReverseRows<scalar_t, grad_t> reverse_rows(
    const PlifBwdParams<scalar_t, opmath_t, grad_t>& p, int64_t t, int64_t row, int64_t m0,
    int64_t L) {
  const ReverseRows<scalar_t, grad_t> r{
      p.grad_s + t * p.g_view.stride_t + row * p.g_view.stride_b + m0,
      p.x + t * p.x_view.stride_t + row * p.x_view.stride_b + m0,
      p.dx + t * p.dx_view.stride_t + row * p.dx_view.stride_b + m0};
  if (t - kPrefetchSteps >= 0) {
    prefetch_row(r.g - kPrefetchSteps * p.g_view.stride_t, L);
    if (p.k == 1) prefetch_row(r.x - kPrefetchSteps * p.x_view.stride_t, L);
    if (!p.stream) prefetch_row<true>(r.dx - kPrefetchSteps * p.dx_view.stride_t, L);
  }
  return r;
}

// The general reverse steps t_end-1 .. t_begin of the paper's order for one task's L neurons,
// with v_{t-1} = v_before(t) and v_t = v_row(t) (general_bwd_tasks has the buffers' meanings).
template <typename scalar_t, typename opmath_t, typename FireT, typename Sur, typename grad_t,
          typename VRow, typename VBefore>
NEUROKERN_INLINE void general_bwd_steps(const PlifBwdParams<scalar_t, opmath_t, grad_t>& p,
                                        const NeuronCoefficients<opmath_t>& k, const FireT& fire,
                                        const Sur& sur, int64_t row, int64_t m0, int64_t L,
                                        int64_t t_begin, int64_t t_end, const VRow& v_row,
                                        const VBefore& v_before, const opmath_t* a,
                                        const opmath_t* coeffs, const opmath_t* sp,
                                        opmath_t* ds_c, opmath_t* dh_c, opmath_t* dalpha,
                                        opmath_t* s_row, scalar_t* scratch) {
  for (int64_t t = t_end - 1; t >= t_begin; --t) {
    const auto r = reverse_rows(p, t, row, m0, L);
    // s_{t-1}: s_0 at t = 0, else fire(h_{t-1}) as the forward computed it
    if (t > 0) fire_row(L, v_before(t), s_row, fire);
    general_bwd_step_paper<scalar_t, opmath_t, Sur>(L, r.g, r.x, v_row(t), v_before(t),
                                                    t > 0 ? s_row : sp, a, coeffs, ds_c, dh_c,
                                                    dalpha, p.stream ? scratch : r.dx, k, sur,
                                                    p.leak_grad);
    if (p.stream) stream_row(r.dx, scratch, L);
  }
}

// The reverse steps t_end-1 .. t_begin of SpikingJelly's order for one task's L neurons:
// step(t, x_t) gives {h_t, s_t} ([L] rows, recomputed or computed there), u_before(t) u_{t-1}.
template <typename scalar_t, typename opmath_t, typename Sur, typename grad_t, typename Step,
          typename UBefore>
NEUROKERN_INLINE void general_bwd_steps_before(const PlifBwdParams<scalar_t, opmath_t, grad_t>& p,
                                               const NeuronCoefficients<opmath_t>& k,
                                               const Sur& sur, int64_t row, int64_t m0,
                                               int64_t L, int64_t t_begin, int64_t t_end,
                                               const Step& step, const UBefore& u_before,
                                               const opmath_t* a, const opmath_t* coeffs,
                                               const opmath_t* ds_c, opmath_t* du_c,
                                               opmath_t* dalpha, scalar_t* scratch) {
  for (int64_t t = t_end - 1; t >= t_begin; --t) {
    const auto r = reverse_rows(p, t, row, m0, L);
    const auto [h, s] = step(t, r.x);
    scalar_t* out = p.stream ? scratch : r.dx;
    if (t == p.T - 1) {
      general_bwd_step_before<scalar_t, opmath_t, Sur, true>(L, r.g, r.x, h, s, u_before(t), a,
                                                             coeffs, ds_c, du_c, dalpha, out, k,
                                                             sur, p.leak_grad);
    } else {
      general_bwd_step_before<scalar_t, opmath_t, Sur, false>(L, r.g, r.x, h, s, u_before(t), a,
                                                              coeffs, ds_c, du_c, dalpha, out,
                                                              k, sur, p.leak_grad);
    }
    if (p.stream) stream_row(r.dx, scratch, L);
  }
}

// Rows of the per-task buffer of general_bwd_tasks (of chunk opmath_t elements): 8 (a, b, c, the
// two carries, dalpha, the recomputation's spikes or s_0, a step's spikes), the membrane rows
// (min(k, T) + 1 with recomputation, else 1: the state before the first step) and, in
// SpikingJelly's order, the rows of h and of the spikes (min(k, T) each, else 1 each).
int64_t general_bwd_rows(int64_t T, int64_t k, bool before) {
  const int64_t steps = k > 1 ? std::min(k, T) : 0;
  return 8 + steps + 1 + (before ? 2 * std::max<int64_t>(steps, 1) : 0);
}

// Runs tasks [begin, end) of the general backward: plif_bwd_tasks' structure (membranes from
// v_saved with k = 1, else recomputed per chunk of k steps with the forward's step), with the
// reverse steps above. In SpikingJelly's order the recomputation keeps each step's h and
// spikes, which the reverse step reads (with k = 1 it computes them from u_{t-1} and x_t).
// buffer: general_bwd_rows(T, k, BEFORE) * chunk elements; scratch: chunk elements.
template <typename scalar_t, typename opmath_t, typename FireT, typename Sur, bool BEFORE,
          typename grad_t>
NEUROKERN_INLINE void general_bwd_tasks(const PlifBwdParams<scalar_t, opmath_t, grad_t>& p,
                                        const GeneralStep<opmath_t, FireT, BEFORE>& step,
                                        const NeuronCoefficients<opmath_t>& k, const Sur& sur,
                                        int64_t begin, int64_t end, opmath_t* buffer,
                                        scalar_t* scratch) {
  const Chunking& ch = p.chunking;
  const FireT& fire = step.fire;
  const int64_t steps = p.k > 1 ? std::min(p.k, p.T) : 0;
  opmath_t* a = buffer;                    // [chunk] leak of each neuron
  opmath_t* coeffs = a + ch.chunk;         // [2, chunk] b, c
  opmath_t* ds_c = coeffs + 2 * ch.chunk;  // [chunk] carries (see above)
  opmath_t* dh_c = ds_c + ch.chunk;        // [chunk]
  opmath_t* dalpha = dh_c + ch.chunk;      // [chunk]
  opmath_t* sp = dalpha + ch.chunk;        // [chunk] spikes of the recomputation, or s_0
  opmath_t* s_row = sp + ch.chunk;         // [chunk] a reverse step's spikes
  opmath_t* vs = s_row + ch.chunk;         // [steps + 1, L]: row r = v_{t0 + r - 1}
  // SpikingJelly's order: [max(steps, 1), L] each, row r = h, s of step t0 + r
  opmath_t* hs = vs + (steps + 1) * ch.chunk;
  opmath_t* ss = hs + std::max<int64_t>(steps, 1) * ch.chunk;
  for (int64_t task = begin; task < end; ++task) {
    const TaskSpan span = bwd_task_start(p, task, a, dh_c, ds_c, dalpha);
    const int64_t row = span.row, m0 = span.m0, L = span.L, n0 = span.n0;
    step.coefficients(a, coeffs, L);
    // The state before the first step (row 0 of vs) and s_0 (sp), used at t = 0.
    auto load_initial = [&]() {
      for (int64_t j = 0; j < L; ++j) {
        vs[j] = p.v0 ? p.v0[n0 + j] : opmath_t(0);
        sp[j] = p.s0 ? p.s0[n0 + j] : opmath_t(0);
      }
    };
    if (p.k == 1) {
      load_initial();
      const opmath_t* v_task = p.v_saved + n0;
      auto v_before = [&](int64_t t) { return t > 0 ? v_task + (t - 1) * p.N : vs; };
      if constexpr (BEFORE) {
        general_bwd_steps_before<scalar_t, opmath_t, Sur>(
            p, k, sur, row, m0, L, 0, p.T,
            [&](int64_t t, const scalar_t* xt) NEUROKERN_INLINE_LAMBDA {
              step.recompute(L, xt, a, coeffs, v_before(t), nullptr, hs, ss);
              return std::pair<const opmath_t*, const opmath_t*>(hs, ss);
            },
            v_before, a, coeffs, ds_c, dh_c, dalpha, scratch);
      } else {
        general_bwd_steps<scalar_t, opmath_t, FireT, Sur>(
            p, k, fire, sur, row, m0, L, 0, p.T, [&](int64_t t) { return v_task + t * p.N; },
            v_before, a, coeffs, sp, ds_c, dh_c, dalpha, s_row, scratch);
      }
    } else {
      for (int64_t cc = saved_rows(p.T, p.k) - 1; cc >= 0; --cc) {
        const int64_t t0 = cc * p.k;
        const int64_t len = std::min(p.k, p.T - t0);
        if (cc == 0) {
          load_initial();
        } else {
          const opmath_t* v_in = p.v_saved + (cc - 1) * p.N + n0;
          std::copy(v_in, v_in + L, vs);
          if constexpr (!BEFORE) fire_row(L, v_in, sp, fire);
        }
        for (int64_t r = 0; r < len; ++r) {
          const int64_t t = t0 + r;
          const scalar_t* xt = p.x + t * p.x_view.stride_t + row * p.x_view.stride_b + m0;
          if (r + kPrefetchSteps < len) prefetch_row(xt + kPrefetchSteps * p.x_view.stride_t, L);
          if constexpr (BEFORE) {
            step.recompute(L, xt, a, coeffs, vs + r * L, vs + (r + 1) * L, hs + r * L,
                           ss + r * L);
          } else {
            step(L, xt, a, coeffs, vs + r * L, vs + (r + 1) * L, sp, scratch, p.v_th);
          }
        }
        auto v_before = [&](int64_t t) { return vs + (t - t0) * L; };
        if constexpr (BEFORE) {
          general_bwd_steps_before<scalar_t, opmath_t, Sur>(
              p, k, sur, row, m0, L, t0, t0 + len,
              [&](int64_t t, const scalar_t*) {
                return std::pair<const opmath_t*, const opmath_t*>(hs + (t - t0) * L,
                                                                   ss + (t - t0) * L);
              },
              v_before, a, coeffs, ds_c, dh_c, dalpha, scratch);
        } else {
          if (cc == 0) {  // the recomputation overwrote sp: s_0 again for t = 0
            for (int64_t j = 0; j < L; ++j) sp[j] = p.s0 ? p.s0[n0 + j] : opmath_t(0);
          }
          general_bwd_steps<scalar_t, opmath_t, FireT, Sur>(
              p, k, fire, sur, row, m0, L, t0, t0 + len,
              [&](int64_t t) { return vs + (t - t0 + 1) * L; }, v_before, a, coeffs, sp, ds_c,
              dh_c, dalpha, s_row, scratch);
        }
      }
    }
    for (int64_t j = 0; j < L; ++j) {
      p.dalpha[n0 + j] = dalpha[j];
      p.dv0[n0 + j] = static_cast<scalar_t>(dh_c[j]);
      p.ds0[n0 + j] = static_cast<scalar_t>(BEFORE && p.T > 0 ? opmath_t(0) : ds_c[j]);
    }
  }
  stream_fence();
}

template <typename scalar_t, typename opmath_t, typename FireT, typename Sur, bool BEFORE,
          typename grad_t>
void general_bwd_tasks_default(const PlifBwdParams<scalar_t, opmath_t, grad_t>& p,
                               const GeneralStep<opmath_t, FireT, BEFORE>& step,
                               const NeuronCoefficients<opmath_t>& k, const Sur& sur,
                               int64_t begin, int64_t end, opmath_t* buffer, scalar_t* scratch) {
  general_bwd_tasks(p, step, k, sur, begin, end, buffer, scratch);
}

#ifdef NEUROKERN_HAVE_AVX2_TARGET
template <typename scalar_t, typename opmath_t, typename FireT, typename Sur, bool BEFORE,
          typename grad_t>
__attribute__((target("avx2"))) void general_bwd_tasks_avx2(
    const PlifBwdParams<scalar_t, opmath_t, grad_t>& p,
    const GeneralStep<opmath_t, FireT, BEFORE>& step, const NeuronCoefficients<opmath_t>& k,
    const Sur& sur, int64_t begin, int64_t end, opmath_t* buffer, scalar_t* scratch) {
  general_bwd_tasks(p, step, k, sur, begin, end, buffer, scratch);
}
#endif

// The generalised neuron's backward (arguments as plif_bwd_kernel's).
template <typename scalar_t, typename grad_t>
void plif_general_bwd_kernel(const at::Tensor& grad_s,
                             const std::optional<at::Tensor>& grad_v_last,
                             const std::optional<at::Tensor>& grad_s_last, const at::Tensor& x,
                             const at::Tensor& v_saved, const at::Tensor& alpha,
                             const std::optional<at::Tensor>& v0,
                             const std::optional<at::Tensor>& s0, double v_th, double gamma,
                             bool is_signed, bool batch_first, bool spiking, bool detach_reset,
                             const NeuronOptions& o, int64_t checkpoint, bool leak_grad,
                             at::Tensor& dx, at::Tensor& dalpha_per_neuron, at::Tensor& dv0,
                             at::Tensor& ds0) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t T = grad_s.size(batch_first ? 1 : 0);
  const int64_t rows = general_bwd_rows(T, checkpoint, o.before);
  const auto p = plif_bwd_params<scalar_t, grad_t>(
      grad_s, grad_v_last, grad_s_last, x, v_saved, alpha, v0, s0, v_th, batch_first,
      checkpoint, dx, dalpha_per_neuron, dv0, ds0, rows, true, leak_grad);
  const auto k = o.coefficients<opmath_t>(v_th, detach_reset);
  const bool avx2 = use_avx2();
  dispatch_neuron<opmath_t>(is_signed, spiking, o, [&](auto* fire_tag, auto* sur_tag,
                                                       auto before) {
    using FireT = std::remove_pointer_t<decltype(fire_tag)>;
    using Sur = std::remove_pointer_t<decltype(sur_tag)>;
    constexpr bool kBefore = decltype(before)::value;
    const FireT fire(v_th, gamma, o.strict, o.scale);
    const Sur sur(v_th, gamma, o.scale);
    if constexpr (kPaperKernels<FireT, Sur, kBefore>) {
      if (o.paper_form()) {
        auto run = [&](auto detach_c) {
          plif_bwd_run<scalar_t, grad_t, FireT, Sur, decltype(detach_c)::value>(
              grad_s, grad_v_last, grad_s_last, x, v_saved, alpha, v0, s0, v_th, batch_first,
              checkpoint, leak_grad, dx, dalpha_per_neuron, dv0, ds0, fire, sur);
        };
        if (detach_reset) {
          run(std::true_type{});
        } else {
          run(std::false_type{});
        }
        return;
      }
    }
    const GeneralStep<opmath_t, FireT, kBefore> step{fire, o.coefficients<opmath_t>(v_th, false)};
    at::parallel_for(0, p.chunking.rows * p.chunking.per_row, 1, [&](int64_t begin,
                                                                     int64_t end) {
      std::vector<opmath_t> buffer(rows * p.chunking.chunk);
      std::vector<scalar_t> scratch(p.chunking.chunk);
#ifdef NEUROKERN_HAVE_AVX2_TARGET
      if (avx2) {
        general_bwd_tasks_avx2(p, step, k, sur, begin, end, buffer.data(), scratch.data());
        return;
      }
#endif
      general_bwd_tasks_default(p, step, k, sur, begin, end, buffer.data(), scratch.data());
    });
  });
}

// Reverse recursion per neuron, from t = T-1 down to 0, with f' the surrogate of act at v_t:
//   ds = grad_s[t] + ds_carry;  dv = ds f'(v_t) + dv_carry;  dx[t] = dv;
//   dalpha_n += dv v_{t-1};  ds_carry = detach_reset ? 0 : -v_th dv;  dv_carry = alpha_c dv,
// starting from ds_carry = grad_s_last, dv_carry = grad_v_last (zero if None); finally
// dv0 = dv_carry, ds0 = ds_carry. v_{-1} is v0 (zero if None). The membranes v_t come from
// v_saved (checkpoint k = 1) or are recomputed from x and v_saved's checkpoints (k > 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plif_bwd_cpu(
    const at::Tensor& grad_s_in, const std::optional<at::Tensor>& grad_v_last_in,
    const std::optional<at::Tensor>& grad_s_last_in, const at::Tensor& x_in,
    const at::Tensor& v_saved_in, const at::Tensor& alpha_in,
    const std::optional<at::Tensor>& v0_in, const std::optional<at::Tensor>& s0_in,
    double v_th, double gamma, bool is_signed, bool batch_first, bool spiking,
    bool detach_reset, int64_t checkpoint, c10::string_view reset, double v_reset,
    bool reset_before_leak, bool decay_input, bool strict_threshold, c10::string_view surrogate,
    double surrogate_scale, bool leak_grad) {
  constexpr const char* op = "neurokern::plif_bwd";
  const NeuronOptions options =
      neuron_options(op, reset, v_reset, reset_before_leak, decay_input, strict_threshold,
                     surrogate, surrogate_scale, is_signed);
  TORCH_CHECK(checkpoint >= 1, op, ": checkpoint must be the forward's k >= 1 (the backward "
              "needs the membranes that plif_fwd saved), got checkpoint = ", checkpoint);
  const auto [grad_s, T, C, N, st_shape, opmath] =
      checked_sequence(grad_s_in, op, "grad_s", batch_first, spiking, gamma);

  // dx has x's dtype; grad_s has x's dtype or (the forward's spike_dtype) its compute dtype.
  // x is read only to recompute the membranes (k > 1), and by the general neuron's reverse pass.
  check_cpu_float(x_in, op, "x");
  const at::ScalarType x_dtype = x_in.scalar_type();
  const at::ScalarType x_opmath = at::toOpMathType(x_dtype);  // opmath is grad_s's
  TORCH_CHECK(grad_s.scalar_type() == x_dtype || grad_s.scalar_type() == x_opmath, op,
              ": grad_s must have x's dtype ", x_dtype, " or its compute dtype ", x_opmath,
              ", got ", grad_s.scalar_type());
  at::Tensor x = x_in;
  if (checkpoint > 1 || !options.paper()) {
    TORCH_CHECK(x_in.sizes() == grad_s.sizes(), op, ": x must have grad_s's shape ",
                grad_s.sizes(), ", got ", x_in.sizes());
    x = with_contiguous_neurons(x_in);
  }
  check_cpu_float(v_saved_in, op, "v_saved");
  TORCH_CHECK(v_saved_in.scalar_type() == opmath, op, ": v_saved must be in the compute dtype ",
              opmath, " of grad_s (", grad_s.scalar_type(), "), got ",
              v_saved_in.scalar_type());
  const int64_t rows = saved_rows(T, checkpoint);
  TORCH_CHECK(v_saved_in.dim() == 2 && v_saved_in.size(0) == rows && v_saved_in.size(1) == N,
              op, ": v_saved must have the shape [ceil(T / k), N] = [", rows, ", ", N,
              "] (plif_fwd with checkpoint k = ", checkpoint, ", T = ", T, "), got ",
              v_saved_in.sizes());
  const at::Tensor v_saved = v_saved_in.contiguous();
  const at::Tensor alpha = checked_alpha(alpha_in, C, opmath, op);
  const auto grad_v_last = checked_state(grad_v_last_in, st_shape, opmath, op, "grad_v_last");
  const auto grad_s_last = checked_state(grad_s_last_in, st_shape, opmath, op, "grad_s_last");
  const auto v0 = checked_state(v0_in, st_shape, opmath, op, "v0");
  const auto s0 = checkpoint > 1 || !options.paper()
      ? checked_state(s0_in, st_shape, opmath, op, "s0")
      : std::nullopt;

  const auto x_options = grad_s.options().dtype(x_dtype);
  at::Tensor dx = at::empty(grad_s.sizes(), x_options);
  at::Tensor dalpha_per_neuron = at::empty({N}, grad_s.options().dtype(opmath));
  at::Tensor dv0 = at::empty(st_shape, x_options);
  at::Tensor ds0 = at::empty(st_shape, x_options);
  if (N == 0) return {dx, dalpha_per_neuron, dv0, ds0};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "plif_bwd_cpu", [&] {
    dispatch_spike_type<scalar_t>(grad_s.scalar_type() != x_dtype, [&](auto* grad_tag) {
      using grad_t = std::remove_pointer_t<decltype(grad_tag)>;
      if (!options.paper()) {
        plif_general_bwd_kernel<scalar_t, grad_t>(
            grad_s, grad_v_last, grad_s_last, x, v_saved, alpha, v0, s0, v_th, gamma, is_signed,
            batch_first, spiking, detach_reset, options, checkpoint, leak_grad, dx,
            dalpha_per_neuron, dv0, ds0);
        return;
      }
      dispatch_bools(is_signed, detach_reset, [&](auto signed_c, auto detach_c) {
        constexpr bool kSigned = decltype(signed_c)::value;
        constexpr bool kDetach = decltype(detach_c)::value;
        if (spiking) {
          plif_bwd_kernel<scalar_t, grad_t, kSigned, true, kDetach>(
              grad_s, grad_v_last, grad_s_last, x, v_saved, alpha, v0, s0, v_th, gamma,
              batch_first, checkpoint, leak_grad, dx, dalpha_per_neuron, dv0, ds0);
        } else {
          plif_bwd_kernel<scalar_t, grad_t, kSigned, false, kDetach>(
              grad_s, grad_v_last, grad_s_last, x, v_saved, alpha, v0, s0, v_th, gamma,
              batch_first, checkpoint, leak_grad, dx, dalpha_per_neuron, dv0, ds0);
        }
      });
    });
  });
  return {dx, dalpha_per_neuron, dv0, ds0};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) {
  m.impl("plif_fwd", &plif_fwd_cpu);
  m.impl("plif_bwd", &plif_bwd_cpu);
}
