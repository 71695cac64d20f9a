"""Fused multi-step PLIF: the torch.library ops, the Triton launchers, the autograd Function,
and their registration with the dispatcher (backends "cpu" and "triton").

Ops (same schema on both backends; the C++ ones are declared in csrc/register.cpp):
    plif_fwd(x, alpha, v0?, s0?, v_th, gamma, signed, batch_first, spiking, checkpoint,
             *options, spike_dtype=None) -> (s, v_saved, v_last, s_last)
    plif_bwd(grad_s, grad_v_last?, grad_s_last?, x, v_saved, alpha, v0?, s0?, v_th, gamma,
             signed, batch_first, spiking, detach_reset, checkpoint, *options, leak_grad=True)
        -> (dx, dalpha_per_neuron, dv0, ds0)
with `options` the generalised neuron's (OPTION_NAMES). The spikes s have x's dtype, or with
`spike_dtype` x's compute dtype (float32 for half inputs: snnTorch's spikes); grad_s has s's.
`neurokern::*` run the C++ CPU kernels, `neurokern_triton::*` the Triton kernels.

What is saved for backward (nothing when no gradient is needed): x, which autograd holds
anyway, and the membranes at the end of every chunk of `checkpoint` steps ([cdiv(T, k), N] in
the compute dtype). With k > 1 the backward recomputes each chunk's membranes from x, in
registers, with the forward's own code (so bit-identically): traffic per neuron and step is
x + s forward and x + dL/ds + dx backward, plus 2/k for the checkpoints, i.e. the floor of 5
values within 2/k. Saving every v (k = 1) costs 6: v written forward and read backward. The
Triton backend uses k = 16 for float32 (5.125 values) and 8 for bf16/fp16, chosen by
measurement (`LAUNCH` below); the C++ backend one chunk per sequence (k = 1 << 30,
so v_saved is one row, [1, N]): its backward recomputes all T membranes of a block of neurons
into a per-thread buffer that stays in cache, and the forward no longer writes a fresh [T, N]
tensor (its page faults cost more than the recomputation). The leak gradient is reduced deterministically: the kernels write one partial
sum per neuron ([N], 1/T of the traffic) and a torch sum reduces it per channel; no atomics.
"""

import functools
import math
from typing import List, Optional, Tuple

import torch

from neurokern import verified
from neurokern._kernels import (
    eager_or_op, first_order_only, register_fakes, scalar_params, triton_available, triton_op,
)
from neurokern.dispatch import register
from neurokern.reference import NEURON_DEFAULTS, compute_dtype, spike_dtype_of

# Triton launch configuration per element size of x in bytes: neurons per program and warps
# (the forward's and the backward's; each program loops over all T steps), and the checkpoint
# interval k of the membranes saved for the backward, which recomputes the k steps in between
# from x (triton_kernels/plif.py; the forward also issues the loads of k steps at a time).
# Measured on an H100 (benchmarks/probe_plif_tune.py, [32, 90, 64, 22, 22], 2026-11-23, BLOCK
# 256/512/1024 x 2/4/8 warps x k 4/8/16; the timings are not kept in docs/results.md: rerun the
# probe on a GPU); float64 keeps k = 4: its backward with k = 16 took two minutes to compile.
LAUNCH = {
    8: dict(BLOCK=256, num_warps=4, checkpoint=4),  # float64
    4: dict(BLOCK=256, num_warps=4, checkpoint=16),  # float32
    2: dict(BLOCK=256, num_warps=4, checkpoint=8),  # bfloat16, float16
}

# The checkpoint interval per backend: the C++ backend saves one chunk per sequence (see
# above); None takes the Triton one from LAUNCH (tests set other values here).
CHECKPOINT = {"cpu": 1 << 30, "triton": None}


# The generalised neuron's options (reference.NEURON_DEFAULTS' order), as the ops take them
# after their other arguments; the paper's PLIF passes none (its own, unchanged kernels).
OPTION_NAMES = tuple(NEURON_DEFAULTS)
PAPER_OPTIONS = tuple(NEURON_DEFAULTS.values())


