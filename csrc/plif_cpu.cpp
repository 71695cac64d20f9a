// CPU kernels of the multi-step PLIF neuron (SPEC.md 2): neurokern::plif_fwd and plif_bwd.
//
// Work split: x is viewed as [T, B, M] with M = C * prod(S) neurons per batch row (all B * M
// neurons as one row when the batch rows lie back to back, see Chunking). Each row is cut into
// chunks of at most kMaxChunk neurons; at::parallel_for runs over the (row, chunk) pairs, and
// each task carries its chunk's state through all T steps in small local buffers, so the state
// never leaves the cache. The innermost loop runs over the chunk's contiguous neuron index,
// without branches (spikes are comparisons producing 0/1), and vectorises; on x86-64 it is
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
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>


namespace {

using neurokern::use_avx2;

using neurokern::Activation;
using neurokern::dispatch_bools;
using neurokern::Surrogate;


// Neurons per task: the task's buffers (a few arrays of this length) stay in L1/L2.
constexpr int64_t kMaxChunk = 1024;
// Fewer neurons per task than this is not worth a task of its own.
constexpr int64_t kMinChunk = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

Chunking make_chunking(int64_t B, int64_t M, std::initializer_list<SeqView> views) {
  bool merge = B > 1;
  for (const SeqView& view : views) merge = merge && view.stride_b == M;
  const int64_t rows = merge ? 1 : B;
  const int64_t row_len = merge ? B * M : M;
  if (row_len == 0) return {rows, row_len, 1, 0};
  // Enough tasks to balance the threads (4 per thread), none longer than kMaxChunk, none
  // shorter than kMinChunk unless the row itself is.
  const int64_t wanted = ceil_div(4 * at::get_num_threads(), std::max<int64_t>(rows, 1));
  const int64_t per_row = std::max(ceil_div(row_len, kMaxChunk),
                                   std::min(wanted, ceil_div(row_len, kMinChunk)));
  // A multiple of 16 neurons, so that tasks start on the same vector alignment as their row.
  const int64_t chunk = std::min(ceil_div(ceil_div(row_len, per_row), 16) * 16, row_len);
  return {rows, row_len, chunk, ceil_div(row_len, chunk)};
}

void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
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

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Pointers and sizes of one plif_fwd call; the neuron index n = b * M + m is row-major in
// [B, C, *S], so neuron n has channel (n / P) % C.
template <typename scalar_t, typename opmath_t>
struct PlifFwdParams {
  const scalar_t* x;       // [T, B, M] view: x + t * x_view.stride_t + b * x_view.stride_b + m
  SeqView x_view;
  const opmath_t* alpha;   // [C], or [1] if scalar_alpha
  bool scalar_alpha;
  const opmath_t* v0;      // [N] or null (zeros)
  const opmath_t* s0;      // [N] or null (zeros)
  scalar_t* s;             // [T, B, M] view like x, contiguous in x's logical layout
  SeqView s_view;
  opmath_t* v_seq;         // [T, N], or null without save_v
  scalar_t* v_last;        // [N]
  scalar_t* s_last;        // [N]
  int64_t T, N, C, P;      // P = prod(S), neurons per channel
  opmath_t v_th;
  Chunking chunking;
};

// One time step for L neurons: v = a v + x - v_th s; s = act(v). Writes the spikes to `out` and,
// if SAVE_V, the membranes to `v_save`.
template <typename scalar_t, typename opmath_t, typename Act, bool SAVE_V>
NEUROKERN_INLINE void plif_fwd_step(int64_t L, const scalar_t* __restrict__ x,
                                    const opmath_t* __restrict__ a, opmath_t* __restrict__ v,
                                    opmath_t* __restrict__ s, scalar_t* __restrict__ out,
                                    opmath_t* __restrict__ v_save, opmath_t v_th,
                                    const Act& act) {
  for (int64_t j = 0; j < L; ++j) {
    // Same order as the reference: (alpha * v + x_t) - v_th * s.
    const opmath_t vj = a[j] * v[j] + static_cast<opmath_t>(x[j]) - v_th * s[j];
    const opmath_t sj = act(vj);
    v[j] = vj;
    s[j] = sj;
    out[j] = static_cast<scalar_t>(sj);
    if constexpr (SAVE_V) v_save[j] = vj;
  }
}

// Runs tasks [begin, end): each carries one chunk of neurons through all T steps.
// buffer: 3 * chunking.chunk elements.
template <typename scalar_t, typename opmath_t, typename Act>
NEUROKERN_INLINE void plif_fwd_tasks(const PlifFwdParams<scalar_t, opmath_t>& p, const Act& act,
                                     int64_t begin, int64_t end, opmath_t* buffer) {
  const Chunking& ch = p.chunking;
  opmath_t* v = buffer;           // [chunk] membrane
  opmath_t* sp = v + ch.chunk;    // [chunk] last spikes
  opmath_t* a = sp + ch.chunk;    // [chunk] leak of each neuron
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / ch.per_row;
    const int64_t m0 = (task % ch.per_row) * ch.chunk;
    const int64_t L = std::min(ch.chunk, ch.row_len - m0);
    const int64_t n0 = row * ch.row_len + m0;
    for (int64_t j = 0; j < L; ++j) {
      a[j] = p.scalar_alpha ? p.alpha[0] : p.alpha[((n0 + j) / p.P) % p.C];
      v[j] = p.v0 ? p.v0[n0 + j] : opmath_t(0);
      sp[j] = p.s0 ? p.s0[n0 + j] : opmath_t(0);
    }
    for (int64_t t = 0; t < p.T; ++t) {
      const scalar_t* xt = p.x + t * p.x_view.stride_t + row * p.x_view.stride_b + m0;
      scalar_t* st = p.s + t * p.s_view.stride_t + row * p.s_view.stride_b + m0;
      if (p.v_seq) {
        plif_fwd_step<scalar_t, opmath_t, Act, true>(L, xt, a, v, sp, st, p.v_seq + t * p.N + n0,
                                                     p.v_th, act);
      } else {
        plif_fwd_step<scalar_t, opmath_t, Act, false>(L, xt, a, v, sp, st, nullptr, p.v_th, act);
      }
    }
    for (int64_t j = 0; j < L; ++j) {
      p.v_last[n0 + j] = static_cast<scalar_t>(v[j]);
      p.s_last[n0 + j] = static_cast<scalar_t>(sp[j]);
    }
  }
}

