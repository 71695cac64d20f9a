"""Compat benchmark: SpikingJelly's and snnTorch's own neurons beside neurokern.compat's, in one
run, appended to results/compat.csv.

    python benchmarks/bench_compat.py                   # CPU: [T=90, B=4, C=64, 11, 11]
    python benchmarks/bench_compat.py --dtypes float32  # one dtype
    python benchmarks/bench_compat.py                   # GPU: the paper's frontend layers
    python benchmarks/bench_compat.py --quick           # GPU: [T=90, B=32, C=64, 22, 22]

Neurons (their default arguments): SpikingJelly 2.x `LIFNode(tau=2.0)` and
`ParametricLIFNode(init_tau=2.0)` in `step_mode="m"` (SpikingJelly 2.x has no backend
argument: on a CPU it runs its own CPU implementation, a Python time loop with a hand-written
backward, for float32, and its autograd reference loop otherwise; on a GPU the CUDA
implementation it selects itself, its fastest), and snnTorch 1.x
`Leaky(beta=0.9)` called step by step as snnTorch code does. Beside each: the same constructor
arguments on `neurokern.compat` with `backend="reference"` (neurokern's loop) and every fused
backend available on the device (`Leaky` through `multi_step`, one call for all T steps).

Rows: forward (no grad) and fwd+bwd (the gradient of x and of the leak parameter, the state
reset before each call, as in training). The library's version is in the provider's name; a
provider that cannot run prints why and writes no row.
"""

import argparse

import torch

import common
from bench_plif import PAPER_LAYERS

SIZE = (90, 4, 64, 11, 11)
# On a GPU, the paper's frontend layers (bench_plif's sizes, time-major as SpikingJelly's
# step_mode="m" input): [T=90, B=32, C, H, W]; --quick: the second, its headline
GPU_SIZES = [(90, 32, *layer) for layer in PAPER_LAYERS]


def _library_version(module_name):
    """`(installed version, None)` or `(None, why not)`."""
    from importlib import metadata

    try:
        __import__(module_name)
    except ImportError as exc:
        return None, f"{module_name} not installed ({exc})"
    return metadata.version(module_name), None


def providers(neuron, backends):
    """`[(name, make_module, run, why_not)]` for one neuron: the library's own, then ours."""
    from neurokern.compat import snntorch as nk_snntorch
    from neurokern.compat import spikingjelly as nk_spikingjelly

    if neuron == "Leaky":
        version, why = _library_version("snntorch")
        library = None if why else __import__("snntorch")

        def loop(lif, x):  # snnTorch code: one call per step
            mem = lif.init_leaky()
            spikes = []
            for x_t in x:
                spk, mem = lif(x_t, mem)
                spikes.append(spk)
            return torch.stack(spikes)

        def fused(lif, x):
            lif.init_leaky()
            return lif.multi_step(x)[0]

        rows = [(f"snntorch {version} Leaky (per-step loop)",
                 lambda: library.Leaky(beta=0.9), loop, why)]
        rows += [(f"neurokern Leaky {backend}",
                  lambda backend=backend: nk_snntorch.Leaky(beta=0.9, backend=backend), fused, None)
                 for backend in backends]
        return rows

    version, why = _library_version("spikingjelly")
    if why is None:
        from spikingjelly.activation_based import neuron as sj_neuron
    arguments = dict(tau=2.0) if neuron == "LIFNode" else dict(init_tau=2.0)

    def run(node, x):
        node.reset()
        return node(x)

    rows = [(f"spikingjelly {version} {neuron} (step_mode m)",
             lambda: getattr(sj_neuron, neuron)(step_mode="m", **arguments), run, why)]
    rows += [(f"neurokern {neuron} {backend}",
              lambda backend=backend: getattr(nk_spikingjelly, neuron)(
                  step_mode="m", backend=backend, **arguments), run, None)
             for backend in backends]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--neurons", nargs="+", default=["LIFNode", "ParametricLIFNode", "Leaky"],
                        choices=["LIFNode", "ParametricLIFNode", "Leaky"])
    parser.add_argument("--size", type=int, nargs=5, metavar=("T", "B", "C", "H", "W"),
                        help=f"one size (default: {list(SIZE)} on a CPU, the paper's frontend "
                             f"layers on a GPU)")
    parser.add_argument("--quick", action="store_true",
                        help=f"on a GPU only {list(GPU_SIZES[1])}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.size:
        sizes = [tuple(args.size)]
    elif device.type == "cuda":
        sizes = GPU_SIZES[1:2] if args.quick else GPU_SIZES
    else:
        sizes = [SIZE]
    results = common.Results("compat", device)
    for size in sizes:
        run_size(size, args.neurons, args.dtypes, device, results)
    results.save()


def run_size(size, neurons, dtypes, device, results):
    """Every provider of `neurons` at one size, its rows added to `results`."""
    backends = ["reference", *common.fused_backends("plif", device)]
    label = "x".join(map(str, size))
    print(f"compat neurons on {common.device_name(device)}, [T, B, C, H, W] = {label}",
          flush=True)
    for neuron in neurons:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            times = {}
            for name, make, run, why in providers(neuron, backends):
                if why is not None:
                    print(f"  {name}: not run: {why}")
                    continue
                module = make().to(device)
                x = torch.randn(size, device=device).to(dtype).requires_grad_()
                leaves = [x, *module.parameters()]
                try:
                    measured = common.time_modes(lambda: run(module, x), leaves, device,
                                                 ("forward", "fwd+bwd"))
                except (NotImplementedError, RuntimeError, TypeError, ValueError) as exc:
                    print(f"  {name} {dtype_name}: not run: {type(exc).__name__}: {exc}")
                    continue
                for mode, (ms, q20, q80, peak) in measured.items():
                    times[(name, mode)] = ms
                    results.add(op=f"compat {neuron}", provider=name, size=label,
                                dtype=dtype_name, mode=mode, ms=ms, q20_ms=q20, q80_ms=q80,
                                peak_mb=peak)
            library = next((n for n, *_ in providers(neuron, []) if (n, "fwd+bwd") in times),
                           None)
            for (name, mode), ms in times.items():
                if library and name != library and mode == "fwd+bwd":
                    print(f"  speed-up of {name} over {library}, {dtype_name} fwd+bwd: "
                          f"{times[(library, mode)] / ms:.1f}x", flush=True)


if __name__ == "__main__":
    main()
