"""Public functional API: validates arguments, picks a backend, runs the op.

Every op takes `backend=` ("auto", "reference", "cpu", "triton", "cuda"; see
`neurokern.backends`). All arguments are checked before anything is computed; a bad argument
raises `TypeError` or `ValueError` naming it.
"""

import math
import numbers

import torch

from neurokern import dispatch as _dispatch
from neurokern import reference as _reference

__all__ = ["spike", "signed_spike", "plif", "spikgru2plus", "spikgru2plus_bidirectional"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (*_HALF_DTYPES, torch.float32, torch.float64)  # float8: no arithmetic to run


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:  # sparse, nested: the kernels address memory by strides
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got dtype {t.dtype}")


def _check_like(name, t, x, *, parameter=False):
    """`t` is a float tensor on `x`'s device with `x`'s dtype.

    A parameter (weight, bias, leak) may also be float32 when `x` is float16/bfloat16: mixed
    precision keeps parameters in float32 and the kernels compute in float32 anyway.
    """
    _check_tensor(name, t)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype and not (parameter and t.dtype == torch.float32 and x.dtype in _HALF_DTYPES):
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")


def _check_shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _shown(value):
    """`value` for an error message: an int too large for a float by its size (printing an int
    of 4300+ digits raises)."""
    if isinstance(value, numbers.Integral) and abs(int(value)).bit_length() > 64:
        return f"an integer of {abs(int(value)).bit_length()} bits"
    return repr(value)


def _check_real(name, value):
    """`value` as a finite float (TypeError unless a real number, bool excluded; ValueError if
    NaN, infinite or beyond float's range, as a huge int is)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {_shown(value)}")
    return result


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if torch.compiler.is_compiling():  # the value may be symbolic (dynamic=True): no isfinite
        torch._check(value > 0)
    elif not (_check_real(name, value) > 0):
        raise ValueError(f"{name} must be positive and finite, got {_shown(value)}")


def _check_flag(name, value):
    """`value` as a bool: True, False (also numpy's) or the ints 0 and 1; anything else, such
    as the string "no" that bool() would take for True, is a TypeError."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy"
                                   and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {_shown(value)}")


def _check_flags(**flags):
    """The values of `flags` (name=value) checked by `_check_flag`, in order."""
    return tuple(_check_flag(name, value) for name, value in flags.items())


def _check_choice(name, value, choices):
    """`value` is one of the strings `choices` (ValueError naming `name` otherwise)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_time(x, time_dim):
    if x.shape[time_dim] == 0:
        raise ValueError(f"x has T = 0 time steps (dim {time_dim} of shape {list(x.shape)})")


def _run(op, backend, x, *args, variant_op=None, **kwargs):
    _, impl = _dispatch.resolve(op, backend, x.device, x.dtype, variant_op)
    return impl(x, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


def spike(x, v_th=1.0, gamma=10.0, *, spiking=True, backend="auto"):
    """Heaviside spike `1 if x >= v_th else 0` with the arctan surrogate gradient
    `1 / (1 + gamma (x - v_th)^2)` (SPEC.md 1).

    `spiking=False` returns the surrogate's primitive instead of the step (smooth mode), so the
    op is an ordinary differentiable function whose exact derivative is the surrogate.
    Output has `x`'s shape and dtype.
    """
    _check_tensor("x", x)
    _check_positive("v_th", v_th)
    _check_positive("gamma", gamma)
    spiking = _check_flag("spiking", spiking)
    _dispatch.check_backend_name(backend)
    return _run("spike", backend, x, float(v_th), float(gamma), spiking=spiking)


def signed_spike(x, v_th=1.0, gamma=10.0, *, spiking=True, backend="auto"):
    """Ternary spike `+1 if x >= v_th, -1 if x <= -v_th, else 0` with the normalised two-sided
    arctan surrogate of SPEC.md 1. See `spike` for `spiking`."""
    _check_tensor("x", x)
    _check_positive("v_th", v_th)
    _check_positive("gamma", gamma)
    spiking = _check_flag("spiking", spiking)
    _dispatch.check_backend_name(backend)
    return _run("signed_spike", backend, x, float(v_th), float(gamma), spiking=spiking)


def plif(
    x,
    alpha,
    *,
    v_th=1.0,
    gamma=10.0,
    signed=False,
    batch_first=False,
    state=None,
    return_state=False,
    detach_reset=False,
    spiking=True,
    backend="auto",
    reset="soft",
    v_reset=0.0,
    reset_before_leak=False,
    decay_input=False,
    strict_threshold=False,
    surrogate="atan",
    surrogate_scale=1.0,
    spike_dtype=None,
):
    """Multi-step PLIF neuron (SPEC.md 2), all T steps in one call.

        v_t = alpha * v_{t-1} + x_t - v_th * s_{t-1},   s_t = act(v_t)

    The defaults are the paper's PLIF; the other options (docs/neurons.md) cover SpikingJelly's
    and snnTorch's leaky neurons, with `v_rest = v_reset` for a hard reset (else 0),
    `c = 1 - alpha` with `decay_input` (else 1) and the reset map `R(h, s)`: soft
    `h - v_th s`, hard `h (1 - s) + v_reset s`, none `h`:

        reset_before_leak=False:  h_t = R(alpha h_{t-1} + (1 - alpha) v_rest + c x_t, s_{t-1})
        reset_before_leak=True:   h_t = alpha u_{t-1} + (1 - alpha) v_rest + c x_t,
                                  u_t = R(h_t, s_t)
        s_t = fire(h_t - v_th)

    Args:
        x: input current `[T, B, C, ...]`, or `[B, T, C, ...]` with `batch_first=True`.
        alpha: leak per channel, a `[C]` tensor (channel = dim 2), or a scalar (float or 0-d
            tensor). `alpha=1.0` is the IF neuron.
        v_th, gamma: threshold and surrogate sharpness, both > 0.
        signed: use `signed_spike` instead of `spike`.
        state: initial `(v_0, s_0)`, each `[B, C, ...]`; zeros if None.
        return_state: also return the final `(v_T, s_T)` (to carry into the next chunk).
        detach_reset: stop the gradient through the spikes in the reset (default off, as the
            paper).
        spiking: False for smooth mode (see `spike`).
        reset: "soft" (subtract `v_th s`, the paper), "hard" (set to `v_reset`) or "none".
        v_reset: the membrane after a hard reset, and the resting potential the leak decays
            to (used only with `reset="hard"`).
        reset_before_leak: False: the reset of step t-1 is subtracted in step t after the leak
            (the paper; the carried state is h); True: the reset is applied in the step that
            fires, before the next leak (SpikingJelly; the carried state is u, and `s_0` is not
            used).
        decay_input: scale the input by `1 - alpha` (SpikingJelly's `decay_input=True`).
        strict_threshold: fire on `h > v_th` (snnTorch) instead of `h >= v_th`.
        surrogate: "atan" (`surrogate_scale / (1 + gamma u^2)`) or "sigmoid"
            (`surrogate_scale gamma sig(gamma u) (1 - sig(gamma u))`), at `u = h - v_th`.
        surrogate_scale: the factor of the surrogate derivative, > 0.
        spike_dtype: the dtype of `s`: None (x's) or x's compute dtype, float32 for a
            float16/bfloat16 `x` (snnTorch's spikes are float32): written by the kernel, with
            no conversion pass, and its gradient read as it comes. The state keeps x's dtype.

    Returns:
        spikes `s` shaped like `x`, or `(s, (v_T, s_T))` if `return_state`: `v_T` is the
        carried state (h, or u with `reset_before_leak`).
    """
    (signed, batch_first, return_state, detach_reset, spiking, reset_before_leak, decay_input,
     strict_threshold) = _check_flags(
        signed=signed, batch_first=batch_first, return_state=return_state,
        detach_reset=detach_reset, spiking=spiking, reset_before_leak=reset_before_leak,
        decay_input=decay_input, strict_threshold=strict_threshold)
    _check_choice("reset", reset, _reference.RESETS)
    _check_choice("surrogate", surrogate, _reference.SURROGATES)
    if signed and reset == "hard":
        raise ValueError("signed=True cannot be combined with reset='hard' (a hard reset to "
                         "v_reset after a negative spike is not defined)")
    if signed and surrogate == "sigmoid":
        raise ValueError("signed=True cannot be combined with surrogate='sigmoid' (the signed "
                         "spike has the two-sided atan surrogate only)")
    v_reset = float(v_reset) if torch.compiler.is_compiling() else _check_real("v_reset", v_reset)
    _check_positive("surrogate_scale", surrogate_scale)
    _check_tensor("x", x)
    if x.dim() < 3:
        layout = "[B, T, C, ...]" if batch_first else "[T, B, C, ...]"
        raise ValueError(f"x must have shape {layout} (rank >= 3), got shape {list(x.shape)}")
    time_dim = 1 if batch_first else 0
    _check_time(x, time_dim)
    channels = x.shape[2]
    if isinstance(alpha, torch.Tensor):
        _check_like("alpha", alpha, x, parameter=True)
        if alpha.dim() > 1 or (alpha.dim() == 1 and alpha.shape[0] != channels):
            raise ValueError(
                f"alpha must be a scalar or have shape [C] = [{channels}] (C = dim 2 of x), "
                f"got shape {list(alpha.shape)}"
            )
    elif isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a tensor or a real number, got {type(alpha).__name__}")
    else:
        alpha = float(alpha) if torch.compiler.is_compiling() else _check_real("alpha", alpha)
    _check_positive("v_th", v_th)
    _check_positive("gamma", gamma)
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError("state must be a pair (v_0, s_0) of tensors")
        step_shape = x.shape[:time_dim] + x.shape[time_dim + 1:]
        for name, t in zip(("state[0] (v_0)", "state[1] (s_0)"), state):
            _check_like(name, t, x)
            _check_shape(name, t, step_shape)
        state = tuple(state)
    if _reference.spike_dtype_of(x.dtype, spike_dtype) == x.dtype:
        spike_dtype = None  # the default call
    _dispatch.check_backend_name(backend)
    # The paper's PLIF, or the generalised neuron: its own GPU variants (docs/neurons.md)
    general = (reset, reset_before_leak, decay_input, strict_threshold, surrogate,
               float(surrogate_scale)) != ("soft", False, False, False, "atan", 1.0)
    return _run(
        "plif", backend, x, alpha, variant_op="plif_general" if general else None,
        v_th=float(v_th), gamma=float(gamma), signed=signed, batch_first=batch_first,
        state=state, return_state=return_state, detach_reset=detach_reset, spiking=spiking,
        reset=reset, v_reset=v_reset, reset_before_leak=reset_before_leak,
        decay_input=decay_input, strict_threshold=strict_threshold, surrogate=surrogate,
        surrogate_scale=float(surrogate_scale), spike_dtype=spike_dtype,
    )


def spikgru2plus(
    x,
    weight_ih,
    weight_hh,
    bias_ih,
    bias_hh,
    alpha,
    *,
    v_th=1.0,
    gamma=10.0,
    signed=True,
    reset_gate=True,
    batch_first=False,
    state=None,
    spiking=True,
    spike_input=False,
    lengths=None,
    backend="auto",
):
    """One SpikGRU2+ layer in one direction over a whole sequence (SPEC.md 3, paper eqs. 10-14).

        r_t = sigmoid(W_r x_t + b_ir + U_r s_{t-1} + b_hr)       (1 if not reset_gate)
        z_t = sigmoid(W_z x_t + b_iz + U_z s_{t-1} + b_hz)
        i_t = alpha * i_{t-1} + W_i x_t + b_ii + (U_i s_{t-1} + b_hi) * r_t
        v_t = z_t * v_{t-1} + (1 - z_t) * i_t - v_th * s_{t-1}
        s_t = signed_spike(v_t)                                  (spike if not signed)

    Args:
        x: `[T, B, I]`, or `[B, T, I]` with `batch_first=True`.
        weight_ih: `[3H, I]`, weight_hh: `[3H, H]`, rows in (r, z, i) order like `nn.GRU`.
        bias_ih, bias_hh: `[3H]` or None.
        alpha: leak of the input current, `[H]`.
        state: initial `(v_0, i_0, s_0)`, each `[B, H]`; zeros if None.
        spike_input: x holds spikes: every value is 0 or +-c for one c that bfloat16 represents
            exactly (spikes of a previous layer, also after dropout with p = 0.2 or 0.5, whose
            scale 1 / (1 - p) is 1.25 or 2). With NEUROKERN_SPLIT_PRODUCTS=1, the Triton and
            CUDA backends then compute the float32 products with x (`x W^T`, `dW = dgi^T x`) as
            exact bf16 tensor-core products of x and a three-way bf16 split of the other factor
            (docs/kernels.md). It is a promise: those products use x rounded to bfloat16. The
            reference and the C++ CPU backend ignore it. `nn.SpikGRU2Plus` sets it for its
            layers after the first in spiking mode.
        lengths: the valid steps of each row for a batch of sequences of different lengths
            padded to T, an integer tensor `[B]` (on the CPU or x's device) with values in
            [0, T]; None: all T. Row b runs steps t < lengths[b] only, inside every backend's
            time loop: after its last step its state stays unchanged (the final state returned
            is the state after its own last step) and its spikes are 0, as `nn.GRU`'s padded
            output of a packed batch. Values are checked only for a CPU tensor (reading a
            device tensor would wait for the device).

    Returns:
        `(s, (v_T, i_T, s_T))`: spikes `[T, B, H]` (or `[B, T, H]`) and the final state.
    """
    signed, reset_gate, batch_first, spiking, spike_input = _check_flags(
        signed=signed, reset_gate=reset_gate, batch_first=batch_first, spiking=spiking,
        spike_input=spike_input)
    hidden = _check_spikgru2plus_args(x, (weight_ih, weight_hh, bias_ih, bias_hh, alpha),
                                      batch_first, v_th, gamma)
    state = _check_spikgru2plus_state(state, x, batch_first, (), hidden)
    _check_lengths(lengths, x, batch_first)
    _dispatch.check_backend_name(backend)
    return _run(
        "spikgru2plus", backend, x, weight_ih, weight_hh, bias_ih, bias_hh, alpha,
        v_th=float(v_th), gamma=float(gamma), signed=signed, reset_gate=reset_gate,
        batch_first=batch_first, state=state, spiking=spiking, spike_input=spike_input,
        lengths=lengths,
    )


def spikgru2plus_bidirectional(
    x,
    params,
    reverse_params,
    *,
    v_th=1.0,
    gamma=10.0,
    signed=True,
    reset_gate=True,
    batch_first=False,
    state=None,
    spiking=True,
    spike_input=False,
    lengths=None,
    backend="auto",
):
    """One bidirectional SpikGRU2+ layer (`nn.GRU`'s convention): `spikgru2plus` over x with
    `params`, and over x reversed in time with `reverse_params` (its spikes reversed back), the
    two concatenated on the feature dim. The Triton backend runs both directions in one launch
    per step.

    Args:
        x: `[T, B, I]`, or `[B, T, I]` with `batch_first=True`.
        params, reverse_params: `(weight_ih, weight_hh, bias_ih, bias_hh, alpha)` of each
            direction, shaped as for `spikgru2plus` (the same H for both).
        state: initial `(v_0, i_0, s_0)`, each `[2, B, H]` (forward, reverse); zeros if None.
        spike_input: as for `spikgru2plus`.
        lengths: `[B]` valid steps per row, as for `spikgru2plus`; the reverse direction
            starts at each row's own last step (`nn.GRU` with a packed batch).

    Returns:
        `(s, (v_T, i_T, s_T))`: spikes `[T, B, 2H]` (or `[B, T, 2H]`) and the final states, each
        `[2, B, H]`.
    """
    signed, reset_gate, batch_first, spiking, spike_input = _check_flags(
        signed=signed, reset_gate=reset_gate, batch_first=batch_first, spiking=spiking,
        spike_input=spike_input)
    for name, p in (("params", params), ("reverse_params", reverse_params)):
        if not isinstance(p, (tuple, list)) or len(p) != 5:
            raise TypeError(f"{name} must be (weight_ih, weight_hh, bias_ih, bias_hh, alpha)")
    hidden = _check_spikgru2plus_args(x, params, batch_first, v_th, gamma)
    if _check_spikgru2plus_args(x, reverse_params, batch_first, v_th, gamma) != hidden:
        raise ValueError(f"the two directions have different hidden sizes: {hidden} and "
                         f"{reverse_params[1].shape[1]}")
    if (params[2] is None) != (reverse_params[2] is None) or \
            (params[3] is None) != (reverse_params[3] is None):
        raise ValueError("both directions must have biases, or neither")
    state = _check_spikgru2plus_state(state, x, batch_first, (2,), hidden)
    _check_lengths(lengths, x, batch_first)
    _dispatch.check_backend_name(backend)
    return _run(
        "spikgru2plus_bidirectional", backend, x, tuple(params), tuple(reverse_params),
        v_th=float(v_th), gamma=float(gamma), signed=signed, reset_gate=reset_gate,
        batch_first=batch_first, state=state, spiking=spiking, spike_input=spike_input,
        lengths=lengths,
    )


def _check_spikgru2plus_args(x, params, batch_first, v_th, gamma):
    """Checks x and one direction's `(weight_ih, weight_hh, bias_ih, bias_hh, alpha)`;
    returns H."""
    weight_ih, weight_hh, bias_ih, bias_hh, alpha = params
    _check_tensor("x", x)
    if x.dim() != 3:
        layout = "[B, T, I]" if batch_first else "[T, B, I]"
        raise ValueError(f"x must have shape {layout} (rank 3), got shape {list(x.shape)}")
    time_dim = 1 if batch_first else 0
    _check_time(x, time_dim)
    input_size = x.shape[2]
    _check_like("weight_hh", weight_hh, x, parameter=True)
    if weight_hh.dim() != 2 or weight_hh.shape[0] != 3 * weight_hh.shape[1]:
        raise ValueError(f"weight_hh must have shape [3H, H], got {list(weight_hh.shape)}")
    hidden = weight_hh.shape[1]
    _check_like("weight_ih", weight_ih, x, parameter=True)
    if weight_ih.dim() != 2 or weight_ih.shape[0] != 3 * hidden:
        raise ValueError(
            f"weight_ih must have shape [3H, I] = [{3 * hidden}, I] (H = {hidden} from "
            f"weight_hh), got {list(weight_ih.shape)}"
        )
    if weight_ih.shape[1] != input_size:
        raise ValueError(
            f"weight_ih has input size {weight_ih.shape[1]} but x has input size {input_size}"
        )
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None:
            _check_like(name, b, x, parameter=True)
            _check_shape(name, b, (3 * hidden,))
    _check_like("alpha", alpha, x, parameter=True)
    _check_shape("alpha", alpha, (hidden,))
    _check_positive("v_th", v_th)
    _check_positive("gamma", gamma)
    return hidden


def _check_spikgru2plus_state(state, x, batch_first, leading, hidden):
    """`state` as a tuple after checking it is None or three tensors `[*leading, B, H]`."""
    if state is None:
        return None
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise TypeError("state must be a triple (v_0, i_0, s_0) of tensors")
    batch = x.shape[0 if batch_first else 1]
    for name, t in zip(("state[0] (v_0)", "state[1] (i_0)", "state[2] (s_0)"), state):
        _check_like(name, t, x)
        _check_shape(name, t, (*leading, batch, hidden))
    return tuple(state)


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_lengths(lengths, x, batch_first):
    """`lengths` is None or an integer tensor `[B]` on the CPU or x's device; on the CPU, its
    values are in [0, T]."""
    if lengths is None:
        return
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor of integers or None, got "
                        f"{type(lengths).__name__}")
    if lengths.dtype not in _INT_DTYPES:
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    time_dim = 1 if batch_first else 0
    steps, batch = x.shape[time_dim], x.shape[1 - time_dim]
    _check_shape("lengths", lengths, (batch,))
    if lengths.device.type != "cpu" and lengths.device != x.device:
        raise ValueError(f"lengths is on {lengths.device}; it must be on the CPU or on x's "
                         f"device {x.device}")
    if lengths.device.type == "cpu" and batch and not torch.compiler.is_compiling():
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or high > steps:
            raise ValueError(f"lengths must be in [0, T] = [0, {steps}], got values from {low} "
                             f"to {high}")
