"""Loads the compiled extension `neurokern._C` once, only if it was built for the torch that is
running, and records why if it is not loaded.

Without a prebuilt binary that fits (the pure-Python package of an isolated `pip install`, or
torch changed since the build), the first fused call compiles it against the running torch and
caches it (`ensure`, neurokern/_jit.py), unless NEUROKERN_JIT=0.

Importing `_C` registers its C++/CUDA kernels as `torch.ops.neurokern.*`. A C++ extension built
against another torch (version, build or C++ ABI) is undefined behaviour once loaded (wrong
results, a segfault, at best an undefined symbol), so the build record that setup.py writes
beside the binary (`_C.build.json`, neurokern/_toolchain.py) is checked first; a binary without
one, or with another torch's, is not loaded and the fused backends report the reason.
"""

import importlib.util
import logging
import os

import torch

from neurokern import _jit, _toolchain

logger = logging.getLogger("neurokern")


def _rebuild_command(binary_dir: str, record: dict) -> str:
    """The command that rebuilds neurokern._C for the running torch."""
    tree = os.path.dirname(binary_dir)
    if os.path.isfile(os.path.join(tree, "setup.py")):  # in place / editable: a source tree
        return f"pip install --no-build-isolation -e {tree}"
    source = (record or {}).get("source")
    if not (source and os.path.isfile(os.path.join(source, "setup.py"))):
        source = "<neurokern's source folder or sdist>"
    return f"pip install --no-build-isolation --no-deps --force-reinstall {source}"


def _check(origin: str):
    """(record, None) if the binary at `origin` was built for the running torch, else
    (record or None, why it must not be loaded)."""
    binary_dir = os.path.dirname(origin)
    path = os.path.join(binary_dir, _toolchain.RECORD_NAME)
    record = _toolchain.read_record(path)
    running = _toolchain.torch_identity(torch)
    if record is None:
        return None, (f"{origin} has no readable build record {_toolchain.RECORD_NAME} (built "
                      "before neurokern recorded the torch it was built for), so it is not "
                      f"loaded; rebuild it for {_toolchain.describe_torch(running)}: "
                      f"{_rebuild_command(binary_dir, None)}")
    differ = _toolchain.record_mismatch(record, running)
    if differ is None:
        return record, None
    detail = ""
    if differ == ["torch_git"]:  # same version string, another build of it
        detail = f" (git {record.get('torch_git')} vs {running['torch_git']})"
    return record, (f"neurokern._C was built for {_toolchain.describe_torch(record)} but this "
                    f"is {_toolchain.describe_torch(running)}{detail}: not loaded, as a C++ "
                    "extension built for another torch is undefined behaviour; rebuild it for "
                    f"this torch: {_rebuild_command(binary_dir, record)}")


def _load():
    """(the module or None, its build record or None, None or why it is not loaded)."""
    spec = importlib.util.find_spec("neurokern._C")
    if spec is None or spec.origin is None:  # a source checkout without `pip install`
        return None, None, ("ModuleNotFoundError: No module named 'neurokern._C' (not built: "
                            "see docs/install.md)")
    record, problem = _check(spec.origin)
    if problem is not None:
        return None, record, problem
    try:
        from neurokern import _C
    except ImportError as exc:
        return None, record, f"{type(exc).__name__}: {exc}"
    return _C, record, None


_C, record, error = _load()
# why the prebuilt binary did not load (None if it did); `error` says why none is loaded now
prebuilt_error = error
_jit_failure = None  # a JIT build that failed in this process is not retried in it
_on_load = []


def on_load(callback) -> None:
    """Call `callback()` once neurokern._C is loaded: now if it is, else after the JIT build
    loads it (the fake kernels of its ops can only be registered then)."""
    if _C is not None:
        callback()
    else:
        _on_load.append(callback)


def ensure(build: bool) -> "str | None":
    """None once neurokern._C is loaded, else why it is not. Without a prebuilt binary that
    fits, the JIT cache is tried (neurokern/_jit.py): a cached build for this torch is loaded;
    with `build`, a missing one is compiled now (minutes, once per torch version; the progress
    is logged as warnings). Never under torch.compile's tracing, and never with NEUROKERN_JIT=0."""
    global _C, record, error, _jit_failure
    if _C is not None:
        return None
    if not _jit.enabled():
        return (f"{prebuilt_error}; compiling it on first use is off "
                f"({_jit.ENV_JIT}={os.environ.get(_jit.ENV_JIT)})")
    if _jit_failure is not None:
        return _jit_failure
    if torch.compiler.is_compiling():
        return (f"{prebuilt_error}; it is compiled or loaded on first use, which cannot happen "
                "while torch.compile traces: call the op once before compiling")
    spec = _jit.extension_spec(torch)
    if spec is None:
        return f"{prebuilt_error}; the C++ sources to compile it on first use are not installed"
    try:
        module, jit_record, problem = _jit.load(spec, _toolchain.torch_identity(torch), build)
    except ImportError as exc:  # a cache entry that passed its checks and still did not load
        module, jit_record, problem = None, None, f"{type(exc).__name__}: {exc}"
        build = True  # not retried in this process
    if module is None:
        if not build:
            return (f"{prebuilt_error}; it is {problem}: the first call on the cpu backend (or "
                    "'auto' on CPU tensors) compiles it (docs/install.md)")
        _jit_failure = f"{prebuilt_error}; compiling it on first use: {problem}"
        return _jit_failure
    _C, record, error = module, jit_record, None
    callbacks, _on_load[:] = list(_on_load), []
    for callback in callbacks:
        callback()
    return None


def built_with_cuda() -> bool:
    """Whether the loaded extension contains the CUDA kernels."""
    return _C is not None and bool(_C.build_info()["cuda"])


def build_info() -> dict:
    """What `neurokern._C` was built with (`{}` if it did not load): its own report and the
    build record (torch, ABI, CUDA architectures)."""
    return dict(_C.build_info(), **(record or {})) if _C is not None else {}


def cuda_arch_problem(capability) -> "str | None":
    """None if the loaded CUDA part runs on a GPU of compute `capability` (major, minor), else
    why not and what to set."""
    archs = (record or {}).get("cuda_archs")
    if not archs or _toolchain.arch_covered(archs, tuple(capability)):
        return None
    arch = f"{capability[0]}.{capability[1]}"
    if tuple(capability) < _toolchain.MIN_CUDA_ARCH:
        return (f"this GPU is sm_{capability[0]}{capability[1]}; neurokern's CUDA kernels need "
                f"sm_{_toolchain.MIN_CUDA_ARCH[0]}{_toolchain.MIN_CUDA_ARCH[1]} or newer")
    return (f"neurokern._C was built for the CUDA architectures TORCH_CUDA_ARCH_LIST={archs}, "
            f"which do not include this GPU's ({arch}); rebuild with TORCH_CUDA_ARCH_LIST unset "
            f"(every supported architecture) or set to include \"{arch}\": "
            f"TORCH_CUDA_ARCH_LIST=\"{arch}\" "
            f"{_rebuild_command(os.path.dirname(_C.__file__), record)}")


def has_op(name: str) -> bool:
    """Whether the loaded extension defines `torch.ops.neurokern.<name>` (a stale build may not)."""
    return _C is not None and hasattr(torch.ops.neurokern, name)
