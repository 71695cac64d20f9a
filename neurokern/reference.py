"""Pure-PyTorch reference of every neurokern op: the executable form of SPEC.md.

This module is the oracle every fused kernel is tested against, the documentation of the
semantics, and the fallback backend. It favours clarity over speed: the time loops are plain
Python loops over steps. It accepts any floating dtype on any device; float16/bfloat16 inputs
are computed with float32 state (as the fused kernels do) and returned in the input dtype.

Arguments are not validated here; `neurokern.functional` validates before dispatching.
"""

import math

import torch

__all__ = [
    "surrogate_spike",
    "surrogate_signed_spike",
    "spike",
    "signed_spike",
    "plif",
    "surrogate_sigmoid",
    "spikgru2plus",
    "spikgru2plus_bidirectional",
    "step_mask",
    "reverse_within_lengths",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the state and arithmetic for inputs of `dtype`: float32 for half types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def spike_dtype_of(x_dtype: torch.dtype, spike_dtype) -> torch.dtype:
    """The dtype of plif's spikes: x's (spike_dtype None), or spike_dtype if it is x's or x's
    compute dtype; anything else is refused."""
    if spike_dtype is None:
        return x_dtype
    if not isinstance(spike_dtype, torch.dtype):
        raise TypeError(f"spike_dtype must be a torch.dtype or None, got "
                        f"{type(spike_dtype).__name__}")
    if spike_dtype not in (x_dtype, compute_dtype(x_dtype)):
        raise ValueError(f"spike_dtype must be x's dtype {x_dtype} or its compute dtype "
                         f"{compute_dtype(x_dtype)}, got {spike_dtype}")
    return spike_dtype


# ---------------------------------------------------------------------------------------------
# Spike activations (SPEC.md 1)
# ---------------------------------------------------------------------------------------------


def signed_spike_scale(v_th: float, gamma: float) -> float:
    """The normaliser `c = 1 + 1 / (1 + 4 gamma v_th^2)` that makes the signed surrogate peak at 1."""
    return 1.0 + 1.0 / (1.0 + 4.0 * gamma * v_th * v_th)


def surrogate_spike(v: torch.Tensor, v_th: float, gamma: float) -> torch.Tensor:
    """Surrogate derivative of `spike`: `1 / (1 + gamma (v - v_th)^2)`."""
    return 1.0 / (1.0 + gamma * (v - v_th) ** 2)


def surrogate_signed_spike(v: torch.Tensor, v_th: float, gamma: float) -> torch.Tensor:
    """Surrogate derivative of `signed_spike`: the spike surrogate at `+v_th` plus the one at
    `-v_th`, scaled by `1/c` so that its maximum is 1."""
    c = signed_spike_scale(v_th, gamma)
    return (1.0 / (1.0 + gamma * (v - v_th) ** 2) + 1.0 / (1.0 + gamma * (v + v_th) ** 2)) / c


def _spike_forward(v, v_th, gamma, spiking):
    if spiking:
        return (v >= v_th).to(v.dtype)
    sg = math.sqrt(gamma)
    return 0.5 + torch.atan(sg * (v - v_th)) / sg


def _signed_spike_forward(v, v_th, gamma, spiking):
    if spiking:
        return (v >= v_th).to(v.dtype) - (v <= -v_th).to(v.dtype)
    sg = math.sqrt(gamma)
    c = signed_spike_scale(v_th, gamma)
    return (torch.atan(sg * (v - v_th)) + torch.atan(sg * (v + v_th))) / (c * sg)


class SpikeFunction(torch.autograd.Function):
    """`spike(v)` forward (the step, or its smooth primitive), arctan surrogate backward.
    Half inputs are computed in float32, like everywhere in neurokern."""

    @staticmethod
    def forward(ctx, v, v_th, gamma, spiking):
        ctx.save_for_backward(v)
        ctx.v_th, ctx.gamma = v_th, gamma
        return _spike_forward(v.to(compute_dtype(v.dtype)), v_th, gamma, spiking).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_s):
        (v,) = ctx.saved_tensors
        surrogate = surrogate_spike(v.to(compute_dtype(v.dtype)), ctx.v_th, ctx.gamma)
        return (grad_s * surrogate).to(v.dtype), None, None, None


