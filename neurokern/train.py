"""Train the paper's lip-reading network (or a variant) on DVS-Lip or synthetic DVS-Lip data.

    python -m neurokern.train --config small --epochs 4                  # synthetic data, CPU
    python -m neurokern.train --config paper --data-root /data/DVS-Lip   # the paper's recipe
    torchrun --nproc_per_node=2 -m neurokern.train --config small        # DistributedDataParallel

The recipe (paper Sec. 3.5 and its public code): Adam (betas 0.9, 0.999), lr 3e-4, global batch
32, one linear warm-up epoch, then constant lr, then cosine annealing to 5e-6 over the last
`--cosine-epochs` (SNN: 100 + 100 epochs; ANN: cosine over all 100), weight decay 1e-4 (Adam's L2
term) on every parameter except batch-norm ones, leaks clamped into [0, 1] after every step.
`--spike-loss LAMBDA` adds the spike loss of eq. 15 (fine-tuning, usually with `--init`).
See docs/training.md.
"""

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as torch_F
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from neurokern import _fileio
from neurokern import data as nkdata
from neurokern import models
from neurokern import report
from neurokern import nn as snn

__all__ = ["main", "parse_args", "build_optimizer", "lr_factor"]

PAPER_EPOCHS = 200          # SNN: 100 constant + 100 cosine (paper Sec. 3.5)
FINAL_LR = 5e-6             # the public code's eta_min of the cosine phase


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to the options whose help does not say its default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m neurokern.train",
        description="Train the SpikGRU2+ lip-reading network (paper Sec. 3.5 recipe).",
        formatter_class=_DefaultsFormatter)
    p.add_argument("--config", default="small", choices=models.CONFIGS,
                   help="model configuration (neurokern.models.get_config)")
    p.add_argument("--data-root", default=None,
                   help="a DVS-Lip folder (train/<word>/*.npy, test/<word>/*.npy); "
                        "synthetic data when omitted")
    p.add_argument("--synthetic-dir", default=None,
                   help="where to write / reuse the synthetic dataset (default: a folder in the "
                        "temp directory named after its parameters)")
    p.add_argument("--synthetic-classes", type=int, default=None,
                   help="classes of the synthetic dataset (default: the config's num_classes)")
    p.add_argument("--synthetic-train", type=int, default=20, help="synthetic samples per class")
    p.add_argument("--synthetic-test", type=int, default=5, help="synthetic test samples per class")
    p.add_argument("--augment", default="paper", choices=("paper", "baseline", "none"),
                   help="training augmentation: the paper's full set (temporal masks scaled to "
                        "T), the baseline (crops and flip), or none (centre crop)")
    p.add_argument("--num-steps", type=int, default=None,
                   help="time steps T per sample (default: the config's num_steps)")
    p.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help="total epochs")
    p.add_argument("--cosine-epochs", type=int, default=None,
                   help="final epochs with cosine-annealed lr (default: half of --epochs for an "
                        "SNN, all of them for the ANN twin)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up epochs")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="stop each epoch after this many steps (default: the whole train set)")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="evaluate on at most this many test batches per process")
    p.add_argument("--batch-size", type=int, default=32,
                   help="global batch size, split over the processes")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--final-lr", type=float, default=FINAL_LR, help="lr at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="Adam L2 weight decay on every parameter except batch-norm ones")
    p.add_argument("--spike-loss", type=float, default=0.0, metavar="LAMBDA",
                   help="add the spike loss (paper eq. 15) with this lambda")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from the model weights of a checkpoint (fine-tuning; fresh "
                        "optimiser and schedule)")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="continue an interrupted run from its checkpoint (OUT/last.pt; when "
                        "it is missing or bad, previous.pt beside it, with a warning)")
    p.add_argument("--out", default="runs/train",
                   help="folder for checkpoints and metrics (a new run refuses one holding a "
                        "run)")
    p.add_argument("--keep-epochs", action="store_true",
                   help="also keep each epoch's checkpoint as epoch<N>.pt (beside last.pt and "
                        "best.pt)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (torch.set_num_threads; default: torch's, which "
                        "is 1 under torchrun unless OMP_NUM_THREADS is set)")
    p.add_argument("--log-every", type=int, default=20, help="progress line every N steps")
    p.add_argument("--sync-bn", action="store_true",
                   help="synchronise batch-norm statistics across processes")
    p.add_argument("--plot", default=None, metavar="RUN_DIR",
                   help="train nothing: draw RUN_DIR/curves.png and RUN_DIR/spike_rates.png "
                        "from a run's metrics.jsonl (needs matplotlib)")
    args = p.parse_args(argv)
    for name, least in (("epochs", 1), ("num_steps", 1), ("steps_per_epoch", 1),
                        ("eval_steps", 1), ("batch_size", 1), ("synthetic_classes", 1),
                        ("synthetic_train", 1), ("synthetic_test", 1), ("log_every", 1),
                        ("num_workers", 0), ("threads", 1), ("warmup_epochs", 0),
                        ("spike_loss", 0), ("final_lr", 0), ("weight_decay", 0)):
        value = getattr(args, name)
        if value is not None and not value >= least:  # (not >=: NaN is refused too)
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    try:
        torch.device(args.device if args.device != "auto" else "cpu")
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    if args.cosine_epochs is not None and not 0 <= args.cosine_epochs <= args.epochs:
        p.error("--cosine-epochs must be in [0, --epochs]")
    if args.resume and args.init:
        p.error("give --resume or --init, not both")
    if args.plot and (args.resume or args.init):
        p.error("--plot draws a finished (or running) run; it trains nothing: give it alone")
    return args


