"""Every fused op on every strided layout the reference accepts: random views (crops, strided
slices, permuted dims such as channels-last and transposes, expanded dims, storage offsets) of
random shapes for every tensor argument and every output gradient, forward and backward in
float64, against the reference run on contiguous copies of the same values. Memory from
torch.empty is filled with NaN (`poison_empty`), so an element a kernel does not write fails.

The emulated CUDA backend runs `check_spikgru2plus_layouts` in test_persistent_spikgru2plus.py,
which builds the emulation once for its own tests.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import neurokern as nk
from conftest import fused_backends

f64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)


@st.composite
def views(draw, shape, *, expand=True, scale=1.0, shift=0.0):
    """A float64 tensor of `shape` with a random layout: its dims stored in a random order, each
    one cut out of a longer dim (an offset into storage, a step of 1-3) or, with `expand`, a
    broadcast of a single value (stride 0). Values: `shift + scale * N(0, 1)`, seeded."""
    order = draw(st.permutations(range(len(shape))))
    cuts = []
    for size in shape:
        broadcast = expand and size > 1 and draw(st.integers(0, 5)) == 0
        cuts.append((broadcast, draw(st.integers(0, 2)), draw(st.integers(1, 3)),
                     draw(st.integers(0, 2))))
    stored = [1 if b else before + (n - 1) * step + 1 + after
              for n, (b, before, step, after) in zip(shape, cuts)]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    base = torch.randn([stored[d] for d in order], dtype=f64, generator=generator) * scale + shift
    t = base.permute([order.index(d) for d in range(len(shape))])  # dims back in logical order
    t = t[tuple(slice(0, 1) if b else slice(before, before + (n - 1) * step + 1, step)
                for n, (b, before, step, _) in zip(shape, cuts))]
    t = t.expand(shape)
    assert t.shape == tuple(shape)
    return t


def leaf(t):
    """`t` as a leaf that requires grad, with `t`'s strides and storage offset."""
    return t.detach().requires_grad_(True)


def dense(t):
    """`t`'s values as a fresh contiguous leaf (the reference's input), or None."""
    return None if t is None else t.detach().clone(memory_format=torch.contiguous_format) \
        .requires_grad_(t.requires_grad)


def assert_same(fused_out, ref_out, fused_in, ref_in, grads, what):
    """Outputs equal, and the gradients of every input for output gradients `grads` (views)."""
    for k, (a, b) in enumerate(zip(fused_out, ref_out)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: output {k}: {m}")
    inputs = [(a, b) for a, b in zip(fused_in, ref_in) if a is not None and a.requires_grad]
    got = torch.autograd.grad(fused_out, [a for a, _ in inputs], grads, allow_unused=True)
    want = torch.autograd.grad(ref_out, [b for _, b in inputs], grads, allow_unused=True)
    for k, (a, b) in enumerate(zip(got, want)):
        if b is None:
            b = torch.zeros_like(inputs[k][1])
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: gradient {k}: {m}")


# ---------------------------------------------------------------------------------------------
# spike, signed_spike
# ---------------------------------------------------------------------------------------------


@st.composite
def spike_cases(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=0, max_size=4))
    return dict(x=draw(views(shape)), grad=draw(views(shape)), spiking=draw(st.booleans()),
                v_th=draw(st.floats(0.3, 1.5)), gamma=draw(st.floats(1.0, 10.0)))


@pytest.mark.parametrize("op,backend", fused_backends("spike", with_op=True)
                         + fused_backends("signed_spike", with_op=True))
@given(case=spike_cases())
def test_spike_layouts(poison_empty, op, backend, case):
    fn = getattr(nk.functional, op)
    x = leaf(case["x"])
    kw = dict(v_th=case["v_th"], gamma=case["gamma"], spiking=case["spiking"])
    out = fn(x, backend=backend, **kw)
    x_ref = dense(x)
    ref = getattr(nk.reference, op)(x_ref, **kw)
    assert_same((out,), (ref,), (x,), (x_ref,), (case["grad"],), f"{op} {backend}")


# ---------------------------------------------------------------------------------------------
# plif
# ---------------------------------------------------------------------------------------------


@st.composite
def plif_cases(draw):
    steps, batch, channels = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(
        st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 5), max_size=2))
    batch_first = draw(st.booleans())
    shape = [batch, steps] if batch_first else [steps, batch]
    shape += [channels, *spatial]
    step_shape = [batch, channels, *spatial]
    with_state = draw(st.booleans())
    return dict(
        x=draw(views(shape)), batch_first=batch_first,
        alpha=draw(st.sampled_from(["channel", "scalar", "float"])),
        alpha_view=draw(views([channels], scale=0.2, shift=0.7)),
        state=(draw(views(step_shape)), draw(views(step_shape))) if with_state else None,
        grads=(draw(views(shape)), draw(views(step_shape)), draw(views(step_shape))),
        signed=draw(st.booleans()), spiking=draw(st.booleans()),
        detach_reset=draw(st.booleans()), v_th=draw(st.floats(0.3, 1.5)),
        gamma=draw(st.floats(1.0, 10.0)),
    )


