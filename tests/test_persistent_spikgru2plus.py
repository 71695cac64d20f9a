"""The persistent SpikGRU2+ CUDA loops (backend "cuda", csrc/cuda/spikgru2plus_persistent.cuh)
without a GPU: the kernels' own source, compiled for the CPU by tests/cuda_emulation.cpp with
one OS thread per CUDA thread, runs behind backend "cuda" on CPU tensors and is compared with the
reference through the whole Python path (autograd Function, both directions in one launch), on
emulated devices small enough that every layer is split over several blocks and the batch and
k loops take several rounds. Also: the CUDA source compiles for sm_90 with nvcc. On a GPU, the
real kernels run every test of test_fused_spikgru2plus.py (backend "cuda" there)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import neurokern as nk
import neurokern.spikgru2plus_ops as gru_ops
import test_fused_spikgru2plus as fused_tests
import test_layouts
import test_nonfinite
import test_spikgru2plus_lengths as lengths_tests
from neurokern import dispatch
from test_fused_spikgru2plus import (
    EXAMPLES, check_float32, gru_cases, make_inputs, run, run_bidirectional,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
f64 = torch.float64


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    """The extension of tests/cuda_emulation.cpp (built once per test run, about 30 s)."""
    from torch.utils import cpp_extension

    from neurokern._toolchain import shared_libstdcxx_link_args

    build = tmp_path_factory.mktemp("cuda_emulation")
    return cpp_extension.load(
        "neurokern_cuda_emulation", [os.path.join(ROOT, "tests", "cuda_emulation.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O1", "-std=c++20"],  # std::barrier; older torch builds pass c++17
        # torch's shared libstdc++ also where CXX would link a static copy, as setup.py does
        extra_ldflags=shared_libstdcxx_link_args(cpp_extension.get_cxx_compiler()),
        build_directory=str(build))


@pytest.fixture
def emulated_cuda(emulation, monkeypatch):
    """Backend "cuda" runs CPU tensors on the emulated kernels; returns `configure(...)` of the
    emulated device (resident blocks, batch rows and k values per round, shared memory, most
    slices per block)."""
    available = dispatch.availability

    def availability(op, backend, device_type):
        if backend == "cuda" and device_type == "cpu" and op.startswith("spikgru2plus"):
            return dispatch.Availability(True)
        return available(op, backend, device_type)

    ops = gru_ops.spikgru2plus_ops
    monkeypatch.setattr(dispatch, "availability", availability)
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(gru_ops, "spikgru2plus_ops", lambda backend: (
        (emulation.spikgru2plus_fwd, emulation.spikgru2plus_bwd) if backend == "cuda"
        else ops(backend)))
    monkeypatch.setattr(gru_ops, "eager_or_op", lambda op: op)
    monkeypatch.setattr(fused_tests, "backend_device", lambda backend: "cpu")  # even on a GPU
    emulation.configure(4, 8, 8, 256 * 1024)
    return emulation.configure


# emulated devices: (resident blocks (at least one per direction), batch rows per round, k
# values per round at most (the split takes a power of 2), shared memory, slices of a block at
# most: a power of 2)
devices = st.tuples(st.sampled_from([2, 3, 5, 8]), st.sampled_from([8, 16]),
                    st.sampled_from([3, 8, 32]), st.just(256 * 1024),
                    st.sampled_from([1, 2, 4]))
# besides gru_cases' draws (batch <= 4): batches of several rounds, H of one unit per block
WIDE = [dict(EXAMPLES[0], batch=17, seed=6), dict(EXAMPLES[1], batch=6, hidden=3, seed=7)]


def with_examples(test):
    for case in EXAMPLES + WIDE:
        test = example(case=case, device=(3, 8, 8, 256 * 1024, 4))(test)
    return test


@given(case=gru_cases(), device=devices)
@with_examples
def test_float64_equals_reference(emulated_cuda, case, device):
    emulated_cuda(*device)
    leaves, cot = make_inputs(case)
    ref = run(case, "reference", f64, leaves, cot, "cpu")
    out = run(case, "cuda", f64, leaves, cot, "cpu")
    assert torch.equal(out[0][0], ref[0][0]), "spikes differ in float64"
    assert torch.equal(out[0][3], ref[0][3]), "final spikes differ in float64"
    for a, b in zip(out[0][1:], ref[0][1:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for name, a in out[1].items():
        b = ref[1][name]
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{name}")


@given(case=gru_cases(), device=devices)
@with_examples
def test_bidirectional_float64_equals_reference(emulated_cuda, case, device):
    """Both directions in one launch: blocks of direction d serve rows d * B .. (d + 1) B - 1."""
    emulated_cuda(*device)
    leaves, _ = make_inputs(case)
    reverse, _ = make_inputs(dict(case, seed=case["seed"] + 1))
    ref = run_bidirectional(case, "reference", leaves, reverse, "cpu")
    out = run_bidirectional(case, "cuda", leaves, reverse, "cpu")
    assert torch.equal(out[0], ref[0]), "spikes differ in float64"
    assert torch.equal(out[3], ref[3]), "final spikes differ in float64"
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@given(case=gru_cases(), device=devices)
@with_examples
def test_float32_against_float64_reference(emulated_cuda, case, device):
    emulated_cuda(*device)
    leaves, cot = make_inputs(case)
    check_float32(case, leaves, cot, "cuda", "cpu")


@given(case=st.sampled_from([1, 2]).flatmap(
    lambda directions: test_layouts.spikgru2plus_cases(directions=directions)))
def test_layouts_on_the_emulation(emulated_cuda, case):
    """test_layouts.py's random views of every argument and output gradient, one direction or
    two, backend "cuda" emulated."""
    emulated_cuda(3, 8, 8, 256 * 1024)
    test_layouts.check_spikgru2plus_layouts("cuda", case)


@given(case=test_nonfinite.gate_cases())
def test_non_finite_gates_on_the_emulation(emulated_cuda, case):
    """test_nonfinite.py's infinite, NaN and huge gate pre-activations, backend "cuda"
    emulated."""
    emulated_cuda(3, 8, 8, 256 * 1024)
    test_nonfinite.check_non_finite_gates("cuda", case)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("with_state", [False, True])
def test_non_finite_recurrent_weight_on_the_emulation(emulated_cuda, value, with_state):
    """test_nonfinite.py's inf or NaN in U, backend "cuda" emulated."""
    emulated_cuda(3, 8, 8, 256 * 1024)
    test_nonfinite.check_non_finite_recurrent_weight("cuda", value, True, with_state)