class SignedSpikeFunction(torch.autograd.Function):
    """`signed_spike(v)` forward (the ternary step, or its smooth primitive), surrogate
    backward. Half inputs are computed in float32."""

    @staticmethod
    def forward(ctx, v, v_th, gamma, spiking):
        ctx.save_for_backward(v)
        ctx.v_th, ctx.gamma = v_th, gamma
        return _signed_spike_forward(v.to(compute_dtype(v.dtype)), v_th, gamma,
                                     spiking).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_s):
        (v,) = ctx.saved_tensors
        surrogate = surrogate_signed_spike(v.to(compute_dtype(v.dtype)), ctx.v_th, ctx.gamma)
        return (grad_s * surrogate).to(v.dtype), None, None, None


def spike(v: torch.Tensor, v_th: float = 1.0, gamma: float = 10.0, spiking: bool = True):
    """`1` where `v >= v_th` else `0`; backward `1 / (1 + gamma (v - v_th)^2)`.

    With `spiking=False` the forward is the surrogate's primitive
    `0.5 + atan(sqrt(gamma) (v - v_th)) / sqrt(gamma)`, so the backward is its exact derivative.
    """
    return SpikeFunction.apply(v, v_th, gamma, spiking)


def signed_spike(v: torch.Tensor, v_th: float = 1.0, gamma: float = 10.0, spiking: bool = True):
    """`+1` where `v >= v_th`, `-1` where `v <= -v_th`, else `0`; surrogate backward of SPEC.md 1.

    With `spiking=False` the forward is the primitive
    `[atan(sqrt(gamma) (v - v_th)) + atan(sqrt(gamma) (v + v_th))] / (c sqrt(gamma))`.
    """
    return SignedSpikeFunction.apply(v, v_th, gamma, spiking)


def activation(signed: bool):
    """The spike activation of a layer: `signed_spike` if `signed` else `spike`."""
    return signed_spike if signed else spike


# ---------------------------------------------------------------------------------------------
# PLIF / IF neuron (SPEC.md 2)
# ---------------------------------------------------------------------------------------------


# The options of the generalised neuron (docs/neurons.md) and their defaults, which are the
# paper's PLIF; `neurokern.functional.plif` checks them, every backend takes them.
RESETS = ("soft", "hard", "none")
SURROGATES = ("atan", "sigmoid")
NEURON_DEFAULTS = dict(reset="soft", v_reset=0.0, reset_before_leak=False, decay_input=False,
                       strict_threshold=False, surrogate="atan", surrogate_scale=1.0)


def surrogate_sigmoid(v: torch.Tensor, v_th: float, gamma: float) -> torch.Tensor:
    """Sigmoid surrogate derivative: `gamma sig(gamma (v - v_th)) (1 - sig(gamma (v - v_th)))`."""
    sg = torch.sigmoid(gamma * (v - v_th))
    return gamma * sg * (1 - sg)


def _fire_forward(v, v_th, gamma, signed, spiking, strict, surrogate, scale):
    if spiking:
        above = (v > v_th) if strict else (v >= v_th)
        if not signed:
            return above.to(v.dtype)
        below = (v < -v_th) if strict else (v <= -v_th)
        return above.to(v.dtype) - below.to(v.dtype)
    if surrogate == "sigmoid":
        return scale * torch.sigmoid(gamma * (v - v_th))
    sg = math.sqrt(gamma)
    if signed:
        c = signed_spike_scale(v_th, gamma)
        return scale * (torch.atan(sg * (v - v_th)) + torch.atan(sg * (v + v_th))) / (c * sg)
    return 0.5 + scale * torch.atan(sg * (v - v_th)) / sg


def _fire_surrogate(v, v_th, gamma, signed, surrogate, scale):
    if surrogate == "sigmoid":
        return scale * surrogate_sigmoid(v, v_th, gamma)
    if signed:
        c = signed_spike_scale(v_th, gamma)
        return scale * (1.0 / (1.0 + gamma * (v - v_th) ** 2)
                        + 1.0 / (1.0 + gamma * (v + v_th) ** 2)) / c
    return scale / (1.0 + gamma * (v - v_th) ** 2)


