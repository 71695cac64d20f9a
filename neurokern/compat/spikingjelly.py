"""SpikingJelly's `IFNode`, `LIFNode` and `ParametricLIFNode`, computed by the fused neuron.

Change one import line and keep the rest of the model:

    from spikingjelly.activation_based import neuron      # before
    from neurokern.compat import spikingjelly as neuron    # after

The constructor arguments, the state attribute `v`, `reset()`, `detach()` and `step_mode` are
SpikingJelly's (2.x, activation_based). For `t = 1..T` (SpikingJelly's equations):

    H_t = V_{t-1} + (X_t - (V_{t-1} - V_reset)) / tau     decay_input=True (LIF, PLIF)
    H_t = V_{t-1} - (V_{t-1} - V_reset) / tau + X_t       decay_input=False
    H_t = V_{t-1} + X_t                                    IFNode
    S_t = Theta(H_t - V_threshold)                         fires on H_t >= V_threshold
    V_t = H_t - V_threshold S_t                            v_reset=None (soft)
    V_t = H_t (1 - S_t) + V_reset S_t                      v_reset=float (hard)

with `V_reset = 0` in the leak for a soft reset, `1/tau = sigmoid(w)` for `ParametricLIFNode`,
and `V_0 = V_reset` (hard) or 0 (soft) after `reset()`. That is `neurokern.functional.plif`
with `alpha = 1 - 1/tau`, `reset_before_leak=True`, `decay_input`, `reset="soft"`/`"hard"`
(docs/compat-spikingjelly.md). `step_mode="m"` takes `[T, N, ...]` and runs all steps in one
fused call; `step_mode="s"` takes `[N, ...]` and runs one step the same way. `v` carries the
membrane (and its autograd graph) between calls, so chunked calls equal one call.

Refused, with a ValueError naming the argument: surrogates other than ATan / Sigmoid,
`store_v_seq=True` (the fused kernel keeps no per-step membrane), SpikingJelly 0.x backend
names ("torch", "cupy"), `v_threshold <= 0`.
"""

import math
import numbers

import torch
from torch import nn

from neurokern import dispatch, functional
from neurokern.compat.surrogate import Sigmoid, from_spikingjelly

__all__ = ["IFNode", "LIFNode", "ParametricLIFNode"]

try:
    # SpikingJelly's own helpers (functional.reset_net, set_step_mode, detach_net) warn about
    # modules that are not its MemoryModule; being one (with no registered memories: `v` is
    # this class's own attribute) keeps a converted model silent. Without SpikingJelly
    # installed the nodes are plain modules with the same behaviour.
    from spikingjelly.activation_based.base import MemoryModule as _Base
