import importlib
import os

import torch

# Without a GPU the Triton kernels run under the interpreter, so CI checks them too. This must
# be set before triton kernels are defined, i.e. before neurokern is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import neurokern  # noqa: E402
from neurokern import dispatch, verified  # noqa: E402

# "ci" (default): deterministic draws so a CI run is reproducible; "dev": more, random examples.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def record_variants(record_property):
    """The GPU kernel variants each test launched (on a GPU only), as the JUnit property that
    `python -m neurokern record` turns into the record of verified variants."""
    with verified.recording() as launched:
        yield
    if launched:
        record_property(verified.PROPERTY, " ".join(sorted(launched)))


def backend_device(backend):
    """The device a backend is tested on: the C++ CPU kernels on the CPU, the others on the GPU
    when there is one (else the Triton kernels run on the CPU under the interpreter)."""
    return "cpu" if backend == "cpu" or not torch.cuda.is_available() else "cuda"


def fused_backends(op, *, with_op=False):
    """pytest params: every fused backend of `op` (as `(op, backend)` pairs with `with_op`),
    skipped with the reason when it cannot run here (on `backend_device(backend)`)."""
    params = []
    for name in ("cpu", "triton", "cuda"):
        status = dispatch.availability(op, name, backend_device(name))
        if (op, name) not in dispatch._IMPLEMENTATIONS:
            continue
        marks = [] if status.available else [pytest.mark.skip(reason=status.reason)]
        values = (op, name) if with_op else (name,)
        params.append(pytest.param(*values, marks=marks, id=f"{op}-{name}" if with_op else name))
    return params


def reference_and_cpu(op):
    """The backends of tests that compare `op` with a CPU-only library (the compat tests): the
    reference and, where `neurokern._C` is built, the fused CPU backend."""
    return ["reference"] + (["cpu"] if dispatch.availability(op, "cpu", "cpu").available else [])


def compat_library(*modules):
    """The modules (dotted names) of a library the compat tests compare with, all None if it is
    not installed, followed by the mark that skips a test needing it (saying how to install
    it; CI does: requirements-compat.txt). The tests that do not need it still run."""
    try:
        found = [importlib.import_module(name) for name in modules]
    except ImportError:
        found = [None] * len(modules)
    library = modules[0].split(".")[0]
    return (*found, pytest.mark.skipif(
        found[0] is None, reason=f"{library} is not installed (pip install --no-deps -r "
        "requirements-compat.txt)"))


@pytest.fixture
def poison_empty():
    """Tensors from torch.empty are filled with NaN, so an element a kernel forgets to write
    fails the comparison."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


# A torch other than the one running, (version, CUDA version) as a build record names them: the
# tests of a binary or a cache entry built for another torch edit their record to it (the matrix
# runs them on torch 2.11.0 too, so no one fixed version will do).
OTHER_TORCH = ("2.15.0+cu132", "13.2") if torch.__version__.startswith("2.11.") else (
    "2.11.0+cu130", "13.0")
