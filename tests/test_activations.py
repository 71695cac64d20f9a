"""Spike activations on the reference backend mean what SPEC.md 1 says."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import neurokern as nk
from neurokern import reference

OPS = {"spike": nk.spike, "signed_spike": nk.signed_spike}
v_ths = st.floats(0.1, 2.0)
gammas = st.floats(0.5, 20.0)


@pytest.mark.parametrize("op", OPS)
@given(v_th=v_ths, gamma=gammas, seed=st.integers(0, 2**16))
def test_backward_is_derivative_of_smooth_primitive(op, v_th, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    v = (3 * torch.randn(17, generator=gen, dtype=torch.float64)).requires_grad_()
    fn = lambda v: OPS[op](v, v_th, gamma, spiking=False, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v,))


@pytest.mark.parametrize("op", OPS)
@given(v_th=v_ths, gamma=gammas, seed=st.integers(0, 2**16))
def test_spiking_backward_is_the_surrogate(op, v_th, gamma, seed):
    """The step's backward equals the smooth primitive's derivative at the same points, and
    the closed form of SPEC.md 1."""
    gen = torch.Generator().manual_seed(seed)
    v = 3 * torch.randn(33, generator=gen, dtype=torch.float64)
    grads = []
    for spiking in (True, False):
        vv = v.clone().requires_grad_()
        OPS[op](vv, v_th, gamma, spiking=spiking, backend="reference").sum().backward()
        grads.append(vv.grad)
    if op == "spike":
        expected = 1 / (1 + gamma * (v - v_th) ** 2)
    else:
        c = 1 + 1 / (1 + 4 * gamma * v_th**2)
        expected = (1 / (1 + gamma * (v - v_th) ** 2) + 1 / (1 + gamma * (v + v_th) ** 2)) / c
    torch.testing.assert_close(grads[0], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[1], expected, rtol=1e-12, atol=0)


@given(v_th=v_ths, gamma=gammas, seed=st.integers(0, 2**16))
def test_signed_spike_is_odd(v_th, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    v = 3 * torch.randn(64, generator=gen, dtype=torch.float64)
    v = torch.cat([v, torch.tensor([v_th, -v_th, 0.0], dtype=torch.float64)])
    for spiking in (True, False):
        pos, neg = v.clone().requires_grad_(), (-v).clone().requires_grad_()
        s_pos = nk.signed_spike(pos, v_th, gamma, spiking=spiking, backend="reference")
        s_neg = nk.signed_spike(neg, v_th, gamma, spiking=spiking, backend="reference")
        torch.testing.assert_close(s_neg, -s_pos, rtol=1e-14, atol=1e-15)
        s_pos.sum().backward()
        s_neg.sum().backward()
        torch.testing.assert_close(neg.grad, pos.grad, rtol=1e-14, atol=0)  # surrogate is even


@given(v_th=v_ths, gamma=gammas)
def test_values_at_the_threshold(v_th, gamma):
    below = math.nextafter(v_th, 0.0)
    v = torch.tensor([v_th, below, -below, -v_th, 0.0], dtype=torch.float64, requires_grad=True)
    s = nk.spike(v, v_th, gamma, backend="reference")
    assert s.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    ss = nk.signed_spike(v, v_th, gamma, backend="reference")
    assert ss.tolist() == [1.0, 0.0, 0.0, -1.0, 0.0]
    # Both surrogates peak at exactly 1, at the threshold(s).
    assert reference.surrogate_spike(v[:1].detach(), v_th, gamma).item() == 1.0
    peak = reference.surrogate_signed_spike(v.detach()[[0, 3]], v_th, gamma)
    torch.testing.assert_close(peak, torch.ones(2, dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_and_exact_values(op, dtype):
    v = torch.linspace(-3, 3, 101).to(dtype)
    s = OPS[op](v, backend="reference")
    assert s.dtype == dtype and s.shape == v.shape
    assert set(s.tolist()) <= {-1.0, 0.0, 1.0}
    expected = (v >= 1).to(dtype) - ((v <= -1).to(dtype) if op == "signed_spike" else 0)
    assert torch.equal(s, expected)


def test_modules_match_functional():
    v = torch.randn(5, 7, dtype=torch.float64)
    assert torch.equal(nk.nn.Spike(0.5, 4.0)(v), nk.spike(v, 0.5, 4.0))
    assert torch.equal(nk.nn.SignedSpike(0.5, 4.0)(v), nk.signed_spike(v, 0.5, 4.0))
    smooth = nk.nn.SignedSpike(0.5, 4.0, spiking=False)(v)
    assert torch.equal(smooth, nk.signed_spike(v, 0.5, 4.0, spiking=False))
