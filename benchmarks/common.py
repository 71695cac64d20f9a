"""Shared pieces of the benchmark scripts: timing, peak memory, the byte floor, CSV rows.

GPU: `triton.testing.do_bench` medians with 20%/80% quantiles. CPU: `torch.utils.benchmark`
(median of adaptive repeats; the quantiles are its IQR bounds).
"""

import csv
import datetime
import os
import platform
import time

import torch

from neurokern import dispatch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["date", "device", "torch", "triton", "op", "provider", "size", "dtype", "mode", "ms",
          "q20_ms", "q80_ms", "peak_mb", "floor_ms"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    allocator = cpu_allocator()
    return f"{name}, {allocator}" if allocator else name


def cpu_allocator() -> str:
    """The process's malloc where it is not glibc's with its default settings (which give fresh
    pages to large tensors whose memory went back to the OS: docs/benchmarks.md): the
    preloaded allocator, or the glibc settings taken from the environment; "" for the default."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return ""
    for allocator, settings in (("jemalloc", "MALLOC_CONF"), ("tcmalloc", "TCMALLOC_"),
                                ("mimalloc", "MIMALLOC_")):
        if f"lib{allocator}" in maps:
            named = sorted(k for k in os.environ if k.startswith(settings))
            return " ".join([allocator] + [f"{k}={os.environ[k]}" for k in named])
    tunables = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        tunables.append("GLIBC_TUNABLES")
    return "glibc " + " ".join(f"{k}={os.environ[k]}" for k in tunables) if tunables else ""


def versions():
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return torch.__version__, triton_version


def fused_backends(op, device):
    """The neurokern fused backends that can run `op` on `device` here."""
    return [b for b in ("cpu", "triton", "cuda")
            if dispatch.availability(op, b, device.type).available]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, *, min_run_time=0.5, min_repeats=1):
    """`(median_ms, q20_ms, q80_ms)` of `fn()`, timed at least `min_repeats` times (on a GPU,
    do_bench repeats for about 100 ms, which is one run of a step that takes a second)."""
    if device.type == "cuda":
        import triton.testing

        start = time.perf_counter()
        fn()
        sync(device)
        estimate_ms = (time.perf_counter() - start) * 1e3
        rep = max(100.0, min_repeats * estimate_ms)
        med, q20, q80 = triton.testing.do_bench(fn, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return med, q20, q80
    from torch.utils import benchmark

    # The Timer runs one thread unless told otherwise.
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                        ).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m._p25 * 1e3, m._p75 * 1e3


def peak_memory_mb(fn, device):
    """Peak device memory allocated while running `fn()` once, above what was allocated
    before (CUDA only; None on CPU, where torch keeps no such counter)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth(device, nbytes=1 << 28):
    """Measured copy bandwidth in bytes/s (bytes read + written) for a buffer of `nbytes`: the
    denominator of the byte floor of a case of that size in the same run (on a CPU the caches
    make it depend on the size, so each case measures its own)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms, _, _ = measure(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3)


class Results:
    """Collects rows, prints them as they come, appends them to `results/<name>.csv`."""

    def __init__(self, name, device):
        self.path = os.path.join(RESULTS, f"{name}.csv")
        self.device = device
        self.rows = []
        self.common = dict(
            date=datetime.date.today().isoformat(), device=device_name(device),
            torch=versions()[0], triton=versions()[1])

    def add(self, **row):
        row = {**self.common, **row}
        self.rows.append(row)
        peak = "" if row.get("peak_mb") is None else f"{row['peak_mb']:9.1f} MB"
        floor = "" if row.get("floor_ms") is None else f"(floor {row['floor_ms']:.3f})"
        print(f"  {row['provider']:<22} {row['mode']:<9} {row['dtype']:<9} {row['size']:<26} "
              f"{row['ms']:10.3f} ms {floor} {peak}", flush=True)

    def save(self):
        os.makedirs(RESULTS, exist_ok=True)
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _fmt(row.get(k)) for k in FIELDS})
        print(f"appended {len(self.rows)} rows to {self.path}")


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.5g}"
    return "" if value is None else value


def time_modes(fn_forward, inputs_requiring_grad, device, modes):
    """Times of `fn_forward()` in the requested modes: "forward" (no grad), "backward" (the
    backward alone, graph rebuilt outside the timing) and "fwd+bwd". Returns
    `{mode: (ms, q20, q80, peak_mb)}`."""
    out = {}

    def forward_no_grad():
        with torch.no_grad():
            fn_forward()

    def full():
        for t in inputs_requiring_grad:
            t.grad = None
        y = fn_forward()
        y.backward(grad)

    with torch.no_grad():
        y0 = fn_forward()
    grad = torch.ones_like(y0)
    if "forward" in modes:
        out["forward"] = (*measure(forward_no_grad, device), peak_memory_mb(forward_no_grad, device))
    if "fwd+bwd" in modes:
        out["fwd+bwd"] = (*measure(full, device), peak_memory_mb(full, device))
    if "backward" in modes:  # the backward alone, repeated over one retained graph
        y = fn_forward()

        def backward():  # gradients reset first, so that no accumulation is timed
            for t in inputs_requiring_grad:
                t.grad = None
            y.backward(grad, retain_graph=True)

        out["backward"] = (*measure(backward, device), None)
    return out


def time_graphed(fn_forward, inputs_requiring_grad, device):
    """Times of `fn_forward()` in "forward" (no grad) and "fwd+bwd", each replayed from a CUDA
    graph that captured it: the same kernels through the same public API without the host's
    time between them (what a training step captured whole, or torch.compile's
    "reduce-overhead" mode, runs). GPU only; peak memory is not reported (a replay allocates
    nothing). Returns `{mode: (ms, q20, q80, None)}`."""
    with torch.no_grad():
        grad = torch.ones_like(fn_forward())

    def forward_no_grad():
        with torch.no_grad():
            fn_forward()

    def full():
        for t in inputs_requiring_grad:
            t.grad = None  # the captured backward writes fresh gradients into the graph's pool
        fn_forward().backward(grad)

    out = {}
    for mode, step in (("forward", forward_no_grad), ("fwd+bwd", full)):
        side = torch.cuda.Stream(device)  # warm-up (compilation, caches) off the capture
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        out[mode] = (*measure(graph.replay, device), None)
        del graph
    return out
