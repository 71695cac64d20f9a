"""neurokern._C compiled on first use (issue 20 item 3, neurokern/_jit.py): the cache key, the
cross-process lock, the atomic build, and what the fused backends say when it cannot build.

Two kinds of tests:

- Fast ones (seconds): the JIT machinery in real parallel processes with a stand-in extension
  (one C++ file without torch headers, compiled in about a second by the same code path), and
  neurokern's own package without its binary where no compile happens (JIT off, no compiler,
  no ninja).
- `install` tests (minutes: one real compile of neurokern._C, about 4 CPU-minutes, shared by
  all of them through one session fixture): a real isolated `pip install` of the sdist into a
  fresh venv, then the first fused call. They run only with NEUROKERN_TEST_INSTALL=1; CI runs
  them in `bash run.sh sdist` (run.sh), not in `bash run.sh test`.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import neurokern
from conftest import OTHER_TORCH
from neurokern import _jit, _toolchain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SOURCE = """
#include <Python.h>
static struct PyModuleDef tiny_def = {PyModuleDef_HEAD_INIT, "_tiny", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__tiny(void) { return PyModule_Create(&tiny_def); }
"""

# Loads (compiling if needed) the stand-in extension; with BARRIER set, first waits until
# BARRIER_COUNT processes are ready, so that they call the JIT together.
TINY_SCRIPT = textwrap.dedent("""
    import json, logging, os, sys, time
    logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
    import torch
    from neurokern import _jit, _toolchain
    source = sys.argv[1]
    spec = _jit.Spec(module="_tiny", sources=(source,), hashed=(source,))
    barrier = os.environ.get("BARRIER")
    if barrier:
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        while len(os.listdir(barrier)) < int(os.environ["BARRIER_COUNT"]):
            time.sleep(0.005)
    module, record, problem = _jit.load(spec, _toolchain.torch_identity(torch), build=True)
    print(json.dumps({"file": getattr(module, "__file__", None), "problem": problem}))
""")


def _env(cache, **extra):
    env = dict(os.environ, NEUROKERN_CACHE_DIR=str(cache), PYTHONPATH=ROOT)
    env.update(extra)
    return env


@pytest.fixture()
def tiny(tmp_path):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    return source, tmp_path / "cache"


def _start_tiny(source, cache, **extra):
    return subprocess.Popen([sys.executable, "-c", TINY_SCRIPT, str(source)], cwd=ROOT,
                            env=_env(cache, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def _run_tiny(source, cache):
    return _finish(_start_tiny(source, cache))


def _entries(cache):
    return sorted(p for p in glob.glob(os.path.join(cache, "jit", "_tiny-*"))
                  if os.path.isdir(p))


def test_parallel_processes_compile_once_and_all_load(tiny, tmp_path):
    """Three processes ask for the same missing extension at the same moment: one compiles, the
    others say that they wait for it and then load its result; a fourth process, later, loads
    it from the cache without compiling."""
    source, cache = tiny
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_start_tiny(source, cache, BARRIER=str(barrier), BARRIER_COUNT="3")
             for _ in range(3)]
    results = [_finish(p) for p in procs]
    compiled = [err for _, err in results if "LOG neurokern: compiling _tiny" in err]
    waited = [err for _, err in results if "LOG neurokern: waiting for process" in err]
    assert len(compiled) == 1, [err for _, err in results]
    assert len(waited) == 2 and all("was compiled by another process" in e for e in waited)
    (entry,) = _entries(cache)
    assert {r["file"] for r, _ in results} == {os.path.join(entry, "_tiny.so")}
    assert all(r["problem"] is None for r, _ in results)

    later, err = _run_tiny(source, cache)
    assert later["file"] == os.path.join(entry, "_tiny.so")
    assert "compiling" not in err and "waiting" not in err, err


def test_corrupted_or_incomplete_entry_is_rebuilt_not_loaded(tiny):
    source, cache = tiny
    first, _ = _run_tiny(source, cache)
    binary = first["file"]
    record_path = os.path.join(os.path.dirname(binary), _toolchain.RECORD_NAME)

    with open(binary, "r+b") as f:  # a binary cut short (a full disk, a partial copy)
        f.truncate(os.path.getsize(binary) // 2)
    again, err = _run_tiny(source, cache)
    assert "LOG neurokern: compiling _tiny" in err and again["file"] == binary
    assert _jit.valid_record(os.path.dirname(binary), _jit.Spec("_tiny", (), ()),
                             json.load(open(record_path))["jit_key"],
                             _toolchain.torch_identity(torch)) is not None

    os.remove(record_path)  # the record is written last: without it the entry is incomplete
    again, err = _run_tiny(source, cache)
    assert "LOG neurokern: compiling _tiny" in err and os.path.isfile(record_path)

    record = json.load(open(record_path))  # an entry of another torch under the same name
    record["torch"] = OTHER_TORCH[0]
    _toolchain.write_record(record_path, record)
    again, err = _run_tiny(source, cache)
    assert "LOG neurokern: compiling _tiny" in err
    assert json.load(open(record_path))["torch"] == torch.__version__


def test_killed_build_leaves_nothing_that_loads_and_no_stale_lock(tiny):
    """SIGKILL while compiling: the temporary folder stays behind, but no entry is there to
    load, and the next process is not blocked by the dead one's lock: it compiles, and removes
    the leftover."""
    source, cache = tiny
    proc = _start_tiny(source, cache)
    deadline = time.monotonic() + 120
    while not glob.glob(os.path.join(cache, "jit", ".tmp-_tiny-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its compiler child
    proc.communicate()
    assert _entries(cache) == []
    assert glob.glob(os.path.join(cache, "jit", ".tmp-_tiny-*"))

    result, err = _run_tiny(source, cache)
    assert result["problem"] is None and "LOG neurokern: compiling _tiny" in err
    assert glob.glob(os.path.join(cache, "jit", ".tmp-_tiny-*")) == []


def test_failed_build_says_why_with_the_log(tiny):
    source, cache = tiny
    source.write_text("#error this stand-in does not compile\n")
    result, err = _run_tiny(source, cache)
    assert result["file"] is None
    assert "compiling it failed" in result["problem"]
    assert "this stand-in does not compile" in result["problem"]
    assert ".log" in result["problem"] and _entries(cache) == []
    assert glob.glob(os.path.join(cache, "jit", "_tiny-*.failed"))


def test_cache_key_separates_torch_abi_cuda_python_and_sources(tmp_path, monkeypatch):
    source = tmp_path / "a.cpp"
    source.write_text("int a;\n")
    spec = _jit.Spec("_tiny", (str(source),), (str(source),))
    identity = {"torch": "2.13.0+cpu", "torch_git": "x", "cxx11_abi": True, "torch_cuda": None}
    tag, key = _jit.entry_key(spec, identity)
    python = "py{}{}".format(*sys.version_info[:2])
    assert tag == f"_tiny-torch2.13.0+cpu-cxx11-cpu-{python}-{key}"
    assert _jit.entry_key(spec, dict(identity))[0] == tag
    others = [dict(identity, torch="2.15.0+cpu"), dict(identity, torch_git="y"),
              dict(identity, cxx11_abi=False), dict(identity, torch_cuda="13.2")]
    tags = {_jit.entry_key(spec, other)[0] for other in others}
    assert len(tags) == 4 and tag not in tags
    gpu = _jit.Spec("_tiny", (str(source),), (str(source),), cuda_archs="8.6;9.0")
    assert "-cu13.2-sm86_90-" in _jit.entry_key(gpu, dict(identity, torch_cuda="13.2"))[0]
    source.write_text("int b;\n")
    assert _jit.entry_key(spec, identity)[0] != tag

    monkeypatch.setenv("NEUROKERN_CACHE_DIR", str(tmp_path / "c"))
    assert _jit.cache_root() == str(tmp_path / "c")
    monkeypatch.delenv("NEUROKERN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _jit.cache_root() == str(tmp_path / "xdg" / "neurokern")


def test_extension_spec_builds_for_this_machine():
    spec = _jit.extension_spec(torch)
    assert spec is not None and spec.module == "neurokern._C"
    names = {os.path.basename(s) for s in spec.sources}
    assert "register.cpp" in names and "plif_cpu.cpp" in names
    assert any(h.endswith(".h") for h in spec.hashed)
    if not torch.cuda.is_available():  # a CPU-only torch, or a CUDA torch without a GPU
        assert spec.cuda_archs is None and not any(s.endswith(".cu") for s in spec.sources)
        assert "CPU-only build" in spec.cuda_note or "no GPU is visible" in spec.cuda_note
    else:  # only the GPUs of this machine
        capability = "{}.{}".format(*torch.cuda.get_device_capability())
        assert spec.cuda_archs is None or capability in spec.cuda_archs.split(";") or (
            os.environ.get("TORCH_CUDA_ARCH_LIST"))


def _fake_torch(cuda, capabilities=()):
    from types import SimpleNamespace

    return SimpleNamespace(
        __version__="2.15.0+cu132" if cuda else "2.15.0+cpu", version=SimpleNamespace(cuda=cuda),
        cuda=SimpleNamespace(is_available=lambda: bool(capabilities),
                             device_count=lambda: len(capabilities),
                             get_device_capability=lambda i: capabilities[i]))


def test_cuda_part_only_for_the_gpus_of_this_machine(tmp_path, monkeypatch):
    """The first-use compile builds the CUDA part only where a GPU and a toolkit are both
    there, for the GPUs present (sm_70 and newer), or for TORCH_CUDA_ARCH_LIST if set."""
    from torch.utils import cpp_extension

    toolkit = tmp_path / "cuda"
    for sub, name in (("bin", "nvcc"), ("include", "cuda_runtime.h"), ("lib64", "libcudart.so")):
        (toolkit / sub).mkdir(parents=True)
        (toolkit / sub / name).write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("NEUROKERN_SKIP_CUDA", raising=False)

    archs, why = _jit.cuda_decision(_fake_torch(None))
    assert archs is None and why == "torch 2.15.0+cpu is a CPU-only build"
    archs, why = _jit.cuda_decision(_fake_torch("13.2"))  # a CUDA torch on a CPU laptop
    assert archs is None and "no GPU is visible" in why
    archs, why = _jit.cuda_decision(_fake_torch("13.2", [(9, 0), (8, 6), (9, 0), (6, 1)]))
    assert archs == "8.6;9.0" and "TORCH_CUDA_ARCH_LIST=8.6;9.0" in why
    archs, why = _jit.cuda_decision(_fake_torch("13.2", [(6, 1)]))
    assert archs is None and "sm_70 or newer" in why
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "12.0")
    assert _jit.cuda_decision(_fake_torch("13.2", [(9, 0)]))[0] == "12.0"
    monkeypatch.setenv("NEUROKERN_SKIP_CUDA", "1")
    assert _jit.cuda_decision(_fake_torch("13.2", [(9, 0)])) == (
        None, "NEUROKERN_SKIP_CUDA is set")
    monkeypatch.delenv("NEUROKERN_SKIP_CUDA")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)  # no nvcc
    archs, why = _jit.cuda_decision(_fake_torch("13.2", [(9, 0)]))
    assert archs is None and "no CUDA toolkit found" in why


# neurokern without its binary: what the fused backends say where nothing is compiled

@pytest.fixture()
def site_without_binary(tmp_path):
    """The package as an isolated `pip install` installs it: no neurokern._C, the sources as
    neurokern/csrc."""
    package = tmp_path / "site" / "neurokern"
    shutil.copytree(os.path.dirname(neurokern.__file__), package, symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", "triton_kernels", "_C*.so",
                                                  "_C.build.json", "csrc"))
    import neurokern.triton_kernels as tk

    shutil.copytree(os.path.dirname(tk.__file__), package / "triton_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "csrc"), package / "csrc")
    return package.parent


# An editable install of neurokern (run.sh's, the dev venv's) maps `neurokern.*` to its tree
# with a meta path finder, which would find that tree's neurokern._C for the copy: dropped.
OWN_COPY = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if not getattr(f, '__module__', '').startswith('__editable__')]\n")

PROBE = OWN_COPY + textwrap.dedent("""
    import json, logging, torch
    logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(message)s")
    import neurokern
    from neurokern import _extension, dispatch
    out = {"listed": str(dispatch.availability("plif", "cpu", "cpu"))}
    try:
        dispatch.resolve("plif", "cpu", torch.device("cpu"))
        out["cpu_backend"] = "ok"
    except dispatch.BackendUnavailableError as exc:
        out["cpu_backend"] = str(exc)
    out["auto"] = dispatch.resolve("spike", "auto", torch.device("cpu"))[0]
    out["loaded"] = _extension._C is not None
    print(json.dumps(out))
""")


def _probe(site, cache, **extra):
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=site, capture_output=True,
                          text=True, env=dict(_env(cache, **extra), PYTHONPATH=str(site)),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_jit_off_gives_the_not_built_message(site_without_binary, tmp_path):
    out, log = _probe(site_without_binary, tmp_path / "cache", NEUROKERN_JIT="0")
    for text in (out["listed"], out["cpu_backend"]):
        assert "No module named 'neurokern._C'" in text and "docs/install.md" in text
        assert "compiling it on first use is off (NEUROKERN_JIT=0)" in text
    assert out["auto"] == "reference" and not out["loaded"]
    assert "LOG WARNING neurokern: spike on cpu runs the slow reference backend" in log
    assert "NEUROKERN_JIT=0" in log and "compiling" not in log.replace("compiling it on", "")
    assert not os.path.exists(tmp_path / "cache")


def test_not_compiled_yet_is_listed_as_such(site_without_binary, tmp_path):
    """Listing the backends (python -m neurokern, neurokern.backends()) never compiles: it says
    that the first call will."""
    code = (OWN_COPY + "from neurokern import dispatch; "
            "print(dispatch.availability('plif', 'cpu', 'cpu'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=site_without_binary,
                          capture_output=True, text=True, timeout=300,
                          env=dict(_env(tmp_path / "cache"), PYTHONPATH=str(site_without_binary)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not compiled for this torch yet" in proc.stdout
    assert "the first call on the cpu backend" in proc.stdout and "compiles it" in proc.stdout
    assert "compiling" not in proc.stderr


def test_no_compiler_says_so_and_auto_falls_back(site_without_binary, tmp_path):
    out, log = _probe(site_without_binary, tmp_path / "cache", CXX=str(tmp_path / "no-such-c++"))
    assert "no C++ compiler" in out["cpu_backend"] and "no-such-c++" in out["cpu_backend"]
    assert "No module named 'neurokern._C'" in out["cpu_backend"]
    assert out["auto"] == "reference" and not out["loaded"]
    assert "LOG WARNING neurokern: spike on cpu runs the slow reference backend" in log
    assert "no C++ compiler" in log and "LOG WARNING neurokern: compiling" not in log


def test_no_ninja_says_so(site_without_binary, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ninja").write_text("#!/bin/sh\nexit 127\n")
    (fake_bin / "ninja").chmod(0o755)
    out, log = _probe(site_without_binary, tmp_path / "cache",
                      PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    assert "ninja not found" in out["cpu_backend"] and "pip install ninja" in out["cpu_backend"]
    assert out["auto"] == "reference"


# install tests: a real isolated pip install and the first fused call (minutes)

install = pytest.mark.skipif(
    os.environ.get("NEUROKERN_TEST_INSTALL") != "1",
    reason="a real pip install and compile (about 4 CPU-minutes): NEUROKERN_TEST_INSTALL=1, "
           "run by `bash run.sh sdist`")

FIRST_CALL = textwrap.dedent("""
    import json, os, sys, time
    start = time.monotonic()
    import logging
    logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
    barrier = os.environ.get("BARRIER")
    if barrier:
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        while len(os.listdir(barrier)) < int(os.environ["BARRIER_COUNT"]):
            time.sleep(0.005)
    import torch, neurokern
    from neurokern import _extension, dispatch, reference
    x = torch.randn(6, 2, 3, 4)
    alpha = torch.rand(3) * 0.5 + 0.25
    s = neurokern.functional.plif(x, alpha)  # backend "auto"
    torch.testing.assert_close(s, reference.plif(x, alpha))
    fakes = torch._library.simple_registry.singleton  # registered once the binary loaded
    print(json.dumps({"seconds": time.monotonic() - start, "record": _extension.record,
                      "fake_kernels": all(fakes.find(f"neurokern::{op}").fake_impl.kernel
                                          is not None for op in ("plif_fwd", "spike_fwd")),
                      "backend": dispatch.resolve("plif", "auto", x.device)[0],
                      "binary": _extension._C.__file__, "package": neurokern.__file__}))
""")


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """A fresh venv with torch, neurokern installed from its sdist by a plain (isolated)
    `pip install`, and the first fused call made by two processes started together. Shared by
    every install test: the one compile of neurokern._C happens here."""
    work = tmp_path_factory.mktemp("install")
    tree = work / "tree"
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    for path in listed:
        if os.path.isfile(os.path.join(ROOT, path)):
            os.makedirs(tree / os.path.dirname(path), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, path), tree / path)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(work / "dist")],
                   cwd=tree, check=True, capture_output=True)
    (sdist,) = (work / "dist").glob("neurokern-*.tar.gz")
    venv = work / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)],
                   check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["NEUROKERN_CACHE_DIR"] = str(work / "cache")
    subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__}"],
                   check=True, env=env)
    start = time.monotonic()
    pip = subprocess.run([python, "-m", "pip", "install", "--no-cache-dir", str(sdist)],
                         capture_output=True, text=True, env=env)
    pip_seconds = time.monotonic() - start
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]

    barrier = work / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([python, "-c", FIRST_CALL], cwd=work, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(env, BARRIER=str(barrier), BARRIER_COUNT="2"))
             for _ in range(2)]
    first = []
    for proc in procs:
        out, err = proc.communicate(timeout=3600)
        assert proc.returncode == 0, err[-3000:]
        first.append((json.loads(out.strip().splitlines()[-1]), err))
    timing = {"pip_install_s": round(pip_seconds, 1),
              "first_call_s": round(max(r["seconds"] for r, _ in first), 1)}
    print(f"\n[install] isolated pip install of {sdist.name}: {timing['pip_install_s']} s; "
          f"first fused call (compiles neurokern._C): {timing['first_call_s']} s; total "
          f"{round(timing['pip_install_s'] + timing['first_call_s'], 1)} s", file=sys.stderr)
    return {"python": python, "env": env, "work": work, "first": first, "timing": timing}


@install
def test_install_is_pure_python_with_the_sources(installed):
    (package,) = [os.path.dirname(r["package"]) for r, _ in installed["first"][:1]]
    assert package.startswith(str(installed["work"] / "venv"))
    assert glob.glob(os.path.join(package, "_C*.so")) == []
    assert os.path.isfile(os.path.join(package, "csrc", "register.cpp"))
    assert os.path.isfile(os.path.join(package, "csrc", "cuda", "spikgru2plus_cuda.cu"))
    (wheel,) = glob.glob(os.path.join(os.path.dirname(package), "neurokern-*.dist-info", "WHEEL"))
    text = open(wheel).read()
    assert "Root-Is-Purelib: true" in text and "py3-none-any" in text


@install
def test_install_first_fused_call_compiles_once_across_processes(installed):
    results = installed["first"]
    compiled = [err for _, err in results if "LOG neurokern: compiling neurokern._C" in err]
    waited = [err for _, err in results if "LOG neurokern: waiting for process" in err]
    assert len(compiled) == 1 and len(waited) == 1, [err[-2000:] for _, err in results]
    cache = installed["env"]["NEUROKERN_CACHE_DIR"]
    for result, _ in results:
        assert result["backend"] == "cpu"
        assert result["binary"].startswith(os.path.join(cache, "jit", "_C-torch"))
        assert result["record"]["built_by"] == "jit"
        assert result["record"]["torch"] == torch.__version__
        assert result["fake_kernels"]  # torch.compile sees the ops of the JIT build too


@install
def test_install_next_process_loads_from_the_cache(installed):
    proc = subprocess.run([installed["python"], "-c", FIRST_CALL], cwd=installed["work"],
                          capture_output=True, text=True, env=installed["env"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "compiling" not in proc.stderr and "waiting" not in proc.stderr, proc.stderr
    assert result["binary"] == installed["first"][0][0]["binary"]
    assert result["backend"] == "cpu" and result["seconds"] < 120
