"""The main job (`bash run.sh main`): say which backend runs each op on this machine, then run
the kernel benchmarks (the paper's sizes on a GPU, small ones on a CPU) and plot them.

    python benchmarks/main.py [--device cpu|cuda] [--quick]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_compat  # noqa: E402
import bench_plif  # noqa: E402
import bench_spike  # noqa: E402
import bench_spikgru2plus  # noqa: E402
import bench_train_step  # noqa: E402
import plot  # noqa: E402

import neurokern as nk  # noqa: E402
from neurokern import dispatch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="headline sizes only")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"neurokern {nk.__version__}, torch {torch.__version__}, device {device}")
    print("backend chosen by auto:")
    for op in dispatch.OPS:
        name, _ = dispatch.resolve(op, "auto", device)
        print(f"  {op:<13} {name}")
    common_args = ["--device", args.device]
    steps = [
        ("spike activations", lambda: bench_spike.main(common_args)),
        ("PLIF", lambda: bench_plif.main(common_args + (["--quick"] if args.quick else []))),
        ("SpikingJelly's and snnTorch's neurons beside neurokern.compat's",
         lambda: bench_compat.main(common_args + (["--quick"] if args.quick else []))),
        ("SpikGRU2+", lambda: bench_spikgru2plus.main(common_args)),
        ("SpikGRU2+ stack with split products of the spike inputs (GPU only)",
         lambda: device.type == "cuda" and bench_spikgru2plus.main(
             common_args + ["--split-products"])),
        ("training step of the paper's network", lambda: bench_train_step.main(common_args)),
        ("plots", lambda: plot.main([])),
    ]
    for k, (title, step) in enumerate(steps, 1):
        start = time.perf_counter()
        print(f"\n== [{k}/{len(steps)}] {title}", flush=True)
        step()
        print(f"== {title} done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
