"""Build and install neurokern with its C++/CUDA extension `neurokern._C`.

Two ways, decided by whether this build can import torch:

- Ahead of time (`pip install --no-build-isolation .`, torch installed first): the extension is
  compiled now against the installed torch's headers and ABI, and `_C.build.json` beside the
  binary records that torch: neurokern refuses to load the binary under another torch
  (neurokern/_extension.py).
- Without torch (pip's default isolated build, `pip install neurokern` from an sdist): a
  pure-Python package; neurokern._C is compiled on the first fused CPU call against the torch
  installed then, and cached (neurokern/_jit.py). Never against a torch fetched for the build:
  that binary would not fit the torch it runs with.

Both ship the C++/CUDA sources (as neurokern/csrc), so the JIT build can also replace an
ahead-of-time binary that no longer fits (torch upgraded).

Before compiling, the ahead-of-time build checks its tools (setuptools, bdist_wheel, the C++
compiler, ninja) and says in one line each what is missing; the CUDA part is built only where a
CUDA build of torch and a real CUDA toolkit (nvcc, cuda_runtime.h, libcudart) are both there.

Environment variables (all documented in docs/environment.md and docs/install.md):
    NEUROKERN_SKIP_CUDA=1   build only the C++ CPU part, even where CUDA is available.
    NEUROKERN_FORCE_CUDA=1  build the CUDA part, or fail saying why it cannot be built.
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (torch's variable; default: every
                            architecture from sm_70 to sm_120 that nvcc supports, see
                            neurokern/_toolchain.py DEFAULT_CUDA_ARCHS).
    CUDA_HOME               the CUDA toolkit (torch guesses it from nvcc on PATH otherwise).
"""

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
        print(toolchain.no_torch_build_message(sys.executable, os.environ, sys.path),
              file=sys.stderr, flush=True)


def build_record(with_cuda):
    """What `_C.build.json` says about the binary being built."""
    return dict(toolchain.torch_identity(torch), neurokern=VERSION, source=ROOT,
                python=sys.version.split()[0], cuda_part=with_cuda,
                cuda_archs=os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None)


def extensions():
    if torch is None:  # sdist / metadata, or a pure-Python package compiled on first use
        return [], None
    if building:
        check_tools(cpp_extension)
    with_cuda, reason = toolchain.cuda_build_decision(
        torch.__version__, torch.version.cuda, cpp_extension.CUDA_HOME,
        skip=_flag("NEUROKERN_SKIP_CUDA"), force=_flag("NEUROKERN_FORCE_CUDA"))
    # sources and flags: neurokern/_toolchain.py, shared with the JIT build (neurokern/_jit.py)
    sources = toolchain.extension_sources("csrc", with_cuda)
    cxx_flags = list(toolchain.CXX_FLAGS)
    link_flags = toolchain.link_flags(cpp_extension.get_cxx_compiler())
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
            os.environ["TORCH_CUDA_ARCH_LIST"] = toolchain.default_cuda_archs(
                toolchain.nvcc_archs(nvcc))
        print(f"neurokern: building the CUDA part ({reason}) for the architectures "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", flush=True)
        return [cpp_extension.CUDAExtension(
            "neurokern._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[(toolchain.CUDA_MACRO, "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": list(toolchain.NVCC_FLAGS)},
            extra_link_args=link_flags,
        )], build_record(True)
    print(f"neurokern: CUDA part skipped ({reason}); building the C++ CPU kernels only",
          flush=True)
    return [cpp_extension.CppExtension(
        "neurokern._C",
        sources,
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
    # csrc/ ships as neurokern/csrc (data, no Python): the JIT build compiles it on first use
    packages=["neurokern", "neurokern.compat", "neurokern.triton_kernels", "neurokern.csrc",
              "neurokern.csrc.cuda"],
    package_dir={"neurokern": "neurokern", "neurokern.triton_kernels": "triton_kernels",
                 "neurokern.csrc": "csrc", "neurokern.csrc.cuda": "csrc/cuda"},
    package_data={"neurokern": ["verified.json"],  # the record of verified GPU variants
                  "neurokern.csrc": ["*.cpp", "*.h"],
                  "neurokern.csrc.cuda": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    # torch: from the oldest of the tested range (docs/install.md, "Supported torch versions");
    # ninja: torch.utils.cpp_extension.load, which compiles neurokern._C on first use, needs it
    install_requires=["torch>=2.11", "numpy", "tqdm", "ninja"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext_class(record)} if ext_modules else {},
    zip_safe=False,
)
