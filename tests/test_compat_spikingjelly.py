"""neurokern.compat.spikingjelly against SpikingJelly itself (when installed) and against a
transcription of SpikingJelly's equations (always).

fp64 throughout: spikes exactly equal, the membrane `v` and the gradients (input, `w`, through
the returned `v`) to fp64 round-off, for every combination of the constructor arguments the
two share, in both step modes, chunked, and after `reset()`. The tests that need the library
skip with the reason when it is absent (CI installs it: requirements-compat.txt).
"""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import compat_library, reference_and_cpu
from neurokern.compat import spikingjelly as nk
from neurokern.compat import surrogate as nk_surrogate

sj_functional, sj, sj_surrogate, needs_sj = compat_library(
    "spikingjelly.activation_based.functional", "spikingjelly.activation_based.neuron",
    "spikingjelly.activation_based.surrogate")

BACKENDS = reference_and_cpu("plif")
NODES = ("IFNode", "LIFNode", "ParametricLIFNode")
SURROGATES = (("ATan", 2.0), ("Sigmoid", 4.0), ("ATan", 0.7), ("Sigmoid", 1.5))
T, N, F = 8, 3, 5


def _cases():
    """Every combination of the shared constructor arguments (tau / init_tau at two values)."""
    for node, v_reset, decay_input, detach_reset, (sname, salpha), v_threshold in \
            itertools.product(NODES, (None, 0.0, -0.25), (True, False), (False, True),
                              SURROGATES, (1.0, 0.6)):
        if node == "IFNode" and not decay_input:
            continue  # IFNode has no decay_input: one copy of its cases
        kwargs = dict(v_reset=v_reset, detach_reset=detach_reset, v_threshold=v_threshold)
        if node == "LIFNode":
            kwargs.update(tau=2.0 if sname == "ATan" else 3.7, decay_input=decay_input)
        elif node == "ParametricLIFNode":
            kwargs.update(init_tau=2.0 if sname == "ATan" else 3.7, decay_input=decay_input)
        yield pytest.param(node, kwargs, (sname, salpha),
                           id=f"{node}-{v_reset}-{decay_input}-{detach_reset}-{sname}{salpha}-"
                              f"{v_threshold}")


CASES = list(_cases())


def _pair(node, kwargs, surrogate, backend, step_mode="m"):
    """The library's module and ours with the same arguments, in fp64."""
    name, alpha = surrogate
    theirs = getattr(sj, node)(surrogate_function=getattr(sj_surrogate, name)(alpha=alpha),
                               step_mode=step_mode, **kwargs).double()
    ours = getattr(nk, node)(surrogate_function=getattr(sj_surrogate, name)(alpha=alpha),
                             step_mode=step_mode, backend=backend, **kwargs).double()
    return theirs, ours


def _input(shape=(T, N, F), scale=1.5, shift=0.5):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).requires_grad_()


def _run(module, x):
    """Spikes of all steps: one call in step_mode 'm', a loop over steps in 's'."""
    if module.step_mode == "m":
        return module(x)
    return torch.stack([module(x_t) for x_t in x])


def _outputs_and_grads(module, x, weights):
    """Spikes, final v, and the gradients of a loss on both w.r.t. x and the parameters."""
    s = _run(module, x)
    loss = (s * weights[0]).sum() + (module.v * weights[1]).sum()
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return s.detach(), module.v.detach(), grads


