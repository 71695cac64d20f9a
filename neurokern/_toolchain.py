"""The build's knowledge of its toolchain, in one place: the checks setup.py runs before building
(build tools, compiler, ninja, the CUDA toolkit and architectures), the link arguments for C++
extensions built against the installed torch, and the build record that ties neurokern._C to the
torch it was built for. Used by setup.py (which loads this file by its path, before the package
is built), by neurokern._extension (before it loads the binary) and by the tests that compile an
extension of their own with torch.utils.cpp_extension.load. Imports nothing but the standard
library."""

import glob
import json
import os
import shlex
import shutil
import subprocess


def shared_libstdcxx_link_args(cxx: str) -> list:
    """`[]` where the C++ compiler `cxx` (a command line, as CXX holds it) links the shared
    libstdc++ itself; otherwise `[path]` of the libstdc++.so.6 this process has loaded (torch's),
    to be put on the extension's link line.

    A g++ whose library folders hold libstdc++.a but no libstdc++.so (a relocated toolchain: the
    GPU machines' CXX=/opt/gcc/bin/g++ is one) links a private copy of libstdc++ into the
    extension, and its exported std:: symbols mix with those of torch's shared libstdc++: the
    first TORCH_CHECK message that formatted a number then crashed the process (segmentation
    fault in std::ostringstream) instead of raising. Naming torch's libstdc++.so.6 before the
    driver's own -lstdc++ resolves every std:: symbol from it, so the archive adds nothing."""
    try:
        found = subprocess.run([*shlex.split(cxx), "-print-file-name=libstdc++.so"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []  # not a GCC-style driver: nothing to check
    if os.path.isabs(found):  # the driver prints the bare name when it finds no such file
        return []
    try:
        with open("/proc/self/maps") as maps:
            fields = (line.split(maxsplit=5) for line in maps)
            loaded = sorted({f[5].strip() for f in fields
                             if len(f) == 6 and "/libstdc++.so" in f[5]})
    except OSError:
        return []
    return loaded[:1]


# Checks setup.py runs before building, each returning one line that says what to do (or None).

SETUPTOOLS_MIN = (64, 0)


def version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def build_tool_problems(setuptools_version: str, has_bdist_wheel: bool) -> list:
    """The build tools that are missing or too old, each as one line saying what to install.

    setuptools older than 64 cannot build an editable install (PEP 660), and without the
    `bdist_wheel` command (setuptools < 70.1 takes it from the `wheel` package) pip's build
    fails with "invalid command 'bdist_wheel'" after the whole compilation."""
    problems = []
    if version_tuple(setuptools_version) < SETUPTOOLS_MIN:
        problems.append(f"setuptools {setuptools_version} is older than "
                        f"{'.'.join(map(str, SETUPTOOLS_MIN))}: "
                        "pip install -U 'setuptools>=64' wheel")
    if not has_bdist_wheel:
        problems.append(f"setuptools {setuptools_version} has no bdist_wheel command and the "
                        "wheel package is not installed: pip install wheel")
    return problems


def compiler_problem(cxx: str):
    """None if the C++ compiler command `cxx` (as CXX holds it) exists, else what to do."""
    words = shlex.split(cxx) or ["c++"]
    if shutil.which(words[0]) is not None:
        return None
    return (f"no C++ compiler: `{words[0]}` (CXX, default c++) is not on PATH; install one "
            "(Debian/Ubuntu: apt-get install g++) or set CXX to it")


def ninja_problem(ninja_available: bool):
    """None if ninja is available, else the one line saying what its absence costs."""
    if ninja_available:
        return None
    return ("ninja not found: the extension would compile one file at a time without it "
            "(several times slower); pip install ninja")


ISOLATED_BUILD_MARKERS = ("pip-build-env-", "build-env-")  # pip's and python -m build's


def no_torch_build_message(python: str, environ, sys_path) -> str:
    """What a build that cannot import torch does, and why: it builds a pure-Python package that
    ships the C++/CUDA sources, compiled on first use against the torch installed then
    (neurokern/_jit.py), instead of compiling against a torch other than the one it will run
    with.

    Under pip's default build isolation the build runs with only the build requirements of
    pyproject.toml: the torch the user has installed is then invisible, not missing."""
    isolated = any(m in entry for m in ISOLATED_BUILD_MARKERS
                   for entry in [environ.get("PYTHONPATH", "")] + list(sys_path))
    where = ("this is an isolated build (pip's default build isolation), which cannot see the "
             "torch installed" if isolated else "torch is not importable")
    return (f"neurokern: {where}: building a pure-Python package with the C++/CUDA sources; "
            "neurokern._C is compiled on the first fused CPU call against the torch installed "
            "then and cached (docs/install.md). To compile it now instead, install torch first, "
            f"then: {python} -m pip install --no-build-isolation .")


# What neurokern._C is built from and with, for setup.py's ahead-of-time build and the JIT build
# on first use alike.

# No -std flag: torch.utils.cpp_extension adds the one its torch's headers need (c++17 with torch
# 2.11, c++20 with 2.13).
# -fno-trapping-math: FP operations may run speculatively (values round as without it), so
# GCC vectorises loops that multiply by a spike computed in the same iteration.
CXX_FLAGS = ("-O3", "-fopenmp", "-fno-trapping-math")
# no --use_fast_math: the kernels' exp and divisions round as the reference's do
NVCC_FLAGS = ("-O3",)
CUDA_MACRO = "NEUROKERN_WITH_CUDA"


def extension_sources(csrc: str, with_cuda: bool) -> list:
    """The translation units of neurokern._C under the folder `csrc` (paths start with it)."""
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    if with_cuda:
        sources += (sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
                    + sorted(glob.glob(os.path.join(csrc, "cuda", "*.cpp"))))
    return sources


def extension_files(csrc: str) -> list:
    """Every source and header under `csrc`, relative to it (what the JIT cache key hashes and
    the package ships)."""
    found = []
    for folder, _, names in os.walk(csrc):
        for name in names:
            if name.endswith((".cpp", ".h", ".cu", ".cuh")):
                found.append(os.path.relpath(os.path.join(folder, name), csrc))
    return sorted(found)


def link_flags(cxx: str) -> list:
    """OpenMP, and the shared libstdc++ of torch with a g++ that would link libstdc++.a (a
    private copy crashed the first error message; shared_libstdcxx_link_args)."""
    return ["-fopenmp"] + shared_libstdcxx_link_args(cxx)


# The CUDA part: built from what is really installed, for every architecture the code supports.

CUDA_HOME_CANDIDATES = ("/usr/local/cuda",)
# The kernels (csrc/cuda/) compile for sm_70 and newer: the SIMT loops need cooperative launches
# only; the tensor-core loops (sm_80+) are compiled out below sm_80 and refused by the host there.
MIN_CUDA_ARCH = (7, 0)
# Default architectures (SASS; a cubin for X.Y runs on X.Z, Z >= Y), those of them the installed
# nvcc compiles for: V100, T4 / RTX 20xx, A100, RTX 30xx / A10, RTX 40xx / L4, H100, B200, RTX 50xx.
DEFAULT_CUDA_ARCHS = ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def cuda_toolkit_problem(cuda_home):
    """None if `cuda_home` holds a CUDA toolkit the build can use (nvcc, cuda_runtime.h and
    libcudart), else what is missing."""
    if not cuda_home:
        return "no CUDA toolkit found (neither CUDA_HOME nor nvcc on PATH)"
    missing = []
    if not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        missing.append("bin/nvcc")
    if not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        missing.append("include/cuda_runtime.h")
    libdirs = ["lib64", "lib"] + [os.path.relpath(p, cuda_home) for p in
                                  glob.glob(os.path.join(cuda_home, "targets", "*", "lib"))]
    if not any(glob.glob(os.path.join(cuda_home, d, "libcudart.so*")) for d in libdirs):
        missing.append("lib64/libcudart.so")
    if missing:
        return f"CUDA_HOME={cuda_home} is not a CUDA toolkit (no {', '.join(missing)})"
    return None


def cuda_build_decision(torch_version: str, torch_cuda, cuda_home, skip: bool, force: bool,
                        candidates=CUDA_HOME_CANDIDATES):
    """(build the CUDA part?, reason): from the torch build (`torch_cuda`: torch.version.cuda)
    and the toolkit really under `cuda_home` (what torch.utils.cpp_extension found, which may be a
    guess from an nvcc wrapper on PATH). `force` (NEUROKERN_FORCE_CUDA) turns a reason not to
    build into SystemExit; `skip` (NEUROKERN_SKIP_CUDA) wins over everything."""
    if skip:
        return False, "NEUROKERN_SKIP_CUDA is set"
    if torch_cuda is None:  # torch then looks for no toolkit (cuda_home is None)
        problem = f"torch {torch_version} is a CPU-only build"
    else:
        problem = cuda_toolkit_problem(cuda_home)
        fixes = [c for c in candidates if c != cuda_home and cuda_toolkit_problem(c) is None]
        if problem is not None and fixes:
            problem += f"; set CUDA_HOME={fixes[0]}, which is one, to build the CUDA part"
    if problem is None:
        return True, f"torch {torch_version} with CUDA {torch_cuda}; toolkit {cuda_home}"
    if force:
        raise SystemExit("neurokern: NEUROKERN_FORCE_CUDA=1 but the CUDA part cannot be built: "
                         + problem)
    return False, problem


def nvcc_archs(nvcc: str) -> list:
    """The architectures `nvcc` compiles for, as "X.Y" strings (`[]` if it cannot say)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    archs = []
    for word in out.split():
        if word.startswith("compute_") and word[8:].isdigit():
            number = int(word[8:])
            archs.append(f"{number // 10}.{number % 10}")
    return archs


def default_cuda_archs(nvcc_supported: list) -> str:
    """TORCH_CUDA_ARCH_LIST when the user sets none: every architecture of DEFAULT_CUDA_ARCHS
    that nvcc compiles for (`nvcc_supported`; empty: unknown, all of them), the newest also as
    PTX, so that a GPU newer than all of them compiles it when the extension loads."""
    archs = [a for a in DEFAULT_CUDA_ARCHS if not nvcc_supported or a in nvcc_supported]
    if not archs:
        raise SystemExit("neurokern: nvcc compiles for none of the architectures neurokern "
                         f"supports ({', '.join(DEFAULT_CUDA_ARCHS)}; nvcc: "
                         f"{', '.join(nvcc_supported)}): set TORCH_CUDA_ARCH_LIST")
    return ";".join(archs) + "+PTX"


def parse_arch_list(arch_list: str) -> list:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", also space-separated, names as torch has them) as
    [(major, minor, ptx)] entries."""
    named = {"Volta": "7.0", "Turing": "7.5", "Ampere": "8.0;8.6", "Ada": "8.9",
             "Hopper": "9.0", "Blackwell": "10.0;12.0"}
    entries = []
    for word in arch_list.replace(";", " ").split():
        ptx = word.endswith("+PTX")
        word = word[:-4] if ptx else word
        for arch in named.get(word, word).split(";"):
            digits = version_tuple(arch.rstrip("af"))
            if len(digits) >= 2:
                entries.append((digits[0], digits[1], ptx))
    return entries


def arch_covered(arch_list: str, capability: tuple) -> bool:
    """Whether a binary compiled for `arch_list` runs on a GPU of compute `capability` (major,
    minor): a cubin for X.Y runs on X.Z with Z >= Y; PTX for X.Y on any newer GPU."""
    major, minor = capability
    for a_major, a_minor, ptx in parse_arch_list(arch_list):
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= capability):
            return True
    return False


# The build record: the torch a built neurokern._C is for, written beside it by the build and
# checked before it is loaded (a C++ extension built for another torch is undefined behaviour).

RECORD_NAME = "_C.build.json"
# what must be equal for the binary to load under the torch that runs it
RECORD_KEYS = ("torch", "torch_git", "cxx11_abi", "torch_cuda")


def torch_identity(torch) -> dict:
    """The fields of RECORD_KEYS for the given (imported) torch module."""
    return {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "torch_cuda": torch.version.cuda,
    }


def describe_torch(record: dict) -> str:
    """'torch 2.13.0+cpu (C++11 ABI, CPU-only)' for a record or torch_identity()."""
    abi = "C++11 ABI" if record.get("cxx11_abi") else "pre-C++11 ABI"
    cuda = f"CUDA {record['torch_cuda']}" if record.get("torch_cuda") else "CPU-only"
    return f"torch {record.get('torch')} ({abi}, {cuda})"


def record_mismatch(recorded: dict, current: dict):
    """None if a binary recorded as `recorded` may load under `current` (torch_identity()),
    else the keys that differ."""
    differ = [k for k in RECORD_KEYS if recorded.get(k) != current.get(k)]
    return differ or None


def read_record(path: str):
    """The build record at `path` (a dict), or None if there is none or it cannot be read."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
