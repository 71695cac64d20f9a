"""The training command: the schedule and optimiser groups, learning on synthetic data (so a
broken gradient anywhere fails), checkpoint resume, and two-process DistributedDataParallel."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from neurokern import models
from neurokern import train

# Small and quick: 4 classes x 8 train / 4 test samples, T = 8, two steps of batch 8 per epoch.
QUICK = ["--config", "small", "--synthetic-classes", "4", "--synthetic-train", "8",
         "--synthetic-test", "4", "--num-steps", "8", "--batch-size", "8", "--num-workers", "0",
         "--log-every", "1", "--augment", "baseline",
         # CPU also on a GPU machine: exact resumes (cuDNN convolutions are not deterministic)
         # and two processes where the machine may have one GPU
         "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these small models gain little from two, and on a busy 2-core
    machine OpenMP threads waiting for each other made a training step 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _states_equal(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Schedule and optimiser
# ---------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_constant_cosine():
    spe, epochs, cosine = 10, 6, 3
    f = [train.lr_factor(s, spe, epochs, cosine, 1, 0.01) for s in range(epochs * spe)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)      # linear warm-up
    assert all(x == pytest.approx(1.0) for x in f[10:30])                 # constant
    assert f[30] == pytest.approx(1.0)                                    # cosine starts at 1
    assert all(a >= b for a, b in zip(f[30:], f[31:]))                    # and decays
    assert f[45] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert train.lr_factor(60, spe, epochs, cosine, 1, 0.01) == pytest.approx(0.01)
    ann = [train.lr_factor(s, spe, 3, 3, 1, 0.0) for s in range(30)]      # ANN: cosine only
    assert ann[9] < 1.0 and ann[-1] < 0.01


def test_weight_decay_spares_batch_norm_only():
    model = models.LipReadingNet(models.small_config())
    opt = train.build_optimizer(model, 3e-4, 1e-4)
    decayed, spared = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    assert opt.param_groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        is_bn = any(name.startswith(n + ".") for n, m in model.named_modules()
                    if isinstance(m, torch.nn.modules.batchnorm._NormBase))
        assert (id(p) in spared) == is_bn, name
    assert len(decayed) + len(spared) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_resume_continues_exactly(tmp_path):
    """Two epochs straight == one epoch, checkpoint, resume for the second (weights, batch-norm
    statistics, optimiser state, schedule)."""
    data = ["--synthetic-dir", str(tmp_path / "data")]
    common = QUICK + data + ["--epochs", "2", "--steps-per-epoch", "2", "--eval-steps", "1"]
    straight = train.main(common + ["--out", str(tmp_path / "a"), "--keep-epochs"])
    first = tmp_path / "a" / "epoch1.pt"
    # the run's options come from the checkpoint: only where and how it runs is given
    with pytest.raises(ValueError, match="--lr 0.001 differs from the resumed run's 0.0003"):
        train.main(["--resume", str(first), "--lr", "1e-3", "--out", str(tmp_path / "c")])
    resumed = train.main(["--resume", str(first), "--out", str(tmp_path / "b"),
                          "--num-workers", "0", "--device", "cpu"])
    a = train.load_checkpoint(tmp_path / "a" / "last.pt")
    b = train.load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 4
    assert _states_equal(a["model"], b["model"])
    assert _states_equal(straight["model"].state_dict(), resumed["model"].state_dict())
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert _states_equal(sa, sb)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    # the lr recorded is the one the epoch's last step used (step 3 of 4: halfway down the
    # cosine of the second epoch), not the next step's
    assert a["history"][-1]["lr"] == pytest.approx(
        3e-4 * train.lr_factor(3, 2, 2, 1, 1.0, train.FINAL_LR / 3e-4))
    # And a saved model loads back into a fresh one unchanged.
    fresh = models.LipReadingNet(train._config_from(a))
    fresh.load_state_dict(a["model"])
    assert _states_equal(fresh.state_dict(), a["model"])


@pytest.mark.parametrize("option", [
    "--num-steps 0", "--steps-per-epoch 0", "--eval-steps 0", "--lr 0", "--lr nan",
    "--spike-loss -1", "--warmup-epochs -1", "--batch-size 0", "--device bogus",
])
def test_bad_options_are_refused(option, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(option.split())
    assert option.split()[0] in capsys.readouterr().err


def test_synthetic_dir_is_never_overwritten_or_mismatched(tmp_path):
    """--synthetic-dir refuses a non-empty folder it did not write (and leaves it alone), and a
    dataset written with other parameters."""
    d = train._Dist("cpu")
    args = train.parse_args(["--synthetic-dir", str(tmp_path / "mine"), "--synthetic-train", "1",
                             "--synthetic-test", "1"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a synthetic dataset written by neurokern"):
        train._synthetic_root(args, 2, d)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    args.synthetic_dir = str(tmp_path / "data")
    root = train._synthetic_root(args, 2, d)
    assert len(list((root / "train").iterdir())) == 2  # classes
    assert train._synthetic_root(args, 2, d) == root  # reused
    with pytest.raises(ValueError, match="not the requested"):
        train._synthetic_root(args, 3, d)


def test_spike_loss_fine_tuning_runs(tmp_path, capsys, monkeypatch):
    data = ["--synthetic-dir", str(tmp_path / "data")]
    rates = []

    class Meter(models.EfficiencyMeter):
        def __init__(self, steps_per_second):
            rates.append(steps_per_second)
            super().__init__(steps_per_second)

    monkeypatch.setattr(models, "EfficiencyMeter", Meter)
    base = train.main(QUICK + data + ["--epochs", "1", "--steps-per-epoch", "1",
                                      "--eval-steps", "1", "--out", str(tmp_path / "a")])
    result = train.main(QUICK + data + [
        "--epochs", "1", "--steps-per-epoch", "2", "--eval-steps", "1", "--spike-loss", "5",
        "--init", str(tmp_path / "a" / "last.pt"), "--out", str(tmp_path / "b")])
    record = result["history"][-1]
    assert 0.0 <= record["ops_per_synapse"] <= 1.0
    assert all(0.0 <= r <= 1.0 for r in record["spike_rates"].values())
    assert base["history"][-1]["spike_rates"].keys() == record["spike_rates"].keys()
    out = capsys.readouterr().out
    assert "steps/s" in out and "ETA" in out and "spike rates" in out
    # GOPs/s at the run's T = 8 over a sample's 1.2 s, not the paper's 75 steps/s
    assert rates and all(r == pytest.approx(8 / 1.2) for r in rates)
    assert "6.7 steps/s" in out


# ---------------------------------------------------------------------------------------------
# It learns
# ---------------------------------------------------------------------------------------------


def test_small_config_learns_synthetic_data(tmp_path):
    """The small configuration (hybrid SNN: PLIF frontend, SpikGRU2+ backend) on 10 synthetic
    classes (5 motion directions x 2 speeds), T = 8, 144 steps of batch 16 at lr 3e-3.

    Threshold: best test accuracy >= 0.7 on 50 test samples; chance is 0.1 (P(>= 35 of 50 by
    chance) < 1e-20). Measured over seeds 0-3: final 0.92-0.94, best 0.94-0.98; the same run
    with the frontend frozen, as when no gradient gets through the backend or the neurons' time
    loop, stays at or below 0.4 (docs/training.md)."""
    result = train.main([
        "--config", "small", "--synthetic-train", "20", "--synthetic-test", "5",
        "--num-steps", "8", "--batch-size", "16", "--epochs", "12", "--cosine-epochs", "4",
        "--lr", "3e-3", "--augment", "baseline", "--num-workers", "0", "--log-every", "1000",
        "--synthetic-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    history = result["history"]
    best = max(h["test_acc"] for h in history)
    assert best >= 0.7, [round(h["test_acc"], 3) for h in history]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from neurokern import train
    out, data = sys.argv[1], sys.argv[2]
    result = train.main({quick!r} + ["--epochs", "1", "--steps-per-epoch", "3",
                         "--eval-steps", "1", "--synthetic-dir", data, "--out", out])
    rank = int(os.environ["RANK"])
    torch.save(result["model"].state_dict(), os.path.join(out, f"rank{{rank}}.pt"))
""")


