"""Fused PLIF backends (C++ CPU, Triton: on the GPU, or on the CPU under the interpreter) against
the reference: forward, every gradient, smooth-mode gradcheck, torch.library and torch.compile."""

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import neurokern as nk
from conftest import backend_device, fused_backends

BACKENDS = fused_backends("plif")
RECOMPUTING_BACKENDS = {"cpu", "triton"}  # backends whose kernels take any checkpoint interval
f64 = torch.float64


@st.composite
def plif_cases(draw):
    # big: more neurons than one block (256) and than one block per channel; packed: with
    # blocks of 16 neurons, channels of 32 contiguous neurons (the kernels' PACKED path)
    size = draw(st.sampled_from(["small", "big", "packed"]))
    spatial = {"big": [11, 11], "packed": [4, 8]}.get(size) or draw(
        st.lists(st.integers(1, 5), max_size=2))
    return dict(
        shape=(draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
               *spatial),
        layout=draw(st.sampled_from(["time_major", "batch_major", "transposed", "strided"])),
        signed=draw(st.booleans()),
        scalar_leak=draw(st.booleans()),
        with_state=draw(st.booleans()),
        detach_reset=draw(st.booleans()),
        v_th=draw(st.floats(0.4, 1.5)),
        gamma=draw(st.floats(1.0, 10.0)),
        seed=draw(st.integers(0, 2**16)),
        # membranes saved every k steps (the backward recomputes the rest); None: the default
        checkpoint=draw(st.sampled_from([None, 1, 2, 3, 8])),
        # neurons per Triton program (None: the default, LAUNCH)
        block=16 if size == "packed" else draw(st.sampled_from([None, 16])),
    )


@contextlib.contextmanager
def launch_config(backend, k, block=None):
    """Run `backend` with the membranes saved every `k` steps and, on Triton, `block` neurons
    per program (None: the defaults)."""
    from neurokern import plif_ops

    default = plif_ops.CHECKPOINT[backend], {size: dict(c) for size, c in plif_ops.LAUNCH.items()}
    plif_ops.CHECKPOINT[backend] = default[0] if k is None else k
    for config in plif_ops.LAUNCH.values():
        config["BLOCK"] = block or config["BLOCK"]
    try:
        yield
    finally:
        plif_ops.CHECKPOINT[backend] = default[0]
        for size, config in default[1].items():
            plif_ops.LAUNCH[size].update(config)


def make_inputs(case):
    """float64 leaves: x in the case's layout and memory arrangement, alpha, (v0, s0)."""
    gen = torch.Generator().manual_seed(case["seed"])
    t, b, c, *spatial = case["shape"]
    rand = lambda *shape: torch.randn(shape, generator=gen, dtype=f64)  # noqa: E731
    layout = case["layout"]
    if layout == "time_major":
        x = 1.3 * rand(t, b, c, *spatial)
    elif layout == "batch_major":
        x = 1.3 * rand(b, t, c, *spatial)
    elif layout == "transposed":  # a time-major view of batch-major memory
        x = (1.3 * rand(b, t, c, *spatial)).transpose(0, 1)
    else:  # every other element of a wider last dim: strided spatial dims
        x = (1.3 * rand(t, b, c, *spatial[:-1], 2 * (spatial[-1] if spatial else 1)))
        x = x[..., ::2] if spatial else x[..., 0]
    alpha = torch.rand(() if case["scalar_leak"] else (c,), generator=gen, dtype=f64)
    state = (rand(b, c, *spatial), torch.rand((b, c, *spatial), generator=gen, dtype=f64)) \
        if case["with_state"] else None
    cotangents = [rand(*x.shape), rand(b, c, *spatial), rand(b, c, *spatial)]
    return x, alpha, state, cotangents