@pytest.mark.parametrize("backend", fused_backends("plif"))
@given(case=plif_cases())
def test_plif_layouts(poison_empty, backend, case):
    x = leaf(case["x"])
    alpha = {"channel": leaf(case["alpha_view"]), "scalar": leaf(case["alpha_view"][0]),
             "float": 0.8}[case["alpha"]]
    state = None if case["state"] is None else tuple(leaf(t) for t in case["state"])
    kw = dict(v_th=case["v_th"], gamma=case["gamma"], signed=case["signed"],
              batch_first=case["batch_first"], return_state=True,
              detach_reset=case["detach_reset"], spiking=case["spiking"])
    s, (v_last, s_last) = nk.functional.plif(x, alpha, state=state, backend=backend, **kw)
    inputs = (x, alpha if isinstance(alpha, torch.Tensor) else None, *(state or ()))
    refs = tuple(dense(t) for t in inputs)
    ref_state = None if state is None else refs[2:]
    s_ref, (v_ref, s_last_ref) = nk.reference.plif(
        refs[0], alpha if refs[1] is None else refs[1], state=ref_state, **kw)
    assert_same((s, v_last, s_last), (s_ref, v_ref, s_last_ref), inputs, refs, case["grads"],
                f"plif {backend}")


# ---------------------------------------------------------------------------------------------
# spikgru2plus, spikgru2plus_bidirectional
# ---------------------------------------------------------------------------------------------


@st.composite
def spikgru2plus_cases(draw, directions=1):
    steps, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    inputs, hidden = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    batch_first = draw(st.booleans())
    shape = [batch, steps, inputs] if batch_first else [steps, batch, inputs]
    out_shape = shape[:2] + [directions * hidden]
    state_shape = [directions, batch, hidden] if directions > 1 else [batch, hidden]
    with_bias, with_state = draw(st.booleans()), draw(st.booleans())

    def params():
        return (draw(views([3 * hidden, inputs])), draw(views([3 * hidden, hidden])),
                draw(views([3 * hidden])) if with_bias else None,
                draw(views([3 * hidden])) if with_bias else None,
                draw(views([hidden], scale=0.2, shift=0.7)))

    return dict(
        x=draw(views(shape, scale=2.0)), params=[params() for _ in range(directions)],
        state=tuple(draw(views(state_shape)) for _ in range(3)) if with_state else None,
        grads=(draw(views(out_shape)), *(draw(views(state_shape)) for _ in range(3))),
        batch_first=batch_first, signed=draw(st.booleans()), reset_gate=draw(st.booleans()),
        spiking=draw(st.booleans()), v_th=draw(st.floats(0.3, 1.5)),
        gamma=draw(st.floats(1.0, 10.0)),
    )


def check_spikgru2plus_layouts(backend, case):
    """The fused layer (one direction, or two with two parameter sets) on `case`'s views
    against the reference."""
    x = leaf(case["x"])
    params = [tuple(None if p is None else leaf(p) for p in ps) for ps in case["params"]]
    state = None if case["state"] is None else tuple(leaf(t) for t in case["state"])
    kw = dict(v_th=case["v_th"], gamma=case["gamma"], signed=case["signed"],
              reset_gate=case["reset_gate"], batch_first=case["batch_first"],
              spiking=case["spiking"])
    ref_x, ref_state = dense(x), None if state is None else tuple(dense(t) for t in state)
    ref_params = [tuple(dense(p) for p in ps) for ps in params]
    if len(params) == 1:
        out = nk.functional.spikgru2plus(x, *params[0], state=state, backend=backend, **kw)
        ref = nk.reference.spikgru2plus(ref_x, *ref_params[0], state=ref_state, **kw)
    else:
        out = nk.functional.spikgru2plus_bidirectional(x, *params, state=state, backend=backend,
                                                       **kw)
        ref = nk.reference.spikgru2plus_bidirectional(ref_x, *ref_params, state=ref_state, **kw)
    inputs = (x, *(p for ps in params for p in ps), *(state or ()))
    refs = (ref_x, *(p for ps in ref_params for p in ps), *(ref_state or ()))
    assert_same((out[0], *out[1]), (ref[0], *ref[1]), inputs, refs, case["grads"],
                f"spikgru2plus {backend} x{len(params)}")


@pytest.mark.parametrize("backend", fused_backends("spikgru2plus"))
@given(case=spikgru2plus_cases())
def test_spikgru2plus_layouts(poison_empty, backend, case):
    check_spikgru2plus_layouts(backend, case)


@pytest.mark.parametrize("backend", fused_backends("spikgru2plus_bidirectional"))
@given(case=spikgru2plus_cases(directions=2))
def test_spikgru2plus_bidirectional_layouts(poison_empty, backend, case):
    check_spikgru2plus_layouts(backend, case)


@pytest.mark.parametrize("backend", fused_backends("spikgru2plus"))
@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("inputs,hidden", [(0, 3), (3, 0), (0, 0)])
def test_spikgru2plus_empty_sizes(poison_empty, backend, directions, inputs, hidden):
    """Input size 0 (gi = b_ih) and hidden size 0 (empty outputs) as the reference computes
    them, with a state and both batch layouts."""
    for batch_first in (False, True):
        generator = torch.Generator().manual_seed(inputs + 10 * hidden)

        def randn(*shape):
            return torch.randn(*shape, dtype=f64, generator=generator)

        state_shape = [directions, 3, hidden] if directions > 1 else [3, hidden]
        steps_batch = [3, 2] if batch_first else [2, 3]
        case = dict(
            x=randn(*steps_batch, inputs), batch_first=batch_first, signed=True, reset_gate=True,
            spiking=True, v_th=0.5, gamma=10.0,
            params=[(randn(3 * hidden, inputs), randn(3 * hidden, hidden), randn(3 * hidden),
                     randn(3 * hidden), randn(hidden)) for _ in range(directions)],
            state=tuple(randn(*state_shape) for _ in range(3)),
            grads=(randn(*steps_batch, directions * hidden),
                   *(randn(*state_shape) for _ in range(3))))
        check_spikgru2plus_layouts(backend, case)
