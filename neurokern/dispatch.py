"""Backend registry and selection: which implementation runs an op on a device.

Backends:
    "reference"  pure PyTorch (`neurokern.reference`), any device and dtype, slow.
    "cpu"        fused C++ kernels in `neurokern._C`, CPU tensors.
    "triton"     Triton kernels in `neurokern.triton_kernels`, CUDA tensors (CPU tensors only
                 under the Triton interpreter, `TRITON_INTERPRET=1`, for testing).
    "cuda"       fused CUDA C++ kernels in `neurokern._C`, CUDA tensors.
    "auto"       the fastest available one for the op and device (see `AUTO_ORDER`).

The default is "auto", or the value of the environment variable `NEUROKERN_BACKEND`.
An explicitly requested backend that cannot run raises `BackendUnavailableError` with the
reason. On a GPU "auto" takes a backend only where the GPU test suite passed its variant for the
call (`neurokern.verified`: per dtype, GPU architecture, torch and Triton version; an unrecorded
variant is opt-in). "auto" logs its choice once per op, device and dtype (logger "neurokern");
when it has to use the reference although a fused backend exists for the op, it logs a warning
saying why.
"""

import dataclasses
import logging
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from neurokern import verified

__all__ = ["BACKENDS", "OPS", "BackendUnavailableError", "Availability", "backends", "resolve"]

logger = logging.getLogger("neurokern")

BACKENDS = ("reference", "cpu", "triton", "cuda")
OPS = ("spike", "signed_spike", "plif", "spikgru2plus", "spikgru2plus_bidirectional")
DEVICES = ("cpu", "cuda")
ENV_BACKEND = "NEUROKERN_BACKEND"

# Preference of "auto" per device type, fastest first. "cuda" (the persistent SpikGRU2+ loops,
# the only CUDA kernels so far) comes after "triton" until a GPU run has measured it faster. On
# a GPU the order ranks the backends' baseline variants for `verified.choose`.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on this device."""


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether a backend can run an op on a device, and why not if it cannot."""

    available: bool
    reason: str = ""

    def __str__(self):
        return "available" if self.available else f"unavailable: {self.reason}"


# (op, backend) -> implementation with the signature of the matching `neurokern.reference` op.
_IMPLEMENTATIONS: Dict[Tuple[str, str], Callable] = {}
_logged_choices = set()
# resolve()'s successful answers, keyed by its arguments and the environment variables it reads
# (an op call resolves its backend every time; this makes that a dict lookup)
_resolved: Dict[tuple, Tuple[str, Callable]] = {}


def register(op: str, backend: str):
    """Decorator: register `fn` as the implementation of `op` on `backend`."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS}")

    def decorator(fn):
        _IMPLEMENTATIONS[(op, backend)] = fn
        _resolved.clear()
        return fn

    return decorator


def _extension_status(device_type: str) -> Optional[str]:
    """None if `neurokern._C` is loaded and was built for `device_type`, else the reason."""
    from neurokern import _extension

    if _extension.error is not None:
        return f"the C++ extension neurokern._C did not load ({_extension.error})"
    if device_type == "cuda" and not _extension.built_with_cuda():
        return "neurokern._C was built without its CUDA part (see docs/install.md)"
    if device_type == "cuda":
        return _extension.cuda_arch_problem(torch.cuda.get_device_capability())
    return None


def _triton_status(device_type: str) -> Optional[str]:
    from neurokern import triton_kernels

    if triton_kernels.triton_error is not None:
        return f"triton is not importable ({triton_kernels.triton_error})"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels run on CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
    return None


def availability(op: str, backend: str, device_type: str) -> Availability:
    """Whether `backend` can run `op` on tensors of `device_type` ("cpu" or "cuda")."""
    if backend == "reference":
        return Availability(True)
    if backend == "cpu" and device_type != "cpu":
        return Availability(False, "the cpu backend runs CPU tensors only")
    if backend == "cuda" and device_type != "cuda":
        return Availability(False, "the cuda backend runs CUDA tensors only")
    if device_type == "cuda" and not torch.cuda.is_available():
        return Availability(False, "no CUDA device is available to this torch build")
    if (op, backend) not in _IMPLEMENTATIONS:
        return Availability(False, f"no {backend} kernel implements {op} yet")
    reason = _triton_status(device_type) if backend == "triton" else _extension_status(device_type)
    return Availability(reason is None, reason or "")


def backends() -> Dict[str, Dict[str, Dict[str, Availability]]]:
    """For this machine: `{op: {device_type: {backend: Availability}}}`.

    `str(availability)` reads "available" or "unavailable: <reason>".
    """
    return {
        op: {dev: {b: availability(op, b, dev) for b in BACKENDS} for dev in DEVICES}
        for op in OPS
    }


def default_backend() -> str:
    """The backend used when an op is called with `backend="auto"`: `$NEUROKERN_BACKEND` or auto."""
    name = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"environment variable {ENV_BACKEND}={name!r} is not a backend; "
            f"choose one of {('auto',) + BACKENDS}"
        )
    return name