@pytest.mark.parametrize("name,args", [
    ("test_streaming_two_chunks_equals_one_pass", (False,)),
    ("test_streaming_two_chunks_equals_one_pass", (True,)),
    ("test_gradient_of_final_state_only", ()),
    ("test_empty_batch", ()),
    ("test_half_input_is_computed_in_float32", (torch.bfloat16,)),
    ("test_autocast_runs_the_products_in_bf16", ()),
    ("test_forward_returns_the_recurrent_products", ()),
    ("test_bidirectional_float32", (5,)),
    ("test_bidirectional_bad_input", ()),
    ("test_smooth_gradcheck_two_layer_bidirectional", (True, True, False)),
    ("test_smooth_gradcheck_two_layer_bidirectional", (False, False, True)),
])
def test_fused_backend_tests_on_the_emulation(emulated_cuda, name, args):
    """test_fused_spikgru2plus.py's tests that draw nothing, with backend "cuda" emulated (the
    smooth-mode gradcheck runs real-valued s through the products)."""
    emulated_cuda(3, 8, 8, 256 * 1024)
    getattr(fused_tests, name)("cuda", *args)


def test_split_products_on_the_emulation(emulated_cuda, monkeypatch):
    """test_fused_spikgru2plus's split-products test with backend "cuda" emulated: x W^T and dW
    of the layers that read spikes split."""
    emulated_cuda(3, 8, 8, 256 * 1024)
    fused_tests.test_split_products_of_a_spike_input("cuda", monkeypatch)


def test_spike_input_alone_changes_nothing_on_the_emulation(emulated_cuda, monkeypatch):
    emulated_cuda(3, 8, 8, 256 * 1024)
    fused_tests.test_spike_input_alone_changes_nothing("cuda", monkeypatch)


