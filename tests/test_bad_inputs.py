"""The catalogue of bad inputs: one row per case, over every public op (`neurokern.functional`),
every module (`neurokern.nn`) and the event-data loader (`neurokern.data`). Each raises a
TypeError or ValueError whose message names the argument (or the file), before any kernel
runs (the ops' dispatch is replaced by a trap here)."""

import datetime
import re

import numpy as np
import pytest
import torch

import neurokern as nk
from neurokern import data
from neurokern import functional as F
from neurokern import nn as snn

HUGE = 10**400  # beyond float64: float() raises OverflowError
NAN = float("nan")


def x3(*shape):
    return torch.randn(*shape) if shape else torch.randn(4, 2, 3)


def gru_params(hidden=4, inputs=3):
    return [torch.randn(3 * hidden, inputs), torch.randn(3 * hidden, hidden),
            torch.randn(3 * hidden), torch.randn(3 * hidden), torch.rand(hidden)]


def gru(**changes):
    """spikgru2plus on [T=4, B=2, I=3] input, H = 4, with `changes` to its arguments."""
    names = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "alpha")
    args = dict(zip(names, [x3(), *gru_params()]))
    args.update(changes)
    positional = [args.pop(n) for n in names]
    return lambda tmp: F.spikgru2plus(*positional, **args)


def bidirectional(**changes):
    args = dict(x=x3(), params=gru_params(), reverse_params=gru_params())
    args.update(changes)
    positional = [args.pop(n) for n in ("x", "params", "reverse_params")]
    return lambda tmp: F.spikgru2plus_bidirectional(*positional, **args)


def plif(**changes):
    args = dict(x=x3(4, 2, 3, 5), alpha=torch.rand(3))
    args.update(changes)
    positional = [args.pop(n) for n in ("x", "alpha")]
    return lambda tmp: F.plif(*positional, **args)


def event_file(fields, values=None):
    """A DVS-Lip `.npy` file with structured dtype `fields` (3 events), loaded by
    `data.load_events`."""
    def call(tmp):
        events = np.zeros(3, dtype=fields)
        for name, value in (values or {}).items():
            events[name] = value
        path = tmp / "word" / "sample.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, events)
        return data.load_events(path)
    return call


