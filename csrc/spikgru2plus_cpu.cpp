// CPU kernels of one SpikGRU2+ layer direction (SPEC.md 3): neurokern::spikgru2plus_fwd and
// spikgru2plus_bwd, the time loop only. The input projection gi = x W^T + b_ih and, in the
// backward, dx = dgi W, dW = dgi^T x, db_ih = sum dgi are single products over all steps, done by
// the caller (neurokern/spikgru2plus_ops.py).
//
// Forward, per step t: one recurrent product gh_t = s_{t-1} U^T ([B, H] x [H, 3H], written to
// gh_seq), then one parallel elementwise pass over the B * H neurons computing r, z, i, v, s and
// writing s_seq, v_seq, i_seq (the membranes, currents and gh are what the backward needs
// besides gi and s).
//
// Backward: the reverse loop runs, per step, one elementwise pass (gate and state gradients from
// gi and the forward's gh_t, written as dgi and dgh) and one product ds_{t-1} += dgh_t U; after
// the loop dU = dgh^T S_prev is one product, db_hh and dalpha are sums. Its scratch: dL/dgh of
// every step ([T, B, 3H]) and S_prev = [s_0, s_1 .. s_{T-1}] ([T, B, H]).
//
// Ternary spikes: in spiking mode s_{t-1} holds -1, 0 or +1 and mostly 0, so s U^T is a signed
// sum of the rows of U^T that the spikes select: additions only, exact products. The products
// with a spike factor (s U^T forward, S_prev^T dgh backward) take that route when
// at most kSparseMaxDensity of the factor is nonzero (any real values are handled, e.g. an
// initial state s0), and at::mm otherwise (smooth mode, dense spiking). The sums are tiled by
// columns, each tile's partial sums held in registers, and each thread owns the same band of
// columns at every step, so that its part of U^T stays in its core's cache through the loop.
//
// Elementwise passes: 32-byte vectors through GCC/Clang vector extensions (a scalar loop with
// other compilers), compiled for the baseline ISA and for AVX2 and chosen at run time. Their
// arithmetic follows neurokern.reference's order of operations without fused multiply-adds;
// exp is a Cephes-style polynomial (about 1 ulp, as libm's), and the smooth-mode atan is libm's.
// float32 and float64 only: the caller passes float16/bfloat16 data in float32, which is how the
// reference computes it.
//
// Variable lengths (lengths [B]): at step t only the rows with t < lengths[b] run. A row that
// ended is frozen: the forward copies its state, the backward passes its carries on and writes
// zero gate gradients. Its recurrent product is skipped: its spike list is empty, and the dense
// products (at::mm) cover the rows up to the last running one only, so a batch sorted longest
// first (a PackedSequence's order) multiplies only the rows still running at each step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "cpu_isa.h"

#if defined(__GNUC__) || defined(__clang__)
#define NEUROKERN_HAVE_VECTOR_EXT 1
#endif


namespace {

using neurokern::use_avx2;

constexpr const char* kFwd = "neurokern::spikgru2plus_fwd";
constexpr const char* kBwd = "neurokern::spikgru2plus_bwd";

// Above this fraction of nonzeros in the spike factor, at::mm beats the signed row sums.
constexpr double kSparseMaxDensity = 0.5;
// Neurons per task of the elementwise passes (a few ns each): small steps run on one thread.
constexpr int64_t kGateGrain = 2048;


// ---------------------------------------------------------------------------------------------
// Lanes: 32-byte vectors (8 floats, 4 doubles), or plain scalars without vector extensions
// ---------------------------------------------------------------------------------------------

#ifdef NEUROKERN_HAVE_VECTOR_EXT
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
};
#else
template <typename T>
struct Simd {
  using V = T;
};
#endif
template <typename T>
using VecT = typename Simd<T>::V;
template <typename T>
constexpr int64_t kLanes = static_cast<int64_t>(sizeof(VecT<T>) / sizeof(T));

// Loads and stores through memcpy: any alignment. FULL: all lanes, else the first n (the rest of
// a load is zero).
template <typename T, bool FULL>
NEUROKERN_INLINE VecT<T> load(const T* p, int64_t n) {
  VecT<T> v{};
  std::memcpy(&v, p, (FULL ? kLanes<T> : n) * sizeof(T));
  return v;
}

template <typename T, bool FULL>
NEUROKERN_INLINE void store(T* p, const VecT<T>& v, int64_t n) {
  std::memcpy(p, &v, (FULL ? kLanes<T> : n) * sizeof(T));
}

template <typename T>
NEUROKERN_INLINE VecT<T> splat(T x) {
  return VecT<T>{} + x;
}

// exp: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a polynomial (Cephes expf; Taylor to degree
// 13 for double), times 2^n built in the exponent bits, for x where 2^n is a normal number;
// beyond, inf or 0 (so that sigmoid(-inf) is 0, not the smallest normal number: the reference's
// 0 * inf = NaN in the backward must not become inf). NaN stays NaN.
#ifdef NEUROKERN_HAVE_VECTOR_EXT
// exp's value e where x is in [lo, hi]; 0 below, inf above.
template <typename V>
NEUROKERN_INLINE V saturated(V x, V lo, V hi, V e) {
  e = x < lo ? splat(decltype(x[0] + 0)(0)) : e;
  return x > hi ? splat(std::numeric_limits<decltype(x[0] + 0)>::infinity()) : e;
}

NEUROKERN_INLINE Simd<float>::V vexp(Simd<float>::V x) {
  using V = Simd<float>::V;
  const V lo = splat(-87.0f), hi = splat(88.0f);
  const V x_in = x;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  return saturated(x_in, lo, hi, neurokern::expf_in_range<V, Simd<float>::I>(x));
}

NEUROKERN_INLINE Simd<double>::V vexp(Simd<double>::V x) {
  using V = Simd<double>::V;
  using I = Simd<double>::I;
  const V lo = splat(-708.0), hi = splat(709.0), magic = splat(6755399441055744.0);  // 1.5 * 2^52
  const V x_in = x;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V t = x * 1.4426950408889634074 + magic;
  const V n = t - magic;
  V r = x - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  V p = splat(1.0 / 6227020800.0);
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * (r * r) + r + 1.0;
  const I scale = (((I)t - (I)magic) + 1023) << 52;
  return saturated(x_in, lo, hi, p * (V)scale);
}

template <typename V>
NEUROKERN_INLINE V lanewise_atan(V x) {
  for (size_t k = 0; k < sizeof(V) / sizeof(x[0]); ++k) x[k] = std::atan(x[k]);
  return x;
}
#endif