# The tensor-core loops (16-bit U, autocast), op by op against the SIMT float32 loops of the
# same emulation, which the tests above prove against the reference.
@st.composite
def mma_cases(draw):
    return dict(
        steps=draw(st.integers(1, 5)),
        # up to 2 row chunks of 16 and batch groups of 1 row
        batch=draw(st.sampled_from([1, 2, 3, 5, 16, 17, 33])),
        # one block of H units; 16 / 32-unit blocks with a partial last one; 3H not a multiple
        # of 8 (padded rows of the staged factor)
        hidden=draw(st.sampled_from([1, 5, 16, 24, 37, 70])),
        directions=draw(st.sampled_from([1, 2])),
        signed=draw(st.booleans()),
        reset_gate=draw(st.booleans()),
        bias=draw(st.booleans()),
        state=draw(st.sampled_from([None, "ternary", "quantized"])),
        weight=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        varlen=draw(st.booleans()),  # rows of lengths in [0, T] (frozen cells after them)
        seed=draw(st.integers(0, 2**16)),
    )


# emulated devices for them: SMs (few: batch groups of several rows; many: of one), k values per
# round (rounded up to 16), shared memory (24 KiB: slices of 16 units for H = 37, where 32 units
# or all 37 do not fit), warps of one thread
mma_devices = st.tuples(st.sampled_from([6, 10, 13, 130]), st.just(8),
                        st.sampled_from([8, 16, 40, 64]),
                        st.sampled_from([24 * 1024, 40 * 1024, 256 * 1024]),
                        st.sampled_from([1, 2, 3]))


def mma_inputs(case):
    """Op inputs whose recurrent sums are exact in float32 in any order: U and the state's spikes
    are small multiples of 2^-7 and 2^-3 (exact in bf16 and fp16), so that the tensor-core loop
    and the SIMT float32 loop must agree bit for bit in the forward."""
    gen = torch.Generator().manual_seed(case["seed"])
    steps, hidden, d = case["steps"], case["hidden"], case["directions"]
    rows = d * case["batch"]

    def quantized(*shape, scale, low=-64):
        return torch.randint(low, -low + 1, shape, generator=gen).float() * scale

    gi = torch.randn(steps, rows, 3 * hidden, generator=gen) * 1.5
    weight = quantized(d, 3 * hidden, hidden, scale=2.0 ** -7)
    bias = torch.randn(d, 3 * hidden, generator=gen) if case["bias"] else None
    alpha = torch.rand(d, hidden, generator=gen)
    state = case["state"]
    v0, i0 = (torch.randn(rows, hidden, generator=gen) if state else None for _ in range(2))
    s0 = None if state is None else (
        quantized(rows, hidden, scale=1.0, low=-1) if state == "ternary"
        else quantized(rows, hidden, scale=2.0 ** -3, low=-8))
    lengths = (torch.randint(0, steps + 1, (rows,), generator=gen) if case.get("varlen")
               else None)
    return gi, weight, bias, alpha, v0, i0, s0, lengths