GOOD_FIELDS = [("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "u1")]


def fields_with(**replaced):
    return [(name, replaced.get(name, dtype)) for name, dtype in GOOD_FIELDS]


def dataset_item(fields):
    """DVSLip(root)[0] of a folder whose one file has structured dtype `fields`."""
    def call(tmp):
        path = tmp / "train" / "word" / "sample.npy"
        path.parent.mkdir(parents=True)
        np.save(path, np.zeros(3, dtype=fields))
        return data.DVSLip(tmp, "train", transform=None)[0]
    return call


def sparse(t):
    return t.to_sparse()


# (id, call(tmp_path), exception, regex the message must match: the argument's or file's name)
CASES = [
    # spike / signed_spike
    ("spike-x-list", lambda tmp: F.spike([1.0, 2.0]), TypeError, r"\bx\b"),
    ("spike-x-None", lambda tmp: F.spike(None), TypeError, r"\bx\b"),
    ("spike-x-int", lambda tmp: F.spike(torch.arange(4)), TypeError, r"\bx\b.*dtype"),
    ("spike-x-bool", lambda tmp: F.spike(torch.ones(3, dtype=torch.bool)), TypeError, r"\bx\b"),
    ("spike-x-complex", lambda tmp: F.spike(torch.randn(3, dtype=torch.complex64)), TypeError,
     r"\bx\b"),
    ("spike-x-float8", lambda tmp: F.spike(torch.randn(3).to(torch.float8_e4m3fn)), TypeError,
     r"\bx\b"),
    ("spike-x-sparse-coo", lambda tmp: F.spike(sparse(torch.randn(3, 3))), TypeError,
     r"\bx\b.*strided"),
    ("spike-x-sparse-triton", lambda tmp: F.spike(sparse(torch.randn(3, 3)), backend="triton"),
     TypeError, r"\bx\b.*strided"),
    ("spike-x-sparse-csr", lambda tmp: F.spike(torch.randn(3, 3).to_sparse_csr()), TypeError,
     r"\bx\b.*strided"),
    ("spike-v_th-zero", lambda tmp: F.spike(x3(), v_th=0.0), ValueError, r"v_th"),
    ("spike-v_th-negative", lambda tmp: F.spike(x3(), v_th=-1), ValueError, r"v_th"),
    ("spike-v_th-nan", lambda tmp: F.spike(x3(), v_th=NAN), ValueError, r"v_th"),
    ("spike-v_th-inf", lambda tmp: F.spike(x3(), v_th=float("inf")), ValueError, r"v_th"),
    ("spike-v_th-huge-int", lambda tmp: F.spike(x3(), v_th=HUGE), ValueError, r"v_th"),
    ("spike-v_th-bool", lambda tmp: F.spike(x3(), v_th=True), TypeError, r"v_th"),
    ("spike-v_th-str", lambda tmp: F.spike(x3(), v_th="1"), TypeError, r"v_th"),
    ("spike-v_th-complex", lambda tmp: F.spike(x3(), v_th=1j), TypeError, r"v_th"),
    ("spike-v_th-tensor", lambda tmp: F.spike(x3(), v_th=torch.tensor(1.0)), TypeError, r"v_th"),
    ("spike-gamma-huge-int", lambda tmp: F.spike(x3(), gamma=-HUGE), ValueError, r"gamma"),
    ("spike-gamma-None", lambda tmp: F.spike(x3(), gamma=None), TypeError, r"gamma"),
    ("spike-spiking-str", lambda tmp: F.spike(x3(), spiking="no"), TypeError, r"spiking"),
    ("spike-spiking-2", lambda tmp: F.spike(x3(), spiking=2), TypeError, r"spiking"),
    ("spike-backend-unknown", lambda tmp: F.spike(x3(), backend="gpu"), ValueError, r"backend"),
    ("spike-backend-int", lambda tmp: F.spike(x3(), backend=3), ValueError, r"backend"),
    ("signed_spike-x-int", lambda tmp: F.signed_spike(torch.arange(3)), TypeError, r"\bx\b"),
    ("signed_spike-v_th-huge-int", lambda tmp: F.signed_spike(x3(), v_th=HUGE), ValueError,
     r"v_th"),
    ("signed_spike-gamma-huge-int", lambda tmp: F.signed_spike(x3(), gamma=HUGE), ValueError,
     r"gamma"),
    ("signed_spike-x-sparse", lambda tmp: F.signed_spike(sparse(x3()), backend="triton"),
     TypeError, r"\bx\b"),
    ("signed_spike-spiking-None", lambda tmp: F.signed_spike(x3(), spiking=None), TypeError,
     r"spiking"),
    # plif
    ("plif-x-rank-2", plif(x=torch.randn(4, 2)), ValueError, r"\bx\b.*rank"),
    ("plif-x-no-steps", plif(x=torch.randn(0, 2, 3)), ValueError, r"\bx\b.*T = 0"),
    ("plif-x-sparse", plif(x=sparse(x3())), TypeError, r"\bx\b"),
    ("plif-x-int", plif(x=torch.ones(4, 2, 3, dtype=torch.int32)), TypeError, r"\bx\b"),
    ("plif-alpha-huge-int", plif(alpha=HUGE), ValueError, r"alpha"),
    ("plif-alpha-nan", plif(alpha=NAN), ValueError, r"alpha"),
    ("plif-alpha-str", plif(alpha="0.9"), TypeError, r"alpha"),
    ("plif-alpha-bool", plif(alpha=True), TypeError, r"alpha"),
    ("plif-alpha-None", plif(alpha=None), TypeError, r"alpha"),
    ("plif-alpha-int-tensor", plif(alpha=torch.ones(3, dtype=torch.int64)), TypeError, r"alpha"),
    ("plif-alpha-wrong-channels", plif(alpha=torch.rand(4)), ValueError, r"alpha.*\[C\]"),
    ("plif-alpha-2d", plif(alpha=torch.rand(3, 1)), ValueError, r"alpha"),
    ("plif-alpha-sparse", plif(alpha=sparse(torch.rand(3))), TypeError, r"alpha"),
    ("plif-alpha-float64-for-float32", plif(alpha=torch.rand(3, dtype=torch.float64)),
     TypeError, r"alpha.*dtype"),
    ("plif-alpha-other-device", plif(alpha=torch.rand(3, device="meta")), ValueError,
     r"alpha.*meta"),
    ("plif-v_th-huge-int", plif(v_th=HUGE), ValueError, r"v_th"),
    ("plif-gamma-nan", plif(gamma=NAN), ValueError, r"gamma"),
    ("plif-state-not-pair", plif(state=torch.zeros(2, 3, 5)), TypeError, r"state"),
    ("plif-state-wrong-shape", plif(state=(torch.zeros(2, 3), torch.zeros(2, 3))), ValueError,
     r"state\[0\]"),
    ("plif-state-int", plif(state=(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5).long())),
     TypeError, r"state\[1\]"),
    ("plif-state-None-entry", plif(state=(torch.zeros(2, 3, 5), None)), TypeError, r"state\[1\]"),
    ("plif-signed-str", plif(signed="yes"), TypeError, r"signed"),
    ("plif-batch_first-str", plif(batch_first="no"), TypeError, r"batch_first"),
    ("plif-return_state-None", plif(return_state=None), TypeError, r"return_state"),
    ("plif-detach_reset-float", plif(detach_reset=0.5), TypeError, r"detach_reset"),
    ("plif-spiking-list", plif(spiking=[]), TypeError, r"spiking"),
    ("plif-backend-None", plif(backend=None), ValueError, r"backend"),
    # spikgru2plus
    ("gru-x-rank-2", gru(x=torch.randn(4, 3)), ValueError, r"\bx\b.*rank"),
    ("gru-x-no-steps", gru(x=torch.randn(0, 2, 3)), ValueError, r"\bx\b.*T = 0"),
    ("gru-x-sparse", gru(x=sparse(x3())), TypeError, r"\bx\b"),
    ("gru-x-float16-weights-float64", gru(x=x3().half(), weight_ih=torch.randn(12, 3).double()),
     TypeError, r"weight_hh|weight_ih"),
    ("gru-weight_hh-not-3H-H", gru(weight_hh=torch.randn(12, 5)), ValueError, r"weight_hh"),
    ("gru-weight_ih-wrong-H", gru(weight_ih=torch.randn(9, 3)), ValueError, r"weight_ih"),
    ("gru-weight_ih-wrong-I", gru(weight_ih=torch.randn(12, 5)), ValueError, r"weight_ih"),
    ("gru-weight_ih-sparse", gru(weight_ih=sparse(torch.randn(12, 3))), TypeError, r"weight_ih"),
    ("gru-weight_hh-None", gru(weight_hh=None), TypeError, r"weight_hh"),
    ("gru-bias_ih-shape", gru(bias_ih=torch.randn(4)), ValueError, r"bias_ih"),
    ("gru-bias_hh-int", gru(bias_hh=torch.ones(12, dtype=torch.int32)), TypeError, r"bias_hh"),
    ("gru-alpha-shape", gru(alpha=torch.rand(5)), ValueError, r"alpha"),
    ("gru-alpha-None", gru(alpha=None), TypeError, r"alpha"),
    ("gru-alpha-other-device", gru(alpha=torch.rand(4, device="meta")), ValueError, r"alpha"),
    ("gru-state-not-triple", gru(state=(torch.zeros(2, 4),) * 2), TypeError, r"state"),
    ("gru-state-shape", gru(state=(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 4))),
     ValueError, r"state\[2\]"),
    ("gru-v_th-huge-int", gru(v_th=HUGE), ValueError, r"v_th"),
    ("gru-gamma-zero", gru(gamma=0), ValueError, r"gamma"),
    ("gru-signed-str", gru(signed="yes"), TypeError, r"signed"),
    ("gru-reset_gate-None", gru(reset_gate=None), TypeError, r"reset_gate"),
    ("gru-batch_first-str", gru(batch_first="no"), TypeError, r"batch_first"),
    ("gru-spiking-str", gru(spiking="no"), TypeError, r"spiking"),
    ("gru-spike_input-str", gru(spike_input="yes"), TypeError, r"spike_input"),
    ("gru-backend-unknown", gru(backend="tpu"), ValueError, r"backend"),
    # spikgru2plus_bidirectional
    ("bi-params-not-5", bidirectional(params=gru_params()[:4]), TypeError, r"\bparams"),
    ("bi-reverse_params-None", bidirectional(reverse_params=None), TypeError, r"reverse_params"),
    ("bi-other-hidden", bidirectional(reverse_params=gru_params(hidden=5)), ValueError,
     r"hidden"),
    ("bi-one-bias", bidirectional(reverse_params=gru_params()[:2] + [None, None]
                                  + gru_params()[4:]), ValueError, r"bias"),
    ("bi-state-shape", bidirectional(state=(torch.zeros(2, 4),) * 3), ValueError, r"state\[0\]"),
    ("bi-gamma-huge-int", bidirectional(gamma=HUGE), ValueError, r"gamma"),
    ("bi-batch_first-str", bidirectional(batch_first="yes"), TypeError, r"batch_first"),
    # modules: bad options raise when the module is built
    ("Spike-v_th-negative", lambda tmp: snn.Spike(v_th=-1.0), ValueError, r"v_th"),
    ("Spike-v_th-huge-int", lambda tmp: snn.Spike(v_th=HUGE), ValueError, r"v_th"),
    ("Spike-spiking-str", lambda tmp: snn.Spike(spiking="no"), TypeError, r"spiking"),
    ("Spike-backend-unknown", lambda tmp: snn.Spike(backend="gpu"), ValueError, r"backend"),
    ("Spike-x-int", lambda tmp: snn.Spike()(torch.arange(3)), TypeError, r"\bx\b"),
    ("SignedSpike-gamma-nan", lambda tmp: snn.SignedSpike(gamma=NAN), ValueError, r"gamma"),
    ("PLIF-channels-zero", lambda tmp: snn.PLIF(0), ValueError, r"channels"),
    ("PLIF-channels-float", lambda tmp: snn.PLIF(2.5), ValueError, r"channels"),
    ("PLIF-alpha_init-huge-int", lambda tmp: snn.PLIF(3, alpha_init=HUGE), ValueError,
     r"alpha_init"),
    ("PLIF-alpha_init-nan", lambda tmp: snn.PLIF(3, alpha_init=NAN), ValueError, r"alpha_init"),
    ("PLIF-alpha_init-str", lambda tmp: snn.PLIF(3, alpha_init="0.9"), TypeError, r"alpha_init"),
    ("PLIF-sigmoid-alpha_init-1", lambda tmp: snn.PLIF(3, leak="sigmoid", alpha_init=1.0),
     ValueError, r"alpha_init"),
    ("PLIF-leak-unknown", lambda tmp: snn.PLIF(3, leak="exp"), ValueError, r"leak"),
    ("PLIF-learnable-str", lambda tmp: snn.PLIF(3, learnable="no"), TypeError, r"learnable"),
    ("PLIF-batch_first-str", lambda tmp: snn.PLIF(3, batch_first="no"), TypeError,
     r"batch_first"),
    ("PLIF-v_th-zero", lambda tmp: snn.PLIF(3, v_th=0), ValueError, r"v_th"),
    ("PLIF-x-other-channels", lambda tmp: snn.PLIF(3)(torch.randn(4, 2, 5)), ValueError,
     r"alpha.*C"),
    ("IF-gamma-huge-int", lambda tmp: snn.IF(gamma=HUGE), ValueError, r"gamma"),
    ("IF-signed-str", lambda tmp: snn.IF(signed="yes"), TypeError, r"signed"),
    ("SpikGRU2Plus-input_size-zero", lambda tmp: snn.SpikGRU2Plus(0, 4), ValueError,
     r"input_size"),
    ("SpikGRU2Plus-hidden_size-float", lambda tmp: snn.SpikGRU2Plus(3, 4.0), TypeError,
     r"hidden_size"),
    ("SpikGRU2Plus-num_layers-bool", lambda tmp: snn.SpikGRU2Plus(3, 4, True), TypeError,
     r"num_layers"),
    ("SpikGRU2Plus-dropout-nan", lambda tmp: snn.SpikGRU2Plus(3, 4, dropout=NAN), ValueError,
     r"dropout"),
    ("SpikGRU2Plus-alpha_init-huge-int", lambda tmp: snn.SpikGRU2Plus(3, 4, alpha_init=HUGE),
     ValueError, r"alpha_init"),
    ("SpikGRU2Plus-bias-str", lambda tmp: snn.SpikGRU2Plus(3, 4, bias="no"), TypeError,
     r"\bbias\b"),
    ("SpikGRU2Plus-bidirectional-str", lambda tmp: snn.SpikGRU2Plus(3, 4, bidirectional="no"),
     TypeError, r"bidirectional"),
    ("SpikGRU2Plus-v_th-huge-int", lambda tmp: snn.SpikGRU2Plus(3, 4, v_th=HUGE), ValueError,
     r"v_th"),
    ("SpikGRU2Plus-backend-unknown", lambda tmp: snn.SpikGRU2Plus(3, 4, backend="x"),
     ValueError, r"backend"),
    ("SpikGRU2Plus-input-list", lambda tmp: snn.SpikGRU2Plus(3, 4)([[1.0]]), TypeError,
     r"input"),
    ("SpikGRU2Plus-input-rank-4", lambda tmp: snn.SpikGRU2Plus(3, 4)(torch.randn(2, 2, 2, 3)),
     ValueError, r"input"),
    ("SpikGRU2Plus-input-size", lambda tmp: snn.SpikGRU2Plus(3, 4)(torch.randn(2, 2, 5)),
     ValueError, r"input size"),
    ("SpikGRU2Plus-state-shape", lambda tmp: snn.SpikGRU2Plus(3, 4)(
        x3(), (torch.zeros(1, 2, 5),) * 3), ValueError, r"state v"),
    ("SpikGRU2Plus-state-not-triple", lambda tmp: snn.SpikGRU2Plus(3, 4)(x3(), torch.zeros(3)),
     TypeError, r"state"),
    ("SpikGRU2Plus-from_gru-lstm", lambda tmp: snn.SpikGRU2Plus.from_gru(torch.nn.LSTM(3, 4)),
     TypeError, r"gru"),
    ("clamp_leaks_-not-module", lambda tmp: snn.clamp_leaks_([snn.PLIF(3)]), TypeError,
     r"module"),
    # event data: arrays given to events_to_frames, files given to load_events and DVSLip
    ("events-t-str", lambda tmp: data.events_to_frames(
        {"t": np.array(["1", "2"]), "x": [0, 1], "y": [0, 1], "p": [0, 1]}), ValueError,
     r"events: t"),
    ("events-p-complex", lambda tmp: data.events_to_frames(
        {"t": [1, 2], "x": [0, 1], "y": [0, 1], "p": np.array([0j, 1j])}), ValueError,
     r"events: p"),
    ("events-rows-3", lambda tmp: data.events_to_frames(np.zeros((5, 3))), ValueError,
     r"events"),
    ("events-x-outside", lambda tmp: data.events_to_frames(
        {"t": [1], "x": [128], "y": [0], "p": [1]}), ValueError, r"\bx\b"),
    ("events-t-negative", lambda tmp: data.events_to_frames(
        {"t": [-1], "x": [0], "y": [0], "p": [1]}), ValueError, r"timestamps"),
    ("events-t-nan", lambda tmp: data.events_to_frames(
        {"t": [NAN], "x": [0], "y": [0], "p": [1]}), ValueError, r"\bt\b.*NaN"),
    ("events-p-2", lambda tmp: data.events_to_frames(
        {"t": [1], "x": [0], "y": [0], "p": [2]}), ValueError, r"polarity p"),
    ("events-num_steps-zero", lambda tmp: data.events_to_frames(
        {"t": [1], "x": [0], "y": [0], "p": [1]}, num_steps=0), ValueError, r"num_steps"),
    ("file-t-str", event_file(fields_with(t="<U8")), ValueError, r"sample\.npy.*\bt\b"),
    ("file-t-bytes", event_file(fields_with(t="S8")), ValueError, r"sample\.npy.*\bt\b"),
    ("file-t-datetime", event_file(fields_with(t="<M8[us]"),
                                   {"t": np.datetime64(datetime.datetime(2024, 1, 1))}),
     ValueError, r"sample\.npy.*\bt\b"),
    ("file-t-subarray", event_file(fields_with(t=("<i8", (2,)))), ValueError,
     r"sample\.npy.*\bt\b.*sub-array"),
    ("file-x-subarray", event_file(fields_with(x=("<i2", (2, 2)))), ValueError,
     r"sample\.npy.*\bx\b"),
    ("file-p-str", event_file(fields_with(p="<U1")), ValueError, r"sample\.npy.*\bp\b"),
    ("file-missing-field", event_file(GOOD_FIELDS[:3]), ValueError, r"sample\.npy.*lacks"),
    ("file-not-structured", lambda tmp: (np.save(tmp / "a.npy", np.zeros(3)),
                                         data.load_events(tmp / "a.npy")), ValueError, r"a\.npy"),
    ("file-garbage", lambda tmp: ((tmp / "g.npy").write_bytes(b"not numpy"),
                                  data.load_events(tmp / "g.npy")), ValueError, r"g\.npy"),
    ("file-2d", lambda tmp: (np.save(tmp / "b.npy", np.zeros((2, 2), dtype=GOOD_FIELDS)),
                             data.load_events(tmp / "b.npy")), ValueError, r"b\.npy"),
    ("dataset-t-str", dataset_item(fields_with(t="<U8")), ValueError, r"sample\.npy.*\bt\b"),
    ("dataset-t-subarray", dataset_item(fields_with(t=("<i8", (3,)))), ValueError,
     r"sample\.npy.*\bt\b"),
    ("dataset-num_steps-str", lambda tmp: data.DVSLip(tmp, num_steps="90"), ValueError,
     r"num_steps"),
]


