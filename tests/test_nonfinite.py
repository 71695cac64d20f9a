"""Non-finite inputs on every fused backend give the reference's values: +-inf, NaN and finite
values whose products overflow, in the input of every op, forward and backward, NaN exactly
where the reference has NaN. Float64 and float32 (whose range the kernels' exp and atan must
respect as well)."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import neurokern as nk
from conftest import fused_backends

SPECIAL = (float("inf"), -float("inf"), float("nan"), 1e300, -1e300, 3e38, -3e38, 0.0)


def with_specials(shape, dtype, seed, fraction=0.3):
    """Normal values with a `fraction` of them replaced by SPECIAL values (in range of
    `dtype`: 1e300 becomes inf in float32)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * 2
    special = torch.tensor(SPECIAL, dtype=torch.float64)
    pick = torch.randint(len(SPECIAL), shape, generator=generator)
    where = torch.rand(shape, generator=generator) < fraction
    return torch.where(where, special[pick], x).to(dtype)


def assert_same(got, want, what):
    for k, (a, b) in enumerate(zip(got, want)):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m: f"{what}: tensor {k}: {m}")


def spikgru2plus_pair(backend, **kw):
    """(fused, reference): spikgru2plus on `backend` and the reference, each returning its
    spikes and final state as one tuple."""
    def fused(*args):
        s, final = nk.functional.spikgru2plus(*args, backend=backend, **kw)
        return (s, *final)

    def reference(*args):
        s, final = nk.reference.spikgru2plus(*args, **kw)
        return (s, *final)

    return fused, reference


