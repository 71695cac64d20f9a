"""Probe (GPU): the Triton PLIF kernels alone (CUDA-graph timing, no Python overhead) over
launch configurations and checkpoint intervals at the issue's headline size, with the fraction
of the copy bandwidth each reaches and the backward kernel's registers and spilled bytes.
Prints one line per configuration, best last, then per dtype the best as a line
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


src = torch.empty(1 << 28, device=dev)
dst = torch.empty_like(src)
bandwidth = 2 * src.numel() * 4 / (bench(lambda: dst.copy_(src)) * 1e-3)
print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s")
del src, dst
for dtype in [getattr(torch, name) for name in sys.argv[1:] or ("float32", "bfloat16")]:
    launch = plif_ops.LAUNCH[dtype.itemsize]
    x = torch.randn(B, T, C, S, S, device=dev, dtype=dtype)
    g = torch.randn_like(x)
    alpha = torch.rand(C, device=dev)
    nbytes = x.numel() * x.element_size()
    rows = []
    for block, warps, k in itertools.product((256, 512, 1024), (2, 4, 8), (4, 8, 16)):
        launch.update(BLOCK=block, num_warps=warps)
        args = (x, alpha, None, None, 1.0, 10.0, False, True, True)
        infer = bench(lambda: fwd(*args, 0))
        train = bench(lambda: fwd(*args, k))
        _, v_saved, _, _ = fwd(*args, k)
        back = bench(lambda: bwd(g, None, None, x, v_saved, alpha, None, None, 1.0, 10.0,
                                 False, True, True, False, k))
        floor = (2 * nbytes / bandwidth * 1e3, 5 * nbytes / bandwidth * 1e3)
        regs = registers(plif_ops.plif_bwd_kernel)
        rows.append((train + back, block, warps, k, infer, train, back, floor, regs))
    for total, block, warps, k, infer, train, back, floor, regs in sorted(rows, reverse=True):
        print(f"{str(dtype)[6:]:8} BLOCK {block:4} warps {warps} k {k:2}: forward (no grad) "
              f"{infer:.3f} ms ({floor[0] / infer:.0%} of floor), forward (saving) {train:.3f},"
              f" backward {back:.3f} (registers/spills {regs}), fwd+bwd {total:.3f} ms "
              f"({floor[1] / total:.0%} of floor {floor[1]:.3f})", flush=True)
    _, block, warps, k, *_ = min(rows)
    print(f"best {str(dtype)[6:]} BLOCK={block} num_warps={warps} checkpoint={k}", flush=True)
