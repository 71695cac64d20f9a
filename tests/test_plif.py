"""The multi-step PLIF/IF reference means what SPEC.md 2 says."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import neurokern as nk

f64 = torch.float64


@st.composite
def plif_cases(draw, max_t=6):
    t = draw(st.integers(1, max_t))
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    return dict(
        shape=(t, b, c, *spatial),
        signed=draw(st.booleans()),
        v_th=draw(st.floats(0.3, 1.5)),
        gamma=draw(st.floats(1.0, 10.0)),
        scalar_leak=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def make(case, dtype=f64):
    gen = torch.Generator().manual_seed(case["seed"])
    x = (1.2 * torch.randn(case["shape"], generator=gen, dtype=dtype)).requires_grad_()
    c = case["shape"][2]
    alpha = torch.rand(() if case["scalar_leak"] else (c,), generator=gen, dtype=dtype)
    return x, alpha.requires_grad_()


def run(x, alpha, case, **kwargs):
    return nk.plif(x, alpha, v_th=case["v_th"], gamma=case["gamma"], signed=case["signed"],
                   backend="reference", **kwargs)


def grads(out, inputs, seed=1):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def test_hand_computed_if_neuron():
    # Constant input 0.4, v_th = 1: v = .4, .8, 1.2 (spike), .6, 1.0 (spike), .4, .8, 1.2 ...
    x = torch.full((8, 1, 1), 0.4, dtype=f64)
    s, (v, s_last) = nk.plif(x, 1.0, return_state=True, backend="reference")
    assert s.flatten().tolist() == [0, 0, 1, 0, 1, 0, 0, 1]
    assert abs(v.item() - 1.2) < 1e-12 and s_last.item() == 1.0
    # A signed neuron fed a negative input fires -1 and the reset adds v_th back.
    s = nk.plif(-x, 1.0, signed=True, backend="reference")
    assert s.flatten().tolist() == [0, 0, -1, 0, -1, 0, 0, -1]


def test_hand_computed_leak():
    # alpha = 0.5, x = 1, 1, 1: v = 1 (spike), 0.5 + 1 - 1 = 0.5, 0.25 + 1 = 1.25 (spike)
    x = torch.ones(3, 1, 2, dtype=f64)
    alpha = torch.tensor([0.5, 0.0], dtype=f64)
    s, (v, _) = nk.plif(x, alpha, return_state=True, backend="reference")
    assert s[:, 0, 0].tolist() == [1, 0, 1] and v[0, 0].item() == 1.25
    assert s[:, 0, 1].tolist() == [1, 0, 1] and v[0, 1].item() == 1.0  # no leak: v = 1, 0, 1


@given(plif_cases())
def test_layouts_agree(case):
    x, alpha = make(case)
    s_tm, (v_tm, _) = run(x, alpha, case, return_state=True)
    x_bf = x.detach().transpose(0, 1).clone().requires_grad_()
    s_bf, (v_bf, _) = run(x_bf, alpha, case, batch_first=True, return_state=True)
    assert torch.equal(s_bf.transpose(0, 1), s_tm)
    assert torch.equal(v_bf, v_tm)
    g_tm = grads((s_tm, v_tm), (x, alpha))
    g_bf = grads((s_bf.transpose(0, 1), v_bf), (x_bf, alpha))
    torch.testing.assert_close(g_bf[0].transpose(0, 1), g_tm[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_bf[1], g_tm[1], rtol=1e-12, atol=1e-12)


@given(plif_cases())
def test_alpha_one_is_the_if_neuron(case):
    x, _ = make(case)
    ones = torch.ones(case["shape"][2], dtype=f64)
    s_plif = run(x, ones, case)
    s_if = nk.nn.IF(v_th=case["v_th"], gamma=case["gamma"], signed=case["signed"],
                    backend="reference")(x)
    assert torch.equal(s_plif, s_if)
    # IF integrates without loss: the membrane is the running sum of inputs minus the resets.
    _, (v, _) = run(x, ones, case, return_state=True)
    expected = x.sum(0) - case["v_th"] * s_plif[:-1].sum(0)
    torch.testing.assert_close(v, expected, rtol=1e-12, atol=1e-12)


@given(plif_cases())
def test_leak_is_per_channel(case):
    """Each channel evolves with its own leak, as if run alone with a scalar leak."""
    case = dict(case, scalar_leak=False)
    x, alpha = make(case)
    s = run(x, alpha, case)
    for c in range(x.shape[2]):
        s_c = run(x[:, :, c:c + 1], alpha[c], case)
        assert torch.equal(s[:, :, c:c + 1], s_c)


@pytest.mark.parametrize("spiking", [True, False])
@given(case=plif_cases(max_t=8), split=st.integers(1, 7))
def test_chunks_with_carried_state_equal_one_pass(spiking, case, split):
    x, alpha = make(case)
    t = x.shape[0]
    split = min(split, t)
    gen = torch.Generator().manual_seed(3)
    state0 = tuple(torch.randn(x.shape[1:], generator=gen, dtype=f64).requires_grad_()
                   for _ in range(2))
    whole, final = run(x, alpha, case, state=state0, return_state=True, spiking=spiking)
    first, mid = run(x[:split], alpha, case, state=state0, return_state=True, spiking=spiking)
    if split < t:
        second, final_c = run(x[split:], alpha, case, state=mid, return_state=True,
                              spiking=spiking)
        chunked = torch.cat([first, second])
    else:
        chunked, final_c = first, mid
    assert torch.equal(chunked, whole)
    assert all(torch.equal(a, b) for a, b in zip(final, final_c))
    inputs = (x, alpha, *state0)
    g_whole = grads((whole, *final), inputs)
    g_chunk = grads((chunked, *final_c), inputs)
    for gw, gc in zip(g_whole, g_chunk):
        torch.testing.assert_close(gc, gw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_smooth_gradcheck(signed, batch_first):
    """Smooth mode makes the loop differentiable: its gradient, through the leak and the
    initial state and through the returned final state, is exact. (`detach_reset` is by
    design not the true gradient, so it is not gradchecked.)"""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 3, 2, generator=gen, dtype=f64).requires_grad_()
    alpha = torch.rand(3, generator=gen, dtype=f64).requires_grad_()
    state_shape = x.shape[1:] if not batch_first else (5, 3, 2)
    v0 = torch.randn(state_shape, generator=gen, dtype=f64).requires_grad_()
    s0 = torch.rand(state_shape, generator=gen, dtype=f64).requires_grad_()

    def fn(x, alpha, v0, s0):
        s, (v, s_last) = nk.plif(x, alpha, v_th=0.8, gamma=3.0, signed=signed,
                                 batch_first=batch_first, state=(v0, s0), return_state=True,
                                 spiking=False, backend="reference")
        return s, v, s_last

    assert torch.autograd.gradcheck(fn, (x, alpha, v0, s0))


def test_detach_reset_changes_gradient_not_forward():
    x = (2 * torch.randn(6, 2, 3, dtype=f64)).requires_grad_()
    alpha = torch.full((3,), 0.9, dtype=f64)
    s1 = nk.plif(x, alpha, backend="reference")
    s2 = nk.plif(x, alpha, detach_reset=True, backend="reference")
    assert torch.equal(s1, s2) and s1.sum() > 0
    g1, = torch.autograd.grad(s1.sum(), x)
    g2, = torch.autograd.grad(s2.sum(), x)
    assert not torch.allclose(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_float32_state(dtype):
    x = torch.randn(20, 3, 4).to(dtype)
    alpha = torch.full((4,), 0.9)  # float32 parameter with half input is allowed
    s, (v, _) = nk.plif(x, alpha, return_state=True, backend="reference")
    assert s.dtype == dtype and v.dtype == dtype
    s32, (v32, _) = nk.plif(x.float(), alpha, return_state=True, backend="reference")
    assert torch.equal(s.float(), s32)
    assert torch.equal(v, v32.to(dtype))


def test_plif_module_leaks():
    x = torch.randn(4, 2, 3, 5, dtype=f64)
    direct = nk.nn.PLIF(3, alpha_init=0.7).double()
    sig = nk.nn.PLIF(3, alpha_init=0.7, leak="sigmoid").double()
    assert [n for n, _ in direct.named_parameters()] == ["alpha"]
    assert [n for n, _ in sig.named_parameters()] == ["alpha_logit"]
    torch.testing.assert_close(sig.leak_value(), direct.alpha.detach())
    assert torch.equal(direct(x), nk.plif(x, direct.alpha.detach()))
    sig(x, ).sum().backward()
    fixed = nk.nn.PLIF(3, learnable=False)
    assert list(fixed.parameters()) == [] and "alpha" in dict(fixed.named_buffers())
    shared = nk.nn.PLIF(None)
    assert shared.alpha.shape == ()


def test_clamp_leaks():
    model = torch.nn.Sequential(
        nk.nn.PLIF(3), nk.nn.PLIF(3, leak="sigmoid"),
        nk.nn.SpikGRU2Plus(4, 5, num_layers=2, bidirectional=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.copy_(torch.linspace(-1, 2, p.numel()).view(p.shape))
    nk.nn.clamp_leaks_(model)
    assert model[0].alpha.min() == 0 and model[0].alpha.max() == 1
    assert model[1].alpha_logit.min() == -1 and model[1].alpha_logit.max() == 2  # untouched
    for name, p in model[2].named_parameters():
        if name.startswith("alpha_"):
            assert p.min() == 0 and p.max() == 1
