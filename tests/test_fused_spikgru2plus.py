"""Fused SpikGRU2+ backends (C++ CPU; GPU ones when they exist) against the reference: forward and
every gradient, float32 threshold flips, smooth-mode gradcheck of a 2-layer bidirectional module,
streaming, half inputs, torch.library and torch.compile, argument checks."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.func import functional_call

import neurokern as nk
from conftest import backend_device, fused_backends

BACKENDS = fused_backends("spikgru2plus")
f64 = torch.float64
LEAVES = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "alpha", "v0", "i0", "s0")


@st.composite
def gru_cases(draw):
    return dict(
        steps=draw(st.integers(1, 7)),
        batch=draw(st.integers(1, 4)),
        inputs=draw(st.integers(1, 9)),
        # 24 and 37: 3H spans full column tiles of the spike sums (64 floats, 32 doubles) plus a
        # partial one; none is a multiple of 8 except 24 and 8 itself.
        hidden=draw(st.sampled_from([1, 3, 5, 8, 13, 24, 37])),
        batch_first=draw(st.booleans()),
        signed=draw(st.booleans()),
        reset_gate=draw(st.booleans()),
        state=draw(st.sampled_from([None, "ternary", "real"])),  # s0 spikes, or any real value
        bias=draw(st.booleans()),
        drive=draw(st.sampled_from([1.0, 1.0, 6.0])),  # 6: most neurons spike (dense products)
        v_th=draw(st.floats(0.5, 1.5)),
        gamma=draw(st.floats(1.0, 10.0)),
        seed=draw(st.integers(0, 2**16)),
    )


# Always run besides the random draws: each path of the C++ products (signed row sums with real
# rows from a real s0, ternary s0, dense spikes through at::mm, partial column tiles) and the
# corner sizes B = 1, T = 1.
_BASE = dict(steps=8, batch=3, inputs=5, hidden=37, batch_first=False, signed=True,
             reset_gate=True, state="real", bias=True, drive=1.0, v_th=1.0, gamma=10.0, seed=1)
EXAMPLES = [
    _BASE,
    dict(_BASE, state="ternary", batch_first=True, signed=False, reset_gate=False, seed=2),
    dict(_BASE, drive=6.0, hidden=24, bias=False, seed=3),
    dict(_BASE, steps=1, batch=1, hidden=5, state=None, seed=4),
    dict(_BASE, steps=6, batch=1, hidden=70, v_th=0.6, seed=5),
]


def with_examples(test):
    for case in EXAMPLES:
        test = example(case=case)(test)
    return test


def make_inputs(case):
    """float64 leaves {name: tensor or None} and cotangents for (s, v_T, i_T, s_T)."""
    gen = torch.Generator().manual_seed(case["seed"])
    t, b, n_in, h = case["steps"], case["batch"], case["inputs"], case["hidden"]
    rand = lambda *shape: torch.randn(shape, generator=gen, dtype=f64)  # noqa: E731
    uniform = lambda *shape: 2 * torch.rand(shape, generator=gen, dtype=f64) - 1  # noqa: E731
    x = case["drive"] * rand(*((b, t, n_in) if case["batch_first"] else (t, b, n_in)))
    k = 3 * h ** -0.5  # 3x nn.GRU's init, so that neurons spike
    leaves = dict(x=x, weight_ih=k * uniform(3 * h, n_in), weight_hh=k * uniform(3 * h, h),
                  bias_ih=rand(3 * h) if case["bias"] else None,
                  bias_hh=rand(3 * h) if case["bias"] else None,
                  alpha=torch.rand(h, generator=gen, dtype=f64), v0=None, i0=None, s0=None)
    if case["state"] is not None:
        leaves["v0"], leaves["i0"] = rand(b, h), rand(b, h)
        leaves["s0"] = (torch.randint(-1, 2, (b, h), generator=gen).to(f64)
                        if case["state"] == "ternary" else rand(b, h))
    seq_shape = (b, t, h) if case["batch_first"] else (t, b, h)
    cotangents = [rand(*seq_shape), rand(b, h), rand(b, h), rand(b, h)]
    return leaves, cotangents


def run(case, backend, dtype, leaves, cotangents, device, spiking=True):
    """Outputs (s, v_T, i_T, s_T) and the gradients of every leaf given (None for absent ones),
    all as float64 CPU tensors, computed on `device`; x and the state in `dtype`, parameters in
    float32 for half dtypes."""
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    args = {}
    for name, t in leaves.items():
        if t is not None:
            d = dtype if name in ("x", "v0", "i0", "s0") else param_dtype
            args[name] = t.detach().to(device, d).requires_grad_()
    state = (args["v0"], args["i0"], args["s0"]) if "v0" in args else None
    s, final = nk.spikgru2plus(
        args["x"], args["weight_ih"], args["weight_hh"], args.get("bias_ih"), args.get("bias_hh"),
        args["alpha"], v_th=case["v_th"], gamma=case["gamma"], signed=case["signed"],
        reset_gate=case["reset_gate"], batch_first=case["batch_first"], state=state,
        spiking=spiking, backend=backend)
    outs = (s, *final)
    loss = sum((o.double() * g.to(device)).sum() for o, g in zip(outs, cotangents))
    grads = dict(zip(args, torch.autograd.grad(loss, list(args.values()))))
    return ([o.detach().double().cpu() for o in outs],
            {n: None if n not in grads else grads[n].double().cpu() for n in LEAVES})


def time_major(t, case):
    return t.transpose(0, 1) if case["batch_first"] else t


def quantized(leaves, dtype):
    """The leaves as runs in `dtype` see them (parameters in float32), back in float64."""
    out = {}
    for name, t in leaves.items():
        d = dtype if name in ("x", "v0", "i0", "s0") else torch.float32
        out[name] = None if t is None else t.to(d).double()
    return out


def reference_membranes(case, leaves):
    """v_t of every step [T, B, H] of the float64 reference, by chaining one-step calls."""
    x = time_major(leaves["x"], case)
    state = None if leaves["v0"] is None else (leaves["v0"], leaves["i0"], leaves["s0"])
    membranes = []
    for t in range(x.shape[0]):
        _, state = nk.reference.spikgru2plus(
            x[t:t + 1], leaves["weight_ih"], leaves["weight_hh"], leaves["bias_ih"],
            leaves["bias_hh"], leaves["alpha"], v_th=case["v_th"], gamma=case["gamma"],
            signed=case["signed"], reset_gate=case["reset_gate"], state=state)
        membranes.append(state[0])
    return torch.stack(membranes)


def flipped_sequences(case, s_low, s64, v64):
    """Batch elements whose spike trains differ from the float64 reference's, as a [B] mask,
    after checking that each first differs where the float64 membrane is within float32
    rounding of a threshold. A flip changes everything after it in its sequence (through U and
    the state), so only the first differing step of a sequence says anything."""
    differs = time_major(s_low, case) != time_major(s64, case)  # [T, B, H]
    flipped = differs.flatten(2).any(2).any(0)  # [B]
    tol = 1e-4 * (1 + v64.abs().max())
    for b in torch.nonzero(flipped).flatten().tolist():
        t = int(torch.nonzero(differs[:, b].any(1))[0])
        v = v64[t, b][differs[t, b]]
        margin = (v - case["v_th"]).abs()
        if case["signed"]:
            margin = torch.minimum(margin, (v + case["v_th"]).abs())
        assert margin.max() < tol, f"spike differs at step {t} with margin {margin.max():.3g}"
    return flipped


def assert_outputs_and_grads_close(out, ref, rtol, atol):
    names = ["v_T", "i_T", "s_T"]
    for name, a, b in zip(names, out[0][1:], ref[0][1:]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    for name in LEAVES:
        a, b = out[1][name], ref[1][name]
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=gru_cases())
@with_examples
def test_float64_equals_reference(poison_empty, backend, case):
    dev = backend_device(backend)
    leaves, cot = make_inputs(case)
    ref = run(case, "reference", f64, leaves, cot, dev)
    out = run(case, backend, f64, leaves, cot, dev)
    assert torch.equal(out[0][0], ref[0][0]), "spikes differ in float64"
    assert torch.equal(out[0][3], ref[0][3]), "final spikes differ in float64"
    assert_outputs_and_grads_close(out, ref, rtol=1e-9, atol=1e-9)


def run_bidirectional(case, backend, leaves, reverse, device):
    """Outputs (s [T, B, 2H], v_T, i_T, s_T [2, B, H]) of one bidirectional layer and the
    gradients of x, of both directions' parameters and of the state, as float64 CPU tensors.
    `leaves` give x, the forward parameters and state; `reverse` the reverse ones."""
    param_names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "alpha")
    x = leaves["x"].detach().to(device).requires_grad_()
    params = [[None if d[n] is None else d[n].detach().to(device).requires_grad_()
               for n in param_names] for d in (leaves, reverse)]
    state = None
    if leaves["v0"] is not None:
        state = tuple(torch.stack([leaves[n], reverse[n]]).to(device).requires_grad_()
                      for n in ("v0", "i0", "s0"))
    s, final = nk.spikgru2plus_bidirectional(
        x, params[0], params[1], v_th=case["v_th"], gamma=case["gamma"], signed=case["signed"],
        reset_gate=case["reset_gate"], batch_first=case["batch_first"], state=state,
        backend=backend)
    gen = torch.Generator().manual_seed(case["seed"])
    outs = (s, *final)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=f64).to(device)).sum()
               for o in outs)
    inputs = [x, *(p for d in params for p in d if p is not None), *(state or ())]
    grads = torch.autograd.grad(loss, inputs)
    return [t.detach().cpu() for t in (*outs, *grads)]


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=gru_cases())
@with_examples
def test_bidirectional_float64_equals_reference(poison_empty, backend, case):
    """A bidirectional layer (on Triton both directions in one launch per step, rows
    direction-major) against the reference's composition of two one-direction layers: spikes
    exact in float64, final states and every gradient close."""
    dev = backend_device(backend)
    leaves, _ = make_inputs(case)
    reverse, _ = make_inputs(dict(case, seed=case["seed"] + 1))
    ref = run_bidirectional(case, "reference", leaves, reverse, dev)
    out = run_bidirectional(case, backend, leaves, reverse, dev)
    assert torch.equal(out[0], ref[0]), "spikes differ in float64"
    assert torch.equal(out[3], ref[3]), "final spikes differ in float64"
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_bad_input(backend):
    dev = backend_device(backend)
    x = torch.randn(4, 2, 3, device=dev)

    def params(hidden, bias=True):
        return (torch.randn(3 * hidden, 3, device=dev), torch.randn(3 * hidden, hidden, device=dev),
                torch.randn(3 * hidden, device=dev) if bias else None,
                torch.randn(3 * hidden, device=dev) if bias else None,
                torch.rand(hidden, device=dev))

    with pytest.raises(ValueError, match="different hidden sizes: 5 and 6"):
        nk.spikgru2plus_bidirectional(x, params(5), params(6), backend=backend)
    with pytest.raises(ValueError, match="both directions must have biases"):
        nk.spikgru2plus_bidirectional(x, params(5), params(5, bias=False), backend=backend)
    with pytest.raises(TypeError, match="reverse_params must be"):
        nk.spikgru2plus_bidirectional(x, params(5), params(5)[:4], backend=backend)
    state = tuple(torch.zeros(2, 2, 5, device=dev) for _ in range(3))
    nk.spikgru2plus_bidirectional(x, params(5), params(5), state=state, backend=backend)
    with pytest.raises(ValueError, match=r"must have shape \[2, 2, 5\]"):
        nk.spikgru2plus_bidirectional(x, params(5), params(5), state=tuple(
            t[0] for t in state), backend=backend)


def check_float32(case, leaves, cot, backend, dev):
    """Runs `backend` in float32 and compares it with the float64 reference (on the inputs as
    float32 sees them): spikes equal except for threshold flips, which must first occur within
    rounding of ±v_th and hit at most half the sequences (rounded up); the outputs and the
    gradients of the sequences that neither this backend nor the float32 reference flipped (and
    the parameter gradients when nothing flipped) are as close to float64 as a small multiple of
    the float32 reference's own error. Returns the [B] mask of this backend's flips."""
    leaves_q = quantized(leaves, torch.float32)
    ref64 = run(case, "reference", f64, leaves_q, cot, dev)
    ref32 = run(case, "reference", torch.float32, leaves, cot, dev)
    out = run(case, backend, torch.float32, leaves, cot, dev)
    v64 = reference_membranes(case, leaves_q)
    flips = flipped_sequences(case, out[0][0], ref64[0][0], v64)
    assert flips.sum() <= (case["batch"] + 1) // 2, "threshold flips in too many sequences"
    keep = ~(flips | flipped_sequences(case, ref32[0][0], ref64[0][0], v64))  # [B]
    idx = torch.nonzero(keep).flatten()
    batch_dim = 0 if case["batch_first"] else 1
    checks = [tuple(r[0][0].index_select(batch_dim, idx) for r in (out, ref32, ref64))]
    checks += [tuple(r[0][k][keep] for r in (out, ref32, ref64)) for k in (1, 2, 3)]
    for name in ("x", "v0", "i0", "s0"):  # one sequence each
        if out[1][name] is not None:
            dim = batch_dim if name == "x" else 0
            checks.append(tuple(r[1][name].index_select(dim, idx) for r in (out, ref32, ref64)))
    if keep.all():  # the parameter gradients sum over all sequences
        checks += [tuple(r[1][n] for r in (out, ref32, ref64))
                   for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "alpha")
                   if out[1][n] is not None]
    eps = torch.finfo(torch.float32).eps
    for got, same_dtype, exact in checks:
        if got.numel():
            allowed = 4 * (same_dtype - exact).abs().max() + 16 * eps * (1 + exact.abs().max())
            assert (got - exact).abs().max() <= allowed
    return flips


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=gru_cases())
@with_examples
def test_float32_against_float64_reference(poison_empty, backend, case):
    leaves, cot = make_inputs(case)
    check_float32(case, leaves, cot, backend, backend_device(backend))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values != ("cuda",)])
@pytest.mark.parametrize("batch", [1, 5, 70])
def test_bidirectional_float32(backend, batch):
    """Both directions in one launch in float32: spikes and states as the float64 reference's
    (nothing near a threshold with these seeds: checked on the CPU and, for Triton, on an H100;
    the persistent CUDA loops sum in another order, so on a GPU they are left to the
    flip-tolerant float32 tests; the CUDA emulation runs it), gradients within float32
    accuracy."""
    dev = backend_device(backend)
    case = dict(_BASE, steps=5, batch=batch, inputs=7, hidden=37, seed=21)
    leaves, _ = make_inputs(case)
    reverse, _ = make_inputs(dict(case, seed=22))
    quantize = lambda d: {n: None if t is None else t.float().double()  # noqa: E731
                          for n, t in d.items()}
    ref = run_bidirectional(case, "reference", quantize(leaves), quantize(reverse), dev)
    f32 = lambda d: {n: None if t is None else t.float() for n, t in d.items()}  # noqa: E731
    out = [t.double() for t in run_bidirectional(case, backend, f32(leaves), f32(reverse), dev)]
    assert torch.equal(out[0], ref[0]), "spikes differ"
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * (1 + b.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_forced_threshold_flip(backend):
    """A membrane 2^-31 below v_th in float64 that float32 rounds onto v_th: the flip is found,
    found at the threshold, and that sequence alone is left out of the comparison.

    With U = 0, no bias and W_z = 0, z = 1/2 exactly and v_1 = i_1 / 2 = (x W_i^T) / 2; for
    sequence 0, neuron 0: x_1 W_i^T = 1 * 2 + 1 * (-2^-30), which float32 rounds to 2."""
    case = dict(steps=5, batch=3, inputs=2, hidden=3, batch_first=False, signed=True,
                reset_gate=True, state=None, bias=False, drive=1.0, v_th=1.0, gamma=10.0,
                seed=5)
    leaves, cot = make_inputs(case)
    leaves["weight_hh"] = torch.zeros_like(leaves["weight_hh"])
    leaves["weight_ih"][3:6] = 0.0  # z rows
    leaves["weight_ih"][6] = torch.tensor([2.0, -2.0 ** -30], dtype=f64)
    leaves["x"][0, 0] = 1.0
    flips = check_float32(case, leaves, cot, backend, backend_device(backend))
    assert flips.tolist() == [True, False, False]


def test_flip_check_rejects_a_difference_away_from_threshold():
    case = dict(v_th=1.0, signed=True, batch_first=False)
    s64 = torch.zeros(3, 2, 4, dtype=f64)
    v64 = torch.full((3, 2, 4), 0.3, dtype=f64)
    s_low = s64.clone()
    s_low[1, 1, 2] = 1.0
    with pytest.raises(AssertionError, match="spike differs at step 1"):
        flipped_sequences(case, s_low, s64, v64)
    v64[1, 1, 2] = 1.0 - 2.0 ** -30
    assert flipped_sequences(case, s_low, s64, v64).tolist() == [False, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_flip_rate(backend):
    """Over many sequences, float32 threshold flips are rare and each is at the threshold."""
    dev = backend_device(backend)
    case = dict(steps=20, batch=64, inputs=16, hidden=48, batch_first=False, signed=True,
                reset_gate=True, state=None, bias=True, drive=1.0, v_th=1.0, gamma=10.0,
                seed=7)
    leaves, cot = make_inputs(case)
    leaves_q = quantized(leaves, torch.float32)
    ref64 = run(case, "reference", f64, leaves_q, cot, dev)
    out = run(case, backend, torch.float32, leaves, cot, dev)
    assert out[0][0].abs().mean() > 0.05, "too few spikes for the test to mean anything"
    flips = flipped_sequences(case, out[0][0], ref64[0][0],
                              reference_membranes(case, leaves_q))
    assert flips.double().mean() <= 0.1, f"{int(flips.sum())} of 64 sequences flipped"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed,reset_gate,batch_first", [(True, True, False),
                                                          (False, False, True)])
def test_smooth_gradcheck_two_layer_bidirectional(backend, signed, reset_gate, batch_first):
    """Smooth-mode gradcheck of the fused loop inside the whole stack: input, initial state and
    every parameter (weights, biases, leaks), through the output and the final state."""
    dev = backend_device(backend)
    torch.manual_seed(0)
    model = nk.nn.SpikGRU2Plus(3, 5, 2, bidirectional=True, batch_first=batch_first,
                               signed=signed, reset_gate=reset_gate, spiking=False, v_th=0.6,
                               gamma=2.0, backend=backend).double().to(dev)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = torch.randn((2, 4, 3) if batch_first else (4, 2, 3), dtype=f64, device=dev,
                    requires_grad=True)
    state = tuple(torch.randn(4, 2, 5, dtype=f64, device=dev, requires_grad=True)
                  for _ in range(3))

    def fn(x, v0, i0, s0, *ps):
        out, (v, i, s) = functional_call(model, dict(zip(names, ps)), (x, (v0, i0, s0)))
        return out, v, i, s

    assert torch.autograd.gradcheck(fn, (x, *state, *params), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_streaming_two_chunks_equals_one_pass(backend, batch_first):
    dev = backend_device(backend)
    case = dict(steps=9, batch=3, inputs=4, hidden=13, batch_first=batch_first, signed=True,
                reset_gate=True, state="real", bias=True, drive=1.0, v_th=0.8, gamma=5.0,
                seed=3)
    leaves, _ = make_inputs(case)
    args = {n: t.to(dev).requires_grad_() for n, t in leaves.items()}
    params = [args[n] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "alpha")]
    state = (args["v0"], args["i0"], args["s0"])
    kw = dict(v_th=0.8, gamma=5.0, batch_first=batch_first, backend=backend)
    t_dim = 1 if batch_first else 0
    x = args["x"]
    s, final = nk.spikgru2plus(x, *params, state=state, **kw)
    s1, mid = nk.spikgru2plus(x.narrow(t_dim, 0, 4), *params, state=state, **kw)
    s2, final_c = nk.spikgru2plus(x.narrow(t_dim, 4, 5), *params, state=mid, **kw)
    chunked = torch.cat([s1, s2], t_dim)
    assert s.abs().sum() > 0
    assert torch.equal(chunked, s)
    for a, b in zip(final_c, final):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    w = torch.randn(s.shape, dtype=f64, device=dev)
    loss = lambda o, f: (o * w).sum() + f[0].sum() + 2 * f[1].sum()  # noqa: E731
    leaves_list = [x, *params, *state]
    g = torch.autograd.grad(loss(s, final), leaves_list)
    g_c = torch.autograd.grad(loss(chunked, final_c), leaves_list)
    for a, b in zip(g_c, g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_final_state_only(backend):
    """Only v_T is used: the spike output gets no gradient, the op still runs its backward."""
    dev = backend_device(backend)
    case = dict(steps=5, batch=2, inputs=3, hidden=7, batch_first=False, signed=False,
                reset_gate=True, state="real", bias=False, drive=1.0, v_th=0.7, gamma=4.0,
                seed=11)
    leaves, _ = make_inputs(case)
    grads = []
    for be in ("reference", backend):
        args = {n: t.to(dev).requires_grad_() for n, t in leaves.items() if t is not None}
        _, (v, _, _) = nk.spikgru2plus(
            args["x"], args["weight_ih"], args["weight_hh"], None, None, args["alpha"],
            v_th=0.7, gamma=4.0, signed=False,
            state=(args["v0"], args["i0"], args["s0"]), backend=be)
        grads.append(torch.autograd.grad(v.sum(), list(args.values())))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    """B = 0, as nn.GRU allows: empty outputs and state, zero gradients, like the reference
    (each of the layer's reshapes names its sizes: -1 is ambiguous for an empty batch)."""
    dev = backend_device(backend)
    for bidirectional, batch_first in ((False, False), (True, True)):
        outs = []
        for be in ("reference", backend):
            torch.manual_seed(0)
            model = nk.nn.SpikGRU2Plus(5, 8, num_layers=2, bidirectional=bidirectional,
                                       batch_first=batch_first, backend=be).to(dev, f64)
            x = torch.randn((0, 3, 5) if batch_first else (3, 0, 5), device=dev, dtype=f64,
                            requires_grad=True)
            out, (v, i, s) = model(x)
            (out.sum() + v.sum() + i.sum() + s.sum()).backward()
            outs.append([out, v, i, s, x.grad, *(p.grad for p in model.parameters())])
        for a, b in zip(*outs):
            assert a.shape == b.shape
            assert not b.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_is_computed_in_float32(backend, dtype):
    """float16/bfloat16 inputs run as their float32 upcast (as the reference computes them);
    outputs come back in the input dtype, parameter gradients in the parameters' dtype."""
    dev = backend_device(backend)
    gen = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(6, 3, 5, generator=gen)).to(dev, dtype)
    shapes = [(12, 5), (12, 4), (12,), (12,)]  # W, U, b_ih, b_hh; then alpha
    params = [torch.randn(shape, generator=gen).to(dev) for shape in shapes]
    params.append(torch.rand(4, generator=gen).to(dev))
    runs = []
    for inp in (x, x.float()):
        leaves = [inp.detach().requires_grad_(), *(p.detach().requires_grad_() for p in params)]
        s, (v, i, s_last) = nk.spikgru2plus(*leaves, backend=backend)
        grads = torch.autograd.grad((s.float() * torch.arange(s.numel(), device=dev).view(
            s.shape)).sum() + v.float().sum(), leaves)
        runs.append(((s, v, i, s_last), grads))
    (outs, grads), (outs32, grads32) = runs
    for o, o32 in zip(outs, outs32):
        assert o.dtype == dtype
        assert torch.equal(o, o32.to(dtype))
    assert grads[0].dtype == dtype and torch.equal(grads[0], grads32[0].to(dtype))
    for g, g32 in zip(grads[1:], grads32[1:]):
        assert g.dtype == torch.float32 and torch.equal(g, g32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_products_in_bf16(backend):
    """Under autocast (bf16) the Triton backend runs every matrix product in bf16 with float32
    state, as the reference does under autocast: its outputs follow the reference's under the
    same autocast (float32 rounding apart) and differ from the float32 run; gradients within
    bf16 accuracy of the reference's. The CUDA loops take U in bf16 and accumulate in float32
    (not rounded to bf16: within bf16 rounding of the reference). The C++ CPU backend computes
    in float32 and ignores autocast: results equal to the run without it."""
    dev = backend_device(backend)
    case = dict(_BASE, steps=6, batch=4, inputs=16, hidden=40, seed=11)
    leaves, cot = make_inputs(case)

    def run_autocast(backend, enabled):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=enabled):
            return run(case, backend, torch.float32, leaves, cot, dev)

    out, out32 = run_autocast(backend, True), run_autocast(backend, False)
    if backend == "cpu":
        for a, b in zip(out[0], out32[0]):
            assert torch.equal(a, b)
        for name in LEAVES:
            assert (out[1][name] is None) or torch.equal(out[1][name], out32[1][name]), name
        return
    ref = run_autocast("reference", True)
    assert (out[0][1] - out32[0][1]).abs().max() > 1e-4, "the products did not run in bf16"
    same = (out[0][0] == ref[0][0]).double().mean()
    assert same >= 0.99, f"only {same:.3f} of the spikes equal the reference's under autocast"
    if dev == "cpu":  # same bf16 products as the reference: no flip with this seed
        assert same == 1
    if same == 1:
        # bf16 rounding of gh (which the library path rounds as the reference), relative to |v|
        tol = 1e-5 if backend == "triton" else 2 ** -7
        for a, b in zip(out[0][1:], ref[0][1:]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * (1 + b.abs().max()))
        for name in LEAVES:
            if ref[1][name] is not None:
                scale = ref[1][name].abs().max()
                assert (out[1][name] - ref[1][name]).abs().max() <= 2e-2 * scale, name


