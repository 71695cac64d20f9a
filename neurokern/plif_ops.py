"""Fused multi-step PLIF: the torch.library ops, the Triton launchers, the autograd Function,
and their registration with the dispatcher (backends "cpu" and "triton").

Ops (same schema on both backends; the C++ ones are declared in csrc/register.cpp):
    plif_fwd(x, alpha, v0?, s0?, v_th, gamma, signed, batch_first, spiking, save_v)
        -> (s, v_seq, v_last, s_last)
    plif_bwd(grad_s, grad_v_last?, grad_s_last?, v_seq, alpha, v0?, v_th, gamma, signed,
             batch_first, detach_reset) -> (dx, dalpha_per_neuron, dv0, ds0)
`neurokern::*` run the C++ CPU kernels, `neurokern_triton::*` the Triton kernels.

What is saved for backward: the membranes v_t of every step ([T, N] in the compute dtype),
written by the forward only when a gradient is needed. The backward then reads v, dL/ds and
writes dx: 3 values per neuron and step, against 4 for recomputing the forward inside the
backward (read x, and v must still be produced in reverse order). The leak gradient is
reduced deterministically: the kernels write one partial sum per neuron ([N], 1/T of the
traffic) and a torch sum reduces it per channel; no atomics anywhere.
"""

from typing import List, Optional, Tuple

import torch

from neurokern._kernels import register_fakes, scalar_params, triton_available
from neurokern.dispatch import register
from neurokern.reference import compute_dtype

_BLOCK = 256  # neurons per program; each program loops over all T steps


def collapse_spatial(sizes, strides) -> Optional[List[Tuple[int, int]]]:
    """The spatial dims `(size, stride)` merged where memory allows, as exactly two dims
    (padded with size-1 dims), or None if they do not fit in two."""
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    merged = []
    for n, s in dims:
        if merged and merged[-1][1] == n * s:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    if len(merged) > 2:
        return None
    return [(1, 0)] * (2 - len(merged)) + merged


def step_strides(t: torch.Tensor, batch_first: bool):
    """`((T, B, C, S1, S2), (stride_t, stride_b, stride_c, stride_1, stride_2))` of a
    `[T, B, C, *S]` (or `[B, T, C, *S]`) tensor, or None if its spatial dims do not collapse
    into two strided dims."""
    spatial = collapse_spatial(t.shape[3:], t.stride()[3:])
    if spatial is None:
        return None
    time_dim, batch_dim = (1, 0) if batch_first else (0, 1)
    sizes = (t.shape[time_dim], t.shape[batch_dim], t.shape[2], spatial[0][0], spatial[1][0])
    strides = (t.stride(time_dim), t.stride(batch_dim), t.stride(2), spatial[0][1],
               spatial[1][1])
    return sizes, strides


def _strided(t, batch_first):
    """`t` and its step strides; a tensor whose spatial dims cannot be addressed with two
    strides (a rare view) is copied once."""
    layout = step_strides(t, batch_first)
    if layout is None:
        t = t.contiguous()
        layout = step_strides(t, batch_first)
    return t, layout


def _state_shape(x, batch_first):
    time_dim = 1 if batch_first else 0
    return x.shape[:time_dim] + x.shape[time_dim + 1:]