# ---------------------------------------------------------------------------------------------
# Distributed setup
# ---------------------------------------------------------------------------------------------


class _Dist:
    """Process group state; a single process is world size 1, rank 0."""

    def __init__(self, device_arg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank if self.world > 1 else 0)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        self.initialised_here = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.initialised_here = True

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def sum(self, values):
        """Sum a list of floats over processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def _comm_device(self):
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"

    def close(self):
        if self.initialised_here:
            dist.destroy_process_group()


def _print(d, *a):
    if d.main:
        print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _synthetic_root(args, num_classes, d):
    root = Path(args.synthetic_dir) if args.synthetic_dir else Path(tempfile.gettempdir()) / (
        f"neurokern-synthetic-dvslip-c{num_classes}-n{args.synthetic_train}-"
        f"{args.synthetic_test}-s{args.seed}")
    if d.main:                    # written whole or reused; never overwritten
        try:
            nkdata.make_synthetic_dvslip(root, num_classes, args.synthetic_train,
                                         args.synthetic_test, seed=args.seed)
        except ValueError as e:
            raise ValueError(f"--synthetic-dir {e}") from None
    d.barrier()
    return root


def _train_transform(kind, num_steps):
    if kind == "paper":
        transform = nkdata.train_transform()
        if num_steps != 90:
            # The paper's masks (up to 18 of 90 frames, 240 ms) keep their duration at other T;
            # at least 2, so lengths 0 and 1 are drawn (max_length 1 would mask a frame always)
            length = max(2, round(18 * num_steps / 90))
            transform.transforms = [
                nkdata.TemporalMask(masks=6, max_length=length)
                if isinstance(t, nkdata.TemporalMask) else t for t in transform.transforms]
        return transform
    if kind == "baseline":
        return nkdata.Compose([nkdata.CenterCrop(96), nkdata.RandomCrop(88),
                               nkdata.HorizontalFlip(0.5)])
    return nkdata.test_transform()


def build_data(args, config, d):
    steps = args.num_steps or config.num_steps
    if args.data_root:
        root = Path(args.data_root)
    else:
        root = _synthetic_root(args, args.synthetic_classes or config.num_classes, d)
    train_set = nkdata.DVSLip(root, "train", num_steps=steps,
                              transform=_train_transform(args.augment, steps))
    test_set = nkdata.DVSLip(root, "test", num_steps=steps)
    if d.world > 1 and args.batch_size % d.world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the "
                         f"{d.world} processes")
    batch = args.batch_size // d.world
    sampler = DistributedSampler(train_set, d.world, d.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    pin = d.device.type == "cuda"
    train_loader = DataLoader(train_set, batch, sampler=sampler, num_workers=args.num_workers,
                              pin_memory=pin, drop_last=True)
    # (No persistent workers: each epoch's workers are seeded from that epoch's seed, which
    # keeps a resumed run identical to an uninterrupted one.)
    # Each process evaluates its own share of the test set, no padding; counts are summed.
    shard = Subset(test_set, range(d.rank, len(test_set), d.world))
    test_loader = DataLoader(shard, batch, shuffle=False, num_workers=args.num_workers,
                             pin_memory=pin)
    if len(train_loader) == 0:
        raise ValueError(f"the train set ({len(train_set)} samples) is smaller than one batch "
                         f"({batch} per process)")
    return train_set, train_loader, sampler, test_loader


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------


def build_optimizer(model, lr, weight_decay):
    """Adam; weight decay on every parameter except batch-norm weights and biases.

    The paper: "a weight decay of 1e-4 is applied to all parameters, except BN parameters". Its
    public code decays everything else, leaks and biases included (torch.optim.Adam's
    `weight_decay`, an L2 term in the gradient), and so does this."""
    norm, other = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        (norm if isinstance(module, nn.modules.batchnorm._NormBase) else other).extend(params)
    groups = [{"params": other, "weight_decay": weight_decay},
              {"params": norm, "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=lr)


def lr_factor(step, steps_per_epoch, epochs, cosine_epochs, warmup_epochs, final_ratio):
    """Multiplier of the base lr at optimiser step `step` (0-based): a linear warm-up from
    1 / warmup_steps to 1 over `warmup_epochs`, times the base schedule: constant for
    `epochs - cosine_epochs` epochs, then cosine from 1 to `final_ratio`."""
    warmup_steps = warmup_epochs * steps_per_epoch
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    constant_steps = (epochs - cosine_epochs) * steps_per_epoch
    if step < constant_steps or cosine_epochs == 0:
        return warm
    progress = min(1.0, (step - constant_steps) / (cosine_epochs * steps_per_epoch))
    return warm * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------


def _fmt_time(seconds):
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def _bar(done, total, width=20):
    filled = int(width * done / max(total, 1))
    return "#" * filled + "-" * (width - filled)


def _stdout_is_terminal():
    return sys.stdout.isatty()


def _mean_rate(rates):
    """The mean of per-layer spike rates (`{layer: rate}`), None without spiking layers."""
    return sum(rates.values()) / len(rates) if rates else None


class _Progress:
    """What rank 0 shows while training: tqdm bars (the run's epochs, the current epoch's steps)
    when stdout is a terminal, else a plain line every --log-every steps (for logs and pipes).
    Every step: the epoch's running loss and accuracy; every --log-every steps: the mean spike
    rate over the layers of that step's batch ("spikes"); every epoch: the test accuracy, the
    best so far, and the mean test spike rate over the layers ("test_spikes")."""

    def __init__(self, d, args, start_epoch, steps_per_epoch):
        self.shown, self.args, self.steps_per_epoch = d.main, args, steps_per_epoch
        self.bars = d.main and _stdout_is_terminal()
        self.total_steps = args.epochs * steps_per_epoch
        self.started = time.perf_counter()
        self.epochs = tqdm(total=args.epochs, initial=start_epoch, desc="epochs", unit="epoch",
                           file=sys.stdout, dynamic_ncols=True) if self.bars else None
        self.steps = None

    def print(self, text):
        if self.bars:
            tqdm.write(text, file=sys.stdout)
        elif self.shown:
            print(text, flush=True)

    def start_epoch(self, epoch):
        self.epoch, self.window, self.window_steps = epoch, time.perf_counter(), 0
        if self.bars:
            self.steps = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}",
                              unit="step", leave=False, file=sys.stdout, dynamic_ncols=True)

    def wants_spike_rate(self, step):
        """Whether step `step` (0-based) of the epoch reports a spike rate."""
        return self.shown and ((step + 1) % self.args.log_every == 0
                               or step + 1 == self.steps_per_epoch)

    def step(self, step, global_step, loss, spike_loss, acc, lr, spike_rate):
        """After step `step` (0-based) of the epoch; `spike_rate` None when not measured."""
        self.window_steps += 1
        if self.bars:
            stats = dict(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
            if spike_loss is not None:
                stats["spike_loss"] = f"{spike_loss:.4f}"
            if spike_rate is not None:
                stats["spikes"] = f"{spike_rate:.3f}"
            stats["lr"] = f"{lr:.2e}"
            self.steps.set_postfix(stats, refresh=False)
            self.steps.update(1)
            return
        if not self.shown or not (self.window_steps == self.args.log_every
                                  or step + 1 == self.steps_per_epoch):
            return
        now = time.perf_counter()
        rate = self.window_steps / (now - self.window)
        self.window, self.window_steps = now, 0
        print(f"epoch {self.epoch + 1}/{self.args.epochs} [{_bar(step + 1, self.steps_per_epoch)}] "
              f"{step + 1}/{self.steps_per_epoch} loss {loss:.4f} "
              + (f"spike loss {spike_loss:.4f} " if spike_loss is not None else "")
              + f"acc {acc:.3f} "
              + (f"spike rate {spike_rate:.3f} " if spike_rate is not None else "")
              + f"lr {lr:.2e} {rate:.2f} steps/s "
              f"ETA {_fmt_time((self.total_steps - global_step) / rate)} "
              f"(elapsed {_fmt_time(time.perf_counter() - self.started)})", flush=True)

    def end_epoch(self, test_acc, best, spike_rate):
        if self.bars:
            self.steps.close()
            stats = dict(test_acc=f"{test_acc:.3f}", best=f"{best:.3f}")
            if spike_rate is not None:
                stats["test_spikes"] = f"{spike_rate:.3f}"
            self.epochs.set_postfix(stats, refresh=False)
            self.epochs.update(1)

    def close(self):
        if self.bars:
            self.epochs.close()


def _seed_epoch(seed, rank, epoch):
    # Dropout, augmentation and worker seeds of an epoch depend only on (seed, rank, epoch),
    # so a run resumed at an epoch boundary continues exactly as if never interrupted.
    torch.manual_seed((seed * 1_000_003 + rank * 10_007 + epoch) % (2 ** 63))


def train_epoch(model, loader, optimizer, scheduler, args, d, epoch, global_step,
                steps_per_epoch, progress):
    model.train()
    raw = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    use_spikes = args.spike_loss > 0
    loss_sum = spike_sum = correct = seen = 0.0
    lr = optimizer.param_groups[0]["lr"]
    progress.start_epoch(epoch)
    for step, (x, y) in enumerate(loader):
        if step >= steps_per_epoch:
            break
        x = x.to(d.device, non_blocking=True)
        y = y.to(d.device, non_blocking=True)
        measure = progress.wants_spike_rate(step)
        if use_spikes or measure:             # (the same forward pass, plus the spike records)
            logits, records = model(x, return_spikes=True)
        else:
            logits, records = model(x), None
        loss = classification = torch_F.cross_entropy(logits, y)
        if use_spikes:
            sparsity = models.spike_loss(records, args.spike_loss)
            loss = classification + sparsity
            spike_sum += sparsity.item() * y.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]  # this step's (scheduler.step sets the next one's)
        optimizer.step()
        scheduler.step()
        snn.clamp_leaks_(raw)
        global_step += 1
        loss_sum += classification.item() * y.shape[0]
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.shape[0]
        progress.step(step, global_step, loss_sum / seen,
                      spike_sum / seen if use_spikes else None, correct / seen, lr,
                      _mean_rate(models.spike_rates(records)) if measure else None)
    loss_sum, spike_sum, correct, seen = d.sum([loss_sum, spike_sum, correct, seen])
    seen = max(seen, 1)
    return global_step, loss_sum / seen, spike_sum / seen, correct / seen, lr


def _reduce_meter(meter, d):
    """Sum an EfficiencyMeter's counters over processes (same layers on every process)."""
    if d.world == 1:
        return meter
    keys = list(meter.layers)
    sources = list(meter.rates)
    flat = [meter.layers[k]["ops"] for k in keys] + [meter.layers[k]["sample_steps"] for k in keys]
    flat += [meter.rates[s][0] for s in sources] + [meter.rates[s][1] for s in sources]
    flat = d.sum(flat) if flat else flat
    n, m = len(keys), len(sources)
    for i, k in enumerate(keys):
        meter.layers[k]["ops"], meter.layers[k]["sample_steps"] = flat[i], int(flat[n + i])
    for j, s in enumerate(sources):
        meter.rates[s] = (flat[2 * n + j], int(flat[2 * n + m + j]))
    return meter


