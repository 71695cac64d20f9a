"""The main job: run every op on the best available backend beside the reference, and say
which backend ran. `bash run.sh main` runs this; the kernel benchmarks join it as they land.

    python benchmarks/main.py [--device cpu|cuda]
"""

import argparse
import time

import torch

import neurokern as nk
from neurokern import dispatch


def timed(fn, repeats):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def cases(device):
    g = dict(device=device)
    small = device.type == "cpu"
    t, b = (90, 4) if small else (90, 32)
    x_act = torch.randn(1 << (20 if small else 26), **g)
    x_plif = torch.randn(t, b, 64, 11, 11, **g)
    alpha = torch.full((64,), 0.9, **g)
    i, h = (256, 256) if small else (512, 1024)
    gru = nk.nn.SpikGRU2Plus(i, h).to(device)
    x_gru = torch.randn(t, 8 if small else b, i, **g)
    weights = gru.layer_parameters(0, 0)
    return [
        ("spike", f"{x_act.numel()} elements", lambda be: nk.spike(x_act, backend=be)),
        ("signed_spike", f"{x_act.numel()} elements",
         lambda be: nk.signed_spike(x_act, backend=be)),
        ("plif", f"{list(x_plif.shape)}", lambda be: nk.plif(x_plif, alpha, backend=be)),
        ("spikgru2plus", f"T={t} B={x_gru.shape[1]} I={i} H={h}",
         lambda be: nk.spikgru2plus(x_gru, *weights, backend=be)),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"neurokern {nk.__version__}, torch {torch.__version__}, device {name}, "
          f"forward only, no grad, mean of {args.repeats} runs")
    print(f"{'op':<13} {'size':<28} {'backend':<10} {'ms':>9} {'reference ms':>13}")
    with torch.no_grad():
        for op, size, run in cases(device):
            chosen, _ = dispatch.resolve(op, "auto", device)
            ms = timed(lambda: run("auto"), args.repeats)
            ref = ms if chosen == "reference" else timed(lambda: run("reference"), args.repeats)
            print(f"{op:<13} {size:<28} {chosen:<10} {ms:9.2f} {ref:13.2f}", flush=True)


if __name__ == "__main__":
    main()
