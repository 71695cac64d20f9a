"""neurokern.compat.snntorch.Leaky against snnTorch itself (when installed) and against a
transcription of snnTorch's equations (always).

fp64 throughout: spikes exactly equal (float32, as snnTorch's), the membrane and the gradients
(input, beta, graded_spikes_factor, through the returned membrane) to fp64 round-off, for every
combination of the constructor arguments the two share, single-step calls and the fused
multi-step call, chunked, after `init_leaky()`. One exception, snnTorch's own rounding: with
`reset_delay=False` its reset takes the gradient through its float32 spikes, so there the
gradients agree to float32 round-off (the equations test checks them to fp64 round-off).
"""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import compat_library, reference_and_cpu
from neurokern.compat import snntorch as nk
from neurokern.compat import surrogate as nk_surrogate

snntorch, snn_surrogate, needs_snntorch = compat_library("snntorch", "snntorch.surrogate")

BACKENDS = reference_and_cpu("plif")
T = 8
MECHANISMS = [("subtract", True), ("zero", True), ("zero", False), ("none", True), ("none", False)]
SPIKE_GRADS = [None, ("atan", 3.0), ("sigmoid", 5)]
# (step shape, beta): a scalar, one beta per feature (clamped: values outside [0, 1]), one per
# channel of a conv map ([C, 1, 1]), one per column ([W]).
BETAS = [
    ((3, 5), 0.8),
    ((3, 5), [0.5, 0.95, 1.3, 0.7, -0.1]),
    ((2, 3, 2, 4), [[[0.9]], [[0.6]], [[0.3]]]),
    ((2, 3, 2, 4), [0.9, 0.2, 1.0, 0.5]),
]


def _cases():
    for (mechanism, delay), spike_grad, (shape, beta), threshold in itertools.product(
            MECHANISMS, SPIKE_GRADS, BETAS, (1.0, 0.7)):
        yield pytest.param(
            dict(reset_mechanism=mechanism, reset_delay=delay, threshold=threshold,
                 learn_beta=True, graded_spikes_factor=1.5 if threshold == 1.0 else 1.0,
                 learn_graded_spikes_factor=threshold == 1.0),
            spike_grad, shape, beta,
            id=f"{mechanism}-{delay}-{spike_grad}-{shape}-{beta}-{threshold}")


CASES = list(_cases())


def _spike_grad(spike_grad, library):
    if spike_grad is None:
        return None
    name, value = spike_grad
    return getattr(library, name)(value)


def _pair(kwargs, spike_grad, beta, backend):
    theirs = snntorch.Leaky(beta=torch.tensor(beta), spike_grad=_spike_grad(spike_grad,
                            snn_surrogate), **kwargs).double()
    ours = nk.Leaky(beta=torch.tensor(beta), spike_grad=_spike_grad(spike_grad, snn_surrogate),
                    backend=backend, **kwargs).double()
    return theirs, ours


def _input(shape, scale=1.2, shift=0.5):
    return (torch.randn((T, *shape), dtype=torch.float64) * scale + shift).requires_grad_()


def _weights(shape):
    # Dyadic weights: snnTorch multiplies the float32 gradient of its spikes by the sigmoid's
    # slope in float32, exactly for these.
    return (torch.randint(-8, 9, (T, *shape)).float() / 4,
            torch.randn(shape, dtype=torch.float64))


def _loop(module, x):
    """snnTorch's usual loop: `mem = lif.init_leaky()`, then `spk, mem = lif(x[t], mem)`."""
    mem = module.init_leaky()
    spikes = []
    for x_t in x:
        spk, mem = module(x_t, mem)
        spikes.append(spk)
    return torch.stack(spikes), mem


def _fused(module, x):
    module.init_leaky()
    return module.multi_step(x)


def _outputs_and_grads(run, module, x, weights):
    s, mem = run(module, x)
    loss = (s.double() * weights[0].double()).sum() + (mem * weights[1]).sum()
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return s.detach(), mem.detach(), grads