// The same code compiled twice: for the baseline ISA and for AVX2 (see use_avx2()).
template <typename scalar_t, typename opmath_t, typename Act>
void plif_fwd_tasks_default(const PlifFwdParams<scalar_t, opmath_t>& p, const Act& act,
                            int64_t begin, int64_t end, opmath_t* buffer) {
  plif_fwd_tasks(p, act, begin, end, buffer);
}

#ifdef NEUROKERN_HAVE_AVX2_TARGET
template <typename scalar_t, typename opmath_t, typename Act>
__attribute__((target("avx2"))) void plif_fwd_tasks_avx2(
    const PlifFwdParams<scalar_t, opmath_t>& p, const Act& act, int64_t begin, int64_t end,
    opmath_t* buffer) {
  plif_fwd_tasks(p, act, begin, end, buffer);
}
#endif

template <typename scalar_t, bool SIGNED, bool SPIKING>
void plif_fwd_kernel(const at::Tensor& x,                  // [T, B, C, *S] or [B, T, C, *S]
                     const at::Tensor& alpha,              // [C] or 0-d, compute dtype
                     const std::optional<at::Tensor>& v0,  // [B, C, *S] compute dtype
                     const std::optional<at::Tensor>& s0,  // [B, C, *S] compute dtype
                     double v_th, double gamma, bool batch_first,
                     at::Tensor& s,         // x's shape, contiguous
                     at::Tensor& v_seq,     // [T, N], or [0] without save_v
                     at::Tensor& v_last,    // [B, C, *S]
                     at::Tensor& s_last) {  // [B, C, *S]
  using opmath_t = at::opmath_type<scalar_t>;
  using Act = Activation<opmath_t, SIGNED, SPIKING>;
  const int64_t B = x.size(batch_first ? 0 : 1);
  const int64_t C = x.size(2);
  const int64_t M = c10::multiply_integers(x.sizes().slice(2));
  PlifFwdParams<scalar_t, opmath_t> p;
  p.x = x.const_data_ptr<scalar_t>();
  p.x_view = seq_view(x, batch_first);
  p.alpha = alpha.const_data_ptr<opmath_t>();
  p.scalar_alpha = alpha.dim() == 0;
  p.v0 = ptr_or_null<opmath_t>(v0);
  p.s0 = ptr_or_null<opmath_t>(s0);
  p.s = s.mutable_data_ptr<scalar_t>();
  p.s_view = seq_view(s, batch_first);
  p.v_seq = v_seq.numel() > 0 ? v_seq.mutable_data_ptr<opmath_t>() : nullptr;
  p.v_last = v_last.mutable_data_ptr<scalar_t>();
  p.s_last = s_last.mutable_data_ptr<scalar_t>();
  p.T = x.size(batch_first ? 1 : 0);
  p.C = C;
  p.P = M / C;
  p.N = B * M;
  p.v_th = static_cast<opmath_t>(v_th);
  p.chunking = make_chunking(B, M, {p.x_view, p.s_view});
  const Act act(v_th, gamma);
  const bool avx2 = use_avx2();

  at::parallel_for(0, p.chunking.rows * p.chunking.per_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buffer(3 * p.chunking.chunk);
#ifdef NEUROKERN_HAVE_AVX2_TARGET
    if (avx2) {
      plif_fwd_tasks_avx2(p, act, begin, end, buffer.data());
      return;
    }
#endif
    plif_fwd_tasks_default(p, act, begin, end, buffer.data());
  });
}

