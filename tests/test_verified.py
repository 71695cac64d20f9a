"""The record of verified GPU variants (neurokern/verified.py) and the choice `auto` makes from
it, on the CPU: a table and a GPU architecture are injected, the backends' availability on
"cuda" faked; the writer reads the JUnit XML of a real pytest run."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import neurokern as nk
from conftest import backend_device
from neurokern import __main__ as nk_main
from neurokern import dispatch, plif_ops, reference, spike_ops, verified
from neurokern.triton_kernels import triton_error

CUDA = torch.device("cuda")  # never allocated on: only the dispatcher's and pick's argument
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entry(time, commit="abc1234", source="tests", **extra):
    return dict(gpu="NVIDIA H100 80GB HBM3", capability="9.0", torch="2.13.0", triton="3.7.0",
                commit=commit, time=time, source=source, passes=3, **extra)


def failure(time):
    return entry(time, failures=1, first="tests/test_x.py::test_y", message="AssertionError")


def table(records):
    """`{"variants": {key: {arch: {"passed"/"failed": entry}}}}` from `{key: [(arch, result,
    time)]}`."""
    variants = {}
    for k, results in records.items():
        for architecture, result, time in results:
            made = entry(time) if result == "passed" else failure(time)
            variants.setdefault(k, {}).setdefault(str(architecture), {})[result] = made
    return {"variants": variants}


@pytest.fixture
def gpu(monkeypatch):
    """A fake GPU: the fused backends available on "cuda", `arch` returns what the test sets,
    no cached choices; returns `use(table, architecture)`."""
    available = dispatch.availability

    def availability(op, backend, device_type):
        if device_type == "cuda" and backend in ("triton", "cuda"):
            return dispatch.Availability((op, backend) in dispatch._IMPLEMENTATIONS, "none")
        return available(op, backend, device_type)

    monkeypatch.setattr(dispatch, "availability", availability)
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(dispatch, "_logged_choices", set())
    monkeypatch.setattr(verified, "_picked", {})
    monkeypatch.delenv(verified.ENV_OPT_IN, raising=False)
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)

    def use(record, architecture):
        monkeypatch.setattr(verified, "TABLE", record)
        monkeypatch.setattr(verified, "arch", lambda device: architecture)
        dispatch._resolved.clear()
        verified._picked.clear()

    return use


@contextlib.contextmanager
def cuda_autocast(dtype):
    """CUDA autocast's state, which `torch.autocast("cuda")` leaves off without a GPU."""
    previous = torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", False)
        torch.set_autocast_dtype("cuda", previous)


def auto(op, dtype=torch.float32):
    return dispatch.resolve(op, "auto", CUDA, dtype)[0]


def test_auto_on_a_gpu_follows_the_record(gpu):
    """PLIF: triton where its strided variant passed for the dtype, else the reference;
    SpikGRU2+: the first backend whose loops passed (triton before cuda), by product dtype."""
    gpu(table({"triton.plif.strided/float32": [(9, "passed", "2026-11-23")],
               "cuda.spikgru2plus.simt/float32": [(9, "passed", "2026-11-23")],
               "triton.spikgru2plus.loops/bfloat16": [(9, "passed", "2026-11-23")]}), 9)
    assert auto("plif") == "triton"
    assert auto("plif", torch.bfloat16) == "reference"  # not recorded: opt-in
    assert auto("spikgru2plus") == "cuda"  # the Triton loops' fp32 variant is not recorded
    assert auto("spikgru2plus", torch.bfloat16) == "cuda"  # no autocast: fp32 products
    with cuda_autocast(torch.bfloat16):
        assert auto("spikgru2plus") == "triton"
    assert auto("spike") == "reference"
    gpu({"variants": {}}, 9)  # the table empty: every GPU variant opt-in
    assert {auto(op) for op in dispatch.OPS} == {"reference"}


def test_auto_logs_the_variant_and_why_others_were_skipped(gpu, caplog):
    gpu(table({"cuda.spikgru2plus.simt/float32": [(9, "passed", "2026-11-23")]}), 9)
    with caplog.at_level("INFO", logger="neurokern"):
        assert auto("spikgru2plus") == "cuda"
    (message,) = [r.getMessage() for r in caplog.records]
    assert "cuda.spikgru2plus.simt/float32 verified on sm 9" in message
    assert "triton.spikgru2plus.loops/float32 opt-in" in message


