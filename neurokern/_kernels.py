"""Small helpers shared by the fused-op modules (spike_ops, plif_ops)."""

import torch

from neurokern import _extension
from neurokern.reference import compute_dtype
from neurokern.triton_kernels import triton_error

_params_cache = {}


def triton_available() -> bool:
    return triton_error is None


def scalar_params(v_th: float, gamma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """`[v_th, gamma]` as a device tensor in the compute dtype of `dtype`, cached.

    Triton kernels load these instead of taking Python floats, which would arrive as float32
    and make float64 runs inexact. Cached so that repeated calls do no host-to-device copy.
    """
    key = (v_th, gamma, compute_dtype(dtype), torch.device(device))
    params = _params_cache.get(key)
    if params is None:
        if len(_params_cache) > 256:
            _params_cache.clear()
        params = torch.tensor([v_th, gamma], dtype=key[2], device=key[3])
        _params_cache[key] = params
    return params


def register_fakes(op: str, fwd_fake, bwd_fake) -> None:
    """Register the fake (meta) implementations of `<op>_fwd` / `<op>_bwd` for every backend
    whose ops exist here: `neurokern_triton::*` (defined when triton imports) and the C++
    `neurokern::*` (declared when the extension loaded)."""
    namespaces = (["neurokern_triton"] if triton_available() else []) + (
        ["neurokern"] if _extension.has_op(f"{op}_fwd") else [])
    for namespace in namespaces:
        torch.library.register_fake(f"{namespace}::{op}_fwd")(fwd_fake)
        torch.library.register_fake(f"{namespace}::{op}_bwd")(bwd_fake)
