"""The install (issue 22, issue 20 items 2 and 3): the sdist holds everything the build needs
and declares the licence; setup.py says up front which build tool is missing, makes a
pure-Python package with the sources where it cannot see torch (pip's isolated build), and
decides the CUDA part from the toolkit really installed; neurokern._C records the torch it was
built for and is not loaded under another one (the fused ops then report both versions and the
command that fixes it, and `auto` falls back with a warning).

The whole build from an sdist in a fresh venv, ahead of time and compiled on first use, is a CI
step (`bash run.sh sdist`, with tests/test_jit.py's install tests), not part of the default
run: it takes minutes."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch

from conftest import OTHER_TORCH
from neurokern import _extension, _toolchain, dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, p))]


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory):
    """A copy of the files git tracks (what a fresh clone has), no build outputs."""
    tree = tmp_path_factory.mktemp("tree")
    for path in _tracked_files():
        os.makedirs(tree / os.path.dirname(path), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, path), tree / path)
    return tree


def _setup_py(tree, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, "setup.py", *args], cwd=tree, capture_output=True,
                          text=True, env=env, timeout=timeout)


# sdist

def test_sdist_holds_everything_the_build_needs_and_the_licence(clean_tree, tmp_path):
    proc = _setup_py(clean_tree, "sdist", "--dist-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = tmp_path.glob("neurokern-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"{archive.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    needed = [p for p in _tracked_files()
              if p.startswith(("csrc/", "neurokern/", "triton_kernels/"))
              or p in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")]
    assert any(p.endswith(".h") for p in needed) and any(p.startswith("csrc/cuda/") for p in needed)
    missing = sorted(set(needed) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert "License-Expression: BSD-3-Clause" in pkg_info or "License: BSD-3-Clause" in pkg_info
    assert "License-File: LICENSE" in pkg_info
    assert "BSD 3-Clause License" in open(os.path.join(ROOT, "LICENSE")).read()


# tools, said up front

def test_build_tool_problems_say_what_to_install():
    # torch 2.11's venvs: setuptools 65 without wheel ("invalid command 'bdist_wheel'")
    (no_wheel,) = _toolchain.build_tool_problems("65.5.0", has_bdist_wheel=False)
    assert "bdist_wheel" in no_wheel and "pip install wheel" in no_wheel
    old = _toolchain.build_tool_problems("63.2.0", has_bdist_wheel=False)
    assert len(old) == 2
    assert "setuptools 63.2.0 is older than 64.0" in old[0] and "pip install -U" in old[0]
    assert _toolchain.build_tool_problems("84.2.1", has_bdist_wheel=True) == []
    assert _toolchain.build_tool_problems("70.1.0", has_bdist_wheel=True) == []


def test_setup_says_missing_compiler_and_ninja_up_front(clean_tree, tmp_path):
    """Without a compiler the build stops before compiling, with one line saying so (not a
    150-line traceback); a missing ninja is one line too."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ninja").write_text("#!/bin/sh\nexit 127\n")  # torch probes `ninja --version`
    (fake_bin / "ninja").chmod(0o755)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"),
               PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    proc = _setup_py(clean_tree, "build_ext", "--inplace", env=env, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert any(l.startswith("neurokern: ninja not found") and "pip install ninja" in l
               for l in lines), proc.stderr[-2000:]
    assert lines[-1].startswith("neurokern: no C++ compiler"), proc.stderr[-2000:]
    assert "no-such-c++" in lines[-1] and "Traceback" not in proc.stderr
    assert "building 'neurokern._C'" not in proc.stdout


def test_isolated_build_makes_a_pure_python_package_with_the_sources(clean_tree, tmp_path):
    """pip's isolated build sees no torch (a PYTHONPATH overlay in pip-build-env-*): instead of
    compiling against a torch fetched for the build, it makes a pure-Python wheel that ships
    the C++/CUDA sources (compiled on first use, tests/test_jit.py) and says so."""
    overlay = tmp_path / "pip-build-env-test" / "overlay"
    (overlay / "torch").mkdir(parents=True)
    (overlay / "torch" / "__init__.py").write_text("raise ImportError('isolated: no torch')\n")
    proc = _setup_py(clean_tree, "bdist_wheel", "--dist-dir", str(tmp_path / "dist"),
                     env=dict(os.environ, PYTHONPATH=str(overlay)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = [line for line in proc.stderr.splitlines() if line.startswith("neurokern:")]
    assert message and "isolated build" in message[0] and "pure-Python" in message[0], message
    assert "compiled on the first fused CPU call" in message[0]
    assert "pip install --no-build-isolation ." in message[0]
    assert "building 'neurokern._C'" not in proc.stdout
    (wheel,) = (tmp_path / "dist").glob("neurokern-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith(".so")]
    shipped = {n.removeprefix("neurokern/") for n in names if n.startswith("neurokern/csrc/")}
    sources = {"csrc/" + f for f in _toolchain.extension_files(os.path.join(ROOT, "csrc"))}
    assert sources and sources <= shipped, sorted(sources - shipped)
    # every Python module of the package and its subpackages (a subpackage missing from
    # setup.py's `packages` works in an editable tree and is absent from every real install)
    modules = {os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
               for folder, _, files in os.walk(os.path.join(ROOT, "neurokern"))
               for f in files if f.endswith(".py")}
    assert modules and modules <= set(names), sorted(modules - set(names))


def test_missing_torch_outside_isolation_says_what_happens():
    message = _toolchain.no_torch_build_message("/x/bin/python", {}, ["/x/lib"])
    assert "torch is not importable" in message and "pure-Python" in message
    assert "install torch first" in message
    assert "/x/bin/python -m pip install --no-build-isolation ." in message


# the CUDA part

def _fake_toolkit(root, runtime_header=True, cudart=True):
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    if runtime_header:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    if cudart:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so.13").write_text("")
    return str(root)


def test_cuda_decided_from_the_toolkit_really_there(tmp_path):
    """An nvcc wrapper in /usr/local/bin makes torch guess CUDA_HOME=/usr/local, which has no
    cuda_runtime.h or libcudart: skipped with the reason (the build would fail to link after
    many minutes), naming the CUDA_HOME that works where there is one."""
    guessed = _fake_toolkit(tmp_path / "local", runtime_header=False, cudart=False)
    real = _fake_toolkit(tmp_path / "cuda")
    build, reason = _toolchain.cuda_build_decision(
        "2.15.0+cu132", "13.2", guessed, skip=False, force=False, candidates=(real,))
    assert not build
    assert f"CUDA_HOME={guessed} is not a CUDA toolkit" in reason
    assert "include/cuda_runtime.h" in reason and "libcudart" in reason
    assert f"set CUDA_HOME={real}" in reason
    with pytest.raises(SystemExit, match=f"NEUROKERN_FORCE_CUDA=1.*set CUDA_HOME={real}"):
        _toolchain.cuda_build_decision("2.15.0+cu132", "13.2", guessed, skip=False, force=True,
                                       candidates=(real,))
    assert _toolchain.cuda_build_decision("2.15.0+cu132", "13.2", real, False, False,
                                          candidates=())[0]
    # no toolkit at all, a CPU-only torch, the explicit skip
    build, reason = _toolchain.cuda_build_decision("2.15.0+cu132", "13.2", None, False, False,
                                                   candidates=())
    assert not build and "no CUDA toolkit found" in reason
    assert _toolchain.cuda_build_decision("2.13.0+cpu", None, real, False, False) == (
        False, "torch 2.13.0+cpu is a CPU-only build")
    assert _toolchain.cuda_build_decision("2.15.0+cu132", "13.2", real, True, True) == (
        False, "NEUROKERN_SKIP_CUDA is set")


# the build record

def test_loaded_extension_was_built_for_this_torch():
    """The build (pip install / build_ext) wrote the record beside the binary, and it matches
    the running torch (else the binary would not have been loaded)."""
    if _extension._C is None:
        pytest.skip(f"neurokern._C not loaded: {_extension.error}")
    assert _toolchain.record_mismatch(_extension.record, _toolchain.torch_identity(torch)) is None
    assert _extension.build_info()["torch"] == torch.__version__


@pytest.fixture()
def package_copy(tmp_path):
    """A copy of the installed package (binary and build record included) to edit."""
    if _extension._C is None:
        pytest.skip(f"neurokern._C not loaded: {_extension.error}")
    package = os.path.dirname(_extension.__file__)
    copy = tmp_path / "site" / "neurokern"
    shutil.copytree(package, copy, symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", "triton_kernels"))
    import neurokern.triton_kernels as tk

    shutil.copytree(os.path.dirname(tk.__file__), copy / "triton_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return copy


_PROBE = textwrap.dedent("""
    import json, logging, torch
    logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(message)s")
    import neurokern as nk
    from neurokern import _extension, dispatch
    out = {"error": _extension.error, "loaded": _extension._C is not None,
           "ops_registered": hasattr(torch.ops.neurokern, "plif_fwd")}
    try:
        dispatch.resolve("plif", "cpu", torch.device("cpu"))
    except dispatch.BackendUnavailableError as exc:
        out["cpu_backend"] = str(exc)
    name, fn = dispatch.resolve("spike", "auto", torch.device("cpu"))
    out["auto"] = name
    print(json.dumps(out))
""")


def _probe(site):
    # NEUROKERN_JIT=0: the fallback without a fitting binary (with the JIT on, the first call
    # would compile one, tests/test_jit.py)
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=site, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(site), NEUROKERN_JIT="0"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_binary_built_for_another_torch_is_not_loaded(package_copy):
    """Simulates switching torch after the build by editing the copy's build record (building
    against a second real torch costs minutes and gigabytes): the binary is not loaded, the cpu
    backend names both torch versions and the rebuild command, `auto` warns and falls back."""
    site = package_copy.parent
    same, _ = _probe(site)  # the unedited copy loads: the edit below is what refuses it
    assert same["loaded"] and same["error"] is None and same["auto"] == "cpu"

    record_path = package_copy / _toolchain.RECORD_NAME
    record = json.loads(record_path.read_text())
    record["torch"], record["torch_cuda"] = OTHER_TORCH
    record_path.write_text(json.dumps(record))
    other, log = _probe(site)
    assert not other["loaded"] and not other["ops_registered"]
    for text in (other["error"], other["cpu_backend"]):
        assert f"built for torch {OTHER_TORCH[0]}" in text and f"CUDA {OTHER_TORCH[1]}" in text
        assert f"this is torch {torch.__version__}" in text
        assert "pip install --no-build-isolation" in text
    assert "compiling it on first use is off (NEUROKERN_JIT=0)" in other["cpu_backend"]
    assert other["auto"] == "reference"
    assert "LOG WARNING neurokern: spike on cpu runs the slow reference backend" in log
    assert f"built for torch {OTHER_TORCH[0]}" in log

    record_path.unlink()  # a binary from before the record existed
    unrecorded, _ = _probe(site)
    assert not unrecorded["loaded"] and "has no readable build record" in unrecorded["error"]


# CUDA architectures

def test_default_architectures_cover_every_supported_gpu():
    nvcc13 = ["7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "11.0", "10.3", "12.0",
              "12.1"]
    nvcc12 = ["5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "8.9", "9.0"]
    assert _toolchain.default_cuda_archs(nvcc13) == "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    assert _toolchain.default_cuda_archs(nvcc12) == "7.0;7.5;8.0;8.6;8.9;9.0+PTX"
    with pytest.raises(SystemExit, match="TORCH_CUDA_ARCH_LIST"):
        _toolchain.default_cuda_archs(["5.0", "6.1"])
    archs = _toolchain.default_cuda_archs(nvcc13)
    # T4, A100, A10, L4 / RTX 4090, H100, B200, RTX 5090, and a future GPU through the PTX
    for capability in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (13, 0)]:
        assert _toolchain.arch_covered(archs, capability), capability
    assert not _toolchain.arch_covered("9.0", (8, 0))
    assert not _toolchain.arch_covered("8.6", (8, 0))  # a cubin runs on newer minors only
    assert _toolchain.arch_covered("8.0", (8, 6))
    assert not _toolchain.arch_covered("9.0", (10, 0))
    assert _toolchain.arch_covered("Ampere;9.0+PTX", (10, 0))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_nvcc_architectures_parsed():
    archs = _toolchain.nvcc_archs(shutil.which("nvcc"))
    assert "8.0" in archs and "9.0" in archs


def test_gpu_outside_the_built_architectures_says_what_to_set(monkeypatch):
    """The binary lacks this GPU's architecture: the cuda backend is unavailable and the reason
    says which TORCH_CUDA_ARCH_LIST to build with (instead of "no kernel image is available" at
    the first launch)."""
    if _extension._C is None:
        pytest.skip(f"neurokern._C not loaded: {_extension.error}")
    monkeypatch.setattr(_extension, "record", dict(_extension.record, cuda_archs="9.0"))
    monkeypatch.setattr(_extension, "built_with_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    reason = dispatch._extension_status("cuda")
    assert "TORCH_CUDA_ARCH_LIST=9.0" in reason and "this GPU's (8.6)" in reason
    assert 'TORCH_CUDA_ARCH_LIST="8.6" pip install --no-build-isolation' in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert dispatch._extension_status("cuda") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (6, 1))
    assert "need sm_70 or newer" in dispatch._extension_status("cuda")
