// CPU kernels of the multi-step PLIF neuron (SPEC.md 2): neurokern::plif_fwd and plif_bwd.
//
// Work split: x is viewed as [T, B, M] with M = C * prod(S) neurons per batch row. Each batch
// row's M neurons are cut into chunks of at most kMaxChunk neurons; at::parallel_for runs over
// the (b, chunk) pairs, and each task carries its chunk's state through all T steps in small
// local buffers, so the state never leaves the cache. The innermost loop runs over the chunk's
// contiguous neuron index, without branches (spikes are comparisons producing 0/1), and
// vectorises. Arithmetic follows neurokern.reference's operation order in the compute dtype
// (float32 for float16/bfloat16 inputs), so float64 and float32 spikes and membranes equal the
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// Neurons per task: the task's buffers (a few arrays of this length) stay in L1/L2.
constexpr int64_t kMaxChunk = 1024;
// Fewer neurons per task than this is not worth a task of its own.
constexpr int64_t kMinChunk = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// c = 1 + 1 / (1 + 4 gamma v_th^2), the normaliser of the signed surrogate (SPEC.md 1).
double signed_spike_scale(double v_th, double gamma) {
  return 1.0 + 1.0 / (1.0 + 4.0 * gamma * v_th * v_th);
}

// act(v) of SPEC.md 1 (the same as in spike_cpu.cpp): spike or signed_spike, the step or
// (smooth mode) its primitive. Branch-free in spiking mode.
template <typename T, bool SIGNED, bool SPIKING>
struct Activation {
  T v_th, sqrt_gamma, c_sqrt_gamma;

  Activation(double v_th_, double gamma)
      : v_th(static_cast<T>(v_th_)),
        sqrt_gamma(static_cast<T>(std::sqrt(gamma))),
        c_sqrt_gamma(static_cast<T>(signed_spike_scale(v_th_, gamma) * std::sqrt(gamma))) {}

  inline T operator()(T v) const {
    if constexpr (SPIKING) {
      if constexpr (SIGNED) {
        return static_cast<T>(v >= v_th) - static_cast<T>(v <= -v_th);
      } else {
        return static_cast<T>(v >= v_th);
      }
    } else {
      if constexpr (SIGNED) {
        return (std::atan(sqrt_gamma * (v - v_th)) + std::atan(sqrt_gamma * (v + v_th))) /
               c_sqrt_gamma;
      } else {
        return T(0.5) + std::atan(sqrt_gamma * (v - v_th)) / sqrt_gamma;
      }
    }
  }
};

// Surrogate derivative of act (SPEC.md 1, the same as in spike_cpu.cpp).
template <typename T, bool SIGNED>
struct Surrogate {
  T v_th, gamma, c;

  Surrogate(double v_th_, double gamma_)
      : v_th(static_cast<T>(v_th_)),
        gamma(static_cast<T>(gamma_)),
        c(static_cast<T>(signed_spike_scale(v_th_, gamma_))) {}

  inline T operator()(T v) const {
    const T dm = v - v_th;
    const T lower = T(1) / (T(1) + gamma * (dm * dm));
    if constexpr (SIGNED) {
      const T dp = v + v_th;
      return (lower + T(1) / (T(1) + gamma * (dp * dp))) / c;
    } else {
      return lower;
    }
  }
};

// Calls fn(std::integral_constant<bool, a>{}, std::integral_constant<bool, b>{}).
template <typename Fn>
void dispatch_bools(bool a, bool b, Fn&& fn) {
  using T = std::true_type;
  using F = std::false_type;
  if (a) {
    b ? fn(T{}, T{}) : fn(T{}, F{});
  } else {
    b ? fn(F{}, T{}) : fn(F{}, F{});
  }
}

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

// How the N = B * M neurons are cut into tasks (see the header).
struct Chunking {
  int64_t chunk;     // neurons per task (the last task of a batch row may have fewer)
  int64_t per_row;   // tasks per batch row
};