NEUROKERN_INLINE float vexp(float x) { return std::exp(x); }
NEUROKERN_INLINE double vexp(double x) { return std::exp(x); }
NEUROKERN_INLINE float lanewise_atan(float x) { return std::atan(x); }
NEUROKERN_INLINE double lanewise_atan(double x) { return std::atan(x); }

template <typename V>
NEUROKERN_INLINE V sigmoid(V a) {
  return 1 / (1 + vexp(-a));
}

// ---------------------------------------------------------------------------------------------
// Spike activations (SPEC.md 1), lane-wise: the forms of activations.h's Activation and
// Surrogate for VecT lanes, in the same order of operations
// ---------------------------------------------------------------------------------------------

using neurokern::signed_spike_scale;

// act(v): spike or signed_spike, the step or (smooth mode) its primitive.
template <typename T, bool SIGNED, bool SPIKING>
struct LaneActivation {
  T v_th, sqrt_gamma, c_sqrt_gamma;

  LaneActivation(double v_th_, double gamma)
      : v_th(static_cast<T>(v_th_)),
        sqrt_gamma(static_cast<T>(std::sqrt(gamma))),
        c_sqrt_gamma(static_cast<T>(signed_spike_scale(v_th_, gamma) * std::sqrt(gamma))) {}

  NEUROKERN_INLINE VecT<T> operator()(VecT<T> v) const {
    using V = VecT<T>;
    if constexpr (SPIKING) {
      const V one = splat(T(1)), zero = splat(T(0));
      const V up = v >= splat(v_th) ? one : zero;
      if constexpr (SIGNED) {
        return up - (v <= splat(-v_th) ? one : zero);
      } else {
        return up;
      }
    } else {
      if constexpr (SIGNED) {
        return (lanewise_atan(sqrt_gamma * (v - v_th)) + lanewise_atan(sqrt_gamma * (v + v_th))) /
               c_sqrt_gamma;
      } else {
        return T(0.5) + lanewise_atan(sqrt_gamma * (v - v_th)) / sqrt_gamma;
      }
    }
  }
};

// The surrogate derivative of act, which is also the exact derivative of the smooth primitive.
template <typename T, bool SIGNED>
struct LaneSurrogate {
  T v_th, gamma, c;

  LaneSurrogate(double v_th_, double gamma_)
      : v_th(static_cast<T>(v_th_)),
        gamma(static_cast<T>(gamma_)),
        c(static_cast<T>(signed_spike_scale(v_th_, gamma_))) {}

  NEUROKERN_INLINE VecT<T> operator()(VecT<T> v) const {
    using V = VecT<T>;
    const V dm = v - v_th;
    const V lower = T(1) / (T(1) + gamma * (dm * dm));
    if constexpr (SIGNED) {
      const V dp = v + v_th;
      return (lower + T(1) / (T(1) + gamma * (dp * dp))) / c;
    } else {
      return lower;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Products with a spike factor: out[m, :] = sum_k s[m, k] u[k, :]
// ---------------------------------------------------------------------------------------------

// The nonzeros of each row of s [M, K] as lists of column indices: row m's +1 columns from the
// front of idx[m K ..] (n_plus[m] of them), its -1 columns from the back (n_minus[m]). A row with
// any other nonzero value (a real initial state, smooth-mode activations) is marked general and
// summed with multiplications instead. n_nonzero[m]: all nonzeros of row m.
struct SpikeLists {
  std::vector<int32_t> idx;
  std::vector<int32_t> n_plus, n_minus, n_nonzero;
  std::vector<uint8_t> general;
  int64_t nonzeros = 0;
};

// Branch-free (the signs of spikes are not predictable): every column index is written to both
// ends and kept where the counts advance. A front write lands at n_plus <= K - 1 - n_minus, so it
// never overwrites a kept back entry, and vice versa.
template <typename T>
NEUROKERN_INLINE void build_spike_rows(const T* s, int64_t m0, int64_t m1, int64_t K,
                                       SpikeLists& lists, const uint8_t* active) {
  for (int64_t m = m0; m < m1; ++m) {
    if (active != nullptr && !active[m]) {  // a row that ended: an empty list
      lists.general[m] = 0;
      lists.n_plus[m] = lists.n_minus[m] = lists.n_nonzero[m] = 0;
      continue;
    }
    const T* sm = s + m * K;
    int32_t* idx = lists.idx.data() + m * K;
    int32_t np = 0, nm = 0, other = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T v = sm[k];
      const int32_t plus = v == T(1), minus = v == T(-1);
      idx[np] = static_cast<int32_t>(k);
      idx[K - 1 - nm] = static_cast<int32_t>(k);
      np += plus;
      nm += minus;
      other += (v != T(0)) & !plus & !minus;
    }
    lists.general[m] = other > 0;
    lists.n_plus[m] = other > 0 ? 0 : np;
    lists.n_minus[m] = other > 0 ? 0 : nm;
    lists.n_nonzero[m] = np + nm + other;
  }
}

template <typename T>
void build_spike_lists(const T* s, int64_t M, int64_t K, SpikeLists& lists,
                       const uint8_t* active) {
  lists.idx.resize(M * K);
  lists.n_plus.resize(M);
  lists.n_minus.resize(M);
  lists.n_nonzero.resize(M);
  lists.general.resize(M);
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, K)),
                   [&](int64_t m0, int64_t m1) { build_spike_rows(s, m0, m1, K, lists, active); });
  lists.nonzeros = 0;
  for (int64_t m = 0; m < M; ++m) lists.nonzeros += lists.n_nonzero[m];
}

constexpr int64_t kTileVecs = 8;  // vectors of partial sums per row of a tile (8 AVX2 registers)

