"""Elementwise spike / signed_spike forward and surrogate backward (SPEC.md 1).

Both kernels treat their tensors as flat arrays of `n` elements (the launcher passes dense
tensors); one program handles BLOCK consecutive elements. `n` is specialised (Triton compiles
a variant for n a multiple of 16): then the bound mask is constant over 16 elements and
loads and stores are 16-byte vectors; without that knowledge, one scalar access per element.
`spike_fwd_scalar_kernel` / `spike_bwd_scalar_kernel` are the same kernels with `n` not
specialised, scalar accesses for every n (the launcher runs them until the vector variant has
passed the GPU tests, neurokern/verified.py).
"""

import triton
import triton.language as tl

from .activations import spike_act, spike_surrogate


@triton.jit
def spike_fwd_kernel(
    x_ptr,  # [n]
    params_ptr,  # [2]: v_th, gamma in the compute dtype
    s_ptr,  # [n] out, x's dtype
    n,
    SIGNED: tl.constexpr,
    SPIKING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v_th = tl.load(params_ptr)
    gamma = tl.load(params_ptr + 1)
    v = tl.load(x_ptr + offs, mask=mask, other=0).to(v_th.dtype)
    s = spike_act(v, v_th, gamma, SIGNED, SPIKING)
    tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def spike_bwd_kernel(
    grad_ptr,  # [n] dL/ds
    x_ptr,  # [n]
    params_ptr,  # [2]: v_th, gamma
    dx_ptr,  # [n] out
    n,
    SIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v_th = tl.load(params_ptr)
    gamma = tl.load(params_ptr + 1)
    v = tl.load(x_ptr + offs, mask=mask, other=0).to(v_th.dtype)
    g = tl.load(grad_ptr + offs, mask=mask, other=0).to(v_th.dtype)
    dx = g * spike_surrogate(v, v_th, gamma, SIGNED)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


spike_fwd_scalar_kernel = triton.jit(do_not_specialize=["n"])(spike_fwd_kernel.fn)
spike_bwd_scalar_kernel = triton.jit(do_not_specialize=["n"])(spike_bwd_kernel.fn)