def _assert_same(ours, theirs, tol=1e-10):
    (s_a, m_a, g_a), (s_b, m_b, g_b) = ours, theirs
    assert s_a.dtype == s_b.dtype == torch.float32
    assert torch.equal(s_a, s_b), f"{int((s_a != s_b).sum())} spikes differ"
    torch.testing.assert_close(m_a, m_b, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _tolerance(kwargs):
    # reset_delay=False: snnTorch's reset gradient passes its float32 spikes (module docstring)
    return 1e-10 if kwargs["reset_delay"] or kwargs["reset_mechanism"] == "none" else 2e-6


# ---------------------------------------------------------------------------------------------
# Against snnTorch
# ---------------------------------------------------------------------------------------------


@needs_snntorch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("run", [_loop, _fused], ids=["single_step", "multi_step"])
@pytest.mark.parametrize("kwargs,spike_grad,shape,beta", CASES)
def test_equals_snntorch(kwargs, spike_grad, shape, beta, run, backend):
    theirs, ours = _pair(kwargs, spike_grad, beta, backend)
    x, weights = _input(shape), _weights(shape)
    _assert_same(_outputs_and_grads(run, ours, x, weights),
                 _outputs_and_grads(_loop, theirs, x, weights), _tolerance(kwargs))


@needs_snntorch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mechanism,delay", MECHANISMS)
def test_chunked_multi_step_equals_snntorch(mechanism, delay, backend):
    """The membrane is kept between calls (snnTorch's `self.mem`): chunks equal one loop."""
    kwargs = dict(reset_mechanism=mechanism, reset_delay=delay, learn_beta=True)
    theirs, ours = _pair(kwargs, None, 0.85, backend)
    shape = (3, 5)
    x, weights = _input(shape), _weights(shape)

    def chunks(module, x):
        module.init_leaky()
        spikes = [module.multi_step(part)[0] for part in x.split([3, 1, 4])]
        return torch.cat(spikes), module.mem

    _assert_same(_outputs_and_grads(chunks, ours, x, weights),
                 _outputs_and_grads(_loop, theirs, x, weights), _tolerance(kwargs))


@needs_snntorch
@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_membrane_above_threshold_equals_snntorch(backend):
    """A membrane passed in above threshold is reset at the first step (snnTorch's r)."""
    shape = (3, 5)
    x, weights = _input(shape), _weights(shape)
    for mechanism in ("subtract", "zero"):
        theirs, ours = _pair(dict(reset_mechanism=mechanism), None, 0.9, backend)

        def start_high(module, x):
            mem = torch.full(shape, 1.5, dtype=torch.float64)
            spikes = []
            for x_t in x:
                spk, mem = module(x_t, mem)
                spikes.append(spk)
            return torch.stack(spikes), mem

        _assert_same(_outputs_and_grads(start_high, ours, x, weights),
                     _outputs_and_grads(start_high, theirs, x, weights))


@needs_snntorch
@pytest.mark.parametrize("init_hidden,output", [(True, False), (True, True), (False, True)])
def test_init_hidden_and_output_return_as_snntorch(init_hidden, output):
    theirs = snntorch.Leaky(beta=0.9, init_hidden=init_hidden, output=output).double()
    ours = nk.Leaky(beta=0.9, init_hidden=init_hidden, output=output,
                    backend="reference").double()
    x = _input((3, 5))
    for x_t in x:
        a, b = ours(x_t), theirs(x_t)
        assert type(a) is type(b)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    if init_hidden:
        for module in (ours, theirs):
            with pytest.raises(TypeError, match="init_hidden"):
                module(x[0], torch.zeros(3, 5))


@needs_snntorch
def test_state_dict_moves_between_snntorch_and_ours():
    theirs = snntorch.Leaky(beta=torch.tensor([0.3, 0.6]), threshold=0.8, learn_beta=True)
    ours = nk.Leaky(beta=torch.tensor([0.5, 0.5]), threshold=0.8, learn_beta=True)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.beta, theirs.beta)


@needs_snntorch
def test_fires_above_threshold_like_snntorch():
    """mem = 0.5 + 0.5 = 1.0 exactly: snnTorch does not fire (>), SpikingJelly would (>=)."""
    x = torch.full((3, 1, 1), 0.5, dtype=torch.float64)
    theirs = snntorch.Leaky(beta=1.0).double()
    ours = nk.Leaky(beta=1.0, backend="reference").double()
    s_a, _ = _fused(ours, x)
    s_b, _ = _loop(theirs, x)
    assert torch.equal(s_a, s_b)
    assert s_a.flatten().tolist() == [0.0, 0.0, 1.0]


