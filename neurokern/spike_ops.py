"""Fused spike / signed_spike: the torch.library ops, their launchers, the autograd Function,
and their registration with the dispatcher (backends "cpu" and "triton").

Ops (same schema on both backends; the C++ ones are declared in csrc/register.cpp):
    spike_fwd(x, v_th, gamma, signed, spiking) -> s          s = act(x), x's shape and dtype
    spike_bwd(grad_s, x, v_th, gamma, signed) -> dx          dx = grad_s * surrogate(x)
`neurokern::*` run the C++ CPU kernels, `neurokern_triton::*` the Triton kernels.
"""

import torch

from neurokern import verified
from neurokern._kernels import (
    eager_or_op, first_order_only, register_fakes, scalar_params, triton_available, triton_op,
)
from neurokern.dispatch import register

_BLOCK = 1024  # elements per program: 4 warps x 8 contiguous elements per thread
# The Triton kernels' GPU variants, fastest first (neurokern/verified.py): n specialised (vector
# accesses where n is a multiple of 16) where the record allows it, else n not specialised.
VARIANTS = ("triton.spike.vector", "triton.spike.scalar")


def _flat(t):
    # The kernels walk memory linearly; a non-contiguous input is copied once.
    return t if t.is_contiguous() else t.contiguous()


if triton_available():
    from neurokern.triton_kernels.spike import (
        spike_bwd_kernel, spike_bwd_scalar_kernel, spike_fwd_kernel, spike_fwd_scalar_kernel,
    )

    def _grid(n):
        return ((n + _BLOCK - 1) // _BLOCK,)

    def _kernels(x):
        """`(forward, backward)` kernels of the variant the record allows on x's device, noted
        for the GPU test run's record."""
        vector = verified.pick(VARIANTS, x.dtype, x.device) == VARIANTS[0]
        verified.note(VARIANTS[0] if vector and x.numel() % 16 == 0 else VARIANTS[1], x.dtype,
                      x.device)
        if vector:
            return spike_fwd_kernel, spike_bwd_kernel
        return spike_fwd_scalar_kernel, spike_bwd_scalar_kernel

    @triton_op("neurokern_triton::spike_fwd")
    def triton_spike_fwd(x: torch.Tensor, v_th: float, gamma: float, signed: bool,
                         spiking: bool) -> torch.Tensor:
        x = _flat(x)
        s = torch.empty_like(x)
        if x.numel():
            _kernels(x)[0][_grid(x.numel())](
                x, scalar_params(v_th, gamma, x.dtype, x.device), s, x.numel(),
                SIGNED=signed, SPIKING=spiking, BLOCK=_BLOCK)
        return s

    @triton_op("neurokern_triton::spike_bwd")
    def triton_spike_bwd(grad_s: torch.Tensor, x: torch.Tensor, v_th: float, gamma: float,
                         signed: bool) -> torch.Tensor:
        x, grad_s = _flat(x), _flat(grad_s)
        dx = torch.empty_like(x)
        if x.numel():
            _kernels(x)[1][_grid(x.numel())](
                grad_s, x, scalar_params(v_th, gamma, x.dtype, x.device), dx, x.numel(),
                SIGNED=signed, BLOCK=_BLOCK)
        return dx


def _spike_fwd_fake(x, v_th, gamma, signed, spiking):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _spike_bwd_fake(grad_s, x, v_th, gamma, signed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def spike_ops(backend):
    """`(spike_fwd, spike_bwd)` op overloads of `backend` ("cpu" or "triton")."""
    namespace = torch.ops.neurokern if backend == "cpu" else torch.ops.neurokern_triton
    return namespace.spike_fwd.default, namespace.spike_bwd.default


register_fakes("spike", _spike_fwd_fake, _spike_bwd_fake)


class FusedSpikeFunction(torch.autograd.Function):
    """spike / signed_spike on a fused backend: forward op, surrogate-gradient backward op."""

    @staticmethod
    def forward(ctx, x, v_th, gamma, signed, spiking, backend):
        fwd = eager_or_op(spike_ops(backend)[0])
        ctx.save_for_backward(x)
        ctx.v_th, ctx.gamma, ctx.signed, ctx.backend = v_th, gamma, signed, backend
        return fwd(x, v_th, gamma, signed, spiking)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_s):
        (x,) = ctx.saved_tensors
        bwd = eager_or_op(spike_ops(ctx.backend)[1])
        return bwd(grad_s, x, ctx.v_th, ctx.gamma, ctx.signed), None, None, None, None, None


def _register(op, signed):
    for backend in ("cpu", "triton"):
        def impl(x, v_th, gamma, *, spiking, backend=backend):
            return FusedSpikeFunction.apply(x, v_th, gamma, signed, spiking, backend)
        register(op, backend)(impl)


_register("spike", signed=False)
_register("signed_spike", signed=True)
