"""Plots of a training run (`python -m neurokern.train --plot RUN_DIR`, docs/training.md).

Reads `RUN_DIR/metrics.jsonl` and writes two PNG files beside it:

- `curves.png`: per epoch, the train loss (and spike loss when on), train and test accuracy,
  the learning rate, and OPs/syn with GOPs/s (the paper's Table 2 quantities);
- `spike_rates.png`: the per-layer spike rates (the paper's Fig. 7) of the last and the best
  epoch, and each layer's rate over the epochs.

matplotlib is optional (requirements-bench.txt); without it `plot_run` raises ImportError saying
how to install it.
"""

import io
import json
from pathlib import Path

from neurokern import _fileio

__all__ = ["read_metrics", "plot_run"]


def read_metrics(run_dir):
    """The records of `run_dir/metrics.jsonl`, one dict per epoch. FileNotFoundError when there
    is none; ValueError naming the file and line when a line is not a JSON object."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --plot takes the --out folder of a run "
                                f"(it holds metrics.jsonl after its first epoch)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: not JSON ({e})") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise ValueError(f"{path}, line {number}: not an epoch record")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no epoch yet")
    return records


def _figure_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--plot needs matplotlib, which is not installed: pip install "
                          "matplotlib (or pip install -r requirements-bench.txt)") from None
    return Figure, FigureCanvasAgg


def _save(figure, canvas_class, path):
    buffer = io.BytesIO()
    canvas_class(figure).print_png(buffer)
    _fileio.atomic_write(path, buffer.getvalue())


def _curves(records, Figure):
    epochs = [r["epoch"] for r in records]
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    (loss, acc), (lr, ops) = figure.subplots(2, 2)
    loss.plot(epochs, [r["train_loss"] for r in records], label="train loss (cross-entropy)")
    if any(r.get("train_spike_loss") for r in records):
        loss.plot(epochs, [r["train_spike_loss"] for r in records], label="spike loss (eq. 15)")
    loss.set(title="loss", xlabel="epoch")
    loss.legend()
    acc.plot(epochs, [r["train_acc"] for r in records], label="train")
    acc.plot(epochs, [r["test_acc"] for r in records], label="test")
    best = max(records, key=lambda r: r["test_acc"])
    acc.plot([best["epoch"]], [best["test_acc"]], "o", color="C1",
             label=f"best {best['test_acc']:.3f} (epoch {best['epoch']})")
    acc.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    acc.legend()
    lr.plot(epochs, [r["lr"] for r in records])
    lr.set(title="learning rate (the epoch's last step)", xlabel="epoch", yscale="log")
    ops.plot(epochs, [r["gops"] for r in records], label=f"GOPs/s (OPs/syn "
             f"{records[-1]['ops_per_synapse']:.4f} at the last epoch)")
    ops.plot(epochs, [r["ann_gops"] for r in records], "--", label="ANN twin (MAC GOPs/s)")
    positive = all(r["gops"] > 0 and r["ann_gops"] > 0 for r in records)
    ops.set(title="operations per second (paper Table 2)", xlabel="epoch",
            yscale="log" if positive else "linear")
    ops.legend()
    for axes in (loss, acc, lr, ops):
        axes.xaxis.get_major_locator().set_params(integer=True)
    return figure


def _spike_rates(records, Figure):
    layers = list(records[-1].get("spike_rates", {}))
    figure = Figure(figsize=(11, 8), layout="constrained")
    bars, lines = figure.subplots(2, 1)
    best = max(records, key=lambda r: r["test_acc"])
    if not layers:  # the ANN twin
        bars.text(0.5, 0.5, "no spiking layers", ha="center", va="center")
        lines.set_axis_off()
        return figure
    shown = [("last", records[-1])] + ([("best", best)] if best is not records[-1] else [])
    width = 0.8 / len(shown)
    for i, (name, record) in enumerate(shown):
        rates = record.get("spike_rates", {})
        bars.bar([x + i * width for x in range(len(layers))],
                 [rates.get(layer, 0.0) for layer in layers], width,
                 label=f"{name} epoch ({record['epoch']})")
    bars.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))], layers, rotation=45,
                    ha="right")
    bars.set(title="spike rate per layer (paper Fig. 7)", ylabel="spikes / neuron / step")
    bars.legend()
    epochs = [r["epoch"] for r in records]
    for i, layer in enumerate(layers):  # (past the 10 colours of the cycle: dashed)
        lines.plot(epochs, [r.get("spike_rates", {}).get(layer, float("nan")) for r in records],
                   "-" if i < 10 else "--", label=layer)
    lines.xaxis.get_major_locator().set_params(integer=True)
    lines.set(title="spike rate per layer over the epochs", xlabel="epoch",
              ylabel="spikes / neuron / step")
    lines.legend(fontsize="small", ncol=3)
    return figure


def plot_run(run_dir):
    """Draw `run_dir/curves.png` and `run_dir/spike_rates.png` from its metrics.jsonl; return
    their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    Figure, canvas_class = _figure_class()
    paths = [run_dir / "curves.png", run_dir / "spike_rates.png"]
    for path, draw in zip(paths, (_curves, _spike_rates)):
        _save(draw(records, Figure), canvas_class, path)
    return paths