def test_the_choice_is_the_same_under_torch_compile(gpu, monkeypatch):
    """torch.compile(fullgraph=True) traces the choice (a module on `auto` resolves its backend
    inside the graph): it gives eager's answers, for backends and for the launchers' variants."""
    gpu(table({"triton.spikgru2plus.loops/float32": [(9, "passed", "2026-11-23")],
               "cuda.spikgru2plus.simt/float32": [(9, "passed", "2026-11-23")],
               "triton.plif.strided/float32": [(9, "passed", "2026-11-22"),
                                               (9, "failed", "2026-11-23")]}), 9)
    monkeypatch.setenv(verified.ENV_OPT_IN, "triton.spike.vector")

    def choices(x):
        codes = {"triton": 1, "cuda": 2, "reference": 3, "triton.spike.vector": 4,
                 "triton.spike.scalar": 5}
        return x + torch.tensor([codes[auto("spikgru2plus")], codes[auto("plif")],
                                 codes[verified.pick(spike_ops.VARIANTS, torch.float32, CUDA)]])

    torch._dynamo.reset()
    compiled = torch.compile(choices, fullgraph=True, backend="eager")
    expected = torch.tensor([1.0, 1.0, 4.0])  # plif: strided failed since, the only one
    torch.testing.assert_close(compiled(torch.zeros(3)), expected)
    dispatch._resolved.clear()
    verified._picked.clear()
    torch.testing.assert_close(choices(torch.zeros(3)), expected)
    torch._dynamo.reset()


def test_the_choice_rules(gpu, monkeypatch):
    """Fastest first among those passed on this architecture; else the fastest passed on
    another; else the one that passed longest ago (failed since); else none. Opting in counts
    as passed; a variant below its oldest architecture never runs."""
    fast, slow = "triton.plif.packed/float32", "triton.plif.strided/float32"
    record = table({"triton.plif.packed/float32": [(8, "passed", "2026-11-20")],
                    "triton.plif.strided/float32": [(9, "passed", "2026-11-21")]})
    assert verified.choose([fast, slow], 9, record) == slow  # passed here beats elsewhere
    assert verified.choose([fast, slow], 8, record) == fast
    assert verified.choose([fast, slow], 7, record) == fast  # fastest of those passed anywhere
    record = table({"triton.plif.packed/float32": [(9, "passed", "2026-11-20"),
                                                 (9, "failed", "2026-11-22")],
                    "triton.plif.strided/float32": [(9, "passed", "2026-11-18"),
                                                    (9, "failed", "2026-11-22")]})
    assert verified.choose([fast, slow], 9, record) == slow  # longest ago
    record["variants"][slow]["9"]["passed"]["time"] = "2026-11-23"  # passed after its failure
    assert verified.choose([fast, slow], 9, record) == slow
    assert verified.choose([fast], 9, record) == fast  # failed since, the only one
    assert verified.choose([fast, slow], 9, {"variants": {}}) is None
    monkeypatch.setenv(verified.ENV_OPT_IN, "triton.plif.packed")
    assert verified.choose([fast, slow], 9, {"variants": {}}) == fast
    monkeypatch.setenv(verified.ENV_OPT_IN, "all")
    tensor_cores = "cuda.spikgru2plus.tensor_cores/bfloat16"
    assert verified.choose([tensor_cores], 7, {"variants": {}}) is None
    assert verified.choose([tensor_cores], 8, {"variants": {}}) == tensor_cores


RESULTS = st.sampled_from(["passed", "failed"])
RECORDS = st.dictionaries(
    st.sampled_from(verified.all_keys()),
    st.dictionaries(st.sampled_from(["7", "8", "9"]), st.dictionaries(
        RESULTS, st.sampled_from(["2026-11-20", "2026-11-21", "2026-11-22"])), max_size=2),
    max_size=8)


@given(record=RECORDS, keys=st.lists(st.sampled_from(verified.all_keys()), min_size=1,
                                     max_size=4, unique=True),
       architecture=st.sampled_from([7, 8, 9]))
def test_an_unrecorded_variant_is_never_chosen(monkeypatch, record, keys, architecture):
    """Whatever the record: the choice has passed somewhere (on this architecture where any
    candidate has), and a key with no pass anywhere is never chosen."""
    record = {"variants": {k: {a: {r: (entry(t) if r == "passed" else failure(t))
                                   for r, t in results.items()}
                               for a, results in runs.items()}
                           for k, runs in record.items()}}
    monkeypatch.delenv(verified.ENV_OPT_IN, raising=False)
    chosen = verified.choose(keys, architecture, record)
    ever = [k for k in keys if any("passed" in r for r in record["variants"].get(k, {}).values())
            and verified.VARIANTS[k.split("/")[0]].min_arch <= architecture]
    assert (chosen is None) == (not ever)
    if chosen is not None:
        assert chosen in ever
        here = [k for k in ever if verified.passed(k, architecture, record)]
        assert chosen == (here or [chosen])[0]


