"""Small helpers shared by the fused-op modules (spike_ops, plif_ops, spikgru2plus_ops)."""

import collections
import functools
import os

import torch

from neurokern import _extension
from neurokern.reference import compute_dtype
from neurokern.triton_kernels import triton_error

_params_cache = {}
_eager_impls = {}  # "neurokern_triton::<op>" -> the Python function behind the custom op
_eager_by_op = {}  # op overload -> what eager_or_op returns for it (its schema name costs us)


def triton_op(name: str):
    """`torch.library.custom_op(name)` for a Triton launcher, remembering the plain function
    so that eager calls can skip the dispatcher (`eager_or_op`)."""
    def wrap(fn):
        _eager_impls[name] = fn
        return torch.library.custom_op(name, mutates_args=())(fn)
    return wrap


def eager_or_op(op):
    """`op` under torch.compile; in eager mode, the Python function behind a Triton custom op:
    the dispatcher round trip of a Python custom op costs tens of microseconds per call, the
    order of a small kernel, and the op adds nothing outside a compiled graph."""
    if torch.compiler.is_compiling():
        return op
    fn = _eager_by_op.get(op)
    if fn is None:
        fn = _eager_by_op[op] = _eager_impls.get(op._schema.name, op)
    return fn


def triton_available() -> bool:
    return triton_error is None


def interpreted() -> bool:
    """Whether Triton kernels run under the interpreter (TRITON_INTERPRET=1, on the CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    `neurokern::*` (declared when the extension loads: at import, or later where the first
    fused call compiles it, neurokern/_jit.py)."""
    def register(namespace):
        torch.library.register_fake(f"{namespace}::{op}_fwd")(fwd_fake)
        torch.library.register_fake(f"{namespace}::{op}_bwd")(bwd_fake)

    if triton_available():
        register("neurokern_triton")
    _extension.on_load(lambda: register("neurokern") if _extension.has_op(f"{op}_fwd") else None)


# CUDA graphs of device loops, keyed by the op and the shapes, dtypes and scalars of its inputs.
_graphs = collections.OrderedDict()
MAX_CUDA_GRAPHS = 8  # least recently used graphs beyond this are dropped with their memory


def cuda_graphs_enabled() -> bool:
    """Whether `graphed` captures (NEUROKERN_CUDA_GRAPHS=0 turns it off, read at each call)."""
    return os.environ.get("NEUROKERN_CUDA_GRAPHS", "1") != "0"


def clear_cuda_graphs() -> None:
    """Drop every captured graph and the device memory it holds."""
    _graphs.clear()


def graphed(name: str, fn, *args):
    """`fn(*args)` (a tuple of tensors) through a CUDA graph: captured on the first call with
    these input shapes, dtypes and non-tensor arguments, replayed afterwards.

    For loops of many small launches (the SpikGRU2+ steps), whose launch overhead the replay
    removes. A replay copies the tensor arguments into the graph's static inputs and returns
    copies of its static outputs, so results never alias a later call's. The first input
    layout seen is the one captured; later inputs of any strides are copied into it. Runs `fn`
    directly on CPU tensors, when graphs are disabled, and inside another capture.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if (not tensors or not tensors[0].is_cuda or not cuda_graphs_enabled()
            or torch.cuda.is_current_stream_capturing()):
        return fn(*args)
    # one graph per stream: its static buffers must not be shared by concurrent replays
    stream = torch.cuda.current_stream(tensors[0].device).cuda_stream
    key = (name, tensors[0].device, stream) + tuple(
        (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
    entry = _graphs.get(key)
    if entry is None:
        static = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream(tensors[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels, creates library handles
            fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*static)
        # the graph reads the cached scalar tensors by address: keep them alive with it
        entry = (graph, static, outputs, list(_params_cache.values()))
        _graphs[key] = entry
        while len(_graphs) > MAX_CUDA_GRAPHS:
            _graphs.popitem(last=False)
    else:
        _graphs.move_to_end(key)
    graph, static, outputs, _ = entry
    for dst, src in zip(static, args):
        if isinstance(dst, torch.Tensor):
            dst.copy_(src)
    graph.replay()
    return tuple(o.clone() for o in outputs)


def first_order_only(backward):
    """`torch.autograd.function.once_differentiable` for a fused Function's `backward`, which
    also refuses a backward that builds a graph (`create_graph=True`, a double backward) while
    an input needs a gradient: the fused backward ops have no derivatives, and
    once_differentiable alone would hand back gradients that are silently constant in the
    inputs wherever the incoming gradients do not require grad (a gradient penalty would miss
    its second-order term). The reference backend is differentiable any number of times."""
    once = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and any(ctx.needs_input_grad):
            raise RuntimeError(
                f"neurokern: {type(ctx).__name__.removesuffix('Backward')}'s fused backward "
                "is differentiable once only; for a double backward (create_graph=True) use "
                "backend=\"reference\"")
        return once(ctx, *grads)

    return wrapper
