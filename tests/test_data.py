"""Event data (SPEC.md 5): events to frames, augmentations, the DVSLip dataset, and the
synthetic generator."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neurokern import data
from neurokern.data import (
    EVENT_DTYPE, CenterCrop, Compose, Cutout, DVSLip, HorizontalFlip, RandomCrop, TemporalMask,
    Zoom, events_to_frames, make_synthetic_dvslip, test_transform, train_transform,
)

test_transform.__test__ = False  # a transform factory, not a test for pytest to collect


def make_events(rows):
    """Structured events from rows (t, x, y, p)."""
    return np.array([tuple(r) for r in rows], dtype=EVENT_DTYPE)


def public_bin(t, num_steps):
    """The public code's bin: np.round(t / dt) in float64, dt = 40000 / (T / 30) us."""
    return int(np.round(float(t) / (4e4 / (num_steps / 30))))


def exact_bins(t, num_steps):
    """round(t * T / 1.2e6) in exact integer arithmetic, ties to even (t: int64 array)."""
    q, r = np.divmod(t * num_steps, 1_200_000)
    return q + (2 * r > 1_200_000) + ((2 * r == 1_200_000) & (q % 2 == 1))


def reference_frames(rows, num_steps, height, width):
    """Per-event loop: the semantics of SPEC.md 5 written plainly."""
    out = np.zeros((num_steps, 2, height, width), np.float32)
    for t, x, y, p in rows:
        b = public_bin(t, num_steps)
        if b < num_steps:
            out[b, 0 if p == 1 else 1, y, x] += 1
    return torch.from_numpy(out)


def coordinate_frames(num_steps=3, height=128, width=128):
    """frames[b, c, y, x] = 1 + 1e6 b + 1e5 c + 1000 y + x: every element names its position."""
    b = torch.arange(num_steps).view(-1, 1, 1, 1)
    c = torch.arange(2).view(1, -1, 1, 1)
    y = torch.arange(height).view(1, 1, -1, 1)
    x = torch.arange(width).view(1, 1, 1, -1)
    return (1 + 1_000_000 * b + 100_000 * c + 1000 * y + x).to(torch.float64)


# ------------------------------------------------------------------------------ events to frames

def test_single_events_land_where_expected():
    events = make_events([
        (0, 5, 3, 1),           # bin 0, positive -> channel 0, row y=3, column x=5
        (0, 5, 3, 1),           # counts accumulate
        (13_333, 100, 2, 0),    # 13333 / 13333.33 = 0.99997 -> bin 1, negative -> channel 1
        (26_667, 127, 127, 1),  # 2.000025 -> bin 2, the last pixel
    ])
    frames = events_to_frames(events)
    assert frames.shape == (90, 2, 128, 128) and frames.dtype == torch.float32
    assert frames[0, 0, 3, 5] == 2
    assert frames[1, 1, 2, 100] == 1  # rows are y, columns are x
    assert frames[2, 0, 127, 127] == 1
    assert frames.sum() == 4
    assert (frames >= 0).all()  # negative events are counted positively


@pytest.mark.parametrize("t, expected", [
    (6_666, 0), (6_667, 1),              # 0.49995 / 0.500025
    (20_000, 2), (60_000, 4), (100_000, 8),  # exact ties 1.5, 4.5, 7.5: to even
    (1_180_000, 88),                     # 88.5: to even
    (1_193_333, 89),                     # 89.499975: the last bin
])
def test_binning_boundaries_and_ties_to_even(t, expected):
    frames = events_to_frames(make_events([(t, 1, 1, 1)]), num_steps=90)
    assert frames.sum() == 1
    assert frames[expected, 0, 1, 1] == 1


@pytest.mark.parametrize("t", [1_193_334, 1_200_000, 5_000_000])
def test_events_past_last_bin_are_dropped(t):
    # 1193334 us is 89.50005 bins: bin 90 >= T, beyond the 1.2 s window
    frames = events_to_frames(make_events([(t, 1, 1, 1), (0, 2, 2, 0)]), num_steps=90)
    assert frames.sum() == 1 and frames[0, 1, 2, 2] == 1


@pytest.mark.parametrize("t", [1e24, 1e30])
def test_float_timestamps_beyond_int64_are_dropped(t):
    """Such a bin, cast to int64 unclipped, wrapped around into the sample (bin 0)."""
    events = dict(t=np.array([t, 0.0]), x=np.array([1, 2]), y=np.array([1, 2]),
                  p=np.array([1, 0]))
    frames = events_to_frames(events, num_steps=2, height=4, width=4)
    assert frames.sum() == 1 and frames[0, 1, 2, 2] == 1