@needs_snntorch
def test_half_precision_step_equals_snntorch():
    """A bfloat16 step: float32 spikes and a float32 membrane, as snnTorch's."""
    theirs = snntorch.Leaky(beta=0.9)
    ours = nk.Leaky(beta=0.9, backend="reference")
    x = (torch.randn(T, 4, 6) + 0.5).bfloat16()
    s_a, m_a = _loop(ours, x)
    s_b, m_b = _loop(theirs, x)
    assert s_a.dtype == s_b.dtype == m_a.dtype == m_b.dtype == torch.float32
    assert torch.equal(s_a, s_b)
    torch.testing.assert_close(m_a, m_b)


@needs_snntorch
@pytest.mark.parametrize("flip", [dict(strict_threshold=False), dict(detach_reset="flip"),
                                  dict(reset_before_leak="flip"), dict(surrogate_scale=1.001)])
def test_comparison_detects_a_wrong_option(flip, monkeypatch):
    """The comparison above would fail if the translation got one option wrong."""
    plif = nk.functional.plif

    def wrong_plif(*args, **kwargs):
        for key, value in flip.items():
            kwargs[key] = (not kwargs.get(key, False)) if value == "flip" else value
        return plif(*args, **kwargs)

    shape = (3, 5)
    x = (torch.randint(-2, 7, (T, *shape)).double() / 4).requires_grad_()  # hits 1.0 exactly
    weights = _weights(shape)
    theirs = snntorch.Leaky(beta=0.5, learn_beta=True).double()
    ours = nk.Leaky(beta=0.5, learn_beta=True, backend="reference").double()
    expected = _outputs_and_grads(_loop, theirs, x, weights)
    _assert_same(_outputs_and_grads(_fused, ours, x, weights), expected)
    monkeypatch.setattr(nk.functional, "plif", wrong_plif)
    with pytest.raises(AssertionError):
        _assert_same(_outputs_and_grads(_fused, ours, x, weights), expected)


@needs_snntorch
def test_refuses_other_surrogates():
    for spike_grad in (snn_surrogate.fast_sigmoid(), snn_surrogate.triangular(),
                       snn_surrogate.straight_through_estimator(), snn_surrogate.heaviside()):
        with pytest.raises(ValueError, match="spike_grad"):
            nk.Leaky(beta=0.9, spike_grad=spike_grad)


# ---------------------------------------------------------------------------------------------
# Without the library: against a transcription of snnTorch's equations
# ---------------------------------------------------------------------------------------------


class _Spike(torch.autograd.Function):
    """Theta(u) (u > 0) with snnTorch's atan / sigmoid surrogate derivative, in fp64."""

    @staticmethod
    def forward(ctx, u, surrogate):
        ctx.save_for_backward(u)
        ctx.surrogate = surrogate
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        g = ctx.surrogate
        if g.kind == "atan":
            d = g.scale / (1 + g.gamma * u * u)
        else:
            d = g.gamma * torch.sigmoid(g.gamma * u) * (1 - torch.sigmoid(g.gamma * u))
        return grad * d, None


def _equations(module, x):
    """snnTorch's Leaky.forward, step by step, with fp64 spikes (cast to float32 at the end)."""
    thr, gsf = float(module.threshold), module.graded_spikes_factor
    beta = module.beta.clamp(0, 1)
    mem = torch.zeros(x.shape[1:], dtype=x.dtype)
    spikes = []
    for x_t in x:
        r = (mem - thr > 0).to(x.dtype)
        if module.reset_mechanism == "subtract":
            mem = beta * mem + x_t - r * thr
        elif module.reset_mechanism == "zero":
            mem = beta * (1 - r) * mem + x_t
        else:
            mem = beta * mem + x_t
        spk = _Spike.apply(mem - thr, module.spike_grad)
        if not module.reset_delay and module.reset_mechanism == "zero":
            mem = mem - (spk - r) * mem
        spikes.append(spk.float() * gsf)
    return torch.stack(spikes), mem


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("run", [_loop, _fused], ids=["single_step", "multi_step"])
@pytest.mark.parametrize("kwargs,spike_grad,shape,beta", CASES)
def test_equals_snntorch_equations(kwargs, spike_grad, shape, beta, run, backend):
    ours = nk.Leaky(beta=torch.tensor(beta), spike_grad=_spike_grad(spike_grad, nk_surrogate),
                    backend=backend, **kwargs).double()
    x, weights = _input(shape), _weights(shape)
    _assert_same(_outputs_and_grads(run, ours, x, weights),
                 _outputs_and_grads(_equations, ours, x, weights))