def _op_samples(device, backend):
    gen = torch.Generator().manual_seed(0)
    steps, batch, hidden = 4, 3, 5
    gi = torch.randn(steps, batch, 3 * hidden, generator=gen).to(device)
    weight_hh = torch.randn(3 * hidden, hidden, generator=gen).to(device)
    bias_hh = torch.randn(3 * hidden, generator=gen).to(device)
    alpha = torch.rand(hidden, generator=gen).to(device)
    state = tuple(torch.randn(batch, hidden, generator=gen).to(device) for _ in range(3))
    yield (gi, weight_hh, None, alpha, None, None, None, 1.0, 10.0, True, True, True)
    yield (gi, weight_hh, bias_hh, alpha, *state, 0.5, 4.0, False, True, True)
    yield (gi.double(), weight_hh.double(), bias_hh.double(), alpha.double(),
           *(t.double() for t in state), 0.7, 3.0, True, False, False)
    if backend in ("triton", "cuda"):  # the products in bf16 (autocast), the rest in float32
        yield (gi, weight_hh.bfloat16(), bias_hh, alpha, *state, 1.0, 10.0, True, True, True)
        # two directions at once: rows [2B], parameters stacked [2, ...]
        two = lambda t: torch.stack([t, t.flip(-1)])  # noqa: E731
        yield (torch.cat([gi, gi.flip(0)], 1), two(weight_hh), two(bias_hh), two(alpha),
               *(torch.cat([t, -t]) for t in state), 1.0, 10.0, True, True, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = backend_device(backend)
    from neurokern.spikgru2plus_ops import spikgru2plus_ops

    fwd, bwd = spikgru2plus_ops(backend)
    for args in _op_samples(dev, backend):
        torch.library.opcheck(fwd, args)
        s_seq, v_seq, i_seq, gh_seq = fwd(*args)
        gi, weight_hh, bias_hh, alpha, v0, i0, s0, v_th, gamma, signed, reset_gate, _ = args
        grad_last = torch.randn_like(s_seq[0])
        for grads in ((torch.randn_like(s_seq), None, None, None),
                      (torch.randn_like(s_seq), grad_last, grad_last, grad_last),
                      (torch.randn_like(s_seq).transpose(0, 1).contiguous().transpose(0, 1),
                       None, grad_last, None)):
            torch.library.opcheck(bwd, (*grads, gi, weight_hh, bias_hh, alpha, s_seq, v_seq,
                                        i_seq, gh_seq, v0, i0, s0, v_th, gamma, signed,
                                        reset_gate))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_returns_the_recurrent_products(backend):
    """gh_seq, which the backward reads instead of recomputing the gates' recurrent terms, is
    U s_{t-1} of every step (s_{-1} = s0), without b_hh, in weight_hh's dtype: one and two
    directions, with and without an initial state, float64 and float32, and (Triton, CUDA) bf16
    products."""
    dev = backend_device(backend)
    from neurokern.spikgru2plus_ops import spikgru2plus_ops

    fwd = spikgru2plus_ops(backend)[0]
    for args in _op_samples(dev, backend):
        gi, weight_hh, _, _, _, _, s0 = args[:7]
        s_seq, _, _, gh_seq = fwd(*args)
        assert gh_seq.dtype == weight_hh.dtype and gh_seq.shape == gi.shape
        weights = weight_hh.view(-1, *weight_hh.shape[-2:]).double()  # [D, 3H, H]
        directions, batch = weights.shape[0], gi.shape[1] // weights.shape[0]
        s_prev = torch.cat([torch.zeros_like(s_seq[:1]) if s0 is None else s0[None], s_seq[:-1]])
        s_prev = s_prev.to(weight_hh.dtype).double().view(len(gi), directions, batch, -1)
        expected = torch.einsum("tdbh,dgh->tdbg", s_prev, weights).reshape(gi.shape)
        got = gh_seq.double()
        # bf16: the products accumulate in float32 and round once to bf16
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(weight_hh.dtype, 2 ** -8)
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max())
        if s0 is None:
            assert not gh_seq[0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    dev = backend_device(backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nk.nn.SpikGRU2Plus(5, 6, 2, bidirectional=True, batch_first=True,
                               backend=backend).to(dev)
    x = 2 * torch.randn(3, 7, 5, device=dev)
    eager, eager_state = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, state = compiled(x)
    assert eager.abs().sum() > 0
    assert torch.equal(out, eager)
    for a, b in zip(state, eager_state):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads = torch.autograd.grad(out.sum() + state[0].sum(), list(model.parameters()))
    eager_grads = torch.autograd.grad(eager.sum() + eager_state[0].sum(),
                                      list(model.parameters()))
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_before_any_kernel(backend, monkeypatch):
    dev = backend_device(backend)
    from neurokern import spikgru2plus_ops

    monkeypatch.setattr(spikgru2plus_ops.SpikGRU2PlusFunction, "apply",
                        lambda *a: pytest.fail("kernel ran"))
    x = torch.randn(4, 2, 3, device=dev)
    w_ih, w_hh = torch.randn(15, 3, device=dev), torch.randn(15, 5, device=dev)
    b, alpha = torch.randn(15, device=dev), torch.rand(5, device=dev)
    state = tuple(torch.randn(2, 5, device=dev) for _ in range(3))
    run_ = lambda *args, **kw: nk.spikgru2plus(*args, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="weight_ih must have shape"):  # hidden size mismatch
        run_(x, torch.randn(12, 3, device=dev), w_hh, b, b, alpha)
    with pytest.raises(ValueError, match="input size"):
        run_(x, torch.randn(15, 4, device=dev), w_hh, b, b, alpha)
    with pytest.raises(ValueError, match="weight_hh is on meta"):
        run_(x, w_ih, w_hh.to("meta"), b, b, alpha)
    with pytest.raises(ValueError, match="bias_hh must have shape"):
        run_(x, w_ih, w_hh, b, b[:12], alpha)
    with pytest.raises(TypeError, match="alpha has dtype"):
        run_(x, w_ih, w_hh, b, b, alpha.double())
    with pytest.raises(ValueError, match=r"state\[1\] \(i_?0\) must have shape"):
        run_(x, w_ih, w_hh, b, b, alpha, state=(state[0], state[1][:1], state[2]))
    with pytest.raises(ValueError, match="T = 0"):
        run_(x[:0], w_ih, w_hh, b, b, alpha)


def test_cpu_op_checks_its_arguments():
    """The C++ ops check shapes, dtypes and devices themselves, naming the argument."""
    if ("spikgru2plus", "cpu") not in nk.dispatch._IMPLEMENTATIONS or \
            not nk.dispatch.availability("spikgru2plus", "cpu", "cpu").available:
        pytest.skip("the cpu backend of spikgru2plus is not available")
    fwd = torch.ops.neurokern.spikgru2plus_fwd.default
    gi, w, alpha = torch.randn(3, 2, 12), torch.randn(12, 4), torch.rand(4)
    good = (gi, w, None, alpha, None, None, None, 1.0, 10.0, True, True, True)

    def call(**changes):
        names = ["gi", "weight_hh", "bias_hh", "alpha", "v0", "i0", "s0"]
        args = list(good)
        for name, value in changes.items():
            args[names.index(name)] = value
        return fwd(*args)

    with pytest.raises(RuntimeError, match="gi has dtype Half"):
        call(gi=gi.half(), weight_hh=w.half(), alpha=alpha.half())
    with pytest.raises(RuntimeError, match="weight_hh must have shape"):
        call(weight_hh=torch.randn(12, 5))
    with pytest.raises(RuntimeError, match="alpha has dtype Double"):
        call(alpha=alpha.double())
    with pytest.raises(RuntimeError, match="bias_hh must have shape"):
        call(bias_hh=torch.randn(4))
    with pytest.raises(RuntimeError, match="s0 must have shape"):
        call(s0=torch.randn(3, 4))
    with pytest.raises(RuntimeError, match=r"gi must have shape \[T, B, 3H\]"):
        call(gi=torch.randn(3, 2, 11))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_equal_launch_by_launch(monkeypatch):
    """The Triton loops replayed from a CUDA graph give bit-identical outputs and gradients to
    launch-by-launch runs, on a second call with new values (the replay reads new inputs),
    with a batch-major input of other strides, and after the graphs were dropped."""
    from neurokern import _kernels

    torch.manual_seed(0)
    layer = nk.nn.SpikGRU2Plus(6, 16, 2, bidirectional=True, backend="triton").cuda()

    def run(x):
        out, state = layer(x)
        weights = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
        grads = torch.autograd.grad((out * weights).sum() + 2 * state[0].sum(),
                                    [x, *layer.parameters()])
        return [out, *state, *grads]

    inputs = [2 * torch.randn(5, 3, 6, device="cuda", requires_grad=True) for _ in range(2)]
    inputs.append((2 * torch.randn(3, 5, 6, device="cuda")).transpose(0, 1).requires_grad_())
    _kernels.clear_cuda_graphs()
    graphed = [run(x) for x in inputs]
    assert len(_kernels._graphs) == 2  # one forward, one backward graph for all layers
    monkeypatch.setenv("NEUROKERN_CUDA_GRAPHS", "0")
    eager = [run(x) for x in inputs]
    for g, e in zip(graphed, eager):
        for a, b in zip(g, e):
            assert torch.equal(a, b)
    assert not torch.equal(graphed[0][0], graphed[1][0])
    _kernels.clear_cuda_graphs()
    assert not _kernels._graphs


def test_bf16_split_is_exact_and_split_product_float32_accurate():
    """The three bf16 parts of a float32 tensor sum back to it exactly (values over 20 decades),
    and a product with a factor exact in bf16 (spikes scaled by dropout's 1.25) is as close to
    the float64 product as the float32 product is (a small multiple, for the longer sums)."""
    from neurokern.spikgru2plus_ops import bf16_split, split_product

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 200, generator=gen) * torch.logspace(-10, 10, 200)
    parts = bf16_split(a)
    assert parts.dtype == torch.bfloat16 and parts.shape == (3, 300, 200)
    assert torch.equal(parts.double().sum(0), a.double())
    spikes = 1.25 * torch.randint(-1, 2, (64, 300), generator=gen).float()
    w, g = torch.randn(300, 50, generator=gen), torch.randn(50, 64, generator=gen)
    for got, f32, exact in ((split_product(spikes, w, "a"), spikes @ w,
                             spikes.double() @ w.double()),
                            (split_product(g, spikes, "b"), g @ spikes,
                             g.double() @ spikes.double())):
        assert got.dtype == torch.float32
        scale = exact.abs().max()
        assert (got - exact).abs().max() <= 4 * (f32 - exact).abs().max() + 1e-6 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tensor-core products need a GPU")
def test_split_product_on_the_tensor_cores_is_float32_accurate():
    """On the GPU (bf16 tensor cores, float32 accumulation, `torch.mm(out_dtype=float32)`), at
    the sizes of the paper's layers: within 16x the error of cuBLAS's float32 product with TF32
    off, against the float64 product (measured on an H100: 7.1x for x W^T and 6.7x for dW,
    the tensor cores' float32 accumulation over a 3x longer K; dropping the split's `lo` part
    gives about 2^8 times more)."""
    from neurokern.spikgru2plus_ops import split_product

    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    spikes = 1.25 * torch.randint(-1, 2, (2880, 2048), generator=gen, device="cuda").float()
    w = torch.randn(2048, 6144, generator=gen, device="cuda") * 0.02
    g = torch.randn(6144, 2880, generator=gen, device="cuda") * 1e-3
    for got, f32, exact in ((split_product(spikes, w, "a"), spikes @ w,
                             spikes.double() @ w.double()),
                            (split_product(g, spikes, "b"), g @ spikes,
                             g.double() @ spikes.double())):
        err, err32 = (got - exact).abs().max(), (f32 - exact).abs().max()
        assert err <= 16 * err32, (err.item(), err32.item())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values != ("cpu",)])
