"""snnTorch's `Leaky` neuron, computed by the fused neuron.

Change one import line and keep the rest of the model:

    import snntorch as snn                         # before
    import neurokern.compat.snntorch as snn        # after

`Leaky(beta, threshold, spike_grad, ...)` has snnTorch's (1.0) constructor arguments, its
single-step call `spk, mem = lif(x_t, mem)` (the state kept in `lif.mem` between calls, as
snnTorch), `init_leaky()` / `reset_mem()`, and adds `lif.multi_step(x)` on `[T, B, ...]`: all T
steps in one fused call, the way to get the fused speed (docs/compat-snntorch.md). snnTorch's
equations for one step, with `beta` clamped into [0, 1] and `r = Theta(mem - threshold)`
computed from the incoming membrane and detached:

    subtract: mem' = beta mem + x - r threshold
    zero:     mem' = beta (1 - r) mem + x
    none:     mem' = beta mem + x
    spk = Theta(mem' - threshold) * graded_spikes_factor    (fires on mem' > threshold)

and with `reset_delay=False` the spike's reset is applied in the same step (`mem'` minus
`(spk - r) threshold`, or times `1 - spk + r`), with its gradient. As
`neurokern.functional.plif` with `strict_threshold=True`: subtract is the paper's order with
`detach_reset=True`; zero is SpikingJelly's order with a hard reset to 0 (the last step run
with `reset="none"`, which returns the membrane before its reset, as snnTorch does); none is
`reset="none"`; zero with `reset_delay=False` is SpikingJelly's order, not detached.

Refused, with a ValueError naming the argument: `inhibition`, `learn_threshold`,
`state_quant`, `surrogate_disable`, a threshold that is not one number, surrogates other
than atan / sigmoid, and `reset_delay=False` with `reset_mechanism="subtract"` (snnTorch then
lowers the next firing test by one more threshold whenever a membrane stays above threshold
after its reset; the fused neuron has no such rule).

Differences that remain: the spikes are float32 (as snnTorch's) but the membrane of a
float16/bfloat16 input is rounded to that dtype at the end of each call (snnTorch keeps it in
float32); with `reset_mechanism="zero"` and `reset_delay=False` a membrane passed in above
threshold is not reset first (snnTorch resets it at the next step; a membrane the neuron
produced never is).
"""

import weakref

import torch
from torch import nn

from neurokern import dispatch, functional
from neurokern.compat.surrogate import from_snntorch

__all__ = ["Leaky"]

_RESET_MECHANISMS = ("subtract", "zero", "none")
_HALF = (torch.float16, torch.bfloat16)


def _leak_layout(alpha, step_shape):
    """`(view_shape, alpha)` for `plif`: `alpha` (beta, clamped, any shape that broadcasts to
    one step `[B, ...]` without enlarging it) as a scalar or a `[C]` leak, and the shape
    `[B', C, M]` of one step in which `C` holds the dims where alpha varies (a view of a
    contiguous input: no copy)."""
    if alpha.dim() > len(step_shape) or torch.broadcast_shapes(alpha.shape, step_shape) \
            != step_shape:
        raise ValueError(f"beta of shape {list(alpha.shape)} does not broadcast to one step of "
                         f"the input, {list(step_shape)}")
    shape = (1,) * (len(step_shape) - alpha.dim()) + tuple(alpha.shape)
    varying = [d for d, n in enumerate(shape) if n != 1]
    if not varying:
        # plif wants rank >= 3 ([T, B, C, ...]): pad [B] or [] with unit dims (a view)
        view = tuple(step_shape) + (1,) * (2 - len(step_shape)) if len(step_shape) < 2 else None
        return view, alpha.reshape(())
    if varying[0] == 0:
        raise ValueError(f"beta of shape {list(alpha.shape)} varies over the batch dim of the "
                         f"input {list(step_shape)}; the fused neuron has one leak per channel")
    first, last = varying[0], varying[-1] + 1
    block = step_shape[first:last]
    channels = 1
    for n in block:
        channels *= n
    before = 1
    for n in step_shape[:first]:
        before *= n
    after = 1
    for n in step_shape[last:]:
        after *= n
    alpha = alpha.reshape(shape[first:last]).expand(block).reshape(channels)
    return (before, channels, after), alpha