def test_two_processes_keep_identical_parameters(tmp_path):
    """torchrun, 2 CPU processes, gloo: after a few steps the replicas are identical (and they
    did train: the weights moved from their initial values)."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(quick=QUICK))
    out = tmp_path / "run"
    out.mkdir()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(script), str(out),
           str(tmp_path / "data")] if os.path.exists(torchrun) else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), str(out), str(tmp_path / "data")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("neurokern.train: config") == 1      # only rank 0 prints
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    # Parameters by DDP; batch-norm statistics because the trainer broadcasts rank 0's.
    assert _states_equal(r0, r1)
    torch.manual_seed(0)
    initial = models.LipReadingNet(models.small_config(num_classes=4, num_steps=8)).state_dict()
    assert not torch.equal(initial["stem_conv.weight"], r0["stem_conv.weight"])
    saved = train.load_checkpoint(out / "last.pt")
    assert _states_equal(saved["model"], r0)


# ---------------------------------------------------------------------------------------------
# Progress and plots
# ---------------------------------------------------------------------------------------------


def test_progress_bars_on_a_terminal_plain_lines_otherwise(tmp_path, capsys, monkeypatch):
    """stdout a terminal: tqdm bars for the epochs and the steps, with loss, accuracy and spike
    rate, the epoch summaries above them; else (a log, a pipe) the plain progress lines, with
    the spike rate too."""
    data = ["--synthetic-dir", str(tmp_path / "data")]
    run = QUICK + data + ["--epochs", "2", "--steps-per-epoch", "2", "--eval-steps", "1"]
    train.main(run + ["--out", str(tmp_path / "lines")])
    lines = capsys.readouterr().out
    assert "spike rate" in lines and "steps/s ETA" in lines and "it/s" not in lines
    monkeypatch.setattr(train, "_stdout_is_terminal", lambda: True)
    train.main(run + ["--out", str(tmp_path / "bars")])
    bars = capsys.readouterr().out
    assert "epochs: 100%" in bars and "2/2 [" in bars
    for field in ("loss=", "acc=", "spikes=", "lr=", "test_acc=", "best=", "test_spikes="):
        assert field in bars, field
    assert "epoch 2/2: train loss" in bars and "steps/s ETA" not in bars


def test_plot_draws_the_runs_curves_and_spike_rates(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.jsonl")):
        train.main(["--plot", str(tmp_path)])
    run = tmp_path / "run"
    train.main(QUICK + ["--synthetic-dir", str(tmp_path / "data"), "--epochs", "2",
                        "--steps-per-epoch", "1", "--eval-steps", "1", "--out", str(run)])
    with monkeypatch.context() as m:  # matplotlib not installed
        for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
            m.setitem(sys.modules, name, None)
        with pytest.raises(ImportError, match="--plot needs matplotlib.*pip install matplotlib"):
            train.main(["--plot", str(run)])
    pytest.importorskip("matplotlib")
    capsys.readouterr()
    paths = train.main(["--plot", str(run)])["plots"]
    assert [p.name for p in paths] == ["curves.png", "spike_rates.png"]
    for path in paths:
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 20_000
    assert f"wrote {paths[0]}" in capsys.readouterr().out
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "trunc')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2: not JSON"):
        train.main(["--plot", str(run)])