def check_tensor_core_loops(case, fwd16, fwd32, bwd16, bwd32, device="cpu"):
    """Forward: spikes, states and the (W-rounded) recurrent sums of the tensor-core loop equal
    the float32 loop's bit for bit (exact sums). Backward, from the same saved forward: every
    gradient within the bf16 rounding of the staged gate gradients dgh of the float32 loop's
    (which keeps dgh in float32), far below what a wrong unit, gate, row or step would give."""
    gi, weight, bias, alpha, v0, i0, s0, lengths = (None if t is None else t.to(device)
                                                    for t in mma_inputs(case))
    w16 = weight.to(case["weight"])
    assert torch.equal(w16.float(), weight)
    flags = (1.0, 4.0, case["signed"], case["reset_gate"])
    out16 = fwd16(gi, w16, bias, alpha, v0, i0, s0, *flags, True, lengths)
    out32 = fwd32(gi, weight, bias, alpha, v0, i0, s0, *flags, True, lengths)
    for name, a, b in zip(("s", "v", "i"), out16[:3], out32[:3]):
        assert torch.equal(a, b), f"{name} differs from the float32 loop's"
    assert out16[3].dtype == case["weight"]
    assert torch.equal(out16[3], out32[3].to(case["weight"])), "gh_seq"

    gen = torch.Generator().manual_seed(case["seed"] + 1)
    rows, hidden = gi.shape[1], gi.shape[2] // 3
    grad_s = torch.randn(gi.shape[0], rows, hidden, generator=gen).to(device)
    lasts = [torch.randn(rows, hidden, generator=gen).to(device) for _ in range(3)]
    saved = (*out16[:3],)
    grads16 = bwd16(grad_s, *lasts, gi, w16, bias, alpha, *saved, out16[3], v0, i0, s0, *flags,
                    lengths)
    grads32 = bwd32(grad_s, *lasts, gi, weight, bias, alpha, *saved, out16[3].float(), v0, i0,
                    s0, *flags, lengths)
    names = ("dgi", "dweight_hh", "dbias_hh", "dalpha", "dv0", "di0", "ds0")
    for name, a, b in zip(names, grads16, grads32):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 2.0 ** -6 * (1 + scale), name


@given(case=mma_cases(), device=mma_devices)
@example(case=dict(steps=3, batch=33, hidden=70, directions=2, signed=True, reset_gate=True,
                   bias=True, state="quantized", weight=torch.bfloat16, varlen=True, seed=1),
         device=(6, 8, 16, 40 * 1024, 3))
@example(case=dict(steps=4, batch=5, hidden=37, directions=1, signed=False, reset_gate=False,
                   bias=False, state="ternary", weight=torch.float16, seed=2),
         device=(130, 8, 40, 24 * 1024, 2))
def test_tensor_core_loops_equal_the_float32_loops(emulation, case, device):
    """check_tensor_core_loops on the emulation: the tensor-core loops on the drawn device, the
    float32 loops on one of their own (power-of-2 slices)."""
    def on(device, op):
        def run(*args):
            emulation.configure(*device)
            return op(*args)
        return run

    simt = (8, 8, 8, 256 * 1024, 4)
    emulation.configure(*device)
    rows = case["directions"] * case["batch"]
    try:
        for forward in (True, False):
            emulation.mma_plan(case["steps"], rows, case["hidden"], case["directions"], forward)
    except RuntimeError as error:  # e.g. H = 70, D = 2 in 24 KiB: checked to say so, then skipped
        assert "fits the tensor-core persistent kernel on this device" in str(error)
        assume(False)
    check_tensor_core_loops(case, on(device, emulation.spikgru2plus_fwd),
                            on(simt, emulation.spikgru2plus_fwd),
                            on(device, emulation.spikgru2plus_bwd),
                            on(simt, emulation.spikgru2plus_bwd))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", [
    # the paper's layer: 16 units per block, 2 batch groups, the backward's 6-round ring
    dict(steps=4, batch=32, hidden=1024, directions=1, signed=True, reset_gate=True, bias=True,
         state="ternary", weight=torch.bfloat16, seed=3),
    dict(steps=5, batch=33, hidden=70, directions=2, signed=False, reset_gate=True, bias=True,
         state="quantized", weight=torch.bfloat16, varlen=True, seed=4),
    dict(steps=3, batch=5, hidden=37, directions=1, signed=True, reset_gate=False, bias=False,
         state=None, weight=torch.float16, seed=5),
])
def test_tensor_core_loops_on_the_gpu(case):
    """check_tensor_core_loops with the real kernels (WMMA, cp.async) of backend "cuda"."""
    if not dispatch.availability("spikgru2plus", "cuda", "cuda").available:
        pytest.skip("the extension was built without its CUDA kernels")
    fwd, bwd = gru_ops.spikgru2plus_ops("cuda")
    check_tensor_core_loops(case, fwd, fwd, bwd, bwd, "cuda")