@pytest.mark.skipif(triton_error is not None, reason=f"triton not importable: {triton_error}")
def test_launchers_run_the_baseline_until_the_optional_variant_passed(gpu, monkeypatch):
    """On a GPU `pick` gives the PACKED PLIF and the vector spike kernels only where recorded
    (else the strided path and the scalar kernels); the launchers follow its answer, and the
    forced baseline (on the GPU, or on the CPU under the interpreter) equals the reference."""
    gpu(table({"triton.plif.strided/float32": [(9, "passed", "2026-11-23")],
               "triton.spike.vector/float32": [(9, "passed", "2026-11-23")]}), 9)
    assert verified.pick(plif_ops.VARIANTS, torch.float32, CUDA) == "triton.plif.strided"
    assert verified.pick(plif_ops.VARIANTS, torch.bfloat16, CUDA) == "triton.plif.strided"
    assert verified.pick(spike_ops.VARIANTS, torch.float32, CUDA) == "triton.spike.vector"
    assert verified.pick(spike_ops.VARIANTS, torch.bfloat16, CUDA) == "triton.spike.scalar"
    monkeypatch.setenv(verified.ENV_OPT_IN, "triton.plif.packed/bfloat16")
    assert verified.pick(plif_ops.VARIANTS, torch.bfloat16, CUDA) == "triton.plif.packed"

    x = torch.randn(5, 2, 16, 4, 4)  # [T, B, C, H, W]: C*H*W = 256, a packed layout
    layout = plif_ops.step_strides(x, False)
    assert plif_ops._launch(x, layout[0], layout[1])[2] > 0  # CPU tensors: the first variant
    picked = {}
    monkeypatch.setattr(verified, "pick", lambda names, dtype, device: picked.get(names[0],
                                                                                   names[-1]))
    assert plif_ops._launch(x, layout[0], layout[1])[2] == 0
    assert spike_ops._kernels(x)[0] is spike_ops.spike_fwd_scalar_kernel
    x = x.to(backend_device("triton"))
    alpha = torch.full((16,), 0.7, device=x.device, requires_grad=True)
    for variant in (None, "triton.plif.packed"):
        picked["triton.plif.packed"] = variant or "triton.plif.strided"
        xs = x.clone().requires_grad_()
        s = nk.plif(xs, alpha, backend="triton")
        s.sum().backward()
        xr = x.clone().requires_grad_()
        s_ref = reference.plif(xr, alpha)
        s_ref.sum().backward()
        torch.testing.assert_close(s, s_ref)
        torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(nk.spike(x, backend="triton"), reference.spike(x))


def test_opt_in_names_only_variants(monkeypatch):
    monkeypatch.setenv(verified.ENV_OPT_IN, "triton.plif.packd")
    monkeypatch.setattr(dispatch, "_resolved", {})
    with pytest.raises(ValueError, match="NEUROKERN_OPT_IN.*triton.plif.packd"):
        nk.spike(torch.randn(3))


def test_python_m_neurokern_lists_the_variants(gpu):
    gpu(table({"triton.plif.strided/float32": [(9, "passed", "2026-11-23")],
               "triton.plif.packed/float32": [(9, "failed", "2026-11-23")],
               "triton.spikgru2plus.split_products/float32": [(9, "passed", "2026-11-23")]}), 7)
    rows = {k: (word, reason) for k, word, reason in nk_main.variant_status(architecture=7)}
    assert rows["triton.plif.strided/float32"][0] == "verified"
    assert "not on this GPU's sm 7" in rows["triton.plif.strided/float32"][1]
    assert rows["triton.plif.packed/float32"] == (
        "opt-in", "failed on sm 9: " + verified._describe(failure("2026-11-23")))
    assert rows["triton.plif.packed/bfloat16"] == ("opt-in", "has not passed the GPU tests yet")
    assert rows["cuda.spikgru2plus.tensor_cores/bfloat16"][0] == "unavailable"
    assert rows["triton.spikgru2plus.split_products/float32"][0] == "opt-in"


CONFTEST = os.path.join(ROOT, "tests", "conftest.py")
RUN = '''
import pytest
import torch
from neurokern import verified

def note(name, dtype=torch.float32, device="cuda"):
    verified.note(name, dtype, torch.device(device))

def test_packed_passes():
    note("triton.plif.packed")

@pytest.mark.parametrize("dtype", [torch.float32])
def test_packed_and_strided_fail(dtype):
    note("triton.plif.packed", dtype)
    note("triton.plif.strided", dtype)
    assert 1 == 2, "membranes differ"

def test_cpu_launches_are_not_recorded():
    note("triton.plif.strided", torch.bfloat16, "cpu")

def test_skipped():
    note("triton.spike.vector")
    pytest.skip("no reason")
'''


