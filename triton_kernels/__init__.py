"""Triton kernels of neurokern, installed as `neurokern.triton_kernels`.

Triton is optional: without it this package imports, `triton_error` says why, and the
"triton" backend reports itself unavailable.
"""

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:
    triton_error = f"{type(exc).__name__}: {exc}"
else:
    triton_error = None
