"""Probe (GPU): the SpikGRU2+ time-loop ops alone, without the products outside the loop, per
step: the CUDA persistent loops (backend "cuda", one cooperative launch per op) beside the Triton
loops (per step a cuBLAS product and a kernel, replayed from a CUDA graph), at B = 32, H = 1024,
one and two directions, float32 weights (the CUDA backend's SIMT loops) and bf16 weights
(autocast's products: the CUDA backend's tensor-core loops, docs/kernels.md). The time per
step over T = 90 minus T = 10 separates the per-step cost (products, barrier) from the fixed
cost of a call (launch, the backward's dU product). One line per case, then one line
comparing the two backends' results at T = 90 (fraction of spikes that differ, and the relative
error of the backward's dgi and dU, both backward calls given the Triton forward's saved state).
Then: the two directions' per-step products (bmm, or one mm per direction in turn or on two
streams), dU over all steps, and the products with a spike factor as float32 and as split bf16
products (time and error).

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
        # the same inputs and output gradients for both backends
        inputs = {steps: (torch.randn(steps, rows, 3 * H, device=dev, generator=gen),
                          torch.randn(steps, rows, H, device=dev, generator=gen))
                  for steps in (10, 90)}
        results = {}
        for backend, (fwd, bwd) in ops.items():
            times = {}
            for steps, (gi, grad) in inputs.items():
                args = (gi, weight, bias, alpha, None, None, None, 1.0, 10.0, True, True, True)
                try:
                    saved = fwd(*args)  # s, v, i, gh
                except RuntimeError as exc:  # e.g. the persistent split does not fit
                    print(f"D={directions} U {str(weight_dtype)[6:]:<8} {backend:<6} "
                          f"failed: {exc}")
                    break
                times[steps] = (
                    bench(lambda: fwd(*args)),
                    bench(lambda: bwd(grad, None, None, None, gi, weight, bias, alpha, *saved,
                                      None, None, None, 1.0, 10.0, True, True)))
            if len(times) == 2:
                per_step = [(times[90][k] - times[10][k]) / 80 * 1e3 for k in (0, 1)]
                print(f"D={directions} U {str(weight_dtype)[6:]:<8} {backend:<6} "
                      f"T=90 fwd {times[90][0]:.3f} bwd {times[90][1]:.3f} ms; "
                      f"per step fwd {per_step[0]:.1f} bwd {per_step[1]:.1f} us", flush=True)
                results[backend] = saved, bwd
        if len(results) == 2:
            gi, grad = inputs[90]
            saved = results["triton"][0]
            grads = {backend: bwd(grad, None, None, None, gi, weight, bias, alpha, *saved, None,
                                  None, None, 1.0, 10.0, True, True)
                     for backend, (_, bwd) in results.items()}

            def rel(a, b):
                return ((a.double() - b.double()).norm() / b.double().norm()).item()
            flips = (results["cuda"][0][0] != saved[0]).double().mean().item()
            print(f"D={directions} U {str(weight_dtype)[6:]:<8} cuda vs triton: spikes differ "
                  f"{flips:.2e}, dgi rel {rel(grads['cuda'][0], grads['triton'][0]):.1e}, "
                  f"dU rel {rel(grads['cuda'][1], grads['triton'][1]):.1e}", flush=True)

# The Triton loops' per-step product of two directions: one batched product (torch.bmm) or one
# torch.mm per direction, forward (s_{t-1} U^T) and backward (dgh_{t+1} U) shapes.
# Replayed from a CUDA graph, as in the loops; also the two mm calls on two streams (a fork and
# join in the graph), which run concurrently if one small-M product leaves SMs idle.
print("two directions' per-step product (CUDA graph), us: bmm vs one mm per direction, "
      "in turn or on two streams")
side = torch.cuda.Stream()
for weight_dtype in (torch.float32, torch.bfloat16):
    weight = torch.randn(2, 3 * H, H, device=dev).to(weight_dtype)
    for name, a, w in (("fwd", torch.randn(2, B, H, device=dev), weight.transpose(1, 2)),
                       ("bwd", torch.randn(2, B, 3 * H, device=dev), weight)):
        a = a.to(weight_dtype)
        out = torch.empty(2, B, w.shape[2], device=dev, dtype=weight_dtype)

        def per_direction():
            for d in range(2):
                torch.mm(a[d], w[d], out=out[d])

        def two_streams():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.mm(a[1], w[1], out=out[1])
            torch.mm(a[0], w[0], out=out[0])
            torch.cuda.current_stream().wait_stream(side)

        times = [triton.testing.do_bench_cudagraph(fn, rep=300) * 1e3
                 for fn in (lambda: torch.bmm(a, w, out=out), per_direction, two_streams)]
        print(f"  {name} U {str(weight_dtype)[6:]:<8} bmm {times[0]:.1f} mm x2 {times[1]:.1f}"
              f" mm x2 on two streams {times[2]:.1f}", flush=True)

# The backward's product over all steps after the loop, two directions, T = 90:
# dU = dgh^T S_prev (the forward's gh is saved, so gh = S_prev U^T is no longer recomputed).
print("two directions' products over all steps (T = 90), ms")
for weight_dtype in (torch.float32, torch.bfloat16):
    s_prev = torch.randn(2, 90 * B, H, device=dev).sign().to(weight_dtype)
    dgh = torch.randn(2, 90 * B, 3 * H, device=dev).to(weight_dtype)
    t_du = bench(lambda: torch.matmul(dgh.transpose(1, 2), s_prev))  # a bmm, as the einsum
    t_mm = bench(lambda: [torch.mm(dgh[d].t(), s_prev[d]) for d in range(2)])
    print(f"  U {str(weight_dtype)[6:]:<8} dU {t_du:.3f} (bmm), {t_mm:.3f} (mm per direction)",
          flush=True)

# The products with a spike factor (layers 2-3 of the paper's stack: x = the previous layer's
# spikes after dropout 0.2, I = 2H = 2048, two directions' 6H = 6144 columns, T B = 2880 rows):
# float32 cuBLAS (TF32 off) against split bf16 products (neurokern.spikgru2plus_ops.
# split_product, NEUROKERN_SPLIT_PRODUCTS=1), time and error against float64.
from neurokern.spikgru2plus_ops import split_product  # noqa: E402

print("products with a spike factor (T B = 2880, I = 2048, 6H = 6144), ms and max error "
      "relative to the largest value")
gen = torch.Generator(device=dev).manual_seed(0)
spikes = 1.25 * torch.randint(-1, 2, (90 * B, 2 * H), generator=gen, device=dev).float()
weight_t = torch.randn(2 * H, 6 * H, generator=gen, device=dev) * H ** -0.5
dgi_t = torch.randn(6 * H, 90 * B, generator=gen, device=dev) * 1e-3
for name, a, b, exact in (("gi = x W^T", spikes, weight_t, "a"),
                          ("dW = dgi^T x", dgi_t, spikes, "b")):
    t32 = bench(lambda: torch.mm(a, b))
    t_split = bench(lambda: split_product(a, b, exact))
    ref = a.double() @ b.double()
    scale = ref.abs().max()
    e32 = ((a @ b).double() - ref).abs().max() / scale
    e_split = (split_product(a, b, exact).double() - ref).abs().max() / scale
    print(f"  {name:<13} fp32 {t32:.3f} ms (err {e32:.1e}), split bf16 {t_split:.3f} ms "
          f"(err {e_split:.1e})", flush=True)