def run(case, backend, dtype, x, alpha, state, cotangents, device):
    """Forward and gradients (x, alpha, v0, s0) on `backend` and `device`, inputs cast to
    `dtype`."""
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = x.detach().to(device, dtype).requires_grad_()
    alpha = alpha.detach().to(device, param_dtype).requires_grad_()
    st_ = None if state is None else tuple(
        t.detach().to(device, dtype).requires_grad_() for t in state)
    k = case["checkpoint"] if backend in RECOMPUTING_BACKENDS else None
    config = contextlib.nullcontext() if backend == "reference" else launch_config(
        backend, k, case.get("block"))
    with config:
        s, (v_last, s_last) = nk.plif(
            x, alpha, v_th=case["v_th"], gamma=case["gamma"], signed=case["signed"],
            batch_first=case["layout"] == "batch_major", state=st_, return_state=True,
            detach_reset=case["detach_reset"], backend=backend)
        loss = sum((o.double() * g.to(device)).sum()
                   for o, g in zip((s, v_last, s_last), cotangents))
        leaves = [x, alpha] + ([] if st_ is None else list(st_))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return [t.detach().double().cpu() for t in (s, v_last, s_last, *grads)]


def time_major(t, case):
    return t.transpose(0, 1) if case["layout"] == "batch_major" else t


