"""Variable-length sequences in SpikGRU2+ (`lengths=` of the functional ops, PackedSequence in
nn.SpikGRU2Plus), on every backend: every sequence of a packed batch equals running it alone
(outputs, final states, gradients of the parameters, the input and the initial state; float64),
and the rest of nn.GRU's contract (hx=, all_weights, constructor errors, TorchScript)."""

import itertools
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import (
    PackedSequence, pack_padded_sequence, pack_sequence, pad_packed_sequence,
)

import neurokern as nk
from conftest import backend_device, fused_backends

f64 = torch.float64
BACKENDS = [pytest.param("reference", id="reference")] + fused_backends("spikgru2plus")
# the Triton interpreter takes seconds per example: fewer random draws there
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@st.composite
def packed_cases(draw):
    steps = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 4))
    return dict(
        # lengths 1 and equal lengths come up often; the longest need not be T of the others
        lengths=draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch)),
        inputs=draw(st.integers(1, 5)),
        hidden=draw(st.sampled_from([1, 3, 8, 13])),
        layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()),
        bias=draw(st.booleans()),
        signed=draw(st.booleans()),
        reset_gate=draw(st.booleans()),
        spiking=draw(st.booleans()),
        state=draw(st.booleans()),
        enforce_sorted=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


_BASE = dict(lengths=[4, 1, 6, 4], inputs=3, hidden=13, layers=2, bidirectional=True, bias=True,
             signed=True, reset_gate=True, spiking=True, state=True, enforce_sorted=False, seed=1)
EXAMPLES = [
    _BASE,
    dict(_BASE, lengths=[6, 4, 4, 1], enforce_sorted=True, spiking=False, state=False, seed=2),
    dict(_BASE, lengths=[3, 3, 3], layers=1, bidirectional=False, bias=False, seed=3),
    dict(_BASE, lengths=[1], hidden=3, signed=False, reset_gate=False, seed=4),
]


def with_examples(test):
    for case in EXAMPLES:
        test = example(case=case)(test)
    return test


def make_model(case, backend, device):
    """A float64 SpikGRU2Plus in eval mode (dropout 0.3 between layers, inactive), weights at 3x
    nn.GRU's scale so that neurons spike."""
    model = nk.nn.SpikGRU2Plus(
        case["inputs"], case["hidden"], case["layers"], bias=case["bias"],
        dropout=0.3 if case["layers"] > 1 else 0.0, bidirectional=case["bidirectional"],
        signed=case["signed"], reset_gate=case["reset_gate"], spiking=case["spiking"],
        backend=backend, device=device, dtype=f64)
    gen = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            values = (torch.rand(p.shape, generator=gen, dtype=f64) if name.startswith("alpha")
                      else 3 * case["hidden"] ** -0.5
                      * (2 * torch.rand(p.shape, generator=gen, dtype=f64) - 1))
            p.copy_(values)
    return model.eval()


def dot(a, b):
    return (a * b).sum()


def check_packed_equals_alone(case, backend, device):
    model = make_model(case, backend, device)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    rand = lambda *shape: torch.randn(shape, generator=gen, dtype=f64).to(device)  # noqa: E731
    lengths, batch = case["lengths"], len(case["lengths"])
    if case["enforce_sorted"]:
        lengths = sorted(lengths, reverse=True)
    width = case["hidden"] * (2 if case["bidirectional"] else 1)
    rows = case["layers"] * (2 if case["bidirectional"] else 1)
    seqs = [(2 * rand(n, case["inputs"])).requires_grad_() for n in lengths]
    hx = (tuple(rand(rows, batch, case["hidden"]).requires_grad_() for _ in range(3))
          if case["state"] else None)
    out_cot = [rand(n, width) for n in lengths]
    state_cot = [rand(rows, batch, case["hidden"]) for _ in range(3)]
    params = list(model.parameters())

    packed = pack_sequence(seqs, enforce_sorted=case["enforce_sorted"])
    out, final = model(packed, hx=hx)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    padded, _ = pad_packed_sequence(out)  # [T, B, D * H], the original batch order
    loss = sum(dot(padded[:n, b], c) for b, (n, c) in enumerate(zip(lengths, out_cot)))
    loss = loss + sum(dot(f, c) for f, c in zip(final, state_cot))
    leaves = params + seqs + list(hx or ())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)

    param_grads = [torch.zeros_like(p) for p in params]
    for b, n in enumerate(lengths):
        hx_b = None if hx is None else tuple(t[:, b:b + 1] for t in hx)
        out_b, final_b = model(seqs[b].unsqueeze(1), hx_b)  # [n, 1, D * H]
        torch.testing.assert_close(padded[:n, b], out_b[:, 0], rtol=1e-9, atol=1e-9,
                                   msg=f"output of sequence {b}")
        for name, f, f_b in zip("vis", final, final_b):
            torch.testing.assert_close(f[:, b], f_b[:, 0], rtol=1e-9, atol=1e-9,
                                       msg=f"final {name} of sequence {b}")
        loss_b = dot(out_b[:, 0], out_cot[b]) + sum(
            dot(f_b[:, 0], c[:, b]) for f_b, c in zip(final_b, state_cot))
        leaves_b = params + [seqs[b]] + ([] if hx is None else list(hx))
        grads_b = torch.autograd.grad(loss_b, leaves_b, allow_unused=True)
        for k, g in enumerate(grads_b[:len(params)]):
            param_grads[k] += 0 if g is None else g
        torch.testing.assert_close(grads[len(params) + b], grads_b[len(params)], rtol=1e-9,
                                   atol=1e-9, msg=f"input gradient of sequence {b}")
        if hx is not None:
            for k, name in enumerate("vis"):
                torch.testing.assert_close(
                    grads[len(params) + batch + k][:, b], grads_b[len(params) + 1 + k][:, b],
                    rtol=1e-9, atol=1e-9, msg=f"gradient of initial {name} of sequence {b}")
    for (name, _), g, g_sum in zip(model.named_parameters(), grads, param_grads):
        torch.testing.assert_close(0 if g is None else g, g_sum, rtol=1e-9, atol=1e-9,
                                   msg=f"gradient of {name}")


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
@given(case=packed_cases())
@with_examples
def test_packed_batch_equals_each_sequence_alone(backend, case):
    check_packed_equals_alone(case, backend, backend_device(backend))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "triton"])