Chunking make_chunking(int64_t B, int64_t M) {
  if (M == 0) return {1, 0};
  // Enough tasks to balance the threads (4 per thread), none longer than kMaxChunk, none
  // shorter than kMinChunk unless M itself is.
  const int64_t wanted = ceil_div(4 * at::get_num_threads(), std::max<int64_t>(B, 1));
  int64_t per_row = std::max(ceil_div(M, kMaxChunk), std::min(wanted, ceil_div(M, kMinChunk)));
  // Round the chunk up to a multiple of 16 elements so that vector loops start aligned.
  int64_t chunk = ceil_div(ceil_div(M, per_row), 16) * 16;
  chunk = std::min(chunk, M);
  return {chunk, ceil_div(M, chunk)};
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

// One time step for L neurons: v = a v + x - v_th s; s = act(v). Writes the spikes to `out` and,
// if SAVE_V, the membranes to `v_save`.
template <typename scalar_t, typename opmath_t, typename Act, bool SAVE_V>
inline void plif_fwd_step(int64_t L, const scalar_t* __restrict__ x,
                          const opmath_t* __restrict__ a, opmath_t* __restrict__ v,
                          opmath_t* __restrict__ s, scalar_t* __restrict__ out,
                          opmath_t* __restrict__ v_save, opmath_t v_th, const Act& act) {
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

template <typename scalar_t, bool SIGNED, bool SPIKING>
void plif_fwd_kernel(const at::Tensor& x,             // [T, B, C, *S] or [B, T, C, *S]
                     const at::Tensor& alpha,         // [C] or 0-d, compute dtype
                     const std::optional<at::Tensor>& v0,  // [B, C, *S] compute dtype
                     const std::optional<at::Tensor>& s0,  // [B, C, *S] compute dtype
                     double v_th_d, double gamma, bool batch_first,
                     at::Tensor& s,         // x's shape, contiguous
                     at::Tensor& v_seq,     // [T, N] or empty
                     at::Tensor& v_last,    // [B, C, *S]
                     at::Tensor& s_last) {  // [B, C, *S]
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(batch_first ? 1 : 0);
  const int64_t B = x.size(batch_first ? 0 : 1);
  const int64_t C = x.size(2);
  const int64_t M = c10::multiply_integers(x.sizes().slice(2));
  const int64_t P = C == 0 ? 0 : M / C;  // neurons per channel, prod(S)
  const int64_t N = B * M;
  const SeqView xv = seq_view(x, batch_first);
  const SeqView sv = seq_view(s, batch_first);
  const bool save_v = v_seq.numel() > 0;
  const bool scalar_alpha = alpha.dim() == 0;

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const opmath_t* alpha_ptr = alpha.const_data_ptr<opmath_t>();
  const opmath_t* v0_ptr = ptr_or_null<opmath_t>(v0);
  const opmath_t* s0_ptr = ptr_or_null<opmath_t>(s0);
  scalar_t* s_ptr = s.mutable_data_ptr<scalar_t>();
  opmath_t* vseq_ptr = save_v ? v_seq.mutable_data_ptr<opmath_t>() : nullptr;
  scalar_t* vlast_ptr = v_last.mutable_data_ptr<scalar_t>();
  scalar_t* slast_ptr = s_last.mutable_data_ptr<scalar_t>();

  const Activation<opmath_t, SIGNED, SPIKING> act(v_th_d, gamma);
  const opmath_t v_th = static_cast<opmath_t>(v_th_d);
  const Chunking ch = make_chunking(B, M);

  at::parallel_for(0, B * ch.per_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buffer(3 * ch.chunk);
    opmath_t* v = buffer.data();         // [chunk] membrane
    opmath_t* sp = v + ch.chunk;         // [chunk] last spikes
    opmath_t* a = sp + ch.chunk;         // [chunk] leak of each neuron
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ch.per_row;
      const int64_t m0 = (task % ch.per_row) * ch.chunk;
      const int64_t L = std::min(ch.chunk, M - m0);
      const int64_t n0 = b * M + m0;  // first neuron, row-major in [B, C, *S]
      for (int64_t j = 0; j < L; ++j) {
        a[j] = scalar_alpha ? alpha_ptr[0] : alpha_ptr[(m0 + j) / P];
        v[j] = v0_ptr ? v0_ptr[n0 + j] : opmath_t(0);
        sp[j] = s0_ptr ? s0_ptr[n0 + j] : opmath_t(0);
      }
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* xt = x_ptr + t * xv.stride_t + b * xv.stride_b + m0;
        scalar_t* st = s_ptr + t * sv.stride_t + b * sv.stride_b + m0;
        if (save_v) {
          plif_fwd_step<scalar_t, opmath_t, decltype(act), true>(L, xt, a, v, sp, st,
                                                                 vseq_ptr + t * N + n0, v_th, act);
        } else {
          plif_fwd_step<scalar_t, opmath_t, decltype(act), false>(L, xt, a, v, sp, st, nullptr,
                                                                  v_th, act);
        }
      }
      for (int64_t j = 0; j < L; ++j) {
        vlast_ptr[n0 + j] = static_cast<scalar_t>(v[j]);
        slast_ptr[n0 + j] = static_cast<scalar_t>(sp[j]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plif_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& alpha_in, const std::optional<at::Tensor>& v0_in,
    const std::optional<at::Tensor>& s0_in, double v_th, double gamma, bool is_signed,
    bool batch_first, bool spiking, bool save_v) {
  constexpr const char* op = "neurokern::plif_fwd";
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
  at::Tensor v_seq = at::empty({save_v ? T : 0, save_v ? N : 0}, x.options().dtype(opmath));
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

// One reverse time step for L neurons (see plif_bwd_cpu). HAS_PREV: v_prev holds v_{t-1}
// (otherwise v_{t-1} = 0 and dalpha gets nothing).
template <typename scalar_t, typename opmath_t, typename Sur, bool DETACH, bool HAS_PREV>
inline void plif_bwd_step(int64_t L, const scalar_t* __restrict__ grad_s,
                          const opmath_t* __restrict__ v_t, const opmath_t* __restrict__ v_prev,
                          const opmath_t* __restrict__ a, opmath_t* __restrict__ dv_carry,
                          opmath_t* __restrict__ ds_carry, opmath_t* __restrict__ dalpha,
                          scalar_t* __restrict__ dx, opmath_t neg_v_th, const Sur& sur) {
  for (int64_t j = 0; j < L; ++j) {
    const opmath_t ds = static_cast<opmath_t>(grad_s[j]) + ds_carry[j];
    const opmath_t dv = ds * sur(v_t[j]) + dv_carry[j];
    dx[j] = static_cast<scalar_t>(dv);
    if constexpr (HAS_PREV) dalpha[j] += dv * v_prev[j];
    ds_carry[j] = DETACH ? opmath_t(0) : neg_v_th * dv;
    dv_carry[j] = a[j] * dv;
  }
}

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
  const int64_t T = grad_s.size(batch_first ? 1 : 0);
  const int64_t B = grad_s.size(batch_first ? 0 : 1);
  const int64_t C = grad_s.size(2);
  const int64_t M = c10::multiply_integers(grad_s.sizes().slice(2));
  const int64_t P = C == 0 ? 0 : M / C;
  const int64_t N = B * M;
  const SeqView gv = seq_view(grad_s, batch_first);
  const SeqView dxv = seq_view(dx, batch_first);
  const bool scalar_alpha = alpha.dim() == 0;

  const scalar_t* g_ptr = grad_s.const_data_ptr<scalar_t>();
  const opmath_t* gvl_ptr = ptr_or_null<opmath_t>(grad_v_last);
  const opmath_t* gsl_ptr = ptr_or_null<opmath_t>(grad_s_last);
  const opmath_t* vseq_ptr = v_seq.const_data_ptr<opmath_t>();
  const opmath_t* alpha_ptr = alpha.const_data_ptr<opmath_t>();
  const opmath_t* v0_ptr = ptr_or_null<opmath_t>(v0);
  scalar_t* dx_ptr = dx.mutable_data_ptr<scalar_t>();
  opmath_t* dalpha_ptr = dalpha_per_neuron.mutable_data_ptr<opmath_t>();
  scalar_t* dv0_ptr = dv0.mutable_data_ptr<scalar_t>();
  scalar_t* ds0_ptr = ds0.mutable_data_ptr<scalar_t>();

  const Surrogate<opmath_t, SIGNED> sur(v_th, gamma);
  const opmath_t neg_v_th = -static_cast<opmath_t>(v_th);
  const Chunking ch = make_chunking(B, M);

  at::parallel_for(0, B * ch.per_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buffer(4 * ch.chunk);
    opmath_t* dv_carry = buffer.data();       // [chunk] dL/dv_{t} through v_{t+1}
    opmath_t* ds_carry = dv_carry + ch.chunk;  // [chunk] dL/ds_{t} through v_{t+1}
    opmath_t* dalpha = ds_carry + ch.chunk;    // [chunk] sum over t of dv_t * v_{t-1}
    opmath_t* a = dalpha + ch.chunk;           // [chunk] leak of each neuron
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ch.per_row;
      const int64_t m0 = (task % ch.per_row) * ch.chunk;
      const int64_t L = std::min(ch.chunk, M - m0);
      const int64_t n0 = b * M + m0;
      for (int64_t j = 0; j < L; ++j) {
        a[j] = scalar_alpha ? alpha_ptr[0] : alpha_ptr[(m0 + j) / P];
        dv_carry[j] = gvl_ptr ? gvl_ptr[n0 + j] : opmath_t(0);
        ds_carry[j] = gsl_ptr ? gsl_ptr[n0 + j] : opmath_t(0);
        dalpha[j] = opmath_t(0);
      }
      for (int64_t t = T - 1; t >= 0; --t) {
        const scalar_t* gt = g_ptr + t * gv.stride_t + b * gv.stride_b + m0;
        scalar_t* dxt = dx_ptr + t * dxv.stride_t + b * dxv.stride_b + m0;
        const opmath_t* vt = vseq_ptr + t * N + n0;
        const opmath_t* vprev = t > 0 ? vt - N : (v0_ptr ? v0_ptr + n0 : nullptr);
        if (vprev) {
          plif_bwd_step<scalar_t, opmath_t, decltype(sur), DETACH, true>(
              L, gt, vt, vprev, a, dv_carry, ds_carry, dalpha, dxt, neg_v_th, sur);
        } else {
          plif_bwd_step<scalar_t, opmath_t, decltype(sur), DETACH, false>(
              L, gt, vt, nullptr, a, dv_carry, ds_carry, dalpha, dxt, neg_v_th, sur);
        }
      }
      for (int64_t j = 0; j < L; ++j) {
        dalpha_ptr[n0 + j] = dalpha[j];
        dv0_ptr[n0 + j] = static_cast<scalar_t>(dv_carry[j]);
        ds0_ptr[n0 + j] = static_cast<scalar_t>(ds_carry[j]);
      }
    }
  });
}

// Reverse recursion per neuron, from t = T-1 down to 0, with f' the surrogate of act at v_t:
//   ds = grad_s[t] + ds_carry;  dv = ds f'(v_t) + dv_carry;  dx[t] = dv;
//   dalpha_n += dv v_{t-1};  ds_carry = detach_reset ? 0 : -v_th dv;  dv_carry = alpha_c dv,
// starting from ds_carry = grad_s_last, dv_carry = grad_v_last (zero if None); finally
// dv0 = dv_carry, ds0 = ds_carry. v_{-1} is v0 (zero if None).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plif_bwd_cpu(
    const at::Tensor& grad_s_in, const std::optional<at::Tensor>& grad_v_last_in,
    const std::optional<at::Tensor>& grad_s_last_in, const at::Tensor& v_seq_in,
    const at::Tensor& alpha_in, const std::optional<at::Tensor>& v0_in, double v_th,
    double gamma, bool is_signed, bool batch_first, bool detach_reset) {
  constexpr const char* op = "neurokern::plif_bwd";
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
              "save_v=True), got ", v_seq_in.sizes());
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