// For t = 0..T-1: v = alpha_c v + x_t - v_th s; s = act(v), from (v0, s0) (zeros if None), with
// the state in the compute dtype. Returns s (x's shape and dtype, contiguous), v_seq ([T, N] in
// the compute dtype, v after every step, if save_v), v_last and s_last ([B, C, *S], x's dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plif_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& alpha_in, const std::optional<at::Tensor>& v0_in,
    const std::optional<at::Tensor>& s0_in, double v_th, double gamma, bool is_signed,
    bool batch_first, bool spiking, int64_t checkpoint) {
  constexpr const char* op = "neurokern::plif_fwd";
  TORCH_CHECK(checkpoint == 0 || checkpoint == 1, op, ": the CPU kernel saves every step's "
              "membrane (checkpoint = 1) or nothing (0), got checkpoint = ", checkpoint);
  const bool save_v = checkpoint == 1;
  check_cpu_float(x_in, op, "x");
  TORCH_CHECK(x_in.dim() >= 3, op, ": x must have rank >= 3 ([T, B, C, *S], or [B, T, C, *S] "
              "with batch_first), got shape ", x_in.sizes());
  TORCH_CHECK(spiking || gamma > 0, op, ": smooth mode needs gamma > 0, got ", gamma);
  const at::ScalarType opmath = at::toOpMathType(x_in.scalar_type());
  const at::Tensor x = with_contiguous_neurons(x_in);
  const int64_t T = x.size(batch_first ? 1 : 0);
  const int64_t C = x.size(2);
  const std::vector<int64_t> st_shape = state_shape(x, batch_first);
  const int64_t N = c10::multiply_integers(st_shape);

  const at::Tensor alpha = checked_alpha(alpha_in, C, opmath, op);
  const auto v0 = checked_state(v0_in, st_shape, opmath, op, "v0");
  const auto s0 = checked_state(s0_in, st_shape, opmath, op, "s0");

  at::Tensor s = at::empty(x.sizes(), x.options());
  // Without save_v, v_seq is an empty [0] tensor (the shape plif_ops.py's fake gives it).
  at::Tensor v_seq = save_v ? at::empty({T, N}, x.options().dtype(opmath))
                            : at::empty({0}, x.options().dtype(opmath));
  at::Tensor v_last = at::empty(st_shape, x.options());
  at::Tensor s_last = at::empty(st_shape, x.options());
  if (N == 0) return {s, v_seq, v_last, s_last};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "plif_fwd_cpu",
                                  [&] {
    dispatch_bools(is_signed, spiking, [&](auto signed_c, auto spiking_c) {
      plif_fwd_kernel<scalar_t, decltype(signed_c)::value, decltype(spiking_c)::value>(
          x, alpha, v0, s0, v_th, gamma, batch_first, s, v_seq, v_last, s_last);
    });
  });
  return {s, v_seq, v_last, s_last};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Pointers and sizes of one plif_bwd call (neuron index n = b * M + m as in the forward).