def test_bin_width_follows_num_steps():
    # T = 30: dt = 40 ms; 20 ms is a tie (0.5 -> 0), 60 ms too (1.5 -> 2), 1.18 s is bin 29 + 0.5
    events = make_events([(20_000, 0, 0, 1), (60_000, 0, 0, 1), (1_180_000, 0, 0, 1),
                          (1_180_001, 0, 0, 0)])
    frames = events_to_frames(events, num_steps=30)
    assert frames.shape == (30, 2, 128, 128)
    assert frames[0, 0, 0, 0] == 1 and frames[2, 0, 0, 0] == 1
    assert frames[29, 0, 0, 0] == 0  # 29.5 -> 30 (even) -> dropped
    assert frames[:, 1].sum() == 0   # 29.500025 -> 30 -> dropped
    assert frames.sum() == 2


def test_input_layouts_agree():
    rows = [(0, 1, 2, 1), (40_000, 3, 4, 0), (80_000, 5, 6, 1)]
    structured = make_events(rows)
    reordered = structured[["p", "y", "x", "t"]]  # field order does not matter, names do
    as_dict = {k: structured[k] for k in "txyp"}
    as_rows = np.array(rows, dtype=np.int64)
    expected = events_to_frames(structured, 30, 8, 8)
    for events in (reordered, as_dict, as_rows, as_rows.astype(np.float64), torch.tensor(rows)):
        assert torch.equal(events_to_frames(events, 30, 8, 8), expected)


def test_empty_events_give_zero_frames():
    frames = events_to_frames(np.zeros(0, EVENT_DTYPE), num_steps=4, height=3, width=5)
    assert frames.shape == (4, 2, 3, 5) and frames.sum() == 0


