"""SpikGRU2+ gate and state arithmetic of one time step (SPEC.md 3), forward and backward, as
Triton kernels over the `[B, H]` hidden units (`spikgru2plus_step_{fwd,bwd}_kernel`):
elementwise, one program per row and block of hidden units; the recurrent products stay
outside (one cuBLAS product per step), so a step is one product plus one kernel. (Kernels that
computed each step's product inside with `tl.dot` tiles measured slower on an H100, for the
headline layer and the stack in fp32 and bf16, and were removed; docs/kernels.md.)

Directions: the rows are D * B (direction-major): a bidirectional layer runs both directions in
one launch per step, each in its own processing order, with row b of direction d = b // B
reading that direction's leak alpha[d] and b_hh[d] (`[D, H]` and `[D, 3H]`).

Dtypes: the state and all arithmetic are in the compute dtype (that of `params`); gh, dgh and the
spike copy for the next product (`s_mm`) may be in a lower one, the dtype the products run in
(bf16/fp16 under autocast): loads convert, stores round to each pointer's dtype.

Forward, with gi = W x_t + b_ih and gh = U s_{t-1} + b_hh, rows (r, z, i):
    r = sigmoid(gi_r + gh_r) (1 without reset gate),  z = sigmoid(gi_z + gh_z)
    i_t = alpha i_{t-1} + gi_i + gh_i r,   v_t = z v_{t-1} + (1 - z) i_t - v_th s_{t-1}
    s_t = act(v_t)

Backward of a step, given dL/ds_t (everything but the reset and recurrent paths, which the
caller adds) and the carries dv_next = z_{t+1} dL/dv_{t+1}, di_next = alpha dL/di_{t+1}:
    dv = ds f'(v_t) + dv_next,   di = (1 - z) dv + di_next
    d(gi_i) = di,  d(gh_i) = di r,  d(a_r) = di gh_i r (1 - r),  d(a_z) = dv (v_{t-1} - i_t) z (1 - z)
    carries for step t-1: z dv and alpha di; reset path: -v_th dv onto ds_{t-1}.

Variable lengths (HAS_LENGTHS): `active_ptr` holds one int8 per row, whether the row still runs
at this step. A row that ended is frozen: the forward writes its state of step t-1 again, the
backward writes zeros to dgi and dgh and passes the carries and dL/ds_t on to step t-1
unchanged (dalpha gets nothing).
"""

import triton
import triton.language as tl

from .activations import spike_act, spike_surrogate


@triton.jit
def _gates(gi_row, gh_row, bias_row, h, mask, H, RESET_GATE: tl.constexpr,
           HAS_BIAS: tl.constexpr, dtype: tl.constexpr):
    """r, z, the input-current term gi_i and gh_i of the hidden units h of one row, from its
    rows of gi and gh (U s_{t-1}, any dtype); with HAS_BIAS, b_hh (bias_row) is added to gh
    here (one rounding, as `gh + b_hh` would). The forward step computes them, the backward step
    recomputes them the same way."""
    gi_z = tl.load(gi_row + H + h, mask=mask, other=0).to(dtype)
    gi_i = tl.load(gi_row + 2 * H + h, mask=mask, other=0).to(dtype)
    gh_z = tl.load(gh_row + H + h, mask=mask, other=0).to(dtype)
    gh_i = tl.load(gh_row + 2 * H + h, mask=mask, other=0).to(dtype)
    if HAS_BIAS:
        gh_z += tl.load(bias_row + H + h, mask=mask, other=0).to(dtype)
        gh_i += tl.load(bias_row + 2 * H + h, mask=mask, other=0).to(dtype)
    z = tl.sigmoid(gi_z + gh_z)
    if RESET_GATE:
        gi_r = tl.load(gi_row + h, mask=mask, other=0).to(dtype)
        gh_r = tl.load(gh_row + h, mask=mask, other=0).to(dtype)
        if HAS_BIAS:
            gh_r += tl.load(bias_row + h, mask=mask, other=0).to(dtype)
        r = tl.sigmoid(gi_r + gh_r)
    else:
        r = tl.full(z.shape, 1, dtype)
    return r, z, gi_i, gh_i