def test_tensor_core_split_of_the_paper_layer(emulation):
    """On an H100-like device (132 SMs, 227 KiB of shared memory per block, 8 warps, rounds of
    512 values of k): B = 32, H = 1024 runs 16 units per block (32 would leave no room for the
    backward's ring), 2 batch groups, 128 blocks, and a ring of staging buffers that holds a
    step's whole factor (2 rounds forward, 6 backward); two directions: one group each. Plan
    = [units, staging buffers, batch groups, rows per group, blocks, shared bytes]."""
    emulation.configure(132, 8, 512, 232448, 8)
    plan = emulation.mma_plan
    assert plan(90, 32, 1024, 1, True) == [16, 2, 2, 16, 128, 156160]
    assert plan(90, 32, 1024, 1, False) == [16, 6, 2, 16, 128, 206336]
    assert plan(90, 64, 1024, 2, True) == [16, 2, 1, 32, 128, 156160]
    assert plan(90, 64, 1024, 2, False) == [16, 6, 1, 32, 128, 206336]
    assert plan(90, 8, 40, 1, True)[:3] == [40, 1, 8]  # one block of all 40 units, 8 groups
    emulation.configure(132, 8, 512, 150 * 1024, 8)  # the backward's ring: 2 of its 6 rounds
    assert plan(90, 32, 1024, 1, False)[:2] == [16, 2]
    emulation.configure(132, 8, 512, 48 * 1024, 8)  # the warps' sums of 40 or 32 units: too
    assert plan(90, 8, 40, 1, True)[:3] == [16, 1, 8]  # large


def test_tensor_core_loop_needs_a_recent_device(emulation):
    gi, weight, bias, alpha, *_ = mma_inputs(dict(
        steps=2, batch=2, hidden=5, directions=1, bias=False, state=None, seed=0))
    emulation.configure(4, 8, 8, 4096, 2)
    with pytest.raises(RuntimeError, match=r"no split of H = 40 over D = 1 directions fits the "
                                           r"tensor-core persistent kernel"):
        emulation.spikgru2plus_fwd(torch.randn(2, 2, 120), torch.randn(1, 120, 40).bfloat16(),
                                   None, torch.rand(1, 40), None, None, None, 1.0, 4.0, True,
                                   True, True, None)


def test_layer_too_large_for_shared_memory_raises(emulated_cuda):
    # H = 40 over at most 4 blocks: 10 units per block, 40 * 30 * 4 bytes of U > 4 KiB
    emulated_cuda(4, 8, 8, 4096)
    x, w_ih, w_hh = torch.randn(3, 2, 4), torch.randn(120, 4), torch.randn(120, 40)
    with pytest.raises(RuntimeError, match=r"needs \d+ bytes of shared memory per block for "
                                           r"H = 40, D = 1 .* but a block may use 4096"):
        nk.spikgru2plus(x, w_ih, w_hh, None, None, torch.rand(40), backend="cuda")


def test_more_blocks_than_the_device_holds_raises(emulated_cuda):
    """Two directions need at least two resident blocks (the grid synchronises every step)."""
    emulated_cuda(1, 8, 8, 256 * 1024)
    x = torch.randn(3, 2, 4)
    params = [(torch.randn(15, 4), torch.randn(15, 5), None, None, torch.rand(5))
              for _ in range(2)]
    with pytest.raises(RuntimeError, match="no split of H = 5 over D = 2 directions keeps "
                                           "every block of the persistent kernel resident"):
        nk.spikgru2plus_bidirectional(x, *params, backend="cuda")


def test_op_checks_its_arguments(emulation):
    gi, w = torch.randn(3, 4, 15), torch.randn(15, 5)
    fwd = emulation.spikgru2plus_fwd
    with pytest.raises(RuntimeError, match=r"alpha must be \[1, 5\]"):
        fwd(gi, w, None, torch.rand(4), None, None, None, 1.0, 10.0, True, True, True, None)
    with pytest.raises(RuntimeError, match="weight_hh is Double but gi is Float"):
        fwd(gi, w.double(), None, torch.rand(5), None, None, None, 1.0, 10.0, True, True, True,
            None)
    with pytest.raises(RuntimeError, match=r"the 4 rows of gi are not 3 directions"):
        fwd(gi, torch.randn(3, 15, 5), None, torch.rand(3, 5), None, None, None, 1.0, 10.0,
            True, True, True, None)
    with pytest.raises(RuntimeError, match=r"s0 must be \[4, 5\]"):
        fwd(gi, w, None, torch.rand(5), None, None, torch.zeros(2, 5), 1.0, 10.0, True, True,
            True, None)
    with pytest.raises(RuntimeError, match=r"lengths must be \[D \* B\] = \[4\]"):
        fwd(gi, w, None, torch.rand(5), None, None, None, 1.0, 10.0, True, True, True,
            torch.ones(3, dtype=torch.int64))


