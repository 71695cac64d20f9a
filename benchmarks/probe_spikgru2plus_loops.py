"""Probe (GPU): the SpikGRU2+ time-loop ops alone, without the products outside the loop, per
step: the CUDA persistent loops (backend "cuda", one cooperative launch per op) beside the Triton
loops (per step a cuBLAS product and a kernel, replayed from a CUDA graph), at B = 32, H = 1024,
one and two directions, float32 weights and bf16 weights (autocast's products). The time per
step over T = 90 minus T = 10 separates the per-step cost (products, barrier) from the fixed
cost of a call (launch, the backward's gh and dU products). One line per case.

    python benchmarks/probe_spikgru2plus_loops.py
"""
import sys

import torch
import triton.testing

import neurokern  # noqa: F401  (registers the ops)

if not torch.cuda.is_available():  # gpu_run.sh's dry runs on a CPU go on past it
    print("probe_spikgru2plus_loops.py: skipped, it needs a GPU")
    sys.exit(0)
dev = torch.device("cuda")
B, H = 32, 1024
torch.backends.cuda.matmul.allow_tf32 = False
ops = {"cuda": (torch.ops.neurokern.spikgru2plus_fwd.default,
                torch.ops.neurokern.spikgru2plus_bwd.default),
       "triton": (torch.ops.neurokern_triton.spikgru2plus_fwd.default,
                  torch.ops.neurokern_triton.spikgru2plus_bwd.default)}


def bench(fn):
    return triton.testing.do_bench(fn, rep=300)


print(f"{torch.cuda.get_device_name()}, B={B}, H={H}; ms per call and us per step")
for directions in (1, 2):
    for weight_dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device=dev).manual_seed(0)
        rows = directions * B
        shape = (directions, 3 * H, H) if directions > 1 else (3 * H, H)
        weight = (torch.rand(shape, device=dev, generator=gen) * 2 - 1) * 3 * H ** -0.5
        weight = weight.to(weight_dtype)
        bias = torch.randn(shape[:-2] + (3 * H,), device=dev, generator=gen)
        alpha = torch.rand(shape[:-2] + (H,), device=dev, generator=gen)
        for backend, (fwd, bwd) in ops.items():
            times = {}
            for steps in (10, 90):
                gi = torch.randn(steps, rows, 3 * H, device=dev, generator=gen)
                args = (gi, weight, bias, alpha, None, None, None, 1.0, 10.0, True, True, True)
                try:
                    s, v, i = fwd(*args)
                except RuntimeError as exc:  # e.g. the persistent split does not fit
                    print(f"D={directions} U {str(weight_dtype)[6:]:<8} {backend:<6} "
                          f"failed: {exc}")
                    break
                grad = torch.randn_like(s)
                times[steps] = (
                    bench(lambda: fwd(*args)),
                    bench(lambda: bwd(grad, None, None, None, gi, weight, bias, alpha, s, v, i,
                                      None, None, None, 1.0, 10.0, True, True)))
            if len(times) == 2:
                per_step = [(times[90][k] - times[10][k]) / 80 * 1e3 for k in (0, 1)]
                print(f"D={directions} U {str(weight_dtype)[6:]:<8} {backend:<6} "
                      f"T=90 fwd {times[90][0]:.3f} bwd {times[90][1]:.3f} ms; "
                      f"per step fwd {per_step[0]:.1f} bwd {per_step[1]:.1f} us", flush=True)