@torch.no_grad()
def evaluate(model, loader, args, d):
    """Test accuracy and, from the same forward passes, the efficiency summary (spike rates,
    OPs/syn, GOPs/s), over all processes' shares of the test set."""
    model.eval()
    # GOPs/s at the run's T: a sample's T steps span its 1.2 s
    meter = models.EfficiencyMeter(model.config.num_steps / models.SAMPLE_SECONDS)
    correct = seen = 0.0
    for step, (x, y) in enumerate(loader):
        if args.eval_steps is not None and step >= args.eval_steps:
            break
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        logits, records = model(x, return_spikes=True)
        meter.update(records)
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.shape[0]
    correct, seen = d.sum([correct, seen])
    summary = _reduce_meter(meter, d).summary()
    return correct / max(seen, 1), summary


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

# A checkpoint file: this line, a JSON header line {"epoch", "payload_bytes", "sha256"}, then
# the payload: the torch.save bytes of the state dict. The SHA-256 covers "<epoch>
# <payload_bytes>\n" + payload, so a truncated, altered or foreign file is found before it is
# unpickled, and a header can be read without loading the payload.
CHECKPOINT_MAGIC = b"NEUROKERN-CHECKPOINT 1\n"
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "global_step", "config", "args",
               "history")
INIT_KEYS = ("model",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message names the file and what is wrong."""


def _digest(epoch, payload):
    h = hashlib.sha256(f"{epoch} {len(payload)}\n".encode())
    h.update(payload)
    return h.hexdigest()


def checkpoint_bytes(state):
    """The bytes of a checkpoint file holding `state` (a dict with an int "epoch")."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = dict(epoch=state["epoch"], payload_bytes=len(payload),
                  sha256=_digest(state["epoch"], payload))
    return CHECKPOINT_MAGIC + json.dumps(header).encode() + b"\n" + payload


