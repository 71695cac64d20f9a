"""One training step of the paper's network on neurokern's fused kernels against the same model
on the reference backend: time and peak memory, in one run, appended to results/train_step.csv.

    python benchmarks/bench_train_step.py                 # GPU: paper config, B=32, T=90
    python benchmarks/bench_train_step.py --config small  # CPU default: small config, B=16

A step is forward, cross-entropy, backward and an Adam update; the backend is switched with
NEUROKERN_BACKEND, which every module reads at each call.
"""

import argparse
import os

import torch

from neurokern import models

import common


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default=None, help="paper (GPU default) or small")
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config_name = args.config or ("paper" if device.type == "cuda" else "small")
    config = models.get_config(config_name)
    batch = args.batch or (32 if config_name == "paper" else 16)
    torch.manual_seed(0)
    model = models.LipReadingNet(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    size = config.input_size
    frames = (torch.rand(batch, config.num_steps, 2, size, size, device=device) < 0.05).float()
    labels = torch.randint(0, config.num_classes, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(frames), labels)
        loss.backward()
        optimizer.step()

    results = common.Results("train_step", device)
    label = f"{config_name} B{batch} T{config.num_steps}"
    print(f"training step, {label}, {common.device_name(device)}", flush=True)
    previous = os.environ.get("NEUROKERN_BACKEND")
    try:
        for backend in ("reference", "auto"):
            os.environ["NEUROKERN_BACKEND"] = backend
            step()  # warm-up
            ms, q20, q80 = common.measure(step, device, min_run_time=2.0, min_repeats=5)
            peak = common.peak_memory_mb(step, device)
            results.add(op="train_step", provider=f"neurokern {backend}", size=label,
                        dtype="float32", mode="fwd+bwd", ms=ms, q20_ms=q20, q80_ms=q80,
                        peak_mb=peak)
    finally:
        if previous is None:
            os.environ.pop("NEUROKERN_BACKEND", None)
        else:
            os.environ["NEUROKERN_BACKEND"] = previous
    results.save()


if __name__ == "__main__":
    main()
