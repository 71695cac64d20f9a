"""Compiles neurokern._C on first use against the torch that is running (just in time), for
installs without a prebuilt binary that fits: the pure-Python package of an isolated
`pip install` (setup.py), or a binary built for another torch (neurokern/_extension.py).

How, after torch.utils.cpp_extension.load (which compiles it) and DeepSpeed's op builders (which
JIT-compile on first use and build only for the GPUs present), minus their known traps:

- One cache entry per torch version and build (git), C++ ABI, CUDA version and GPU
  architectures, Python version and a hash of the sources and flags: a folder
  `<cache>/jit/<readable tag>-<hash>` holding `_C.so` and its build record `_C.build.json`.
  `<cache>` is $NEUROKERN_CACHE_DIR, default $XDG_CACHE_HOME/neurokern or ~/.cache/neurokern.
- A cross-process lock, `fcntl.flock` on `<entry>.lock`: the first process builds, the others
  (DataLoader workers, torchrun ranks) say that they wait, then load its result. The kernel
  drops the lock when its holder dies, so a killed build never leaves a stale lock behind (the
  lock file of torch's FileBaton does: every later load() then waits forever,
  pytorch/pytorch#189245).
- The compiler runs in a child process into a fresh temporary folder beside the entry; the
  child also imports the result (it must load), the record with the binary's SHA-256 is written
  last, and the folder is renamed into place (atomic on one file system). An entry is loaded
  only if its record matches the running torch and the key and the binary matches its hash:
  a half-written, killed or corrupted entry is rebuilt, never loaded.
- A failed build is written to `<entry>.failed` with the log's tail; the processes that waited
  for it report that failure instead of each compiling again (a later process retries).

NEUROKERN_JIT=0 turns all of it off. Imports nothing from neurokern but _toolchain.
"""

import contextlib
import dataclasses
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Tuple

from neurokern import _toolchain

logger = logging.getLogger("neurokern")

ENV_JIT = "NEUROKERN_JIT"
ENV_CACHE = "NEUROKERN_CACHE_DIR"
MODULE = "neurokern._C"
# measured on a 2-core VM (docs/install.md): what the progress message quotes
COST = ("about 4 CPU-minutes for the C++ part (minutes of waiting on a few cores), about 1 more "
        "per GPU architecture for the CUDA part")


def enabled() -> bool:
    """Whether a missing or unfit neurokern._C is compiled on first use ($NEUROKERN_JIT, on by
    default; 0, false, no or off turn it off)."""
    return os.environ.get(ENV_JIT, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_root() -> str:
    """$NEUROKERN_CACHE_DIR, else $XDG_CACHE_HOME/neurokern, else ~/.cache/neurokern."""
    root = os.environ.get(ENV_CACHE)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                ".cache")
        root = os.path.join(base, "neurokern")
    return os.path.abspath(os.path.expanduser(root))


@dataclasses.dataclass(frozen=True)
class Spec:
    """An extension to compile: torch.utils.cpp_extension.load's arguments, the module name it
    is imported as, and the files its cache key hashes."""

    module: str                  # imported as this; its last part is the PyInit_ name
    sources: tuple               # absolute paths of the translation units
    hashed: tuple                # absolute paths of every source and header the key covers
    include_dirs: tuple = ()
    cflags: tuple = ()
    cuda_cflags: tuple = ()
    ldflags: tuple = ()
    cuda_archs: Optional[str] = None   # TORCH_CUDA_ARCH_LIST of the CUDA part; None: no CUDA
    cuda_note: str = ""          # why there is or is not a CUDA part
    cost: str = ""               # how long it takes, for the progress message

    @property
    def name(self) -> str:
        return self.module.rsplit(".", 1)[-1]


def sources_dir() -> Optional[str]:
    """The C++/CUDA sources: neurokern/csrc in an installed package, csrc/ in a source tree."""
    package = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(package, "csrc"),
                      os.path.join(os.path.dirname(package), "csrc")):
        if os.path.isfile(os.path.join(candidate, "register.cpp")):
            return candidate
    return None


