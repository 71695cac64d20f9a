"""Build and install neurokern with its C++/CUDA extension `neurokern._C`.

torch must be installed first and the build must see it (`pip install --no-build-isolation .`):
the extension is compiled against the installed torch's headers and ABI; an isolated build would
fetch another torch (a multi-GB CUDA build) and produce a binary that does not load.

Environment variables (all documented in docs/environment.md):
    NEUROKERN_SKIP_CUDA=1   build only the C++ CPU part, even where CUDA is available.
    NEUROKERN_FORCE_CUDA=1  build the CUDA part, or fail saying why it cannot be built.
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (torch's variable; default "9.0").
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit("neurokern: install torch first, then `pip install --no-build-isolation .` "
             "(the extension is compiled against the installed torch)")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolchain():
    """neurokern/_toolchain.py, loaded by its path: importing the package would need the
    extension this script builds."""
    spec = importlib.util.spec_from_file_location(
        "neurokern_toolchain", os.path.join(ROOT, "neurokern", "_toolchain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def cuda_build_decision():
    """(build the CUDA part?, reason) from the environment and what is installed."""
    if _flag("NEUROKERN_SKIP_CUDA"):
        return False, "NEUROKERN_SKIP_CUDA is set"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("nvcc / CUDA_HOME not found")
    if not problems:
        return True, f"CUDA {torch.version.cuda} with nvcc from {cpp_extension.CUDA_HOME}"
    if _flag("NEUROKERN_FORCE_CUDA"):
        sys.exit("neurokern: NEUROKERN_FORCE_CUDA=1 but the CUDA part cannot be built: "
                 + "; ".join(problems))
    return False, "; ".join(problems)


def extensions():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda, reason = cuda_build_decision()
    # No -std flag: torch.utils.cpp_extension adds the one its torch's headers need (c++17 with
    # torch 2.11, c++20 with 2.13). (The crash while formatting an error message seen under
    # torch 2.11 on an H100 machine was not the standard but a static libstdc++, see below.)
    cxx_flags = ["-O3", "-fopenmp"]
    # the shared libstdc++ of torch, also with a g++ that would link libstdc++.a (a private copy
    # crashed the first error message; neurokern/_toolchain.py)
    link_flags = ["-fopenmp"] + _toolchain().shared_libstdcxx_link_args(
        cpp_extension.get_cxx_compiler())
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        print(f"neurokern: building the CUDA part ({reason})", flush=True)
        return [cpp_extension.CUDAExtension(
            "neurokern._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("NEUROKERN_WITH_CUDA", "1")],
            # no --use_fast_math: the kernels' exp and divisions round as the reference's do
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )]
    print(f"neurokern: CUDA part skipped ({reason}); building the C++ CPU kernels only",
          flush=True)
    return [cpp_extension.CppExtension(
        "neurokern._C",
        cpp_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )]


setup(
    name="neurokern",
    version="0.1.0",
    description="Fused GPU and CPU kernels for spiking neural networks (PLIF, SpikGRU2+)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["neurokern", "neurokern.triton_kernels"],
    package_dir={"neurokern": "neurokern", "neurokern.triton_kernels": "triton_kernels"},
    package_data={"neurokern": ["verified.json"]},  # the record of verified GPU variants
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
