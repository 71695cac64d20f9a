"""Spike / signed-spike activation benchmark: forward and forward+backward of every provider,
appended to results/spike.csv.

    python benchmarks/bench_spike.py        # GPU: 64 M elements; CPU: 4 M

Providers: a torch.autograd.Function that saves its input (neurokern.reference), and the fused
backends available on the device. Byte floor: forward reads x, writes s; forward+backward also
reads x and dL/ds and writes dx (5 tensors), over the copy bandwidth measured in this run.
"""

import argparse

import torch

import neurokern as nk

import common

OPS = {"spike": nk.spike, "signed_spike": nk.signed_spike}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    numel = args.numel or (1 << 26 if gpu else 1 << 22)
    dtypes = [torch.float32, torch.bfloat16] if gpu else [torch.float32]
    bandwidth = common.copy_bandwidth(device, numel * 4)
    print(f"spike activations on {common.device_name(device)}; copy bandwidth "
          f"{bandwidth / 1e12:.3f} TB/s; {numel} elements")
    results = common.Results("spike", device)
    for op, fn in OPS.items():
        providers = {"autograd.Function (reference)": "reference"}
        for backend in common.fused_backends(op, device):
            providers[f"neurokern {backend}"] = backend
        for dtype in dtypes:
            x = (2 * torch.randn(numel, device=device)).to(dtype).requires_grad_()
            nbytes = numel * x.element_size()
            floors = {"forward": 2 * nbytes / bandwidth * 1e3,
                      "fwd+bwd": 5 * nbytes / bandwidth * 1e3}
            print(f"{op} {str(dtype)[6:]}", flush=True)
            for name, backend in providers.items():
                timings = common.time_modes(lambda: fn(x, backend=backend), [x], device,
                                            ("forward", "fwd+bwd"))
                for mode, (ms, q20, q80, peak) in timings.items():
                    results.add(op=op, provider=name, size=str(numel), dtype=str(dtype)[6:],
                                mode=mode, ms=ms, q20_ms=q20, q80_ms=q80, peak_mb=peak,
                                floor_ms=floors[mode])
    results.save()


if __name__ == "__main__":
    main()