def run_both(fused, reference, inputs, grads):
    """Outputs of fused(*inputs) and reference(*inputs) and the gradients of the inputs that
    require grad, for the output gradients `grads`."""
    results = []
    for fn in (fused, reference):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        outs = fn(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        results.append((*outs, *torch.autograd.grad(outs, wanted, grads, allow_unused=True)))
    return results


@pytest.mark.parametrize("op,backend", fused_backends("spike", with_op=True)
                         + fused_backends("signed_spike", with_op=True))
@pytest.mark.parametrize("spiking", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spike_non_finite(op, backend, spiking, dtype):
    x = with_specials((300,), dtype, 0).requires_grad_()
    grad = with_specials((300,), dtype, 1, fraction=0.05)
    kw = dict(v_th=0.5, gamma=10.0, spiking=spiking)
    got, want = run_both(lambda x: (getattr(nk.functional, op)(x, backend=backend, **kw),),
                         lambda x: (getattr(nk.reference, op)(x, **kw),), [x], [grad])
    assert_same(got, want, f"{op} {backend}")


@pytest.mark.parametrize("backend", fused_backends("plif"))
@pytest.mark.parametrize("spiking", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_plif_non_finite(backend, spiking, signed):
    x = with_specials((4, 2, 3, 5), torch.float64, 2, fraction=0.1).requires_grad_()
    alpha = torch.rand(3, dtype=torch.float64).requires_grad_()
    grads = [with_specials(s, torch.float64, 3, fraction=0.02)
             for s in ((4, 2, 3, 5), (2, 3, 5), (2, 3, 5))]
    kw = dict(v_th=0.5, gamma=4.0, signed=signed, spiking=spiking, return_state=True)

    def fused(x, alpha):
        s, state = nk.functional.plif(x, alpha, backend=backend, **kw)
        return (s, *state)

    def reference(x, alpha):
        s, state = nk.reference.plif(x, alpha, **kw)
        return (s, *state)

    got, want = run_both(fused, reference, [x, alpha], grads)
    assert_same(got, want, f"plif {backend}")


GATE_VALUES = [float("inf"), -float("inf"), float("nan"), 1e300, -1e300, 800.0, -800.0, 100.0,
               -100.0]


@st.composite
def gate_cases(draw):
    """Which gate pre-activations of one hidden unit are infinite, NaN or huge: that unit's b_ih
    of one to three gates, at every step (a special value in x would reach every gate through
    W x: 0 * inf)."""
    return dict(values=draw(st.dictionaries(st.sampled_from("rzi"), st.sampled_from(GATE_VALUES),
                                            min_size=1)),
                signed=draw(st.booleans()), spiking=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend", fused_backends("spikgru2plus"))
@given(case=gate_cases())
@example(case=dict(values={"z": -float("inf"), "i": float("inf")}, signed=True, spiking=True,
                   dtype=torch.float64, seed=0))
def test_spikgru2plus_non_finite_gates(backend, case):
    check_non_finite_gates(backend, case)


def check_non_finite_gates(backend, case):
    """sigmoid(-inf) = 0 exactly, as the reference's, so that 0 * inf is NaN where the
    reference has it (the C++ exp clamped its argument: with z's pre-activation -inf and i's
    +inf, d(a_z) = dv (v_prev - i) z (1 - z) was 1e-308 * inf = inf, and so was dx); a dense
    product where zero spikes meet a non-finite gradient."""
    steps, batch, inputs, hidden = 3, 2, 3, 4
    generator = torch.Generator().manual_seed(case["seed"])

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, generator=generator) * scale

    bias_ih = randn(3 * hidden)
    for gate, value in case["values"].items():
        bias_ih["rzi".index(gate) * hidden + 1] = value
    inputs_ = [randn(steps, batch, inputs, scale=2.0), randn(3 * hidden, inputs),
               randn(3 * hidden, hidden, scale=0.5), bias_ih, randn(3 * hidden),
               torch.rand(hidden, dtype=torch.float64, generator=generator)]
    inputs_ = [t.to(case["dtype"]).requires_grad_() for t in inputs_]
    grads = [randn(steps, batch, hidden)] + [randn(batch, hidden) for _ in range(3)]
    grads = [g.to(case["dtype"]) for g in grads]
    got, want = run_both(*spikgru2plus_pair(backend, signed=case["signed"],
                                            spiking=case["spiking"], v_th=0.5), inputs_, grads)
    assert_same(got, want, f"spikgru2plus {backend}")


@pytest.mark.parametrize("backend", fused_backends("spikgru2plus"))
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("spiking", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_spikgru2plus_non_finite_recurrent_weight(backend, value, spiking, with_state):
    check_non_finite_recurrent_weight(backend, value, spiking, with_state)


def check_non_finite_recurrent_weight(backend, value, spiking, with_state):
    """A non-finite entry of U: the reference's U s_{t-1} has 0 * inf = NaN in its row where the
    spike is 0, including U s_0 = U 0 at the first step without a state; the fused loops must not
    skip those products (the C++ spike row sums skip zero spikes; every backend skipped U 0)."""
    steps, batch, inputs, hidden = 4, 3, 3, 5
    generator = torch.Generator().manual_seed(7)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, generator=generator) * scale

    weight_hh = randn(3 * hidden, hidden, scale=0.5)
    weight_hh[2 * hidden + 1, 3] = value  # the i gate of unit 1, from unit 3's spike
    inputs_ = [randn(steps, batch, inputs, scale=2.0), randn(3 * hidden, inputs), weight_hh,
               randn(3 * hidden), randn(3 * hidden),
               torch.rand(hidden, dtype=torch.float64, generator=generator)]
    inputs_ = [t.requires_grad_() for t in inputs_]
    state = tuple(randn(batch, hidden) for _ in range(2)) + (torch.zeros(batch, hidden).double(),)
    grads = [randn(steps, batch, hidden)] + [randn(batch, hidden) for _ in range(3)]
    got, want = run_both(*spikgru2plus_pair(backend, spiking=spiking, v_th=0.5,
                                            state=state if with_state else None), inputs_, grads)
    assert any(torch.isnan(t).any() for t in want[:4])  # the case reaches the outputs
    assert_same(got, want, f"spikgru2plus {backend}")