def flipped_neurons(case, x, alpha, state, s_fused, s_ref):
    """Neurons whose spike trains differ, as a `[B, C, *S]` mask, after checking that each one
    first differs where the membrane is within float32 rounding of a threshold (computed in
    float64 from the spikes both runs agree on before that step)."""
    x, s_fused, s_ref = (time_major(t, case) for t in (x, s_fused, s_ref))
    differs = s_fused != s_ref  # [T, B, C, *S]
    flipped = differs.any(0)
    if not flipped.any():
        return flipped
    a = alpha if alpha.dim() == 0 else alpha.view(1, -1, *([1] * (x.dim() - 3)))
    v, s = (torch.zeros_like(x[0]), torch.zeros_like(x[0])) if state is None else state
    seen = torch.zeros_like(flipped)
    for t in range(x.shape[0]):
        v = a * v + x[t] - case["v_th"] * s
        first = differs[t] & ~seen
        if first.any():
            margin = torch.minimum((v - case["v_th"]).abs(), (v + case["v_th"]).abs())
            if not case["signed"]:
                margin = (v - case["v_th"]).abs()
            scale = 1 + x.abs().max()
            assert margin[first].max() < 1e-4 * scale, "a spike differs far from the threshold"
        seen |= differs[t]
        s = s_fused[t]
    assert flipped.double().mean() < 0.05, "too many threshold flips"
    return flipped


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=plif_cases())
def test_float64_equals_reference(poison_empty, backend, case):
    device = backend_device(backend)
    x, alpha, state, cot = make_inputs(case)
    ref = run(case, "reference", f64, x, alpha, state, cot, device)
    out = run(case, backend, f64, x, alpha, state, cot, device)
    assert torch.equal(out[0], ref[0]), "spikes differ in float64"
    assert torch.equal(out[2], ref[2])
    names = ["v_last", "s_last", "dx", "dalpha", "dv0", "ds0"]
    for name, a, b in zip(names[2:], out[3:], ref[3:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(case=plif_cases())
def test_low_precision_against_float64_reference(poison_empty, backend, dtype, case):
    """Spikes equal the reference's in the same dtype except for threshold flips (which must
    be rare and first occur within rounding of the threshold); every gradient, on neurons
    without a flip, is as close to the float64 reference as the same-dtype reference is."""
    device = backend_device(backend)
    x, alpha, state, cot = make_inputs(case)
    x_q = x.to(dtype).double()  # the inputs as the low-precision runs see them
    state_q = None if state is None else tuple(t.to(dtype).double() for t in state)
    alpha_q = alpha.float().double()
    ref64 = run(case, "reference", f64, x_q, alpha_q, state_q, cot, device)
    ref = run(case, "reference", dtype, x, alpha, state, cot, device)
    out = run(case, backend, dtype, x, alpha, state, cot, device)
    flips = flipped_neurons(case, x_q, alpha_q, state_q, out[0], ref64[0])
    flips |= flipped_neurons(case, x_q, alpha_q, state_q, ref[0], ref64[0])
    keep = ~flips  # [B, C, *S]
    keep_t = keep.unsqueeze(1 if case["layout"] == "batch_major" else 0).expand_as(out[0])
    assert torch.equal(out[0][keep_t], ref64[0][keep_t])
    checks = [(out[1], ref[1], ref64[1], keep), (out[3], ref[3], ref64[3], keep_t)]
    if len(out) > 5:
        checks += [(out[5], ref[5], ref64[5], keep), (out[6], ref[6], ref64[6], keep)]
    # Plus one unit in the last place of the output dtype: the Triton interpreter truncates
    # float32 -> half (the GPU rounds to nearest), so its outputs may sit one ulp further away.
    ulp = max(torch.finfo(dtype).eps, 1e-5)
    for got, same_dtype, exact, mask in checks:
        allowed = 4 * (same_dtype - exact)[mask].abs().max() if mask.any() else 0
        err = (got - exact)[mask].abs().max() if mask.any() else torch.tensor(0.0)
        assert err <= allowed + ulp * (1 + exact.abs().max()), (err, allowed)
    if not flips.any():  # the leak gradient sums over neurons: compare only without flips
        allowed = 4 * (ref[4] - ref64[4]).abs().max()
        assert (out[4] - ref64[4]).abs().max() <= allowed + ulp * (1 + ref64[4].abs().max())


def test_packed_layouts():
    """Which layouts the Triton launchers hand to the kernels' PACKED path (contiguous neurons
    per program, alignment promised to the compiler): a wrong yes would be a wrong promise."""
    from neurokern.plif_ops import packed_align, step_strides

    def align(x, block=16, batch_first=False, *others):
        sizes, strides = step_strides(x, batch_first)
        return packed_align(block, x.element_size(), sizes, strides,
                            *(step_strides(o, batch_first)[1] for o in others))

    x = torch.zeros(5, 3, 4, 4, 8)  # [T, B, C, H, W], M = 128
    assert align(x) == 4  # 16 bytes of float32
    assert align(x.double()) == 2 and align(x.bfloat16()) == 8
    assert align(x.transpose(0, 1), batch_first=True) == 4
    assert align(x.transpose(0, 1).contiguous().transpose(0, 1)) == 4  # time-major view
    assert align(x[1:]) == 4  # a storage offset is the pointer's business, not the strides'
    assert align(x, 256) == 0  # M = 128 is not a multiple of the block
    assert align(x[..., ::2]) == 0  # strided spatial dims
    assert align(x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)) == 0  # channels last
    assert align(x, 16, False, x[..., ::2]) == 0  # every tensor must qualify
    odd = torch.zeros(5, 3, 2, 4, 3)  # M = 24
    assert align(odd, 8) == 4 and align(odd, 16) == 0
    assert align(torch.zeros(5, 3, 2 * 4 * 3 + 2)[..., :24].view(5, 3, 2, 4, 3), 8) == 0, \
        "a batch stride of 26 floats is not a multiple of 16 bytes"
    assert align(torch.zeros(1, 1, 26)[..., :24].view(1, 1, 2, 4, 3), 8) == 4, \
        "strides of size-1 dims are never used"


def test_launch_config_halves_the_block_to_pack():
    """A block that does not divide C * S1 * S2 runs as a half or a quarter of it, with as many
    fewer warps, where that packs; else the configured block on the strided path."""
    from neurokern.plif_ops import LAUNCH, launch_config, step_strides

    block, warps = LAUNCH[4]["BLOCK"], LAUNCH[4]["num_warps"]

    def config(channels):  # float32 [T, B, C, 1, 1]: M = C
        return launch_config(4, *step_strides(torch.zeros(3, 2, channels, 1, 1), False))

    assert config(3 * block) == (block, warps, 4)
    assert config(3 * block // 2) == (block // 2, warps // 2, 4)
    assert config(block // warps) == (block // warps, 1, 4)
    assert config(block // warps // 2) == (block, warps, 0)  # would need fewer than one warp
    assert config(block + 4) == (block, warps, 0)


TRITON_BACKEND = [p for p in BACKENDS if p.values == ("triton",)]


@pytest.mark.parametrize("backend", TRITON_BACKEND)
@pytest.mark.parametrize("layout", ["time_major", "batch_major", "transposed", "offset"])
def test_packed_path_equals_reference(backend, layout):
    """The PACKED kernels (blocks of 16 contiguous neurons, 2 per channel; more than one batch
    row; a partial last chunk) against the reference; "offset": a view that starts one element
    into its storage (a pointer not 16-byte aligned, strides that are). float64, so exactly;
    the property tests cover the other dtypes (their "packed" cases)."""
    from neurokern.plif_ops import packed_align, step_strides

    case = dict(shape=(11, 3, 2, 4, 8), layout="time_major" if layout == "offset" else layout,
                signed=True, scalar_leak=False, with_state=True, detach_reset=False,
                v_th=1.0, gamma=4.0, seed=3, checkpoint=4, block=16)
    x, alpha, state, cotangents = make_inputs(case)
    device = backend_device(backend)
    x = x.to(device)  # on the device already, so that `run` keeps the offset view as it is
    if layout == "offset":
        x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(x.shape)
        assert x.storage_offset() == 1
    sizes, strides = step_strides(x, layout == "batch_major")
    assert packed_align(16, x.element_size(), sizes, strides) > 0
    out = run(case, backend, f64, x, alpha, state, cotangents, device)
    ref = run(case, "reference", f64, x, alpha, state, cotangents, device)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_output_dtypes(backend, dtype):
    device = backend_device(backend)
    x = torch.randn(3, 2, 4, 5, device=device).to(dtype)
    alpha = torch.full((4,), 0.9, device=device, dtype=f64 if dtype == f64 else torch.float32)
    s, (v, s_last) = nk.plif(x, alpha, return_state=True, backend=backend)
    assert s.dtype == v.dtype == s_last.dtype == dtype
    assert s.shape == x.shape and v.shape == x.shape[1:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_smooth_gradcheck(backend, signed, batch_first):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 3, generator=gen, dtype=f64).to(device).requires_grad_()
    alpha = torch.rand(4, generator=gen, dtype=f64).to(device).requires_grad_()
    state_shape = (5, 4, 3) if batch_first else (3, 4, 3)
    v0 = torch.randn(state_shape, generator=gen, dtype=f64).to(device).requires_grad_()
    s0 = torch.rand(state_shape, generator=gen, dtype=f64).to(device).requires_grad_()

    def fn(x, alpha, v0, s0):
        s, (v, s_last) = nk.plif(x, alpha, v_th=0.8, gamma=3.0, signed=signed,
                                 batch_first=batch_first, state=(v0, s0), return_state=True,
                                 spiking=False, backend=backend)
        return s, v, s_last

    # fast mode checks random projections of the Jacobian: the interpreter is slow.
    assert torch.autograd.gradcheck(fn, (x, alpha, v0, s0), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_detach_reset_gradient(backend):
    """detach_reset drops exactly the reset path: equal to the reference with the option."""
    device = backend_device(backend)
    x = (2 * torch.randn(6, 2, 3, dtype=f64)).to(device).requires_grad_()
    alpha = torch.full((3,), 0.8, dtype=f64, device=device, requires_grad=True)
    grads = []
    for be in ("reference", backend):
        s = nk.plif(x, alpha, detach_reset=True, backend=be)
        grads.append(torch.autograd.grad((s * torch.arange(s.numel(), device=device).view(
            s.shape)).sum(), (x, alpha)))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def _opcheck_samples(device):
    x = torch.randn(4, 2, 3, 5, device=device)
    alpha = torch.full((3,), 0.9, device=device)
    state = torch.randn(2, 3, 5, device=device), torch.rand(2, 3, 5, device=device)
    yield (x, alpha, None, None, 1.0, 10.0, False, False, True, 1)
    yield (x.transpose(0, 1), alpha, *state, 0.5, 4.0, True, True, True, 0)
    yield (x, torch.tensor(0.7, device=device), *state, 1.0, 10.0, True, False, False, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    device = backend_device(backend)
    from neurokern.plif_ops import checkpoint_interval, plif_ops

    fwd, bwd = plif_ops(backend)
    for args in _opcheck_samples(device):
        torch.library.opcheck(fwd, args)
        x, alpha, v0, s0, v_th, gamma, signed, batch_first, spiking, _ = args
        k = checkpoint_interval(backend, x.dtype)
        s, v_saved, v_last, _ = fwd(*args[:9], k)
        grads = (torch.randn_like(s), torch.randn_like(v_last), None)
        torch.library.opcheck(bwd, (*grads, x, v_saved, alpha, v0, s0, v_th, gamma, signed,
                                    batch_first, spiking, False, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    device = backend_device(backend)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), nk.nn.PLIF(3, backend=backend))
    x = torch.randn(4, 2, 3, 5, device=device)
    model.to(device)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert torch.equal(out, eager)
    out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_before_any_kernel(backend, monkeypatch):
    device = backend_device(backend)
    from neurokern import plif_ops

    monkeypatch.setattr(plif_ops.PLIFFunction, "apply", lambda *a: pytest.fail("kernel ran"))
    x = torch.randn(4, 2, 3, device=device)
    with pytest.raises(ValueError, match="alpha"):
        nk.plif(x, torch.rand(4, device=device), backend=backend)
    with pytest.raises(TypeError, match="alpha has dtype"):
        nk.plif(x, torch.rand(3, dtype=f64, device=device), backend=backend)
    with pytest.raises(ValueError, match="alpha is on meta"):
        nk.plif(x, torch.rand(3, device="meta"), backend=backend)


CPU_BACKEND = [p for p in BACKENDS if p.values == ("cpu",)]  # skipped with the reason if absent


@pytest.mark.parametrize("backend", CPU_BACKEND)
@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("spiking", [True, False])
def test_cpu_recomputation_equals_saved_membranes(backend, dtype, spiking):
    """A long sequence (more steps than the backward's buffer holds for a full block of
    neurons): every checkpoint interval, one chunk per sequence included, gives bit for bit the
    results of saving every membrane (k = 1), spikes and all gradients, in both modes."""
    from neurokern.plif_ops import plif_ops

    fwd, bwd = plif_ops(backend)
    gen = torch.Generator().manual_seed(0)
    x = 1.3 * torch.randn(300, 2, 3, 7, 5, generator=gen, dtype=dtype)  # [T, B, C, H, W]
    alpha = torch.rand(3, generator=gen, dtype=dtype)
    v0, s0 = torch.randn(2, 3, 7, 5, generator=gen, dtype=dtype), torch.rand(2, 3, 7, 5,
                                                                            dtype=dtype)
    grads = (torch.randn_like(x), torch.randn_like(v0), torch.randn_like(v0))
    results = {}
    for k in (1, 7, 64, 300, 1 << 30):
        s, v_saved, v_last, s_last = fwd(x, alpha, v0, s0, 1.0, 10.0, True, False, spiking, k)
        assert v_saved.shape == (-(-300 // k), 2 * 3 * 7 * 5)
        results[k] = (s, v_last, s_last, *bwd(*grads, x, v_saved, alpha, v0, s0, 1.0, 10.0,
                                                 True, False, spiking, False, k))
    for k, out in results.items():
        for a, b in zip(out, results[1]):
            assert torch.equal(a, b), f"checkpoint {k} differs from saving every membrane"


@pytest.mark.parametrize("backend", CPU_BACKEND)
def test_cpu_bwd_rejects_v_saved_of_another_checkpoint(backend):
    from neurokern.plif_ops import plif_ops

    fwd, bwd = plif_ops(backend)
    x, alpha = torch.randn(5, 2, 3), torch.rand(3)
    s, v_saved, _, _ = fwd(x, alpha, None, None, 1.0, 10.0, False, False, True, 2)
    assert v_saved.shape == (3, 6)
    with pytest.raises(RuntimeError, match=r"v_saved must have the shape \[ceil\(T / k\), N\] "
                                           r"= \[1, 6\]"):
        bwd(torch.ones_like(s), None, None, x, v_saved, alpha, None, None, 1.0, 10.0, False,
            False, True, False, 1 << 30)
    with pytest.raises(RuntimeError, match="checkpoint must be"):
        bwd(torch.ones_like(s), None, None, x, v_saved, alpha, None, None, 1.0, 10.0, False,
            False, True, False, 0)


@pytest.mark.parametrize("backend", CPU_BACKEND)
@pytest.mark.parametrize("batch_first", [False, True])
def test_cpu_large_outputs_equal_reference(backend, batch_first):
    """Outputs over 4 MiB, which the C++ kernels write with non-temporal stores, with rows of an
    odd number of float64 neurons (so that rows start at alternating 16-byte alignments): spikes
    exact, every gradient close, against the reference."""
    case = dict(shape=(20, 3, 5, 97, 37), layout="batch_major" if batch_first else "time_major",
                signed=True, scalar_leak=False, with_state=True, detach_reset=False, v_th=1.0,
                gamma=4.0, seed=7, checkpoint=None)
    x, alpha, state, cotangents = make_inputs(case)
    assert x.numel() * x.element_size() > 4 << 20
    fused = run(case, backend, f64, x, alpha, state, cotangents, "cpu")
    ref = run(case, "reference", f64, x, alpha, state, cotangents, "cpu")
    assert torch.equal(fused[0], ref[0])
    for a, b in zip(fused[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
