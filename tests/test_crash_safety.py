"""Crash safety of `python -m neurokern.train` (docs/training.md, "Crash safety and resume"): a
kill at any point resumes from the last complete epoch, bit for bit, with best.pt and
metrics.jsonl consistent; bad checkpoints are errors naming the file; an unwritable --out or a
full disk is found and named; the synthetic data set is written whole or not at all."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from neurokern import _fileio
from neurokern import data as nkdata
from neurokern import train

# Small and quick (as tests/test_train.py): 4 classes, T = 8, two steps of batch 8 per epoch.
QUICK = ["--config", "small", "--synthetic-classes", "4", "--synthetic-train", "8",
         "--synthetic-test", "4", "--num-steps", "8", "--batch-size", "8", "--num-workers", "0",
         "--log-every", "1", "--augment", "baseline", "--device", "cpu", "--threads", "1",
         "--steps-per-epoch", "2", "--eval-steps", "1"]
# Options a resumed run is given (the others come from the checkpoint)
WHERE = ["--num-workers", "0", "--device", "cpu", "--threads", "1"]
REAL_REPLACE = _fileio.replace


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash") / "data"
    nkdata.make_synthetic_dvslip(root, 4, 8, 4, seed=0)
    return root


def _models_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(out):
    """metrics.jsonl without its timings, which differ between runs."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("seconds")}
            for line in lines]