if triton_available():
    import triton

    from neurokern.triton_kernels.plif import plif_bwd_kernel, plif_fwd_kernel

    @torch.library.custom_op("neurokern_triton::plif_fwd", mutates_args=())
    def triton_plif_fwd(
        x: torch.Tensor, alpha: torch.Tensor, v0: Optional[torch.Tensor],
        s0: Optional[torch.Tensor], v_th: float, gamma: float, signed: bool, batch_first: bool,
        spiking: bool, save_v: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x, ((T, B, C, S1, S2), x_strides) = _strided(x, batch_first)
        N = B * C * S1 * S2
        s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _, s_strides = step_strides(s, batch_first)
        v_seq = torch.empty((T, N) if save_v else (0,), dtype=compute_dtype(x.dtype),
                            device=x.device)
        v_last = torch.empty(_state_shape(x, batch_first), dtype=x.dtype, device=x.device)
        s_last = torch.empty_like(v_last)
        has_state = v0 is not None
        if N:
            plif_fwd_kernel[(triton.cdiv(N, _BLOCK),)](
                x, alpha, v0.contiguous() if has_state else v_last,
                s0.contiguous() if has_state else s_last,
                scalar_params(v_th, gamma, x.dtype, x.device),
                s, v_seq, v_last, s_last,
                T, N, C, S1, S2, *x_strides, *s_strides,
                alpha.stride(0) if alpha.dim() else 0,
                HAS_STATE=has_state, SAVE_V=save_v, SIGNED=signed, SPIKING=spiking,
                BLOCK=_BLOCK,
            )
        return s, v_seq, v_last, s_last

    @torch.library.custom_op("neurokern_triton::plif_bwd", mutates_args=())
    def triton_plif_bwd(
        grad_s: torch.Tensor, grad_v_last: Optional[torch.Tensor],
        grad_s_last: Optional[torch.Tensor], v_seq: torch.Tensor, alpha: torch.Tensor,
        v0: Optional[torch.Tensor], v_th: float, gamma: float, signed: bool, batch_first: bool,
        detach_reset: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        grad_s, ((T, B, C, S1, S2), g_strides) = _strided(grad_s, batch_first)
        N = B * C * S1 * S2
        dx = torch.empty(grad_s.shape, dtype=grad_s.dtype, device=grad_s.device)
        _, d_strides = step_strides(dx, batch_first)
        dalpha = torch.empty(N, dtype=v_seq.dtype, device=grad_s.device)
        dv0 = torch.empty(_state_shape(grad_s, batch_first), dtype=grad_s.dtype,
                          device=grad_s.device)
        ds0 = torch.empty_like(dv0)
        if N:
            plif_bwd_kernel[(triton.cdiv(N, _BLOCK),)](
                grad_s,
                grad_v_last.contiguous() if grad_v_last is not None else dv0,
                grad_s_last.contiguous() if grad_s_last is not None else ds0,
                v_seq, alpha, v0.contiguous() if v0 is not None else dv0,
                scalar_params(v_th, gamma, grad_s.dtype, grad_s.device),
                dx, dalpha, dv0, ds0,
                T, N, C, S1, S2, *g_strides, *d_strides,
                alpha.stride(0) if alpha.dim() else 0,
                HAS_GRAD_V_LAST=grad_v_last is not None,
                HAS_GRAD_S_LAST=grad_s_last is not None,
                HAS_V0=v0 is not None, SIGNED=signed, DETACH_RESET=detach_reset, BLOCK=_BLOCK,
            )
        return dx, dalpha, dv0, ds0


def _plif_fwd_fake(x, alpha, v0, s0, v_th, gamma, signed, batch_first, spiking, save_v):
    v_last = x.new_empty(_state_shape(x, batch_first))
    s = x.new_empty(x.shape)
    steps = x.shape[1 if batch_first else 0]
    v_seq = x.new_empty((steps, v_last.numel()) if save_v else (0,),
                        dtype=compute_dtype(x.dtype))
    return s, v_seq, v_last, torch.empty_like(v_last)


def _plif_bwd_fake(grad_s, grad_v_last, grad_s_last, v_seq, alpha, v0, v_th, gamma, signed,
                   batch_first, detach_reset):
    dv0 = grad_s.new_empty(_state_shape(grad_s, batch_first))
    return (grad_s.new_empty(grad_s.shape), v_seq.new_empty((dv0.numel(),)), dv0,
            torch.empty_like(dv0))


register_fakes("plif", _plif_fwd_fake, _plif_bwd_fake)


def plif_ops(backend):
    """`(plif_fwd, plif_bwd)` op overloads of `backend` ("cpu" or "triton")."""
    namespace = torch.ops.neurokern if backend == "cpu" else torch.ops.neurokern_triton
    return namespace.plif_fwd.default, namespace.plif_bwd.default


class PLIFFunction(torch.autograd.Function):
    """Multi-step PLIF on a fused backend. Inputs `(x, alpha, v0, s0)`, outputs
    `(s, v_last, s_last)`; the backward runs the reverse-time kernel from the saved membranes."""

    @staticmethod
    def forward(ctx, x, alpha, v0, s0, v_th, gamma, signed, batch_first, spiking, detach_reset,
                backend):
        fwd, _ = plif_ops(backend)
        save_v = any(ctx.needs_input_grad[:4])
        s, v_seq, v_last, s_last = fwd(x, alpha, v0, s0, v_th, gamma, signed, batch_first,
                                       spiking, save_v)
        ctx.save_for_backward(v_seq, alpha, v0)
        ctx.set_materialize_grads(False)
        ctx.args = (v_th, gamma, signed, batch_first, detach_reset, backend)
        return s, v_last, s_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_s, grad_v_last, grad_s_last):
        v_seq, alpha, v0 = ctx.saved_tensors
        v_th, gamma, signed, batch_first, detach_reset, backend = ctx.args
        _, bwd = plif_ops(backend)
        if grad_s is None:  # only the final state was used, if anything
            ref = grad_v_last if grad_v_last is not None else grad_s_last
            if ref is None:
                return (None,) * 11
            steps = v_seq.shape[0]
            shape = (ref.shape[0], steps, *ref.shape[1:]) if batch_first else (steps, *ref.shape)
            grad_s = ref.new_zeros(shape)
        dx, dalpha_n, dv0, ds0 = bwd(grad_s, grad_v_last, grad_s_last, v_seq, alpha, v0, v_th,
                                     gamma, signed, batch_first, detach_reset)
        dalpha = None
        if ctx.needs_input_grad[1]:
            if alpha.dim():  # per channel: neurons are ordered (b, c, spatial)
                batch, channels = dx.shape[0 if batch_first else 1], dx.shape[2]
                spatial = dalpha_n.numel() // (batch * channels) if batch * channels else 0
                dalpha = dalpha_n.view(batch, channels, spatial).sum((0, 2))
            else:
                dalpha = dalpha_n.sum()
            dalpha = dalpha.to(alpha.dtype)
        has_state = v0 is not None
        return (dx, dalpha, dv0 if has_state else None, ds0 if has_state else None,
                None, None, None, None, None, None, None)


def _plif_impl(backend):
    def impl(x, alpha, *, v_th, gamma, signed, batch_first, state, return_state, detach_reset,
             spiking):
        if not isinstance(alpha, torch.Tensor):
            alpha = torch.tensor(alpha, dtype=compute_dtype(x.dtype), device=x.device)
        v0, s0 = state if state is not None else (None, None)
        s, v_last, s_last = PLIFFunction.apply(x, alpha, v0, s0, v_th, gamma, signed,
                                               batch_first, spiking, detach_reset, backend)
        return (s, (v_last, s_last)) if return_state else s
    return impl


for _backend in ("cpu", "triton"):
    register("plif", _backend)(_plif_impl(_backend))