def _assert_same(ours, theirs, spiking=True):
    (s_a, v_a, g_a), (s_b, v_b, g_b) = ours, theirs
    assert s_a.dtype == s_b.dtype
    if spiking:
        assert torch.equal(s_a, s_b), f"{int((s_a != s_b).sum())} spikes differ"
    else:  # smooth mode: the surrogate's primitive, to round-off
        torch.testing.assert_close(s_a, s_b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v_a, v_b, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _weights(shape=(T, N, F)):
    return torch.randn(shape, dtype=torch.float64), torch.randn(shape[1:], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Against SpikingJelly
# ---------------------------------------------------------------------------------------------


@needs_sj
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step_mode", ["m", "s"])
@pytest.mark.parametrize("node,kwargs,surrogate", CASES)
def test_equals_spikingjelly(node, kwargs, surrogate, step_mode, backend):
    theirs, ours = _pair(node, kwargs, surrogate, backend, step_mode)
    x, weights = _input(), _weights()
    _assert_same(_outputs_and_grads(ours, x, weights), _outputs_and_grads(theirs, x, weights))


@needs_sj
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("v_reset", [None, 0.0])
def test_chunked_calls_equal_spikingjelly_one_call(node, v_reset, backend):
    """`v` carries the membrane and its graph between calls: three chunks equal one call."""
    theirs, ours = _pair(node, dict(v_reset=v_reset), ("ATan", 2.0), backend)
    x, weights = _input(), _weights()
    s = torch.cat([ours(x[:3]), ours(x[3:4]), ours(x[4:])])
    loss = (s * weights[0]).sum() + (ours.v * weights[1]).sum()
    got = s.detach(), ours.v.detach(), torch.autograd.grad(loss, [x, *ours.parameters()])
    _assert_same(got, _outputs_and_grads(theirs, x, weights))


@needs_sj
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("node", NODES)
def test_reset_equals_spikingjelly(node, backend):
    theirs, ours = _pair(node, dict(v_reset=-0.25), ("Sigmoid", 4.0), backend)
    x = _input()
    ours(x), theirs(x)
    ours.reset(), theirs.reset()
    assert ours.v == theirs.v == -0.25
    weights = _weights()
    _assert_same(_outputs_and_grads(ours, x, weights), _outputs_and_grads(theirs, x, weights))
    net = torch.nn.Sequential(ours)  # SpikingJelly's own helpers work on our nodes
    sj_functional.reset_net(net)
    assert ours.v == -0.25
    sj_functional.set_step_mode(net, "s")
    assert ours.step_mode == "s"
    ours(x[0])
    sj_functional.detach_net(net)
    assert not ours.v.requires_grad


@needs_sj
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(T, N), (T, N, 2, 3, 4), (T, 1, 1)], ids=str)
def test_layouts_equal_spikingjelly(shape, backend):
    """SpikingJelly's leak is a scalar: [T, N] and [T, N, ...] of any rank work."""
    theirs, ours = _pair("ParametricLIFNode", dict(v_reset=None), ("ATan", 2.0), backend)
    x, weights = _input(shape), _weights(shape)
    _assert_same(_outputs_and_grads(ours, x, weights), _outputs_and_grads(theirs, x, weights))


@needs_sj
@pytest.mark.parametrize("backend", BACKENDS)
def test_smooth_surrogate_equals_spikingjelly(backend):
    """spiking=False surrogates (the primitive in the forward) are honoured too."""
    x, weights = _input(), _weights()
    for name in ("ATan", "Sigmoid"):
        theirs = sj.LIFNode(surrogate_function=getattr(sj_surrogate, name)(spiking=False),
                            step_mode="m").double()
        ours = nk.LIFNode(surrogate_function=getattr(sj_surrogate, name)(spiking=False),
                          step_mode="m", backend=backend).double()
        _assert_same(_outputs_and_grads(ours, x, weights), _outputs_and_grads(theirs, x, weights),
                     spiking=False)


@needs_sj
def test_state_dict_moves_between_spikingjelly_and_ours():
    theirs = sj.ParametricLIFNode(init_tau=3.0)
    ours = nk.ParametricLIFNode(init_tau=5.0, backend="reference")
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.w, theirs.w)


@needs_sj
def test_fires_on_threshold_like_spikingjelly():
    """h = 0.5 + 0.5 = 1.0 exactly at t = 2: both fire (>=; snnTorch's > would not)."""
    x = torch.full((3, 1, 1), 0.5, dtype=torch.float64)
    theirs = sj.IFNode(v_reset=None, step_mode="m").double()
    ours = nk.IFNode(v_reset=None, step_mode="m", backend="reference").double()
    s = ours(x)
    assert torch.equal(s, theirs(x))
    assert s.flatten().tolist() == [0.0, 1.0, 0.0]


