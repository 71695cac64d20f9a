"""The generalised multi-step neuron (docs/neurons.md, issue 21): the options of `plif` beyond the
paper's PLIF (reset soft/hard/none, reset before the leak, input decay, strict threshold, atan or
sigmoid surrogate with a scale), in the reference and in every fused backend, forward and
backward."""

import contextlib
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
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


# ---------------------------------------------------------------------------------------------
# Fused backends against the reference
# ---------------------------------------------------------------------------------------------

from conftest import backend_device, fused_backends  # noqa: E402
from test_fused_plif import launch_config  # noqa: E402
from test_verified import gpu, table  # noqa: E402,F401  (gpu: the fake-GPU fixture)

BACKENDS = fused_backends("plif")


@st.composite
def neuron_cases(draw):
    # big: more neurons than one Triton block (256) and than one C++ chunk of 64
    big = draw(st.booleans())
    spatial = [11, 11] if big else draw(st.lists(st.integers(1, 4), max_size=2))
    opts = dict(draw(st.sampled_from(ALL_OPTIONS)))
    opts["v_reset"] = draw(st.sampled_from([0.0, -0.4, 0.3])) if opts["reset"] == "hard" else 0.0
    opts["surrogate_scale"] = draw(st.sampled_from([1.0, 0.5, 2.0]))
    return dict(
        shape=(draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
               *spatial),
        layout=draw(st.sampled_from(["time_major", "batch_major", "transposed", "strided"])),
        # how the incoming gradients are laid out: contiguous, or views (transposed, sliced)
        grad_layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        opts=opts,
        scalar_leak=draw(st.booleans()),
        # a leak without gradient (SpikingJelly's LIFNode, snnTorch's Leaky): plif_bwd's
        # leak_grad = False, which the general C++ kernels skip
        fixed_leak=draw(st.booleans()),
        with_state=draw(st.booleans()),
        detach_reset=draw(st.booleans()),
        v_th=draw(st.floats(0.4, 1.5)),
        gamma=draw(st.floats(1.0, 10.0)),
        seed=draw(st.integers(0, 2**16)),
        checkpoint=draw(st.sampled_from([None, 1, 2, 3])),
        block=draw(st.sampled_from([None, 16])),
    )


def view_like(t, how, gen):
    """A tensor equal in shape to t with random float64 values, laid out as `how`: contiguous,
    a transposed view of its first two dims, or every other element of a wider last dim."""
    shape = list(t.shape)
    if how == "transposed":
        return torch.randn([shape[1], shape[0], *shape[2:]], generator=gen,
                           dtype=f64).transpose(0, 1)
    if how == "sliced":
        return torch.randn([*shape[:-1], 2 * shape[-1]], generator=gen, dtype=f64)[..., ::2]
    return torch.randn(shape, generator=gen, dtype=f64)


def make_inputs(case):
    """float64 leaves in the case's layout: x, alpha, (v0, s0) or None."""
    gen = torch.Generator().manual_seed(case["seed"])
    t, b, c, *spatial = case["shape"]
    layout = case["layout"]
    if layout == "time_major":
        x = torch.randn(t, b, c, *spatial, generator=gen, dtype=f64)
    elif layout == "batch_major":
        x = torch.randn(b, t, c, *spatial, generator=gen, dtype=f64)
    elif layout == "transposed":  # a time-major view of batch-major memory
        x = torch.randn(b, t, c, *spatial, generator=gen, dtype=f64).transpose(0, 1)
    else:  # every other element of a wider last dim
        x = torch.randn(t, b, c, *spatial[:-1], 2 * (spatial[-1] if spatial else 1),
                        generator=gen, dtype=f64)
        x = x[..., ::2] if spatial else x[..., 0]
    x = 1.5 * x
    alpha = torch.rand(() if case["scalar_leak"] else (c,), generator=gen, dtype=f64)
    state = None
    if case["with_state"]:
        s0 = torch.rand((b, c, *spatial), generator=gen, dtype=f64).round()
        if case["opts"]["signed"]:
            s0 = s0 - torch.rand((b, c, *spatial), generator=gen, dtype=f64).round()
        state = (torch.randn((b, c, *spatial), generator=gen, dtype=f64), s0)
    return x, alpha, state


