"""Drop-in modules: spike activations, PLIF / IF neurons, and SpikGRU2Plus (replaces nn.GRU).

All modules run through `neurokern.functional`, so they use whichever backend is selected
(`backend=` argument, or `NEUROKERN_BACKEND`).
"""

import math
import numbers
import struct
import warnings

import torch
from torch import nn
from torch.nn import functional as torch_F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from neurokern import dispatch
from neurokern import functional as F

__all__ = ["Spike", "SignedSpike", "PLIF", "IF", "SpikGRU2Plus", "clamp_leaks_"]


def _check_options(v_th, gamma, backend, **flags):
    """A module's options checked when it is built (a bad one raises there, not at the first
    forward): v_th, gamma and backend as `neurokern.functional` checks them; returns the
    `flags` (name=value) as bools."""
    F._check_positive("v_th", v_th)
    F._check_positive("gamma", gamma)
    dispatch.check_backend_name(backend)
    return F._check_flags(**flags)


class _Activation(nn.Module):
    _op = None  # staticmethod set by subclasses

    def __init__(self, v_th=1.0, gamma=10.0, *, spiking=True, backend="auto"):
        super().__init__()
        (spiking,) = _check_options(v_th, gamma, backend, spiking=spiking)
        self.v_th, self.gamma, self.spiking, self.backend = v_th, gamma, spiking, backend

    def forward(self, x):
        return type(self)._op(x, self.v_th, self.gamma, spiking=self.spiking, backend=self.backend)

    def extra_repr(self):
        return f"v_th={self.v_th}, gamma={self.gamma}, spiking={self.spiking}, backend={self.backend!r}"


class Spike(_Activation):
    """`spike(x)`: 1 where `x >= v_th` else 0, arctan surrogate gradient (SPEC.md 1)."""

    _op = staticmethod(F.spike)


class SignedSpike(_Activation):
    """`signed_spike(x)`: +1 / 0 / -1 around `±v_th`, two-sided surrogate gradient (SPEC.md 1)."""

    _op = staticmethod(F.signed_spike)


class PLIF(nn.Module):
    """Parametric leaky integrate-and-fire neuron over all time steps (SPEC.md 2).

        v_t = alpha * v_{t-1} + x_t - v_th * s_{t-1},   s_t = act(v_t)

    Args:
        channels: number of channels C (dim 2 of the input); one leak per channel. None for a
            single scalar leak shared by all neurons.
        alpha_init: initial leak (0.9 in the paper).
        learnable: whether the leak is a trained parameter (else a buffer).
        leak: "direct" trains `alpha` itself (the paper; clamp it into [0, 1] after each
            optimiser step with `clamp_leaks_`); "sigmoid" trains `alpha_logit` with
            `alpha = sigmoid(alpha_logit)` (Fang et al. 2021), which needs no clamping.
        signed: ternary `signed_spike` instead of `spike`.
        batch_first: input is `[B, T, C, ...]` instead of `[T, B, C, ...]`.
        detach_reset: stop the gradient through the reset (default off, as the paper).
        spiking: False for smooth mode (SPEC.md 1), used by gradient checks.

    Shape: input `[T, B, C, ...]` (or `[B, T, C, ...]`), output the same.
    """

    def __init__(
        self,
        channels,
        *,
        alpha_init=0.9,
        learnable=True,
        leak="direct",
        v_th=1.0,
        gamma=10.0,
        signed=False,
        batch_first=False,
        detach_reset=False,
        spiking=True,
        backend="auto",
    ):
        super().__init__()
        if leak not in ("direct", "sigmoid"):
            raise ValueError(f"leak must be 'direct' or 'sigmoid', got {leak!r}")
        if channels is not None and (
            isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1
        ):
            raise ValueError(f"channels must be a positive integer or None, got {channels!r}")
        learnable, signed, batch_first, detach_reset, spiking = _check_options(
            v_th, gamma, backend, learnable=learnable, signed=signed, batch_first=batch_first,
            detach_reset=detach_reset, spiking=spiking)
        alpha_init = F._check_real("alpha_init", alpha_init)
        if leak == "sigmoid" and not 0.0 < alpha_init < 1.0:
            raise ValueError(f"leak='sigmoid' needs 0 < alpha_init < 1, got {alpha_init}")
        self.channels, self.leak, self.learnable = channels, leak, learnable
        self.v_th, self.gamma, self.signed = v_th, gamma, signed
        self.batch_first, self.detach_reset, self.spiking, self.backend = (
            batch_first, detach_reset, spiking, backend)
        shape = () if channels is None else (channels,)
        init = alpha_init if leak == "direct" else math.log(alpha_init / (1.0 - alpha_init))
        value = torch.full(shape, float(init))
        name = "alpha" if leak == "direct" else "alpha_logit"
        if learnable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def leak_value(self):
        """The leak `alpha` as used in the equation (`[C]` or scalar tensor)."""
        return self.alpha if self.leak == "direct" else torch.sigmoid(self.alpha_logit)

    def forward(self, x, state=None, *, return_state=False):
        """`x` `[T, B, C, ...]` -> spikes of the same shape; with `return_state`, also the final
        `(v_T, s_T)`, which can be passed back as `state` to continue a stream."""
        return F.plif(
            x, self.leak_value(), v_th=self.v_th, gamma=self.gamma, signed=self.signed,
            batch_first=self.batch_first, state=state, return_state=return_state,
            detach_reset=self.detach_reset, spiking=self.spiking, backend=self.backend,
        )

    def extra_repr(self):
        return (f"channels={self.channels}, leak={self.leak!r}, learnable={self.learnable}, "
                f"v_th={self.v_th}, gamma={self.gamma}, signed={self.signed}, "
                f"batch_first={self.batch_first}, backend={self.backend!r}")


