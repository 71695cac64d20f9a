"""Loads the compiled extension `neurokern._C` once, only if it was built for the torch that is
running, and records why if it is not loaded.

Importing `_C` registers its C++/CUDA kernels as `torch.ops.neurokern.*`. A C++ extension built
against another torch (version, build or C++ ABI) is undefined behaviour once loaded (wrong
results, a segfault, at best an undefined symbol), so the build record that setup.py writes
beside the binary (`_C.build.json`, neurokern/_toolchain.py) is checked first; a binary without
one, or with another torch's, is not loaded and the fused backends report the reason.
"""

import importlib.util
import os

import torch

from neurokern import _toolchain


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
