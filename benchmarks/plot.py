"""Plots from the benchmark CSVs: one PNG per (CSV, device, dtype, size) of the newest date,
bars of milliseconds per provider and mode, with the byte floor as a line.

    python benchmarks/plot.py [results/plif.csv ...]     # default: every results/*.csv
"""

import argparse
import csv
import glob
import os
from collections import defaultdict

import common


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csvs", nargs="*")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"plot.py needs matplotlib (pip install matplotlib): {exc}")
    paths = args.csvs or sorted(glob.glob(os.path.join(common.RESULTS, "*.csv")))
    for path in paths:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        newest = max(r["date"] for r in rows)
        groups = defaultdict(list)
        for r in rows:
            if r["date"] == newest:
                groups[(r["device"], r["op"], r["dtype"], r["size"])].append(r)
        for (device, op, dtype, size), group in groups.items():
            modes = sorted({r["mode"] for r in group})
            providers = list(dict.fromkeys(r["provider"] for r in group))
            fig, ax = plt.subplots(figsize=(2 + 1.6 * len(providers), 4))
            width = 0.8 / len(modes)
            for k, mode in enumerate(modes):
                ms = [next((float(r["ms"]) for r in group
                            if r["provider"] == p and r["mode"] == mode), 0.0) for p in providers]
                xs = [i + k * width for i in range(len(providers))]
                ax.bar(xs, ms, width, label=mode)
                floors = [float(r["floor_ms"]) for r in group if r["mode"] == mode and r["floor_ms"]]
                if floors:
                    ax.axhline(floors[0], linestyle="--", linewidth=0.8, color=f"C{k}")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(providers))])
            ax.set_xticklabels(providers, rotation=20, ha="right", fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("ms (log); dashed: byte floor")
            ax.set_title(f"{op} {size} {dtype}\n{device}, {newest}", fontsize=9)
            ax.legend(fontsize=8)
            fig.tight_layout()
            name = f"{op}_{size}_{dtype}_{'gpu' if 'CPU' not in device else 'cpu'}.png"
            out = os.path.join(common.RESULTS, "".join(
                ch if ch.isalnum() or ch in "._-" else "_" for ch in name))
            fig.savefig(out, dpi=110)
            plt.close(fig)
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