@pytest.fixture(scope="module")
def junit(tmp_path_factory):
    """The JUnit XML of a real pytest run of RUN with this suite's conftest (its fixture
    records the variants each test noted)."""
    folder = tmp_path_factory.mktemp("gpu_run")
    shutil.copy(CONFTEST, folder / "conftest.py")
    (folder / "test_run.py").write_text(RUN)
    path = folder / "tests.xml"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(folder), "-q",
                           "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                           f"--junitxml={path}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "1 failed, 2 passed, 1 skipped" in proc.stdout, proc.stdout
    return path


def test_the_writer_reads_a_real_pytest_run(junit, tmp_path, monkeypatch):
    outcomes = verified.junit_outcomes(str(junit))
    packed, strided = "triton.plif.packed/float32", "triton.plif.strided/float32"
    assert set(outcomes) == {packed, strided}
    assert outcomes[packed].passed == 1 and len(outcomes[packed].failed) == 1
    (test, message), = outcomes[strided].failed
    assert test.endswith("test_packed_and_strided_fail[dtype0]") and "membranes differ" in message
    lines = verified.summary(outcomes)
    assert f"FAILED   {packed}: 1 of 2 tests, first {test}: {message}" in lines
    assert "not run  triton.spike.vector/float32" in lines

    # `python -m neurokern record` on that file, on a faked H200
    path = tmp_path / "verified.json"
    path.write_text(json.dumps(table({packed: [(9, "passed", "2026-11-01")]})))
    run = verified.Run("NVIDIA H200", "9.0", "2.13.0", "3.7.0", "abc1234",
                       "2026-12-02T10:00:00+00:00", "tests")
    monkeypatch.setattr(verified.Run, "here", classmethod(lambda cls, commit: run))
    assert verified.main(["record", str(junit), "--commit", "abc1234", "--table", str(path)]) == 1
    written = json.loads(path.read_text())["variants"]
    assert written[packed]["9"]["failed"] == dict(
        run.__dict__, passes=1, failures=1, first=test, message=message)
    assert written[packed]["9"]["passed"]["time"] == "2026-11-01"  # the older pass stays
    assert not verified.passed(packed, 9, {"variants": written})  # the failure is newer
    assert verified.choose([packed, strided], 9, {"variants": written}) == packed  # rule 3

    later = verified.Run(**{**run.__dict__, "time": "2026-12-03T10:00:00+00:00"})
    fixed = verified.update({"variants": written}, later, {packed: verified.Outcome(passed=2)})
    assert verified.passed(packed, 9, fixed)


def test_the_writer_refuses_what_is_no_record(tmp_path):
    bad = tmp_path / "tests.xml"
    bad.write_text("<testsuites><testsuite><testcase classname='t' name='x'><properties>"
                   f"<property name='{verified.PROPERTY}' value='triton.plif.bent/float32'/>"
                   "</properties></testcase></testsuite></testsuites>")
    with pytest.raises(ValueError, match="triton.plif.bent"):
        verified.junit_outcomes(str(bad))
    bad.write_text("not xml")
    with pytest.raises(ValueError, match="tests.xml"):
        verified.junit_outcomes(str(bad))


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(
    os.path.join(ROOT, ".git")), reason="needs the git history of benchmarks/results")
def test_the_shipped_record_is_what_the_writer_wrote():
    """Every entry of neurokern/verified.json from benchmark rows is what `import-benchmarks`
    writes from benchmarks/results/*.csv now (no entry by hand), and those rows name only
    baseline variants and the split products."""
    results = os.path.join(ROOT, "benchmarks", "results")
    paths = sorted(os.path.join(results, f) for f in os.listdir(results) if f.endswith(".csv"))
    rebuilt = {"variants": {}}
    for run, outcomes in verified.benchmark_runs(paths, "NVIDIA H100 80GB HBM3", "9.0"):
        rebuilt = verified.update(rebuilt, run, outcomes)
    shipped = [(k, a, r, e) for k, runs in verified.TABLE["variants"].items()
               for a, results_ in runs.items() for r, e in results_.items()
               if e["source"] != "tests"]
    assert shipped
    for k, a, r, e in shipped:
        assert rebuilt["variants"][k][a][r] == e, k
        variant = verified.VARIANTS[k.split("/")[0]]
        assert variant.baseline or variant.switch, k
