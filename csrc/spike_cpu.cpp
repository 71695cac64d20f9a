// CPU kernels of the spike activations (SPEC.md 1): neurokern::spike_fwd and spike_bwd.
//
// Elementwise over contiguous memory, split into at::parallel_for chunks. Arithmetic is done in
// the opmath type (float32 for float16/bfloat16 inputs) with the scalars v_th, gamma cast to it,
// in the same operation order as neurokern.reference, so that float64 results equal the
// reference's bit for bit (smooth mode up to the last bit of atan). Half inputs are rounded once,
// at the end, where the reference rounds after every operation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "activations.h"

namespace {

using neurokern::Activation;
using neurokern::dispatch_bools;
using neurokern::Surrogate;

// Elements per parallel task: large enough that the OpenMP overhead is negligible.
constexpr int64_t kGrain = 32768;

template <typename scalar_t, typename Act>
void spike_fwd_loop(const scalar_t* __restrict__ x, scalar_t* __restrict__ s, int64_t n,
                    const Act& act) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = static_cast<scalar_t>(act(static_cast<opmath_t>(x[i])));
  }
}

template <typename scalar_t, typename Sur>
void spike_bwd_loop(const scalar_t* __restrict__ grad_s, const scalar_t* __restrict__ x,
                    scalar_t* __restrict__ dx, int64_t n, const Sur& sur) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    dx[i] = static_cast<scalar_t>(static_cast<opmath_t>(grad_s[i]) *
                                  sur(static_cast<opmath_t>(x[i])));
  }
}

void check_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

// x: any shape and strides (non-contiguous inputs are copied to contiguous memory first).
// Returns s, contiguous, with x's shape and dtype.
at::Tensor spike_fwd_cpu(const at::Tensor& x, double v_th, double gamma, bool is_signed,
                         bool spiking) {
  check_input(x, "neurokern::spike_fwd", "x");
  TORCH_CHECK(spiking || gamma > 0, "neurokern::spike_fwd: smooth mode needs gamma > 0, got ",
              gamma);
  const at::Tensor xc = x.contiguous();
  at::Tensor s = at::empty(xc.sizes(), xc.options());
  const int64_t n = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "spike_fwd_cpu",
                                  [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = xc.const_data_ptr<scalar_t>();
    scalar_t* s_ptr = s.mutable_data_ptr<scalar_t>();
    dispatch_bools(is_signed, spiking, [&](auto signed_c, auto spiking_c) {
      const Activation<opmath_t, decltype(signed_c)::value, decltype(spiking_c)::value> act(
          v_th, gamma);
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        spike_fwd_loop(x_ptr + begin, s_ptr + begin, end - begin, act);
      });
    });
  });
  return s;
}

// grad_s, x: the same shape, any strides. Returns dx = grad_s * surrogate(x), contiguous, with
// x's shape and dtype.
at::Tensor spike_bwd_cpu(const at::Tensor& grad_s, const at::Tensor& x, double v_th,
                         double gamma, bool is_signed) {
  check_input(grad_s, "neurokern::spike_bwd", "grad_s");
  check_input(x, "neurokern::spike_bwd", "x");
  TORCH_CHECK(grad_s.sizes() == x.sizes(), "neurokern::spike_bwd: grad_s must have x's shape ",
              x.sizes(), ", got ", grad_s.sizes());
  TORCH_CHECK(grad_s.scalar_type() == x.scalar_type(),
              "neurokern::spike_bwd: grad_s must have x's dtype ", x.scalar_type(), ", got ",
              grad_s.scalar_type());
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad_s.contiguous();
  at::Tensor dx = at::empty(xc.sizes(), xc.options());
  const int64_t n = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "spike_bwd_cpu",
                                  [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = xc.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = gc.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = dx.mutable_data_ptr<scalar_t>();
    auto run = [&](const auto& sur) {
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        spike_bwd_loop(g_ptr + begin, x_ptr + begin, dx_ptr + begin, end - begin, sur);
      });
    };
    if (is_signed) {
      run(Surrogate<opmath_t, true>(v_th, gamma));
    } else {
      run(Surrogate<opmath_t, false>(v_th, gamma));
    }
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) {
  m.impl("spike_fwd", &spike_fwd_cpu);
  m.impl("spike_bwd", &spike_bwd_cpu);
}