def training_state(model, optimizer, scheduler, epoch, global_step, config, args, history):
    """What a checkpoint holds (`epoch`: epochs completed; `model`: the bare model's)."""
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), epoch=epoch, global_step=global_step,
                config=dataclasses.asdict(config), args=vars(args), history=history)


def verify_checkpoint(path):
    """Check a checkpoint file's header and checksum without unpickling it.

    Returns `(epoch, payload)`; raises FileNotFoundError when it does not exist and
    CheckpointError (naming the file and what is wrong) when it is not a complete checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    data = path.read_bytes()

    def bad(what):
        return CheckpointError(f"checkpoint {path}: {what}")

    if not data:
        raise bad("the file is empty (0 bytes): its write never completed")
    if not data.startswith(CHECKPOINT_MAGIC):
        if CHECKPOINT_MAGIC.startswith(data):
            raise bad(f"truncated after {len(data)} bytes, inside its header")
        if data.startswith(b"PK\x03\x04"):
            raise bad("a plain torch.save file, not a neurokern checkpoint (no checksummed "
                      "header; written by another program or by neurokern.train before "
                      "checkpoints carried a checksum)")
        raise bad(f"not a neurokern checkpoint (it starts with {data[:16]!r})")
    end = data.find(b"\n", len(CHECKPOINT_MAGIC))
    if end < 0:
        raise bad(f"truncated after {len(data)} bytes, inside its header")
    try:
        header = json.loads(data[len(CHECKPOINT_MAGIC):end])
        epoch, size, digest = header["epoch"], header["payload_bytes"], header["sha256"]
        if not (isinstance(epoch, int) and isinstance(size, int) and isinstance(digest, str)):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise bad("its header is corrupt (not the JSON of epoch, payload_bytes, sha256)") from None
    payload = memoryview(data)[end + 1:]
    if len(payload) < size:
        raise bad(f"truncated: {len(payload)} of its {size} payload bytes are there")
    if len(payload) > size:
        raise bad(f"{len(payload) - size} bytes beyond its {size} payload bytes")
    actual = _digest(epoch, payload)
    if actual != digest:
        raise bad(f"checksum mismatch: the SHA-256 of its content is {actual[:16]}..., its "
                  f"header records {digest[:16]}...; the file was corrupted after it was "
                  f"written")
    return epoch, payload


def load_checkpoint(path, device="cpu", keys=RESUME_KEYS):
    """Load a checkpoint written by the trainer (`checkpoint_bytes`), verifying its checksum
    first.

    `keys`: the entries the caller needs (all of a resume's by default). Raises
    FileNotFoundError or CheckpointError (a ValueError naming the file and what is wrong)."""
    epoch, payload = verify_checkpoint(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
    except Exception as e:  # a sound checksum over a payload torch cannot read
        raise CheckpointError(f"checkpoint {path}: its payload does not load "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(state).__name__}, not a "
                              f"training state dict")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: lacks {missing} (has {sorted(state)})")
    if "epoch" in state and state["epoch"] != epoch:
        raise CheckpointError(f"checkpoint {path}: its header says epoch {epoch}, its content "
                              f"{state['epoch']}")
    return state


def _config_from(state):
    fields = dict(state["config"])
    for key, value in fields.items():
        if isinstance(value, list):
            fields[key] = tuple(value)
    return models.ModelConfig(**fields)


# ---------------------------------------------------------------------------------------------
# The run folder: what is written when, and its repair on resume
# ---------------------------------------------------------------------------------------------

# The end of epoch N, in this order (every write atomic: temporary file, fsync, rename, folder
# fsync): epoch<N>.pt (--keep-epochs); the new last.pt's temporary file; last.pt renamed to
# previous.pt; the new one renamed to last.pt (the commit: epoch N is complete once it is
# there); best.pt (when N is the best so far); metrics.jsonl, rewritten whole from the
# checkpoint's history. A kill at any point leaves last.pt (or, between the two
# renames, previous.pt alone) holding the last complete epoch; --resume then rewrites
# metrics.jsonl and restores best.pt from that checkpoint's history (_reconcile_run).
LAST, PREVIOUS, BEST, METRICS = "last.pt", "previous.pt", "best.pt", "metrics.jsonl"


def _warn(d, message):
    if d.main:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _check_writable(out):
    """Create `--out` and check that a file can be written there, before any training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        _fileio.atomic_write(out / ".write-test", b"neurokern")
        (out / ".write-test").unlink()
    except OSError as e:
        if _fileio.is_disk_full(e):
            raise
        raise type(e)(e.errno, f"--out {out} is not a writable folder ({e.strerror})",
                      str(out)) from None


def _best_epoch(history):
    """The first epoch of the highest test accuracy (the one best.pt holds), or None."""
    best, epoch = -1.0, None
    for record in history:
        if record["test_acc"] > best:
            best, epoch = record["test_acc"], record["epoch"]
    return epoch


def _metrics_bytes(history):
    return "".join(json.dumps(record) + "\n" for record in history).encode()


def _open_resume(path, out, d):
    """Load the checkpoint to resume from: `path`, or when it is missing or bad, the previous
    complete checkpoint beside it (previous.pt), saying so. Returns (state, the file used)."""
    path = Path(path)
    try:
        return load_checkpoint(path), path
    except (FileNotFoundError, CheckpointError) as e:
        previous = path.with_name(PREVIOUS)
        if path.name != LAST or not previous.is_file():
            raise
        problem = e
    try:
        state = load_checkpoint(previous)
    except (FileNotFoundError, CheckpointError) as e:
        raise CheckpointError(f"cannot resume: {problem}; and the previous checkpoint is bad "
                              f"too: {e}") from None
    if path.exists() and out.resolve() == path.parent.resolve() and d.main:
        # (out of the way, or the next epoch would rotate it over the good previous.pt)
        os.replace(path, path.with_name(LAST + ".bad"))
        moved = f"; the bad file is kept as {path.with_name(LAST + '.bad')}"
    else:
        moved = ""
    _warn(d, f"cannot resume from {problem}. Resuming from the previous complete checkpoint "
             f"{previous} instead: epoch {state['epoch']}, one epoch earlier{moved}.")
    return state, previous


def _check_out_holds_no_later_run(out, resume_epoch):
    """A new run, or a run resumed at epoch E, never overwrites a run folder that holds more
    (a last.pt of a later epoch)."""
    last = out / LAST
    if resume_epoch is None:
        for held in (last, out / PREVIOUS):
            if held.exists():
                raise ValueError(f"--out {out} already holds a run ({held}); continue it with "
                                 f"--resume {last}, or give another --out (a new run never "
                                 f"overwrites one)")
    if not last.exists():
        return
    epoch, _ = verify_checkpoint(last)
    if epoch > resume_epoch:
        raise ValueError(f"--out {out} holds {last} of epoch {epoch}, later than the resumed "
                         f"epoch {resume_epoch}; give another --out to continue from there "
                         f"(the later epochs are never overwritten)")


def _epoch_of(path):
    """(epoch, None) of a sound checkpoint file, else (None, what is wrong)."""
    try:
        return verify_checkpoint(path)[0], None
    except (FileNotFoundError, CheckpointError) as e:
        return None, str(e)


def _reconcile_run(out, history, source, epoch, d):
    """After a resume at `epoch` (from the file `source`): metrics.jsonl is that checkpoint's
    history, and best.pt holds its best epoch (restored from a checkpoint of that epoch where
    it is missing, bad or another one)."""
    _fileio.atomic_write(out / METRICS, _metrics_bytes(history))
    wanted = _best_epoch(history)
    if wanted is None:
        return
    best = out / BEST
    held, problem = _epoch_of(best)
    if held == wanted:
        return
    why = (f"{best} is missing" if not best.exists() else problem if problem else
           f"{best} holds epoch {held}, not the resumed run's best epoch {wanted}")
    candidates = [source.parent / BEST, out / f"epoch{wanted}.pt",
                  source.parent / f"epoch{wanted}.pt", out / PREVIOUS, source.parent / PREVIOUS]
    if epoch == wanted:
        candidates.insert(0, source)
    for candidate in candidates:
        if candidate.exists() and best.exists() and candidate.samefile(best):
            continue
        if _epoch_of(candidate)[0] == wanted:
            _fileio.atomic_write(best, candidate.read_bytes())
            _warn(d, f"{why}: restored {best} from {candidate} (epoch {wanted})")
            return
    if problem and best.exists():
        os.replace(best, best.with_name(BEST + ".bad"))
    _warn(d, f"{why}, and no checkpoint of epoch {wanted} is left to restore it from; it is "
             f"written again when an epoch beats test accuracy "
             f"{max(h['test_acc'] for h in history):.4f}")


def _commit_epoch(out, data, epoch, history, is_best, keep_epochs):
    """Write epoch `epoch`'s files (`data`: its checkpoint's bytes) in the crash-safe order."""
    if keep_epochs:
        _fileio.atomic_write(out / f"epoch{epoch}.pt", data)

    def keep_previous():          # (once the new one is on disk: a full disk keeps last.pt)
        if (out / LAST).exists():
            _fileio.replace(out / LAST, out / PREVIOUS)

    _fileio.atomic_write(out / LAST, data, before_replace=keep_previous)
    if is_best:
        _fileio.atomic_write(out / BEST, data)
    _fileio.atomic_write(out / METRICS, _metrics_bytes(history))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _format_rates(rates):
    return " ".join(f"{name} {rate:.3f}" for name, rate in rates.items())


def main(argv=None):
    """Run training with command-line arguments `argv` (a list; default `sys.argv[1:]`).

    Returns `{"history": [per-epoch metrics], "out": folder, "model": the trained bare model}`
    (this process's); with `--plot`, `{"plots": [the PNG files written]}`."""
    args = parse_args(argv)
    if args.plot:
        paths = report.plot_run(args.plot)
        print("wrote " + ", ".join(str(path) for path in paths))
        return {"plots": paths}
    if args.threads:
        torch.set_num_threads(args.threads)
    d = _Dist(args.device)
    try:
        return _run(args, d)
    finally:
        d.close()


# Options a resumed run may change: where and how it runs, not what it trains.
RESUME_MAY_CHANGE = frozenset({"resume", "init", "out", "device", "num_workers", "threads",
                               "log_every", "keep_epochs", "eval_steps"})
# Of those, the ones that shape what is recorded: the run's unless given anew, so that a resumed
# run records what the uninterrupted one would have (test accuracy, hence best.pt).
RESUME_KEEPS_UNLESS_GIVEN = frozenset({"keep_epochs", "eval_steps"})


def _resumed_args(args, saved):
    """`args` with every option of the interrupted run restored from its checkpoint (`saved`,
    its `vars(args)`) but those in RESUME_MAY_CHANGE; an option given on the command line with
    another value than the run's raises (a different schedule, data or model would not be a
    continuation)."""
    defaults = vars(parse_args([]))
    for name, value in saved.items():
        if name in RESUME_KEEPS_UNLESS_GIVEN and getattr(args, name) == defaults[name]:
            setattr(args, name, value)
        if name in RESUME_MAY_CHANGE or name not in defaults:
            continue
        given = getattr(args, name)
        if given != defaults[name] and given != value:
            raise ValueError(f"--{name.replace('_', '-')} {given} differs from the resumed "
                             f"run's {value} (--resume continues a run with its own options; "
                             f"use --init to start a new one from its weights)")
        setattr(args, name, value)
    return args


def _run(args, d):
    out = Path(args.out)
    resume, source = _open_resume(args.resume, out, d) if args.resume else (None, None)
    init = load_checkpoint(args.init, keys=INIT_KEYS) if args.init else None
    if resume:                                # the run's options, and its model
        args = _resumed_args(args, resume["args"])
    if d.main:                                # before any training, and before the data
        _check_writable(out)
        _check_out_holds_no_later_run(out, resume["epoch"] if resume else None)
        _fileio.remove_stale_temporaries(out)  # (a killed run's)
    config = _config_from(resume) if resume else models.get_config(args.config)
    if args.num_steps:
        config = config.replace(num_steps=args.num_steps)
    if args.spike_loss > 0 and config.ann:
        raise ValueError("--spike-loss needs a spiking model; the ANN twin has no spikes")

    train_set, train_loader, sampler, test_loader = build_data(args, config, d)
    if len(train_set.classes) != config.num_classes:
        config = config.replace(num_classes=len(train_set.classes))

    torch.manual_seed(args.seed)              # identical initial weights on every process
    model = models.LipReadingNet(config).to(d.device)
    if args.init:
        try:
            model.load_state_dict(init["model"])
        except RuntimeError as e:             # another configuration's weights
            raise CheckpointError(f"checkpoint {args.init}: its weights do not fit the "
                                  f"{args.config!r} model: {str(e)[:500]}") from None
    if d.world > 1 and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw = model
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    steps_per_epoch = len(train_loader)
    if args.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    cosine_epochs = args.cosine_epochs
    if cosine_epochs is None:
        cosine_epochs = args.epochs if config.ann else args.epochs // 2
    optimizer = build_optimizer(raw, args.lr, args.weight_decay)
    final_ratio = args.final_lr / args.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, steps_per_epoch, args.epochs, cosine_epochs, args.warmup_epochs, final_ratio))

    start_epoch, global_step, history = 0, 0, []
    if resume:
        raw.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch, global_step = resume["epoch"], resume["global_step"]
        history = list(resume["history"])
        if d.main:
            _reconcile_run(out, history, source, start_epoch, d)
    _print(d, f"neurokern.train: config {args.config} ({models.count_parameters(raw) / 1e6:.3f} M "
              f"parameters), {len(train_set)} train samples, {len(train_set.classes)} classes, "
              f"T = {config.num_steps}, batch {args.batch_size} over {d.world} process(es) on "
              f"{d.device}, {args.epochs} epochs ({cosine_epochs} cosine) x {steps_per_epoch} "
              f"steps" + (f", resumed after epoch {start_epoch}" if resume else ""))
    best = max((h["test_acc"] for h in history), default=-1.0)
    progress = _Progress(d, args, start_epoch, steps_per_epoch)
    try:
        best = _epochs(args, d, config, out, model, raw, train_loader, sampler, test_loader,
                       optimizer, scheduler, start_epoch, global_step, steps_per_epoch, history,
                       best, progress)
    finally:
        progress.close()
    _print(d, f"done: best test acc {max(best, 0.0):.3f}; checkpoints in {out}")
    return {"history": history, "out": out, "model": raw}


