"""Multi-step PLIF neuron forward and backward (SPEC.md 2): one program per BLOCK neurons, each
looping over all T steps with its state in registers.

Neurons are numbered n = ((b * C + c) * S1 + i) * S2 + j over the `[B, C, S1, S2]` view of one
step (the launcher collapses the spatial dims into at most two), and every tensor indexed by
(t, b, c, i, j) is read or written through its own strides, so time-major, batch-major and
transposed views need no copy. T is a run-time value (no recompilation per T); offsets are int64.
"""

import triton
import triton.language as tl

from .activations import spike_act, spike_surrogate


@triton.jit
def _neuron_offsets(n, C, S1, S2, stride_b, stride_c, stride_1, stride_2):
    """Offset of neuron n of a [B, C, S1, S2] step in a tensor with the given strides."""
    j = n % S2
    i = (n // S2) % S1
    c = (n // (S2 * S1)) % C
    b = n // (S2 * S1 * C)
    return b * stride_b + c * stride_c + i * stride_1 + j * stride_2


# T and the strides that change with T (the batch stride of batch-major tensors) are not
# specialised, so a new sequence length reuses the compiled kernel.
@triton.jit(do_not_specialize=["T", "N", "sx_t", "sx_b", "ss_t", "ss_b"])
def plif_fwd_kernel(
    x_ptr,  # [T, B, C, S1, S2] through strides sx_*
    alpha_ptr,  # [C] (stride alpha_stride) or one value (alpha_stride = 0)
    v0_ptr, s0_ptr,  # [N] initial state (contiguous), read if HAS_STATE
    params_ptr,  # [2]: v_th, gamma in the compute dtype
    s_ptr,  # [T, B, C, S1, S2] out, through strides ss_*
    v_seq_ptr,  # [T, N] out (compute dtype), written if SAVE_V
    v_last_ptr, s_last_ptr,  # [N] out
    T, N, C, S1, S2,
    sx_t, sx_b, sx_c, sx_1, sx_2,
    ss_t, ss_b, ss_c, ss_1, ss_2,
    alpha_stride,
    HAS_STATE: tl.constexpr,
    SAVE_V: tl.constexpr,
    SIGNED: tl.constexpr,
    SPIKING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = n < N
    v_th = tl.load(params_ptr)
    gamma = tl.load(params_ptr + 1)
    c = (n // (S2 * S1)) % C
    alpha = tl.load(alpha_ptr + c * alpha_stride, mask=mask, other=0).to(v_th.dtype)
    x_ptrs = x_ptr + _neuron_offsets(n, C, S1, S2, sx_b, sx_c, sx_1, sx_2)
    s_ptrs = s_ptr + _neuron_offsets(n, C, S1, S2, ss_b, ss_c, ss_1, ss_2)
    if HAS_STATE:
        v = tl.load(v0_ptr + n, mask=mask, other=0).to(v_th.dtype)
        s = tl.load(s0_ptr + n, mask=mask, other=0).to(v_th.dtype)
    else:
        v = tl.zeros([BLOCK], dtype=v_th.dtype)
        s = tl.zeros([BLOCK], dtype=v_th.dtype)
    v_ptrs = v_seq_ptr + n
    for _ in range(T):  # pointers advance one step at a time, in 64-bit arithmetic
        x = tl.load(x_ptrs, mask=mask, other=0).to(v_th.dtype)
        v = alpha * v + x - v_th * s
        s = spike_act(v, v_th, gamma, SIGNED, SPIKING)
        tl.store(s_ptrs, s.to(s_ptr.dtype.element_ty), mask=mask)
        if SAVE_V:
            tl.store(v_ptrs, v, mask=mask)
        x_ptrs += sx_t
        s_ptrs += ss_t
        v_ptrs += N
    tl.store(v_last_ptr + n, v.to(v_last_ptr.dtype.element_ty), mask=mask)
    tl.store(s_last_ptr + n, s.to(s_last_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "N", "sg_t", "sg_b", "sd_t", "sd_b"])
def plif_bwd_kernel(
    grad_ptr,  # [T, B, C, S1, S2] dL/ds through strides sg_*
    grad_v_last_ptr, grad_s_last_ptr,  # [N] dL/dv_T, dL/ds_T, read if HAS_GRAD_*
    v_seq_ptr,  # [T, N] membranes saved by the forward
    alpha_ptr,  # [C] or one value
    v0_ptr,  # [N] initial membrane, read if HAS_V0
    params_ptr,  # [2]: v_th, gamma
    dx_ptr,  # [T, B, C, S1, S2] out through strides sd_*
    dalpha_ptr,  # [N] out: sum_t dL/dv_t * v_{t-1}, per neuron (reduced per channel outside)
    dv0_ptr, ds0_ptr,  # [N] out
    T, N, C, S1, S2,
    sg_t, sg_b, sg_c, sg_1, sg_2,
    sd_t, sd_b, sd_c, sd_1, sd_2,
    alpha_stride,
    HAS_GRAD_V_LAST: tl.constexpr,
    HAS_GRAD_S_LAST: tl.constexpr,
    HAS_V0: tl.constexpr,
    SIGNED: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Reverse recursion: with ds_carry = dL/ds_t from step t+1 and dv_carry = dL/dv_t from step
    # t+1 (through the reset and the leak),
    #   dv_t = (dL/ds_t|out + ds_carry) * f'(v_t) + dv_carry
    #   ds_carry <- -v_th * dv_t (0 with detach_reset),  dv_carry <- alpha * dv_t.
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = n < N
    v_th = tl.load(params_ptr)
    gamma = tl.load(params_ptr + 1)
    c = (n // (S2 * S1)) % C
    alpha = tl.load(alpha_ptr + c * alpha_stride, mask=mask, other=0).to(v_th.dtype)
    g_ptrs = grad_ptr + _neuron_offsets(n, C, S1, S2, sg_b, sg_c, sg_1, sg_2)
    d_ptrs = dx_ptr + _neuron_offsets(n, C, S1, S2, sd_b, sd_c, sd_1, sd_2)
    if HAS_GRAD_S_LAST:
        ds_carry = tl.load(grad_s_last_ptr + n, mask=mask, other=0).to(v_th.dtype)
    else:
        ds_carry = tl.zeros([BLOCK], dtype=v_th.dtype)
    if HAS_GRAD_V_LAST:
        dv_carry = tl.load(grad_v_last_ptr + n, mask=mask, other=0).to(v_th.dtype)
    else:
        dv_carry = tl.zeros([BLOCK], dtype=v_th.dtype)
    if HAS_V0:
        v_init = tl.load(v0_ptr + n, mask=mask, other=0).to(v_th.dtype)
    else:
        v_init = tl.zeros([BLOCK], dtype=v_th.dtype)
    dalpha = tl.zeros([BLOCK], dtype=v_th.dtype)
    last = (T - 1).to(tl.int64)
    g_ptrs += last * sg_t
    d_ptrs += last * sd_t
    v_ptrs = v_seq_ptr + last * N + n
    v = tl.load(v_ptrs, mask=mask, other=0)
    for k in range(T):  # t = T - 1 - k
        # v_{t-1}: the saved membrane, or the initial one at t = 0
        v_ptrs -= N
        has_prev = (n * 0 + k) < T - 1  # [BLOCK] t > 0, as a vector so it can mask a load
        v_prev = tl.load(v_ptrs, mask=mask & has_prev, other=0)
        v_prev = tl.where(has_prev, v_prev, v_init)
        g = tl.load(g_ptrs, mask=mask, other=0).to(v_th.dtype)
        dv = (g + ds_carry) * spike_surrogate(v, v_th, gamma, SIGNED) + dv_carry
        tl.store(d_ptrs, dv.to(dx_ptr.dtype.element_ty), mask=mask)
        dalpha += dv * v_prev
        if DETACH_RESET:
            ds_carry = tl.zeros([BLOCK], dtype=v_th.dtype)
        else:
            ds_carry = -v_th * dv
        dv_carry = alpha * dv
        v = v_prev
        g_ptrs -= sg_t
        d_ptrs -= sd_t
    tl.store(dalpha_ptr + n, dalpha, mask=mask)
    tl.store(dv0_ptr + n, dv_carry.to(dv0_ptr.dtype.element_ty), mask=mask)
    tl.store(ds0_ptr + n, ds_carry.to(ds0_ptr.dtype.element_ty), mask=mask)
