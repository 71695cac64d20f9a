"""Public API: argument checks (clear errors, nothing computed), backend selection, exports."""

import logging

import pytest
import torch

import neurokern as nk
from neurokern import dispatch as nk_backends
from neurokern import functional

f32 = torch.float32


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if an op gets as far as running a backend."""
    def refuse(*args, **kwargs):
        raise AssertionError("an op ran although its arguments were invalid")
    monkeypatch.setattr(functional, "_run", refuse)


def gru_args(t=4, b=2, i=3, h=5, dtype=f32, device="cpu"):
    kw = dict(dtype=dtype, device=device)
    return [torch.randn(t, b, i, **kw), torch.randn(3 * h, i, **kw), torch.randn(3 * h, h, **kw),
            torch.randn(3 * h, **kw), torch.randn(3 * h, **kw), torch.rand(h, **kw)]


PLIF_BAD = [
    ("rank", lambda: (torch.randn(4, 3), torch.rand(3)), {}, ValueError, "rank >= 3"),
    ("channels", lambda: (torch.randn(4, 2, 3), torch.rand(4)), {}, ValueError, "alpha"),
    ("alpha matrix", lambda: (torch.randn(4, 2, 3), torch.rand(3, 1)), {}, ValueError, "alpha"),
    ("int x", lambda: (torch.ones(4, 2, 3, dtype=torch.int64), torch.rand(3)), {}, TypeError,
     "x must be a floating-point"),
    ("float8 x", lambda: (torch.randn(4, 2, 3).to(torch.float8_e4m3fn), torch.rand(3)), {},
     TypeError, "x must be a floating-point tensor (float16, bfloat16, float32 or float64)"),
    ("int alpha", lambda: (torch.randn(4, 2, 3), torch.ones(3, dtype=torch.int32)), {},
     TypeError, "alpha"),
    ("bool alpha", lambda: (torch.randn(4, 2, 3), True), {}, TypeError, "alpha"),
    ("nan alpha", lambda: (torch.randn(4, 2, 3), float("nan")), {}, ValueError,
     "alpha must be finite"),
    ("mixed", lambda: (torch.randn(4, 2, 3, dtype=torch.float64), torch.rand(3)), {},
     TypeError, "alpha has dtype torch.float32 but x has dtype torch.float64"),
    ("device", lambda: (torch.randn(4, 2, 3), torch.rand(3, device="meta")), {}, ValueError,
     "alpha is on meta"),
    ("T = 0", lambda: (torch.randn(0, 2, 3), torch.rand(3)), {}, ValueError, "T = 0"),
    ("T = 0 batch first", lambda: (torch.randn(2, 0, 3), torch.rand(3)),
     {"batch_first": True}, ValueError, "T = 0"),
    ("v_th", lambda: (torch.randn(4, 2, 3), torch.rand(3)), {"v_th": -1.0}, ValueError, "v_th"),
    ("v_th zero", lambda: (torch.randn(4, 2, 3), torch.rand(3)), {"v_th": 0.0}, ValueError,
     "v_th"),
    ("gamma", lambda: (torch.randn(4, 2, 3), torch.rand(3)), {"gamma": -2.0}, ValueError,
     "gamma"),
    ("gamma nan", lambda: (torch.randn(4, 2, 3), torch.rand(3)), {"gamma": float("nan")},
     ValueError, "gamma"),
    ("state shape", lambda: (torch.randn(4, 2, 3), torch.rand(3)),
     {"state": (torch.zeros(2, 4), torch.zeros(2, 3))}, ValueError, "state[0]"),
    ("state dtype", lambda: (torch.randn(4, 2, 3), torch.rand(3)),
     {"state": (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64))}, TypeError,
     "state[1]"),
    ("state arity", lambda: (torch.randn(4, 2, 3), torch.rand(3)),
     {"state": (torch.zeros(2, 3),)}, TypeError, "state"),
    ("backend", lambda: (torch.randn(4, 2, 3), torch.rand(3)), {"backend": "fast"}, ValueError,
     "backend must be one of"),
]


@pytest.mark.parametrize("case", PLIF_BAD, ids=[c[0] for c in PLIF_BAD])
def test_plif_bad_input(no_compute, case):
    _, make, kwargs, exc, message = case
    x, alpha = make()
    with pytest.raises(exc, match=__import__("re").escape(message)):
        nk.plif(x, alpha, **kwargs)


def _replace(index, value):
    def make():
        args = gru_args()
        args[index] = value
        return args
    return make


GRU_BAD = [
    ("rank", _replace(0, torch.randn(4, 3)), {}, ValueError, "rank 3"),
    ("input size", _replace(1, torch.randn(15, 4)), {}, ValueError, "input size"),
    ("hidden in weight_ih", _replace(1, torch.randn(12, 3)), {}, ValueError, "weight_ih"),
    ("weight_hh not 3H x H", _replace(2, torch.randn(15, 4)), {}, ValueError, "weight_hh"),
    ("bias", _replace(3, torch.randn(12)), {}, ValueError, "bias_ih"),
    ("alpha", _replace(5, torch.rand(4)), {}, ValueError, "alpha"),
    ("int x", _replace(0, torch.ones(4, 2, 3, dtype=torch.int64)), {}, TypeError, "x"),
    ("float8 W", _replace(1, torch.randn(15, 3).to(torch.float8_e5m2)), {}, TypeError,
     "weight_ih must be a floating-point"),
    ("mixed", _replace(2, torch.randn(15, 5, dtype=torch.float64)), {}, TypeError, "weight_hh"),
    ("device", _replace(1, torch.randn(15, 3, device="meta")), {}, ValueError, "weight_ih"),
    ("T = 0", _replace(0, torch.randn(0, 2, 3)), {}, ValueError, "T = 0"),
    ("gamma", gru_args, {"gamma": -1.0}, ValueError, "gamma"),
    ("v_th", gru_args, {"v_th": -1.0}, ValueError, "v_th"),
    ("state", gru_args, {"state": tuple(torch.zeros(2, 4) for _ in range(3))}, ValueError,
     "state[0]"),
    ("backend", gru_args, {"backend": "gpu"}, ValueError, "backend"),
]


@pytest.mark.parametrize("case", GRU_BAD, ids=[c[0] for c in GRU_BAD])
def test_spikgru2plus_bad_input(no_compute, case):
    _, make, kwargs, exc, message = case
    with pytest.raises(exc, match=__import__("re").escape(message)):
        nk.spikgru2plus(*make(), **kwargs)


@pytest.mark.parametrize("op", [nk.spike, nk.signed_spike])
def test_activation_bad_input(no_compute, op):
    with pytest.raises(TypeError, match="x must be a floating-point"):
        op(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="gamma"):
        op(torch.ones(3), gamma=0.0)
    with pytest.raises(ValueError, match="v_th"):
        op(torch.ones(3), v_th=-0.5)
    with pytest.raises(ValueError, match="backend"):
        op(torch.ones(3), backend="Triton")


def test_module_bad_state():
    model = nk.nn.SpikGRU2Plus(3, 4, num_layers=2)
    with pytest.raises(ValueError, match=r"state v must have shape \[2, 5, 4\]"):
        model(torch.randn(6, 5, 3), tuple(torch.zeros(1, 5, 4) for _ in range(3)))
    with pytest.raises(ValueError, match="input must be"):
        model(torch.randn(6, 5, 3, 1))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        model([[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="hidden_size"):
        nk.nn.SpikGRU2Plus(3, 0)
    with pytest.raises(ValueError, match="leak"):
        nk.nn.PLIF(3, leak="exp")


def test_backends_report():
    table = nk.backends()
    assert set(table) == set(nk_backends.OPS)
    for op, per_device in table.items():
        assert set(per_device) == {"cpu", "cuda"}
        for device, per_backend in per_device.items():
            assert set(per_backend) == set(nk_backends.BACKENDS)
            assert per_backend["reference"].available
            for name, status in per_backend.items():
                assert status.available or status.reason, (op, device, name)
    assert not table["plif"]["cpu"]["cuda"].available
    assert "CUDA tensors only" in str(table["plif"]["cpu"]["cuda"])


def test_unavailable_backend_raises_with_reason():
    with pytest.raises(nk.BackendUnavailableError, match="'cuda' cannot run plif on cpu"):
        nk.plif(torch.randn(3, 2, 2), 0.5, backend="cuda")


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("NEUROKERN_BACKEND", "cuda")
    with pytest.raises(nk.BackendUnavailableError):
        nk.spike(torch.randn(3))
    assert nk.spike(torch.randn(3), backend="reference").shape == (3,)  # explicit wins
    monkeypatch.setenv("NEUROKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="NEUROKERN_BACKEND"):
        nk.spike(torch.randn(3))
    monkeypatch.setenv("NEUROKERN_BACKEND", "reference")
    assert nk.spike(torch.randn(3)).shape == (3,)


def test_auto_logs_its_choice_once(monkeypatch, caplog):
    monkeypatch.delenv("NEUROKERN_BACKEND", raising=False)
    monkeypatch.setattr(nk_backends, "_logged_choices", set())
    monkeypatch.setattr(nk_backends, "_resolved", {})  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="neurokern"):
        for _ in range(3):
            nk.plif(torch.randn(3, 2, 2), 0.5)
    records = [r for r in caplog.records if "plif on cpu" in r.getMessage()]
    assert len(records) == 1
    chosen, _ = nk_backends.resolve("plif", "auto", torch.device("cpu"))
    assert f"the {chosen} backend" in records[0].getMessage() or chosen == "reference"


# One module per fused op family, with an input: (make, shape).
MODULES = {
    "PLIF": (lambda: nk.nn.PLIF(3), (4, 2, 3)),
    "Spike": (lambda: nk.nn.Spike(), (3, 4)),
    "SpikGRU2Plus": (lambda: nk.nn.SpikGRU2Plus(5, 8, bidirectional=True), (4, 2, 5)),
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("make,shape", MODULES.values(), ids=MODULES.keys())
def test_compile_fullgraph_as_the_first_call(monkeypatch, caplog, make, shape):
    """torch.compile(fullgraph=True) of a module on `auto` that has never run: tracing resolves
    the backend without logging (dynamo cannot trace a logging call) and without caching it,
    so the first eager call still logs the choice; dynamic=True (the module's v_th and gamma
    symbolic floats) compiles too. Both equal eager."""
    monkeypatch.delenv("NEUROKERN_BACKEND", raising=False)
    monkeypatch.setattr(nk_backends, "_logged_choices", set())
    monkeypatch.setattr(nk_backends, "_resolved", {})  # as in a fresh process
    torch.manual_seed(0)
    model, x = make(), torch.randn(shape)
    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="neurokern"):
            out = _first(compiled(x))
            assert not caplog.records
            torch.testing.assert_close(out, _first(model(x)), rtol=0, atol=0)
        if not dynamic:
            assert len([r for r in caplog.records if "backend" in r.getMessage()]) == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("make,shape", MODULES.values(), ids=MODULES.keys())
def test_double_backward_raises_on_fused_backends(make, shape):
    """A gradient penalty through a fused op (create_graph=True) raises, naming the reference
    backend, rather than treating the gradient as a constant; the reference computes it."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    fused = make().double()
    with pytest.raises(RuntimeError, match='differentiable once only.*backend="reference"'):
        torch.autograd.grad(_first(fused(x)).sum(), x, create_graph=True)
    fused.backend = "reference"
    (g,) = torch.autograd.grad(_first(fused(x)).sum(), x, create_graph=True)
    assert g.requires_grad