def cotangents(case, s, v_last, gen):
    """Incoming gradients for (s, v_T, s_T), laid out as the case says."""
    how = case["grad_layout"]
    return [view_like(s, how, gen), view_like(v_last, how, gen), view_like(v_last, how, gen)]


def run(case, backend, dtype, x, alpha, state, spiking=True, spike_dtype=None,
        state_grads_as=None):
    """`(s, v_T, s_T, dx, dalpha, dv0, ds0)` in float64 on the CPU, from `backend` with the
    inputs cast to `dtype`, and the incoming gradients of `cotangents` in the dtypes of the
    outputs (those of the final state first rounded to `state_grads_as`, if given)."""
    device = backend_device(backend)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = x.detach().to(device, dtype).requires_grad_()
    alpha = alpha.detach().to(device, param_dtype).requires_grad_(not case.get("fixed_leak"))
    st_ = None if state is None else tuple(
        t.detach().to(device, dtype).requires_grad_() for t in state)
    config = contextlib.nullcontext() if backend == "reference" else launch_config(
        backend, case["checkpoint"], case["block"])
    opts = {k: v for k, v in case["opts"].items() if k != "signed"}
    with config:
        s, (v_last, s_last) = nk.plif(
            x, alpha, v_th=case["v_th"], gamma=case["gamma"], signed=case["opts"]["signed"],
            batch_first=case["layout"] == "batch_major", state=st_, return_state=True,
            detach_reset=case["detach_reset"], spiking=spiking, backend=backend,
            spike_dtype=spike_dtype, **opts)
        gen = torch.Generator().manual_seed(case["seed"] + 1)
        grads = cotangents(case, s, v_last, gen)
        if state_grads_as is not None:
            grads[1:] = [g.to(state_grads_as) for g in grads[1:]]
        grads = [g.to(device, o.dtype) for g, o in zip(grads, (s, v_last, s_last))]
        leaves = [x, alpha] + ([] if st_ is None else list(st_))
        wanted = [t for t in leaves if t.requires_grad]
        found = iter(torch.autograd.grad((s, v_last, s_last), wanted, grads, allow_unused=True,
                                         materialize_grads=True))
        grads = [next(found) if t.requires_grad else torch.zeros_like(t) for t in leaves]
    return [t.detach().double().cpu() for t in (s, v_last, s_last, *grads)]


NAMES = ["s", "v_T", "s_T", "dx", "dalpha", "dv0", "ds0"]