@pytest.fixture
def no_kernel(monkeypatch):
    """Any op call that gets past the argument checks fails the test."""
    def trap(op, *args, **kwargs):
        raise AssertionError(f"{op} reached its kernel")
    monkeypatch.setattr(F, "_run", trap)


@pytest.mark.parametrize("call,error,match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(no_kernel, tmp_path, call, error, match):
    with pytest.raises(error) as raised:
        call(tmp_path)
    assert type(raised.value) in (TypeError, ValueError), type(raised.value)
    assert re.search(match, str(raised.value)), str(raised.value)


def test_good_inputs_pass_the_checks(no_kernel):
    """The checks let through what the ops accept: flags as bools, numpy bools and 0/1, a huge
    but finite float, numpy scalars."""
    for spiking in (True, False, np.bool_(True), 0, 1):
        with pytest.raises(AssertionError, match="reached its kernel"):
            F.spike(x3(), v_th=np.float32(0.5), gamma=1e300, spiking=spiking)
    with pytest.raises(AssertionError, match="reached its kernel"):
        F.plif(x3(), np.float64(0.5), v_th=2**60, batch_first=np.bool_(False))
    snn.PLIF(3, alpha_init=np.float32(0.9), learnable=np.bool_(True))
    # nn.GRU's bias and batch_first are bools only (it refuses bias=1), its other flags 0/1 too
    snn.SpikGRU2Plus(3, 4, bias=True, batch_first=False, bidirectional=1, signed=np.bool_(False))
    assert nk.nn.clamp_leaks_(snn.PLIF(3)) is not None
