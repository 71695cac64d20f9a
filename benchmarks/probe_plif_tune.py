"""Probe (GPU): the Triton PLIF kernels alone (CUDA-graph timing, no Python overhead) over
launch configurations and checkpoint intervals at the issue's headline size, with the fraction
of the copy bandwidth each reaches and the backward kernel's registers and spilled bytes.
First, per dtype, the default configuration with and without the kernels' PACKED path (vector
loads: x's neurons contiguous and a multiple of BLOCK per batch row); then one line per
configuration that runs on the PACKED path (a BLOCK that does not divide C * H * W runs as a
smaller one with fewer warps where that does, `plif_ops.launch_config`), best last, and the
best as a line
`best <dtype> BLOCK=<n> num_warps=<w> checkpoint=<k>` (plif_ops.LAUNCH's entries).

    python benchmarks/probe_plif_tune.py [float32] [bfloat16]   (default: both)
"""
import itertools
import sys

import torch
import triton.testing

from neurokern import plif_ops

B, T, C, S = 32, 90, 64, 22
dev = torch.device("cuda")
fwd = torch.ops.neurokern_triton.plif_fwd.default
bwd = torch.ops.neurokern_triton.plif_bwd.default


def bench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=200)


def registers(kernel):
    """"<registers>/<spilled bytes>" of the kernel variant compiled last, read from Triton's
    per-device cache (an internal structure: "?" where this Triton keeps it otherwise)."""
    try:
        compiled = list(next(iter(kernel.device_caches.values()))[0].values())[-1]
        compiled._init_handles()
        return f"{compiled.n_regs}/{compiled.n_spills}"
    except Exception:  # noqa: BLE001  (a probe: any other layout just prints "?")
        return "?"


def copy_bandwidth():
    src = torch.empty(1 << 28, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (bench(lambda: dst.copy_(src)) * 1e-3)


bandwidth = copy_bandwidth()
print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s")
launch_config = plif_ops.launch_config


def strided_config(itemsize, sizes, *strides):
    """plif_ops.launch_config's stand-in for the A/B: LAUNCH's configuration, strided path."""
    launch = plif_ops.LAUNCH[itemsize]
    return launch["BLOCK"], launch["num_warps"], 0


def measure(x, g, alpha, block, warps, k):
    """(fwd+bwd, forward without saving, forward saving, backward) in ms, registers/spills."""
    plif_ops.LAUNCH[x.dtype.itemsize].update(BLOCK=block, num_warps=warps)
    args = (x, alpha, None, None, 1.0, 10.0, False, True, True)
    infer = bench(lambda: fwd(*args, 0))
    train = bench(lambda: fwd(*args, k))
    _, v_saved, _, _ = fwd(*args, k)
    back = bench(lambda: bwd(g, None, None, x, v_saved, alpha, None, None, 1.0, 10.0,
                             False, True, True, False, k))
    return (train + back, infer, train, back), registers(plif_ops.plif_bwd_kernel)


def line(name, times, floor, regs):
    total, infer, train, back = times
    return (f"{name}: forward (no grad) {infer:.3f} ms ({floor[0] / infer:.0%} of floor), "
            f"forward (saving) {train:.3f}, backward {back:.3f} (registers/spills {regs}), "
            f"fwd+bwd {total:.3f} ms ({floor[1] / total:.0%} of floor {floor[1]:.3f})")


for dtype in [getattr(torch, name) for name in sys.argv[1:] or ("float32", "bfloat16")]:
    x = torch.randn(B, T, C, S, S, device=dev, dtype=dtype)
    g = torch.randn_like(x)
    alpha = torch.rand(C, device=dev)
    nbytes = x.numel() * x.element_size()
    floor = (2 * nbytes / bandwidth * 1e3, 5 * nbytes / bandwidth * 1e3)
    default = dict(plif_ops.LAUNCH[x.dtype.itemsize])
    sizes, strides = plif_ops.step_strides(x, True)

    def launched():  # (BLOCK, num_warps, packed) as the launchers pick them for x now
        block, warps, align = plif_ops.launch_config(x.element_size(), sizes, strides)
        return block, warps, align > 0

    for packed in (False, True):  # the A/B of the PACKED path at the default configuration
        plif_ops.launch_config = launch_config if packed else strided_config
        times, regs = measure(x, g, alpha, default["BLOCK"], default["num_warps"],
                              default["checkpoint"])
        block, warps, packed = launched()
        print(line(f"{str(dtype)[6:]:8} default: BLOCK {block} warps {warps} k "
                   f"{default['checkpoint']} {'packed' if packed else 'strided'}", times,
                   floor, regs), flush=True)
    plif_ops.launch_config = launch_config
    rows, seen = [], set()
    for block, warps, k in itertools.product((128, 256, 512, 1024), (1, 2, 4, 8), (4, 8, 16)):
        plif_ops.LAUNCH[x.dtype.itemsize].update(BLOCK=block, num_warps=warps)
        # skipped: idle threads, configurations measured already (a block that runs as a
        # smaller one), and the strided path, measured above at the default configuration
        if block < 32 * warps or (launched(), k) in seen or not launched()[2]:
            continue
        seen.add((launched(), k))
        times, regs = measure(x, g, alpha, block, warps, k)
        rows.append((times, block, warps, k, launched(), regs))
    for times, block, warps, k, (run_block, run_warps, packed), regs in sorted(rows,
                                                                               reverse=True):
        runs = f" (runs as {run_block} x {run_warps})" if (run_block, run_warps) != (
            block, warps) else ""
        print(line(f"{str(dtype)[6:]:8} BLOCK {block:4} warps {warps} k {k:2}"
                   f"{' packed' if packed else ''}{runs}", times, floor, regs), flush=True)
    plif_ops.LAUNCH[x.dtype.itemsize].update(default)
    _, block, warps, k, *_ = min(rows)
    print(f"best {str(dtype)[6:]} BLOCK={block} num_warps={warps} checkpoint={k}", flush=True)