def _epochs(args, d, config, out, model, raw, train_loader, sampler, test_loader, optimizer,
            scheduler, start_epoch, global_step, steps_per_epoch, history, best, progress):
    """Train epochs start_epoch + 1 .. --epochs, appending to `history`; return the best test
    accuracy."""
    for epoch in range(start_epoch, args.epochs):
        _seed_epoch(args.seed, d.rank, epoch)
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        global_step, train_loss, train_spike_loss, train_acc, lr = train_epoch(
            model, train_loader, optimizer, scheduler, args, d, epoch, global_step,
            steps_per_epoch, progress)
        train_time = time.perf_counter() - t0
        if d.world > 1:
            # DDP keeps parameters identical but each process updates its own batch-norm
            # statistics; evaluate and save rank 0's everywhere.
            for buffer in raw.buffers():
                dist.broadcast(buffer.data, 0)
        test_acc, eff = evaluate(raw, test_loader, args, d)
        record = dict(epoch=epoch + 1, step=global_step, train_loss=train_loss,
                      train_spike_loss=train_spike_loss, train_acc=train_acc, test_acc=test_acc,
                      lr=lr, seconds=train_time,
                      seconds_per_step=train_time / max(steps_per_epoch, 1),
                      ops_per_synapse=eff["ops_per_synapse"], gops=eff["gops"],
                      ann_gops=eff["ann_gops"], spike_rates=dict(eff["spike_rates"]))
        history.append(record)
        spikes = f" + spike loss {train_spike_loss:.4f}" if args.spike_loss > 0 else ""
        progress.print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}{spikes} "
                       f"acc {train_acc:.3f} | test acc {test_acc:.3f} | {train_time:.1f} s "
                       f"({record['seconds_per_step']:.3f} s/step)")
        if not config.ann:
            rate = config.num_steps / models.SAMPLE_SECONDS
            progress.print(f"  OPs/syn {eff['ops_per_synapse']:.4f}, {eff['gops']:.3f} GOPs/s "
                           f"at {rate:.1f} steps/s (ANN twin {eff['ann_gops']:.3f}); "
                           f"spike rates: {_format_rates(eff['spike_rates'])}")
        if d.main:
            state = training_state(raw, optimizer, scheduler, epoch + 1, global_step, config,
                                   args, history)
            _commit_epoch(out, checkpoint_bytes(state), epoch + 1, history, test_acc > best,
                          args.keep_epochs)
        best = max(best, test_acc)
        progress.end_epoch(test_acc, best, _mean_rate(eff["spike_rates"]))
        d.barrier()
    return best


if __name__ == "__main__":
    main(sys.argv[1:])