@needs_sj
@pytest.mark.parametrize("flip", [
    dict(reset_before_leak=False), dict(strict_threshold=True), dict(decay_input="flip"),
    dict(detach_reset="flip"), dict(surrogate_scale=1.001), dict(v_reset=0.1),
])
def test_comparison_detects_a_wrong_option(flip, monkeypatch):
    """The comparison above would fail if the translation got one option wrong: flip it in the
    call to plif and the results differ from SpikingJelly's."""
    plif = nk.functional.plif

    def wrong_plif(*args, **kwargs):
        for key, value in flip.items():
            kwargs[key] = (not kwargs[key]) if value == "flip" else value
        return plif(*args, **kwargs)

    # Grid inputs (multiples of 1/4 with tau = 2) land exactly on the threshold.
    x = (torch.randint(-2, 9, (T, N, F)).double() / 4).requires_grad_()
    weights = _weights()
    theirs = sj.LIFNode(v_reset=0.0, surrogate_function=sj_surrogate.ATan(),
                        step_mode="m").double()
    ours = nk.LIFNode(v_reset=0.0, surrogate_function=sj_surrogate.ATan(), step_mode="m",
                      backend="reference").double()
    expected = _outputs_and_grads(theirs, x, weights)
    _assert_same(_outputs_and_grads(ours, x, weights), expected)
    ours.reset()
    monkeypatch.setattr(nk.functional, "plif", wrong_plif)
    with pytest.raises(AssertionError):
        _assert_same(_outputs_and_grads(ours, x, weights), expected)


@needs_sj
def test_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match="surrogate_function"):
        nk.LIFNode(surrogate_function=sj_surrogate.PiecewiseQuadratic())
    with pytest.raises(ValueError, match="surrogate_function"):
        nk.LIFNode(surrogate_function=sj_surrogate.ATan(alpha=torch.tensor(2.0)))

    class MyATan(sj_surrogate.ATan):  # a subclass may change the function
        pass

    with pytest.raises(ValueError, match="surrogate_function"):
        nk.LIFNode(surrogate_function=MyATan())


# ---------------------------------------------------------------------------------------------
# Without the library: against a transcription of SpikingJelly's equations
# ---------------------------------------------------------------------------------------------


class _Spike(torch.autograd.Function):
    """Theta(u) (u >= 0) with SpikingJelly's ATan / Sigmoid surrogate derivative."""

    @staticmethod
    def forward(ctx, u, name, a):
        ctx.save_for_backward(u)
        ctx.name, ctx.a = name, a
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        a = ctx.a
        if ctx.name == "ATan":
            d = (a / 2) / (1 + (math.pi / 2 * a * u) ** 2)
        else:
            d = a * torch.sigmoid(a * u) * (1 - torch.sigmoid(a * u))
        return grad * d, None, None


def _equations(node, module, x, surrogate):
    """SpikingJelly's charge / fire / reset, step by step (its docstrings' equations)."""
    v_reset, v_th = module.v_reset, module.v_threshold
    rest = 0.0 if v_reset is None else v_reset
    v = torch.full(x.shape[1:], rest, dtype=x.dtype)
    spikes = []
    for x_t in x:
        if node == "IFNode":
            h = v + x_t
        else:
            k = 1 / module.tau if node == "LIFNode" else torch.sigmoid(module.w)
            h = v + (x_t - (v - rest)) * k if module.decay_input else v - (v - rest) * k + x_t
        s = _Spike.apply(h - v_th, *surrogate)
        r = s.detach() if module.detach_reset else s
        v = h - v_th * r if v_reset is None else r * v_reset + (1 - r) * h
        spikes.append(s)
    return torch.stack(spikes), v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("node,kwargs,surrogate", CASES)