class FireFunction(torch.autograd.Function):
    """The neuron's spike `s = fire(h - v_th)` (docs/neurons.md): `h >= v_th` (or `h > v_th`
    with `strict`; signed: also `-1` where `-h - v_th` fires), its surrogate derivative (atan
    `scale / (1 + gamma u^2)` or sigmoid `scale gamma sig(gamma u) (1 - sig(gamma u))`, signed:
    the normalised two-sided atan of SPEC.md 1 times `scale`) in backward, and in smooth mode the
    surrogate's primitive. With the defaults (not strict, atan, scale 1) it computes exactly
    `spike` / `signed_spike`."""

    @staticmethod
    def forward(ctx, v, v_th, gamma, signed, spiking, strict, surrogate, scale):
        ctx.save_for_backward(v)
        ctx.args = (v_th, gamma, signed, surrogate, scale)
        return _fire_forward(v.to(compute_dtype(v.dtype)), v_th, gamma, signed, spiking, strict,
                             surrogate, scale).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_s):
        (v,) = ctx.saved_tensors
        surrogate = _fire_surrogate(v.to(compute_dtype(v.dtype)), *ctx.args)
        return (grad_s * surrogate).to(v.dtype), None, None, None, None, None, None, None


def plif(
    x: torch.Tensor,
    alpha,
    *,
    v_th: float = 1.0,
    gamma: float = 10.0,
    signed: bool = False,
    batch_first: bool = False,
    state=None,
    return_state: bool = False,
    detach_reset: bool = False,
    spiking: bool = True,
    reset: str = "soft",
    v_reset: float = 0.0,
    reset_before_leak: bool = False,
    decay_input: bool = False,
    strict_threshold: bool = False,
    surrogate: str = "atan",
    surrogate_scale: float = 1.0,
    spike_dtype=None,
):
    """Multi-step leaky integrate-and-fire neuron; the defaults are the paper's PLIF.

    Paper (defaults): for `t = 1..T`:  `v_t = alpha * v_{t-1} + x_t - v_th * s_{t-1}`,
    `s_t = act(v_t)`. In general (docs/neurons.md), with `v_rest = v_reset` for a hard reset
    (else 0), `c = 1 - alpha` with `decay_input` (else 1) and the reset map `R(h, s)`: soft
    `h - v_th s`, hard `h (1 - s) + v_reset s`, none `h` (s detached inside R with
    `detach_reset`):

        reset_before_leak=False:  h_t = R(alpha h_{t-1} + (1 - alpha) v_rest + c x_t, s_{t-1})
                                  s_t = fire(h_t - v_th);            carried state v = h
        reset_before_leak=True:   h_t = alpha u_{t-1} + (1 - alpha) v_rest + c x_t
                                  s_t = fire(h_t - v_th);  u_t = R(h_t, s_t); carried v = u

    `fire(u)` is `u >= 0` (`u > 0` with `strict_threshold`), with the `surrogate` ("atan" or
    "sigmoid") derivative times `surrogate_scale` (see `FireFunction`).

    Args:
        x: input current, `[T, B, C, ...]` (or `[B, T, C, ...]` with `batch_first`).
        alpha: leak, a `[C]` tensor (one per channel, channel = dim 2) or a scalar
            (float or 0-d tensor). `alpha = 1` is the IF neuron.
        state: optional initial `(v_0, s_0)`, each `[B, C, ...]`; zeros if omitted (with
            `reset_before_leak`, s_0 is not used).
        return_state: also return the final `(v_T, s_T)`.
        detach_reset: stop the gradient through the spikes in the reset.
        spike_dtype: the dtype of `s` (None: x's); the state `(v_T, s_T)` keeps x's.

    Returns:
        `s` shaped like `x`, or `(s, (v_T, s_T))` with `return_state`.
    """
    dtype = compute_dtype(x.dtype)
    time_dim = 1 if batch_first else 0
    xs = x.to(dtype).unbind(time_dim)  # T tensors [B, C, ...]
    step_shape = xs[0].shape
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 1:
        # [C] -> [1, C, 1, ...] to broadcast over one step's [B, C, ...]
        alpha = alpha.to(dtype).view(1, -1, *([1] * (len(step_shape) - 2)))
    elif isinstance(alpha, torch.Tensor):
        alpha = alpha.to(dtype)
    else:  # a float: used in the compute dtype, as the fused kernels do
        alpha = torch.tensor(alpha, dtype=dtype, device=x.device)
    if state is None:
        v = torch.zeros(step_shape, dtype=dtype, device=x.device)
        s = torch.zeros(step_shape, dtype=dtype, device=x.device)
    else:
        v, s = (t.to(dtype) for t in state)

    def fire(h):
        return FireFunction.apply(h, v_th, gamma, signed, spiking, strict_threshold, surrogate,
                                  surrogate_scale)

    def reset_map(h, s):  # R(h, s)
        if detach_reset:
            s = s.detach()
        if reset == "soft":
            return h - v_th * s
        if reset == "hard":
            return h * (1 - s) + v_reset * s
        return h

    # The leak and input terms, in this order (the fused kernels add them in the same order, so
    # float64 spikes agree exactly): alpha v (+ (1 - alpha) v_reset) + (c x).
    rest = (1 - alpha) * v_reset if reset == "hard" else None
    input_scale = (1 - alpha) if decay_input else None
    spikes = []
    for x_t in xs:
        h = alpha * v
        if rest is not None:
            h = h + rest
        h = h + (input_scale * x_t if input_scale is not None else x_t)
        if reset_before_leak:
            s = fire(h)
            v = reset_map(h, s)
        else:
            v = reset_map(h, s)
            s = fire(v)
        spikes.append(s)
    out = torch.stack(spikes, time_dim).to(spike_dtype_of(x.dtype, spike_dtype))
    if return_state:
        return out, (v.to(x.dtype), s.to(x.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# SpikGRU2+ layer, one direction (SPEC.md 3)
# ---------------------------------------------------------------------------------------------


def spikgru2plus(
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih,
    bias_hh,
    alpha: torch.Tensor,
    *,
    v_th: float = 1.0,
    gamma: float = 10.0,
    signed: bool = True,
    reset_gate: bool = True,
    batch_first: bool = False,
    state=None,
    spiking: bool = True,
    spike_input: bool = False,
    lengths=None,
):
    """One SpikGRU2+ layer in one direction over a whole sequence (paper eqs. 10-14).

    With `gi = W x_t + b_ih` and `gh = U s_{t-1} + b_hh`, each split into (r, z, i) thirds:

        r_t = sigmoid(gi_r + gh_r)            (r_t = 1 when reset_gate is False)
        z_t = sigmoid(gi_z + gh_z)
        i_t = alpha * i_{t-1} + gi_i + gh_i * r_t
        v_t = z_t * v_{t-1} + (1 - z_t) * i_t - v_th * s_{t-1}
        s_t = act(v_t)                         (signed_spike, or spike when signed is False)

    Args:
        x: `[T, B, I]` (or `[B, T, I]` with `batch_first`).
        weight_ih: `W`, `[3H, I]`, rows (r, z, i) as `nn.GRU`'s (r, z, n).
        weight_hh: `U`, `[3H, H]`.
        bias_ih, bias_hh: `[3H]` or None.
        alpha: the leak of the input current `i`, `[H]`.
        state: optional initial `(v_0, i_0, s_0)`, each `[B, H]`; zeros if omitted.
        spike_input: a hint for the fused backends (`neurokern.functional.spikgru2plus`);
            the reference computes every product in the compute dtype and ignores it.
        lengths: optional `[B]` integer tensor, the number of valid steps of each row: row b
            computes steps t < lengths[b] only; after them its state stays unchanged and its
            spikes are 0 (`nn.GRU`'s padded output of a packed batch).

    Returns:
        `(s, (v_T, i_T, s_T))` with `s` `[T, B, H]` (or `[B, T, H]`); the final state of each
        row is its state after its own last step.
    """
    act = activation(signed)
    dtype = compute_dtype(x.dtype)
    time_dim = 1 if batch_first else 0
    hidden = weight_hh.shape[1]
    W, U, alpha = weight_ih.to(dtype), weight_hh.to(dtype), alpha.to(dtype)

    # The input projection does not depend on the state: one product for all steps.
    gi = torch.matmul(x.to(dtype), W.t())  # [T, B, 3H] or [B, T, 3H]
    if bias_ih is not None:
        gi = gi + bias_ih.to(dtype)
    gis = gi.unbind(time_dim)  # T tensors [B, 3H]
    batch = gis[0].shape[0]
    if state is None:
        v, i, s = (torch.zeros(batch, hidden, dtype=dtype, device=x.device) for _ in range(3))
    else:
        v, i, s = (t.to(dtype) for t in state)

    # [T, B, 1] per step, whether the row is still running (None: every row, every step)
    active = None if lengths is None else step_mask(lengths, len(gis), x.device).unsqueeze(-1)
    spikes = []
    for t, gi_t in enumerate(gis):
        v_prev, i_prev, s_prev = v, i, s
        gh_t = torch.matmul(s, U.t())  # [B, 3H]
        if bias_hh is not None:
            gh_t = gh_t + bias_hh.to(dtype)
        gi_r, gi_z, gi_i = gi_t.chunk(3, dim=1)
        gh_r, gh_z, gh_i = gh_t.chunk(3, dim=1)
        z = torch.sigmoid(gi_z + gh_z)
        if reset_gate:
            i = alpha * i + gi_i + gh_i * torch.sigmoid(gi_r + gh_r)
        else:
            i = alpha * i + gi_i + gh_i
        v = z * v + (1.0 - z) * i - v_th * s
        s = act(v, v_th, gamma, spiking)
        if active is None:
            spikes.append(s)
        else:  # a row past its length keeps its state and outputs 0
            spikes.append(torch.where(active[t], s, torch.zeros_like(s)))
            v, i, s = (torch.where(active[t], new, old)
                       for new, old in ((v, v_prev), (i, i_prev), (s, s_prev)))
    out = torch.stack(spikes, time_dim).to(x.dtype)
    return out, (v.to(x.dtype), i.to(x.dtype), s.to(x.dtype))


def spikgru2plus_bidirectional(
    x: torch.Tensor,
    params,
    reverse_params,
    *,
    v_th: float = 1.0,
    gamma: float = 10.0,
    signed: bool = True,
    reset_gate: bool = True,
    batch_first: bool = False,
    state=None,
    spiking: bool = True,
    spike_input: bool = False,
    lengths=None,
    layer=None,
):
    """One bidirectional SpikGRU2+ layer, `nn.GRU`'s convention: the forward direction runs
    `spikgru2plus` over x, the reverse direction over x reversed in time (its spikes reversed
    back), and the spikes are concatenated on the feature dim.

    Args:
        params, reverse_params: `(weight_ih, weight_hh, bias_ih, bias_hh, alpha)` of each
            direction, as for `spikgru2plus`.
        state: optional initial `(v_0, i_0, s_0)`, each `[2, B, H]` (forward, reverse).
        spike_input: passed on to `layer`.
        lengths: optional `[B]` valid steps per row, as for `spikgru2plus`; the reverse
            direction then reads each row from its own last step back to its first
            (`reverse_within_lengths`), as `nn.GRU` does with a packed batch.
        layer: the one-direction layer to compose (default `spikgru2plus`; a fused backend
            without a two-direction kernel passes its own).

    Returns:
        `(s, (v_T, i_T, s_T))` with `s` `[T, B, 2H]` (or `[B, T, 2H]`) and each final state
        `[2, B, H]`.
    """
    layer = layer or spikgru2plus
    time_dim = 1 if batch_first else 0
    outputs, finals = [], []
    for direction, p in enumerate((params, reverse_params)):
        x_dir = reverse_within_lengths(x, lengths, time_dim) if direction else x
        out, final = layer(x_dir, *p, v_th=v_th, gamma=gamma, signed=signed,
                           reset_gate=reset_gate, batch_first=batch_first, spiking=spiking,
                           spike_input=spike_input, lengths=lengths,
                           state=None if state is None else tuple(t[direction] for t in state))
        outputs.append(reverse_within_lengths(out, lengths, time_dim) if direction else out)
        finals.append(final)
    return torch.cat(outputs, 2), tuple(torch.stack(f) for f in zip(*finals))


def step_mask(lengths: torch.Tensor, steps: int, device) -> torch.Tensor:
    """`[T, B]` bool: whether step t is within row b's length (`t < lengths[b]`)."""
    return torch.arange(steps, device=device).unsqueeze(1) < lengths.to(device).unsqueeze(0)


def reverse_within_lengths(seq: torch.Tensor, lengths, time_dim: int = 0) -> torch.Tensor:
    """`seq` (`[T, B, ...]`, or `[B, T, ...]` with time_dim 1) with the first `lengths[b]` steps
    of each row b in reverse order and the steps after them in place: the order in which the
    reverse direction reads a padded batch of sequences. Its own inverse; `flip` without
    lengths."""
    if lengths is None:
        return seq.flip(time_dim)
    steps = seq.shape[time_dim]
    t = torch.arange(steps, device=seq.device).unsqueeze(1)  # [T, 1]
    length = lengths.to(seq.device).unsqueeze(0)  # [1, B]
    index = torch.where(t < length, length - 1 - t, t)  # [T, B]
    if time_dim == 1:
        index = index.t()
    index = index.reshape(index.shape + (1,) * (seq.dim() - 2)).expand(seq.shape)
    return seq.gather(time_dim, index)