def test_split_products_of_a_spike_input(backend, monkeypatch):
    """NEUROKERN_SPLIT_PRODUCTS=1: the layers after the first of a stack in training mode with
    dropout 0.2 (spikes 0, +-1.25: exact in bf16) compute x W^T and dW = dgi^T x as split bf16
    products (both directions at once: one each per layer), the first layer as before. Spikes
    equal the float32 run without them and every gradient is within float32 accuracy of it.
    With dropout 0.1 (+-1.111..: not exact in bf16) x's products are not split."""
    from neurokern import spikgru2plus_ops

    dev = backend_device(backend)
    # launch by launch: a CUDA graph runs the loop's Python once to warm up and once to capture
    # on the first call per shape, and not at all when replayed
    monkeypatch.setenv("NEUROKERN_CUDA_GRAPHS", "0")
    calls = []
    split_product = spikgru2plus_ops.split_product
    monkeypatch.setattr(spikgru2plus_ops, "split_product",
                        lambda a, b, exact: calls.append(exact) or split_product(a, b, exact))

    def run_stack(split, dropout):
        monkeypatch.setenv("NEUROKERN_SPLIT_PRODUCTS", "1" if split else "0")
        torch.manual_seed(0)
        model = nk.nn.SpikGRU2Plus(6, 16, 3, bidirectional=True, dropout=dropout,
                                   backend=backend).to(dev)
        with torch.no_grad():  # larger weights: most neurons spike
            for p in model.parameters():
                p.mul_(3)
        x = (2 * torch.randn(7, 3, 6, device=dev)).requires_grad_()
        torch.manual_seed(1)  # the same dropout masks
        out, state = model(x)
        weights = torch.linspace(-1, 1, out.numel(), device=dev).view(out.shape)
        grads = torch.autograd.grad((out * weights).sum() + state[0].sum(),
                                    [x, *model.parameters()])
        return out, state, grads

    out, state, grads = run_stack(False, 0.2)
    assert not calls
    split_out, split_state, split_grads = run_stack(True, 0.2)
    # gi of layers 1 and 2 forward; dW of layers 2 and 1 backward
    assert calls == ["a", "a", "b", "b"]
    assert out.abs().mean() > 0.1
    assert torch.equal(split_out, out)
    for a, b in zip((*split_state, *split_grads), (*state, *grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * (1 + b.abs().max().item()))
    calls.clear()
    run_stack(True, 0.1)
    assert not calls


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_spike_input_alone_changes_nothing(backend, monkeypatch):
    """spike_input=True without NEUROKERN_SPLIT_PRODUCTS (and always on the reference and the
    C++ CPU backend) computes exactly what spike_input=False does, one and two directions."""
    monkeypatch.delenv("NEUROKERN_SPLIT_PRODUCTS", raising=False)
    dev = "cpu" if backend == "reference" else backend_device(backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-1, 2, (5, 2, 6), generator=gen).float().to(dev).requires_grad_()
    params = [[(3 * torch.randn(shape, generator=gen) / 6 ** 0.5).to(dev).requires_grad_()
               for shape in ((18, 6), (18, 6), (18,), (18,))] + [torch.rand(6).to(dev)]
              for _ in range(2)]
    for flag_runs in ([nk.spikgru2plus(x, *params[0], spike_input=flag, backend=backend)
                       for flag in (False, True)],
                      [nk.spikgru2plus_bidirectional(x, params[0], params[1], spike_input=flag,
                                                     backend=backend) for flag in (False, True)]):
        results = []
        for s, final in flag_runs:
            leaves = [x, *params[0][:4], *params[1][:4]]  # the leaks are constants here
            grads = torch.autograd.grad(s.sum() + final[0].sum(), leaves, allow_unused=True)
            results.append([s, *final, *(g for g in grads if g is not None)])
        for a, b in zip(*results):
            assert torch.equal(a, b)