def checkpoint_interval(backend: str, dtype: torch.dtype) -> int:
    """k for the membranes saved by `backend`'s forward of an x of `dtype`."""
    return CHECKPOINT[backend] or LAUNCH[dtype.itemsize]["checkpoint"]


def collapse_spatial(sizes, *strides) -> Optional[List[Tuple[int, Tuple[int, ...]]]]:
    """The spatial dims `(size, (stride in each tensor))` of tensors of the same `sizes`, one
    stride tuple per tensor, merged where the memory of every tensor allows, as exactly two
    dims (padded with size-1 dims), or None if they do not fit in two. Merging per tensor would
    give each tensor its own sizes (a crop merges less than its contiguous output)."""
    dims = [(n, tuple(s[d] for s in strides)) for d, n in enumerate(sizes) if n != 1]
    merged = []
    for n, s in dims:
        if merged and all(outer == n * inner for outer, inner in zip(merged[-1][1], s)):
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    if len(merged) > 2:
        return None
    return [(1, (0,) * len(strides))] * (2 - len(merged)) + merged


def step_strides(t: torch.Tensor, batch_first: bool, *others: torch.Tensor):
    """`((T, B, C, S1, S2), (stride_t, stride_b, stride_c, stride_1, stride_2))` of a
    `[T, B, C, *S]` (or `[B, T, C, *S]`) tensor, or None if its spatial dims do not collapse
    into two strided dims. With `others` (tensors of t's shape), one strides tuple per tensor
    after the sizes, all on the same collapsed dims."""
    found = _step_strides(t.shape, tuple(u.stride() for u in (t, *others)), batch_first)
    if found is None or others:
        return found
    return found[0], found[1][0]


@functools.lru_cache(maxsize=256)  # a training run sees a few layouts, every step
def _step_strides(shape, strides, batch_first):
    spatial = collapse_spatial(shape[3:], *(stride[3:] for stride in strides))
    if spatial is None:
        return None
    time_dim, batch_dim = (1, 0) if batch_first else (0, 1)
    sizes = (shape[time_dim], shape[batch_dim], shape[2], spatial[0][0], spatial[1][0])
    return sizes, tuple(
        (stride[time_dim], stride[batch_dim], stride[2], spatial[0][1][k], spatial[1][1][k])
        for k, stride in enumerate(strides))


@functools.lru_cache(maxsize=256)
def packed_align(block: int, itemsize: int, sizes, *strides) -> int:
    """ALIGN for the Triton kernels' PACKED path, or 0 where it does not apply.

    PACKED needs, for every tensor read or written through `strides` (one tuple of step
    strides per tensor, `sizes` = (T, B, C, S1, S2) as `step_strides` gives them): (C, S1, S2)
    one contiguous run of M = C * S1 * S2 elements, M a multiple of `block` (so a program's
    neurons are consecutive elements of one batch row), and time and batch strides multiples
    of 16 bytes, ALIGN elements: the kernels promise the compiler these alignments, which lets
    it issue vector loads and stores. Contiguous time-major and batch-major tensors qualify when
    M is a multiple of the block (with 256, every layer of the paper's network but
    [128, 11, 11], which `launch_config` runs with 128)."""
    steps, batch, channels, s1, s2 = sizes
    align = 16 // itemsize
    if (channels * s1 * s2) % block or block % align:
        return 0
    for stride_t, stride_b, stride_c, stride_1, stride_2 in strides:
        inner = ((s2, stride_2, 1), (s1, stride_1, s2), (channels, stride_c, s1 * s2))
        if any(size > 1 and stride != run for size, stride, run in inner):
            return 0
        if any(size > 1 and stride % align for size, stride in ((steps, stride_t),
                                                                  (batch, stride_b))):
            return 0
    return align