class IF(nn.Module):
    """Integrate-and-fire neuron: PLIF with `alpha = 1`, nothing learnable (the pooling layers)."""

    def __init__(self, *, v_th=1.0, gamma=10.0, signed=False, batch_first=False,
                 detach_reset=False, spiking=True, backend="auto"):
        super().__init__()
        signed, batch_first, detach_reset, spiking = _check_options(
            v_th, gamma, backend, signed=signed, batch_first=batch_first,
            detach_reset=detach_reset, spiking=spiking)
        self.v_th, self.gamma, self.signed = v_th, gamma, signed
        self.batch_first, self.detach_reset, self.spiking, self.backend = (
            batch_first, detach_reset, spiking, backend)

    def forward(self, x, state=None, *, return_state=False):
        return F.plif(
            x, 1.0, v_th=self.v_th, gamma=self.gamma, signed=self.signed,
            batch_first=self.batch_first, state=state, return_state=return_state,
            detach_reset=self.detach_reset, spiking=self.spiking, backend=self.backend,
        )

    def extra_repr(self):
        return (f"v_th={self.v_th}, gamma={self.gamma}, signed={self.signed}, "
                f"batch_first={self.batch_first}, backend={self.backend!r}")


def spike_input_after_dropout(spiking: bool, p: float, training: bool) -> bool:
    """Whether a layer reading the spikes of a `spiking` layer through dropout with probability
    p (in training mode) may be told `spike_input=True`: its values, 0 or +-1 / (1 - p) in
    float32, are exact in bfloat16 (p = 0.2: 1.25, p = 0.5: 2; p = 0.1: 1.111.. is not). Both
    roundings of the scale torch may use (the float64 quotient rounded to float32, or a float32
    division) must be."""
    if not spiking:
        return False
    if p == 0 or not training or p >= 1:  # no dropout, or everything dropped (zeros)
        return True
    try:
        one_minus = struct.unpack("<f", struct.pack("<f", 1.0 - p))[0]
        return all(struct.unpack("<I", struct.pack("<f", scale))[0] & 0xFFFF == 0
                   for scale in (1.0 / (1.0 - p), 1.0 / one_minus))
    except (OverflowError, ZeroDivisionError):  # a scale beyond float32
        return False