// Columns [j0, j0 + W) of rows [m0, m1) of out ([M, N] contiguous), u [K, N] contiguous. Each
// row's W sums are accumulated in registers over the row's nonzeros, so the [K, W] block of u
// that a task reads stays in the core's cache from one row, and one time step, to the next.
// FULL: W = kTileVecs vectors; otherwise fewer columns (the last tile), in single lanes.
template <typename T, bool FULL>
NEUROKERN_INLINE void spike_tile(int64_t m0, int64_t m1, int64_t j0, int64_t W, int64_t K,
                                 int64_t N, const T* s, const SpikeLists& lists, const T* u,
                                 T* out) {
  using V = std::conditional_t<FULL, VecT<T>, T>;
  constexpr int64_t L = FULL ? kLanes<T> : 1;
  constexpr int64_t kMaxVecs = FULL ? kTileVecs : kTileVecs * kLanes<T>;
  const int64_t vecs = FULL ? kTileVecs : W;
  auto ld = [](const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  };
  for (int64_t m = m0; m < m1; ++m) {
    V acc[kMaxVecs];
    for (int64_t q = 0; q < vecs; ++q) acc[q] = V{};
    if (lists.general[m]) {
      const T* sm = s + m * K;
      for (int64_t k = 0; k < K; ++k) {
        const T v = sm[k];
        if (v == T(0)) continue;
        const T* uk = u + k * N + j0;
        for (int64_t q = 0; q < vecs; ++q) acc[q] += v * ld(uk + q * L);
      }
    } else {
      const int32_t* plus = lists.idx.data() + m * K;
      const int32_t* minus = plus + K - lists.n_minus[m];
      for (int32_t p = 0, n = lists.n_plus[m]; p < n; ++p) {
        const T* uk = u + plus[p] * N + j0;
        for (int64_t q = 0; q < vecs; ++q) acc[q] += ld(uk + q * L);
      }
      for (int32_t p = 0, n = lists.n_minus[m]; p < n; ++p) {
        const T* uk = u + minus[p] * N + j0;
        for (int64_t q = 0; q < vecs; ++q) acc[q] -= ld(uk + q * L);
      }
    }
    T* o = out + m * N + j0;
    for (int64_t q = 0; q < vecs; ++q) std::memcpy(o + q * L, &acc[q], sizeof(V));
  }
}

// Tasks [begin, end) of spike_product: task = tile * row_blocks + block of rows.
template <typename T>
NEUROKERN_INLINE void spike_tasks(int64_t begin, int64_t end, int64_t row_blocks, int64_t rows,
                                  int64_t M, int64_t K, int64_t N, const T* s,
                                  const SpikeLists& lists, const T* u, T* out) {
  constexpr int64_t NT = kTileVecs * kLanes<T>;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t j0 = (task / row_blocks) * NT;
    const int64_t m0 = (task % row_blocks) * rows;
    const int64_t m1 = std::min(M, m0 + rows);
    if (j0 + NT <= N) {
      spike_tile<T, true>(m0, m1, j0, NT, K, N, s, lists, u, out);
    } else {
      spike_tile<T, false>(m0, m1, j0, N - j0, K, N, s, lists, u, out);
    }
  }
}

template <typename T>
void spike_tasks_default(int64_t begin, int64_t end, int64_t row_blocks, int64_t rows, int64_t M,
                         int64_t K, int64_t N, const T* s, const SpikeLists& lists, const T* u,
                         T* out) {
  spike_tasks(begin, end, row_blocks, rows, M, K, N, s, lists, u, out);
}

#ifdef NEUROKERN_HAVE_AVX2_TARGET
template <typename T>
__attribute__((target("avx2"))) void spike_tasks_avx2(int64_t begin, int64_t end,
                                                      int64_t row_blocks, int64_t rows,
                                                      int64_t M, int64_t K, int64_t N, const T* s,
                                                      const SpikeLists& lists, const T* u,
                                                      T* out) {
  spike_tasks(begin, end, row_blocks, rows, M, K, N, s, lists, u, out);
}
#endif

// out [M, N] = s [M, K] @ u [K, N], all contiguous, from the lists of s's nonzeros. Tasks are
// (column tile, block of rows) pairs ordered tile by tile, so the static split of parallel_for
// gives each thread a band of columns of u, the same band at every step of the time loop.
template <typename T>
void spike_product(const at::Tensor& s, const SpikeLists& lists, const at::Tensor& u,
                   at::Tensor& out) {
  constexpr int64_t NT = kTileVecs * kLanes<T>;
  constexpr int64_t kRowsPerTask = 64;
  const int64_t M = s.size(0), K = s.size(1), N = u.size(1);
  const int64_t tiles = (N + NT - 1) / NT;
  const int64_t rows = std::max<int64_t>(1, std::min(M, kRowsPerTask));
  const int64_t row_blocks = (M + rows - 1) / rows;
  const T* sp = s.const_data_ptr<T>();
  const T* up = u.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const bool avx2 = use_avx2();
  // Additions per task; split only when a task has at least ~16k of them.
  const int64_t per_task = lists.nonzeros * N / std::max<int64_t>(1, tiles * row_blocks);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / (per_task + 1));
  at::parallel_for(0, tiles * row_blocks, grain, [&](int64_t begin, int64_t end) {
#ifdef NEUROKERN_HAVE_AVX2_TARGET
    if (avx2) {
      spike_tasks_avx2<T>(begin, end, row_blocks, rows, M, K, N, sp, lists, up, op);
      return;
    }
#endif
    spike_tasks_default<T>(begin, end, row_blocks, rows, M, K, N, sp, lists, up, op);
  });
}

// The rows up to the last active one of M (all M without flags): [0, m_run) holds every active
// row.
int64_t running_prefix(const uint8_t* active, int64_t M) {
  int64_t m_run = M;
  while (active != nullptr && m_run > 0 && !active[m_run - 1]) --m_run;
  return m_run;
}

// out [M, N] = s [M, K] @ b (b [K, N] in any strides, as at::mm takes it): signed row sums when
// at most kSparseMaxDensity of s is nonzero, at::mm otherwise. The row sums read b as a
// contiguous tensor: b_rows if given (a copy the caller keeps over many calls), else b itself or
// a contiguous copy of it. With `active` ([M] flags, or null for all), the rows m with
// !active[m] get zeros and cost no products (at::mm runs on the rows up to the last active one).
template <typename T>
void product_with_spikes(const at::Tensor& s, const at::Tensor& b, at::Tensor& out,
                         SpikeLists& lists, const at::Tensor& b_rows = at::Tensor(),
                         const uint8_t* active = nullptr) {
  const int64_t M = s.size(0), K = s.size(1);
  build_spike_lists(s.const_data_ptr<T>(), M, K, lists, active);
  const int64_t m_run = running_prefix(active, M);
  if (m_run < M) out.narrow(0, m_run, M - m_run).zero_();
  at::Tensor out_run = out.narrow(0, 0, m_run);
  if (lists.nonzeros <= kSparseMaxDensity * static_cast<double>(m_run * K)) {
    spike_product<T>(s.narrow(0, 0, m_run), lists, b_rows.defined() ? b_rows : b.contiguous(),
                     out_run);
  } else {
    at::mm_out(out_run, s.narrow(0, 0, m_run), b);
  }
}