template <typename scalar_t, typename opmath_t>
struct PlifBwdParams {
  const scalar_t* grad_s;       // [T, B, M] view
  SeqView g_view;
  const opmath_t* grad_v_last;  // [N] or null (zeros)
  const opmath_t* grad_s_last;  // [N] or null (zeros)
  const opmath_t* v_seq;        // [T, N]
  const opmath_t* alpha;        // [C], or [1] if scalar_alpha
  bool scalar_alpha;
  const opmath_t* v0;           // [N] or null (zeros)
  scalar_t* dx;                 // [T, B, M] view, contiguous in x's logical layout
  SeqView dx_view;
  opmath_t* dalpha;             // [N]
  scalar_t* dv0;                // [N]
  scalar_t* ds0;                // [N]
  int64_t T, N, C, P;
  opmath_t neg_v_th;
  Chunking chunking;
};

// One reverse step for L neurons. dv_next holds dL/dv_{t+1} (all paths), from which the carries
// into step t follow: dL/ds_t += -v_th dv_{t+1} (unless DETACH), dL/dv_t += alpha dv_{t+1}.
// With EXPLICIT_CARRY (the last step, t = T-1) the carries are given instead: ds_carry, and
// dv_next holding the dv carry. On return dv_next holds dL/dv_t. HAS_PREV: v_prev holds v_{t-1}
// (otherwise v_{t-1} = 0 and dalpha gets nothing).
template <typename scalar_t, typename opmath_t, typename Sur, bool DETACH, bool EXPLICIT_CARRY,
          bool HAS_PREV>