def _assert_same_run(out, ref):
    """`out` holds the same finished run as `ref`: weights bit for bit, best.pt of the same
    epoch and weights, metrics.jsonl with every epoch once, no temporary file left."""
    a, b = train.load_checkpoint(out / "last.pt"), train.load_checkpoint(ref / "last.pt")
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert _models_equal(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert _models_equal(sa, sb)
    best_a, best_b = train.load_checkpoint(out / "best.pt"), train.load_checkpoint(ref / "best.pt")
    assert best_a["epoch"] == best_b["epoch"]
    assert _models_equal(best_a["model"], best_b["model"])
    assert _metrics(out) == _metrics(ref)
    assert [r["epoch"] for r in _metrics(out)] == list(range(1, a["epoch"] + 1))
    assert not [p for p in out.iterdir() if p.name.endswith(_fileio.TMP_SUFFIX)]


# ---------------------------------------------------------------------------------------------
# A real training process killed at random points
# ---------------------------------------------------------------------------------------------


def test_sigkill_at_random_points_then_resume_is_bit_exact(tmp_path, data_dir):
    """A subprocess training 5 epochs is killed with SIGKILL 3 times, each at a random time
    (0-0.4 s) after it printed the end of an epoch, when it writes that epoch's files and trains
    the next (an epoch takes about 0.3 s here), and resumed with --resume out/last.pt each time
    (started afresh if no epoch was complete); the finished run equals an uninterrupted one bit
    for bit: weights, optimiser state, best.pt, metrics.jsonl."""
    common = QUICK + ["--epochs", "5", "--synthetic-dir", str(data_dir)]
    ref = tmp_path / "ref"
    train.main(common + ["--out", str(ref)])
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(train.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    rng = random.Random(19)
    schedule = []  # (resumed, epochs printed, delay, return code)
    for attempt in range(4):
        resumed = (out / "last.pt").exists() or (out / "previous.pt").exists()
        cmd = [sys.executable, "-m", "neurokern.train"] + (
            ["--resume", str(out / "last.pt"), "--out", str(out)] + WHERE if resumed
            else common + ["--out", str(out)])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True)
        printed, delay = [], None
        if attempt < 3:
            for line in proc.stdout:
                if line.startswith("epoch ") and "/5: train loss" in line:
                    printed.append(line.split("/")[0])
                    break
            delay = rng.uniform(0.0, 0.4)
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
        output = proc.communicate(timeout=120)[0]
        schedule.append((resumed, printed, delay, proc.returncode))
        if proc.returncode == 0:  # (it finished before the kill)
            break
        assert proc.returncode == -signal.SIGKILL, (schedule, output[-3000:])
    assert proc.returncode == 0, (schedule, output[-3000:])
    assert sum(resumed for resumed, *_ in schedule) >= 2, schedule
    _assert_same_run(out, ref)


# ---------------------------------------------------------------------------------------------
# A kill at every file operation of a run
# ---------------------------------------------------------------------------------------------


class _Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs."""


# test accuracy per epoch: epochs 1 and 2 are each the best so far, 3 is not
SCRIPTED_ACCURACY = {0: 0.25, 1: 0.5, 2: 0.25}


@pytest.fixture
def scripted(monkeypatch):
    """Test accuracies from SCRIPTED_ACCURACY, so that best.pt changes at known epochs."""
    epoch = {}
    real_train_epoch, real_evaluate = train.train_epoch, train.evaluate

    def train_epoch(model, loader, optimizer, scheduler, args, d, ep, *rest):
        epoch["now"] = ep
        return real_train_epoch(model, loader, optimizer, scheduler, args, d, ep, *rest)

    def evaluate(*a, **k):
        return SCRIPTED_ACCURACY[epoch["now"]], real_evaluate(*a, **k)[1]

    monkeypatch.setattr(train, "train_epoch", train_epoch)
    monkeypatch.setattr(train, "evaluate", evaluate)


def _kill_at_replace(monkeypatch, k):
    """Kill the run just before its k-th durable rename (every file the trainer writes goes
    through one; the probe of --out is the 0th)."""
    count = [0]

    def replace(src, dst):
        if count[0] == k:
            raise _Killed
        count[0] += 1
        return REAL_REPLACE(src, dst)

    monkeypatch.setattr(_fileio, "replace", replace)
    return count


def test_kill_at_every_file_write_then_resume(tmp_path, data_dir, scripted, monkeypatch, capsys):
    """For every k, a run of 3 epochs is killed before its k-th rename (the --out probe; epoch
    1: last, best, metrics; then: last -> previous, last, [best], metrics), then resumed
    (or started afresh if no epoch was complete): last.pt, best.pt and metrics.jsonl end as in
    the uninterrupted run. With the scripted accuracies this includes a kill between last.pt
    and best.pt of a best epoch (best.pt restored on resume), between the two renames of
    last.pt (resumed from previous.pt, loudly) and before metrics.jsonl."""
    common = QUICK + ["--epochs", "3", "--synthetic-dir", str(data_dir)]
    ref = tmp_path / "ref"
    renames = _kill_at_replace(monkeypatch, -1)
    train.main(common + ["--out", str(ref)])
    total = renames[0]
    assert total == 1 + 3 + 4 + 3
    warnings = []
    for k in range(total):
        out = tmp_path / f"k{k}"
        _kill_at_replace(monkeypatch, k)
        with pytest.raises(_Killed):
            train.main(common + ["--out", str(out)])
        monkeypatch.setattr(_fileio, "replace", REAL_REPLACE)
        capsys.readouterr()
        if (out / "last.pt").exists() or (out / "previous.pt").exists():
            train.main(["--resume", str(out / "last.pt"), "--out", str(out)] + WHERE)
        else:
            train.main(common + ["--out", str(out)])
        warnings.append(capsys.readouterr().err)
        _assert_same_run(out, ref)
    # the kills between last.pt -> previous.pt and the new last.pt (k = 5, 9): from previous.pt
    for k in (5, 9):
        assert "does not exist. Resuming from the previous complete checkpoint" in warnings[k]
    # the kills before best.pt of a best epoch: best.pt restored from last.pt
    assert "best.pt is missing: restored" in warnings[2]                          # epoch 1
    assert "holds epoch 1, not the resumed run's best epoch 2: restored" in warnings[6]
    assert not [w for k, w in enumerate(warnings) if k not in (2, 5, 6, 9) and w], warnings


# ---------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, data_dir):
    """A finished run of 3 epochs, with every epoch's checkpoint."""
    out = tmp_path_factory.mktemp("good") / "run"
    train.main(QUICK + ["--epochs", "3", "--synthetic-dir", str(data_dir), "--out", str(out),
                        "--keep-epochs"])
    return out


def _run_at_epoch_2(good_run, out):
    """The folder of `good_run` as it was after its epoch 2."""
    out.mkdir()
    history = train.load_checkpoint(good_run / "epoch2.pt")["history"]
    for name, source in (("last.pt", "epoch2.pt"), ("previous.pt", "epoch1.pt"),
                         ("best.pt", f"epoch{train._best_epoch(history)}.pt")):
        (out / name).write_bytes((good_run / source).read_bytes())
    (out / "metrics.jsonl").write_bytes(train._metrics_bytes(history))
    return out


def _flip_tensor_byte(data, state):
    """`data` with one bit flipped inside the stored bytes of a weight tensor."""
    weight = state["model"]["stem_conv.weight"].numpy().tobytes()
    at = data.find(weight[:64])
    assert at > 0
    data = bytearray(data)
    data[at + 100] ^= 0x10
    return bytes(data)


def _bad_files(good):
    data = good.read_bytes()
    state = train.load_checkpoint(good)
    foreign = good.with_name("foreign.pt")
    torch.save(state, foreign)  # a plain torch.save file
    header_end = data.index(b"\n", len(train.CHECKPOINT_MAGIC)) + 1
    lacking = train.checkpoint_bytes({"epoch": 2, "weights": state["model"]})
    return {
        "empty": (b"", "is empty"),
        "truncated": (data[: len(data) // 2], "truncated: .* of its .* payload bytes"),
        "truncated header": (data[:10], "truncated after 10 bytes"),
        "foreign": (foreign.read_bytes(), "a plain torch.save file"),
        "garbage": (bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8)),
                    "not a neurokern checkpoint"),
        "flipped tensor bit": (_flip_tensor_byte(data, state), "checksum mismatch"),
        "corrupt header": (data[:header_end - 20] + b"X" * 19 + b"\n" + data[header_end:],
                           "header is corrupt"),
        "extra bytes": (data + b"\0" * 7, "7 bytes beyond"),
        "not a training state": (lacking, r"lacks \['model'"),
    }


@pytest.mark.parametrize("case", ["empty", "truncated", "truncated header", "foreign", "garbage",
                                  "flipped tensor bit", "corrupt header", "extra bytes",
                                  "not a training state"])
def test_bad_checkpoint_is_an_error_naming_the_file(tmp_path, good_run, data_dir, case):
    content, match = _bad_files(good_run / "last.pt")[case]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    for option in (["--resume", str(bad)] + WHERE,
                   ["--init", str(bad)] + QUICK + ["--synthetic-dir", str(data_dir)]):
        with pytest.raises(train.CheckpointError, match=match) as info:
            train.main(option + ["--epochs", "3", "--out", str(tmp_path / "out")])
        assert str(bad) in str(info.value)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_missing_checkpoint_and_foreign_weights_name_the_file(tmp_path, good_run, data_dir):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pt")):
        train.main(["--resume", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])
    # weights of the spiking model into its ANN twin
    with pytest.raises(train.CheckpointError, match=f"{good_run / 'last.pt'}: its weights do "
                                                    f"not fit"):
        train.main(QUICK + ["--init", str(good_run / "last.pt"), "--config", "small-ann",
                            "--epochs", "1", "--synthetic-dir", str(data_dir), "--out",
                            str(tmp_path / "o")])


def test_resume_falls_back_to_previous_checkpoint_loudly(tmp_path, good_run, capsys):
    """A corrupt last.pt: --resume says so, continues from previous.pt (one epoch earlier),
    keeps the bad file aside as last.pt.bad, and the run ends as the uninterrupted one."""
    out = _run_at_epoch_2(good_run, tmp_path / "run")
    last = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(_flip_tensor_byte(last, train.load_checkpoint(out /
                                                                                "last.pt")))
    train.main(["--resume", str(out / "last.pt"), "--out", str(out)] + WHERE)
    err = capsys.readouterr().err
    assert "WARNING: cannot resume from checkpoint" in err and "checksum mismatch" in err
    assert f"Resuming from the previous complete checkpoint {out / 'previous.pt'}" in err
    assert (out / "last.pt.bad").read_bytes() != last and len(last) == len(
        (out / "last.pt.bad").read_bytes())
    _assert_same_run(out, good_run)
    # both bad: an error naming both
    (out / "last.pt").write_bytes(b"")
    (out / "previous.pt").write_bytes(b"junk")
    with pytest.raises(train.CheckpointError, match="is empty.*previous checkpoint is bad too"):
        train.main(["--resume", str(out / "last.pt"), "--out", str(out)] + WHERE)


def test_a_run_folder_is_never_overwritten(tmp_path, good_run, data_dir):
    """A new run into a folder holding a run, or a resume of an earlier epoch into a folder
    holding a later one, is refused before any training."""
    args = QUICK + ["--epochs", "2", "--synthetic-dir", str(data_dir), "--out", str(good_run)]
    with pytest.raises(ValueError, match="already holds a run"):
        train.main(args)
    with pytest.raises(ValueError, match="holds .*last.pt of epoch 3, later than the resumed "
                                         "epoch 2"):
        train.main(["--resume", str(good_run / "previous.pt"), "--out", str(good_run)] + WHERE)


# ---------------------------------------------------------------------------------------------
# --out writable, a full disk
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "train_epoch", fail)


