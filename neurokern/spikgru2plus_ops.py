"""Fused SpikGRU2+ layer direction (SPEC.md 3): the torch.library ops (the Triton ones and the
C++ ones' fake implementations), the Triton launchers, the autograd Function, and the
registration with the dispatcher (backends "cpu", "triton" and "cuda").

Ops (schemas in csrc/register.cpp, CPU kernels in csrc/spikgru2plus_cpu.cpp, CUDA kernels, the
persistent loops, in csrc/cuda/; the same schemas as `neurokern_triton::*` on the Triton step
kernels of triton_kernels/spikgru2plus.py):
    spikgru2plus_fwd(gi, weight_hh, bias_hh?, alpha, v0?, i0?, s0?, v_th, gamma, signed,
                     reset_gate, spiking, lengths?) -> (s_seq, v_seq, i_seq, gh_seq)
        s, v, i: [T, B, H]; gh_seq: [T, B, 3H], U s_{t-1} of every step (without b_hh) as the
        loop computed it, in weight_hh's dtype: the backward reads the gates' recurrent terms
        from it instead of recomputing them
    spikgru2plus_bwd(grad_s, grad_v_last?, grad_i_last?, grad_s_last?, gi, weight_hh,
                     bias_hh?, alpha, s_seq, v_seq, i_seq, gh_seq, v0?, i0?, s0?, v_th, gamma,
                     signed, reset_gate, lengths?) -> (dgi, dweight_hh, dbias_hh, dalpha, dv0,
                     di0, ds0)
    lengths: [D * B] int64 on gi's device, or None (every row runs all T steps). Row b runs the
        steps t < lengths[b] of its processing order; at the steps after them it is frozen:
        the forward writes its state of step t - 1 again as its state of step t (so the last
        step holds each row's final state; gh_seq's rows there are not read), and the backward
        passes the carries and dL/ds through unchanged and writes zeros to dgi and dgh.

The ops run the time loop only; work that is parallel over time is done here, one matrix product
over all steps each: gi = x W^T + b_ih before the loop; dx = dgi W, dW = dgi^T x and db_ih =
sum of dgi after the backward loop, dU = dgh^T S_prev likewise inside the backward op. On the
Triton backend a step is one recurrent product (cuBLAS) and one fused kernel for all gate and
state arithmetic, forward and backward, and on a GPU each op's whole loop is captured once per
shape in a CUDA graph and replayed (`neurokern._kernels.graphed`; NEUROKERN_CUDA_GRAPHS=0 runs
it launch by launch). On the CUDA backend each op is one persistent kernel for the whole loop
(csrc/cuda/, docs/kernels.md).

Compute dtype: float32 or float64, that of x. float16/bfloat16 inputs are computed in float32
(x, weights and state converted before the ops, outputs and gradients converted back), exactly
as neurokern.reference computes them; the C++ ops themselves reject half tensors.
Under autocast (bf16/fp16) the Triton backend runs every matrix product in autocast's dtype, as
the reference and cuDNN do under autocast: x, W and U are cast once, the spikes (exact in bf16:
-1, 0, +1) and the gate gradients dgh are kept in that dtype for the per-step products, while
the state, the gate arithmetic, gi and the saved v, i, s stay in float32 (`product_dtype`). The
Triton and CUDA ops take weight_hh in the products' dtype and everything else in the compute
dtype (the CUDA loops accumulate the products of bf16 U with float32 factors in float32).

Directions: the Triton and CUDA ops also run several directions at once (a bidirectional layer):
weight_hh `[D, 3H, H]`, b_hh `[D, 3H]`, alpha `[D, H]`, and gi, the state and the sequences with
rows `[D * B]`, direction-major, each direction in its own processing order
(`SpikGRU2PlusFunction` flips the reverse direction's time before and after); on Triton one
batched product per step.

Saved for backward, per step and batch row: gi (3H values), s, v and i (H each) in the compute
dtype and gh = U s_{t-1} (3H, in the products' dtype), i.e. 9H values, plus x (time-major, in
the products' dtype; a copy for batch_first input). The gates are recomputed in the backward
from gi and gh. Keeping gh costs 3H values per step and row (35 MB per direction of the
paper's layer in float32) and saves the backward a product S_prev U^T over all steps (the
forward's per-step products write gh anyway).
"""

import os
from typing import Optional, Tuple

import torch

from neurokern import _extension, reference, verified
from neurokern._kernels import (
    eager_or_op, first_order_only, graphed, register_fakes, scalar_params, triton_available,
    triton_op,
)
from neurokern.dispatch import baseline_variant, register
from neurokern.reference import compute_dtype

_OPS = ("spikgru2plus_fwd", "spikgru2plus_bwd")


