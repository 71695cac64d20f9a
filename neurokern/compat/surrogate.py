"""Surrogate gradients of the compat neurons, and their translation from the libraries' objects.

The fused neuron knows two surrogate derivatives of the spike `s = fire(u)`, `u = h - v_th`
(`neurokern.functional.plif`, arguments `surrogate`, `gamma`, `surrogate_scale`):

- "atan":    `scale / (1 + gamma u^2)`
- "sigmoid": `scale * gamma * sig(gamma u) * (1 - sig(gamma u))`

SpikingJelly's `ATan(alpha=a)` and snnTorch's `atan(alpha=a)` are the arctan one with
`gamma = (pi a / 2)^2`, `scale = a / 2`; SpikingJelly's `Sigmoid(alpha=a)` and snnTorch's
`sigmoid(slope=k)` are the sigmoid one with `gamma = a` (or `k`), `scale = 1`. The classes
and functions below build the same descriptions without the libraries installed;
`from_spikingjelly` and `from_snntorch` translate the libraries' own objects and refuse any
other surrogate.
"""

import math
import numbers

__all__ = ["Surrogate", "ATan", "Sigmoid", "atan", "sigmoid", "from_spikingjelly",
           "from_snntorch"]


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


class Surrogate:
    """A surrogate derivative as `plif` takes it: `kind` ("atan" or "sigmoid"), `gamma`,
    `scale`, and `spiking` (False: the forward returns the surrogate's primitive instead of
    the step, SpikingJelly's `spiking=False`)."""

    def __init__(self, kind, gamma, scale, spiking=True):
        if kind not in ("atan", "sigmoid"):
            raise ValueError(f"kind must be 'atan' or 'sigmoid', got {kind!r}")
        if not isinstance(spiking, bool):
            raise TypeError(f"spiking must be a bool, got {type(spiking).__name__}")
        self.kind = kind
        self.gamma = _positive("gamma", gamma)
        self.scale = _positive("scale", scale)
        self.spiking = spiking

    def plif_kwargs(self):
        """The keyword arguments of `neurokern.functional.plif` for this surrogate."""
        return dict(surrogate=self.kind, gamma=self.gamma, surrogate_scale=self.scale,
                    spiking=self.spiking)

    def __eq__(self, other):
        return isinstance(other, Surrogate) and (
            (self.kind, self.gamma, self.scale, self.spiking)
            == (other.kind, other.gamma, other.scale, other.spiking))

    def __hash__(self):
        return hash((self.kind, self.gamma, self.scale, self.spiking))

    def __repr__(self):
        return (f"Surrogate(kind={self.kind!r}, gamma={self.gamma!r}, scale={self.scale!r}, "
                f"spiking={self.spiking!r})")


class ATan(Surrogate):
    """SpikingJelly's `surrogate.ATan(alpha)`: derivative `(a/2) / (1 + (pi a u / 2)^2)`."""

    def __init__(self, alpha=2.0, spiking=True):
        self.alpha = _positive("alpha", alpha)
        super().__init__("atan", (math.pi * self.alpha / 2) ** 2, self.alpha / 2, spiking)


class Sigmoid(Surrogate):
    """SpikingJelly's `surrogate.Sigmoid(alpha)`: derivative `a sig(a u) (1 - sig(a u))`."""

    def __init__(self, alpha=4.0, spiking=True):
        self.alpha = _positive("alpha", alpha)
        super().__init__("sigmoid", self.alpha, 1.0, spiking)


def atan(alpha=2.0):
    """snnTorch's `surrogate.atan(alpha)` (the same derivative as SpikingJelly's `ATan`)."""
    return ATan(alpha)


def sigmoid(slope=25):
    """snnTorch's `surrogate.sigmoid(slope)`: derivative `k sig(k u) (1 - sig(k u))`."""
    return Sigmoid(slope)


_SJ_MODULE = "spikingjelly.activation_based.surrogate"
_SJ_CLASSES = {"ATan": ATan, "Sigmoid": Sigmoid}


def from_spikingjelly(function, argument="surrogate_function"):
    """`function` (a SpikingJelly surrogate object or a `Surrogate`) as a `Surrogate`.

    Only SpikingJelly's own `ATan` and `Sigmoid` classes (not subclasses, which may change the
    function) with a number `alpha` are translated; anything else raises ValueError naming
    `argument`.
    """
    if isinstance(function, Surrogate):
        return function
    cls = type(function)
    if cls.__module__ == _SJ_MODULE and cls.__name__ in _SJ_CLASSES:
        alpha = getattr(function, "alpha", None)
        spiking = getattr(function, "spiking", True)
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) \
                and isinstance(spiking, bool):
            return _SJ_CLASSES[cls.__name__](alpha, spiking)
        raise ValueError(f"{argument}: {function!r} has alpha={alpha!r}, spiking={spiking!r}; "
                         f"the fused neuron needs a number alpha and a bool spiking")
    raise ValueError(
        f"{argument} must be spikingjelly's surrogate.ATan or surrogate.Sigmoid (or "
        f"neurokern.compat.surrogate.ATan / Sigmoid), got {function!r}: the fused neuron "
        f"computes only the arctan and sigmoid surrogate derivatives")


_SNNTORCH_MODULE = "snntorch.surrogate"
_SNNTORCH_FUNCTIONS = {"atan.<locals>.inner": ("alpha", atan),
                       "sigmoid.<locals>.inner": ("slope", sigmoid)}


def from_snntorch(function, argument="spike_grad"):
    """`function` (`None`, snnTorch's `surrogate.atan(alpha)` / `surrogate.sigmoid(slope)`,
    or a `Surrogate`) as a `Surrogate`; None is snnTorch's default `atan(alpha=2.0)`.

    snnTorch's surrogates are closures: the parameter is read from the closure of the two
    functions above; any other callable raises ValueError naming `argument`.
    """
    if function is None:
        return atan()
    if isinstance(function, Surrogate):
        if not function.spiking:
            raise ValueError(f"{argument}: snnTorch neurons always spike; got {function!r} "
                             f"with spiking=False")
        return function
    qualname = getattr(function, "__qualname__", None)
    if getattr(function, "__module__", None) == _SNNTORCH_MODULE \
            and qualname in _SNNTORCH_FUNCTIONS and function.__closure__ is not None:
        name, build = _SNNTORCH_FUNCTIONS[qualname]
        cells = dict(zip(function.__code__.co_freevars,
                         (cell.cell_contents for cell in function.__closure__)))
        if name in cells:
            return build(cells[name])
    raise ValueError(
        f"{argument} must be snntorch.surrogate.atan(alpha) or snntorch.surrogate.sigmoid(slope) "
        f"(or neurokern.compat.surrogate.atan / sigmoid), got {function!r}: the fused neuron "
        f"computes only the arctan and sigmoid surrogate derivatives (fast_sigmoid, "
        f"triangular, straight-through and the others have no fused equivalent)")
