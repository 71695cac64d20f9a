"""Build and install neurokern with its C++/CUDA extension `neurokern._C`.

torch must be installed first and the build must see it (`pip install --no-build-isolation .`):
the extension is compiled against the installed torch's headers and ABI; an isolated build would
fetch another torch (a multi-GB CUDA build) and produce a binary that does not load.

Before compiling, the build checks its tools (setuptools, bdist_wheel, the C++ compiler, ninja)
and says in one line each what is missing; the CUDA part is built only where a CUDA build of
torch and a real CUDA toolkit (nvcc, cuda_runtime.h, libcudart) are both there. Beside the
binary it writes `_C.build.json`, the torch it was built for: neurokern refuses to load the
binary under another torch (neurokern/_extension.py).

Environment variables (all documented in docs/environment.md and docs/install.md):
    NEUROKERN_SKIP_CUDA=1   build only the C++ CPU part, even where CUDA is available.
    NEUROKERN_FORCE_CUDA=1  build the CUDA part, or fail saying why it cannot be built.
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (torch's variable; default: every
                            architecture from sm_70 to sm_120 that nvcc supports, see
                            neurokern/_toolchain.py DEFAULT_CUDA_ARCHS).
    CUDA_HOME               the CUDA toolkit (torch guesses it from nvcc on PATH otherwise).
"""

import glob
import importlib.util
import os
import shutil
import sys

import setuptools
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
LICENSE = "BSD-3-Clause"
# the setup.py commands that compile the extension (pip runs bdist_wheel or editable_wheel;
# sdist and egg_info / dist_info need neither torch nor a compiler)
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install",
                  "bdist_egg"}


def _load_toolchain():
    """neurokern/_toolchain.py, loaded by its path: importing the package would need the
    extension this script builds."""
    spec = importlib.util.spec_from_file_location(
        "neurokern_toolchain", os.path.join(ROOT, "neurokern", "_toolchain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toolchain = _load_toolchain()
building = bool(BUILD_COMMANDS.intersection(sys.argv[1:]))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _has_bdist_wheel():
    for module in ("setuptools.command.bdist_wheel", "wheel.bdist_wheel"):
        try:
            importlib.import_module(module)
            return True
        except ImportError:
            pass
    return False


def check_tools(cpp_extension):
    """Say every missing build tool in one line each, before anything compiles; stop if the
    build cannot succeed."""
    # pip's ninja lies beside the venv's python, on PATH only if the venv is activated, and torch
    # runs `ninja` from PATH
    venv_bin = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.isfile(os.path.join(venv_bin, "ninja")):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    fatal = toolchain.build_tool_problems(setuptools.__version__, _has_bdist_wheel())
    compiler = toolchain.compiler_problem(cpp_extension.get_cxx_compiler())
    if compiler:
        fatal.append(compiler)
    ninja = toolchain.ninja_problem(cpp_extension.is_ninja_available())
    if ninja:
        print(f"neurokern: {ninja}", file=sys.stderr, flush=True)
    if fatal:
        sys.exit("\n".join(f"neurokern: {line}" for line in fatal))


try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    torch = None
    if building:
        sys.exit(toolchain.torch_missing_message(sys.executable, os.environ, sys.path))


def build_record(with_cuda):
    """What `_C.build.json` says about the binary being built."""
    return dict(toolchain.torch_identity(torch), neurokern=VERSION, source=ROOT,
                python=sys.version.split()[0], cuda_part=with_cuda,
                cuda_archs=os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None)


def extensions():
    if torch is None:  # sdist / metadata only
        return [], None
    if building:
        check_tools(cpp_extension)
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda, reason = toolchain.cuda_build_decision(
        torch.__version__, torch.version.cuda, cpp_extension.CUDA_HOME,
        skip=_flag("NEUROKERN_SKIP_CUDA"), force=_flag("NEUROKERN_FORCE_CUDA"))
    # No -std flag: torch.utils.cpp_extension adds the one its torch's headers need (c++17 with
    # torch 2.11, c++20 with 2.13). (The crash while formatting an error message seen under
    # torch 2.11 on an H100 machine was not the standard but a static libstdc++, see below.)
    cxx_flags = ["-O3", "-fopenmp"]
    # the shared libstdc++ of torch, also with a g++ that would link libstdc++.a (a private copy
    # crashed the first error message; neurokern/_toolchain.py)
    link_flags = ["-fopenmp"] + toolchain.shared_libstdcxx_link_args(
        cpp_extension.get_cxx_compiler())
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
            os.environ["TORCH_CUDA_ARCH_LIST"] = toolchain.default_cuda_archs(
                toolchain.nvcc_archs(nvcc))
        print(f"neurokern: building the CUDA part ({reason}) for the architectures "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", flush=True)
        return [cpp_extension.CUDAExtension(
            "neurokern._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("NEUROKERN_WITH_CUDA", "1")],
            # no --use_fast_math: the kernels' exp and divisions round as the reference's do
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )], build_record(True)
    print(f"neurokern: CUDA part skipped ({reason}); building the C++ CPU kernels only",
          flush=True)
    return [cpp_extension.CppExtension(
        "neurokern._C",
        cpp_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )], build_record(False)


def build_ext_class(record):
    """torch's BuildExtension (with ninja) that writes the build record beside the binary, and
    never reuses a binary in the build folder that was built for another torch."""

    class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def _record_path(self, ext):
            return os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)),
                                toolchain.RECORD_NAME)

        def build_extension(self, ext):
            previous = toolchain.read_record(self._record_path(ext))
            if previous is None or toolchain.record_mismatch(previous, record):
                self.force = True  # up-to-date sources do not make an old binary fit this torch
            super().build_extension(ext)
            toolchain.write_record(self._record_path(ext), record)

        def copy_extensions_to_source(self):  # --inplace and editable installs
            super().copy_extensions_to_source()
            for ext in self.extensions:
                self.inplace = False
                built = self._record_path(ext)
                self.inplace = True
                self.copy_file(built, self._record_path(ext), level=self.verbose)

    return BuildExtension


ext_modules, record = extensions()
metadata_license = ({"license_expression": LICENSE}
                    if toolchain.version_tuple(setuptools.__version__) >= (77,)
                    else {"license": LICENSE})

setup(
    name="neurokern",
    version=VERSION,
    description="Fused GPU and CPU kernels for spiking neural networks (PLIF, SpikGRU2+)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    license_files=["LICENSE"],
    **metadata_license,
    python_requires=">=3.10",
    packages=["neurokern", "neurokern.triton_kernels"],
    package_dir={"neurokern": "neurokern", "neurokern.triton_kernels": "triton_kernels"},
    package_data={"neurokern": ["verified.json"]},  # the record of verified GPU variants
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext_class(record)} if ext_modules else {},
    zip_safe=False,
)