// Per row b, whether it runs at step t (t < lengths[b]).
void active_rows(const int64_t* lengths, int64_t B, int64_t t, std::vector<uint8_t>& active) {
  active.resize(B);
  for (int64_t b = 0; b < B; ++b) active[b] = t < lengths[b];
}

// Calls body(b, h, std::true_type{}, L) for every full vector of neurons [n0, n1) (n = b H + h)
// within a row b, and body(b, h, std::false_type{}, count) for a row's last partial vector.
#define NEUROKERN_FOR_LANES(T, n0, n1, H, BODY_FULL, BODY_PART)        \
  for (int64_t n_ = (n0); n_ < (n1);) {                                \
    const int64_t b = n_ / (H);                                        \
    const int64_t h0_ = n_ - b * (H);                                  \
    const int64_t h1_ = std::min<int64_t>((H), h0_ + ((n1) - n_));     \
    int64_t h = h0_;                                                   \
    for (; h + kLanes<T> <= h1_; h += kLanes<T>) BODY_FULL;            \
    if (h < h1_) BODY_PART;                                            \
    n_ += h1_ - h0_;                                                   \
  }

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Pointers of one forward step; rows of gi and gh are [r | z | i] thirds of 3H.
template <typename T>
struct FwdStep {
  const T* gi;      // [B, 3H] x_t W^T + b_ih
  const T* gh;      // [B, 3H] s_{t-1} U^T (without b_hh)
  const T* b_hh;    // [3H] (zeros without bias)
  const T* alpha;   // [H]
  const T* v_prev;  // [B, H]
  const T* i_prev;  // [B, H]
  const T* s_prev;  // [B, H]
  T* v;             // [B, H] v_t
  T* i;             // [B, H] i_t
  T* s;             // [B, H] s_t
  const uint8_t* active;  // [B] whether each row runs at this step; null: all
  int64_t H;
  T v_th;
};

// The neurons h .. h + n of row b, in the reference's order of operations:
//   gh = s U^T + b_hh;  r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z)
//   i = (alpha i + gi_i) + gh_i r;  v = (z v + (1 - z) i) - v_th s;  s = act(v)
template <typename T, typename Act, bool RESET, bool FULL>
NEUROKERN_INLINE void fwd_lanes(const FwdStep<T>& p, const Act& act, int64_t b, int64_t h,
                                int64_t n) {
  using V = VecT<T>;
  const int64_t H = p.H;
  const int64_t o = b * H + h;
  auto ld = [n](const T* q) { return load<T, FULL>(q, n); };
  if (p.active != nullptr && !p.active[b]) {  // the row ended: its state stays
    store<T, FULL>(p.i + o, ld(p.i_prev + o), n);
    store<T, FULL>(p.v + o, ld(p.v_prev + o), n);
    store<T, FULL>(p.s + o, ld(p.s_prev + o), n);
    return;
  }
  const T* gi = p.gi + b * 3 * H + h;
  const T* gh = p.gh + b * 3 * H + h;
  const T* bias = p.b_hh + h;
  const V z = sigmoid(ld(gi + H) + (ld(gh + H) + ld(bias + H)));
  const V gh_i = ld(gh + 2 * H) + ld(bias + 2 * H);
  V cur = ld(p.alpha + h) * ld(p.i_prev + o) + ld(gi + 2 * H);
  if constexpr (RESET) {
    cur = cur + gh_i * sigmoid(ld(gi) + (ld(gh) + ld(bias)));
  } else {
    cur = cur + gh_i;
  }
  const V v = z * ld(p.v_prev + o) + (T(1) - z) * cur - p.v_th * ld(p.s_prev + o);
  store<T, FULL>(p.i + o, cur, n);
  store<T, FULL>(p.v + o, v, n);
  store<T, FULL>(p.s + o, act(v), n);
}

template <typename T, typename Act, bool RESET>
NEUROKERN_INLINE void fwd_range(const FwdStep<T>& p, const Act& act, int64_t n0, int64_t n1) {
  NEUROKERN_FOR_LANES(T, n0, n1, p.H, (fwd_lanes<T, Act, RESET, true>(p, act, b, h, kLanes<T>)),
                      (fwd_lanes<T, Act, RESET, false>(p, act, b, h, h1_ - h)))
}

template <typename T, typename Act, bool RESET>
void fwd_range_default(const FwdStep<T>& p, const Act& act, int64_t n0, int64_t n1) {
  fwd_range<T, Act, RESET>(p, act, n0, n1);
}

#ifdef NEUROKERN_HAVE_AVX2_TARGET
template <typename T, typename Act, bool RESET>
__attribute__((target("avx2"))) void fwd_range_avx2(const FwdStep<T>& p, const Act& act,
                                                    int64_t n0, int64_t n1) {
  fwd_range<T, Act, RESET>(p, act, n0, n1);
}
#endif