@settings(max_examples=6 if INTERPRETED else 25)
@given(case=packed_cases())
@with_examples
def test_packed_batch_equals_each_sequence_alone_triton(backend, case):
    check_packed_equals_alone(case, backend, backend_device(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_functional_lengths_zero_outputs_and_match_reference(backend, bidirectional, batch_first):
    """`lengths=` of the functional ops: the spikes past each row's length are 0 and every
    backend equals the reference (forward and every gradient, incoming gradients nonzero past
    the lengths too); a row of length 0 keeps its initial state."""
    device = backend_device(backend)
    torch.manual_seed(5)
    steps, batch, inputs, hidden = 5, 4, 3, 6
    lengths = torch.tensor([2, 5, 0, 1])
    shape = (batch, steps, inputs) if batch_first else (steps, batch, inputs)
    directions = 2 if bidirectional else 1
    k = 3 * hidden ** -0.5

    def direction():
        return [k * (2 * torch.rand(3 * hidden, inputs, dtype=f64) - 1),
                k * (2 * torch.rand(3 * hidden, hidden, dtype=f64) - 1),
                torch.randn(3 * hidden, dtype=f64), torch.randn(3 * hidden, dtype=f64),
                torch.rand(hidden, dtype=f64)]

    leaves = [2 * torch.randn(shape, dtype=f64)] + sum((direction() for _ in range(directions)),
                                                       [])
    state_shape = (2, batch, hidden) if bidirectional else (batch, hidden)
    leaves += [torch.randn(state_shape, dtype=f64) for _ in range(3)]
    leaves = [t.to(device).requires_grad_() for t in leaves]

    def run(name):
        x, params, state = leaves[0], leaves[1:1 + 5 * directions], tuple(leaves[-3:])
        if bidirectional:
            return nk.functional.spikgru2plus_bidirectional(
                x, params[:5], params[5:], state=state, batch_first=batch_first,
                lengths=lengths.to(device), spiking=False, backend=name)
        return nk.functional.spikgru2plus(x, *params, state=state, batch_first=batch_first,
                                          lengths=lengths, spiking=False, backend=name)

    ref_out, ref_final = run("reference")
    out, final = run(backend)
    s = out.transpose(0, 1) if batch_first else out  # [T, B, D * H]
    past = torch.arange(steps).unsqueeze(1) >= lengths.unsqueeze(0)  # [T, B]
    assert (s[past.to(device)] == 0).all()
    v0 = leaves[-3]
    torch.testing.assert_close(final[0][..., 2, :], v0[..., 2, :], rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    for a, b in zip(final, ref_final):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    cot = [torch.randn_like(out)] + [torch.randn_like(f) for f in final]
    grads = torch.autograd.grad([out, *final], leaves, cot)
    ref_grads = torch.autograd.grad([ref_out, *ref_final], leaves, cot)
    for n, (a, b) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of leaf {n}")


LENGTHS_BAD = [
    ("list", [2, 2], TypeError, "lengths must be a torch.Tensor"),
    ("float", torch.tensor([2.0, 2.0]), TypeError, "integer tensor"),
    ("shape", torch.tensor([2, 2, 2]), ValueError, r"lengths must have shape \[2\]"),
    ("too long", torch.tensor([2, 5]), ValueError, r"\[0, T\] = \[0, 4\]"),
    ("negative", torch.tensor([-1, 2]), ValueError, r"\[0, T\]"),
]


@pytest.mark.parametrize("case", LENGTHS_BAD, ids=[c[0] for c in LENGTHS_BAD])
def test_bad_lengths(case):
    _, lengths, error, match = case
    x, w_ih, w_hh, b_ih, b_hh, alpha = (torch.randn(4, 2, 3), torch.randn(15, 3),
                                        torch.randn(15, 5), None, None, torch.rand(5))
    with pytest.raises(error, match=match):
        nk.functional.spikgru2plus(x, w_ih, w_hh, b_ih, b_hh, alpha, lengths=lengths)


# ---------------------------------------------------------------------------------------------
# The rest of nn.GRU's contract
# ---------------------------------------------------------------------------------------------


# The error inputs of nn.GRU's ModuleInfo (module_error_inputs_torch_nn_RNN_GRU in torch's
# testing/_internal/common_modules.py, which needs the test-only package expecttest):
# constructor arguments, the forward input (or None) and the exception class.
GRU_ERRORS = [
    ((10, 0, 1), {}, None, ValueError),
    ((10, 10, 0), {}, None, ValueError),
    ((3, 5), {}, torch.randn(2, 4, 3, dtype=f64), ValueError),  # input dtype != weights'
    ((3, 5), {"bias": 0}, None, TypeError),
    ((3, 5), {"bias": 1}, None, TypeError),
    ((3, 5), {"bias": "True"}, None, TypeError),
    ((3, 5), {"batch_first": 0}, None, TypeError),
    ((3, 5), {"batch_first": 1}, None, TypeError),
    ((3, 5), {"batch_first": "False"}, None, TypeError),
    ((3.0, 5), {}, None, TypeError),
    (("10", 5), {}, None, TypeError),
    ((0, 5), {}, None, ValueError),
    ((-1, 5), {}, None, ValueError),
    ((3, 5.0), {}, None, TypeError),
]


@pytest.mark.parametrize("module", [torch.nn.GRU, nk.nn.SpikGRU2Plus])
@pytest.mark.parametrize("case", GRU_ERRORS, ids=lambda case: f"{case[0]}-{case[1]}")
def test_module_error_inputs_of_nn_gru(module, case):
    """nn.GRU's ModuleInfo error inputs raise the same exception classes with SpikGRU2Plus (and
    with nn.GRU itself, which keeps the table true to the installed torch)."""
    args, kwargs, forward_input, error = case
    with pytest.raises(error):
        model = module(*args, **kwargs)
        if forward_input is not None:
            model(forward_input)


def test_module_inputs_of_nn_gru_with_packed_sequences():
    """nn.GRU's ModuleInfo samples with packed sequences (module_inputs_torch_nn_RNN_GRU with
    with_packed_sequence) run forward and backward and give a packed output, states in the
    batch's order."""
    for bias, batch_first, bidirectional in itertools.product([False, True], repeat=3):
        for shape, lengths in (((5, 2, 2), [5, 3]), ((5, 5, 2), [5, 3, 3, 2, 2])):
            model = nk.nn.SpikGRU2Plus(2, 2, 2, bias=bias, batch_first=batch_first,
                                       bidirectional=bidirectional, dtype=f64)
            data = torch.randn(shape, dtype=f64)
            packed = pack_padded_sequence(data, torch.tensor(lengths))
            packed.data.requires_grad_()
            out, state = model(packed)
            assert isinstance(out, PackedSequence)
            assert out.data.shape == (sum(lengths), 2 * (1 + bidirectional))
            assert state[0].shape == (2 * (1 + bidirectional), shape[1], 2)
            (out.data.sum() + sum(t.sum() for t in state)).backward()
            assert packed.data.grad is not None


def test_hx_keyword_and_all_weights():
    torch.manual_seed(0)
    model = nk.nn.SpikGRU2Plus(3, 4, 2, bidirectional=True, bias=False)
    gru = torch.nn.GRU(3, 4, 2, bidirectional=True, bias=False)
    assert [[w.shape for w in ws] for ws in model.all_weights] == \
        [[w.shape for w in ws] for ws in gru.all_weights]
    assert model.all_weights[3][1] is model.weight_hh_l1_reverse
    x, state = torch.randn(5, 2, 3), tuple(torch.randn(4, 2, 4) for _ in range(3))
    out, final = model(x, hx=state)
    out_pos, final_pos = model(x, state)
    assert torch.equal(out, out_pos) and all(map(torch.equal, final, final_pos))
    with pytest.raises(TypeError, match="state or as hx, not both"):
        model(x, state, hx=state)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_trace_round_trip_and_script_refused(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nk.nn.SpikGRU2Plus(3, 8, 2, bidirectional=True)
            self.fc = torch.nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    torch.manual_seed(0)
    net = Net().eval()
    x = 3 * torch.randn(6, 2, 3)
    with torch.no_grad():
        traced = torch.jit.trace(net, (x,), check_trace=False)
    torch.jit.save(traced, tmp_path / "net.pt")
    loaded = torch.jit.load(tmp_path / "net.pt")
    other = 3 * torch.randn(6, 2, 3)  # the trace is not a constant of its example
    assert torch.equal(loaded(other), net(other))
    with pytest.raises(RuntimeError, match=r"SpikGRU2Plus does not support torch\.jit\.script"
                                           r".*torch\.compile or torch\.export"):
        torch.jit.script(net)