def test_auto_warns_when_a_fused_kernel_cannot_run(monkeypatch, caplog):
    """A registered fused kernel that cannot run here makes auto warn, naming the reason."""
    monkeypatch.delenv("NEUROKERN_BACKEND", raising=False)
    monkeypatch.setattr(nk_backends, "_logged_choices", set())
    monkeypatch.setattr(nk_backends, "_resolved", {})  # as in a fresh process
    monkeypatch.setitem(nk_backends._IMPLEMENTATIONS, ("spike", "cpu"), lambda *a, **k: None)
    monkeypatch.setattr(nk_backends, "_extension_status", lambda device: "it is broken")
    with caplog.at_level(logging.INFO, logger="neurokern"):
        nk.spike(torch.randn(3))
    (record,) = [r for r in caplog.records if "spike on cpu" in r.getMessage()]
    assert record.levelno == logging.WARNING and "it is broken" in record.getMessage()


def test_public_names():
    for name in ("spike", "signed_spike", "plif", "spikgru2plus"):
        assert getattr(nk, name) is getattr(nk.functional, name)
    for name in ("PLIF", "IF", "Spike", "SignedSpike", "SpikGRU2Plus", "clamp_leaks_"):
        assert hasattr(nk.nn, name)
    import neurokern.triton_kernels  # noqa: F401  (installed as a subpackage)
