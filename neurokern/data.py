"""Event data for the paper's lip-reading task (SPEC.md 5): DVS-Lip events to frames, the
training augmentations, a dataset class, and a synthetic DVS-Lip generator.

    from neurokern import data
    frames = data.events_to_frames(events)                     # [90, 2, 128, 128] float32
    train = data.DVSLip(root, "train")                         # ([90, 2, 88, 88], label)
    root = data.make_synthetic_dvslip("/tmp/synthetic-dvslip") # same folder and file format

Frames are count images: `frames[b, c, y, x]` is the number of events of polarity channel `c`
(0 positive, 1 negative) at pixel row `y`, column `x`, in temporal bin `b`. Every transform takes
one sample `[T, 2, H, W]` or a batch `[B, T, 2, H, W]` and never writes to its input (crops
return views; the others return new tensors, or the input itself when they change nothing). The
random draws come from a `torch.Generator` on the CPU, so a seed gives the same result on every
device.
"""

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as torch_F
from torch.utils.data import Dataset, get_worker_info

from neurokern import _fileio

__all__ = [
    "EVENT_DTYPE",
    "SENSOR_SIZE",
    "events_to_frames",
    "load_events",
    "CenterCrop",
    "RandomCrop",
    "HorizontalFlip",
    "Cutout",
    "Zoom",
    "TemporalMask",
    "Compose",
    "train_transform",
    "test_transform",
    "DVSLip",
    "make_synthetic_dvslip",
]

SENSOR_SIZE = 128  # DVS-Lip sensor: 128 x 128 pixels

# Field names and order of a DVS-Lip file (the public code reads a file as rows (t, x, y, p)).
# The readers only rely on the names; these dtypes are what the synthetic generator writes.
EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "u1")])


# The numpy kinds each column may have (b bool, i/u integers, f floats): no strings, bytes,
# datetimes, complex numbers or objects, whose comparisons with numbers fail or mislead.
_COLUMN_KINDS = {"t": "iuf", "x": "biuf", "y": "biuf", "p": "biuf"}


def _check_column_kinds(columns):
    for name, column in zip("txyp", columns):
        if column.dtype.kind not in _COLUMN_KINDS[name]:
            raise ValueError(f"events: {name} must be numeric, got dtype {column.dtype}")
    return columns


def _event_columns(events):
    """(t, x, y, p) numpy arrays from a structured array, a dict, or an `[N, 4]` array."""
    if isinstance(events, torch.Tensor):
        events = events.detach().cpu().numpy()
    if isinstance(events, np.ndarray) and events.dtype.names is not None:
        missing = [f for f in "txyp" if f not in events.dtype.names]
        if missing:
            raise ValueError(
                f"events: structured array lacks field(s) {missing}; expected fields t, x, y, p, "
                f"got {list(events.dtype.names)}"
            )
        for f in "txyp":  # reshape(-1) below would flatten a sub-array into extra events
            if events.dtype[f].shape:
                raise ValueError(f"events: field {f} must hold one value per event, got a "
                                 f"sub-array field of shape {events.dtype[f].shape}")
        return _check_column_kinds(tuple(np.asarray(events[f]).reshape(-1) for f in "txyp"))
    if isinstance(events, dict):
        missing = [f for f in "txyp" if f not in events]
        if missing:
            raise ValueError(f"events: dict lacks key(s) {missing}; expected keys t, x, y, p")
        cols = tuple(np.asarray(events[f]).reshape(-1) for f in "txyp")
        if len({c.shape[0] for c in cols}) != 1:
            raise ValueError(
                f"events: columns t, x, y, p have different lengths {[c.shape[0] for c in cols]}"
            )
        return _check_column_kinds(cols)
    arr = np.asarray(events)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(
            "events must be a structured array with fields t, x, y, p, a dict of those four "
            f"columns, or an [N, 4] array of rows (t, x, y, p); got an array of shape {arr.shape}"
        )
    return _check_column_kinds(tuple(arr[:, i] for i in range(4)))


def _as_index(name, v):
    """Integer pixel coordinates as int64; floats are accepted only when integral."""
    if v.dtype.kind in "iub":
        return v.astype(np.int64)
    if v.dtype.kind != "f":
        raise ValueError(f"events: {name} must be numeric, got dtype {v.dtype}")
    if not np.all(np.isfinite(v)) or np.any(v != np.floor(v)):
        raise ValueError(f"events: {name} must hold integer pixel coordinates")
    return v.astype(np.int64)