def check_float64(backend, case):
    """float64: spikes exactly the reference's, the final state and every gradient (dalpha and
    the gradients through the returned final state included) to round-off, for non-contiguous
    inputs and incoming gradients too."""
    x, alpha, state = make_inputs(case)
    ref = run(case, "reference", f64, x, alpha, state)
    out = run(case, backend, f64, x, alpha, state)
    assert torch.equal(out[0], ref[0]), "spikes differ in float64"
    assert torch.equal(out[2], ref[2]), "final spikes differ in float64"
    for name, a, b in zip(NAMES[1:], out[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


# The hypothesis tests run the C++ backend with the profile's examples and the Triton
# interpreter, which is slow, with a quarter of them.
CPU = [p for p in BACKENDS if p.values[0] == "cpu"]
TRITON = [p for p in BACKENDS if p.values[0] != "cpu"]
FEWER = settings(max_examples=max(4, settings().max_examples // 4))


@pytest.mark.parametrize("backend", CPU)
@given(case=neuron_cases())
def test_cpu_float64_equals_reference(poison_empty, backend, case):
    check_float64(backend, case)


@pytest.mark.parametrize("backend", TRITON)
@FEWER
@given(case=neuron_cases())
def test_triton_float64_equals_reference(poison_empty, backend, case):
    check_float64(backend, case)


def test_fused_dalpha_with_transposed_incoming_gradient():
    """The case a lost attempt at this work got wrong: the general C++ backward's dalpha with
    dL/ds a non-contiguous transposed view (reset hard, SpikingJelly order, float64)."""
    case = dict(shape=(2, 3, 2, 13, 13), layout="time_major", grad_layout="transposed",
                opts=dict(signed=False, reset="hard", v_reset=0.0, reset_before_leak=True,
                          decay_input=True, strict_threshold=False, surrogate="sigmoid",
                          surrogate_scale=1.0),
                scalar_leak=False, with_state=False, detach_reset=False, v_th=1.0, gamma=4.0,
                seed=5, checkpoint=None, block=None)
    x, alpha, state = make_inputs(case)
    ref = run(case, "reference", f64, x, alpha, state)
    for backend in ("cpu", "triton"):
        if not any(p.values[0] == backend and not p.marks for p in BACKENDS):
            continue
        out = run(case, backend, f64, x, alpha, state)
        for name, a, b in zip(NAMES, out, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{backend} {name}")


def _flips(case, out_s, ref_s):
    """`[B, C, *S]` neurons whose spike trains differ."""
    time_dim = 1 if case["layout"] == "batch_major" else 0
    return (out_s != ref_s).any(time_dim)


def check_low_precision(backend, dtype, case):
    """float32/bfloat16/float16 (float32 state): spikes equal the float64 reference's on the
    inputs as rounded, except for rare threshold flips; the final membrane and every gradient,
    on neurons without a flip, as close to the float64 reference as the same-dtype reference
    is (plus one unit in the last place)."""
    x, alpha, state = make_inputs(case)
    x_q = x.to(dtype).double()
    state_q = None if state is None else tuple(t.to(dtype).double() for t in state)
    alpha_q = alpha.float().double()
    ref64 = run(case, "reference", f64, x_q, alpha_q, state_q)
    ref = run(case, "reference", dtype, x, alpha, state)
    out = run(case, backend, dtype, x, alpha, state)
    flips = _flips(case, out[0], ref64[0]) | _flips(case, ref[0], ref64[0])
    assert flips.double().mean() <= 0.1, "too many threshold flips"
    keep = ~flips
    keep_t = keep.unsqueeze(1 if case["layout"] == "batch_major" else 0).expand_as(out[0])
    assert torch.equal(out[0][keep_t], ref64[0][keep_t])
    ulp = max(torch.finfo(dtype).eps, 1e-5)
    checks = [(1, keep), (3, keep_t)] + ([(5, keep), (6, keep)] if len(out) > 5 else [])
    for index, mask in checks:
        if not mask.any():
            continue
        allowed = 4 * (ref[index] - ref64[index])[mask].abs().max()
        err = (out[index] - ref64[index])[mask].abs().max()
        assert err <= allowed + ulp * (1 + ref64[index].abs().max()), (NAMES[index], err, allowed)
    if not flips.any():
        allowed = 4 * (ref[4] - ref64[4]).abs().max()
        assert (out[4] - ref64[4]).abs().max() <= allowed + ulp * (1 + ref64[4].abs().max())


LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@given(case=neuron_cases())
def test_cpu_low_precision_against_float64_reference(poison_empty, backend, dtype, case):
    check_low_precision(backend, dtype, case)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@FEWER
@given(case=neuron_cases())
def test_triton_low_precision_against_float64_reference(poison_empty, backend, dtype, case):
    check_low_precision(backend, dtype, case)


HALF_DTYPES = [torch.bfloat16, torch.float16]


def check_float32_spikes(backend, dtype, case):
    """spike_dtype=float32 for a float16/bfloat16 x (snnTorch's spikes): the kernels compute in
    float32 anyway, so the run equals the float32 run on the same rounded inputs, with the
    incoming gradient of the spikes in float32 as it comes (no rounding to x's dtype): spikes
    and dalpha exactly, the final state and dx, dv0, ds0 that run's rounded to x's dtype (one
    unit in the last place on the Triton interpreter, which truncates)."""
    x, alpha, state = make_inputs(case)
    x_q = x.to(dtype).double()
    state_q = None if state is None else tuple(t.to(dtype).double() for t in state)
    out = run(case, backend, dtype, x, alpha, state, spike_dtype=torch.float32)
    f32 = run(case, backend, torch.float32, x_q, alpha, state_q, state_grads_as=dtype)
    assert torch.equal(out[0], f32[0]), "spikes differ"
    assert torch.equal(out[2], f32[2]), "final spikes differ"
    rtol = 0 if backend == "cpu" else torch.finfo(dtype).eps
    for index in (1, 3, 5, 6)[:len(out) - 3]:  # v_T, dx (dv0, ds0 with a state): x's dtype
        rounded = f32[index].to(dtype).double()
        torch.testing.assert_close(out[index], rounded, rtol=rtol, atol=0, msg=NAMES[index])
    torch.testing.assert_close(out[4], f32[4], rtol=0 if backend == "cpu" else 1e-6, atol=0,
                               msg="dalpha")


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@given(case=neuron_cases())
def test_cpu_float32_spikes_of_half_inputs(poison_empty, backend, dtype, case):
    check_float32_spikes(backend, dtype, case)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@FEWER
@given(case=neuron_cases())
def test_triton_float32_spikes_of_half_inputs(poison_empty, backend, dtype, case):
    check_float32_spikes(backend, dtype, case)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF_DTYPES])
def test_spike_dtype(backend, dtype):
    """spike_dtype: s in x's compute dtype, the state in x's dtype; the same spikes as the
    default call; another dtype is refused before any kernel runs."""
    device = "cpu" if backend == "reference" else backend_device(backend)
    x = torch.randn(5, 2, 3, 4, device=device).to(dtype)
    alpha = torch.full((3,), 0.8, device=device, dtype=reference.compute_dtype(dtype))
    compute = reference.compute_dtype(dtype)
    s, (v, s_last) = nk.plif(x, alpha, return_state=True, backend=backend, spike_dtype=compute)
    assert s.dtype == compute and v.dtype == s_last.dtype == dtype
    assert torch.equal(s, nk.plif(x, alpha, backend=backend).to(compute))
    for bad in (torch.float64 if dtype != torch.float64 else torch.float32, torch.int32):
        with pytest.raises(ValueError, match="spike_dtype must be x's dtype"):
            nk.plif(x, alpha, backend=backend, spike_dtype=bad)
    with pytest.raises(TypeError, match="spike_dtype must be a torch.dtype"):
        nk.plif(x, alpha, backend=backend, spike_dtype="float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bwd_refuses_a_gradient_of_another_dtype(backend):
    """plif_bwd reads dL/ds in x's dtype or its compute dtype (spike_dtype), nothing else: a
    float32 gradient for a float64 x, or float16 for bfloat16, is refused, not misread."""
    from neurokern.plif_ops import checkpoint_interval, plif_ops

    device = backend_device(backend)
    fwd, bwd = plif_ops(backend)
    for x_dtype, grad_dtype in ((f64, torch.float32), (torch.bfloat16, torch.float16)):
        x = torch.randn(4, 2, 3, 5, device=device, dtype=x_dtype)
        alpha = torch.full((3,), 0.9, device=device, dtype=reference.compute_dtype(x_dtype))
        k = checkpoint_interval(backend, x.dtype)
        s, v_saved, _, _ = fwd(x, alpha, None, None, 1.0, 4.0, False, False, True, k)
        with pytest.raises((RuntimeError, ValueError), match="grad_s must have x's dtype"):
            bwd(torch.ones_like(s, dtype=grad_dtype), None, None, x, v_saved, alpha, None, None,
                1.0, 4.0, False, False, True, False, k)


def gradcheck_cases(detach_reset=False):
    """Smooth-mode cases: every reset x order x input decay x surrogate, and signed spikes
    (soft or no reset, atan) x order x input decay; a scalar or [C] leak, an initial state or
    none, and the checkpoint interval alternate across them (a strict threshold has no effect in
    smooth mode)."""
    cases = []
    for reset, before, decay, surrogate in itertools.product(
            reference.RESETS, (False, True), (False, True), reference.SURROGATES):
        cases.append(dict(signed=False, reset=reset, reset_before_leak=before,
                          decay_input=decay, surrogate=surrogate, detach_reset=detach_reset))
    for reset, before, decay in itertools.product(("soft", "none"), (False, True),
                                                  (False, True)):
        cases.append(dict(signed=True, reset=reset, reset_before_leak=before, decay_input=decay,
                          surrogate="atan", detach_reset=detach_reset))
    for i, case in enumerate(cases):
        case.update(scalar_leak=i % 2 == 0, with_state=i % 3 != 0,
                    checkpoint=(None, 1, 2)[i % 3], v_reset=-0.3 if i % 4 else 0.2,
                    surrogate_scale=(1.0, 0.6, 1.8)[i % 3])
    return cases


def smooth_inputs(case, device):
    """float64 leaves (x [5, 1, 2, 3], alpha, and with_state (v_0, s_0)) on `device`."""
    gen = torch.Generator().manual_seed(7)
    T, B, C, S = 5, 1, 2, 3  # T = 5 crosses Triton's float64 checkpoint chunk of 4 steps
    x = (1.2 * torch.randn(T, B, C, S, generator=gen, dtype=f64)).to(device).requires_grad_()
    alpha = (0.3 + 0.6 * torch.rand(() if case["scalar_leak"] else (C,), generator=gen,
                                    dtype=f64)).to(device).requires_grad_()
    inputs = [x, alpha]
    if case["with_state"]:
        inputs += [torch.randn(B, C, S, generator=gen, dtype=f64).to(device).requires_grad_(),
                   torch.rand(B, C, S, generator=gen, dtype=f64).to(device).requires_grad_()]
    return inputs


def smooth_plif(case, backend):
    """The smooth-mode neuron of `case` as a function of (x, alpha, *state) -> (s, v_T, s_T)."""
    opts = {k: case[k] for k in OPTION_NAMES if k in case}
    opts["v_reset"] = case["v_reset"] if case["reset"] == "hard" else 0.0

    def fn(x, alpha, *state):
        s, (v, s_last) = nk.plif(x, alpha, v_th=0.7, gamma=2.0, signed=case["signed"],
                                 state=tuple(state) or None, return_state=True,
                                 detach_reset=case["detach_reset"], spiking=False,
                                 backend=backend, **opts)
        return s, v, s_last
    return fn


def smooth_params(detach_reset=False):
    """(backend, case) params: every case on the C++ backend, every third on the Triton
    interpreter (slow; still each option value)."""
    return [pytest.param(p.values[0], case, marks=p.marks, id=f"{p.values[0]}-{option_id(case)}")
            for p in BACKENDS for i, case in enumerate(gradcheck_cases(detach_reset))
            if p.values[0] == "cpu" or i % 3 == 0]


@pytest.mark.parametrize("backend,case", smooth_params())
def test_fused_gradcheck_smooth(backend, case):
    """The fused backward is the exact derivative of the fused smooth-mode forward (float64),
    through the spikes, the returned final state, x, alpha and the initial state. The Triton
    interpreter runs gradcheck's fast mode (random projections)."""
    inputs = smooth_inputs(case, backend_device(backend))
    with launch_config(backend, case["checkpoint"]):
        torch.autograd.gradcheck(smooth_plif(case, backend), inputs,
                                 fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,case", smooth_params(detach_reset=True))
def test_fused_detach_reset_smooth(backend, case):
    """detach_reset makes the backward differ from the forward's derivative on purpose (no
    gradcheck): in smooth mode every gradient equals the reference's autograd through its
    detached spikes, in float64."""
    device = backend_device(backend)
    inputs = smooth_inputs(case, device)
    gen = torch.Generator().manual_seed(8)
    results = []
    for be in ("reference", backend):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with launch_config(backend, case["checkpoint"]):
            outs = smooth_plif(case, be)(*leaves)
        gen.manual_seed(8)
        cots = [torch.randn(o.shape, generator=gen, dtype=f64).to(device) for o in outs]
        results.append(torch.autograd.grad(outs, leaves, cots, allow_unused=True,
                                           materialize_grads=True))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_options_run_the_paper_kernels(backend, monkeypatch):
    """The defaults (also given explicitly, and v_reset without a hard reset) pass no options
    to the ops: the paper's kernels run, unchanged."""
    from neurokern import plif_ops

    seen = []
    apply = plif_ops.PLIFFunction.apply
    monkeypatch.setattr(plif_ops.PLIFFunction, "apply",
                        lambda *args: seen.append(args[11]) or apply(*args))
    x = torch.randn(3, 2, 4, device=backend_device(backend))
    nk.plif(x, 0.5, backend=backend)
    nk.plif(x, 0.5, backend=backend, **(reference.NEURON_DEFAULTS | dict(v_reset=0.4)))
    nk.plif(x, 0.5, backend=backend, reset="hard")
    assert seen[0] == () and seen[1] == () and seen[2] != ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_general(backend):
    """The ops with the generalised neuron's options pass torch.library's checks (schema,
    fake tensors, autograd registration)."""
    from neurokern.plif_ops import checkpoint_interval, plif_ops

    device = backend_device(backend)
    fwd, bwd = plif_ops(backend)
    x = torch.randn(4, 2, 3, 5, device=device)
    alpha = torch.full((3,), 0.9, device=device)
    state = torch.randn(2, 3, 5, device=device), torch.rand(2, 3, 5, device=device)
    k = checkpoint_interval(backend, x.dtype)
    for options in (("hard", -0.2, True, True, False, "sigmoid", 1.0),
                    ("none", 0.0, False, False, True, "atan", 0.5)):
        args = (x, alpha, *state, 1.0, 4.0, False, False, True, k, *options)
        torch.library.opcheck(fwd, args)
        s, v_saved, v_last, _ = fwd(*args)
        for leak_grad in (True, False):
            torch.library.opcheck(bwd, (torch.randn_like(s), torch.randn_like(v_last), None, x,
                                        v_saved, alpha, *state, 1.0, 4.0, False, False, True,
                                        True, k, *options), dict(leak_grad=leak_grad))
    # float32 spikes of a bfloat16 x (spike_dtype), and their float32 gradient
    x, state = x.bfloat16(), tuple(t.bfloat16() for t in state)
    k = checkpoint_interval(backend, x.dtype)
    for options in ((), ("hard", -0.2, True, True, False, "sigmoid", 1.0)):
        args = (x, alpha, *state, 1.0, 4.0, False, False, True, k, *options)
        spikes = dict(spike_dtype=torch.float32)
        torch.library.opcheck(fwd, args, spikes)
        s, v_saved, v_last, _ = fwd(*args, **spikes)
        assert s.dtype == torch.float32 and v_last.dtype == torch.bfloat16
        torch.library.opcheck(bwd, (torch.randn_like(s), torch.randn_like(v_last), None, x,
                                    v_saved, alpha, *state, 1.0, 4.0, False, False, True, True,
                                    k, *options))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_general(backend):
    """torch.compile(fullgraph=True) traces a call with the generalised neuron's options."""
    device = backend_device(backend)
    torch._dynamo.reset()
    x = torch.randn(4, 2, 3, 5, device=device, requires_grad=True)
    alpha = torch.full((3,), 0.8, device=device, requires_grad=True)

    def fn(x, alpha):
        return nk.plif(x, alpha, reset="hard", reset_before_leak=True, decay_input=True,
                       surrogate="sigmoid", gamma=4.0, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, alpha)
    assert torch.equal(out, fn(x, alpha))
    out.sum().backward()
    assert alpha.grad is not None


def test_auto_on_a_gpu_runs_the_general_kernels_only_where_verified(gpu, caplog, monkeypatch):
    """On a GPU, a call with the generalised neuron's options is resolved with its own variant,
    triton.plif.general: the paper's variants passing does not make `auto` run it; the
    reference runs, with a warning naming the variant, until it passed or is opted in."""
    from neurokern import dispatch, verified

    cuda = torch.device("cuda")
    gpu(table({"triton.plif.strided/float32": [(9, "passed", "2026-11-23")]}), 9)
    assert dispatch.resolve("plif", "auto", cuda, torch.float32)[0] == "triton"
    with caplog.at_level("INFO", logger="neurokern"):
        assert dispatch.resolve("plif", "auto", cuda, torch.float32, "plif_general")[0] == \
            "reference"
    assert any("triton.plif.general/float32 opt-in" in r.getMessage() for r in caplog.records)
    gpu(table({"triton.plif.general/float32": [(9, "passed", "2026-12-02")]}), 9)
    assert dispatch.resolve("plif", "auto", cuda, torch.float32, "plif_general")[0] == "triton"
    gpu({"variants": {}}, 9)
    monkeypatch.setenv(verified.ENV_OPT_IN, "triton.plif.general")
    assert dispatch.resolve("plif", "auto", cuda, torch.float32, "plif_general")[0] == "triton"


def test_general_launches_note_their_variant(monkeypatch):
    """The Triton launchers note triton.plif.general (for the GPU test run's record) for a
    general call, and the paper's variants otherwise."""
    if not any(p.values[0] == "triton" and not p.marks for p in BACKENDS):
        pytest.skip("the Triton backend cannot run here")
    from neurokern import verified

    noted = []
    monkeypatch.setattr(verified, "note", lambda name, dtype, device: noted.append(name))
    x = torch.randn(3, 2, 4, device=backend_device("triton"), requires_grad=True)
    nk.plif(x, 0.5, reset="none", backend="triton").sum().backward()
    assert noted == ["triton.plif.general"] * 2  # forward and backward
    noted.clear()
    nk.plif(x, 0.5, backend="triton").sum().backward()
    assert len(noted) == 2 and "triton.plif.general" not in noted