def cuda_decision(torch) -> Tuple[Optional[str], str]:
    """(TORCH_CUDA_ARCH_LIST for the CUDA part or None, why): the CUDA part is compiled only
    for the GPUs of this machine (a JIT build serves this machine), and only where they exist
    and a CUDA toolkit is there; TORCH_CUDA_ARCH_LIST, if set, is taken as it is."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return None, (f"torch {torch.__version__} is a CUDA build but no GPU is visible: the "
                      "CUDA part would not run here")
    build, reason = _toolchain.cuda_build_decision(
        torch.__version__, torch.version.cuda, cpp_extension.CUDA_HOME,
        skip=os.environ.get("NEUROKERN_SKIP_CUDA", "0").strip().lower()
        in ("1", "true", "yes", "on"), force=False)
    if not build:
        return None, reason
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        present = sorted({torch.cuda.get_device_capability(i)
                          for i in range(torch.cuda.device_count())})
        present = [c for c in present if c >= _toolchain.MIN_CUDA_ARCH]
        if not present:
            return None, (f"no GPU here is sm_{_toolchain.MIN_CUDA_ARCH[0]}"
                          f"{_toolchain.MIN_CUDA_ARCH[1]} or newer")
        archs = ";".join(f"{major}.{minor}" for major, minor in present)
    return archs, f"{reason}; for this machine's GPUs: TORCH_CUDA_ARCH_LIST={archs}"


def extension_spec(torch, csrc: Optional[str] = None) -> Optional[Spec]:
    """The Spec of neurokern._C for the running torch (None if the sources are not here)."""
    from torch.utils import cpp_extension

    csrc = csrc or sources_dir()
    if csrc is None:
        return None
    archs, note = cuda_decision(torch)
    cuda_cflags = ()
    cflags = _toolchain.CXX_FLAGS
    if archs:
        define = f"-D{_toolchain.CUDA_MACRO}=1"
        cflags, cuda_cflags = cflags + (define,), _toolchain.NVCC_FLAGS + (define,)
    return Spec(
        module=MODULE,
        sources=tuple(_toolchain.extension_sources(csrc, archs is not None)),
        hashed=tuple(os.path.join(csrc, f) for f in _toolchain.extension_files(csrc)),
        include_dirs=(csrc,),
        cflags=cflags,
        cuda_cflags=cuda_cflags,
        ldflags=tuple(_toolchain.link_flags(cpp_extension.get_cxx_compiler())),
        cuda_archs=archs,
        cuda_note=note,
        cost=COST,
    )


def entry_key(spec: Spec, identity: dict) -> Tuple[str, str]:
    """(folder name of the cache entry, the hash in it) for `spec` under the torch of
    `identity` (_toolchain.torch_identity) and this Python."""
    digest = hashlib.sha256()
    for path in sorted(spec.hashed):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    python = "py{}{}".format(*sys.version_info[:2])
    digest.update(json.dumps([spec.module, sorted(os.path.basename(s) for s in spec.sources),
                              spec.cflags, spec.cuda_cflags, spec.ldflags, spec.cuda_archs,
                              identity, python, sys.platform]).encode())
    abi = "cxx11" if identity.get("cxx11_abi") else "precxx11"
    if spec.cuda_archs:
        gpu = "cu{}-sm{}".format(identity.get("torch_cuda"),
                                 spec.cuda_archs.replace(".", "").replace(";", "_"))
    else:
        gpu = "cpu"
    key = digest.hexdigest()[:16]
    tag = f"{spec.name}-torch{identity['torch']}-{abi}-{gpu}-{python}-{key}"
    return "".join(ch if ch.isalnum() or ch in "._+-" else "_" for ch in tag), key


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _binary(entry: str, spec: Spec) -> str:
    return os.path.join(entry, spec.name + ".so")


def valid_record(entry: str, spec: Spec, key: str, identity: dict) -> Optional[dict]:
    """The build record of the cache entry `entry` if it is complete and fits (the record is
    written last; it names the key, the torch and the binary's hash), else None."""
    record = _toolchain.read_record(os.path.join(entry, _toolchain.RECORD_NAME))
    if record is None or record.get("jit_key") != key:
        return None
    if _toolchain.record_mismatch(record, identity) is not None:
        return None
    binary = _binary(entry, spec)
    try:
        if _sha256(binary) != record.get("binary_sha256"):
            return None
    except OSError:
        return None
    return record


def import_binary(spec: Spec, path: str):
    """Import the extension at `path` as `spec.module` (registering its torch ops)."""
    found = importlib.util.spec_from_file_location(spec.module, path)
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    sys.modules[spec.module] = module
    return module


@contextlib.contextmanager
def _lock(path: str, what: str, log: str):
    """Hold an exclusive flock on `path`; yields the time this process started waiting for
    another holder, or None if it did not wait."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        waited = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = time.time()
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            logger.warning("neurokern: waiting for %s, which is compiling %s (log: %s)",
                           holder, what, log)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield waited
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking a lock file races)


# The child that compiles: torch.utils.cpp_extension.load into the temporary folder, which also
# imports the result, so a binary that does not load is never recorded as complete.
_CHILD = """
import json, sys
from torch.utils import cpp_extension
cpp_extension.load(**json.load(open(sys.argv[1])))
"""


def _child_env(spec: Spec) -> dict:
    env = dict(os.environ)
    # pip's ninja lies beside the venv's python, on PATH only in an activated venv, and torch
    # runs `ninja` from PATH
    venv_bin = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.isfile(os.path.join(venv_bin, "ninja")):
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    if spec.cuda_archs:
        env["TORCH_CUDA_ARCH_LIST"] = spec.cuda_archs
    return env


def build_problem(spec: Spec) -> Optional[str]:
    """Why `spec` cannot be compiled here (no C++ compiler, no ninja), or None."""
    from torch.utils import cpp_extension

    if os.name != "posix":
        return "compiling on first use needs POSIX file locks (Linux, macOS)"
    problem = _toolchain.compiler_problem(cpp_extension.get_cxx_compiler())
    if problem is not None:
        return problem
    env = _child_env(spec)
    ninja = shutil.which("ninja", path=env.get("PATH"))
    ok = False
    if ninja is not None:
        try:
            ok = subprocess.run([ninja, "--version"], capture_output=True,
                                timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    if not ok:
        return ("ninja not found (torch.utils.cpp_extension.load, which compiles it, needs "
                "it): pip install ninja")
    return None


def _build(spec: Spec, folder: str, log: str) -> Optional[str]:
    """Compile `spec` into `folder` (a child process, output to `log`); None or why it failed."""
    arguments = dict(name=spec.name, sources=list(spec.sources),
                     extra_include_paths=list(spec.include_dirs),
                     extra_cflags=list(spec.cflags), extra_cuda_cflags=list(spec.cuda_cflags),
                     extra_ldflags=list(spec.ldflags), build_directory=folder,
                     with_cuda=spec.cuda_archs is not None, verbose=True)
    arguments_path = os.path.join(folder, "load_arguments.json")
    with open(arguments_path, "w") as f:
        json.dump(arguments, f, indent=1)
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", _CHILD, arguments_path], stdout=out,
                              stderr=subprocess.STDOUT, env=_child_env(spec), cwd=folder)
    if proc.returncode == 0 and os.path.isfile(_binary(folder, spec)):
        return None
    with open(log, errors="replace") as f:
        lines = f.read().splitlines()
    # the compiler's and ninja's error lines, else the end of the log (a Python traceback)
    shown = [line for line in lines if "error:" in line or line.startswith("FAILED:")][:8]
    shown = shown or lines[-15:]
    return (f"the compiler run exited with {proc.returncode}; {len(lines)} lines of output in "
            f"{log}, of which:\n" + "\n".join(shown))


def _discard(path: str) -> None:
    """Remove a folder that must not be loaded: renamed first (atomic), then deleted."""
    if os.path.lexists(path):
        trash = tempfile.mkdtemp(prefix=".trash-", dir=os.path.dirname(path))
        os.rename(path, os.path.join(trash, "entry"))
        shutil.rmtree(trash, ignore_errors=True)


def load(spec: Spec, identity: dict, build: bool):
    """(module, record, None) once `spec` is loaded from the cache (compiled first if `build`
    and it is not there), else (None, None, why not). `identity`: the running torch's
    _toolchain.torch_identity."""
    jit_dir = os.path.join(cache_root(), "jit")
    tag, key = entry_key(spec, identity)
    entry = os.path.join(jit_dir, tag)
    record = valid_record(entry, spec, key, identity)
    if record is not None:
        return import_binary(spec, _binary(entry, spec)), record, None
    if not build:
        return None, None, f"not compiled for this torch yet (cache entry {entry})"
    problem = build_problem(spec)
    if problem is not None:
        return None, None, f"it cannot be compiled here: {problem}"
    try:
        os.makedirs(jit_dir, exist_ok=True)
        return _load_or_build(spec, identity, entry, key)
    except OSError as exc:  # a cache folder without write access, a full disk
        return None, None, (f"the cache folder {jit_dir} cannot be used ({exc}); set {ENV_CACHE} "
                            "to another")


def _load_or_build(spec: Spec, identity: dict, entry: str, key: str):
    jit_dir, tag = os.path.split(entry)
    log, failed = entry + ".log", entry + ".failed"
    with _lock(entry + ".lock", f"{spec.module} into {entry}", log) as waited:
        record = valid_record(entry, spec, key, identity)
        if record is not None:
            if waited is not None:
                logger.warning("neurokern: %s was compiled by another process in %.0f s; "
                               "loading it from %s", spec.module, time.time() - waited, entry)
            return import_binary(spec, _binary(entry, spec)), record, None
        if waited is not None and os.path.isfile(failed) and os.path.getmtime(failed) >= waited:
            with open(failed, errors="replace") as f:
                return None, None, f"compiling it failed in another process: {f.read()}"
        # under the lock, what is there is a dead build's leftover or an entry that must not
        # be loaded (incomplete, another torch's, corrupted)
        for leftover in glob.glob(os.path.join(jit_dir, f".tmp-{tag}-*")):
            shutil.rmtree(leftover, ignore_errors=True)
        _discard(entry)
        cuda = "with the CUDA part" if spec.cuda_archs else "the C++ CPU part only"
        cuda += f" ({spec.cuda_note})" if spec.cuda_note else ""
        jobs = os.environ.get("MAX_JOBS") or f"ninja's default for {os.cpu_count()} cores"
        logger.warning(
            "neurokern: compiling %s for %s, %s, into %s: once per torch version and machine "
            "type%s; parallel jobs: %s (MAX_JOBS); other processes wait for it; log: %s",
            spec.module, _toolchain.describe_torch(identity), cuda, entry,
            f", {spec.cost}" if spec.cost else "", jobs, log)
        start = time.monotonic()
        folder = tempfile.mkdtemp(prefix=f".tmp-{tag}-", dir=jit_dir)
        try:
            problem = _build(spec, folder, log)
            if problem is not None:
                with open(failed, "w") as f:
                    f.write(problem)
                return None, None, f"compiling it failed: {problem}"
            for intermediate in glob.glob(os.path.join(folder, "*.o")):
                os.remove(intermediate)
            record = dict(identity, python=sys.version.split()[0], built_by="jit",
                          jit_key=key, cuda_part=spec.cuda_archs is not None,
                          cuda_archs=spec.cuda_archs,
                          build_seconds=round(time.monotonic() - start, 1),
                          binary_sha256=_sha256(_binary(folder, spec)))
            record_path = os.path.join(folder, _toolchain.RECORD_NAME)
            _toolchain.write_record(record_path, record)  # last: marks the folder complete
            with open(record_path) as f:
                os.fsync(f.fileno())
            os.chmod(folder, 0o755)  # mkdtemp's 0700 would hide it from other users
            os.rename(folder, entry)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # gone after the rename
        with contextlib.suppress(OSError):
            os.remove(failed)
        logger.warning("neurokern: compiled %s in %.0f s; cached in %s", spec.module,
                       time.monotonic() - start, entry)
    return import_binary(spec, _binary(entry, spec)), record, None