def _time_bins(t, num_steps):
    """b = round(t / dt), dt = 40000 / (T / 30) us, computed as the public code does.

    That is `np.round(t / dt)` in float64: ties go to even. For T = 90 this equals the exact
    rational round(t * T / 1.2e6) with ties to even for every integer t (tested); for T whose
    dt is not exact in float64 (T = 35, say) an exact tie can land one bin up, and we keep the
    public code's bin so frames match it bit for bit.
    """
    t = t.astype(np.float64)  # numeric: checked by _event_columns
    if not np.all(np.isfinite(t)):
        raise ValueError("events: t holds NaN or infinite timestamps")
    # clipped to T before the integer cast: a float beyond int64 would wrap into a bin
    return np.minimum(np.round(t / (40_000 / (num_steps / 30))), num_steps).astype(np.int64)


def events_to_frames(events, num_steps=90, height=SENSOR_SIZE, width=SENSOR_SIZE):
    """DVS-Lip events to count frames (SPEC.md 5, paper Sec. 3.3).

        b = round(t / dt),  dt = 40000 / (T / 30) us    (13.3 ms for T = 90; ties to even,
                                                         float64 as the public code)
        frames[b, 0, y, x] += 1  for p == 1   (positive events)
        frames[b, 1, y, x] += 1  for p == 0   (negative events)
        events with b >= T are dropped          (the sample is cut after T * dt = 1.2 s)

    Each event goes to its closest bin whole (the paper does not weight it by its distance to
    the bin, unlike MSTP). Channel 1 holds *positive* counts of negative events. The public code
    stores them as negative numbers (-1 per event); we keep counts because a frame is then
    literally the events a neuromorphic chip would receive, and the sign is immaterial to the
    paper's network: its first layer is a convolution followed by batch norm, and negating one
    input channel is exactly absorbed by negating that channel's weights (the zero padding and
    the bilinear zoom commute with the sign), with a symmetric weight initialisation.

    Args:
        events: a numpy structured array with fields t (us), x, y, p (a DVS-Lip file), a dict
            with those four keys, or an `[N, 4]` array of rows `(t, x, y, p)` (the public code's
            layout). t must be >= 0, p in {0, 1}, 0 <= x < width, 0 <= y < height.
        num_steps: T, the number of bins (90 in the paper).
        height, width: sensor size (128 x 128 for DVS-Lip).

    Returns:
        float32 tensor `[T, 2, H, W]`: rows are y, columns x.
    """
    num_steps = _check_int("num_steps", num_steps, 1)
    height, width = _check_int("height", height, 1), _check_int("width", width, 1)
    t, x, y, p = _event_columns(events)
    x, y = _as_index("x", x), _as_index("y", y)
    frames = torch.zeros(num_steps * 2 * height * width, dtype=torch.float32)
    if t.shape[0] == 0:
        return frames.view(num_steps, 2, height, width)
    if np.any(t < 0):
        raise ValueError(
            f"events: {int(np.sum(t < 0))} event(s) have negative timestamps; t is microseconds "
            "from the start of the sample"
        )
    for name, v, size in (("x", x, width), ("y", y, height)):
        bad = (v < 0) | (v >= size)
        if np.any(bad):
            raise ValueError(
                f"events: {int(bad.sum())} event(s) have {name} outside [0, {size}) "
                f"(range found [{v.min()}, {v.max()}])"
            )
    if p.dtype.kind not in "biuf" or not np.all((p == 0) | (p == 1)):
        raise ValueError(
            "events: polarity p must be 0 (negative) or 1 (positive); found values "
            f"{np.unique(p)[:8].tolist()}"
        )
    b = _time_bins(t, num_steps)
    keep = b < num_steps
    channel = (p[keep] == 0).astype(np.int64)  # p == 1 -> channel 0, p == 0 -> channel 1
    index = ((b[keep] * 2 + channel) * height + y[keep]) * width + x[keep]
    index = torch.from_numpy(index)
    frames.index_put_((index,), torch.ones(index.shape[0]), accumulate=True)
    return frames.view(num_steps, 2, height, width)


