"""The generalised multi-step neuron (docs/neurons.md, issue 21): the options of `plif` beyond the
paper's PLIF (reset soft/hard/none, reset before the leak, input decay, strict threshold, atan or
sigmoid surrogate with a scale), in the reference and in every fused backend, forward and
backward."""

import contextlib
import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import neurokern as nk
from neurokern import functional as F
from neurokern import reference

f64 = torch.float64

OPTION_NAMES = ("reset", "v_reset", "reset_before_leak", "decay_input", "strict_threshold",
                "surrogate", "surrogate_scale")


def spec_neuron(x, alpha, *, v_th, gamma, signed, reset, v_reset, reset_before_leak,
                decay_input, strict_threshold, surrogate, surrogate_scale, spiking=True,
                state=None):
    """The equations of docs/neurons.md written independently of `neurokern.reference` (the
    leak in SpikingJelly's form `V + (c' X - (V - V_rest)) / tau`, tau = 1 / (1 - alpha)), for a
    time-major float64 x `[T, B, C]` without autograd: `(s, (v_T, s_T))`."""
    tau = 1 / (1 - alpha)  # alpha < 1 here
    v_rest = v_reset if reset == "hard" else 0.0

    def fire(h):
        u = h - v_th
        if spiking:
            up = (u > 0) if strict_threshold else (u >= 0)
            down = (-h - v_th > 0) if strict_threshold else (-h - v_th >= 0)
            return up.double() - (down.double() if signed else 0)
        if surrogate == "sigmoid":
            return surrogate_scale * torch.sigmoid(gamma * u)
        r = math.sqrt(gamma)
        if signed:
            c = 1 + 1 / (1 + 4 * gamma * v_th ** 2)
            return surrogate_scale * (torch.atan(r * u) + torch.atan(r * (h + v_th))) / (c * r)
        return 0.5 + surrogate_scale * torch.atan(r * u) / r

    def leak(v, x_t):
        if decay_input:  # SpikingJelly decay_input=True: H = V + (X - (V - V_reset)) / tau
            return v + (x_t - (v - v_rest)) / tau
        return v - (v - v_rest) / tau + x_t

    def R(h, s):
        return {"soft": h - v_th * s, "hard": h * (1 - s) + v_reset * s, "none": h}[reset]

    v, s = state if state is not None else (torch.zeros_like(x[0]), torch.zeros_like(x[0]))
    out = []
    for x_t in x:
        if reset_before_leak:
            h = leak(v, x_t)
            s = fire(h)
            v = R(h, s)
        else:
            v = R(leak(v, x_t), s)
            s = fire(v)
        out.append(s)
    return torch.stack(out), (v, s)


def all_options():
    """Every valid combination of the options (surrogate_scale and v_reset vary too)."""
    for reset, before, decay, strict, surrogate, signed in itertools.product(
            reference.RESETS, (False, True), (False, True), (False, True), reference.SURROGATES,
            (False, True)):
        if signed and (reset == "hard" or surrogate == "sigmoid"):
            continue
        yield dict(reset=reset, v_reset=-0.3 if reset == "hard" else 0.0,
                   reset_before_leak=before, decay_input=decay, strict_threshold=strict,
                   surrogate=surrogate, surrogate_scale=1.0 if strict else 0.7, signed=signed)


def option_id(opts):
    return "-".join(f"{k}={v}" for k, v in opts.items())


ALL_OPTIONS = list(all_options())


@pytest.mark.parametrize("spiking", [True, False])
@pytest.mark.parametrize("opts", ALL_OPTIONS, ids=option_id)
def test_reference_follows_the_equations(opts, spiking):
    gen = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(7, 3, 4, generator=gen, dtype=f64)
    alpha = 0.2 + 0.7 * torch.rand(4, generator=gen, dtype=f64)
    state = (torch.randn(3, 4, generator=gen, dtype=f64),
             torch.rand(3, 4, generator=gen, dtype=f64).round())
    kw = dict(v_th=0.8, gamma=3.0, **opts)
    s, (v_T, s_T) = reference.plif(x, alpha, state=state, return_state=True, spiking=spiking,
                                   **kw)
    s_spec, (v_spec, s_T_spec) = spec_neuron(x, alpha.view(1, -1), state=state,
                                             spiking=spiking, **kw)
    if spiking:
        assert torch.equal(s, s_spec)
        assert s.abs().sum() > 0 and (s == 0).any()  # the case fires, and not everywhere
    torch.testing.assert_close(s, s_spec, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_T, v_spec, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_T, s_T_spec, rtol=1e-12, atol=1e-12)


def test_strict_threshold_at_the_threshold():
    """A membrane exactly at v_th fires with `>=` (the default) and not with `>`; for signed
    spikes the same at -v_th."""
    x = torch.tensor([1.0, -1.0], dtype=f64).view(2, 1, 1, 1)  # h_1 = 1, h_2 = -1 (no leak)
    for strict, expected in ((False, [1.0, -1.0]), (True, [0.0, 0.0])):
        s = reference.plif(x.clone(), 0.0, signed=True, reset="none", strict_threshold=strict)
        assert s.flatten().tolist() == expected
        s = F.plif(x.clone(), 0.0, signed=True, reset="none", strict_threshold=strict,
                   backend="reference")
        assert s.flatten().tolist() == expected


