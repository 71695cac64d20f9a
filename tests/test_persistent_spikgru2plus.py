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
from hypothesis import example, given
from hypothesis import strategies as st

import neurokern as nk
import neurokern.spikgru2plus_ops as gru_ops
import test_fused_spikgru2plus as fused_tests
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


@pytest.mark.parametrize("name,args", [
    ("test_streaming_two_chunks_equals_one_pass", (False,)),
    ("test_streaming_two_chunks_equals_one_pass", (True,)),
    ("test_gradient_of_final_state_only", ()),
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
        fwd(gi, w, None, torch.rand(4), None, None, None, 1.0, 10.0, True, True, True)
    with pytest.raises(RuntimeError, match="weight_hh is Double but gi is Float"):
        fwd(gi, w.double(), None, torch.rand(5), None, None, None, 1.0, 10.0, True, True, True)
    with pytest.raises(RuntimeError, match=r"the 4 rows of gi are not 3 directions"):
        fwd(gi, torch.randn(3, 15, 5), None, torch.rand(3, 5), None, None, None, 1.0, 10.0,
            True, True, True)
    with pytest.raises(RuntimeError, match=r"s0 must be \[4, 5\]"):
        fwd(gi, w, None, torch.rand(5), None, None, torch.zeros(2, 5), 1.0, 10.0, True, True,
            True)


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
    """The CUDA kernels compile for the H100 (48 kernels: float64, float32 with float32, bf16
    or fp16 weights; signed, reset gate, smooth mode) within 384 threads' registers, and no
    float32 kernel spills (the float64 ones, not the fast path, at most 48 bytes)."""
    proc = subprocess.run(_nvcc_command(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = proc.stderr.split("Compiling entry function")[1:]
    assert len(kernels) == 48, proc.stderr[-4000:]
    for report in kernels:
        name = re.match(r" '(\w+)'", report).group(1)
        stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                           report).groups())
        allowed = 48 if "_kernelIdd" in name else 0  # template arguments <double, double, ..>
        assert stores <= allowed and loads <= allowed, report