def _cpu_kernels_present() -> bool:
    """Whether the loaded neurokern._C implements both ops for CPU tensors (a build older than
    csrc/spikgru2plus_cpu.cpp declares the schemas without kernels)."""
    return all(
        _extension.has_op(op)
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"neurokern::{op}", "CPU")
        for op in _OPS
    )


def _fwd_fake(gi, weight_hh, bias_hh, alpha, v0, i0, s0, v_th, gamma, signed, reset_gate,
              spiking, lengths=None):
    steps, batch, gates = gi.shape
    shape = (steps, batch, gates // 3)
    return (gi.new_empty(shape), gi.new_empty(shape), gi.new_empty(shape),
            gi.new_empty(gi.shape, dtype=weight_hh.dtype))


def _bwd_fake(grad_s, grad_v_last, grad_i_last, grad_s_last, gi, weight_hh, bias_hh, alpha,
              s_seq, v_seq, i_seq, gh_seq, v0, i0, s0, v_th, gamma, signed, reset_gate,
              lengths=None):
    steps, rows, gates = gi.shape  # rows = D * B
    hidden = gates // 3
    return (gi.new_empty((steps, rows, gates)), gi.new_empty(weight_hh.shape),
            gi.new_empty(weight_hh.shape[:-2] + (gates,)), gi.new_empty(alpha.shape),
            gi.new_empty((rows, hidden)), gi.new_empty((rows, hidden)),
            gi.new_empty((rows, hidden)))


def spikgru2plus_ops(backend):
    """`(spikgru2plus_fwd, spikgru2plus_bwd)` op overloads of `backend` ("cpu", "cuda" or
    "triton"); the C++ ops of "cpu" and "cuda" are the same, the dispatcher picks the kernel
    by the tensors' device."""
    namespace = torch.ops.neurokern_triton if backend == "triton" else torch.ops.neurokern
    return namespace.spikgru2plus_fwd.default, namespace.spikgru2plus_bwd.default


if triton_available():
    import triton

    from neurokern.triton_kernels.spikgru2plus import (
        spikgru2plus_step_bwd_kernel,
        spikgru2plus_step_fwd_kernel,
    )

    _BLOCK = 128  # hidden units per program; the grid is (H / BLOCK, D * B)

    def _directions(weight_hh):
        """D: 1 for a [3H, H] weight_hh, its leading size for a stacked [D, 3H, H] one."""
        return weight_hh.shape[0] if weight_hh.dim() == 3 else 1

    _side_streams = {}  # device -> the stream of the float32 products' directions after the first

    def _product(a, weight, out, directions):
        """out = a @ weight per direction: rows of `a` and `out` are direction-major
        ([D * B, .]), `weight` is [D, ., .] (or 2-D for D = 1). Float32 on a GPU: one mm per
        direction, the first on the current stream and the others on a side stream at the same
        time (a fork and a join in the captured graph); otherwise one batched product. Measured
        per two-direction step on an H100 at B = 32, H = 1024 in CUDA graphs
        (benchmarks/probe_spikgru2plus_loops.py): float32 forward 25.7 us on two streams, 28.7
        as bmm, 31.2 as two mm in turn; backward (K = 3H) 22.8, 58.3 and 28.1 us; bf16 bmm was
        fastest (forward 4.7 us, backward 6.6 against 6.9 on two streams)."""
        if directions == 1:
            return torch.mm(a, weight, out=out)
        rows = a.shape[0] // directions  # explicit sizes: -1 is ambiguous for B = 0
        a, out = a.view(directions, rows, a.shape[-1]), out.view(directions, rows, out.shape[-1])
        if weight.dtype != torch.float32 or not a.is_cuda:
            return torch.bmm(a, weight, out=out)
        main = torch.cuda.current_stream(a.device)
        side = _side_streams.get(a.device)
        if side is None:
            side = _side_streams[a.device] = torch.cuda.Stream(a.device)
        side.wait_stream(main)  # the factors are written on the main stream
        torch.mm(a[0], weight[0], out=out[0])
        with torch.cuda.stream(side):
            for d in range(1, directions):
                torch.mm(a[d], weight[d], out=out[d])
        main.wait_stream(side)
        return out

    @triton_op("neurokern_triton::spikgru2plus_fwd")
    def triton_spikgru2plus_fwd(
        gi: torch.Tensor, weight_hh: torch.Tensor, bias_hh: Optional[torch.Tensor],
        alpha: torch.Tensor, v0: Optional[torch.Tensor], i0: Optional[torch.Tensor],
        s0: Optional[torch.Tensor], v_th: float, gamma: float, signed: bool, reset_gate: bool,
        spiking: bool, lengths: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return graphed("spikgru2plus_fwd", _fwd_loop, gi, weight_hh, bias_hh, alpha, v0, i0, s0,
                       v_th, gamma, signed, reset_gate, spiking, lengths)

    def _active_steps(lengths, steps):
        """`[T, D * B]` int8: whether each row runs at each step; None without lengths."""
        if lengths is None:
            return None
        return reference.step_mask(lengths, steps, lengths.device).to(torch.int8)

    def _fwd_loop(gi, weight_hh, bias_hh, alpha, v0, i0, s0, v_th, gamma, signed, reset_gate,
                  spiking, lengths):
        steps, rows, gates = gi.shape  # rows = D * B
        hidden = gates // 3
        directions = _directions(weight_hh)
        s_seq = gi.new_empty((steps, rows, hidden))  # [T, D * B, H]
        v_seq, i_seq = torch.empty_like(s_seq), torch.empty_like(s_seq)
        # U s_{t-1} of every step, kept for the backward; the kernel adds b_hh
        gh_seq = gi.new_empty((steps, rows, gates), dtype=weight_hh.dtype)
        zeros = gi.new_zeros((rows, hidden))
        v, i, s = (zeros if t is None else t.contiguous() for t in (v0, i0, s0))
        params = scalar_params(v_th, gamma, gi.dtype, gi.device)
        alpha = alpha.contiguous()
        # The products run in weight_hh's dtype; with a lower one than gi's (mixed), the kernel
        # also writes each s_t in it (s_mm) for the next product.
        mixed = weight_hh.dtype != gi.dtype
        grid = (triton.cdiv(hidden, _BLOCK), rows)
        s_mm = s.to(weight_hh.dtype, copy=True) if mixed else s
        weight_t = weight_hh.transpose(-1, -2)  # [D, H, 3H] (or [H, 3H])
        bias = gi if bias_hh is None else bias_hh.contiguous()
        active = _active_steps(lengths, steps)  # [T, D * B]
        for t in range(steps):
            if t == 0 and s0 is None:  # U s_{-1} = U 0: 0, NaN in a row of U with an inf or NaN
                gh_seq[0].view(directions, rows // directions, gates).copy_(
                    (weight_hh * 0).sum(-1).view(directions, 1, gates))
            else:
                _product(s_mm, weight_t, gh_seq[t], directions)
            spikgru2plus_step_fwd_kernel[grid](
                gi[t], gh_seq[t], bias, alpha, v, i, s, params,
                s_seq[t], v_seq[t], i_seq[t], s_mm, gi if active is None else active[t],
                hidden, rows // directions, gi.stride(1),
                RESET_GATE=reset_gate, HAS_BIAS=bias_hh is not None, SIGNED=signed,
                SPIKING=spiking, STORE_S_MM=mixed, HAS_LENGTHS=lengths is not None,
                BLOCK=_BLOCK)
            v, i, s = v_seq[t], i_seq[t], s_seq[t]
            if not mixed:
                s_mm = s
        return s_seq, v_seq, i_seq, gh_seq

    @triton_op("neurokern_triton::spikgru2plus_bwd")
    def triton_spikgru2plus_bwd(
        grad_s: torch.Tensor, grad_v_last: Optional[torch.Tensor],
        grad_i_last: Optional[torch.Tensor], grad_s_last: Optional[torch.Tensor],
        gi: torch.Tensor, weight_hh: torch.Tensor, bias_hh: Optional[torch.Tensor],
        alpha: torch.Tensor, s_seq: torch.Tensor, v_seq: torch.Tensor, i_seq: torch.Tensor,
        gh_seq: torch.Tensor, v0: Optional[torch.Tensor], i0: Optional[torch.Tensor],
        s0: Optional[torch.Tensor], v_th: float, gamma: float, signed: bool, reset_gate: bool,
        lengths: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
               torch.Tensor, torch.Tensor]:
        return graphed("spikgru2plus_bwd", _bwd_loop, grad_s, grad_v_last, grad_i_last,
                       grad_s_last, gi, weight_hh, bias_hh, alpha, s_seq, v_seq, i_seq, gh_seq,
                       v0, i0, s0, v_th, gamma, signed, reset_gate, lengths)

    def _bwd_loop(grad_s, grad_v_last, grad_i_last, grad_s_last, gi, weight_hh, bias_hh, alpha,
                  s_seq, v_seq, i_seq, gh_seq, v0, i0, s0, v_th, gamma, signed, reset_gate,
                  lengths):
        steps, rows, gates = gi.shape  # rows = D * B
        hidden = gates // 3
        directions = _directions(weight_hh)
        batch = rows // directions
        if grad_s.stride(-1) != 1:
            grad_s = grad_s.contiguous()
        zeros = gi.new_zeros((rows, hidden))
        v0, i0 = (zeros if t is None else t.contiguous() for t in (v0, i0))
        # S_prev = [s_0, s_1 .. s_{T-1}] ([T, D * B, H]) in the products' dtype, for dU
        s_prev = torch.cat([(zeros if s0 is None else s0).unsqueeze(0), s_seq[:-1]]).to(
            weight_hh.dtype)
        # dgh feeds the products, so it is kept in their dtype (weight_hh's)
        dgi, dgh = torch.empty_like(gi), torch.empty_like(gh_seq)
        # the kernel's carries: [D * B, H], contiguous whatever the gradients' layout
        dv_next, di_next = (zeros.clone() if g is None else
                            g.clone(memory_format=torch.contiguous_format)
                            for g in (grad_v_last, grad_i_last))
        # dL/ds_t = ds (output gradient and reset path, updated in place by the kernel) + ds_rec
        # (the product path dL/d(gh_{t+1}) U, in the products' dtype)
        ds = (grad_s[steps - 1] + (0 if grad_s_last is None else grad_s_last)).contiguous()
        ds_rec, dalpha = torch.empty_like(zeros, dtype=weight_hh.dtype), torch.zeros_like(zeros)
        params = scalar_params(v_th, gamma, gi.dtype, gi.device)
        grid = (triton.cdiv(hidden, _BLOCK), rows)
        alpha = alpha.contiguous()
        bias = gi if bias_hh is None else bias_hh.contiguous()
        active = _active_steps(lengths, steps)  # [T, D * B]
        for t in range(steps - 1, -1, -1):
            grad_prev = grad_s[t - 1] if t > 0 else ds  # the output gradient of s_{t-1}
            spikgru2plus_step_bwd_kernel[grid](
                gi[t], gh_seq[t], bias, alpha, v_seq[t - 1] if t > 0 else v0,
                i_seq[t - 1] if t > 0 else i0, v_seq[t], i_seq[t], ds, ds_rec, dv_next,
                di_next, params, dgi[t], dgh[t], ds, grad_prev, dalpha,
                gi if active is None else active[t], hidden, batch,
                gi.stride(1), dgi.stride(1), grad_prev.stride(0), RESET_GATE=reset_gate,
                HAS_BIAS=bias_hh is not None, SIGNED=signed, HAS_DS_REC=t < steps - 1,
                HAS_GRAD_PREV=t > 0, HAS_LENGTHS=lengths is not None, BLOCK=_BLOCK)
            _product(dgh[t], weight_hh, ds_rec, directions)  # product path of dL/ds_{t-1}
        # all steps at once, per direction: dU = dgh^T s_prev, db_hh and dalpha summed over T, B
        dgh4 = dgh.view(steps, directions, batch, gates)
        s_prev4 = s_prev.view(steps, directions, batch, hidden)
        dweight_hh = torch.einsum("tdbg,tdbh->dgh", dgh4, s_prev4)
        dbias_hh = dgh4.sum((0, 2), dtype=gi.dtype)
        dalpha = dalpha.view(directions, batch, hidden).sum(1)
        if weight_hh.dim() == 2:
            dweight_hh, dbias_hh, dalpha = dweight_hh[0], dbias_hh[0], dalpha[0]
        return (dgi, dweight_hh.to(gi.dtype), dbias_hh, dalpha, dv_next, di_next, ds + ds_rec)


register_fakes("spikgru2plus", _fwd_fake, _bwd_fake)


def _cast(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def split_products(backend: str, mm_dtype: torch.dtype) -> bool:
    """Whether the Triton and CUDA backends compute the float32 products with a spike input
    (`spike_input=True`) as bf16 products of split factors (`split_product`):
    NEUROKERN_SPLIT_PRODUCTS=1, read at each call. Off by default: on an H100 they took the
    paper's float32 stack from 33.9 to 33.0 ms at about 7x the error of cuBLAS's float32
    products (the tensor cores' float32 accumulation; docs/kernels.md)."""
    return (backend in ("triton", "cuda") and mm_dtype == torch.float32
            and os.environ.get("NEUROKERN_SPLIT_PRODUCTS", "0") == "1")


def bf16_split(a: torch.Tensor) -> torch.Tensor:
    """`[3, *a.shape]` bfloat16 parts (hi, mid, lo) of a float32 tensor with hi + mid + lo = a
    to within 2^-26 |a| (each part rounds the remainder of the ones before it; the remainders
    are exact in float32), so products with a bf16-exact factor keep float32 accuracy."""
    hi = a.to(torch.bfloat16)
    rest = a - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    return torch.stack([hi, mid, lo])


def split_product(a: torch.Tensor, b: torch.Tensor, exact: str) -> torch.Tensor:
    """`a @ b` in float32 ([M, K] x [K, N]) where factor `exact` ("a" or "b") holds values that
    bfloat16 represents exactly (spikes) and the other is float32: one bf16 product over a K
    three times as long, `[a | a | a] @ [hi; mid; lo]` (or `[hi | mid | lo] @ [b; b; b]`), every
    product of its terms exact and the sum accumulated in float32. On a GPU the tensor cores
    run it (`torch.mm(..., out_dtype=torch.float32)`); on the CPU (the interpreter and emulation
    tests) the same bf16 values are multiplied as float32."""
    if exact == "a":
        a3 = a.to(torch.bfloat16).repeat(1, 3)  # [M, 3K]
        b3 = bf16_split(b).reshape(3 * b.shape[0], b.shape[1])  # [3K, N]
    else:
        # [M, 3K]: hi | mid | lo
        a3 = bf16_split(a).permute(1, 0, 2).reshape(a.shape[0], 3 * a.shape[1])
        b3 = b.to(torch.bfloat16).repeat(3, 1)  # [3K, N]
    if a3.is_cuda:
        return torch.mm(a3, b3, out_dtype=torch.float32)
    return torch.mm(a3.float(), b3.float())


def product_dtype(device_type: str, dtype: torch.dtype, backend: str) -> torch.dtype:
    """The dtype the matrix products of a layer run in: under autocast (bf16/fp16) on the
    Triton and CUDA backends, autocast's dtype, with the state and the gate arithmetic still in
    `dtype` (the compute dtype); otherwise `dtype` itself. The C++ CPU kernels compute in
    float32 or float64 only, so the "cpu" backend ignores autocast. (The CUDA loops take U in
    autocast's dtype and accumulate its products in float32.)"""
    if (backend in ("triton", "cuda") and dtype == torch.float32
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return dtype


class SpikGRU2PlusFunction(torch.autograd.Function):
    """One SpikGRU2+ layer on a fused backend: one direction (weights `[3H, I]`, `[3H, H]`,
    state `[B, H]`), or D directions at once (each parameter stacked `[D, ...]`, state
    `[D, B, H]`; direction 1 runs backwards in time and `s` is `[T, B, D * H]`, as `nn.GRU`).

    Inputs `(x, weight_ih, weight_hh, bias_ih, bias_hh, alpha, v0, i0, s0, lengths)` (biases,
    state and lengths may be None), outputs `(s, v_T, i_T, s_T)`. With `lengths` (`[B]`), the
    reverse direction's rows are reversed within their lengths (`reverse_within_lengths`), the
    ops freeze each row after its length, and `s` is zeroed past it (its incoming gradient
    there is ignored). The forward computes gi in one product and runs
    the forward op; the backward runs the backward op from the saved gi, s, v, i and turns dgi
    into dx, dW and db_ih with one product each. The products run in `product_dtype` (bf16/fp16
    under autocast on the Triton and CUDA backends), everything else in the compute dtype;
    autocast itself is switched off inside, so that each product runs in the dtype chosen here.
    With `split_products`, the float32 products with x (gi and dW) run as `split_product`s
    when x holds spikes (`spike_input`), x saved in bf16.
    """

    @staticmethod
    def forward(ctx, x, weight_ih, weight_hh, bias_ih, bias_hh, alpha, v0, i0, s0, lengths, v_th,
                gamma, signed, reset_gate, batch_first, spiking, spike_input, backend):
        dtype = compute_dtype(x.dtype)
        mm_dtype = product_dtype(x.device.type, dtype, backend)
        split_x = spike_input and split_products(backend, mm_dtype)
        if backend != "cpu":  # for the GPU test run's record (neurokern/verified.py)
            verified.note(baseline_variant("spikgru2plus", backend, mm_dtype), mm_dtype,
                          x.device)
            if split_x:
                verified.note(f"{backend}.spikgru2plus.split_products", mm_dtype, x.device)
        with torch.autocast(x.device.type, enabled=False):
            return SpikGRU2PlusFunction._forward(
                ctx, x, weight_ih, weight_hh, bias_ih, bias_hh, alpha, v0, i0, s0, lengths, v_th,
                gamma, signed, reset_gate, batch_first, spiking, backend, dtype, mm_dtype,
                split_x)

    @staticmethod
    def _forward(ctx, x, weight_ih, weight_hh, bias_ih, bias_hh, alpha, v0, i0, s0, lengths, v_th,
                 gamma, signed, reset_gate, batch_first, spiking, backend, dtype, mm_dtype,
                 split_x):
        fwd = eager_or_op(spikgru2plus_ops(backend)[0])
        directions = weight_hh.shape[0] if weight_hh.dim() == 3 else 1
        # [T, B, I] contiguous: a batch-major x is copied once, which costs less than the
        # product on the strided view (matmul cannot fold it into one GEMM) and gives dW = dgi^T x
        # the same layout. With split products x is a spike input, kept in bf16 (exact).
        x_tm = (x.transpose(0, 1) if batch_first else x).to(
            torch.bfloat16 if split_x else mm_dtype).contiguous()
        steps, batch, inputs = x_tm.shape
        weight_ih_c, weight_hh_c = weight_ih.to(mm_dtype), weight_hh.to(mm_dtype)
        bias_hh_c, alpha_c = _cast(bias_hh, dtype), alpha.to(dtype)
        # [D * B, H] (every size explicit here and below: -1 is ambiguous for I, H or B = 0)
        v0_c, i0_c, s0_c = (None if t is None else
                            t.to(dtype).reshape(directions * batch, t.shape[-1])
                            for t in (v0, i0, s0))
        valid = _valid_rows(lengths, steps, batch, x.device)  # [N] or None
        if lengths is not None:
            lengths = lengths.to(x.device, torch.int64)  # [B]
        # [D * B]: each row's length, for the ops
        row_lengths = None if lengths is None else lengths.repeat(directions)

        # all directions' input projections in one product: [T * B, D * 3H] (with lengths known
        # on the host, of the valid steps' rows only)
        gi_width = directions * weight_ih.shape[-2]
        x_2d = x_tm.view(steps * batch, inputs)
        weight_ih_t = weight_ih_c.reshape(gi_width, inputs).t()
        x_rows = x_2d if valid is None else x_2d.index_select(0, valid)
        # b_ih after the product, as the reference rounds it: on a GPU without autocast in the
        # product's epilogue (to the float32 or float64 sum: the same rounding, one pass less)
        epilogue = bias_ih is not None and mm_dtype == dtype and x.is_cuda and not split_x
        if split_x:
            gi = split_product(x_rows, weight_ih_t, "a")
        elif epilogue:
            gi = torch.addmm(bias_ih.to(dtype).reshape(-1), x_rows, weight_ih_t)
        else:
            gi = torch.mm(x_rows, weight_ih_t)
        gi = gi.to(dtype)
        if bias_ih is not None and not epilogue:
            gi = gi + bias_ih.to(dtype).reshape(-1)
        if valid is not None:  # zeros at the padded steps, which the ops do not use
            gi = gi.new_zeros((steps * batch, gi.shape[1])).index_copy_(0, valid, gi)
        # [T, D * B, 3H]
        gi = _to_processing_order(gi.view(steps, batch, gi.shape[-1]), directions, lengths)
        # [T, D * B, H] each, and gh_seq = U s_{t-1} [T, D * B, 3H]
        s_seq, v_seq, i_seq, gh_seq = fwd(gi, weight_hh_c, bias_hh_c, alpha_c, v0_c, i0_c, s0_c,
                                          v_th, gamma, signed, reset_gate, spiking, row_lengths)

        ctx.save_for_backward(x_tm, weight_ih_c, weight_hh_c, bias_hh_c, alpha_c, gi, s_seq,
                              v_seq, i_seq, gh_seq, v0_c, i0_c, s0_c, lengths, row_lengths,
                              valid)
        ctx.set_materialize_grads(False)
        ctx.args = (v_th, gamma, signed, reset_gate, batch_first, backend, directions, split_x)
        ctx.device_type = x.device.type
        ctx.inputs = tuple(None if t is None else (t.dtype, t.shape)
                           for t in (x, weight_ih, weight_hh, bias_ih, bias_hh, alpha, v0, i0, s0))
        # Each output is a tensor that no other op of this forward returned as well: no
        # `.to()` to the same dtype or `.contiguous()` of a contiguous view (both return their
        # input itself). torch 2.11's torch.compile returns every intermediate of an
        # autograd.Function's forward as an extra output, and autograd gives a tensor returned
        # twice the gradient slot of the later copy: the backward then got zeros for grad_s
        # (pytorch/pytorch#180642; torch 2.13 gives the right gradients either way).
        s = _to_time_order(s_seq, directions, lengths)  # [T, B, D * H]
        if lengths is not None:  # the ops froze the rows that ended: their spikes are 0
            s = torch.where(reference.step_mask(lengths, steps, x.device).unsqueeze(-1), s, 0)
        if batch_first:  # a copy also where the transposed view is contiguous (T or B = 1)
            s = s.transpose(0, 1).clone(memory_format=torch.contiguous_format)
        s = s if s.dtype == x.dtype else s.to(x.dtype)
        hidden = s_seq.shape[-1]
        final_shape = (directions, batch, hidden) if directions > 1 else (batch, hidden)
        return (s, *(seq[-1].reshape(final_shape).to(x.dtype, copy=True)
                     for seq in (v_seq, i_seq, s_seq)))

    @staticmethod
    @first_order_only
    def backward(ctx, grad_s, grad_v_last, grad_i_last, grad_s_last):
        with torch.autocast(ctx.device_type, enabled=False):
            return SpikGRU2PlusFunction._backward(ctx, grad_s, grad_v_last, grad_i_last,
                                                  grad_s_last)

    @staticmethod
    def _backward(ctx, grad_s, grad_v_last, grad_i_last, grad_s_last):
        (x_tm, weight_ih, weight_hh, bias_hh, alpha, gi, s_seq, v_seq, i_seq, gh_seq, v0, i0,
         s0, lengths, row_lengths, valid) = ctx.saved_tensors
        v_th, gamma, signed, reset_gate, batch_first, backend, directions, split_x = ctx.args
        needs = ctx.needs_input_grad
        if grad_s is None and grad_v_last is None and grad_i_last is None and grad_s_last is None:
            return (None,) * 18
        bwd = eager_or_op(spikgru2plus_ops(backend)[1])
        dtype = gi.dtype
        if grad_s is None:  # only the final state was used
            grad_s = gi.new_zeros(s_seq.shape)
        else:  # [T, B, D * H] -> [T, D * B, H]: a view for one direction (the op reads any
            # (t, b) strides), a copy for two
            grad_s = grad_s.transpose(0, 1) if batch_first else grad_s
            if lengths is not None:  # the spikes past a row's length are constant zeros
                grad_s = torch.where(
                    reference.step_mask(lengths, grad_s.shape[0], grad_s.device).unsqueeze(-1),
                    grad_s, 0)
            grad_s = _to_processing_order(grad_s, directions, lengths)

        steps, batch, inputs = x_tm.shape

        def last(g):  # [D, B, H] or [B, H] -> [D * B, H] in the compute dtype
            return None if g is None else g.to(dtype).reshape(directions * batch, g.shape[-1])

        dgi, dweight_hh, dbias_hh, dalpha, dv0, di0, ds0 = bwd(
            grad_s.to(dtype), last(grad_v_last), last(grad_i_last), last(grad_s_last), gi,
            weight_hh, bias_hh, alpha, s_seq, v_seq, i_seq, gh_seq, v0, i0, s0, v_th, gamma,
            signed, reset_gate, row_lengths)

        # [T * B, D * 3H]
        dgi_2d = _to_time_order(dgi, directions, lengths).reshape(
            steps * batch, directions * dgi.shape[-1])
        # the products' operand (float32 when split); with `valid`, its rows at the valid steps
        # only (dgi is 0 at the others)
        dgi_mm = (dgi_2d if valid is None else dgi_2d.index_select(0, valid)).to(
            weight_ih.dtype)
        grads = [None] * 9
        if needs[0]:  # both directions' paths summed by the one product
            dx = torch.mm(dgi_mm, weight_ih.reshape(dgi_mm.shape[1], inputs))
            if valid is not None:
                dx = dx.new_zeros((steps * batch, inputs)).index_copy_(0, valid, dx)
            dx = dx.view(steps, batch, inputs)
            grads[0] = dx.transpose(0, 1) if batch_first else dx
        if needs[1]:  # [D * 3H, I]
            x_2d = x_tm.view(steps * batch, inputs)
            x_rows = x_2d if valid is None else x_2d.index_select(0, valid)
            grads[1] = (split_product(dgi_mm.t(), x_rows, "b") if split_x
                        else torch.mm(dgi_mm.t(), x_rows))
        if needs[3]:
            grads[3] = dgi_2d.sum(0)
        for k, g in ((2, dweight_hh), (4, dbias_hh), (5, dalpha), (6, dv0), (7, di0), (8, ds0)):
            if needs[k]:
                grads[k] = g
        grads = [None if g is None else g.reshape(shape).to(dt)
                 for g, (dt, shape) in zip(grads, (i or (None, None) for i in ctx.inputs))]
        return (*grads, None, None, None, None, None, None, None, None, None)


def _valid_rows(lengths: Optional[torch.Tensor], steps: int, batch: int,
                device) -> Optional[torch.Tensor]:
    """The rows `t * B + b` with `t < lengths[b]` of a time-major `[T * B, .]` matrix (`[N]`
    int64 on `device`), so that the products over all steps (gi = x W^T, dx, dW) skip the
    padded steps; None without padded steps, and where the lengths are not known on the host
    (a device tensor: finding the rows would wait for the device) or a graph is being recorded
    (torch.compile, torch.jit.trace: N would depend on the data)."""
    if (lengths is None or lengths.device.type != "cpu" or torch.compiler.is_compiling()
            or torch.jit.is_tracing()):
        return None
    mask = reference.step_mask(lengths, steps, "cpu").reshape(-1)  # [T * B]
    if bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1).to(device)


def _to_processing_order(seq: torch.Tensor, directions: int,
                         lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`[T, B, D * X]` in time order -> `[T, D * B, X]`, rows direction-major, each direction
    in its processing order (the reverse direction's time flipped, within each row's length
    with `lengths` [B]). Itself for D = 1."""
    if directions == 1:
        return seq
    steps, batch, width = seq.shape
    forward, reverse = seq.view(steps, batch, directions, width // directions).unbind(2)
    return torch.stack([forward, reference.reverse_within_lengths(reverse, lengths)], 1).view(
        steps, directions * batch, width // directions)


def _to_time_order(seq: torch.Tensor, directions: int,
                   lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The inverse of `_to_processing_order`: `[T, D * B, X]` -> `[T, B, D * X]`."""
    if directions == 1:
        return seq
    steps, rows, width = seq.shape
    forward, reverse = seq.view(steps, directions, rows // directions, width).unbind(1)
    return torch.cat([forward, reference.reverse_within_lengths(reverse, lengths)], -1)


class _TraceContext:
    """The autograd context's part that `SpikGRU2PlusFunction.forward` uses, for `_apply`."""

    def save_for_backward(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def _apply(*args):
    """`SpikGRU2PlusFunction.apply(*args)`; under `torch.jit.trace`, its forward alone, so that
    the trace records the ops it runs (the `neurokern` ops and ATen ops), which `torch.jit.save`
    can serialise; an autograd.Function it records as a Python call it cannot save. A traced
    module therefore runs inference; training uses eager mode or torch.compile."""
    if torch.jit.is_tracing():
        return SpikGRU2PlusFunction.forward(_TraceContext(), *args)
    return SpikGRU2PlusFunction.apply(*args)


def _impl(backend):
    def spikgru2plus(x, weight_ih, weight_hh, bias_ih, bias_hh, alpha, *, v_th=1.0, gamma=10.0,
                     signed=True, reset_gate=True, batch_first=False, state=None, spiking=True,
                     spike_input=False, lengths=None):
        """`neurokern.reference.spikgru2plus` on the fused kernels: returns
        `(s, (v_T, i_T, s_T))`. Arguments are validated by `neurokern.functional`."""
        v0, i0, s0 = state if state is not None else (None, None, None)
        s, v_last, i_last, s_last = _apply(
            x, weight_ih, weight_hh, bias_ih, bias_hh, alpha, v0, i0, s0, lengths, v_th, gamma,
            signed, reset_gate, batch_first, spiking, spike_input, backend)
        return s, (v_last, i_last, s_last)

    spikgru2plus.__qualname__ = spikgru2plus.__name__ = f"spikgru2plus_{backend}"
    return spikgru2plus


def _bidirectional_impl(backend):
    one_direction = _impl(backend)

    def spikgru2plus_bidirectional(x, params, reverse_params, *, v_th=1.0, gamma=10.0,
                                   signed=True, reset_gate=True, batch_first=False, state=None,
                                   spiking=True, spike_input=False, lengths=None):
        """`neurokern.reference.spikgru2plus_bidirectional` on the fused kernels. The Triton
        and CUDA backends run both directions in one launch (per step on Triton, for the whole
        loop on CUDA; the parameters stacked to [2, ...], rows of the loop direction-major); the
        C++ CPU one direction after the other."""
        if backend == "cpu":
            return reference.spikgru2plus_bidirectional(
                x, params, reverse_params, v_th=v_th, gamma=gamma, signed=signed,
                reset_gate=reset_gate, batch_first=batch_first, state=state, spiking=spiking,
                spike_input=spike_input, lengths=lengths, layer=one_direction)
        stacked = [None if p is None else torch.stack([p, q])
                   for p, q in zip(params, reverse_params)]
        v0, i0, s0 = state if state is not None else (None, None, None)
        s, v_last, i_last, s_last = _apply(
            x, *stacked, v0, i0, s0, lengths, v_th, gamma, signed, reset_gate, batch_first,
            spiking, spike_input, backend)
        return s, (v_last, i_last, s_last)

    spikgru2plus_bidirectional.__qualname__ = spikgru2plus_bidirectional.__name__ = (
        f"spikgru2plus_bidirectional_{backend}")
    return spikgru2plus_bidirectional


# Registered when the extension did not load (the dispatcher then reports why the backend is
# unavailable) or when it has the kernels; a stale build without them leaves "cpu" unregistered.
if _extension.error is not None or _cpu_kernels_present():
    spikgru2plus_cpu = register("spikgru2plus", "cpu")(_impl("cpu"))
    register("spikgru2plus_bidirectional", "cpu")(_bidirectional_impl("cpu"))
spikgru2plus_triton = register("spikgru2plus", "triton")(_impl("triton"))
register("spikgru2plus_bidirectional", "triton")(_bidirectional_impl("triton"))
# The persistent CUDA loops (csrc/cuda/); the dispatcher reports when the extension lacks them.
register("spikgru2plus", "cuda")(_impl("cuda"))
register("spikgru2plus_bidirectional", "cuda")(_bidirectional_impl("cuda"))