def test_defaults_are_the_paper():
    """With every new option at its default, the reference computes SPEC.md 2 bit for bit."""
    gen = torch.Generator().manual_seed(2)
    x = 1.3 * torch.randn(9, 2, 3, 5, generator=gen, dtype=f64)
    alpha = torch.rand(3, generator=gen, dtype=f64)
    defaults = reference.plif(x, alpha, **reference.NEURON_DEFAULTS)
    v = s = torch.zeros_like(x[0])
    spikes = []
    for x_t in x:
        v = alpha.view(1, -1, 1) * v + x_t - 1.0 * s
        s = (v >= 1.0).double()
        spikes.append(s)
    assert torch.equal(defaults, torch.stack(spikes))


@pytest.mark.parametrize("opts", ALL_OPTIONS, ids=option_id)
def test_reference_chunks_equal_one_call(opts):
    """Carrying the returned state into the next call equals one call over all steps, in
    spiking and smooth mode, gradients included."""
    gen = torch.Generator().manual_seed(3)
    x = (1.3 * torch.randn(8, 2, 3, generator=gen, dtype=f64)).requires_grad_()
    alpha = torch.rand(3, generator=gen, dtype=f64).requires_grad_()
    for spiking in (True, False):
        kw = dict(v_th=0.9, gamma=4.0, spiking=spiking, return_state=True, **opts)
        whole, (v, s) = reference.plif(x, alpha, **kw)
        first, state = reference.plif(x[:3], alpha, **kw)
        second, (v2, s2) = reference.plif(x[3:], alpha, state=state, **kw)
        torch.testing.assert_close(torch.cat([first, second]), whole, rtol=0, atol=0)
        torch.testing.assert_close((v2, s2), (v, s), rtol=0, atol=0)
        g1 = torch.autograd.grad((whole.sum() + v.sum()), (x, alpha))
        g2 = torch.autograd.grad((first.sum() + second.sum() + v2.sum()), (x, alpha))
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("signed,surrogate,scale", [
    (False, "atan", 1.0), (False, "atan", 0.4), (True, "atan", 1.7), (False, "sigmoid", 1.0),
    (False, "sigmoid", 2.5)])
def test_fire_surrogate_is_the_smooth_derivative(signed, surrogate, scale):
    """The surrogate derivative used in spiking mode is the exact derivative of the smooth
    mode's forward (gradcheck of the smooth forward against its own backward)."""
    v = (2 * torch.randn(40, dtype=f64)).requires_grad_()
    torch.autograd.gradcheck(
        lambda v: reference.FireFunction.apply(v, 0.8, 3.0, signed, False, False, surrogate,
                                               scale), (v,))
    grad_spiking, = torch.autograd.grad(
        reference.FireFunction.apply(v, 0.8, 3.0, signed, True, False, surrogate, scale).sum(),
        v)
    grad_smooth, = torch.autograd.grad(
        reference.FireFunction.apply(v, 0.8, 3.0, signed, False, False, surrogate, scale).sum(),
        v)
    torch.testing.assert_close(grad_spiking, grad_smooth, rtol=1e-14, atol=1e-14)
    if surrogate == "atan":  # the peak at v_th is the scale (SPEC.md 1: peak 1 times scale)
        assert grad_spiking.max() <= scale * (1 + 1e-12)


@pytest.mark.parametrize("changes,error,match", [
    (dict(reset="subtract"), ValueError, r"\breset\b"),
    (dict(reset=None), TypeError, r"\breset\b"),
    (dict(surrogate="fast_sigmoid"), ValueError, r"\bsurrogate\b"),
    (dict(surrogate=3), TypeError, r"\bsurrogate\b"),
    (dict(signed=True, reset="hard"), ValueError, r"signed.*reset"),
    (dict(signed=True, surrogate="sigmoid"), ValueError, r"signed.*surrogate"),
    (dict(v_reset=float("inf")), ValueError, r"v_reset"),
    (dict(v_reset="0"), TypeError, r"v_reset"),
    (dict(surrogate_scale=0.0), ValueError, r"surrogate_scale"),
    (dict(surrogate_scale=-1.0), ValueError, r"surrogate_scale"),
    (dict(surrogate_scale=float("nan")), ValueError, r"surrogate_scale"),
    (dict(reset_before_leak="yes"), TypeError, r"reset_before_leak"),
    (dict(decay_input=None), TypeError, r"decay_input"),
    (dict(strict_threshold=2), TypeError, r"strict_threshold"),
])
def test_bad_options(changes, error, match):
    x = torch.randn(4, 2, 3, 5)
    for backend in ("reference", "auto"):
        with pytest.raises(error, match=match):
            F.plif(x, torch.rand(3), backend=backend, **changes)
