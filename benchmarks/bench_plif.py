"""PLIF benchmark: forward, backward, forward+backward of every provider side by side, with peak
memory and the byte floor, appended to results/plif.csv.

    python benchmarks/bench_plif.py                 # GPU: the paper's layers; CPU: small sizes
    python benchmarks/bench_plif.py --quick         # one size, fewer providers' repeats
    python benchmarks/bench_plif.py --quick --neuron spikingjelly-lif   # a generalised neuron

Providers: the neurokern reference loop; the paper-style loop (batch-major, per-step einsum leak
multiply, as the paper's code); SpikingJelly's ParametricLIFNode with its Triton implementation
when `spikingjelly` is installed; neurokern's fused backends available on the device, and on a
GPU "neurokern triton (CUDA graph)": the same calls replayed from CUDA graphs (forward and
forward+backward), i.e. the kernels through the public API without the host's time between
launches, which the eager rows include (common.time_graphed).

Byte floor: forward reads x and writes s; forward+backward also reads x and dL/ds and writes dx
(5 tensors of x's size), over the copy bandwidth measured in the same run.
"""

import argparse
import os

import torch

import neurokern as nk
from neurokern import reference

import common

PAPER_LAYERS = [(64, 44, 44), (64, 22, 22), (128, 11, 11), (256, 6, 6), (512, 3, 3)]

# --neuron: the paper's PLIF, or the generalised neuron's options (docs/neurons.md) of the
# libraries' default neurons; its rows' provider names end in [name]
NEURONS = {
    "paper": {},
    # SpikingJelly LIFNode / ParametricLIFNode: hard reset to 0 before the leak, input decay,
    # Sigmoid(alpha=4)
    "spikingjelly-lif": dict(reset="hard", v_reset=0.0, reset_before_leak=True,
                             decay_input=True, surrogate="sigmoid", gamma=4.0),
    # snnTorch Leaky(reset_mechanism="subtract", spike_grad=atan(alpha=2)): fires on >,
    # detached reset, gamma = (pi alpha / 2)^2, scale alpha / 2
    "snntorch-leaky": dict(strict_threshold=True, detach_reset=True, gamma=3.141592653589793 ** 2,
                           surrogate_scale=1.0),
}


def paper_loop(x, alpha, v_th=1.0):
    """The paper's code: batch-major input, the leak applied with an einsum every step."""
    v = torch.zeros_like(x[:, 0])
    s = torch.zeros_like(v)
    out = []
    for t in range(x.shape[1]):
        v = torch.einsum("bc...,c->bc...", v, alpha) + x[:, t] - v_th * s
        s = reference.spike(v, v_th, 10.0)
        out.append(s)
    return torch.stack(out, 1)


def spikingjelly_provider(channels, device):
    """SpikingJelly 2.0's ParametricLIFNode (scalar tau), Triton implementation, multi-step,
    soft reset, or the reason it cannot run."""
    os.environ.setdefault("SJ_PLIF_CUDA_IMPLEMENTATION", "triton")
    try:
        from spikingjelly.activation_based import neuron, surrogate
    except ImportError as exc:
        return None, f"spikingjelly not installed ({exc})"
    try:  # SpikingJelly 2.0 picks the implementation from SJ_PLIF_CUDA_IMPLEMENTATION
        node = neuron.ParametricLIFNode(init_tau=2.0, decay_input=False, v_reset=None,
                                        surrogate_function=surrogate.ATan(), step_mode="m")
        node.to(device)
    except Exception as exc:  # an API change: report it, do not hide it
        return None, f"spikingjelly failed to build its node: {exc!r}"

    def run(x):  # SpikingJelly is time-major [T, B, ...]
        node.reset()
        return node(x.transpose(0, 1)).transpose(0, 1)

    return run, None


def providers(device, channels, neuron="paper"):
    alpha = torch.full((channels,), 0.9, device=device, requires_grad=True)
    options = NEURONS[neuron]
    suffix = "" if neuron == "paper" else f" [{neuron}]"
    out = {
        "reference loop" + suffix: lambda x: nk.plif(x, alpha, batch_first=True,
                                                     backend="reference", **options),
    }
    why = None
    if neuron == "paper":
        out["paper loop (einsum)"] = lambda x: paper_loop(x, alpha)
        sj, why = spikingjelly_provider(channels, device)
        if sj is not None:
            out["spikingjelly (triton)"] = sj
    for backend in common.fused_backends("plif", device):
        out[f"neurokern {backend}{suffix}"] = (
            lambda x, b=backend: nk.plif(x, alpha, batch_first=True, backend=b, **options))
    if device.type == "cuda" and "neurokern triton" in out:
        out[GRAPHED] = out["neurokern triton"]
    return out, why, alpha


GRAPHED = "neurokern triton (CUDA graph)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="only the headline size")
    parser.add_argument("--skip-slow", action="store_true",
                        help="time the Python loops in forward+backward only")
    parser.add_argument("--neuron", choices=sorted(NEURONS), default="paper",
                        help="the neuron's options (docs/neurons.md): the paper's PLIF or a "
                             "library's default neuron")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"PLIF on {common.device_name(device)}, torch {common.versions()[0]}, "
          f"triton {common.versions()[1]}")
    if gpu:
        sizes = [(32, 90, *layer) for layer in PAPER_LAYERS]
        sizes += [(32, t, 64, 22, 22) for t in (16, 32, 64, 128, 256)]
        dtypes = [torch.float32, torch.bfloat16]
    else:
        sizes = [(4, 90, 64, 11, 11)] + [(4, t, 64, 11, 11) for t in (16, 32, 180)]
        dtypes = [torch.float32]
    if args.quick:
        sizes = sizes[1:2] if gpu else sizes[:1]
    results = common.Results("plif", device)
    for size in sizes:
        for dtype in dtypes:
            x = torch.randn(size, device=device, dtype=dtype, requires_grad=True)
            numel, itemsize = x.numel(), x.element_size()
            bandwidth = common.copy_bandwidth(device, numel * itemsize)
            floors = {"forward": 2 * numel * itemsize / bandwidth * 1e3,
                      "fwd+bwd": 5 * numel * itemsize / bandwidth * 1e3}
            provs, why, alpha = providers(device, size[2], args.neuron)
            label = "x".join(map(str, size))
            print(f"[B, T, C, H, W] = {list(size)} {str(dtype)[6:]}, copy bandwidth "
                  f"{bandwidth / 1e12:.3f} TB/s" + (f"  ({why})" if why else ""), flush=True)
            for name, fn in provs.items():
                slow = "loop" in name
                modes = ("fwd+bwd",) if slow and args.skip_slow else ("forward", "backward",
                                                                        "fwd+bwd")
                try:
                    timings = (common.time_graphed(lambda: fn(x), [x, alpha], device)
                               if name == GRAPHED else
                               common.time_modes(lambda: fn(x), [x, alpha], device, modes))
                except Exception as exc:  # e.g. a provider refusing a dtype: say so
                    print(f"  {name:<22} failed: {exc!r}", flush=True)
                    continue
                for mode, (ms, q20, q80, peak) in timings.items():
                    results.add(op="plif", provider=name, size=label, dtype=str(dtype)[6:],
                                mode=mode, ms=ms, q20_ms=q20, q80_ms=q80, peak_mb=peak,
                                floor_ms=floors.get(mode))
            del x
    results.save()


if __name__ == "__main__":
    main()
