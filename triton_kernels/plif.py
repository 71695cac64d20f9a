"""Multi-step PLIF neuron forward and backward (SPEC.md 2): one program per BLOCK neurons, each
looping over all T steps with its state in registers.

What the backward reads: the forward saves the membrane only at the end of every chunk of
CHUNK steps (1/CHUNK of a tensor); the backward recomputes each chunk's membranes from x, in
registers, with the forward's own code. Traffic per neuron and step: forward x + s, backward
x + dL/ds + dx, plus 2/CHUNK for the checkpoints, against 3 + 3 when every v is saved.

Neurons are numbered n = ((b * C + c) * S1 + i) * S2 + j over the `[B, C, S1, S2]` view of one
step (the launcher collapses the spatial dims of all the tensors together into at most two),
and every tensor indexed by (t, b, c, i, j) is read or written through its own strides, so
time-major, batch-major and transposed views, crops and channels-last tensors need no copy.
T is a run-time value (no recompilation per T); offsets are int64.
On the PACKED path (chosen by the launcher, `plif_ops.packed_align`) a program's neurons are
BLOCK consecutive elements of one batch row of every tensor, addressed from one aligned base
offset per step, so loads and stores are vectors.
"""

import triton
import triton.language as tl

from .activations import fire_act, fire_surrogate, spike_act, spike_surrogate


