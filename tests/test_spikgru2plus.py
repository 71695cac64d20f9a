"""The SpikGRU2+ reference and module mean what SPEC.md 3 says, with nn.GRU's conventions."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

import neurokern as nk

f64 = torch.float64


def layer_params(i, h, gen, dtype=f64, bias=True):
    k = h ** -0.5
    w_ih = (2 * torch.rand(3 * h, i, generator=gen, dtype=dtype) - 1) * 3 * k
    w_hh = (2 * torch.rand(3 * h, h, generator=gen, dtype=dtype) - 1) * 3 * k
    b_ih = torch.randn(3 * h, generator=gen, dtype=dtype) if bias else None
    b_hh = torch.randn(3 * h, generator=gen, dtype=dtype) if bias else None
    alpha = torch.rand(h, generator=gen, dtype=dtype)
    return [w_ih, w_hh, b_ih, b_hh, alpha]


def test_one_step_by_hand():
    """T = 1 from zero state: U s_0 = 0, so gh = b_hh and everything is elementwise."""
    gen = torch.Generator().manual_seed(0)
    w_ih, w_hh, b_ih, b_hh, alpha = layer_params(3, 4, gen)
    x = 2 * torch.randn(1, 2, 3, generator=gen, dtype=f64)
    s, (v, i, s_last) = nk.spikgru2plus(x, w_ih, w_hh, b_ih, b_hh, alpha, backend="reference")
    gi = x[0] @ w_ih.T + b_ih
    r = torch.sigmoid(gi[:, :4] + b_hh[:4])
    z = torch.sigmoid(gi[:, 4:8] + b_hh[4:8])
    i_exp = gi[:, 8:] + b_hh[8:] * r
    v_exp = (1 - z) * i_exp
    torch.testing.assert_close(i, i_exp, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v, v_exp, rtol=1e-14, atol=1e-14)
    assert torch.equal(s[0], (v_exp >= 1).double() - (v_exp <= -1).double())
    assert torch.equal(s_last, s[0])


def test_two_steps_by_hand_reset_and_leak():
    """Step 2 uses U s_1, the leak on i and the reset -v_th s_1."""
    gen = torch.Generator().manual_seed(1)
    w_ih, w_hh, b_ih, b_hh, alpha = layer_params(2, 3, gen)
    x = 3 * torch.randn(2, 1, 2, generator=gen, dtype=f64)
    s, (v, i, _) = nk.spikgru2plus(x, w_ih, w_hh, b_ih, b_hh, alpha, v_th=0.5,
                                   backend="reference")
    _, (v1, i1, s1) = nk.spikgru2plus(x[:1], w_ih, w_hh, b_ih, b_hh, alpha, v_th=0.5,
                                      backend="reference")
    assert s1.abs().sum() > 0  # the reset term matters in this draw
    gi, gh = x[1] @ w_ih.T + b_ih, s1 @ w_hh.T + b_hh
    r = torch.sigmoid(gi[:, :3] + gh[:, :3])
    z = torch.sigmoid(gi[:, 3:6] + gh[:, 3:6])
    i_exp = alpha * i1 + gi[:, 6:] + gh[:, 6:] * r
    v_exp = z * v1 + (1 - z) * i_exp - 0.5 * s1
    torch.testing.assert_close(i, i_exp, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v, v_exp, rtol=1e-14, atol=1e-14)


@given(seed=st.integers(0, 2**16), t=st.integers(1, 6), signed=st.booleans())
def test_without_reset_gate_r_has_no_effect(seed, t, signed):
    gen = torch.Generator().manual_seed(seed)
    h = 3
    params = [p.requires_grad_() for p in layer_params(4, h, gen)]
    x = 2 * torch.randn(t, 2, 4, generator=gen, dtype=f64)
    kw = dict(signed=signed, reset_gate=False, backend="reference")
    s, final = nk.spikgru2plus(x, *params, **kw)
    changed = [p.detach().clone() for p in params]
    for p in changed[:4]:
        p[:h] += torch.randn(p[:h].shape, generator=gen, dtype=f64)  # the r rows
    s2, final2 = nk.spikgru2plus(x, *changed, **kw)
    assert torch.equal(s, s2) and all(torch.equal(a, b) for a, b in zip(final, final2))
    loss = (s * torch.randn(s.shape, generator=gen, dtype=f64)).sum() + final[0].sum()
    for g in torch.autograd.grad(loss, params[:4]):
        assert torch.all(g[:h] == 0)


def compose(model, x, state, dropout_seed):
    """What nn.GRU-style stacking means, written out with the functional op."""
    t_dim = 1 if model.batch_first else 0
    dirs = model.num_directions
    finals = []
    torch.manual_seed(dropout_seed)
    for layer in range(model.num_layers):
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            st0 = None if state is None else tuple(t[idx] for t in state)
            xin = torch.flip(x, [t_dim]) if d else x
            out, fin = nk.spikgru2plus(xin, *model.layer_parameters(layer, d),
                                       v_th=model.v_th, gamma=model.gamma, signed=model.signed,
                                       reset_gate=model.reset_gate,
                                       batch_first=model.batch_first, state=st0,
                                       spiking=model.spiking, backend="reference")
            outs.append(torch.flip(out, [t_dim]) if d else out)
            finals.append(fin)
        x = torch.cat(outs, -1)
        if layer < model.num_layers - 1 and model.training:
            x = torch.nn.functional.dropout(x, model.dropout, training=True)
    return x, tuple(torch.stack([f[n] for f in finals]) for n in range(3))


@given(
    seed=st.integers(0, 2**16), layers=st.integers(1, 3), bidirectional=st.booleans(),
    batch_first=st.booleans(), signed=st.booleans(), reset_gate=st.booleans(),
    with_state=st.booleans(), dropout=st.sampled_from([0.0, 0.3]),
)
def test_module_equals_layer_by_layer_composition(seed, layers, bidirectional, batch_first,
                                                  signed, reset_gate, with_state, dropout):
    torch.manual_seed(seed)
    model = nk.nn.SpikGRU2Plus(3, 4, layers, batch_first=batch_first,
                               dropout=dropout if layers > 1 else 0.0,
                               bidirectional=bidirectional, signed=signed, reset_gate=reset_gate,
                               v_th=0.7, backend="reference").double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    x = torch.randn((2, 5, 3) if batch_first else (5, 2, 3), dtype=f64)
    state = None
    if with_state:
        state = tuple(torch.randn(layers * model.num_directions, 2, 4, dtype=f64)
                      for _ in range(3))
    torch.manual_seed(123)
    out, final = model(x, state)
    out_c, final_c = compose(model, x, state, 123)
    assert out.abs().sum() > 0
    assert torch.equal(out, out_c)
    assert all(torch.equal(a, b) for a, b in zip(final, final_c))
    assert out.shape[-1] == 4 * model.num_directions


def test_unbatched_input_like_nn_gru():
    model = nk.nn.SpikGRU2Plus(3, 4, 2, bidirectional=True).double()
    x = 3 * torch.randn(6, 3, dtype=f64)
    out, (v, i, s) = model(x)
    out_b, (vb, ib, sb) = model(x.unsqueeze(1))
    assert out.shape == (6, 8) and v.shape == (4, 4)
    assert torch.equal(out, out_b[:, 0]) and torch.equal(v, vb[:, 0])


@pytest.mark.parametrize("bias", [True, False])
def test_nn_gru_state_dict_loads(bias):
    gru = torch.nn.GRU(5, 6, num_layers=2, bias=bias, bidirectional=True, batch_first=True)
    model = nk.nn.SpikGRU2Plus(5, 6, num_layers=2, bias=bias, bidirectional=True,
                               batch_first=True)
    missing, unexpected = model.load_state_dict(gru.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == ["alpha_l0", "alpha_l0_reverse", "alpha_l1", "alpha_l1_reverse"]
    for name, p in gru.named_parameters():
        assert torch.equal(getattr(model, name), p)
    converted = nk.nn.SpikGRU2Plus.from_gru(gru, alpha_init=0.5)
    assert converted.batch_first and converted.bidirectional and converted.num_layers == 2
    for name, p in gru.named_parameters():
        assert torch.equal(getattr(converted, name), p)
    assert torch.all(converted.alpha_l1_reverse == 0.5)
    # And back: every nn.GRU key is there with nn.GRU's shape.
    back = {k: v for k, v in converted.state_dict().items() if not k.startswith("alpha_")}
    torch.nn.GRU(5, 6, num_layers=2, bias=bias, bidirectional=True).load_state_dict(back)


@given(seed=st.integers(0, 2**16), layers=st.integers(1, 3), split=st.integers(1, 6),
       spiking=st.booleans())
def test_streaming_in_chunks_equals_one_pass(seed, layers, split, spiking):
    torch.manual_seed(seed)
    model = nk.nn.SpikGRU2Plus(3, 4, layers, spiking=spiking, backend="reference").double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    x = torch.randn(7, 2, 3, dtype=f64, requires_grad=True)
    out, final = model(x)
    out1, mid = model(x[:split])
    out2, final_c = model(x[split:], mid)
    chunked = torch.cat([out1, out2])
    # The input products of a chunk round differently from the whole sequence's (BLAS blocks by
    # size), so states agree to float64 rounding; spikes are exactly equal.
    torch.testing.assert_close(chunked, out, rtol=1e-12, atol=1e-12)
    if spiking:
        assert torch.equal(chunked, out)
    for a, b in zip(final, final_c):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    w = torch.randn(out.shape, dtype=f64)
    loss = lambda o, f: (o * w).sum() + f[0].sum() + f[1].sum()  # noqa: E731
    params = [x, *model.parameters()]
    g = torch.autograd.grad(loss(out, final), params)
    g_c = torch.autograd.grad(loss(chunked, final_c), params)
    for a, b in zip(g, g_c):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("signed,reset_gate", [(True, True), (False, False)])
def test_smooth_gradcheck_two_layer_bidirectional(signed, reset_gate):
    """Smooth-mode gradcheck of the whole stack: input, initial state and every parameter
    (weights, biases, leaks), through the output and the final state."""
    torch.manual_seed(0)
    model = nk.nn.SpikGRU2Plus(3, 4, 2, bidirectional=True, signed=signed,
                               reset_gate=reset_gate, spiking=False, v_th=0.6, gamma=2.0,
                               backend="reference").double()
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = torch.randn(4, 2, 3, dtype=f64, requires_grad=True)
    state = tuple(torch.randn(4, 2, 4, dtype=f64, requires_grad=True) for _ in range(3))

    def fn(x, v0, i0, s0, *ps):
        out, (v, i, s) = functional_call(model, dict(zip(names, ps)), (x, (v0, i0, s0)))
        return out, v, i, s

    assert torch.autograd.gradcheck(fn, (x, *state, *params))