def load_events(path):
    """Read one DVS-Lip event file: a `.npy` structured array with fields t, x, y, p.

    Raises FileNotFoundError if the file is missing and ValueError (naming the file) if it is
    not such an array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"event file {path} does not exist")
    try:
        events = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated, not .npy, or a pickled object: all "not an event file"
        raise ValueError(
            f"{path}: not a readable .npy event file ({type(e).__name__}: {e}); expected a numpy "
            "structured array with fields t, x, y, p"
        ) from None
    if not isinstance(events, np.ndarray) or events.dtype.names is None or events.ndim != 1:
        raise ValueError(
            f"{path}: expected a 1-D numpy structured array with fields t, x, y, p, got an "
            f"array of dtype {events.dtype} and shape {events.shape}"
        )
    try:
        _event_columns(events)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return events


def _as_batch(frames):
    """`[T, 2, H, W]` -> (`[1, T, 2, H, W]`, True); `[B, T, 2, H, W]` -> (itself, False)."""
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dim() == 4:
        return frames.unsqueeze(0), True
    if frames.dim() == 5:
        return frames, False
    raise ValueError(
        f"frames must be [T, 2, H, W] or [B, T, 2, H, W], got shape {list(frames.shape)}"
    )


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _center_offset(total, size):
    # torchvision's CenterCrop rule (the public code uses it): round((total - size) / 2),
    # with Python's round, ties to even.
    return int(round((total - size) / 2.0))


def _mix_seed(*values):
    return int(np.random.SeedSequence([v & 0xFFFF_FFFF_FFFF_FFFF for v in values])
               .generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF


class _RandomTransform:
    """Base of the random transforms: where the random draws come from.

    `seed` (an int) or `generator` (a `torch.Generator` on the CPU) make the draws
    reproducible; with neither, they come from torch's global generator (`torch.manual_seed`).
    In a DataLoader worker process a seeded transform reseeds itself once per worker from its
    seed and the worker's seed, so workers do not repeat each other's (or the previous epoch's)
    augmentations, and a run with a seeded DataLoader stays reproducible.
    """

    def __init__(self, seed=None, generator=None):
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if generator is not None:
            if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
                raise TypeError("generator must be a torch.Generator on the CPU")
            self._seed = generator.initial_seed()
        elif seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
            self._seed = int(seed)
            generator = torch.Generator().manual_seed(_mix_seed(self._seed))
        else:
            self._seed = None
        self._generator = generator
        self._worker_seed = None

    def _gen(self):
        if self._generator is None:
            return None
        info = get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._generator.manual_seed(_mix_seed(self._seed, info.seed))
            self._worker_seed = info.seed
        return self._generator

    def _randint(self, low, high, shape):
        """Integers drawn uniformly in [low, high), a CPU int64 tensor of `shape`."""
        return torch.randint(low, high, shape, generator=self._gen())

    def _below(self, high):
        """One integer uniformly in [0, high[i]) per element of the int64 tensor `high`."""
        u = torch.rand(high.shape, generator=self._gen(), dtype=torch.float64)
        return torch.minimum((u * high).long(), high - 1)

    def _rand(self, shape):
        return torch.rand(shape, generator=self._gen(), dtype=torch.float64)

    def __repr__(self):
        return f"{type(self).__name__}({self._extra_repr()})"

    def _extra_repr(self):
        return ""


class CenterCrop:
    """Crop the central `size x size` pixels of every frame.

    The offset is `round((H - size) / 2)` (ties to even, as torchvision's CenterCrop): 20 for
    128 -> 88, 16 for 128 -> 96.

    Shapes: `[T, 2, H, W]` -> `[T, 2, size, size]`, or batched `[B, T, 2, H, W]`. Returns a view.
    """

    def __init__(self, size):
        self.size = _check_int("size", size, 1)

    def __call__(self, frames):
        _as_batch(frames)
        h, w = frames.shape[-2:]
        if self.size > h or self.size > w:
            raise ValueError(
                f"CenterCrop({self.size}) needs frames at least that large, got {h}x{w}")
        top, left = _center_offset(h, self.size), _center_offset(w, self.size)
        return frames[..., top:top + self.size, left:left + self.size]

    def __repr__(self):
        return f"CenterCrop({self.size})"


class RandomCrop(_RandomTransform):
    """Crop `size x size` pixels at a random offset, the same for all frames of a sample.

    Top and left offsets are drawn uniformly in [0, H - size] and [0, W - size] (inclusive, as
    torchvision's RandomCrop), independently per sample of a batch.

    Shapes: `[T, 2, H, W]` -> `[T, 2, size, size]`, or batched `[B, T, 2, H, W]`.
    """

    def __init__(self, size, seed=None, generator=None):
        super().__init__(seed, generator)
        self.size = _check_int("size", size, 1)

    def __call__(self, frames):
        x, single = _as_batch(frames)
        h, w = x.shape[-2:]
        if self.size > h or self.size > w:
            raise ValueError(
                f"RandomCrop({self.size}) needs frames at least that large, got {h}x{w}")
        top = self._randint(0, h - self.size + 1, (x.shape[0],)).tolist()
        left = self._randint(0, w - self.size + 1, (x.shape[0],)).tolist()
        s = self.size
        crops = [x[i, ..., t:t + s, l:l + s] for i, (t, l) in enumerate(zip(top, left))]
        return crops[0] if single else torch.stack(crops)  # one sample: a view, no copy

    def _extra_repr(self):
        return str(self.size)


class HorizontalFlip(_RandomTransform):
    """Mirror the frames left-right (x -> W - 1 - x) with probability `p`, per sample.

    Shapes: `[T, 2, H, W]` or `[B, T, 2, H, W]`, unchanged.
    """

    def __init__(self, p=0.5, seed=None, generator=None):
        super().__init__(seed, generator)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, frames):
        x, single = _as_batch(frames)
        flip = self._rand((x.shape[0],)) < self.p  # [B]
        if single:
            return frames.flip(-1) if flip[0] else frames
        if not flip.any():
            return frames
        out = x.clone()
        index = flip.nonzero().view(-1).to(x.device)
        out[index] = x[index].flip(-1)
        return out

    def _extra_repr(self):
        return f"p={self.p}"


class Cutout(_RandomTransform):
    """Zero `holes` square patches of every frame (spatial masking, paper Sec. 3.4).

    For each hole: centre (cy, cx) uniform over the frame, side L drawn in [1, max_side); the
    hole covers rows [cy - L//2, cy - L//2 + L) and the same columns, clipped to the frame.
    The holes are the same for all T frames and both polarity channels of a sample (as in the
    public code) and drawn independently per sample of a batch; they may overlap.

    Difference from the public code (NDA-SNN's Cutout), which zeroes
    [c - L//2, c + L//2): a side of 2 * (L // 2), so an odd L loses a pixel and L = 1 cuts
    nothing. Here a hole has side L exactly, as the paper describes.

    Shapes: `[T, 2, H, W]` or `[B, T, 2, H, W]`, unchanged.
    """

    def __init__(self, holes=4, max_side=20, seed=None, generator=None):
        super().__init__(seed, generator)
        self.holes = _check_int("holes", holes, 0)
        self.max_side = _check_int("max_side", max_side, 2)  # sides are drawn in [1, max_side)

    def boxes(self, batch, height, width):
        """Draw the holes: int64 `[B, holes, 4]` rows (top, left, bottom, right), clipped,
        bottom/right exclusive."""
        shape = (batch, self.holes)
        cy = self._randint(0, height, shape)
        cx = self._randint(0, width, shape)
        side = self._randint(1, self.max_side, shape)
        top, left = cy - side // 2, cx - side // 2
        return torch.stack([
            top.clamp(0, height), left.clamp(0, width),
            (top + side).clamp(0, height), (left + side).clamp(0, width),
        ], dim=-1)

    def __call__(self, frames):
        x, single = _as_batch(frames)
        h, w = x.shape[-2:]
        box = self.boxes(x.shape[0], h, w).to(x.device)  # [B, holes, 4]
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_rows = (rows >= box[..., 0:1]) & (rows < box[..., 2:3])  # [B, holes, H]
        in_cols = (cols >= box[..., 1:2]) & (cols < box[..., 3:4])  # [B, holes, W]
        hole = (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).any(dim=1)  # [B, H, W]
        out = x.masked_fill(hole[:, None, None], 0)
        return out[0] if single else out

    def _extra_repr(self):
        return f"holes={self.holes}, max_side={self.max_side}"


class Zoom(_RandomTransform):
    """Random zoom in or out to `size x size` (paper Sec. 3.4: up to 30% of the spatial size).

    With probability `p_in`, zoom in: centre-crop a side drawn in [size - max_scale, size)
    ([62, 88) by default) and resize it to `size`. Otherwise zoom out: pad every border with
    zeros by a width drawn in [0, max_scale) ([0, 26)) and resize to `size`. Resizing is
    bilinear without antialiasing (`align_corners=False`), what torchvision 0.14's Resize does
    on tensors in the public code; counts become fractional. Drawn per sample of a batch.

    Shapes: `[T, 2, H, W]` -> `[T, 2, size, size]`, or batched `[B, T, 2, H, W]`. The input
    should be `size x size` (the 88 x 88 random crop), as in the public code.
    """

    def __init__(self, p_in=0.5, max_scale=26, size=88, seed=None, generator=None):
        super().__init__(seed, generator)
        if not 0.0 <= p_in <= 1.0:
            raise ValueError(f"p_in must be in [0, 1], got {p_in}")
        self.size = _check_int("size", size, 2)
        self.max_scale = _check_int("max_scale", max_scale, 1)
        if self.max_scale >= self.size:
            raise ValueError(f"max_scale must be < size = {self.size}, got {max_scale}")
        self.p_in = float(p_in)

    def draw(self, batch):
        """Draw the zooms: `(zoom_in [B] bool, amount [B] int64)`; amount is the crop side when
        zooming in, the padding when zooming out."""
        zoom_in = self._rand((batch,)) < self.p_in
        side = self._randint(self.size - self.max_scale, self.size, (batch,))
        pad = self._randint(0, self.max_scale, (batch,))
        return zoom_in, torch.where(zoom_in, side, pad)

    def __call__(self, frames):
        x, single = _as_batch(frames)
        h, w = x.shape[-2:]
        zoom_in, amount = self.draw(x.shape[0])
        out = []
        for i, (inward, a) in enumerate(zip(zoom_in.tolist(), amount.tolist())):
            sample = x[i]  # [T, 2, h, w]
            if inward:
                if a > h or a > w:
                    raise ValueError(f"Zoom: cannot crop {a}x{a} from {h}x{w} frames")
                top, left = _center_offset(h, a), _center_offset(w, a)
                sample = sample[..., top:top + a, left:left + a]
            elif a > 0:
                sample = torch_F.pad(sample, (a, a, a, a))
            if sample.shape[-2:] != (self.size, self.size):
                sample = torch_F.interpolate(
                    sample, size=(self.size, self.size), mode="bilinear", align_corners=False,
                    antialias=False,
                )
            out.append(sample)
        out = torch.stack(out)
        return out[0] if single else out

    def _extra_repr(self):
        return f"p_in={self.p_in}, max_scale={self.max_scale}, size={self.size}"


class TemporalMask(_RandomTransform):
    """Zero several runs of whole frames (temporal masking, paper Sec. 3.4, Table 4).

    For each of `masks` masks: length L drawn in [0, max_length), start drawn in [0, T - L);
    frames [start, start + L) become zero (both channels, all pixels). Masks may overlap, so
    at most masks * (max_length - 1) frames are zeroed (6 * 17 = 102 >= T = 90 by default).
    As in the public code the last frame is never masked (start + L <= T - 1), and
    max_length = 1 means L = 1 (but L = 0 for T = 1). With T < max_length, L is drawn in
    [0, T) instead.
    Drawn per sample of a batch.

    Shapes: `[T, 2, H, W]` or `[B, T, 2, H, W]`, unchanged.
    """

    def __init__(self, masks=6, max_length=18, seed=None, generator=None):
        super().__init__(seed, generator)
        self.masks = _check_int("masks", masks, 0)
        self.max_length = _check_int("max_length", max_length, 1)

    def spans(self, batch, num_steps):
        """Draw the masks: int64 `[B, masks, 2]` rows (start, end), end exclusive."""
        shape = (batch, self.masks)
        if self.max_length == 1:
            length = torch.ones(shape, dtype=torch.int64)
        else:
            length = self._randint(0, max(1, min(self.max_length, num_steps)), shape)
        length = length.clamp(max=max(num_steps - 1, 0))  # T = 1: its frame is the last
        start = self._below((num_steps - length).clamp(min=1))
        return torch.stack([start, start + length], dim=-1)

    def __call__(self, frames):
        x, single = _as_batch(frames)
        span = self.spans(x.shape[0], x.shape[1]).to(x.device)  # [B, masks, 2]
        steps = torch.arange(x.shape[1], device=x.device)
        masked = ((steps >= span[..., 0:1]) & (steps < span[..., 1:2])).any(dim=1)  # [B, T]
        out = x.masked_fill(masked[:, :, None, None, None], 0)
        return out[0] if single else out

    def _extra_repr(self):
        return f"masks={self.masks}, max_length={self.max_length}"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, frames):
        for t in self.transforms:
            frames = t(frames)
        return frames

    def __repr__(self):
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


def train_transform(seed=None):
    """The paper's training augmentation, in the public code's order (Sec. 3.4):

    baseline: CenterCrop(96), RandomCrop(88), HorizontalFlip(0.5);
    spatial: Cutout(4 holes, side in [1, 20)), Zoom(in with p = 0.5: crop in [62, 88); out:
    pad in [0, 26); resized to 88); temporal: TemporalMask(6 masks, length in [0, 18)).

    `[T, 2, 128, 128]` -> `[T, 2, 88, 88]`. `seed` (an int) makes it reproducible: each random
    transform gets its own generator seeded from it; None draws from torch's global generator.
    """
    if seed is None:
        seeds = [None] * 5
    else:
        sequence = np.random.SeedSequence(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        seeds = [int(s) for s in sequence.generate_state(5, np.uint32)]
    return Compose([
        CenterCrop(96),
        RandomCrop(88, seed=seeds[0]),
        HorizontalFlip(0.5, seed=seeds[1]),
        Cutout(holes=4, max_side=20, seed=seeds[2]),
        Zoom(p_in=0.5, max_scale=26, size=88, seed=seeds[3]),
        TemporalMask(masks=6, max_length=18, seed=seeds[4]),
    ])


def test_transform():
    """The paper's test preprocessing: CenterCrop(88), `[T, 2, 128, 128]` -> `[T, 2, 88, 88]`."""
    return Compose([CenterCrop(88)])


def _natural_key(name):
    # "2.npy" before "10.npy": DVS-Lip names its samples 0.npy, 1.npy, ...
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


class DVSLip(Dataset):
    """A DVS-Lip folder (Tan et al., CVPR 2022) as `(frames, label)` samples.

    Layout: `root/<split>/<word>/<sample>.npy`, one numpy structured array of events
    (fields t [us], x, y, p) per file. The classes are the word folder names, sorted (the 100
    words of DVS-Lip, in the same order as the public code's label list, which is alphabetical);
    samples are ordered by word, then by file name in natural order.

    Args:
        root: the dataset folder holding `train/` and `test/`.
        split: the subfolder to read ("train" or "test").
        num_steps: T, the number of temporal bins (90 in the paper).
        transform: applied to each `[T, 2, 128, 128]` frame tensor; default `train_transform()`
            for split "train" (randomness from torch's global generator, which DataLoader seeds
            per worker) and `test_transform()` otherwise.

    `dataset[i]` is `(frames [T, 2, 88, 88] float32, label int)` with the default transforms.
    Attributes: `classes` (word names), `class_to_idx`, `samples` (list of (path, label)),
    `targets` (labels).

    Raises FileNotFoundError when `root/<split>` does not exist, holds no word folders, or a word
    folder holds no `.npy` file; ValueError (naming the file) when a file is not an event array.
    """

    def __init__(self, root, split="train", num_steps=90, transform=None):
        self.root = Path(root)
        self.split = split
        self.num_steps = _check_int("num_steps", num_steps, 1)
        folder = self.root / split
        expected = f"expected DVS-Lip layout {self.root}/{split}/<word>/<sample>.npy"
        if not folder.is_dir():
            raise FileNotFoundError(f"DVS-Lip split folder {folder} does not exist; {expected}")
        words = sorted(
            d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not words:
            found = sorted(e.name for e in folder.iterdir())[:5]
            raise FileNotFoundError(
                f"DVS-Lip split folder {folder} holds no word folders (found {found}); {expected}"
            )
        self.classes = words
        self.class_to_idx = {w: i for i, w in enumerate(words)}
        self.samples = []
        for label, word in enumerate(words):
            files = sorted(
                (f for f in (folder / word).iterdir() if f.suffix == ".npy" and f.is_file()),
                key=lambda f: _natural_key(f.name),
            )
            if not files:
                raise FileNotFoundError(
                    f"DVS-Lip word folder {folder / word} holds no .npy event files; {expected}"
                )
            self.samples.extend((f, label) for f in files)
        self.targets = [label for _, label in self.samples]
        if transform is None:
            transform = train_transform() if split == "train" else test_transform()
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        events = load_events(path)
        try:
            frames = events_to_frames(events, self.num_steps, SENSOR_SIZE, SENSOR_SIZE)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if self.transform is not None:
            frames = self.transform(frames)
        return frames, label

    def __repr__(self):
        return (f"DVSLip(root={str(self.root)!r}, split={self.split!r}, samples={len(self)}, "
                f"classes={len(self.classes)}, num_steps={self.num_steps})")


_SPEEDS = (22.0, 50.0)  # px/s, slow and fast
_EVENTS_PER_PX2 = 2.0   # edge events per pixel swept by the blob outline
_NOISE_RATE = 300.0     # background events per second, uniform over the sensor


def _class_motion(num_classes):
    """Per class: (direction angle in radians, speed in px/s).

    The classes must survive the training augmentation's horizontal flip, which maps a
    velocity (vx, vy) to (-vx, vy); so a class fixes (|vx|, vy), i.e. an angle in
    [-90, +90] degrees from +x, and each sample moves left or right at random. With 4 classes
    or more there are two speeds (the fast half also makes 2.3x more events) and
    ceil(K / 2) directions spread evenly over [-90, +90] degrees.
    """
    speeds = _SPEEDS if num_classes >= 4 else (36.0,)
    directions = math.ceil(num_classes / len(speeds))
    out = []
    for k in range(num_classes):
        d, s = k % directions, k // directions
        angle = 0.0 if directions == 1 else -math.pi / 2 + math.pi * d / (directions - 1)
        out.append((angle, speeds[s]))
    return out


def _synthetic_sample(rng, angle, speed, size=SENSOR_SIZE):
    """Events of one moving disc (structured array, EVENT_DTYPE, sorted by t).

    A bright disc of radius r moves in a straight line through the sensor's centre region for
    1.2-1.5 s. Pixels its leading edge enters fire positive events, pixels its trailing edge
    leaves fire negative ones, at a rate proportional to the edge's normal speed (the outline
    point at angle phi from the motion direction fires in proportion to |cos phi|); plus
    uniform background noise of random polarity.
    """
    duration = rng.uniform(1.2, 1.5)  # s
    angle = angle + rng.normal(0.0, math.radians(5.0))
    speed = speed * rng.uniform(0.85, 1.15)
    v = speed * np.array([math.cos(angle), math.sin(angle)])
    if rng.random() < 0.5:
        v[0] = -v[0]  # left or right at random: the class is flip-invariant
    direction = math.atan2(v[1], v[0])
    radius = rng.uniform(10.0, 15.0)
    centre = size / 2 + rng.uniform(-6.0, 6.0, size=2)

    n_edge = rng.poisson(_EVENTS_PER_PX2 * 2 * radius * speed * duration)
    t = rng.uniform(0.0, duration, n_edge)
    positive = rng.random(n_edge) < 0.5
    # density of phi proportional to cos(phi - direction) on the leading half: arcsin of uniform
    phi = direction + np.arcsin(rng.uniform(-1.0, 1.0, n_edge)) + np.where(positive, 0.0, math.pi)
    rho = radius + rng.normal(0.0, 0.7, n_edge)
    pos = centre + np.outer(t - duration / 2, v)  # [n, 2] disc centre at each event
    ex = pos[:, 0] + rho * np.cos(phi)
    ey = pos[:, 1] + rho * np.sin(phi)

    n_noise = rng.poisson(_NOISE_RATE * duration)
    t = np.concatenate([t, rng.uniform(0.0, duration, n_noise)])
    ex = np.concatenate([ex, rng.uniform(0, size, n_noise)])
    ey = np.concatenate([ey, rng.uniform(0, size, n_noise)])
    positive = np.concatenate([positive, rng.random(n_noise) < 0.5])

    ex, ey = np.floor(ex), np.floor(ey)
    inside = (ex >= 0) & (ex < size) & (ey >= 0) & (ey < size)
    order = np.argsort(t[inside], kind="stable")
    events = np.empty(int(inside.sum()), dtype=EVENT_DTYPE)
    events["t"] = np.round(t[inside][order] * 1e6)
    events["x"] = ex[inside][order]
    events["y"] = ey[inside][order]
    events["p"] = positive[inside][order]
    return events


SYNTHETIC_MARKER = ".complete"  # the parameters of a complete synthetic set, written last


def make_synthetic_dvslip(root, num_classes=10, train_per_class=20, test_per_class=5,
                          num_steps=90, seed=0):
    """Write a synthetic dataset in DVS-Lip's folder and file format; return its root.

    `root/{train,test}/classNN/<i>.npy`, each file a structured array of events (EVENT_DTYPE:
    t [us], x, y, p) from a disc moving across the 128 x 128 sensor for 1.2-1.5 s: a few
    thousand events, positive at its leading edge and negative at its trailing edge, plus
    background noise. The class sets the motion: its direction up to a left-right mirror
    (so the horizontal flip augmentation keeps the label valid) and, with 4 classes or more,
    its speed (slow or fast). Each sample varies: direction +-5 degrees, speed +-15%, radius
    10-15 px, start position, duration, left or right, noise.

    Sample `(split, class, i)` depends only on `(seed, split, class, i)`, so the same seed
    writes the same files whatever the other sizes. The events do not depend on `num_steps`:
    frames of any T cover the same 1.2 s (dt = 40 ms * 30 / T), so one folder serves every T;
    the argument is accepted (and checked) so callers can pass the T they will read with.

    The set is written whole or not at all: into a scratch folder beside `root`, every file
    fsync'ed, then renamed to `root` (which must be missing or empty); `root/.complete` records
    the parameters. A folder already holding the set of the same parameters is reused as it is;
    one holding another set, or other files, is an error (ValueError), never overwritten. The
    scratch folder of a killed call is deleted by the next call; a full disk raises
    OSError(ENOSPC) naming the file.

    Returns:
        `pathlib.Path` of `root`, ready for `DVSLip(root, "train")`.
    """
    num_classes = _check_int("num_classes", num_classes, 1)
    splits = (("train", _check_int("train_per_class", train_per_class, 0)),
              ("test", _check_int("test_per_class", test_per_class, 0)))
    _check_int("num_steps", num_steps, 1)
    root = Path(root)
    params = dict(classes=num_classes, train_per_class=splits[0][1],
                  test_per_class=splits[1][1], seed=int(seed))
    if _synthetic_set_of(root, params):
        return root
    width = len(str(num_classes - 1))
    motion = _class_motion(num_classes)

    def fill(scratch):
        for split_id, (split, count) in enumerate(splits):
            for k, (angle, speed) in enumerate(motion):
                folder = scratch / split / f"class{k:0{width}d}"
                folder.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, split_id, k, i])
                    buffer = io.BytesIO()
                    np.save(buffer, _synthetic_sample(rng, angle, speed))
                    _fileio.write_new(folder / f"{i}.npy", buffer.getbuffer())
        _fileio.write_new(scratch / SYNTHETIC_MARKER, json.dumps(params).encode())

    if not _fileio.build_folder(root, fill):  # another process wrote it first
        _synthetic_set_of(root, params)
    return root


def _synthetic_set_of(root, params):
    """True if `root` holds the complete synthetic set of `params`, False if it is missing or an
    empty folder; ValueError otherwise."""
    marker = root / SYNTHETIC_MARKER
    if marker.is_file():
        text = marker.read_text().strip()
        if text and json.loads(text) != params:  # (an empty marker: neurokern before 2026-11)
            raise ValueError(f"{root} holds a synthetic dataset of {text}, not the requested "
                             f"{json.dumps(params)}; choose another folder")
        return True
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root} exists and is not a synthetic dataset written by neurokern "
                         f"(no {SYNTHETIC_MARKER}); give an empty or new folder")
    return False