@triton.jit
def _neurons(N, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's neuron numbers n ([BLOCK], int64) and which of them exist."""
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if PACKED:  # N is a multiple of BLOCK; an all-true constant mask lets loads vectorise
        mask = tl.full([BLOCK], 1, tl.int1)
    else:
        mask = n < N
    return n, mask


@triton.jit
def _neuron_offsets(n, C, S1, S2, stride_b, stride_c, stride_1, stride_2,
                    PACKED: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets of neurons n of a [B, C, S1, S2] step in a tensor with the given strides.
    PACKED (checked by the launcher): (C, S1, S2) is one contiguous run of M = C * S1 * S2
    elements, M is a multiple of BLOCK and the batch stride of ALIGN, so a program's neurons
    are BLOCK consecutive elements of one batch row: the compiler sees contiguous, aligned
    offsets and issues vector loads instead of one scalar load per neuron."""
    if PACKED:
        M = C * S1 * S2
        first = tl.program_id(0).to(tl.int64) * BLOCK
        b = first // M
        return tl.multiple_of(b * stride_b + (first - b * M), ALIGN) + tl.arange(0, BLOCK)
    else:
        j = n % S2
        i = (n // S2) % S1
        c = (n // (S2 * S1)) % C
        b = n // (S2 * S1 * C)
        return b * stride_b + c * stride_c + i * stride_1 + j * stride_2


@triton.jit
def _before(t, T, n):
    """`t < T` as a mask shaped like n: a splat, constant across the block, so loads and stores
    under it still vectorise (and the interpreter keeps it boolean)."""
    return tl.full(n.shape, t, tl.int64) < T


@triton.jit
def _step_offset(t, stride_t, PACKED: tl.constexpr, ALIGN: tl.constexpr):
    """t * stride_t; PACKED: declared a multiple of ALIGN, which the launcher checked (for the
    time strides; the checkpoint rows' stride N is a multiple of BLOCK)."""
    if PACKED:
        return tl.multiple_of(t * stride_t, ALIGN)
    else:
        return t * stride_t


@triton.jit
def _plif_step(v, s, x, alpha, v_th, gamma, SIGNED: tl.constexpr, SPIKING: tl.constexpr):
    """One step of SPEC.md 2: the forward and the backward's recomputation share this code, so
    both round identically."""
    v = alpha * v + x - v_th * s
    return v, spike_act(v, v_th, gamma, SIGNED, SPIKING)


# The generalised neuron (GENERAL, docs/neurons.md). Its scalars follow v_th and gamma in the
# params tensor (plif_ops.neuron_params), in the compute dtype: fire_th (v_th, or the next float
# above it for a strict threshold), the surrogate's scale, the reset map
# R(h, s) = h (1 - reset_k s) + reset_r s ((0, -v_th) soft, (1, v_reset) hard, (0, 0) none), its
# dR/ds = grad_r - grad_k h (zero with detach_reset), v_rest (v_reset for a hard reset, else 0)
# and decay (1 with decay_input, else 0). Per neuron, b = (1 - alpha) v_rest and
# c = 1 - decay alpha (exactly 1 - alpha or 1). The paper's PLIF (GENERAL false) compiles to the
# same code as before these options existed.
@triton.jit
def _neuron_params(params_ptr):
    return (tl.load(params_ptr + 2), tl.load(params_ptr + 3), tl.load(params_ptr + 4),
            tl.load(params_ptr + 5), tl.load(params_ptr + 6), tl.load(params_ptr + 7),
            tl.load(params_ptr + 8), tl.load(params_ptr + 9))


@triton.jit
def _neuron_step(v, s, x, alpha, b, c, v_th, gamma, fire_th, scale, reset_k, reset_r,
                 SIGNED: tl.constexpr, SPIKING: tl.constexpr, BEFORE: tl.constexpr,
                 SIGMOID: tl.constexpr):
    """One step of the generalised neuron, in the reference's operation order: returns the
    carried state (h, or u when BEFORE), the spikes and h (before the reset when BEFORE)."""
    h = alpha * v + b + c * x
    if BEFORE:
        s = fire_act(h, v_th, gamma, fire_th, scale, SIGNED, SPIKING, SIGMOID)
        v = h * (1 - reset_k * s) + reset_r * s
    else:
        h = h * (1 - reset_k * s) + reset_r * s
        v = h
        s = fire_act(h, v_th, gamma, fire_th, scale, SIGNED, SPIKING, SIGMOID)
    return v, s, h


@triton.jit
def _prologue(alpha_ptr, params_ptr, n, C, S1, S2, alpha_stride, mask):
    """v_th, gamma (compute dtype) and each neuron's leak."""
    v_th = tl.load(params_ptr)
    gamma = tl.load(params_ptr + 1)
    c = (n // (S2 * S1)) % C
    alpha = tl.load(alpha_ptr + c * alpha_stride, mask=mask, other=0).to(v_th.dtype)
    return v_th, gamma, alpha


@triton.jit
def _load_or_zeros(ptr, n, mask, PRESENT: tl.constexpr, dtype: tl.constexpr):
    """`ptr[n]` in `dtype` if the optional tensor is PRESENT, else zeros."""
    if PRESENT:
        out = tl.load(ptr + n, mask=mask, other=0).to(dtype)
    else:
        out = tl.zeros(n.shape, dtype=dtype)
    return out


@triton.jit
def _chunk_start(v_saved_ptr, v_init, k, N, n, mask, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    """The backward's state entering chunk k: the forward's checkpoint at the end of chunk
    k - 1, or v_init for the first chunk; and whether there is a checkpoint (k > 0), for the
    caller's spikes of that state."""
    has_prev = _before(0, k, n)  # k > 0
    v_start = tl.load(v_saved_ptr + _step_offset(k - 1, N, PACKED, BLOCK) + n,
                      mask=mask & has_prev, other=0)
    return tl.where(has_prev, v_start, v_init), has_prev


@triton.jit
def _chunk_loads(x_ptrs, g_ptrs, t0, T, n, mask, sx_t, sg_t, x_dtype: tl.constexpr,
                 PACKED: tl.constexpr, ALIGN: tl.constexpr, CHUNK: tl.constexpr):
    """The backward's loads of chunk t0..t0 + CHUNK - 1 (0 past T), all issued before the
    chunk's serial arithmetic: x converted to x_dtype (its own dtype: no conversion) and dL/ds
    in its own dtype."""
    xs = ()
    gs = ()
    for j in tl.static_range(CHUNK):
        valid = mask & _before(t0 + j, T, n)
        xs = xs + (tl.load(x_ptrs + _step_offset(t0 + j, sx_t, PACKED, ALIGN), mask=valid,
                           other=0).to(x_dtype),)
        gs = gs + (tl.load(g_ptrs + _step_offset(t0 + j, sg_t, PACKED, ALIGN), mask=valid,
                           other=0),)
    return xs, gs


# Time runs in chunks of CHUNK steps unrolled at compile time, so the loads of a chunk's inputs
# are all issued before its serial arithmetic. T and the strides that change with T (the batch
# stride of batch-major tensors) are not specialised: a new sequence length reuses the kernel.
@triton.jit(do_not_specialize=["T", "N", "sx_t", "sx_b", "ss_t", "ss_b"])
def plif_fwd_kernel(
    x_ptr,  # [T, B, C, S1, S2] through strides sx_*
    alpha_ptr,  # [C] (stride alpha_stride) or one value (alpha_stride = 0)
    v0_ptr, s0_ptr,  # [N] initial state (contiguous), read if HAS_STATE
    params_ptr,  # [2]: v_th, gamma in the compute dtype
    s_ptr,  # [T, B, C, S1, S2] out, through strides ss_*
    v_saved_ptr,  # [cdiv(T, CHUNK), N] out (compute dtype): v at the end of each chunk, if SAVE
    v_last_ptr, s_last_ptr,  # [N] out
    T, N, C, S1, S2,
    sx_t, sx_b, sx_c, sx_1, sx_2,
    ss_t, ss_b, ss_c, ss_1, ss_2,
    alpha_stride,
    HAS_STATE: tl.constexpr,
    SAVE: tl.constexpr,
    SIGNED: tl.constexpr,
    SPIKING: tl.constexpr,
    PACKED: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    GENERAL: tl.constexpr = False,  # the generalised neuron (params [10], see _neuron_params)
    BEFORE: tl.constexpr = False,  # its reset_before_leak
    SIGMOID: tl.constexpr = False,  # its sigmoid surrogate
):
    n, mask = _neurons(N, PACKED, BLOCK)
    v_th, gamma, alpha = _prologue(alpha_ptr, params_ptr, n, C, S1, S2, alpha_stride, mask)
    if GENERAL:
        fire_th, scale, reset_k, reset_r, grad_k, grad_r, v_rest, decay = _neuron_params(
            params_ptr)
        b = (1 - alpha) * v_rest
        c = 1 - decay * alpha
    x_ptrs = x_ptr + _neuron_offsets(n, C, S1, S2, sx_b, sx_c, sx_1, sx_2,
                                     PACKED, ALIGN, BLOCK)
    s_ptrs = s_ptr + _neuron_offsets(n, C, S1, S2, ss_b, ss_c, ss_1, ss_2,
                                     PACKED, ALIGN, BLOCK)
    v = _load_or_zeros(v0_ptr, n, mask, HAS_STATE, v_th.dtype)
    s = _load_or_zeros(s0_ptr, n, mask, HAS_STATE, v_th.dtype)
    for k in range(tl.cdiv(T, CHUNK)):
        k = tl.cast(k, tl.int64)
        t0 = k * CHUNK
        # the chunk's loads first: interleaved with the stores of s, which may alias x for all
        # the compiler knows, each would wait for the step before it (one load in flight)
        xs = ()
        for j in tl.static_range(CHUNK):
            valid = mask & _before(t0 + j, T, n)  # only the last chunk can be partial
            xs = xs + (tl.load(x_ptrs + _step_offset(t0 + j, sx_t, PACKED, ALIGN), mask=valid,
                               other=0),)
        for j in tl.static_range(CHUNK):
            valid = _before(t0 + j, T, n)
            if GENERAL:
                v_new, s_new, _ = _neuron_step(v, s, xs[j].to(v_th.dtype), alpha, b, c, v_th,
                                               gamma, fire_th, scale, reset_k, reset_r, SIGNED,
                                               SPIKING, BEFORE, SIGMOID)
            else:
                v_new, s_new = _plif_step(v, s, xs[j].to(v_th.dtype), alpha, v_th, gamma,
                                          SIGNED, SPIKING)
            v = tl.where(valid, v_new, v)
            s = tl.where(valid, s_new, s)
            tl.store(s_ptrs + _step_offset(t0 + j, ss_t, PACKED, ALIGN),
                     s.to(s_ptr.dtype.element_ty), mask=mask & valid)
        if SAVE:
            tl.store(v_saved_ptr + _step_offset(k, N, PACKED, BLOCK) + n, v, mask=mask)
    tl.store(v_last_ptr + n, v.to(v_last_ptr.dtype.element_ty), mask=mask)
    tl.store(s_last_ptr + n, s.to(s_last_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "N", "sg_t", "sg_b", "sx_t", "sx_b", "sd_t", "sd_b"])
def plif_bwd_kernel(
    grad_ptr,  # [T, B, C, S1, S2] dL/ds through strides sg_*
    grad_v_last_ptr, grad_s_last_ptr,  # [N] dL/dv_T, dL/ds_T, read if HAS_GRAD_*
    x_ptr,  # [T, B, C, S1, S2] the forward's input through strides sx_*
    v_saved_ptr,  # [cdiv(T, CHUNK), N] the forward's checkpoints (compute dtype)
    alpha_ptr,  # [C] or one value
    v0_ptr, s0_ptr,  # [N] initial state, read if HAS_STATE
    params_ptr,  # [2]: v_th, gamma
    dx_ptr,  # [T, B, C, S1, S2] out through strides sd_*
    dalpha_ptr,  # [N] out: sum_t dL/dv_t * v_{t-1}, per neuron (reduced per channel outside)
    dv0_ptr, ds0_ptr,  # [N] out
    T, N, C, S1, S2,
    sg_t, sg_b, sg_c, sg_1, sg_2,
    sx_t, sx_b, sx_c, sx_1, sx_2,
    sd_t, sd_b, sd_c, sd_1, sd_2,
    alpha_stride,
    HAS_GRAD_V_LAST: tl.constexpr,
    HAS_GRAD_S_LAST: tl.constexpr,
    HAS_STATE: tl.constexpr,
    SIGNED: tl.constexpr,
    SPIKING: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    PACKED: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    GENERAL: tl.constexpr = False,  # as plif_fwd_kernel's (DETACH_RESET: in grad_k, grad_r)
    BEFORE: tl.constexpr = False,
    SIGMOID: tl.constexpr = False,
):
    # Chunks of CHUNK steps from the last to the first. Each chunk first recomputes its
    # membranes from the checkpoint before it (the forward's code: identical rounding), held
    # in registers, then runs the reverse recursion over them: with ds_carry = dL/ds_t and
    # dv_carry = dL/dv_t from step t+1 (through the reset and the leak),
    #   dv_t = (dL/ds_t|out + ds_carry) * f'(v_t) + dv_carry
    #   ds_carry <- -v_th * dv_t (0 with detach_reset),  dv_carry <- alpha * dv_t.
    n, mask = _neurons(N, PACKED, BLOCK)
    v_th, gamma, alpha = _prologue(alpha_ptr, params_ptr, n, C, S1, S2, alpha_stride, mask)
    g_ptrs = grad_ptr + _neuron_offsets(n, C, S1, S2, sg_b, sg_c, sg_1, sg_2,
                                        PACKED, ALIGN, BLOCK)
    x_ptrs = x_ptr + _neuron_offsets(n, C, S1, S2, sx_b, sx_c, sx_1, sx_2,
                                     PACKED, ALIGN, BLOCK)
    d_ptrs = dx_ptr + _neuron_offsets(n, C, S1, S2, sd_b, sd_c, sd_1, sd_2,
                                      PACKED, ALIGN, BLOCK)
    ds_carry = _load_or_zeros(grad_s_last_ptr, n, mask, HAS_GRAD_S_LAST, v_th.dtype)
    dv_carry = _load_or_zeros(grad_v_last_ptr, n, mask, HAS_GRAD_V_LAST, v_th.dtype)
    v_init = _load_or_zeros(v0_ptr, n, mask, HAS_STATE, v_th.dtype)
    s_init = _load_or_zeros(s0_ptr, n, mask, HAS_STATE, v_th.dtype)
    dalpha = tl.zeros([BLOCK], dtype=v_th.dtype)
    chunks = tl.cdiv(T, CHUNK)
    if GENERAL:
        dalpha, dv_carry, ds_carry = _general_bwd_chunks(
            g_ptrs, x_ptrs, d_ptrs, dx_ptr, v_saved_ptr, params_ptr, alpha, v_th, gamma, v_init,
            s_init, ds_carry, dv_carry, dalpha, n, mask, T, N, sg_t, sx_t, sd_t,
            SIGNED, SPIKING, BEFORE, SIGMOID, PACKED, ALIGN, CHUNK, BLOCK)
    else:
        for kk in range(chunks):
            k = tl.cast(chunks - 1 - kk, tl.int64)
            t0 = k * CHUNK
            v_start, has_prev = _chunk_start(v_saved_ptr, v_init, k, N, n, mask, PACKED, BLOCK)
            s_start = tl.where(has_prev, spike_act(v_start, v_th, gamma, SIGNED, SPIKING), s_init)
            xs, gs = _chunk_loads(x_ptrs, g_ptrs, t0, T, n, mask, sx_t, sg_t,
                                  x_ptr.dtype.element_ty, PACKED, ALIGN, CHUNK)
            vs = (v_start,)  # vs[j + 1] = v after step t0 + j
            v, s = v_start, s_start
            for j in tl.static_range(CHUNK):
                v, s = _plif_step(v, s, xs[j].to(v_th.dtype), alpha, v_th, gamma, SIGNED, SPIKING)
                vs = vs + (v,)
            for j in tl.static_range(CHUNK - 1, -1, -1):
                valid = _before(t0 + j, T, n)
                g = gs[j].to(v_th.dtype)
                dv = (g + ds_carry) * spike_surrogate(vs[j + 1], v_th, gamma, SIGNED) + dv_carry
                tl.store(d_ptrs + _step_offset(t0 + j, sd_t, PACKED, ALIGN),
                         dv.to(dx_ptr.dtype.element_ty), mask=mask & valid)
                dalpha += tl.where(valid, dv * vs[j], 0)
                if DETACH_RESET:
                    ds_carry = tl.where(valid, 0, ds_carry)
                else:
                    ds_carry = tl.where(valid, -v_th * dv, ds_carry)
                dv_carry = tl.where(valid, alpha * dv, dv_carry)
    tl.store(dalpha_ptr + n, dalpha, mask=mask)
    tl.store(dv0_ptr + n, dv_carry.to(dv0_ptr.dtype.element_ty), mask=mask)
    tl.store(ds0_ptr + n, ds_carry.to(ds0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _general_bwd_chunks(g_ptrs, x_ptrs, d_ptrs, dx_ptr, v_saved_ptr, params_ptr, alpha, v_th, gamma,
                        v_init, s_init, ds_carry, dv_carry, dalpha, n, mask, T, N,
                        sg_t, sx_t, sd_t,
                        SIGNED: tl.constexpr, SPIKING: tl.constexpr, BEFORE: tl.constexpr,
                        SIGMOID: tl.constexpr, PACKED: tl.constexpr, ALIGN: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """plif_bwd_kernel's chunks for the generalised neuron: each chunk's states recomputed
    with _neuron_step, then the reverse recursion derived in docs/neurons.md (csrc/plif_cpu.cpp
    has the same, with the same names): with dR/dh = 1 - reset_k s and
    dR/ds = grad_r - grad_k h, paper order (carried h, pre_t = alpha h_{t-1} + b + c x_t):
        dh = (dL/ds_t + ds_carry) f'(h_t) + dv_carry;  dpre = dh (1 - reset_k s_{t-1})
        dx_t = c dpre;  dalpha += dpre (h_{t-1} - v_rest - decay x_t)
        ds_carry = dh (grad_r - grad_k pre_t);  dv_carry = alpha dpre
    BEFORE (carried u, h_t = alpha u_{t-1} + b + c x_t, u_t = R(h_t, s_t)):
        ds = dL/ds_t + dv_carry (grad_r - grad_k h_t) (+ dL/ds_T at t = T - 1)
        dh = dv_carry (1 - reset_k s_t) + ds f'(h_t);  dx_t = c dh
        dalpha += dh (u_{t-1} - v_rest - decay x_t);  dv_carry = alpha dh
    Returns (dalpha, dL/dv_0, dL/ds_0)."""
    fire_th, scale, reset_k, reset_r, grad_k, grad_r, v_rest, decay = _neuron_params(params_ptr)
    b = (1 - alpha) * v_rest
    c = 1 - decay * alpha
    ds_last = ds_carry  # dL/ds_T (BEFORE: added at t = T - 1 only)
    chunks = tl.cdiv(T, CHUNK)
    for kk in range(chunks):
        k = tl.cast(chunks - 1 - kk, tl.int64)
        t0 = k * CHUNK
        v_start, has_prev = _chunk_start(v_saved_ptr, v_init, k, N, n, mask, PACKED, BLOCK)
        s_start = tl.where(has_prev, fire_act(v_start, v_th, gamma, fire_th, scale, SIGNED,
                                              SPIKING, SIGMOID), s_init)
        xs, gs = _chunk_loads(x_ptrs, g_ptrs, t0, T, n, mask, sx_t, sg_t, v_th.dtype, PACKED,
                              ALIGN, CHUNK)
        vs = (v_start,)  # vs[j + 1]: the carried state after step t0 + j
        ss = (s_start,)  # ss[j + 1]: the spikes of step t0 + j
        hs = ()  # hs[j]: h of step t0 + j
        v, s = v_start, s_start
        for j in tl.static_range(CHUNK):
            v, s, h = _neuron_step(v, s, xs[j], alpha, b, c, v_th, gamma, fire_th, scale,
                                   reset_k, reset_r, SIGNED, SPIKING, BEFORE, SIGMOID)
            vs = vs + (v,)
            ss = ss + (s,)
            hs = hs + (h,)
        for j in tl.static_range(CHUNK - 1, -1, -1):
            valid = _before(t0 + j, T, n)
            g = gs[j].to(v_th.dtype)
            v_prev = vs[j]
            if BEFORE:
                h = hs[j]
                last = tl.full(n.shape, t0 + j, tl.int64) == T - 1
                ds = g + dv_carry * (grad_r - grad_k * h) + tl.where(last, ds_last, 0)
                dpre = dv_carry * (1 - reset_k * ss[j + 1]) + ds * fire_surrogate(
                    h, v_th, gamma, scale, SIGNED, SIGMOID)
            else:
                pre = alpha * v_prev + b + c * xs[j]
                dh = (g + ds_carry) * fire_surrogate(vs[j + 1], v_th, gamma, scale, SIGNED,
                                                     SIGMOID) + dv_carry
                dpre = dh * (1 - reset_k * ss[j])
                ds_carry = tl.where(valid, dh * (grad_r - grad_k * pre), ds_carry)
            tl.store(d_ptrs + _step_offset(t0 + j, sd_t, PACKED, ALIGN),
                     (c * dpre).to(dx_ptr.dtype.element_ty), mask=mask & valid)
            dalpha += tl.where(valid, dpre * ((v_prev - v_rest) - decay * xs[j]), 0)
            dv_carry = tl.where(valid, alpha * dpre, dv_carry)
    if BEFORE:
        ds_carry = tl.where(_before(0, T, n), 0, ds_carry)  # s_0 is not used (T > 0)
    return dalpha, dv_carry, ds_carry