NEUROKERN_INLINE void plif_bwd_step(int64_t L, const scalar_t* __restrict__ grad_s,
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

template <typename scalar_t, typename opmath_t, typename Sur, bool DETACH, bool EXPLICIT_CARRY>
NEUROKERN_INLINE void plif_bwd_step(int64_t L, const scalar_t* grad_s, const opmath_t* v_t,
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

// Runs tasks [begin, end): each carries one chunk of neurons from t = T-1 down to 0.
// buffer: 4 * chunking.chunk elements.
template <typename scalar_t, typename opmath_t, typename Sur, bool DETACH>
NEUROKERN_INLINE void plif_bwd_tasks(const PlifBwdParams<scalar_t, opmath_t>& p, const Sur& sur,
                                     int64_t begin, int64_t end, opmath_t* buffer) {
  const Chunking& ch = p.chunking;
  opmath_t* dv = buffer;                 // [chunk] dL/dv of the step after the current one
  opmath_t* ds_carry = dv + ch.chunk;    // [chunk] grad_s_last, the carry into step T-1
  opmath_t* dalpha = ds_carry + ch.chunk;  // [chunk] sum over t of dv_t * v_{t-1}
  opmath_t* a = dalpha + ch.chunk;       // [chunk] leak of each neuron
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / ch.per_row;
    const int64_t m0 = (task % ch.per_row) * ch.chunk;
    const int64_t L = std::min(ch.chunk, ch.row_len - m0);
    const int64_t n0 = row * ch.row_len + m0;
    for (int64_t j = 0; j < L; ++j) {
      a[j] = p.scalar_alpha ? p.alpha[0] : p.alpha[((n0 + j) / p.P) % p.C];
      dv[j] = p.grad_v_last ? p.grad_v_last[n0 + j] : opmath_t(0);
      ds_carry[j] = p.grad_s_last ? p.grad_s_last[n0 + j] : opmath_t(0);
      dalpha[j] = opmath_t(0);
    }
    for (int64_t t = p.T - 1; t >= 0; --t) {
      const scalar_t* gt = p.grad_s + t * p.g_view.stride_t + row * p.g_view.stride_b + m0;
      scalar_t* dxt = p.dx + t * p.dx_view.stride_t + row * p.dx_view.stride_b + m0;
      const opmath_t* vt = p.v_seq + t * p.N + n0;
      const opmath_t* vprev = t > 0 ? vt - p.N : (p.v0 ? p.v0 + n0 : nullptr);
      if (t == p.T - 1) {
        plif_bwd_step<scalar_t, opmath_t, Sur, DETACH, true>(L, gt, vt, vprev, a, ds_carry, dv,
                                                             dalpha, dxt, p.neg_v_th, sur);
      } else {
        plif_bwd_step<scalar_t, opmath_t, Sur, DETACH, false>(L, gt, vt, vprev, a, nullptr, dv,
                                                              dalpha, dxt, p.neg_v_th, sur);
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
}

template <typename scalar_t, typename opmath_t, typename Sur, bool DETACH>
void plif_bwd_tasks_default(const PlifBwdParams<scalar_t, opmath_t>& p, const Sur& sur,
                            int64_t begin, int64_t end, opmath_t* buffer) {
  plif_bwd_tasks<scalar_t, opmath_t, Sur, DETACH>(p, sur, begin, end, buffer);
}

#ifdef NEUROKERN_HAVE_AVX2_TARGET
template <typename scalar_t, typename opmath_t, typename Sur, bool DETACH>
__attribute__((target("avx2"))) void plif_bwd_tasks_avx2(
    const PlifBwdParams<scalar_t, opmath_t>& p, const Sur& sur, int64_t begin, int64_t end,
    opmath_t* buffer) {
  plif_bwd_tasks<scalar_t, opmath_t, Sur, DETACH>(p, sur, begin, end, buffer);
}
#endif

template <typename scalar_t, bool SIGNED, bool DETACH>
void plif_bwd_kernel(const at::Tensor& grad_s,                      // x's shape
                     const std::optional<at::Tensor>& grad_v_last,  // [B, C, *S] compute dtype
                     const std::optional<at::Tensor>& grad_s_last,  // [B, C, *S] compute dtype
                     const at::Tensor& v_seq,                       // [T, N] compute dtype
                     const at::Tensor& alpha,                       // [C] or 0-d compute dtype
                     const std::optional<at::Tensor>& v0,           // [B, C, *S] compute dtype
                     double v_th, double gamma, bool batch_first,
                     at::Tensor& dx,                 // x's shape, contiguous
                     at::Tensor& dalpha_per_neuron,  // [N] compute dtype
                     at::Tensor& dv0,                // [B, C, *S]
                     at::Tensor& ds0) {              // [B, C, *S]
  using opmath_t = at::opmath_type<scalar_t>;
  using Sur = Surrogate<opmath_t, SIGNED>;
  const int64_t B = grad_s.size(batch_first ? 0 : 1);
  const int64_t C = grad_s.size(2);
  const int64_t M = c10::multiply_integers(grad_s.sizes().slice(2));
  PlifBwdParams<scalar_t, opmath_t> p;
  p.grad_s = grad_s.const_data_ptr<scalar_t>();
  p.g_view = seq_view(grad_s, batch_first);
  p.grad_v_last = ptr_or_null<opmath_t>(grad_v_last);
  p.grad_s_last = ptr_or_null<opmath_t>(grad_s_last);
  p.v_seq = v_seq.const_data_ptr<opmath_t>();
  p.alpha = alpha.const_data_ptr<opmath_t>();
  p.scalar_alpha = alpha.dim() == 0;
  p.v0 = ptr_or_null<opmath_t>(v0);
  p.dx = dx.mutable_data_ptr<scalar_t>();
  p.dx_view = seq_view(dx, batch_first);
  p.dalpha = dalpha_per_neuron.mutable_data_ptr<opmath_t>();
  p.dv0 = dv0.mutable_data_ptr<scalar_t>();
  p.ds0 = ds0.mutable_data_ptr<scalar_t>();
  p.T = grad_s.size(batch_first ? 1 : 0);
  p.C = C;
  p.P = M / C;
  p.N = B * M;
  p.neg_v_th = -static_cast<opmath_t>(v_th);
  p.chunking = make_chunking(B, M, {p.g_view, p.dx_view});
  const Sur sur(v_th, gamma);
  const bool avx2 = use_avx2();

  at::parallel_for(0, p.chunking.rows * p.chunking.per_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buffer(4 * p.chunking.chunk);
#ifdef NEUROKERN_HAVE_AVX2_TARGET
    if (avx2) {
      plif_bwd_tasks_avx2<scalar_t, opmath_t, Sur, DETACH>(p, sur, begin, end, buffer.data());
      return;
    }
#endif
    plif_bwd_tasks_default<scalar_t, opmath_t, Sur, DETACH>(p, sur, begin, end, buffer.data());
  });
}

// Reverse recursion per neuron, from t = T-1 down to 0, with f' the surrogate of act at v_t:
//   ds = grad_s[t] + ds_carry;  dv = ds f'(v_t) + dv_carry;  dx[t] = dv;
//   dalpha_n += dv v_{t-1};  ds_carry = detach_reset ? 0 : -v_th dv;  dv_carry = alpha_c dv,
// starting from ds_carry = grad_s_last, dv_carry = grad_v_last (zero if None); finally
// dv0 = dv_carry, ds0 = ds_carry. v_{-1} is v0 (zero if None).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plif_bwd_cpu(
    const at::Tensor& grad_s_in, const std::optional<at::Tensor>& grad_v_last_in,
    const std::optional<at::Tensor>& grad_s_last_in, const at::Tensor& /*x*/,
    const at::Tensor& v_seq_in, const at::Tensor& alpha_in,
    const std::optional<at::Tensor>& v0_in, const std::optional<at::Tensor>& /*s0*/,
    double v_th, double gamma, bool is_signed, bool batch_first, bool /*spiking*/,
    bool detach_reset, int64_t checkpoint) {
  constexpr const char* op = "neurokern::plif_bwd";
  TORCH_CHECK(checkpoint == 1, op, ": the CPU kernel reads every step's membrane "
              "(checkpoint = 1), got checkpoint = ", checkpoint);
  check_cpu_float(grad_s_in, op, "grad_s");
  TORCH_CHECK(grad_s_in.dim() >= 3, op, ": grad_s must have rank >= 3 ([T, B, C, *S], or "
              "[B, T, C, *S] with batch_first), got shape ", grad_s_in.sizes());
  const at::ScalarType opmath = at::toOpMathType(grad_s_in.scalar_type());
  const at::Tensor grad_s = with_contiguous_neurons(grad_s_in);
  const int64_t T = grad_s.size(batch_first ? 1 : 0);
  const int64_t C = grad_s.size(2);
  const std::vector<int64_t> st_shape = state_shape(grad_s, batch_first);
  const int64_t N = c10::multiply_integers(st_shape);

  check_cpu_float(v_seq_in, op, "v_seq");
  TORCH_CHECK(v_seq_in.scalar_type() == opmath, op, ": v_seq must be in the compute dtype ",
              opmath, " of grad_s (", grad_s.scalar_type(), "), got ", v_seq_in.scalar_type());
  TORCH_CHECK(v_seq_in.dim() == 2 && v_seq_in.size(0) == T && v_seq_in.size(1) == N, op,
              ": v_seq must have the shape [T, N] = [", T, ", ", N, "] (plif_fwd with "
              "checkpoint=1), got ", v_seq_in.sizes());
  const at::Tensor v_seq = v_seq_in.contiguous();
  const at::Tensor alpha = checked_alpha(alpha_in, C, opmath, op);
  const auto grad_v_last = checked_state(grad_v_last_in, st_shape, opmath, op, "grad_v_last");
  const auto grad_s_last = checked_state(grad_s_last_in, st_shape, opmath, op, "grad_s_last");
  const auto v0 = checked_state(v0_in, st_shape, opmath, op, "v0");

  at::Tensor dx = at::empty(grad_s.sizes(), grad_s.options());
  at::Tensor dalpha_per_neuron = at::empty({N}, grad_s.options().dtype(opmath));
  at::Tensor dv0 = at::empty(st_shape, grad_s.options());
  at::Tensor ds0 = at::empty(st_shape, grad_s.options());
  if (N == 0) return {dx, dalpha_per_neuron, dv0, ds0};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_s.scalar_type(), "plif_bwd_cpu",
                                  [&] {
    dispatch_bools(is_signed, detach_reset, [&](auto signed_c, auto detach_c) {
      plif_bwd_kernel<scalar_t, decltype(signed_c)::value, decltype(detach_c)::value>(
          grad_s, grad_v_last, grad_s_last, v_seq, alpha, v0, v_th, gamma, batch_first, dx,
          dalpha_per_neuron, dv0, ds0);
    });
  });
  return {dx, dalpha_per_neuron, dv0, ds0};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) {
  m.impl("plif_fwd", &plif_fwd_cpu);
  m.impl("plif_bwd", &plif_bwd_cpu);
}
