"""Fused spike / signed_spike backends against the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import neurokern as nk
from conftest import backend_device, fused_backends

OPS = {"spike": nk.spike, "signed_spike": nk.signed_spike}
CASES = [case for op in OPS for case in fused_backends(op, with_op=True)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("op,backend", CASES)
@given(n=st.integers(1, 3000), dtype=st.sampled_from(DTYPES), v_th=st.floats(0.1, 2.0),
       gamma=st.floats(0.5, 20.0), seed=st.integers(0, 2**16), spiking=st.booleans())
def test_equals_reference(poison_empty, op, backend, n, dtype, v_th, gamma, seed, spiking):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    x[: n // 10] = v_th  # exactly at the threshold(s): the comparisons must be >= and <=
    x[n // 10: n // 5] = -v_th
    x = x.to(device)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(device)
    outs = []
    for be in ("reference", backend):
        xx = x.clone().requires_grad_()
        s = OPS[op](xx, v_th, gamma, spiking=spiking, backend=be)
        (dx,) = torch.autograd.grad(s, xx, g)
        outs.append((s, dx))
    (s_ref, dx_ref), (s, dx) = outs
    assert s.dtype == dx.dtype == dtype
    if spiking:
        assert torch.equal(s, s_ref)
    # Same formula, possibly another rounding order: a few ulps of the compute dtype, plus one
    # ulp of the output dtype (the Triton interpreter truncates when it narrows).
    compute_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    tol = 8 * compute_eps + torch.finfo(dtype).eps
    torch.testing.assert_close(s.double(), s_ref.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), dx_ref.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("op,backend", CASES)
def test_strided_and_shaped_input(op, backend):
    device = backend_device(backend)
    x = torch.randn(6, 5, 4, device=device).transpose(0, 2)  # not contiguous
    s = OPS[op](x, backend=backend)
    assert s.shape == x.shape and torch.equal(s, OPS[op](x, backend="reference"))
    empty = torch.empty(0, 3, device=device)
    assert OPS[op](empty, backend=backend).shape == (0, 3)


@pytest.mark.parametrize("op,backend", CASES)
def test_smooth_gradcheck(op, backend):
    device = backend_device(backend)
    x = (3 * torch.randn(40, dtype=torch.float64)).to(device).requires_grad_()
    fn = lambda x: OPS[op](x, 0.7, 3.0, spiking=False, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("op,backend", CASES)
def test_opcheck(op, backend):
    device = backend_device(backend)
    from neurokern.spike_ops import spike_ops

    fwd, bwd = spike_ops(backend)
    x = torch.randn(3, 17, device=device)
    signed = op == "signed_spike"
    for spiking in (True, False):
        torch.library.opcheck(fwd, (x, 1.0, 10.0, signed, spiking))
    torch.library.opcheck(bwd, (torch.randn_like(x), x, 0.5, 2.0, signed))


@pytest.mark.parametrize("op,backend", CASES)
def test_compile_fullgraph(op, backend):
    device = backend_device(backend)
    torch._dynamo.reset()
    module = nk.nn.SignedSpike(backend=backend) if op == "signed_spike" else \
        nk.nn.Spike(backend=backend)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), module).to(device)
    x = torch.randn(5, 4, device=device)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(out, model(x))
    out.sum().backward()