class SpikGRU2Plus(nn.Module):
    """Multi-layer (bidirectional) SpikGRU2+, a drop-in replacement for `torch.nn.GRU`.

    Same arguments, parameter names, shapes and gate order as `nn.GRU` (`weight_ih_l{k}`
    `[3H, I]`, `weight_hh_l{k}` `[3H, H]`, `bias_ih_l{k}`, `bias_hh_l{k}` `[3H]`, `_reverse`
    suffix for the backward direction), plus the leak `alpha_l{k}[_reverse]` `[H]`. Each layer
    computes SPEC.md 3 (see `neurokern.functional.spikgru2plus`); stacking, bidirectionality,
    dropout between layers and `batch_first` follow `nn.GRU`.

    Variants (paper Table 5): `reset_gate=False` drops r (SpikGRU / SpikGRU+); `signed=False`
    uses binary spikes (SpikGRU / SpikGRU2).

    forward(input, state=None, *, hx=None, spike_input=False) -> (output, state)
        input: `[T, B, I]` (`[B, T, I]` with `batch_first`), unbatched `[T, I]`, or a
            `PackedSequence` of sequences of different lengths (sorted or not, as
            `nn.utils.rnn.pack_padded_sequence` / `pack_sequence` make it): each runs its own
            steps only, inside the fused time loops (`lengths` of
            `neurokern.functional.spikgru2plus`), and the output is a `PackedSequence` too.
        state (or `hx=`, `nn.GRU`'s name): `(v, i, s)`, each `[num_layers * directions, B, H]`
            (`[L * D, H]` unbatched); zeros if None. With a PackedSequence, rows in the
            original batch order (as `nn.GRU`'s `h_0`), and the final state is returned in it,
            each row's after its own last step.
        spike_input: the input holds spikes (see `neurokern.functional.spikgru2plus`); the
            layers after the first are given their input as spikes in spiking mode anyway
            (when dropout between layers keeps them exact in bf16, as p = 0.2 does).
        output: spikes `[T, B, D * H]` (forward and reverse concatenated), and the final state.

    Load a trained `nn.GRU` with `SpikGRU2Plus.from_gru(gru)`, or
    `model.load_state_dict(gru.state_dict(), strict=False)` (only the leaks are reported
    missing; they keep `alpha_init`).
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        *,
        signed=True,
        reset_gate=True,
        alpha_init=0.9,
        v_th=1.0,
        gamma=10.0,
        spiking=True,
        backend="auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        # nn.GRU's checks, with its exception classes and messages
        for name, value in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be greater than zero")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout should be a number in range [0, 1] representing the "
                             f"probability of an element being zeroed, got {dropout!r}")
        bias, batch_first, bidirectional, signed, reset_gate, spiking = _check_options(
            v_th, gamma, backend, bias=bias, batch_first=batch_first,
            bidirectional=bidirectional, signed=signed, reset_gate=reset_gate, spiking=spiking)
        alpha_init = F._check_real("alpha_init", alpha_init)
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout acts between layers; with num_layers=1 it has no effect "
                          "(as in torch.nn.GRU)", stacklevel=2)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = bidirectional
        self.signed, self.reset_gate, self.alpha_init = signed, reset_gate, alpha_init
        self.v_th, self.gamma, self.spiking, self.backend = v_th, gamma, spiking, backend
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for suffix in ("", "_reverse")[:directions]:
                k = f"l{layer}{suffix}"
                self.register_parameter(f"weight_ih_{k}", nn.Parameter(
                    torch.empty(3 * hidden_size, layer_input, **factory)))
                self.register_parameter(f"weight_hh_{k}", nn.Parameter(
                    torch.empty(3 * hidden_size, hidden_size, **factory)))
                if bias:
                    self.register_parameter(f"bias_ih_{k}", nn.Parameter(
                        torch.empty(3 * hidden_size, **factory)))
                    self.register_parameter(f"bias_hh_{k}", nn.Parameter(
                        torch.empty(3 * hidden_size, **factory)))
                self.register_parameter(f"alpha_{k}", nn.Parameter(
                    torch.empty(hidden_size, **factory)))
        self.reset_parameters()

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def reset_parameters(self):
        """`nn.GRU`'s initialisation, U(-1/sqrt(H), 1/sqrt(H)); leaks set to `alpha_init`."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("alpha_"):
                    p.fill_(self.alpha_init)
                else:
                    p.uniform_(-bound, bound)

    def flatten_parameters(self):
        """No-op, for scripts written for `nn.GRU` (which compacts weights for cuDNN)."""

    @property
    def all_weights(self):
        """`nn.GRU`'s: per layer and direction (forward, then reverse) `[weight_ih, weight_hh,
        bias_ih, bias_hh]` (the biases only with `bias=True`). The leaks `alpha_l{k}` are not
        in it, as in `nn.GRU`'s list; `layer_parameters` has them."""
        return [[p for p in self.layer_parameters(layer, direction)[:4] if p is not None]
                for layer in range(self.num_layers) for direction in range(self.num_directions)]

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: the fused backends
        # are Python autograd Functions around custom ops, which TorchScript cannot compile.
        raise RuntimeError(
            "neurokern.nn.SpikGRU2Plus does not support torch.jit.script (its fused kernels "
            "run through Python autograd Functions, which TorchScript cannot compile); use "
            "torch.compile or torch.export, or torch.jit.trace for a TorchScript module")

    def layer_parameters(self, layer, direction):
        """`(weight_ih, weight_hh, bias_ih, bias_hh, alpha)` of one layer and direction."""
        k = f"l{layer}{'_reverse' if direction else ''}"
        return (
            getattr(self, f"weight_ih_{k}"),
            getattr(self, f"weight_hh_{k}"),
            getattr(self, f"bias_ih_{k}") if self.bias else None,
            getattr(self, f"bias_hh_{k}") if self.bias else None,
            getattr(self, f"alpha_{k}"),
        )

    def forward(self, input, state=None, *, hx=None, spike_input=False):
        if hx is not None:
            if state is not None:
                raise TypeError("pass the initial state as state or as hx, not both")
            state = hx
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, state, spike_input)
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        self._check_dtype(input)
        if input.dim() not in (2, 3):
            raise ValueError(f"input must be [T, B, I], [B, T, I] (batch_first) or unbatched "
                             f"[T, I], got {list(input.shape)}")
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        time_dim = 1 if self.batch_first else 0
        state = self._checked_state(state, input.shape[1 - time_dim], unbatched)
        x, final_state = self._layers(input, state, spike_input, self.batch_first, None)
        if unbatched:
            x = x.squeeze(0 if self.batch_first else 1)
            final_state = tuple(t.squeeze(1) for t in final_state)
        return x, final_state

    def _forward_packed(self, input, state, spike_input):
        """`nn.GRU`'s handling of a PackedSequence: the layers run on the padded batch sorted
        longest first (`lengths` per row; a sorted batch spares the C++ CPU products the rows
        that ended), the state is permuted to that order and back."""
        data, batch_sizes, sorted_indices, unsorted_indices = input
        self._check_dtype(data)
        if data.dim() != 2:
            raise ValueError(f"a PackedSequence's data must be [N, I], got {list(data.shape)}")
        # [T, B, I] time-major in the sorted order, lengths [B] int64 on the CPU
        padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        state = self._checked_state(state, padded.shape[1], False)
        if state is not None and sorted_indices is not None:
            state = tuple(t.index_select(1, sorted_indices) for t in state)
        x, final_state = self._layers(padded, state, spike_input, False, lengths)
        output = pack_padded_sequence(x, lengths)
        if unsorted_indices is not None:
            final_state = tuple(t.index_select(1, unsorted_indices) for t in final_state)
        return PackedSequence(output.data, batch_sizes, sorted_indices,
                              unsorted_indices), final_state

    def _check_dtype(self, input):
        """nn.GRU's ValueError for an input whose dtype the parameters do not match (float32
        parameters with a float16/bfloat16 input are mixed precision, accepted)."""
        weight = self.weight_ih_l0
        if (input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type)
                and not (weight.dtype == torch.float32
                         and input.dtype in (torch.float16, torch.bfloat16))):
            raise ValueError(
                f"SpikGRU2Plus: RNN input dtype ({input.dtype}) does not match weight dtype "
                f"({weight.dtype}). Convert input: input.to({weight.dtype}), or convert model: "
                f"model.to({input.dtype})")

    def _checked_state(self, state, batch, unbatched):
        """`state` checked to be None or `(v, i, s)` of `[L * D, B, H]` (`[L * D, H]` when
        unbatched, then returned with the batch dim)."""
        layers_dirs = self.num_layers * self.num_directions
        if state is not None:
            if not isinstance(state, (tuple, list)) or len(state) != 3:
                raise TypeError("state must be a triple (v, i, s) of tensors")
            expected = [layers_dirs, self.hidden_size] if unbatched else \
                [layers_dirs, batch, self.hidden_size]
            for name, t in zip("vis", state):
                if not isinstance(t, torch.Tensor) or list(t.shape) != expected:
                    got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"state {name} must have shape {expected} "
                                     f"(num_layers * directions, B, H), got {got}")
            if unbatched:
                state = tuple(t.unsqueeze(1) for t in state)
        return state

    def _layers(self, x, state, spike_input, batch_first, lengths):
        """The stack over x (`[T, B, I]`, or `[B, T, I]` if batch_first) from `state` (None or
        `(v, i, s)` of `[L * D, B, H]`), rows of `lengths` steps if given: `(output, final
        state)`."""
        finals = []  # (v, i, s) per layer, each [D, B, H]: nn.GRU's order once concatenated
        options = dict(v_th=self.v_th, gamma=self.gamma, signed=self.signed,
                       reset_gate=self.reset_gate, batch_first=batch_first,
                       spiking=self.spiking, backend=self.backend, lengths=lengths)
        directions = self.num_directions
        for layer in range(self.num_layers):
            first = layer * directions  # this layer's rows of the state, nn.GRU's order
            layer_state = None if state is None else tuple(
                t[first:first + directions] if directions > 1 else t[first] for t in state)
            # the layers after the first read spikes through dropout
            spikes = spike_input if layer == 0 else spike_input_after_dropout(
                self.spiking, self.dropout, self.training)
            if directions > 1:
                x, final = F.spikgru2plus_bidirectional(
                    x, self.layer_parameters(layer, 0), self.layer_parameters(layer, 1),
                    state=layer_state, spike_input=spikes, **options)
                finals.append(final)  # each [2, B, H]
            else:
                x, final = F.spikgru2plus(x, *self.layer_parameters(layer, 0),
                                          state=layer_state, spike_input=spikes, **options)
                finals.append(tuple(t.unsqueeze(0) for t in final))
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = torch_F.dropout(x, self.dropout, training=True)

        return x, tuple(torch.cat([f[n] for f in finals]) for n in range(3))

    @classmethod
    def from_gru(cls, gru, **kwargs):
        """A SpikGRU2Plus with the sizes and trained weights of `gru` (an `nn.GRU`); the leaks
        start at `alpha_init`. Keyword arguments (signed, reset_gate, alpha_init, v_th, gamma,
        backend) go to the constructor."""
        if not isinstance(gru, nn.GRU):
            raise TypeError(f"gru must be a torch.nn.GRU, got {type(gru).__name__}")
        if gru.proj_size:
            raise ValueError("SpikGRU2Plus has no projection; gru.proj_size must be 0")
        p = next(gru.parameters())
        model = cls(gru.input_size, gru.hidden_size, gru.num_layers, gru.bias, gru.batch_first,
                    gru.dropout, gru.bidirectional, device=p.device, dtype=p.dtype, **kwargs)
        result = model.load_state_dict(gru.state_dict(), strict=False)
        unexpected = list(result.unexpected_keys) + [
            k for k in result.missing_keys if not k.startswith("alpha_")]
        if unexpected:
            raise RuntimeError(f"state dict of {gru} does not match SpikGRU2Plus: {unexpected}")
        return model

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s + (f", signed={self.signed}, reset_gate={self.reset_gate}, v_th={self.v_th}, "
                    f"gamma={self.gamma}, backend={self.backend!r}")


@torch.no_grad()
def clamp_leaks_(module):
    """Clamp every directly trained leak in `module` into [0, 1], in place (the paper does this
    after each optimiser step). Sigmoid-parametrised and fixed leaks are left alone. Any other
    submodule with leaks of its own takes part by defining a `clamp_leaks_()` method (e.g.
    `neurokern.models.LeakyIntegratorFC`). Returns `module`."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for m in module.modules():
        if isinstance(m, PLIF):
            if m.leak == "direct" and m.learnable:
                m.alpha.clamp_(0.0, 1.0)
        elif isinstance(m, SpikGRU2Plus):
            for name, p in m.named_parameters(recurse=False):
                if name.startswith("alpha_"):
                    p.clamp_(0.0, 1.0)
        elif callable(getattr(m, "clamp_leaks_", None)):
            m.clamp_leaks_()
    return module
