// Spike activations and their surrogate derivatives (SPEC.md 1) for the C++ CPU kernels, shared
// by spike_cpu.cpp, plif_cpu.cpp and spikgru2plus_cpu.cpp, and by the CUDA kernels in cuda/.
// Branch-free in spiking mode (comparisons produce 0/1), so the loops that call them vectorise;
// the arithmetic follows neurokern.reference's operation order, so float64 and float32 results
// round like it.
#pragma once

#include <cmath>
#include <type_traits>

// The loop bodies are always inlined, so that each ISA copy of a kernel's task functions (see
// plif_cpu.cpp) gets its own vectorised copy of them.
// Under nvcc they are host-device functions: the persistent CUDA kernels
// (cuda/spikgru2plus_persistent.cuh) call the same activations; the constructors stay on the
// host.
#if defined(__CUDACC__)
#define NEUROKERN_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define NEUROKERN_INLINE inline __attribute__((always_inline))
#else
#define NEUROKERN_INLINE inline
#endif

namespace neurokern {

// c = 1 + 1 / (1 + 4 gamma v_th^2), the normaliser of the signed surrogate (SPEC.md 1).
inline double signed_spike_scale(double v_th, double gamma) {
  return 1.0 + 1.0 / (1.0 + 4.0 * gamma * v_th * v_th);
}

// act(v) of SPEC.md 1: spike or signed_spike, the step or (smooth mode) its primitive.
template <typename T, bool SIGNED, bool SPIKING>
struct Activation {
  T v_th, sqrt_gamma, c_sqrt_gamma;

  Activation(double v_th_, double gamma)
      : v_th(static_cast<T>(v_th_)),
        sqrt_gamma(static_cast<T>(std::sqrt(gamma))),
        c_sqrt_gamma(static_cast<T>(signed_spike_scale(v_th_, gamma) * std::sqrt(gamma))) {}

  NEUROKERN_INLINE T operator()(T v) const {
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

// Surrogate derivative of act (SPEC.md 1): 1 / (1 + gamma (v - v_th)^2), or for signed spikes
// (1/c) [1 / (1 + gamma (v - v_th)^2) + 1 / (1 + gamma (v + v_th)^2)].
template <typename T, bool SIGNED>
struct Surrogate {
  T v_th, gamma, c;

  Surrogate(double v_th_, double gamma_)
      : v_th(static_cast<T>(v_th_)),
        gamma(static_cast<T>(gamma_)),
        c(static_cast<T>(signed_spike_scale(v_th_, gamma_))) {}

  NEUROKERN_INLINE T operator()(T v) const {
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

}  // namespace neurokern