def launch_config(itemsize: int, sizes, *strides, packed: bool = True) -> Tuple[int, int, int]:
    """`(BLOCK, num_warps, ALIGN)` of the Triton launches for tensors of these sizes and step
    strides: LAUNCH's entry on the PACKED path where its layout allows (ALIGN > 0, see
    `packed_align`); where LAUNCH's BLOCK does not divide C * S1 * S2 but a half or a quarter
    does, that block with as many fewer warps (the same neurons per thread), e.g. 128 x 2 for
    the paper's [128, 11, 11] layers; else, or with `packed=False`, LAUNCH's entry on the
    strided path (ALIGN = 0)."""
    launch = LAUNCH[itemsize]
    if not packed:
        return launch["BLOCK"], launch["num_warps"], 0
    return _launch_config(launch["BLOCK"], launch["num_warps"], itemsize, sizes, *strides)


# The Triton PLIF's GPU variants, fastest first (neurokern/verified.py): PACKED where the
# record allows it (it has not run on a GPU yet), else the strided path.
VARIANTS = ("triton.plif.packed", "triton.plif.strided")


# The generalised neuron's Triton variant (strided addressing only).
GENERAL_VARIANT = "triton.plif.general"


def _launch(x, sizes, *strides, general=False) -> Tuple[int, int, int]:
    """`launch_config` for x's dtype with the variant the record allows on x's device, noted
    for the GPU test run's record; `general`: the generalised neuron's kernels, whose variant is
    GENERAL_VARIANT."""
    if general:
        verified.note(GENERAL_VARIANT, x.dtype, x.device)
        return launch_config(x.dtype.itemsize, sizes, *strides, packed=False)
    packed = verified.pick(VARIANTS, x.dtype, x.device) == VARIANTS[0]
    block, warps, align = launch_config(x.dtype.itemsize, sizes, *strides, packed=packed)
    verified.note(VARIANTS[0] if align else VARIANTS[1], x.dtype, x.device)
    return block, warps, align


@functools.lru_cache(maxsize=256)
def _launch_config(block, warps, itemsize, sizes, *strides):
    configured = block, warps
    while not (align := packed_align(block, itemsize, sizes, *strides)):
        if warps == 1 or block % 2:
            return *configured, 0
        block, warps = block // 2, warps // 2
    return block, warps, align


def _strided(batch_first, *tensors):
    """`tensors` (all of one shape; outputs are allocated contiguous) and their step strides on
    common collapsed dims, `(sizes, (strides of each tensor))`. Where the spatial dims of the
    tensors together cannot be addressed with two strides (a rare view), the non-contiguous
    ones are copied once."""
    if any(t.shape != tensors[0].shape for t in tensors):
        raise ValueError(f"neurokern_triton::plif: the sequences must have one shape, got "
                         f"{[list(t.shape) for t in tensors]}")
    layout = step_strides(tensors[0], batch_first, *tensors[1:])
    if layout is None:
        tensors = tuple(t.contiguous() for t in tensors)
        layout = step_strides(tensors[0], batch_first, *tensors[1:])
    return tensors, layout