except ImportError:  # pragma: no cover - depends on the environment
    _Base = nn.Module


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class _Node(_Base):
    """The state, step modes and argument checks the three nodes share; subclasses give the
    leak (`_alpha()`) and whether the input decays."""

    def __init__(self, v_threshold, v_reset, surrogate_function, detach_reset, step_mode,
                 store_v_seq, backend, decay_input):
        super().__init__()
        self.v_threshold = _real("v_threshold", v_threshold)
        if self.v_threshold <= 0:
            raise ValueError(f"v_threshold must be > 0 for the fused neuron, got {v_threshold!r}")
        self.v_reset = None if v_reset is None else _real("v_reset", v_reset)
        self.surrogate_function = from_spikingjelly(surrogate_function, "surrogate_function")
        self.detach_reset = _flag("detach_reset", detach_reset)
        self.decay_input = _flag("decay_input", decay_input)
        self.step_mode = step_mode
        self.store_v_seq = store_v_seq
        if backend in ("torch", "cupy"):
            raise ValueError(
                f"backend={backend!r} is a SpikingJelly 0.x backend; neurokern's are "
                f"{('auto',) + dispatch.BACKENDS} (backend='auto' picks the fused kernel)")
        dispatch.check_backend_name(backend)
        self.backend = backend
        self.v = self._v_rest
        self.v_seq = None

    @property
    def _v_rest(self):
        return 0.0 if self.v_reset is None else self.v_reset

    @property
    def step_mode(self):
        return self._step_mode

    @step_mode.setter
    def step_mode(self, value):
        if value not in ("s", "m"):
            raise ValueError(f"step_mode must be 's' or 'm', got {value!r}")
        self._step_mode = value

    @property
    def store_v_seq(self):
        return False

    @store_v_seq.setter
    def store_v_seq(self, value):
        if value is not False:
            raise ValueError(
                f"store_v_seq={value!r} is not supported: the fused kernel does not keep the "
                f"membrane of every step (only the last one, in `v`)")

    def reset(self):
        """Forget the membrane: `v` is `v_reset` (hard reset) or 0.0 again, as SpikingJelly."""
        self.v = self._v_rest
        self.v_seq = None

    def detach(self):
        """Cut the autograd graph carried in `v` (truncated BPTT), as SpikingJelly."""
        if isinstance(self.v, torch.Tensor):
            self.v = self.v.detach()

    def forward(self, x):
        if self.step_mode == "m":
            return self.multi_step_forward(x)
        return self.single_step_forward(x)

    def single_step_forward(self, x):
        """One step: `x` `[N, ...]` -> spikes `[N, ...]`."""
        return self.multi_step_forward(x.unsqueeze(0)).squeeze(0)

    def multi_step_forward(self, x_seq):
        """All steps in one fused call: `x_seq` `[T, N, ...]` -> spikes `[T, N, ...]`."""
        if not isinstance(x_seq, torch.Tensor) or x_seq.dim() < 1:
            raise ValueError("x_seq must be a tensor [T, N, ...] (step_mode='m') or x a tensor "
                             "[N, ...] (step_mode='s')")
        step_shape = x_seq.shape[1:]
        v = self.v
        if not isinstance(v, torch.Tensor) or v.shape != step_shape:
            # SpikingJelly restarts from the rest value when the step shape changes.
            v = torch.full(step_shape, self._v_rest, dtype=x_seq.dtype, device=x_seq.device)
        elif v.dtype != x_seq.dtype or v.device != x_seq.device:
            v = v.to(dtype=x_seq.dtype, device=x_seq.device)
        # The leak is a scalar, so any layout with rank >= 3 works: [T, N] gets a unit channel
        # dim (a view, no copy).
        x3 = x_seq.reshape(*x_seq.shape[:2], *([1] * (3 - x_seq.dim()))) \
            if x_seq.dim() < 3 else x_seq
        v3 = v.reshape(x3.shape[1:])
        spikes, (v_last, _) = functional.plif(
            x3, self._alpha(x_seq.dtype),
            v_th=self.v_threshold,
            reset="soft" if self.v_reset is None else "hard",
            v_reset=self._v_rest,
            reset_before_leak=True,
            decay_input=self.decay_input,
            detach_reset=self.detach_reset,
            state=(v3, torch.zeros_like(v3)),  # s_0 is not read in this order
            return_state=True,
            backend=self.backend,
            **self.surrogate_function.plif_kwargs(),
        )
        self.v = v_last.reshape(step_shape)
        return spikes.reshape(x_seq.shape)

    def extra_repr(self):
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
                f"detach_reset={self.detach_reset}, step_mode={self.step_mode}, "
                f"surrogate_function={self.surrogate_function!r}, backend={self.backend!r}")


class IFNode(_Node):
    """SpikingJelly's `IFNode`: `H_t = V_{t-1} + X_t` (alpha = 1)."""

    def __init__(self, v_threshold=1.0, v_reset=0.0, surrogate_function=Sigmoid(),
                 detach_reset=False, step_mode="s", store_v_seq=False, backend="auto"):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode,
                         store_v_seq, backend, decay_input=False)

    def _alpha(self, dtype):
        return 1.0


class LIFNode(_Node):
    """SpikingJelly's `LIFNode`: a fixed leak `alpha = 1 - 1/tau`, `tau > 1`."""

    def __init__(self, tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0,
                 surrogate_function=Sigmoid(), detach_reset=False, step_mode="s",
                 store_v_seq=False, backend="auto"):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode,
                         store_v_seq, backend, decay_input)
        self.tau = _real("tau", tau)
        if self.tau <= 1.0:
            raise ValueError(f"tau must be > 1 (as SpikingJelly's), got {tau!r}")

    def _alpha(self, dtype):
        return 1.0 - 1.0 / self.tau

    def extra_repr(self):
        return super().extra_repr() + f", tau={self.tau}"


class ParametricLIFNode(_Node):
    """SpikingJelly's `ParametricLIFNode`: a learnable scalar `w` (same name and initial value
    `-log(init_tau - 1)`, so state dicts move between the two), `1/tau = sigmoid(w)`, so the
    leak is `alpha = 1 - sigmoid(w)` (computed here; autograd carries its gradient to `w`)."""

    def __init__(self, init_tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0,
                 surrogate_function=Sigmoid(), detach_reset=False, step_mode="s",
                 store_v_seq=False, backend="auto"):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode,
                         store_v_seq, backend, decay_input)
        init_tau = _real("init_tau", init_tau)
        if init_tau <= 1.0:
            raise ValueError(f"init_tau must be > 1 (as SpikingJelly's), got {init_tau!r}")
        self.w = nn.Parameter(torch.as_tensor(-math.log(init_tau - 1.0)))

    def _alpha(self, dtype):
        # float16/bfloat16 inputs keep the leak in float32 (plif computes in float32 anyway).
        alpha_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        return 1.0 - torch.sigmoid(self.w.to(alpha_dtype))

    def extra_repr(self):
        with torch.no_grad():
            tau = 1.0 / self.w.sigmoid()
        return super().extra_repr() + f", tau={tau}"