def check_backend_name(backend) -> None:
    """Raise ValueError naming the `backend` argument unless it is a known backend name."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def variant_dtype(op: str, dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype of the GPU variant that runs `op` on an input of `dtype`: `dtype` itself, for
    SpikGRU2+ that of its matrix products (autocast's where autocast runs them in 16 bits,
    else the compute dtype; `spikgru2plus_ops.product_dtype`)."""
    if not op.startswith("spikgru2plus"):
        return dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if compute == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return compute


def baseline_variant(op: str, backend: str, dtype: torch.dtype) -> Optional[str]:
    """The name of the variant `backend` runs `op` with on a GPU for `variant_dtype` `dtype`
    when none of its optional ones applies, or None if it has none (`verified.VARIANTS`)."""
    for variant in verified.VARIANTS.values():
        if (variant.baseline and variant.backend == backend and op in variant.ops
                and str(dtype).removeprefix("torch.") in variant.dtypes):
            return variant.name
    return None


def resolve(op: str, backend: str, device: torch.device,
            dtype: torch.dtype = torch.float32, variant_op: Optional[str] = None
            ) -> Tuple[str, Callable]:
    """The `(name, implementation)` that runs `op` on `device` for the requested `backend`,
    for an input `x` of `dtype` (on a GPU, `auto` depends on it and on autocast). `variant_op`:
    the name under which the GPU variants of this call are recorded (`verified.VARIANTS`' ops),
    where it is not `op` (plif with the generalised neuron's options: "plif_general")."""
    if device.type == "cuda":
        dtype = variant_dtype(op, dtype, device.type)
    key = (op, backend, device, dtype, os.environ.get(ENV_BACKEND),
           os.environ.get("TRITON_INTERPRET"), os.environ.get(verified.ENV_OPT_IN), variant_op)
    found = _resolved.get(key)
    if found is None:
        found = _resolve(op, backend, device, dtype, variant_op or op)
        # while torch.compile traces, the choice is not logged (see _log_choice): left uncached,
        # the first eager call logs it
        if not torch.compiler.is_compiling():
            _resolved[key] = found
    return found


def _resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype, variant_op: str
             ) -> Tuple[str, Callable]:
    device_type = device.type
    check_backend_name(backend)
    verified.check_opt_in()
    if backend == "auto":
        backend = default_backend()
    if backend != "auto":
        status = availability(op, backend, device_type)
        if not status.available:
            raise BackendUnavailableError(
                f"backend {backend!r} cannot run {op} on {device_type}: {status.reason}"
            )
        return backend, _implementation(op, backend)

    if device_type not in AUTO_ORDER:
        raise BackendUnavailableError(f"{op}: no backend supports {device_type} tensors")
    # On a GPU the fused backends' variants for this call, fastest first, go to
    # verified.choose; the first other available backend (the reference) is the fallback.
    skipped, variants, fallback = [], {}, None
    for name in AUTO_ORDER[device_type]:
        status = availability(op, name, device_type)
        if not status.available:
            skipped.append((name, status.reason))
        elif device_type == "cuda" and name != "reference":
            variant = baseline_variant(variant_op, name, dtype)
            if variant is None:
                skipped.append((name, f"no {name} kernel for {dtype}"))
            else:
                variants[verified.key(variant, dtype)] = name
        else:
            fallback = name
            break
    architecture = verified.arch(device) if variants else None
    chosen = verified.choose(list(variants), architecture) if variants else None
    for variant_key, name in variants.items():
        why = "{} {}".format(*verified.why(variant_key, architecture))
        if variant_key == chosen:
            _log_choice(op, variant_op, device_type, dtype, name, skipped,
                        f"{variant_key} {why}")
            return name, _implementation(op, name)
        skipped.append((name, f"{variant_key} {why}"))
    if fallback is not None:
        _log_choice(op, variant_op, device_type, dtype, fallback, skipped)
        return fallback, _implementation(op, fallback)
    raise BackendUnavailableError(f"{op}: no backend can run on {device_type}: {skipped}")


def _implementation(op: str, backend: str) -> Callable:
    if backend == "reference":
        from neurokern import reference

        return getattr(reference, op)
    return _IMPLEMENTATIONS[(op, backend)]


def _log_choice(op, label, device_type, dtype, name, skipped, variant=""):
    """Logs once per `label` (the op, or the name of its call's variants), device and dtype."""
    key = (label, device_type, dtype if device_type == "cuda" else None)
    # torch.compile cannot trace a logging call (fullgraph: an error); the first eager call logs
    if key in _logged_choices or torch.compiler.is_compiling():
        return
    _logged_choices.add(key)
    why = "; ".join(f"{b}: {reason}" for b, reason in skipped)
    where = f"{device_type} ({str(dtype).removeprefix('torch.')})" if key[2] else device_type
    if name == "reference" and any((op, b) in _IMPLEMENTATIONS for b, _ in skipped):
        # A fused kernel exists for this op but cannot run here: say so loudly.
        logger.warning("neurokern: %s on %s runs the slow reference backend (%s)", label, where,
                       why)
    else:
        logger.info("neurokern: %s on %s uses the %s backend%s%s", label, where, name,
                    f", {variant}" if variant else "", f" ({why})" if why else "")