def _nvcc_command(tmp_path):
    """nvcc compiling csrc/cuda/spikgru2plus_cuda.cu for sm_90 with torch's headers, as the
    extension build does (a CPU-only torch lacks one generated header of c10/cuda: an empty one
    stands in, as in a CUDA build it only defines export macros)."""
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    stub = tmp_path / "stub"
    if not any(os.path.exists(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h"))
               for d in includes):
        (stub / "c10/cuda/impl").mkdir(parents=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n")
    return ([shutil.which("nvcc"), "-c", "-std=c++20", "-arch=sm_90", "--expt-relaxed-constexpr",
             "-Xptxas", "-v", "-DNEUROKERN_WITH_CUDA=1", "-Xcompiler", "-fPIC",
             f"-I{stub}", f"-I{os.path.join(ROOT, 'csrc')}"]
            + [f"-I{d}" for d in includes]
            + [os.path.join(ROOT, "csrc/cuda/spikgru2plus_cuda.cu"), "-o",
               str(tmp_path / "spikgru2plus_cuda.o")])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux build flags")
def test_cuda_source_compiles_for_sm90_without_spills(tmp_path):
    """The CUDA kernels compile for the H100 (48 kernels: the SIMT loops in float64 and float32,
    the tensor-core loops with bf16 or fp16 weights; signed, reset gate, smooth mode) within 384
    threads' registers, and no float32 kernel spills (the float64 ones, not the fast path, at
    most 48 bytes); the tensor-core kernels' PTX has their products (`wmma.mma.sync`) and
    asynchronous copies (`cp.async`)."""
    keep = tmp_path / "keep"
    keep.mkdir()
    proc = subprocess.run(_nvcc_command(tmp_path) + ["-keep", "-keep-dir", str(keep)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    entries = {e.split("(")[0].strip(): e for e in
               (keep / "spikgru2plus_cuda.ptx").read_text().split(".entry ")[1:]}
    mma = [body for name, body in entries.items() if "_mma_" in name]
    assert len(mma) == 24 and len(entries) == 48, list(entries)
    for body in mma:
        assert "wmma.mma.sync" in body and "cp.async.cg.shared.global" in body
    kernels = proc.stderr.split("Compiling entry function")[1:]
    assert len(kernels) == 48, proc.stderr[-4000:]
    for report in kernels:
        name = re.match(r" '(\w+)'", report).group(1)
        stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                           report).groups())
        allowed = 48 if "_kernelIdd" in name else 0  # template arguments <double, double, ..>
        assert stores <= allowed and loads <= allowed, report


@settings(max_examples=8)
@given(case=lengths_tests.packed_cases(), device=devices)
@example(case=lengths_tests.EXAMPLES[0], device=(3, 8, 8, 256 * 1024, 4))
@example(case=lengths_tests.EXAMPLES[1], device=(5, 16, 3, 256 * 1024, 2))
def test_packed_batch_equals_each_sequence_alone_on_the_emulation(emulated_cuda, monkeypatch,
                                                                  case, device):
    """test_spikgru2plus_lengths.py's property with backend "cuda" emulated: variable lengths in
    the persistent loops' cells, stacked, bidirectional, packed sorted or not."""
    emulated_cuda(*device)
    lengths_tests.check_packed_equals_alone(case, "cuda", "cpu")


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_functional_lengths_on_the_emulation(emulated_cuda, monkeypatch, bidirectional,
                                             batch_first):
    emulated_cuda(3, 8, 8, 256 * 1024)
    monkeypatch.setattr(lengths_tests, "backend_device", lambda backend: "cpu")
    lengths_tests.test_functional_lengths_zero_outputs_and_match_reference(
        "cuda", bidirectional, batch_first)