def test_equals_spikingjelly_equations(node, kwargs, surrogate, backend):
    ours = getattr(nk, node)(surrogate_function=getattr(nk_surrogate, surrogate[0])(surrogate[1]),
                             step_mode="m", backend=backend, **kwargs).double()
    x, weights = _input(), _weights()
    s, v = _equations(node, ours, x, surrogate)
    loss = (s * weights[0]).sum() + (v * weights[1]).sum()
    expected = s.detach(), v.detach(), torch.autograd.grad(loss, [x, *ours.parameters()])
    _assert_same(_outputs_and_grads(ours, x, weights), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_modes_chunks_and_reset_agree(backend):
    """'s' steps, 'm' chunks and one 'm' call give the same spikes, v and gradients."""
    x, weights = _input(), _weights()
    results = []
    for chunks in ([T], [3, 1, 4], [1] * T):
        node = nk.ParametricLIFNode(v_reset=None, step_mode="m", backend=backend).double()
        node(_input())  # state from another input, then reset
        node.reset()
        assert node.v == 0.0
        s = torch.cat([node(part) for part in x.split(chunks)])
        loss = (s * weights[0]).sum() + (node.v * weights[1]).sum()
        results.append((s.detach(), node.v.detach(),
                        torch.autograd.grad(loss, [x, *node.parameters()])))
    single = nk.ParametricLIFNode(v_reset=None, step_mode="s", backend=backend).double()
    results.append(_outputs_and_grads(single, x, weights))
    for other in results[1:]:
        _assert_same(other, results[0])


def test_detach_cuts_the_graph_in_v():
    node = nk.LIFNode(step_mode="m", backend="reference").double()
    x = _input()
    node(x[:4])
    node.detach()
    assert not node.v.requires_grad
    s = node(x[4:])
    (g,) = torch.autograd.grad(s.sum() + node.v.sum(), x)
    assert torch.all(g[:4] == 0)


def test_refusals_name_the_argument():
    with pytest.raises(ValueError, match="store_v_seq"):
        nk.LIFNode(store_v_seq=True)
    node = nk.LIFNode()
    with pytest.raises(ValueError, match="store_v_seq"):
        node.store_v_seq = True
    for backend in ("torch", "cupy"):
        with pytest.raises(ValueError, match="SpikingJelly 0.x backend"):
            nk.IFNode(backend=backend)
    with pytest.raises(ValueError, match="backend"):
        nk.IFNode(backend="bogus")
    with pytest.raises(ValueError, match="surrogate_function"):
        nk.IFNode(surrogate_function=lambda u: (u >= 0).float())
    with pytest.raises(ValueError, match="v_threshold"):
        nk.IFNode(v_threshold=0.0)
    with pytest.raises(ValueError, match="tau"):
        nk.LIFNode(tau=1.0)
    with pytest.raises(ValueError, match="init_tau"):
        nk.ParametricLIFNode(init_tau=0.5)
    with pytest.raises(ValueError, match="step_mode"):
        nk.IFNode(step_mode="x")
    with pytest.raises(TypeError, match="detach_reset"):
        nk.IFNode(detach_reset=1)


@needs_sj
@given(data=st.data())
def test_drawn_cases_equal_spikingjelly(data):
    """Drawn shapes (T = 1, 2-d to 5-d), thresholds, time constants and arguments."""
    node = data.draw(st.sampled_from(NODES))
    kwargs = dict(v_reset=data.draw(st.sampled_from([None, 0.0, -0.5, 0.3])),
                  detach_reset=data.draw(st.booleans()),
                  v_threshold=data.draw(st.floats(0.3, 2.0)))
    if node != "IFNode":
        tau = data.draw(st.floats(1.1, 10.0))
        kwargs.update({"tau" if node == "LIFNode" else "init_tau": tau,
                       "decay_input": data.draw(st.booleans())})
    surrogate = (data.draw(st.sampled_from(["ATan", "Sigmoid"])), data.draw(st.floats(0.5, 6.0)))
    step_mode = data.draw(st.sampled_from(["m", "s"]))
    shape = data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=5))
    backend = data.draw(st.sampled_from(BACKENDS))
    theirs, ours = _pair(node, kwargs, surrogate, backend, step_mode)
    x, weights = _input(shape, scale=data.draw(st.floats(0.5, 3.0))), _weights(shape)
    _assert_same(_outputs_and_grads(ours, x, weights), _outputs_and_grads(theirs, x, weights))


@pytest.mark.parametrize("shape", [(T, N), (T,), (T, N, 2, 3)], ids=str)
def test_layout_is_a_view(shape, monkeypatch):
    """[T, N] (and [T]) reach plif as a view of the input with a unit channel dim, no copy."""
    seen = []
    plif = nk.functional.plif

    def spy(x, *args, **kwargs):
        seen.append(x)
        return plif(x, *args, **kwargs)

    monkeypatch.setattr(nk.functional, "plif", spy)
    x = torch.randn(shape)
    nk.LIFNode(step_mode="m", backend="reference")(x)
    assert seen[0].dim() >= 3 and seen[0].data_ptr() == x.data_ptr()
