"""Loads the compiled extension `neurokern._C` once and records why if it cannot.

Importing `_C` registers its C++/CUDA kernels as `torch.ops.neurokern.*`.
"""

try:
    from neurokern import _C
except ImportError as exc:  # not built (e.g. a source checkout without `pip install`)
    _C = None
    error = f"{type(exc).__name__}: {exc}"
else:
    error = None


def built_with_cuda() -> bool:
    """Whether the loaded extension contains the CUDA kernels."""
    return _C is not None and bool(_C.build_info()["cuda"])


def build_info() -> dict:
    """What `neurokern._C` was built with (`{}` if it did not load)."""
    return dict(_C.build_info()) if _C is not None else {}


def has_op(name: str) -> bool:
    """Whether the loaded extension defines `torch.ops.neurokern.<name>` (a stale build may not)."""
    import torch

    return _C is not None and hasattr(torch.ops.neurokern, name)