template <typename T, bool SIGNED, bool SPIKING, bool RESET>
void fwd_kernel(const at::Tensor& gi,     // [T, B, 3H] contiguous
                const at::Tensor& U,      // [3H, H]
                const at::Tensor& b_hh,   // [3H] contiguous (zeros without bias)
                const at::Tensor& alpha,  // [H] contiguous
                const at::Tensor& v0,     // [B, H] contiguous (zeros without state)
                const at::Tensor& i0,     // [B, H]
                const at::Tensor& s0,     // [B, H]
                const int64_t* lengths,   // [B] or null (every row runs all T steps)
                bool has_s0, double v_th, double gamma,
                at::Tensor& s_seq,     // [T, B, H]
                at::Tensor& v_seq,     // [T, B, H]
                at::Tensor& i_seq,     // [T, B, H]
                at::Tensor& gh_seq) {  // [T, B, 3H] s_{t-1} U^T of every step
  using Act = LaneActivation<T, SIGNED, SPIKING>;
  const int64_t steps = gi.size(0), B = gi.size(1), H = U.size(1);
  const Act act(v_th, gamma);
  const bool avx2 = use_avx2();
  const at::Tensor Ut = U.t();  // [H, 3H] view
  // [H, 3H] contiguous, for the spike sums of every step
  const at::Tensor Ut_rows = SPIKING ? Ut.contiguous() : at::Tensor();
  SpikeLists lists;
  std::vector<uint8_t> active;
  // The products skip zero spikes (the row sums; U s_0 = 0 without a state); where U holds an
  // inf or NaN, the reference's 0 * inf is NaN there, so every step takes the dense product.
  const bool finite_u = at::isfinite(U).all().item<bool>();

  FwdStep<T> p;
  p.b_hh = b_hh.const_data_ptr<T>();
  p.alpha = alpha.const_data_ptr<T>();
  p.H = H;
  p.v_th = static_cast<T>(v_th);
  p.active = nullptr;
  for (int64_t t = 0; t < steps; ++t) {
    const at::Tensor s_prev = t == 0 ? s0 : s_seq.select(0, t - 1);  // [B, H]
    at::Tensor gh = gh_seq.select(0, t);                                // [B, 3H]
    if (lengths != nullptr) {
      active_rows(lengths, B, t, active);
      p.active = active.data();
    }
    if (t == 0 && !has_s0 && finite_u) {
      gh.zero_();
    } else if (SPIKING && finite_u) {
      product_with_spikes<T>(s_prev, Ut, gh, lists, Ut_rows, p.active);
    } else {  // the rows up to the last running one
      const int64_t m_run = running_prefix(p.active, B);
      if (m_run < B) gh.narrow(0, m_run, B - m_run).zero_();
      at::Tensor gh_run = gh.narrow(0, 0, m_run);
      at::mm_out(gh_run, s_prev.narrow(0, 0, m_run), Ut);
    }
    p.gi = gi.const_data_ptr<T>() + t * B * 3 * H;
    p.gh = gh.const_data_ptr<T>();
    p.v_prev = t == 0 ? v0.const_data_ptr<T>() : v_seq.const_data_ptr<T>() + (t - 1) * B * H;
    p.i_prev = t == 0 ? i0.const_data_ptr<T>() : i_seq.const_data_ptr<T>() + (t - 1) * B * H;
    p.s_prev = s_prev.const_data_ptr<T>();
    p.v = v_seq.mutable_data_ptr<T>() + t * B * H;
    p.i = i_seq.mutable_data_ptr<T>() + t * B * H;
    p.s = s_seq.mutable_data_ptr<T>() + t * B * H;
    at::parallel_for(0, B * H, kGateGrain, [&](int64_t n0, int64_t n1) {
#ifdef NEUROKERN_HAVE_AVX2_TARGET
      if (avx2) {
        fwd_range_avx2<T, Act, RESET>(p, act, n0, n1);
        return;
      }
#endif
      fwd_range_default<T, Act, RESET>(p, act, n0, n1);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Pointers of one reverse step.
template <typename T>
struct BwdStep {
  const T* gi;      // [B, 3H]
  const T* gh;      // [B, 3H] the forward's s_{t-1} U^T (without b_hh)
  T* dgh;           // [B, 3H] out: dL/dgh
  const T* b_hh;    // [3H]
  const T* alpha;   // [H]
  const T* v;       // [B, H] v_t
  const T* i;       // [B, H] i_t
  const T* v_prev;  // [B, H] v_{t-1}
  const T* i_prev;  // [B, H] i_{t-1}
  const T* grad_s;  // row b at grad_s + b * grad_s_stride_b, contiguous over h
  int64_t grad_s_stride_b;
  T* dgi;           // [B, 3H]
  T* dv_carry;      // [B, H] in: z_{t+1} dv_{t+1} (or grad_v_last); out: z_t dv_t
  T* di_carry;      // [B, H] in: alpha di_{t+1} (or grad_i_last); out: alpha di_t
  T* ds_carry;      // [B, H] in: dL/ds_t from step t+1 (or grad_s_last); out: -v_th dv_t
  T* dalpha;        // [B, H] running sum of di_t i_{t-1}
  const uint8_t* active;  // [B] whether each row ran at this step; null: all
  int64_t H;
  T neg_v_th;
};

// The neurons h .. h + n of row b in one reverse step. With the gates recomputed as forward:
//   ds = grad_s_t + ds_carry;      dv = ds act'(v_t) + dv_carry;    di = dv (1 - z) + di_carry
//   da_z = dv (v_{t-1} - i_t) z (1 - z);   da_r = di gh_i r (1 - r) (0 without reset gate)
//   dgi = [da_r, da_z, di];   dgh = [da_r, da_z, di r];   dalpha += di i_{t-1}
//   carries to step t-1: dv_carry = z dv, di_carry = alpha di, ds_carry = -v_th dv (+ dgh U,
//   which the caller's product adds).
template <typename T, typename Sur, bool RESET, bool FULL>
NEUROKERN_INLINE void bwd_lanes(const BwdStep<T>& p, const Sur& sur, int64_t b, int64_t h,
                                int64_t n) {
  using V = VecT<T>;
  const int64_t H = p.H;
  const int64_t o = b * H + h;
  const T* gi = p.gi + b * 3 * H + h;
  const T* gh = p.gh + b * 3 * H + h;
  T* dgh = p.dgh + b * 3 * H + h;
  T* dgi = p.dgi + b * 3 * H + h;
  const T* bias = p.b_hh + h;
  auto ld = [n](const T* q) { return load<T, FULL>(q, n); };
  auto st = [n](T* q, const V& v) { store<T, FULL>(q, v, n); };
  if (p.active != nullptr && !p.active[b]) {  // a frozen step: every gradient passes through
    for (int64_t g = 0; g < 3; ++g) {
      st(dgi + g * H, splat(T(0)));
      st(dgh + g * H, splat(T(0)));
    }
    st(p.ds_carry + o, ld(p.grad_s + b * p.grad_s_stride_b + h) + ld(p.ds_carry + o));
    return;
  }
  const V gh_i = ld(gh + 2 * H) + ld(bias + 2 * H);
  const V z = sigmoid(ld(gi + H) + (ld(gh + H) + ld(bias + H)));
  const V ds = ld(p.grad_s + b * p.grad_s_stride_b + h) + ld(p.ds_carry + o);
  const V dv = ds * sur(ld(p.v + o)) + ld(p.dv_carry + o);
  const V di = dv * (T(1) - z) + ld(p.di_carry + o);
  const V daz = dv * (ld(p.v_prev + o) - ld(p.i + o)) * (z * (T(1) - z));
  V dar = splat(T(0));
  V r = splat(T(1));
  if constexpr (RESET) {
    r = sigmoid(ld(gi) + (ld(gh) + ld(bias)));
    dar = di * gh_i * (r * (T(1) - r));
  }
  st(dgi, dar);
  st(dgi + H, daz);
  st(dgi + 2 * H, di);
  st(dgh, dar);
  st(dgh + H, daz);
  st(dgh + 2 * H, di * r);
  st(p.dalpha + o, ld(p.dalpha + o) + di * ld(p.i_prev + o));
  st(p.dv_carry + o, z * dv);
  st(p.di_carry + o, ld(p.alpha + h) * di);
  st(p.ds_carry + o, p.neg_v_th * dv);
}

template <typename T, typename Sur, bool RESET>
NEUROKERN_INLINE void bwd_range(const BwdStep<T>& p, const Sur& sur, int64_t n0, int64_t n1) {
  NEUROKERN_FOR_LANES(T, n0, n1, p.H, (bwd_lanes<T, Sur, RESET, true>(p, sur, b, h, kLanes<T>)),
                      (bwd_lanes<T, Sur, RESET, false>(p, sur, b, h, h1_ - h)))
}

template <typename T, typename Sur, bool RESET>
void bwd_range_default(const BwdStep<T>& p, const Sur& sur, int64_t n0, int64_t n1) {
  bwd_range<T, Sur, RESET>(p, sur, n0, n1);
}

#ifdef NEUROKERN_HAVE_AVX2_TARGET
template <typename T, typename Sur, bool RESET>
__attribute__((target("avx2"))) void bwd_range_avx2(const BwdStep<T>& p, const Sur& sur,
                                                    int64_t n0, int64_t n1) {
  bwd_range<T, Sur, RESET>(p, sur, n0, n1);
}
#endif

template <typename T, bool SIGNED, bool RESET>
void bwd_kernel(const at::Tensor& grad_s,  // [T, B, H], stride 1 over H
                const at::Tensor& gi,      // [T, B, 3H] contiguous
                const at::Tensor& U,       // [3H, H]
                const at::Tensor& b_hh,    // [3H] contiguous (zeros without bias)
                const at::Tensor& alpha,   // [H]
                const at::Tensor& s_seq,   // [T, B, H] contiguous
                const at::Tensor& v_seq, const at::Tensor& i_seq,
                const at::Tensor& gh_seq,  // [T, B, 3H] contiguous, the forward's s_{t-1} U^T
                const at::Tensor& v0, const at::Tensor& i0, const at::Tensor& s0,  // [B, H]
                const int64_t* lengths,  // [B] or null (every row ran all T steps)
                double v_th, double gamma,
                at::Tensor& dgi,        // [T, B, 3H]
                at::Tensor& dv_carry,   // [B, H] grad_v_last on entry, dv0 on return
                at::Tensor& di_carry,   // [B, H] grad_i_last on entry, di0 on return
                at::Tensor& ds_carry,   // [B, H] grad_s_last on entry, ds0 on return
                at::Tensor& dalpha_bh,  // [B, H] zeros on entry, sum_t di_t i_{t-1} on return
                at::Tensor& dgh,        // [T, B, 3H] dL/dgh of every step on return
                at::Tensor& s_prev) {   // [T, B, H] scratch; S_prev on return
  using Sur = LaneSurrogate<T, SIGNED>;
  const int64_t steps = gi.size(0), B = gi.size(1), H = U.size(1);
  const Sur sur(v_th, gamma);
  const bool avx2 = use_avx2();

  // S_prev = [s_0, s_1 .. s_{T-1}], the right factor of dU after the loop
  s_prev.select(0, 0).copy_(s0);
  if (steps > 1) s_prev.narrow(0, 1, steps - 1).copy_(s_seq.narrow(0, 0, steps - 1));
  if (lengths != nullptr) {  // zeros at frozen steps (their dgh is 0): the row sums skip them
    T* sp = s_prev.mutable_data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = std::max<int64_t>(lengths[b], 0); t < steps; ++t) {
        std::memset(sp + (t * B + b) * H, 0, H * sizeof(T));
      }
    }
  }

  BwdStep<T> p;
  p.b_hh = b_hh.const_data_ptr<T>();
  p.alpha = alpha.const_data_ptr<T>();
  p.grad_s_stride_b = grad_s.stride(1);
  p.dv_carry = dv_carry.mutable_data_ptr<T>();
  p.di_carry = di_carry.mutable_data_ptr<T>();
  p.ds_carry = ds_carry.mutable_data_ptr<T>();
  p.dalpha = dalpha_bh.mutable_data_ptr<T>();
  p.H = H;
  p.neg_v_th = -static_cast<T>(v_th);
  p.active = nullptr;
  std::vector<uint8_t> active;
  for (int64_t t = steps - 1; t >= 0; --t) {
    if (lengths != nullptr) {
      active_rows(lengths, B, t, active);
      p.active = active.data();
    }
    p.gi = gi.const_data_ptr<T>() + t * B * 3 * H;
    p.gh = gh_seq.const_data_ptr<T>() + t * B * 3 * H;
    p.dgh = dgh.mutable_data_ptr<T>() + t * B * 3 * H;
    p.v = v_seq.const_data_ptr<T>() + t * B * H;
    p.i = i_seq.const_data_ptr<T>() + t * B * H;
    p.v_prev = t == 0 ? v0.const_data_ptr<T>() : p.v - B * H;
    p.i_prev = t == 0 ? i0.const_data_ptr<T>() : p.i - B * H;
    p.grad_s = grad_s.const_data_ptr<T>() + t * grad_s.stride(0);
    p.dgi = dgi.mutable_data_ptr<T>() + t * B * 3 * H;
    at::parallel_for(0, B * H, kGateGrain, [&](int64_t n0, int64_t n1) {
#ifdef NEUROKERN_HAVE_AVX2_TARGET
      if (avx2) {
        bwd_range_avx2<T, Sur, RESET>(p, sur, n0, n1);
        return;
      }
#endif
      bwd_range_default<T, Sur, RESET>(p, sur, n0, n1);
    });
    // += dgh_t U: [B, 3H] x [3H, H], over the rows up to the last that ran (the others' dgh_t
    // are zeros)
    const int64_t m_run = running_prefix(p.active, B);
    ds_carry.narrow(0, 0, m_run).addmm_(dgh.select(0, t).narrow(0, 0, m_run), U);
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks and entry points
// ---------------------------------------------------------------------------------------------

void check_cpu(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
              " but gi has dtype ", dtype, " (all tensors must share gi's dtype)");
}

// Shapes are compared and printed as std::vector: the expected shape is a braced list at the
// call sites, and a c10::IntArrayRef bound to one (compared, or printed in the error) crashed
// the torch 2.11 build on a GPU machine.
void check_shape(const at::Tensor& t, const char* op, const char* name,
                 const std::vector<int64_t>& shape, const char* symbolic) {
  const std::vector<int64_t> got = t.sizes().vec();
  TORCH_CHECK(got == shape, op, ": ", name, " must have shape ", symbolic, " = ", shape,
              ", got ", got);
}

// gi [T, B, 3H] in float32 or float64; returns it contiguous.
at::Tensor checked_gi(const at::Tensor& gi, const char* op) {
  TORCH_CHECK(gi.device().is_cpu(), op, ": gi must be a CPU tensor, got device ", gi.device());
  TORCH_CHECK(gi.scalar_type() == at::kFloat || gi.scalar_type() == at::kDouble, op,
              ": gi has dtype ", gi.scalar_type(), "; the CPU kernel computes in float32 or "
              "float64 only: pass gi, the weights and the state in float32 (neurokern."
              "spikgru2plus does so for float16/bfloat16 inputs, as the reference computes them)");
  TORCH_CHECK(gi.dim() == 3 && gi.size(2) % 3 == 0, op, ": gi must have shape [T, B, 3H], got ",
              gi.sizes().vec());
  return gi.contiguous();
}

// A [B, H] state or gradient: checked, contiguous; zeros if absent (a fresh tensor either way
// when `fresh`, since the backward updates it in place and returns it).
at::Tensor checked_state(const std::optional<at::Tensor>& t, const char* op, const char* name,
                         int64_t B, int64_t H, const at::TensorOptions& options, bool fresh) {
  if (!t.has_value() || !t->defined()) return at::zeros({B, H}, options);
  check_cpu(*t, op, name, options.dtype().toScalarType());
  check_shape(*t, op, name, {B, H}, "[B, H]");
  return fresh ? t->clone(at::MemoryFormat::Contiguous) : t->contiguous();
}

// weight_hh [3H, H], bias_hh [3H] (zeros if absent), alpha [H].
std::tuple<at::Tensor, at::Tensor> checked_weights(const at::Tensor& weight_hh,
                                                   const std::optional<at::Tensor>& bias_hh,
                                                   const at::Tensor& alpha, int64_t H,
                                                   at::ScalarType dtype, const char* op) {
  check_cpu(weight_hh, op, "weight_hh", dtype);
  check_shape(weight_hh, op, "weight_hh", {3 * H, H}, "[3H, H] (3H = gi.size(2))");
  check_cpu(alpha, op, "alpha", dtype);
  check_shape(alpha, op, "alpha", {H}, "[H]");
  at::Tensor bias;
  if (bias_hh.has_value() && bias_hh->defined()) {
    check_cpu(*bias_hh, op, "bias_hh", dtype);
    check_shape(*bias_hh, op, "bias_hh", {3 * H}, "[3H]");
    bias = bias_hh->contiguous();
  } else {
    bias = at::zeros({3 * H}, weight_hh.options());
  }
  return {bias, alpha.contiguous()};
}

// lengths [B] int64 on the CPU, contiguous; undefined if absent.
at::Tensor checked_lengths(const std::optional<at::Tensor>& lengths, const char* op, int64_t B) {
  if (!lengths.has_value() || !lengths->defined()) return at::Tensor();
  TORCH_CHECK(lengths->device().is_cpu(), op, ": lengths must be a CPU tensor, got device ",
              lengths->device());
  TORCH_CHECK(lengths->scalar_type() == at::kLong, op, ": lengths must be int64, got ",
              lengths->scalar_type());
  check_shape(*lengths, op, "lengths", {B}, "[B]");
  return lengths->contiguous();
}

const int64_t* lengths_ptr(const at::Tensor& lengths) {
  return lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
}

void check_scalars(double v_th, double gamma, const char* op) {
  TORCH_CHECK(std::isfinite(v_th) && v_th > 0, op, ": v_th must be positive and finite, got ",
              v_th);
  TORCH_CHECK(std::isfinite(gamma) && gamma > 0, op, ": gamma must be positive and finite, got ",
              gamma);
}

// Calls fn(std::integral_constant<bool, flags[0]>{}, ...) for three run-time flags.
template <typename Fn>
void dispatch_bools3(bool a, bool b, bool c, Fn&& fn) {
  auto with_c = [&](auto a_c, auto b_c) {
    c ? fn(a_c, b_c, std::true_type{}) : fn(a_c, b_c, std::false_type{});
  };
  auto with_b = [&](auto a_c) {
    b ? with_c(a_c, std::true_type{}) : with_c(a_c, std::false_type{});
  };
  a ? with_b(std::true_type{}) : with_b(std::false_type{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spikgru2plus_fwd_cpu(
    const at::Tensor& gi_in, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_hh,
    const at::Tensor& alpha_in, const std::optional<at::Tensor>& v0_in,
    const std::optional<at::Tensor>& i0_in, const std::optional<at::Tensor>& s0_in, double v_th,
    double gamma, bool is_signed, bool reset_gate, bool spiking,
    const std::optional<at::Tensor>& lengths_in) {
  const char* op = kFwd;
  const at::Tensor gi = checked_gi(gi_in, op);
  const at::ScalarType dtype = gi.scalar_type();
  const int64_t steps = gi.size(0), B = gi.size(1), H = gi.size(2) / 3;
  at::Tensor bias, alpha;
  std::tie(bias, alpha) = checked_weights(weight_hh, bias_hh, alpha_in, H, dtype, op);
  const at::Tensor v0 = checked_state(v0_in, op, "v0", B, H, gi.options(), false);
  const at::Tensor i0 = checked_state(i0_in, op, "i0", B, H, gi.options(), false);
  const at::Tensor s0 = checked_state(s0_in, op, "s0", B, H, gi.options(), false);
  const bool has_s0 = s0_in.has_value() && s0_in->defined();
  check_scalars(v_th, gamma, op);
  const at::Tensor lengths = checked_lengths(lengths_in, op, B);

  at::Tensor s_seq = at::empty({steps, B, H}, gi.options());
  at::Tensor v_seq = at::empty({steps, B, H}, gi.options());
  at::Tensor i_seq = at::empty({steps, B, H}, gi.options());
  at::Tensor gh_seq = at::empty({steps, B, 3 * H}, gi.options());
  if (steps == 0 || B * H == 0) return {s_seq, v_seq, i_seq, gh_seq};

  AT_DISPATCH_FLOATING_TYPES(dtype, "spikgru2plus_fwd_cpu", [&] {
    dispatch_bools3(is_signed, spiking, reset_gate, [&](auto signed_c, auto spiking_c,
                                                       auto reset_c) {
      fwd_kernel<scalar_t, decltype(signed_c)::value, decltype(spiking_c)::value,
                 decltype(reset_c)::value>(gi, weight_hh, bias, alpha, v0, i0, s0,
                                           lengths_ptr(lengths), has_s0, v_th, gamma, s_seq,
                                           v_seq, i_seq, gh_seq);
    });
  });
  return {s_seq, v_seq, i_seq, gh_seq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
spikgru2plus_bwd_cpu(const at::Tensor& grad_s_in, const std::optional<at::Tensor>& grad_v_last,
                     const std::optional<at::Tensor>& grad_i_last,
                     const std::optional<at::Tensor>& grad_s_last, const at::Tensor& gi_in,
                     const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_hh,
                     const at::Tensor& alpha_in, const at::Tensor& s_seq_in,
                     const at::Tensor& v_seq_in, const at::Tensor& i_seq_in,
                     const at::Tensor& gh_seq_in, const std::optional<at::Tensor>& v0_in,
                     const std::optional<at::Tensor>& i0_in,
                     const std::optional<at::Tensor>& s0_in, double v_th, double gamma,
                     bool is_signed, bool reset_gate,
                     const std::optional<at::Tensor>& lengths_in) {
  const char* op = kBwd;
  const at::Tensor gi = checked_gi(gi_in, op);
  const at::ScalarType dtype = gi.scalar_type();
  const int64_t steps = gi.size(0), B = gi.size(1), H = gi.size(2) / 3;
  at::Tensor bias, alpha;
  std::tie(bias, alpha) = checked_weights(weight_hh, bias_hh, alpha_in, H, dtype, op);
  check_cpu(grad_s_in, op, "grad_s", dtype);
  check_shape(grad_s_in, op, "grad_s", {steps, B, H}, "[T, B, H]");
  // Any strides over (t, b), e.g. the time-major view of a batch-major gradient; unit stride
  // over h.
  const at::Tensor grad_s = grad_s_in.stride(2) == 1 ? grad_s_in : grad_s_in.contiguous();
  const at::Tensor* seqs[] = {&s_seq_in, &v_seq_in, &i_seq_in};
  const char* seq_names[] = {"s_seq", "v_seq", "i_seq"};
  for (int k = 0; k < 3; ++k) {
    check_cpu(*seqs[k], op, seq_names[k], dtype);
    check_shape(*seqs[k], op, seq_names[k], {steps, B, H}, "[T, B, H]");
  }
  const at::Tensor s_seq = s_seq_in.contiguous();
  const at::Tensor v_seq = v_seq_in.contiguous();
  const at::Tensor i_seq = i_seq_in.contiguous();
  check_cpu(gh_seq_in, op, "gh_seq", dtype);
  check_shape(gh_seq_in, op, "gh_seq", {steps, B, 3 * H}, "[T, B, 3H]");
  const at::Tensor gh_seq = gh_seq_in.contiguous();
  const at::Tensor v0 = checked_state(v0_in, op, "v0", B, H, gi.options(), false);
  const at::Tensor i0 = checked_state(i0_in, op, "i0", B, H, gi.options(), false);
  const at::Tensor s0 = checked_state(s0_in, op, "s0", B, H, gi.options(), false);
  at::Tensor dv0 = checked_state(grad_v_last, op, "grad_v_last", B, H, gi.options(), true);
  at::Tensor di0 = checked_state(grad_i_last, op, "grad_i_last", B, H, gi.options(), true);
  at::Tensor ds0 = checked_state(grad_s_last, op, "grad_s_last", B, H, gi.options(), true);
  check_scalars(v_th, gamma, op);
  const at::Tensor lengths = checked_lengths(lengths_in, op, B);

  at::Tensor dgi = at::empty({steps, B, 3 * H}, gi.options());
  at::Tensor dalpha_bh = at::zeros({B, H}, gi.options());
  at::Tensor dgh = at::empty({steps, B, 3 * H}, gi.options());
  at::Tensor s_prev = at::empty({steps, B, H}, gi.options());
  if (steps > 0 && B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "spikgru2plus_bwd_cpu", [&] {
      neurokern::dispatch_bools(is_signed, reset_gate, [&](auto signed_c, auto reset_c) {
        bwd_kernel<scalar_t, decltype(signed_c)::value, decltype(reset_c)::value>(
            grad_s, gi, weight_hh, bias, alpha, s_seq, v_seq, i_seq, gh_seq, v0, i0, s0,
            lengths_ptr(lengths), v_th, gamma, dgi, dv0, di0, ds0, dalpha_bh, dgh, s_prev);
      });
    });
  }
  // dU = dgh^T S_prev over all steps; the spike factor is the right one here, so the signed row
  // sums run on the transposes: dU^T = S_prev^T dgh.
  const at::Tensor dgh_2d = dgh.view({steps * B, 3 * H});
  const at::Tensor s_prev_2d = s_prev.view({steps * B, H});
  at::Tensor dweight_hh;
  AT_DISPATCH_FLOATING_TYPES(dtype, "spikgru2plus_bwd_cpu_dU", [&] {
    const at::Tensor s_prev_t = s_prev_2d.t().contiguous();  // [H, T * B]
    at::Tensor dUt = at::empty({H, 3 * H}, gi.options());     // dU^T = S_prev^T dgh
    SpikeLists lists;
    // The row sums skip zero spikes; a non-finite dgh (from non-finite inputs) must give NaN
    // there (0 * inf) as the reference's dense product does.
    if (at::isfinite(dgh_2d).all().item<bool>()) {
      product_with_spikes<scalar_t>(s_prev_t, dgh_2d, dUt, lists);
    } else {
      at::mm_out(dUt, s_prev_t, dgh_2d);
    }
    dweight_hh = dUt.t().contiguous();
  });
  const bool has_bias = bias_hh.has_value() && bias_hh->defined();
  at::Tensor dbias_hh = has_bias ? dgh_2d.sum(0) : at::zeros({3 * H}, gi.options());
  at::Tensor dalpha = dalpha_bh.sum(0);
  return {dgi, dweight_hh, dbias_hh, dalpha, dv0, di0, ds0};
}

}  // namespace

TORCH_LIBRARY_IMPL(neurokern, CPU, m) {
  m.impl("spikgru2plus_fwd", &spikgru2plus_fwd_cpu);
  m.impl("spikgru2plus_bwd", &spikgru2plus_bwd_cpu);
}