def test_unwritable_out_is_found_before_training(tmp_path, data_dir, no_training):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(OSError, match=f"--out {out} is not a writable folder"):
            train.main(QUICK + ["--epochs", "1", "--synthetic-dir", str(tmp_path / "d"),
                                "--out", str(out)])
    assert not (tmp_path / "d").exists()  # not even the data was made


def _disk_full_after(monkeypatch, path_part, allowed=0):
    """os.write raises ENOSPC, after `allowed` bytes, on files whose path contains
    `path_part`, as on a full disk."""
    real = os.write
    written = [0]

    def write(fd, data):
        if path_part in os.readlink(f"/proc/self/fd/{fd}"):
            if written[0] + len(data) > allowed:
                n = max(0, allowed - written[0])
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                data = memoryview(data)[:n]
            written[0] += len(data)
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_full_disk_is_named_and_keeps_the_previous_files(tmp_path, good_run, monkeypatch):
    """A disk full while writing last.pt (part of it written): the error says the disk is
    full and names last.pt; last.pt and previous.pt are the previous epochs', intact, and no
    temporary file is left. A full disk at the --out probe is found before training."""
    out = _run_at_epoch_2(good_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _disk_full_after(monkeypatch, f"{out}/.last.pt.", allowed=100_000)
    with pytest.raises(OSError, match=f"the disk is full: could not write {out / 'last.pt'}"):
        train.main(["--resume", str(out / "last.pt"), "--out", str(out)]
                   + WHERE)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {"epoch3.pt"}  # (--keep-epochs, written before last.pt)
    monkeypatch.undo()
    _disk_full_after(monkeypatch, f"{out}/.")
    monkeypatch.setattr(train, "train_epoch", None)
    with pytest.raises(OSError, match="the disk is full: could not write .*write-test"):
        train.main(["--resume", str(out / "last.pt"), "--out", str(out)]
                   + WHERE)


def test_stale_temporary_files_are_removed(tmp_path, good_run):
    out = _run_at_epoch_2(good_run, tmp_path / "run")
    (out / ".last.pt.abc123_x.nk-tmp").write_bytes(b"half a checkpoint")
    (out / ".notes").write_text("mine")
    train.main(["--resume", str(out / "last.pt"), "--out", str(out)] + WHERE)
    assert not (out / ".last.pt.abc123_x.nk-tmp").exists()
    assert (out / ".notes").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# The synthetic data set
# ---------------------------------------------------------------------------------------------


def _scratch(root):
    return [p for p in root.parent.iterdir() if p.name.startswith(f".{root.name}.partial-")]


def test_killed_synthetic_generation_leaves_nothing_for_good(tmp_path):
    """kill -9 during make_synthetic_dvslip: no half data set at root; its scratch folder is
    deleted by the next call, which writes the whole set."""
    root = tmp_path / "data"
    script = (f"from neurokern import data; data.make_synthetic_dvslip({str(root)!r}, 10, 40, "
              f"10)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(train.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 60
    while not any(p.rglob("*.npy") for p in _scratch(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not root.exists() and len(_scratch(root)) == 1
    nkdata.make_synthetic_dvslip(root, 2, 2, 1)
    assert not _scratch(root)
    assert len(list(root.rglob("*.npy"))) == 6
    assert json.loads((root / ".complete").read_text())["classes"] == 2
    assert nkdata.make_synthetic_dvslip(root, 2, 2, 1) == root  # reused
    with pytest.raises(ValueError, match="not the requested"):
        nkdata.make_synthetic_dvslip(root, 3, 2, 1)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_full_disk_during_synthetic_generation(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _disk_full_after(monkeypatch, ".data.partial-", allowed=200_000)
    with pytest.raises(OSError, match=r"the disk is full: could not write .*\.npy"):
        nkdata.make_synthetic_dvslip(root, 4, 8, 4)
    assert not root.exists() and not _scratch(root)