def test_init_leaky_forgets_the_membrane():
    lif = nk.Leaky(beta=0.9, backend="reference").double()
    x = _input((3, 5))
    first, _ = _fused(lif, x)
    lif.multi_step(x)
    again, _ = _fused(lif, x)
    assert torch.equal(first, again)
    lif.multi_step(x)
    nk.Leaky.reset_hidden()
    assert torch.all(lif.mem == 0)


def test_refusals_name_the_argument():
    for name in ("surrogate_disable", "inhibition", "learn_threshold"):
        with pytest.raises(ValueError, match=name):
            nk.Leaky(beta=0.9, **{name: True})
    with pytest.raises(ValueError, match="state_quant"):
        nk.Leaky(beta=0.9, state_quant=lambda mem: mem)
    with pytest.raises(ValueError, match="reset_delay"):
        nk.Leaky(beta=0.9, reset_delay=False)
    with pytest.raises(ValueError, match="reset_mechanism"):
        nk.Leaky(beta=0.9, reset_mechanism="hard")
    with pytest.raises(ValueError, match="threshold"):
        nk.Leaky(beta=0.9, threshold=torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="spike_grad"):
        nk.Leaky(beta=0.9, spike_grad=lambda u: (u > 0).float())
    with pytest.raises(ValueError, match="backend"):
        nk.Leaky(beta=0.9, backend="cupy")
    lif = nk.Leaky(beta=torch.rand(4, 5), backend="reference")
    with pytest.raises(ValueError, match="beta"):  # varies over the batch dim
        lif.multi_step(torch.randn(T, 4, 5))


@needs_snntorch
@given(data=st.data())
def test_drawn_cases_equal_snntorch(data):
    """Drawn shapes (T = 1, 1-d to 4-d steps), betas, thresholds and arguments."""
    mechanism, delay = data.draw(st.sampled_from(MECHANISMS))
    step = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    per_dim = data.draw(st.integers(0, len(step) - 1))  # beta varies over dims per_dim..
    beta_shape = [1 if d < per_dim or d == 0 else n for d, n in enumerate(step)][1:]
    beta = (torch.rand(beta_shape, dtype=torch.float64) * 1.4 - 0.2).tolist() \
        if data.draw(st.booleans()) and beta_shape else data.draw(st.floats(0.0, 1.0))
    kwargs = dict(reset_mechanism=mechanism, reset_delay=delay, learn_beta=True,
                  threshold=data.draw(st.floats(0.3, 2.0)))
    spike_grad = data.draw(st.sampled_from(SPIKE_GRADS[:2]))  # sigmoid: float32 slope rounding
    run = data.draw(st.sampled_from([_loop, _fused]))
    theirs, ours = _pair(kwargs, spike_grad, beta, data.draw(st.sampled_from(BACKENDS)))
    steps = data.draw(st.integers(1, 6))
    x = (torch.randn((steps, *step), dtype=torch.float64) * 1.5 + 0.4).requires_grad_()
    weights = (torch.randint(-8, 9, (steps, *step)).float() / 4,
               torch.randn(step, dtype=torch.float64))
    _assert_same(_outputs_and_grads(run, ours, x, weights),
                 _outputs_and_grads(_loop, theirs, x, weights), _tolerance(kwargs))


@pytest.mark.parametrize("shape,beta", BETAS + [((6,), 0.9)], ids=str)
def test_layout_is_a_view(shape, beta, monkeypatch):
    """The dims where beta varies become plif's channel dim by a view of the input, no copy."""
    seen = []
    plif = nk.functional.plif

    def spy(x, alpha, **kwargs):
        seen.append((x, alpha))
        return plif(x, alpha, **kwargs)

    monkeypatch.setattr(nk.functional, "plif", spy)
    x = torch.randn(T, *shape)
    nk.Leaky(beta=torch.tensor(beta), backend="reference").multi_step(x)
    x_seen, alpha = seen[0]
    assert x_seen.dim() >= 3 and x_seen.data_ptr() == x.data_ptr()
    assert alpha.dim() == 0 or alpha.shape[0] == x_seen.shape[2]
