"""Spike activations and their surrogate derivatives as Triton device functions (SPEC.md 1),
shared by the elementwise kernels and the time loops.

All arithmetic happens in the dtype of `v` (float32 for half inputs, float64 for float64).
`v_th` and `gamma` are scalars of that same dtype, loaded from memory by the caller, because a
Python float argument would reach the kernel as float32 and break float64 exactness.
"""

import triton
import triton.language as tl


@triton.jit
def atan(x):
    """Arctangent from sqrt and division only (libdevice is not available in the interpreter).

    Five argument halvings, atan(x) = 2 atan(x / (1 + sqrt(1 + x^2))), bring any x into
    |y| <= 0.05, where the odd Taylor series to y^13 is exact to float64 rounding. Only smooth
    mode (gradient checks) uses it, so its cost does not matter.
    """
    one = tl.full(x.shape, 1, x.dtype)  # not x * 0 + 1: NaN for x = +-inf
    y = x
    for _ in tl.static_range(5):
        big = tl.abs(y) > 1
        inv = one / tl.where(big, y, one)  # 1/y where |y| > 1, avoiding overflow of y^2
        halved_big = tl.where(y >= 0, one, -one) / (tl.abs(inv) + tl.sqrt(inv * inv + 1))
        small = tl.where(big, 0, y)  # y^2 only where it cannot overflow
        halved_small = small / (1 + tl.sqrt(small * small + 1))
        y = tl.where(big, halved_big, halved_small)
    y2 = y * y
    series = one / 13
    for k in tl.static_range(5, -1, -1):  # 1/11, 1/9, ..., 1/1 with alternating signs
        series = one / (2 * k + 1) - y2 * series
    return 32 * y * series


@triton.jit
def spike_act(v, v_th, gamma, SIGNED: tl.constexpr, SPIKING: tl.constexpr):
    """spike(v) or signed_spike(v); their smooth primitives when not SPIKING."""
    if SPIKING:
        s = tl.where(v >= v_th, 1, 0).to(v.dtype)
        if SIGNED:
            s = s - tl.where(v <= -v_th, 1, 0).to(v.dtype)
    else:
        sg = tl.sqrt(gamma)
        if SIGNED:
            c = 1 + 1 / (1 + 4 * gamma * v_th * v_th)
            s = (atan(sg * (v - v_th)) + atan(sg * (v + v_th))) / (c * sg)
        else:
            s = 0.5 + atan(sg * (v - v_th)) / sg
    return s


@triton.jit
def spike_surrogate(v, v_th, gamma, SIGNED: tl.constexpr):
    """The arctan surrogate derivative of spike / signed_spike at v (peak 1)."""
    d = v - v_th
    g = 1 / (1 + gamma * d * d)
    if SIGNED:
        e = v + v_th
        c = 1 + 1 / (1 + 4 * gamma * v_th * v_th)
        g = (g + 1 / (1 + gamma * e * e)) / c
    return g


# The generalised neuron's spike and surrogate (docs/neurons.md); the paper's PLIF keeps
# spike_act / spike_surrogate above.


@triton.jit
def fire_act(v, v_th, gamma, fire_th, scale, SIGNED: tl.constexpr, SPIKING: tl.constexpr,
             SIGMOID: tl.constexpr):
    """fire(v - v_th): v >= fire_th (fire_th = v_th, or the next float above it for a strict
    threshold; signed: minus v <= -fire_th); smooth: the surrogate's primitive times scale."""
    if SPIKING:
        s = tl.where(v >= fire_th, 1, 0).to(v.dtype)
        if SIGNED:
            s = s - tl.where(v <= -fire_th, 1, 0).to(v.dtype)
    elif SIGMOID:
        s = scale * (1 / (1 + tl.exp(-(gamma * (v - v_th)))))
    else:
        sg = tl.sqrt(gamma)
        if SIGNED:
            c = 1 + 1 / (1 + 4 * gamma * v_th * v_th)
            s = scale * (atan(sg * (v - v_th)) + atan(sg * (v + v_th))) / (c * sg)
        else:
            s = 0.5 + scale * atan(sg * (v - v_th)) / sg
    return s


@triton.jit
def fire_surrogate(v, v_th, gamma, scale, SIGNED: tl.constexpr, SIGMOID: tl.constexpr):
    """The surrogate derivative of fire_act at v, times scale: atan (signed: SPEC.md 1's), or
    sigmoid scale gamma e / (1 + e)^2 with e = exp(-gamma |v - v_th|) (no overflow)."""
    d = v - v_th
    if SIGMOID:
        e = tl.exp(-(gamma * tl.abs(d)))
        g = scale * gamma * e / ((1 + e) * (1 + e))
    else:
        g = 1 / (1 + gamma * d * d)
        if SIGNED:
            e = v + v_th
            c = 1 + 1 / (1 + 4 * gamma * v_th * v_th)
            g = (g + 1 / (1 + gamma * e * e)) / c
        g = scale * g
    return g