class Leaky(nn.Module):
    """snnTorch's first-order leaky integrate-and-fire neuron on the fused kernel.

    Buffers and parameters have snnTorch's names (`beta`, `threshold`,
    `graded_spikes_factor`, `reset_mechanism_val`, and the non-persistent `mem`), so a state
    dict moves between the two. `backend` is neurokern's (`neurokern.backends`).
    """

    _instances = weakref.WeakSet()

    def __init__(self, beta, threshold=1.0, spike_grad=None, surrogate_disable=False,
                 init_hidden=False, inhibition=False, learn_beta=False, learn_threshold=False,
                 reset_mechanism="subtract", state_quant=False, output=False,
                 graded_spikes_factor=1.0, learn_graded_spikes_factor=False, reset_delay=True,
                 backend="auto"):
        super().__init__()
        for name, value, why in (
                ("surrogate_disable", surrogate_disable, "the fused neuron always has a surrogate "
                 "gradient (use torch.no_grad() for inference)"),
                ("inhibition", inhibition, "winner-take-all firing couples the neurons of a "
                 "step, which the fused neuron computes independently"),
                ("learn_threshold", learn_threshold, "the fused neuron has no threshold gradient"),
                ("state_quant", state_quant, "the fused neuron does not quantize its state")):
            if value is not False:
                raise ValueError(f"{name}={value!r} is not supported: {why}")
        if reset_mechanism not in _RESET_MECHANISMS:
            raise ValueError(f"reset_mechanism must be one of {_RESET_MECHANISMS}, got "
                             f"{reset_mechanism!r}")
        for name, value in (("init_hidden", init_hidden), ("output", output),
                            ("learn_beta", learn_beta), ("reset_delay", reset_delay),
                            ("learn_graded_spikes_factor", learn_graded_spikes_factor)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if not reset_delay and reset_mechanism == "subtract":
            raise ValueError(
                "reset_delay=False with reset_mechanism='subtract' is not supported: snnTorch "
                "then lowers the next firing test by one more threshold whenever the membrane "
                "stays above threshold after its reset, a rule the fused neuron does not have")
        self.spike_grad = from_snntorch(spike_grad, "spike_grad")
        threshold = torch.as_tensor(threshold)
        if threshold.numel() != 1 or not bool(threshold > 0):
            raise ValueError(f"threshold must be one number > 0 for the fused neuron, got "
                             f"{threshold!r}")
        dispatch.check_backend_name(backend)
        self.backend = backend
        self.init_hidden = init_hidden
        self.output = output
        self.reset_delay = reset_delay
        self._reset_mechanism = reset_mechanism
        # snnTorch's registration order, so parameters() and state dicts list the same order
        self.register_buffer("threshold", threshold)
        graded_spikes_factor = torch.as_tensor(graded_spikes_factor)
        if learn_graded_spikes_factor:
            self.graded_spikes_factor = nn.Parameter(graded_spikes_factor)
        else:
            self.register_buffer("graded_spikes_factor", graded_spikes_factor)
        self.register_buffer("reset_mechanism_val",
                             torch.as_tensor(_RESET_MECHANISMS.index(reset_mechanism)))
        beta = torch.as_tensor(beta)
        if learn_beta:
            self.beta = nn.Parameter(beta)
        else:
            self.register_buffer("beta", beta)
        self.register_buffer("mem", torch.zeros(0), False)
        Leaky._instances.add(self)

    @property
    def reset_mechanism(self):
        return self._reset_mechanism

    def reset_mem(self):
        """Zero the membrane (the next call starts from zeros of its input's shape)."""
        self.mem = torch.zeros_like(self.mem)
        return self.mem

    def init_leaky(self):
        """snnTorch's (deprecated) name of `reset_mem`."""
        return self.reset_mem()

    @classmethod
    def reset_hidden(cls):
        """Zero the membrane of every `Leaky` (snnTorch's, for `init_hidden=True`)."""
        for lif in list(cls._instances):
            lif.reset_mem()

    @classmethod
    def detach_hidden(cls):
        """Cut the autograd graph of every `Leaky`'s membrane (truncated BPTT)."""
        for lif in list(cls._instances):
            lif.mem = lif.mem.detach()

    def forward(self, input_, mem=None):
        """One step, as snnTorch: `input_` `[B, ...]` -> `(spk, mem)` (or `spk` alone with
        `init_hidden=True` and `output=False`). A float16/bfloat16 step is computed in float32,
        as snnTorch's (its membrane turns float32 at the first reset)."""
        x = input_.unsqueeze(0)
        spk, mem = self._run(x.float() if x.dtype in _HALF else x, mem)
        return self._returned(spk.squeeze(0), mem)

    def multi_step(self, input_, mem=None):
        """All steps in one fused call: `input_` `[T, B, ...]` -> `(spk [T, B, ...], mem)`
        with the membrane after the last step, equal to T calls of `forward`."""
        spk, mem = self._run(input_, mem)
        return self._returned(spk, mem)

    def _returned(self, spk, mem):
        if self.output or not self.init_hidden:
            return spk, mem
        return spk

    def _run(self, x, mem):
        if mem is not None:
            if self.init_hidden:
                raise TypeError("`mem` should not be passed as an argument while "
                                "`init_hidden=True`")
            self.mem = mem
        step_shape = x.shape[1:]
        if self.mem.shape != step_shape:
            self.mem = torch.zeros(step_shape, dtype=x.dtype, device=x.device)
        # float16/bfloat16: snnTorch's membrane turns float32 at the first reset; plif keeps
        # float32 inside and takes the state in x's dtype.
        half = x.dtype in _HALF
        alpha = self.beta.clamp(0, 1).to(torch.float32 if half else x.dtype)
        view, alpha = _leak_layout(alpha, step_shape)
        mem0 = self.mem.to(x.dtype)
        if view is not None:
            x = x.reshape(x.shape[0], *view)
            mem0 = mem0.reshape(view)
        v_th = float(self.threshold)
        # float32 spikes straight from the kernel for a half x (snnTorch's dtype), no conversion
        common = dict(v_th=v_th, strict_threshold=True, return_state=True,
                      backend=self.backend, spike_dtype=torch.float32 if half else None,
                      **self.spike_grad.plif_kwargs())
        if self.reset_mechanism == "subtract":
            # r = Theta(mem - threshold) is the previous step's spike: the paper's s_0.
            fired = (mem0.detach() > v_th).to(x.dtype)
            spk, (mem_t, _) = functional.plif(x, alpha, state=(mem0, fired),
                                              detach_reset=True, **common)
        elif self.reset_mechanism == "none":
            spk, (mem_t, _) = functional.plif(x, alpha, state=(mem0, torch.zeros_like(mem0)),
                                              reset="none", **common)
        elif not self.reset_delay:
            # zero, reset in the same step: SpikingJelly's order; the membrane returned is
            # the one after the reset, as snnTorch's.
            spk, (mem_t, _) = functional.plif(x, alpha, state=(mem0, torch.zeros_like(mem0)),
                                              reset="hard", v_reset=0.0,
                                              reset_before_leak=True, **common)
        else:
            # zero, reset at the next step: SpikingJelly's order with a hard reset to 0 for the
            # first T-1 steps, then the last step without reset (snnTorch returns the membrane
            # before its reset; the next call resets it from r).
            u = mem0 * (1 - (mem0.detach() > v_th).to(x.dtype))
            zeros = torch.zeros_like(u)
            spikes = []
            if x.shape[0] > 1:
                spk, (u, _) = functional.plif(x[:-1], alpha, state=(u, zeros), reset="hard",
                                              v_reset=0.0, reset_before_leak=True,
                                              detach_reset=True, **common)
                spikes.append(spk)
            spk, (mem_t, _) = functional.plif(x[-1:], alpha, state=(u, zeros), reset="none",
                                              **common)
            spikes.append(spk)
            spk = torch.cat(spikes) if len(spikes) > 1 else spk
        mem_t = mem_t.reshape(step_shape)
        self.mem = mem_t.float() if half else mem_t
        spk = spk.reshape(x.shape[0], *step_shape).float()  # float64 x: float32, as snnTorch
        gsf = self.graded_spikes_factor
        if isinstance(gsf, nn.Parameter) or gsf.numel() != 1 or float(gsf) != 1.0:
            spk = spk * gsf  # a pass over all spikes: skipped for the default factor 1
        return spk, self.mem

    def extra_repr(self):
        return (f"reset_mechanism={self.reset_mechanism!r}, reset_delay={self.reset_delay}, "
                f"spike_grad={self.spike_grad!r}, backend={self.backend!r}")