@triton.jit
def spikgru2plus_step_fwd_kernel(
    gi_ptr,  # [D * B, 3H] this step's input projection (row stride gi_stride)
    gh_ptr,  # [D * B, 3H] U s_{t-1}, contiguous
    bias_ptr,  # [D, 3H] b_hh, read if HAS_BIAS
    alpha_ptr,  # [D, H]
    v_prev_ptr, i_prev_ptr, s_prev_ptr,  # [D * B, H] state after step t-1, contiguous
    params_ptr,  # [2]: v_th, gamma in the compute dtype
    s_ptr, v_ptr, i_ptr,  # [D * B, H] out: state after step t
    s_mm_ptr,  # [D * B, H] out if STORE_S_MM: s_t again, in the dtype of the next product
    active_ptr,  # [D * B] int8, read if HAS_LENGTHS: whether the row runs at this step
    H, B, gi_stride,
    RESET_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SIGNED: tl.constexpr,
    SPIKING: tl.constexpr,
    STORE_S_MM: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)  # row of [D * B]
    d = b // B  # direction: its leak alpha[d] and b_hh[d]
    h = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = h < H
    v_th = tl.load(params_ptr)
    gamma = tl.load(params_ptr + 1)
    dtype = v_th.dtype
    row = b * H + h
    r, z, gi_i, gh_i = _gates(gi_ptr + b * gi_stride, gh_ptr + b * 3 * H, bias_ptr + d * 3 * H,
                              h, mask, H, RESET_GATE, HAS_BIAS, dtype)
    alpha = tl.load(alpha_ptr + d * H + h, mask=mask, other=0).to(dtype)
    v_prev = tl.load(v_prev_ptr + row, mask=mask, other=0).to(dtype)
    i_prev = tl.load(i_prev_ptr + row, mask=mask, other=0).to(dtype)
    s_prev = tl.load(s_prev_ptr + row, mask=mask, other=0).to(dtype)
    i = alpha * i_prev + gi_i + gh_i * r
    v = z * v_prev + (1 - z) * i - v_th * s_prev
    s = spike_act(v, v_th, gamma, SIGNED, SPIKING)
    if HAS_LENGTHS:  # a row that ended keeps its state
        active = tl.load(active_ptr + b) != 0
        i = tl.where(active, i, i_prev)
        v = tl.where(active, v, v_prev)
        s = tl.where(active, s, s_prev)
    tl.store(s_ptr + row, s.to(s_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + row, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(i_ptr + row, i.to(i_ptr.dtype.element_ty), mask=mask)
    if STORE_S_MM:
        tl.store(s_mm_ptr + row, s.to(s_mm_ptr.dtype.element_ty), mask=mask)


@triton.jit
def spikgru2plus_step_bwd_kernel(
    gi_ptr,  # [D * B, 3H] this step's input projection (row stride gi_stride)
    gh_ptr,  # [D * B, 3H] U s_{t-1} as the forward computed it (products' dtype), contiguous
    bias_ptr,  # [D, 3H] b_hh, read if HAS_BIAS
    alpha_ptr,  # [D, H]
    v_prev_ptr, i_prev_ptr,  # [D * B, H] state after step t-1
    v_ptr, i_ptr,  # [D * B, H] state after step t
    ds_ptr,  # [D * B, H] dL/ds_t but for the product path through step t+1 (ds_rec)
    ds_rec_ptr,  # [D * B, H] the product path dL/d(gh_{t+1}) U, read if HAS_DS_REC
    dv_next_ptr, di_next_ptr,  # [D * B, H] carries in; overwritten with the carries for t-1
    params_ptr,  # [2]: v_th, gamma
    dgi_ptr,  # [D * B, 3H] out: dL/d(gi_t) (row stride dgi_stride)
    dgh_ptr,  # [D * B, 3H] out: dL/d(gh_t), contiguous
    ds_prev_ptr,  # [D * B, H] out (may be ds_ptr): the reset path -v_th dv_t plus grad_prev (the
    grad_prev_ptr,  # output gradient of s_{t-1}, row stride grad_prev_stride, if HAS_GRAD_PREV)
    dalpha_ptr,  # [D * B, H] in/out: running sum of dL/di_t * i_{t-1}
    active_ptr,  # [D * B] int8, read if HAS_LENGTHS: whether the row ran at this step
    H, B, gi_stride, dgi_stride, grad_prev_stride,
    RESET_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_DS_REC: tl.constexpr,
    HAS_GRAD_PREV: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)  # row of [D * B]
    d = b // B  # direction: its leak alpha[d] and b_hh[d]
    h = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = h < H
    v_th = tl.load(params_ptr)
    gamma = tl.load(params_ptr + 1)
    dtype = v_th.dtype
    row = b * H + h
    ds = tl.load(ds_ptr + row, mask=mask, other=0).to(dtype)
    if HAS_DS_REC:
        ds += tl.load(ds_rec_ptr + row, mask=mask, other=0).to(dtype)
    r, z, gi_i, gh_i = _gates(gi_ptr + b * gi_stride, gh_ptr + b * 3 * H, bias_ptr + d * 3 * H,
                              h, mask, H, RESET_GATE, HAS_BIAS, dtype)
    alpha = tl.load(alpha_ptr + d * H + h, mask=mask, other=0).to(dtype)
    v_prev = tl.load(v_prev_ptr + row, mask=mask, other=0).to(dtype)
    i_prev = tl.load(i_prev_ptr + row, mask=mask, other=0).to(dtype)
    v = tl.load(v_ptr + row, mask=mask, other=0).to(dtype)
    i = tl.load(i_ptr + row, mask=mask, other=0).to(dtype)
    dv_next = tl.load(dv_next_ptr + row, mask=mask, other=0).to(dtype)
    di_next = tl.load(di_next_ptr + row, mask=mask, other=0).to(dtype)
    dv = ds * spike_surrogate(v, v_th, gamma, SIGNED) + dv_next
    di = (1 - z) * dv + di_next
    da_z = dv * (v_prev - i) * z * (1 - z)
    if RESET_GATE:
        da_r = di * gh_i * r * (1 - r)
    else:
        da_r = tl.zeros_like(di)
    dv_carry, di_carry, ds_prev = z * dv, alpha * di, -v_th * dv
    dalpha_t = di * i_prev
    if HAS_LENGTHS:  # a row that had ended: nothing computed, every gradient passed on
        active = tl.load(active_ptr + b) != 0
        da_r = tl.where(active, da_r, 0)
        da_z = tl.where(active, da_z, 0)
        di = tl.where(active, di, 0)
        dv_carry = tl.where(active, dv_carry, dv_next)
        di_carry = tl.where(active, di_carry, di_next)
        ds_prev = tl.where(active, ds_prev, ds)
        dalpha_t = tl.where(active, dalpha_t, 0)
    dgi_row, dgh_row = dgi_ptr + b * dgi_stride, dgh_ptr + b * 3 * H
    tl.store(dgi_row + h, da_r.to(dgi_ptr.dtype.element_ty), mask=mask)
    tl.store(dgh_row + h, da_r.to(dgh_ptr.dtype.element_ty), mask=mask)
    tl.store(dgi_row + H + h, da_z.to(dgi_ptr.dtype.element_ty), mask=mask)
    tl.store(dgh_row + H + h, da_z.to(dgh_ptr.dtype.element_ty), mask=mask)
    tl.store(dgi_row + 2 * H + h, di.to(dgi_ptr.dtype.element_ty), mask=mask)
    tl.store(dgh_row + 2 * H + h, (di * r).to(dgh_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_next_ptr + row, dv_carry.to(dv_next_ptr.dtype.element_ty), mask=mask)
    tl.store(di_next_ptr + row, di_carry.to(di_next_ptr.dtype.element_ty), mask=mask)
    if HAS_GRAD_PREV:
        ds_prev += tl.load(grad_prev_ptr + b * grad_prev_stride + h, mask=mask,
                           other=0).to(dtype)
    tl.store(ds_prev_ptr + row, ds_prev.to(ds_prev_ptr.dtype.element_ty), mask=mask)
    dalpha = tl.load(dalpha_ptr + row, mask=mask, other=0) + dalpha_t
    tl.store(dalpha_ptr + row, dalpha, mask=mask)
