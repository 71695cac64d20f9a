// Spike activations and their surrogate derivatives (SPEC.md 1) for the C++ CPU kernels, shared
// by spike_cpu.cpp, plif_cpu.cpp and spikgru2plus_cpu.cpp, and by the CUDA kernels in cuda/.
// Branch-free in spiking mode (comparisons produce 0/1), so the loops that call them vectorise;
// the arithmetic follows neurokern.reference's operation order, so float64 and float32 results
// round like it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// The loop bodies are always inlined, so that each ISA copy of a kernel's task functions (see
// plif_cpu.cpp) gets its own vectorised copy of them.
// Under nvcc they are host-device functions: the persistent CUDA kernels
// (cuda/spikgru2plus_persistent.cuh) call the same activations; the constructors stay on the
// host.
// NEUROKERN_INLINE_LAMBDA does the same for a lambda (after its parameter list): GCC compiles a
// lambda that is not inlined for the default ISA, even inside an AVX2 function.
#if defined(__CUDACC__)
#define NEUROKERN_INLINE __host__ __device__ __forceinline__
#define NEUROKERN_INLINE_LAMBDA
#elif defined(__GNUC__) || defined(__clang__)
#define NEUROKERN_INLINE inline __attribute__((always_inline))
#define NEUROKERN_INLINE_LAMBDA __attribute__((always_inline))
#else
#define NEUROKERN_INLINE inline
#define NEUROKERN_INLINE_LAMBDA
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

// ---------------------------------------------------------------------------------------------
// The generalised neuron's spike and surrogate (docs/neurons.md), used by the general PLIF path
// of plif_cpu.cpp (the paper's PLIF keeps Activation / Surrogate above).
// ---------------------------------------------------------------------------------------------

// How fire computes its forward: the step, or in smooth mode the primitive of the atan or the
// sigmoid surrogate.
enum FireMode { kFireStep = 0, kFireSmoothAtan = 1, kFireSmoothSigmoid = 2 };

// The float exp of the CPU kernels (Cephes expf, about 1 ulp), for a float or a GCC vector of
// floats V whose integer vector is I (int32_t for float), so that the loops that call it
// vectorise, unlike std::exp: x = n ln2 + r with |r| <= ln2 / 2, where the range reduction
// rounds with the 1.5 * 2^23 trick, exp(r) by a polynomial, times 2^n built in the exponent bits.
// x must be in [-87, 88] (2^n a normal number): the callers clamp it (exp_nonpositive below,
// vexp in spikgru2plus_cpu.cpp).
template <typename To, typename From>
NEUROKERN_INLINE To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "bits_as reinterprets values of the same size");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

template <typename V, typename I>
NEUROKERN_INLINE V expf_in_range(V x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const V t = x * 1.44269504088896341f + magic;  // round(x / ln2) in the low mantissa bits
  const V n = t - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const I scale = ((bits_as<I>(t) - bits_as<int32_t>(magic)) + 127) << 23;
  return p * bits_as<V>(scale);
}

// exp(z) for z <= 0 (or NaN): float: expf_in_range with z clamped to -87 (exp underflows below)
// in the integer domain, where a comparison does not stop GCC's vectoriser as a float one does
// under -ftrapping-math. Any other T: std::exp (float64 runs are for checking, not speed).
template <typename T>
NEUROKERN_INLINE T exp_nonpositive(T z) {
  if constexpr (std::is_same_v<T, float>) {
    // z <= 0 has its sign bit set: as int32, a more negative float is a larger integer
    constexpr int32_t kLimit = -1028784128;  // the bits of -87.0f
    const int32_t zi = bits_as<int32_t>(z);
    return expf_in_range<float, int32_t>(bits_as<float>(zi > kLimit ? kLimit : zi));
  } else {
    return std::exp(z);
  }
}

// fire(h - v_th) of docs/neurons.md: h >= v_th (h > v_th when strict: the comparison with the
// next representable threshold, so the loop stays the same), signed: minus h <= -v_th (h < -v_th);
// in smooth mode the surrogate's primitive times scale.
template <typename T, bool SIGNED, int MODE>
struct Fire {
  T fire_th, v_th, gamma, sqrt_gamma, c_sqrt_gamma, scale;

  Fire(double v_th_, double gamma_, bool strict, double scale_)
      : fire_th(strict ? std::nextafter(static_cast<T>(v_th_), std::numeric_limits<T>::infinity())
                       : static_cast<T>(v_th_)),
        v_th(static_cast<T>(v_th_)),
        gamma(static_cast<T>(gamma_)),
        sqrt_gamma(static_cast<T>(std::sqrt(gamma_))),
        c_sqrt_gamma(static_cast<T>(signed_spike_scale(v_th_, gamma_) * std::sqrt(gamma_))),
        scale(static_cast<T>(scale_)) {}

  NEUROKERN_INLINE T operator()(T v) const {
    if constexpr (MODE == kFireStep) {
      if constexpr (SIGNED) {
        return static_cast<T>(v >= fire_th) - static_cast<T>(v <= -fire_th);
      } else {
        return static_cast<T>(v >= fire_th);
      }
    } else if constexpr (MODE == kFireSmoothSigmoid) {
      return scale * (T(1) / (T(1) + std::exp(-(gamma * (v - v_th)))));
    } else if constexpr (SIGNED) {
      return scale * (std::atan(sqrt_gamma * (v - v_th)) + std::atan(sqrt_gamma * (v + v_th))) /
             c_sqrt_gamma;
    } else {
      return T(0.5) + scale * std::atan(sqrt_gamma * (v - v_th)) / sqrt_gamma;
    }
  }
};

// The surrogate derivative of Fire at u = v - v_th, times scale: atan scale / (1 + gamma u^2)
// (signed: the normalised two-sided one of SPEC.md 1), or sigmoid
// scale gamma sig(gamma u) (1 - sig(gamma u)) = scale gamma e / (1 + e)^2 with
// e = exp(-gamma |u|), which never overflows.
template <typename T, bool SIGNED, bool SIGMOID>
struct FireSurrogate {
  T v_th, gamma, c, scale, scale_gamma;

  FireSurrogate(double v_th_, double gamma_, double scale_)
      : v_th(static_cast<T>(v_th_)),
        gamma(static_cast<T>(gamma_)),
        c(static_cast<T>(signed_spike_scale(v_th_, gamma_))),
        scale(static_cast<T>(scale_)),
        scale_gamma(static_cast<T>(scale_ * gamma_)) {}

  NEUROKERN_INLINE T operator()(T v) const {
    const T dm = v - v_th;
    if constexpr (SIGMOID) {
      static_assert(!SIGNED, "the signed spike has the atan surrogate only");
      const T e = exp_nonpositive<T>(-(gamma * std::abs(dm)));
      const T one_e = T(1) + e;
      return scale_gamma * e / (one_e * one_e);
    } else if constexpr (SIGNED) {
      const T dp = v + v_th;
      return scale * (T(1) / (T(1) + gamma * (dm * dm)) + T(1) / (T(1) + gamma * (dp * dp))) / c;
    } else {
      return scale / (T(1) + gamma * (dm * dm));
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