def _saved_shape(steps, neurons, checkpoint):
    """Shape of plif_fwd's v_saved: one row of membranes per chunk of `checkpoint` steps."""
    return (-(-steps // checkpoint), neurons) if checkpoint > 0 else (0,)


def _state_shape(x, batch_first):
    time_dim = 1 if batch_first else 0
    return x.shape[:time_dim] + x.shape[time_dim + 1:]


_neuron_params_cache = {}


def neuron_params(v_th, gamma, options, detach_reset, dtype, device) -> Optional[torch.Tensor]:
    """None for the paper's PLIF (`options` = PAPER_OPTIONS); else the Triton kernels' params
    of the generalised neuron (triton_kernels/plif.py, `_neuron_params`), a device tensor in the
    compute dtype of `dtype`: v_th, gamma, fire_th, scale, reset_k, reset_r, grad_k, grad_r,
    v_rest, decay. Cached like `scalar_params`."""
    if tuple(options) == PAPER_OPTIONS:
        return None
    key = (v_th, gamma, tuple(options), detach_reset, compute_dtype(dtype), torch.device(device))
    params = _neuron_params_cache.get(key)
    if params is None:
        reset, v_reset, _, decay_input, strict, _, scale = options
        if reset not in ("soft", "hard", "none"):
            raise ValueError(f"neurokern_triton::plif: reset must be 'soft', 'hard' or 'none', "
                             f"got {reset!r}")
        th = torch.tensor(v_th, dtype=key[4])
        fire_th = torch.nextafter(th, torch.tensor(math.inf, dtype=key[4])) if strict else th
        reset_k, reset_r = {"soft": (0.0, -v_th), "hard": (1.0, v_reset), "none": (0.0, 0.0)}[reset]
        grad_k, grad_r = (0.0, 0.0) if detach_reset else (reset_k, reset_r)
        values = [v_th, gamma, fire_th.item(), scale, reset_k, reset_r, grad_k, grad_r,
                  v_reset if reset == "hard" else 0.0, 1.0 if decay_input else 0.0]
        if len(_neuron_params_cache) > 256:
            _neuron_params_cache.clear()
        params = _neuron_params_cache[key] = torch.tensor(values, dtype=key[4], device=key[5])
    return params


def _general_flags(options):
    """The Triton kernels' GENERAL, BEFORE and SIGMOID for `options`."""
    return dict(GENERAL=tuple(options) != PAPER_OPTIONS, BEFORE=bool(options[2]),
                SIGMOID=options[5] == "sigmoid")


if triton_available():
    import triton

    from neurokern.triton_kernels.plif import plif_bwd_kernel, plif_fwd_kernel

    @triton_op("neurokern_triton::plif_fwd")
    def triton_plif_fwd(
        x: torch.Tensor, alpha: torch.Tensor, v0: Optional[torch.Tensor],
        s0: Optional[torch.Tensor], v_th: float, gamma: float, signed: bool, batch_first: bool,
        spiking: bool, checkpoint: int, reset: str = "soft", v_reset: float = 0.0,
        reset_before_leak: bool = False, decay_input: bool = False,
        strict_threshold: bool = False, surrogate: str = "atan", surrogate_scale: float = 1.0,
        spike_dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        options = (reset, v_reset, reset_before_leak, decay_input, strict_threshold, surrogate,
                   surrogate_scale)
        params = neuron_params(v_th, gamma, options, False, x.dtype, x.device)
        # the kernel's stores convert to s's element type
        s = torch.empty_like(x, dtype=spike_dtype_of(x.dtype, spike_dtype),
                             memory_format=torch.contiguous_format)
        (x, s), ((T, B, C, S1, S2), (x_strides, s_strides)) = _strided(batch_first, x, s)
        N = B * C * S1 * S2
        v_saved = x.new_empty(_saved_shape(T, N, checkpoint), dtype=compute_dtype(x.dtype))
        v_last = x.new_empty(_state_shape(x, batch_first))
        s_last = torch.empty_like(v_last)
        has_state = v0 is not None
        if N:
            block, warps, align = _launch(x, (T, B, C, S1, S2), x_strides, s_strides,
                                          general=params is not None)
            plif_fwd_kernel[(triton.cdiv(N, block),)](
                x, alpha, v0.contiguous() if has_state else v_last,
                s0.contiguous() if has_state else s_last,
                scalar_params(v_th, gamma, x.dtype, x.device) if params is None else params,
                s, v_saved, v_last, s_last,
                T, N, C, S1, S2, *x_strides, *s_strides,
                alpha.stride(0) if alpha.dim() else 0,
                HAS_STATE=has_state, SAVE=checkpoint > 0, SIGNED=signed, SPIKING=spiking,
                PACKED=align > 0, ALIGN=max(align, 1),
                CHUNK=checkpoint or checkpoint_interval("triton", x.dtype), BLOCK=block,
                num_warps=warps, **_general_flags(options),
            )
        return s, v_saved, v_last, s_last

    @triton_op("neurokern_triton::plif_bwd")
    def triton_plif_bwd(
        grad_s: torch.Tensor, grad_v_last: Optional[torch.Tensor],
        grad_s_last: Optional[torch.Tensor], x: torch.Tensor, v_saved: torch.Tensor,
        alpha: torch.Tensor, v0: Optional[torch.Tensor], s0: Optional[torch.Tensor],
        v_th: float, gamma: float, signed: bool, batch_first: bool, spiking: bool,
        detach_reset: bool, checkpoint: int, reset: str = "soft", v_reset: float = 0.0,
        reset_before_leak: bool = False, decay_input: bool = False,
        strict_threshold: bool = False, surrogate: str = "atan", surrogate_scale: float = 1.0,
        leak_grad: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # leak_grad = False allows skipping dalpha (csrc/register.cpp); on a GPU its sum rides
        # along with the loads the kernel makes anyway, so it is always computed
        options = (reset, v_reset, reset_before_leak, decay_input, strict_threshold, surrogate,
                   surrogate_scale)
        params = neuron_params(v_th, gamma, options, detach_reset, x.dtype, x.device)
        if grad_s.dtype not in (x.dtype, compute_dtype(x.dtype)):  # the kernel loads either
            raise ValueError(f"neurokern_triton::plif_bwd: grad_s must have x's dtype {x.dtype} "
                             f"or its compute dtype {compute_dtype(x.dtype)}, got {grad_s.dtype}")
        dx = torch.empty_like(grad_s, dtype=x.dtype, memory_format=torch.contiguous_format)
        (grad_s, x, dx), ((T, B, C, S1, S2), (g_strides, x_strides, d_strides)) = _strided(
            batch_first, grad_s, x, dx)
        N = B * C * S1 * S2
        if checkpoint < 1 or v_saved.shape != _saved_shape(T, N, checkpoint):
            raise ValueError(f"neurokern_triton::plif_bwd: v_saved of shape "
                             f"{tuple(v_saved.shape)} is not what plif_fwd saves with "
                             f"checkpoint={checkpoint} ({_saved_shape(T, N, checkpoint)})")
        dalpha = v_saved.new_empty((N,))
        dv0 = x.new_empty(_state_shape(x, batch_first))
        ds0 = torch.empty_like(dv0)
        has_state = v0 is not None
        if N:
            block, warps, align = _launch(x, (T, B, C, S1, S2), g_strides, x_strides,
                                          d_strides, general=params is not None)
            plif_bwd_kernel[(triton.cdiv(N, block),)](
                grad_s,
                grad_v_last.contiguous() if grad_v_last is not None else dv0,
                grad_s_last.contiguous() if grad_s_last is not None else ds0,
                x, v_saved, alpha,
                v0.contiguous() if has_state else dv0, s0.contiguous() if has_state else ds0,
                scalar_params(v_th, gamma, x.dtype, x.device) if params is None
                else params,
                dx, dalpha, dv0, ds0,
                T, N, C, S1, S2, *g_strides, *x_strides, *d_strides,
                alpha.stride(0) if alpha.dim() else 0,
                HAS_GRAD_V_LAST=grad_v_last is not None,
                HAS_GRAD_S_LAST=grad_s_last is not None,
                HAS_STATE=has_state, SIGNED=signed, SPIKING=spiking,
                DETACH_RESET=detach_reset, PACKED=align > 0, ALIGN=max(align, 1),
                CHUNK=checkpoint, BLOCK=block, num_warps=warps, **_general_flags(options),
            )
        return dx, dalpha, dv0, ds0


def _plif_fwd_fake(x, alpha, v0, s0, v_th, gamma, signed, batch_first, spiking, checkpoint,
                   reset="soft", v_reset=0.0, reset_before_leak=False, decay_input=False,
                   strict_threshold=False, surrogate="atan", surrogate_scale=1.0,
                   spike_dtype=None):
    v_last = x.new_empty(_state_shape(x, batch_first))
    s = x.new_empty(x.shape, dtype=spike_dtype_of(x.dtype, spike_dtype))
    steps = x.shape[1 if batch_first else 0]
    v_saved = x.new_empty(_saved_shape(steps, v_last.numel(), checkpoint),
                          dtype=compute_dtype(x.dtype))
    return s, v_saved, v_last, torch.empty_like(v_last)


def _plif_bwd_fake(grad_s, grad_v_last, grad_s_last, x, v_saved, alpha, v0, s0, v_th, gamma,
                   signed, batch_first, spiking, detach_reset, checkpoint, *options,
                   leak_grad=True):
    dv0 = x.new_empty(_state_shape(x, batch_first))
    return (x.new_empty(x.shape), v_saved.new_empty((dv0.numel(),)), dv0, torch.empty_like(dv0))


register_fakes("plif", _plif_fwd_fake, _plif_bwd_fake)


def plif_ops(backend):
    """`(plif_fwd, plif_bwd)` op overloads of `backend` ("cpu" or "triton")."""
    namespace = torch.ops.neurokern if backend == "cpu" else torch.ops.neurokern_triton
    return namespace.plif_fwd.default, namespace.plif_bwd.default


class PLIFFunction(torch.autograd.Function):
    """Multi-step PLIF on a fused backend. Inputs `(x, alpha, v0, s0)`, outputs
    `(s, v_last, s_last)`; the backward runs the reverse-time kernel from x and the saved
    membranes (every `checkpoint_interval`-th step). `options`: the generalised neuron's
    options (OPTION_NAMES), `()` for the paper's PLIF; `spike_dtype`: s's dtype (None: x's)."""

    @staticmethod
    def forward(ctx, x, alpha, v0, s0, v_th, gamma, signed, batch_first, spiking, detach_reset,
                backend, options=(), spike_dtype=None):
        fwd = eager_or_op(plif_ops(backend)[0])
        checkpoint = (checkpoint_interval(backend, x.dtype) if any(ctx.needs_input_grad[:4])
                      else 0)
        s, v_saved, v_last, s_last = fwd(x, alpha, v0, s0, v_th, gamma, signed, batch_first,
                                         spiking, checkpoint, *options, spike_dtype=spike_dtype)
        ctx.save_for_backward(x, v_saved, alpha, v0, s0)
        ctx.set_materialize_grads(False)
        ctx.args = (v_th, gamma, signed, batch_first, spiking, detach_reset, checkpoint,
                    backend, options)
        return s, v_last, s_last

    @staticmethod
    @first_order_only
    def backward(ctx, grad_s, grad_v_last, grad_s_last):
        x, v_saved, alpha, v0, s0 = ctx.saved_tensors
        (v_th, gamma, signed, batch_first, spiking, detach_reset, checkpoint, backend,
         options) = ctx.args
        bwd = eager_or_op(plif_ops(backend)[1])
        if grad_s is None:  # only the final state was used, if anything
            if grad_v_last is None and grad_s_last is None:
                return (None,) * 13
            grad_s = torch.zeros_like(x)
        dx, dalpha_n, dv0, ds0 = bwd(grad_s, grad_v_last, grad_s_last, x, v_saved, alpha, v0,
                                     s0, v_th, gamma, signed, batch_first, spiking,
                                     detach_reset, checkpoint, *options,
                                     leak_grad=ctx.needs_input_grad[1])
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
                None, None, None, None, None, None, None, None, None)


def _plif_impl(backend):
    def impl(x, alpha, *, v_th, gamma, signed, batch_first, state, return_state, detach_reset,
             spiking, spike_dtype=None, **options):
        if options.get("reset", "soft") != "hard":  # v_reset is not used: the paper's path
            options["v_reset"] = NEURON_DEFAULTS["v_reset"]
        options = tuple(options.get(name, NEURON_DEFAULTS[name]) for name in OPTION_NAMES)
        if not isinstance(alpha, torch.Tensor):
            alpha = torch.tensor(alpha, dtype=compute_dtype(x.dtype), device=x.device)
        v0, s0 = state if state is not None else (None, None)
        s, v_last, s_last = PLIFFunction.apply(
            x, alpha, v0, s0, v_th, gamma, signed, batch_first, spiking, detach_reset, backend,
            () if options == PAPER_OPTIONS else options, spike_dtype)
        return (s, (v_last, s_last)) if return_state else s
    return impl


for _backend in ("cpu", "triton"):
    register("plif", _backend)(_plif_impl(_backend))