@given(
    num_steps=st.integers(1, 120),
    rows=st.lists(st.tuples(st.integers(0, 1_600_000), st.integers(0, 6), st.integers(0, 4),
                            st.integers(0, 1)), max_size=60),
    ties=st.lists(st.integers(0, 200), max_size=5),
)
def test_matches_per_event_reference(num_steps, rows, ties):
    # add exact ties t = (k + 1/2) dt where they are whole microseconds
    for k in ties:
        num = (2 * k + 1) * 600_000
        if num % num_steps == 0:
            rows.append((num // num_steps, 0, 0, 1))
    events = make_events(rows) if rows else np.zeros(0, EVENT_DTYPE)
    assert torch.equal(events_to_frames(events, num_steps, 5, 7),
                       reference_frames(rows, num_steps, 5, 7))


def test_paper_setting_bins_are_exact_rounding_ties_to_even():
    # For T = 90 the public float formula is the exact round(t / dt), ties to even, for every
    # microsecond of the 1.2 s window and beyond.
    t = np.arange(0, 1_300_000, dtype=np.int64)
    public = np.round(t / (4e4 / (90 / 30))).astype(np.int64)
    assert np.array_equal(public, exact_bins(t, 90))


def test_float_timestamps_bin_like_integers():
    t = np.array([0, 6_666, 6_667, 20_000, 1_193_333], dtype=np.int64)
    rows = np.stack([t, t % 7, t % 5, t % 2], 1)
    assert torch.equal(events_to_frames(rows.astype(np.float64), 90, 5, 7),
                       events_to_frames(rows, 90, 5, 7))


@pytest.mark.parametrize("rows, match", [
    ([(0, 128, 0, 1)], "x outside"),
    ([(0, 0, -1, 1)], "y outside"),
    ([(0, 0, 0, 2)], "polarity"),
    ([(-5, 0, 0, 1)], "negative timestamps"),
])
def test_bad_events_raise(rows, match):
    events = np.array(rows, dtype=[("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "<i2")])
    with pytest.raises(ValueError, match=match):
        events_to_frames(events)


def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="lacks field"):
        events_to_frames(np.zeros(3, dtype=[("t", "<i8"), ("x", "<i2"), ("y", "<i2")]))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        events_to_frames(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        events_to_frames(make_events([(0, 0, 0, 1)]), num_steps=0)


# ------------------------------------------------------------------------------ augmentations

@pytest.mark.parametrize("size, offset", [(88, 20), (96, 16), (128, 0)])
def test_center_crop_offsets(size, offset):
    frames = coordinate_frames()
    out = CenterCrop(size)(frames)
    assert out.shape == (3, 2, size, size)
    assert torch.equal(out, frames[..., offset:offset + size, offset:offset + size])
    batch = torch.stack([frames, frames + 7])
    assert torch.equal(CenterCrop(size)(batch)[1], out + 7)


def test_center_crop_tie_rounds_to_even_like_torchvision():
    frames = coordinate_frames(1, 9, 9)
    assert CenterCrop(4)(frames)[0, 0, 0, 0] == coordinate_frames(1, 9, 9)[0, 0, 2, 2]  # 2.5 -> 2
    assert CenterCrop(2)(frames)[0, 0, 0, 0] == coordinate_frames(1, 9, 9)[0, 0, 4, 4]  # 3.5 -> 4


@given(seed=st.integers(0, 2**32), height=st.integers(4, 40), width=st.integers(4, 40),
       data_=st.data())
def test_random_crop_is_a_window_shared_by_all_frames(seed, height, width, data_):
    size = data_.draw(st.integers(1, min(height, width)))
    frames = coordinate_frames(3, height, width)
    out = RandomCrop(size, seed=seed)(frames)
    assert out.shape == (3, 2, size, size)
    top, left = int(out[0, 0, 0, 0] - 1) // 1000, int(out[0, 0, 0, 0] - 1) % 1000
    assert 0 <= top <= height - size and 0 <= left <= width - size
    assert torch.equal(out, frames[..., top:top + size, left:left + size])


def test_random_crop_covers_every_offset_and_batches_independently():
    frames = coordinate_frames(1, 96, 96)
    crop = RandomCrop(88, seed=0)
    corners = {int(crop(frames)[0, 0, 0, 0]) - 1 for _ in range(400)}
    assert corners == {1000 * t + l for t in range(9) for l in range(9)}  # offsets 0..8
    batch = crop(frames.expand(16, -1, -1, -1, -1))
    assert batch.shape == (16, 1, 2, 88, 88)
    assert len({int(b[0, 0, 0, 0]) for b in batch}) > 1


def test_horizontal_flip_mirrors_x():
    frames = coordinate_frames(2, 5, 6)
    assert torch.equal(HorizontalFlip(p=1.0)(frames), frames.flip(-1))
    assert HorizontalFlip(p=1.0)(frames)[0, 0, 0, 0] == frames[0, 0, 0, 5]
    assert torch.equal(HorizontalFlip(p=0.0)(frames), frames)
    flip = HorizontalFlip(p=0.5, seed=3)
    outcomes = [torch.equal(flip(frames), frames.flip(-1)) for _ in range(100)]
    assert 20 < sum(outcomes) < 80  # otherwise unchanged:
    batch = flip(frames.expand(32, -1, -1, -1, -1))
    mirrored = [torch.equal(b, frames.flip(-1)) for b in batch]
    assert all(m or torch.equal(b, frames) for m, b in zip(mirrored, batch))
    assert 0 < sum(mirrored) < 32


@given(seed=st.integers(0, 2**32), batch=st.integers(1, 3))
def test_cutout_zeroes_at_most_four_small_squares_and_nothing_else(seed, batch):
    frames = torch.rand(batch, 4, 2, 40, 50) + 0.5  # no zero anywhere
    out = Cutout(holes=4, max_side=20, seed=seed)(frames)
    boxes = Cutout(holes=4, max_side=20, seed=seed).boxes(batch, 40, 50)  # the same draws
    assert boxes.shape == (batch, 4, 4)
    for b in range(batch):
        expected = torch.zeros(40, 50, dtype=torch.bool)
        for top, left, bottom, right in boxes[b].tolist():
            assert 0 <= bottom - top < 20 and 0 <= right - left < 20
            expected[top:bottom, left:right] = True
        zero = out[b] == 0
        assert torch.equal(zero, expected.expand_as(zero))  # the same holes in every frame
        assert torch.equal(out[b][~zero], frames[b][~zero])  # everything else untouched
        assert expected.sum() <= 4 * 19 * 19


def test_cutout_hole_side_is_drawn_in_1_to_19():
    cut = Cutout(holes=4, max_side=20, seed=0)
    boxes = cut.boxes(500, 200, 200)
    top, left, bottom, right = boxes.unbind(-1)
    inside = (top > 0) & (left > 0) & (bottom < 200) & (right < 200)  # not clipped
    height, width = (bottom - top)[inside], (right - left)[inside]
    assert torch.equal(height, width)  # squares
    assert height.min() == 1 and height.max() == 19


def square_frames(side, size=88):
    frames = torch.zeros(2, 2, size, size)
    lo = (size - side) // 2
    frames[..., lo:lo + side, lo:lo + side] = 1
    return frames


def lit_extent(frame):
    rows = (frame > 0.5).any(1).nonzero().view(-1)
    return (rows.max() - rows.min() + 1).item()


@pytest.mark.parametrize("seed", range(5))
def test_zoom_in_enlarges_and_zoom_out_shrinks_content(seed):
    frames = square_frames(20)  # a 20 x 20 square of ones in the middle: mass 400
    zoom_in, side = Zoom(p_in=1.0, seed=seed).draw(1)
    assert zoom_in.item() and 62 <= side.item() < 88
    out = Zoom(p_in=1.0, seed=seed)(frames)
    assert out.shape == (2, 2, 88, 88)
    scale = 88 / side.item()  # > 1: content magnified
    assert out[0, 0].sum() > 400
    assert out[0, 0].sum().item() == pytest.approx(400 * scale**2, rel=0.05)
    assert abs(lit_extent(out[0, 0]) - 20 * scale) <= 1.5

    zoom_in, pad = Zoom(p_in=0.0, seed=seed).draw(1)
    assert not zoom_in.item() and 0 <= pad.item() < 26
    out = Zoom(p_in=0.0, seed=seed)(frames)
    assert out.shape == (2, 2, 88, 88)
    scale = 88 / (88 + 2 * pad.item())  # <= 1: content shrunk
    assert out[0, 0].sum() <= 400
    assert out[0, 0].sum().item() == pytest.approx(400 * scale**2, rel=0.05)
    assert abs(lit_extent(out[0, 0]) - 20 * scale) <= 1.5


def test_zoom_draws_both_ways_and_batches():
    zoom = Zoom(seed=0)
    zoom_in, amount = zoom.draw(2000)
    assert 0.45 < zoom_in.float().mean() < 0.55
    assert amount[zoom_in].min() == 62 and amount[zoom_in].max() == 87
    assert amount[~zoom_in].min() == 0 and amount[~zoom_in].max() == 25
    out = zoom(torch.rand(3, 4, 2, 88, 88))
    assert out.shape == (3, 4, 2, 88, 88)
    assert torch.equal(Zoom(p_in=0.0, max_scale=1)(square_frames(20)), square_frames(20))  # pad 0


@given(seed=st.integers(0, 2**32), num_steps=st.integers(1, 120), batch=st.integers(1, 3))
def test_temporal_mask_zeroes_whole_frames_only(seed, num_steps, batch):
    frames = torch.rand(batch, num_steps, 2, 6, 5) + 0.5
    out = TemporalMask(masks=6, max_length=18, seed=seed)(frames)
    spans = TemporalMask(masks=6, max_length=18, seed=seed).spans(batch, num_steps)
    for b in range(batch):
        zero = out[b] == 0
        whole = zero.flatten(1).all(1)  # [T]
        assert torch.equal(zero.flatten(1).any(1), whole)  # a frame is all zero or untouched
        assert torch.equal(out[b][~whole], frames[b][~whole])
        assert whole.sum() <= 6 * 17
        expected = torch.zeros(num_steps, dtype=torch.bool)
        for start, end in spans[b].tolist():
            assert 0 <= end - start < 18 and 0 <= start and end <= num_steps - 1
            expected[start:end] = True
        assert torch.equal(whole, expected)


def test_temporal_mask_lengths_are_drawn_in_0_to_17():
    spans = TemporalMask(seed=0).spans(1000, 90)
    length = spans[..., 1] - spans[..., 0]
    assert length.min() == 0 and length.max() == 17
    assert spans[..., 0].min() == 0 and spans[..., 1].max() <= 89  # the last frame stays


def test_temporal_mask_of_one_frame_spares_the_last():
    """max_length = 1 (L = 1, as the public code) at T = 1 and 2: the last frame stays."""
    frames = torch.ones(50, 2, 2, 1, 1)
    assert torch.equal(TemporalMask(max_length=1, seed=0)(frames[:, :1]), frames[:, :1])
    out = TemporalMask(max_length=1, seed=0)(frames)
    assert (out[:, 0] == 0).all() and (out[:, 1] == 1).all()


def test_transforms_accept_only_frame_shapes():
    for transform in (CenterCrop(2), RandomCrop(2), HorizontalFlip(), Cutout(), Zoom(),
                      TemporalMask()):
        with pytest.raises(ValueError, match=r"\[T, 2, H, W\]"):
            transform(torch.zeros(3, 88, 88))


def test_same_seed_same_result_different_seeds_differ():
    frames = torch.rand(90, 2, 128, 128)
    a = train_transform(seed=1)(frames)
    b = train_transform(seed=1)(frames)
    c = train_transform(seed=2)(frames)
    assert a.shape == (90, 2, 88, 88) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for cls, kwargs in ((RandomCrop, {"size": 50}), (HorizontalFlip, {}), (Cutout, {}),
                        (Zoom, {}), (TemporalMask, {})):
        x = frames[..., :88, :88]
        runs = [cls(**kwargs, seed=s)(x) for s in (5, 5, 6, 7, 8)]
        assert torch.equal(runs[0], runs[1]), cls
        assert any(not torch.equal(runs[0], r) for r in runs[2:]), cls
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        assert torch.equal(cls(**kwargs, generator=g1)(x), cls(**kwargs, generator=g2)(x)), cls


def test_unseeded_transforms_follow_torch_global_seed():
    frames = torch.rand(10, 2, 128, 128)
    torch.manual_seed(4)
    a = train_transform()(frames)
    torch.manual_seed(4)
    b = train_transform()(frames)
    assert torch.equal(a, b)


def test_seeded_transform_reseeds_per_dataloader_worker(monkeypatch):
    frames = torch.rand(4, 2, 20, 20)
    worker = SimpleNamespace(seed=0)
    monkeypatch.setattr(data, "get_worker_info", lambda: worker)
    outputs = {}
    for worker_seed in (100, 101, 100):
        worker.seed = worker_seed
        crop = RandomCrop(8, seed=0)
        outputs.setdefault(worker_seed, []).append([crop(frames) for _ in range(5)])
    first, again = outputs[100]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # reproducible per worker seed
    other = outputs[101][0]
    assert any(not torch.equal(a, b) for a, b in zip(first, other))  # workers differ


def test_train_and_test_pipelines():
    frames = torch.rand(2, 90, 2, 128, 128) + 0.5
    before = frames.clone()
    train = train_transform(seed=0)
    assert [type(t) for t in train.transforms] == [
        CenterCrop, RandomCrop, HorizontalFlip, Cutout, Zoom, TemporalMask]
    assert train(frames).shape == (2, 90, 2, 88, 88)
    for _ in range(5):
        train(frames[0])
    assert torch.equal(frames, before)  # the input is never written to
    assert torch.equal(test_transform()(frames), frames[..., 20:108, 20:108])
    assert isinstance(test_transform(), Compose)


# ------------------------------------------------------------------------------ dataset


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return make_synthetic_dvslip(tmp_path_factory.mktemp("dvslip"), num_classes=3,
                                 train_per_class=4, test_per_class=2, seed=1)


def test_dataset_on_synthetic_folder(small_root):
    train = DVSLip(small_root, "train")
    test = DVSLip(small_root, "test", num_steps=30)
    assert len(train) == 12 and len(test) == 6
    assert train.classes == test.classes == ["class0", "class1", "class2"]
    assert train.targets == [0] * 4 + [1] * 4 + [2] * 4
    for dataset, steps in ((train, 90), (test, 30)):
        frames, label = dataset[len(dataset) - 1]
        assert frames.shape == (steps, 2, 88, 88) and frames.dtype == torch.float32
        assert isinstance(label, int) and label == 2
    path, label = test.samples[0]
    raw = DVSLip(small_root, "test", num_steps=30, transform=lambda f: f)[0][0]
    assert torch.equal(raw, events_to_frames(np.load(path), 30))
    assert torch.equal(test[0][0], raw[..., 20:108, 20:108])  # test: centre crop 88


def test_dataset_orders_samples_naturally(tmp_path):
    events = make_events([(0, 1, 1, 1)])
    for name in ("10", "2", "1"):
        (tmp_path / "train" / "hello").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "train" / "hello" / f"{name}.npy", events)
    assert [p.name for p, _ in DVSLip(tmp_path).samples] == ["1.npy", "2.npy", "10.npy"]


def test_dataset_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "train")):
        DVSLip(tmp_path / "nope")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no word folders"):
        DVSLip(tmp_path)
    np.save(tmp_path / "train" / "0.npy", make_events([(0, 1, 1, 1)]))  # files, no words
    with pytest.raises(FileNotFoundError, match="no word folders"):
        DVSLip(tmp_path)
    (tmp_path / "train" / "about").mkdir()
    with pytest.raises(FileNotFoundError, match="about.*no .npy event files"):
        DVSLip(tmp_path)


@pytest.mark.parametrize("content, match", [
    (b"not a numpy file", "not a readable .npy"),
    (np.zeros((5, 4), np.int64), "structured array"),
    (np.zeros(5, dtype=[("t", "<i8"), ("x", "<i2")]), "lacks field"),
    (make_events([(0, 300, 1, 1)]), "x outside"),
])
def test_malformed_file_raises_value_error_with_path(tmp_path, content, match):
    word = tmp_path / "test" / "about"
    word.mkdir(parents=True)
    path = word / "0.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    dataset = DVSLip(tmp_path, "test")
    with pytest.raises(ValueError, match=match) as info:
        dataset[0]
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------ synthetic data

def motion_features(events):
    """Least-squares velocity (px/s) of the events' centroid: (|vx|, vy), and the event count."""
    t = events["t"] / 1e6
    t = t - t.mean()
    vx = np.dot(t, events["x"] - events["x"].mean()) / np.dot(t, t)
    vy = np.dot(t, events["y"] - events["y"].mean()) / np.dot(t, t)
    return abs(vx), vy, len(events)


@pytest.fixture(scope="module")
def default_root(tmp_path_factory):
    start = time.perf_counter()
    root = make_synthetic_dvslip(tmp_path_factory.mktemp("default"))
    return root, time.perf_counter() - start


def test_synthetic_default_size_and_speed(default_root):
    root, seconds = default_root
    assert seconds < 10
    train, test = DVSLip(root, "train"), DVSLip(root, "test")
    assert len(train.classes) == 10 and len(train) == 200 and len(test) == 50
    for path, _ in train.samples[::17]:
        events = np.load(path)
        assert events.dtype == EVENT_DTYPE
        assert 1000 < len(events) < 8000
        assert 1.15e6 < events["t"].max() <= 1.5e6 and np.all(np.diff(events["t"]) >= 0)
        assert set(np.unique(events["p"]).tolist()) == {0, 1}


def test_synthetic_is_deterministic(tmp_path):
    a = make_synthetic_dvslip(tmp_path / "a", num_classes=2, train_per_class=2, test_per_class=1)
    b = make_synthetic_dvslip(tmp_path / "b", num_classes=2, train_per_class=2, test_per_class=1)
    c = make_synthetic_dvslip(tmp_path / "c", num_classes=2, train_per_class=2, test_per_class=1,
                              seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*.npy"))
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_synthetic_motion_depends_on_class(default_root):
    root, _ = default_root
    dataset = DVSLip(root, "train")
    features = np.array([motion_features(np.load(p)) for p, _ in dataset.samples])
    labels = np.array(dataset.targets)
    means = np.array([features[labels == k].mean(0) for k in range(10)])
    spread = np.array([features[labels == k, :2].std(0) for k in range(10)]).max()
    # every pair of classes differs in mean velocity (|vx|, vy) or in event rate (speed)
    for i in range(10):
        for j in range(i + 1, 10):
            velocity_gap = np.hypot(*(means[i, :2] - means[j, :2]))
            rate_ratio = max(means[i, 2], means[j, 2]) / min(means[i, 2], means[j, 2])
            assert velocity_gap > 2 * spread or rate_ratio > 1.8, (i, j)
    # classes 0-4 are slow, 5-9 fast: more events
    assert means[5:, 2].min() > 1.5 * means[:5, 2].max()


def test_synthetic_polarity_leads_motion(default_root):
    root, _ = default_root
    for path in sorted(root.glob("train/class*/0.npy")):
        events = np.load(path)
        _, vy, _ = motion_features(events)
        t = events["t"] / 1e6
        sx = np.polyfit(t, events["x"].astype(float), 1)[0]  # signed: this sample's direction
        direction = np.array([sx, vy]) / np.hypot(sx, vy)
        along = np.stack([events["x"], events["y"]], 1).astype(float) @ direction
        p = events["p"]
        assert along[p == 1].mean() > along[p == 0].mean() + 5  # positive edge ahead
