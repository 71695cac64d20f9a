"""The paper's network (SPEC.md 4): shapes of every variant, parameter and MAC counts against the
paper, the spike loss (eq. 15) by hand, rates and synaptic-operation counts, batch-major flow."""

import copy
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import neurokern.nn as snn
from neurokern import functional as F
from neurokern import models as M

TINY = dict(num_classes=5, input_size=16, num_steps=4, widths=(4, 4, 8, 8), blocks=(1, 1, 1, 1),
            hidden_size=8, num_layers=2)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models gain nothing from two, and on a busy 2-core machine
    OpenMP threads waiting for each other made steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(variant="hybrid", **changes):
    overrides = dict(TINY)
    overrides.update(M.VARIANTS[variant])
    overrides.update(changes)
    return M.ModelConfig(**overrides)


def events(batch, steps, size, density=0.2, seed=0):
    """Event-count frames [B, T, 2, H, W] with a few counts above 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.full((batch, steps, 2, size, size), density), generator=g)


# ---------------------------------------------------------------------------------------------
# Shapes and variants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(M.VARIANTS))
def test_every_variant_runs_forward_and_backward(variant):
    config = tiny_config(variant)
    model = M.LipReadingNet(config)
    x = events(2, 8, 32, density=0.5)    # 32x32: every strided 1x1 shortcut sees spikes
    logits, records = model(x, return_spikes=True)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    names = [r.name for r in records]
    assert names[:2] == ["stem", "pool"] and names[-1] == "fc"
    if variant == "li_fc":
        assert not any(n.startswith("gru") for n in names)
    else:
        assert [n for n in names if n.startswith("gru")] == [
            "gru.0.ff", "gru.0.rec", "gru.1.ff", "gru.1.rec"]
    for r in records:
        assert r.spikes.shape[:2] == (2, 8), r.name
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # Every weight, bias and leak learns: a gradient broken anywhere shows up here.
        assert p.grad.abs().sum() > 0, f"no gradient reached {name}"


@pytest.mark.parametrize("name", M.CONFIGS)
def test_named_configurations(name):
    config = M.get_config(name)
    small = name.startswith("small")
    assert config.widths == ((8, 16, 32, 64) if small else (64, 128, 256, 512))
    variant = name.partition("-")[2] if small else name
    for key, value in M.VARIANTS.get(variant, {}).items():
        assert getattr(config, key) == value


def test_configuration_errors():
    with pytest.raises(ValueError, match="backend"):
        M.ModelConfig(backend="lstm")
    with pytest.raises(ValueError, match="ANN twin"):
        M.ModelConfig(ann=True)                     # the twin needs the nn.GRU backend
    with pytest.raises(ValueError, match="same length"):
        M.ModelConfig(widths=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="unknown configuration"):
        M.get_config("resnet50")
    model = M.LipReadingNet(tiny_config())
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        model(torch.zeros(4, 2, 16, 16))


def test_variant_neurons():
    """Frontend activation and backend kind land in the modules (paper Tables 5, 6)."""
    def neurons(model):
        return [m for m in model.modules() if isinstance(m, (snn.PLIF, snn.IF))]

    hybrid = M.LipReadingNet(tiny_config("hybrid"))
    assert not any(m.signed for m in neurons(hybrid))
    grus = [m for m in hybrid.modules() if isinstance(m, snn.SpikGRU2Plus)]
    assert grus and all(g.signed and g.reset_gate and g.batch_first for g in grus)
    signed = M.LipReadingNet(tiny_config("signed"))
    assert all(m.signed for m in neurons(signed))
    for variant, (sign, gate) in {"spikgru": (False, False), "spikgru2": (False, True),
                                  "spikgru+": (True, False), "binary": (False, True)}.items():
        grus = [m for m in M.LipReadingNet(tiny_config(variant)).modules()
                if isinstance(m, snn.SpikGRU2Plus)]
        assert all((g.signed, g.reset_gate) == (sign, gate) for g in grus), variant
    gru = M.LipReadingNet(tiny_config("gru"))
    assert neurons(gru) and any(isinstance(m, torch.nn.GRU) for m in gru.modules())
    assert all(m.batch_first for m in neurons(hybrid))


def test_ann_twin_has_no_spiking_modules():
    model = M.LipReadingNet(tiny_config("ann"))
    spiking = (snn.PLIF, snn.IF, snn.SpikGRU2Plus, snn.Spike, snn.SignedSpike)
    assert not any(isinstance(m, spiking) for m in model.modules())
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 2 + 2 * 4 + 1
    _, records = model(events(2, 4, 16), return_spikes=True)
    assert all(r.dense for r in records)
    assert M.spike_loss(records, 1.0).item() == 0.0
    assert M.spike_rates(records) == {}


# ---------------------------------------------------------------------------------------------
# Against the paper's numbers
# ---------------------------------------------------------------------------------------------


def test_paper_parameter_count():
    """Paper Table 1: 58.6 M (one decimal, so within 0.05 M). Frontend about 11 M, backend about
    47 M (paper Sec. 4.2)."""
    model = M.LipReadingNet(M.paper_config())
    count = M.count_parameters(model)
    assert abs(count / 1e6 - 58.6) < 0.05, count
    backend = sum(p.numel() for p in model.backend.parameters())
    assert abs(backend / 1e6 - 47.2) < 0.05, backend
    frontend = count - backend - sum(p.numel() for p in model.classifier.parameters())
    assert abs(frontend / 1e6 - 11.2) < 0.05, frontend
    ann = M.count_parameters(M.LipReadingNet(M.get_config("ann")))
    assert abs(ann / 1e6 - 58.6) < 0.05, ann


def test_ann_twin_mac_rate_matches_paper():
    """Paper Table 2 / Sec. 4.2: the ANN runs 29.5 GOPs/s at 75 steps/s, 26.0 in the frontend and
    3.6 in the backend. MACs per step do not depend on T, so two steps suffice. Tolerance 0.05:
    the paper's numbers have one decimal."""
    model = M.LipReadingNet(M.get_config("ann")).eval()
    with torch.no_grad():
        _, records = model(model.example_input(1, 2), return_spikes=True)
    e = M.efficiency(records)
    assert abs(e["ann_gops"] - 29.5) < 0.05, e["ann_gops"]
    assert abs(e["ann_frontend_gops"] - 26.0) < 0.05, e["ann_frontend_gops"]
    assert abs(e["ann_backend_gops"] - 3.6) < 0.05, e["ann_backend_gops"]
    assert e["ops_per_synapse"] == 1.0          # an ANN operates every synapse at every step


# ---------------------------------------------------------------------------------------------
# Spike loss (eq. 15)
# ---------------------------------------------------------------------------------------------


def _record(name, spikes, synapses, **kw):
    kw.setdefault("kind", "linear")
    kw.setdefault("fan_out", 1)
    return M.LayerSpikes(name, kw.pop("source", name + ".src"), spikes, synapses, **kw)


def _eq15_by_hand(records, lam):
    """Eq. 15 for each sample with explicit loops, then the batch mean."""
    chosen = [r for r in records if r.source != "input" and not r.dense]
    total_syn = sum(r.synapses for r in chosen)
    per_sample = []
    for b in range(chosen[0].spikes.shape[0]):
        acc = 0.0
        for r in chosen:
            s = r.spikes[b].detach().double()         # [T, ...]
            steps, neurons = s.shape[0], s[0].numel()
            squares = sum(float((s[t] ** 2).sum()) for t in range(steps))
            acc += squares / (2 * steps * neurons) * r.synapses
        per_sample.append(lam * acc / total_syn)
    return sum(per_sample) / len(per_sample)


def test_spike_loss_hand_made():
    a = torch.tensor([[[1., 0., 1.], [0., 0., 1.]],
                      [[0., 0., 0.], [1., 1., 1.]]])                 # [B=2, T=2, N=3]
    b = torch.tensor([[[-1., 0.], [0., 1.], [1., 1.]],
                      [[0., 0.], [0., 0.], [-1., 0.]]])              # [B=2, T=3, N=2] signed
    records = [_record("x", a, 30), _record("y", b, 10),
               _record("stem", torch.full((2, 2, 4), 3.0), 1000, source="input"),  # not spikes
               _record("ann", torch.rand(2, 2, 5), 500, dense=True)]            # not spikes
    # sum_t ||s_t||^2 / (2 T N): sample 0: a 3 / 12, b 4 / 12; sample 1: a 3 / 12, b 1 / 12
    expected = 7.0 * ((3 / 12 * 30 + 4 / 12 * 10) / 40 + (3 / 12 * 30 + 1 / 12 * 10) / 40) / 2
    assert M.spike_loss(records, 7.0).item() == pytest.approx(expected, rel=1e-6)
    assert M.spike_loss(records, 7.0).item() == pytest.approx(_eq15_by_hand(records, 7.0))


def test_spike_loss_of_the_model_by_hand_and_gradient():
    model = M.LipReadingNet(tiny_config())
    logits, records = model(events(2, 5, 16, density=0.5), return_spikes=True)
    loss = M.spike_loss(records, 3.0)
    assert loss.item() == pytest.approx(_eq15_by_hand(records, 3.0), rel=1e-5)
    assert loss.item() > 0
    loss.backward()
    assert model.stem_neuron.alpha.grad.abs().sum() > 0   # the loss reaches the first neurons
    assert model.stem_conv.weight.grad.abs().sum() > 0


def test_recurrent_record_holds_the_previous_step():
    model = M.LipReadingNet(tiny_config(num_layers=1))
    _, records = model(events(2, 6, 16, density=0.8), return_spikes=True)
    by_name = {r.name: r for r in records}
    out = by_name["fc"].spikes                       # [B, T, 2H]: the layer's output
    rec = by_name["gru.0.rec"].spikes
    h = 8
    assert torch.equal(rec[:, 0, :h], torch.zeros(2, h))
    assert torch.equal(rec[:, 1:, :h], out[:, :-1, :h])          # forward: step t sees t-1
    assert torch.equal(rec[:, -1, h:], torch.zeros(2, h))
    assert torch.equal(rec[:, :-1, h:], out[:, 1:, h:])          # reverse: step t sees t+1
    assert by_name["gru.0.rec"].synapses == 2 * 3 * h * h
    assert by_name["gru.0.ff"].synapses == 2 * 3 * h * 8


# ---------------------------------------------------------------------------------------------
# Rates and synaptic operations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["hybrid", "signed", "li_fc"])
def test_rates_and_ops_per_synapse_bounds(variant):
    model = M.LipReadingNet(tiny_config(variant))
    with torch.no_grad():
        _, records = model(events(3, 6, 16, density=1.0), return_spikes=True)
    rates = M.spike_rates(records)
    expected_groups = {"stem", "pool", "avgpool"} | {
        f"layer{i}.0.neuron{j}" for i in range(1, 5) for j in (1, 2)}
    assert expected_groups <= set(rates)
    assert all(0.0 <= v <= 1.0 for v in rates.values()), rates
    e = M.efficiency(records)
    for name, layer in e["layers"].items():
        if name != "stem":                      # the stem's input is event counts, not spikes
            assert 0.0 <= layer["ops_per_synapse"] <= 1.0, (name, layer)
    assert e["gops"] == pytest.approx(e["frontend_gops"] + e["backend_gops"])
    assert e["spike_rates"] == pytest.approx(rates)


def test_synaptic_ops_count_fan_out_exactly():
    conv = torch.nn.Conv2d(3, 5, 3, 1, 1, bias=False)
    spikes = torch.zeros(1, 1, 3, 4, 4)
    spikes[0, 0, 1, 0, 0] = 1.0                      # a corner spike reaches 2x2 outputs
    spikes[0, 0, 2, 1, 2] = -1.0                     # an inner one all 3x3
    r = M._conv_record("c", "src", spikes, conv, (4, 4), False)
    assert r.synapses == 4 * 4 * 5 * 3 * 9
    assert M.efficiency([r])["layers"]["c"]["ops_per_step"] == (4 + 9) * 5

    strided = torch.nn.Conv2d(3, 5, 3, 2, 1, bias=False)  # 4x4 -> 2x2; (0, 0) reaches 1 output
    r = M._conv_record("s", "src", spikes, strided, (2, 2), False)
    assert M.efficiency([r])["layers"]["s"]["ops_per_step"] == (1 + 2) * 5

    full = torch.ones(2, 3, 3, 6, 6)                  # every input spiking, no padding:
    valid = torch.nn.Conv2d(3, 4, 3, 1, 0, bias=False)  # every synapse works once per step
    r = M._conv_record("v", "src", full, valid, (4, 4), False)
    assert M.efficiency([r])["layers"]["v"]["ops_per_synapse"] == 1.0

    linear = _record("l", torch.tensor([[[1., 0., -1.]], [[0., 0., 0.]]]), 3 * 7, fan_out=7)
    assert M.efficiency([linear])["layers"]["l"]["ops_per_step"] == 2 * 7 / 2


def test_efficiency_meter_accumulates_batches():
    model = M.LipReadingNet(tiny_config()).eval()
    x = events(4, 5, 16, density=0.7)
    with torch.no_grad():
        _, whole = model(x, return_spikes=True)
        meter = M.EfficiencyMeter()
        for part in x.split(2):
            meter.update(model(part, return_spikes=True)[1])
    expected, got = M.efficiency(whole), meter.summary()
    assert got["ops_per_synapse"] == pytest.approx(expected["ops_per_synapse"], rel=1e-6)
    assert got["gops"] == pytest.approx(expected["gops"], rel=1e-6)
    assert got["spike_rates"] == pytest.approx(expected["spike_rates"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Batch-major flow
# ---------------------------------------------------------------------------------------------


class _LayoutCalls(TorchFunctionMode):
    """Records permute / transpose calls made directly from neurokern/models.py."""

    NAMES = {"permute", "transpose", "transpose_", "t", "movedim", "moveaxis", "swapaxes",
             "swapdims", "mT", "contiguous"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            caller = sys._getframe(1).f_code.co_filename
            if caller.replace("\\", "/").endswith("neurokern/models.py"):
                self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_no_transposes_through_the_network():
    model = M.LipReadingNet(tiny_config())
    with _LayoutCalls() as mode:
        model(events(2, 4, 16), return_spikes=True)
    # Only around the stem's Conv3d: the input in, the output back (made contiguous once).
    assert mode.calls == ["permute", "permute", "contiguous"]


def test_batch_major_equals_a_time_major_run():
    """The frontend run batch-major equals the same layers run time-major (`[T, B, ...]`
    neurons, convolutions on the `[T*B, ...]` view), so nothing in the batch-major path mixes
    up the batch and time axes."""
    torch.manual_seed(1)
    model = M.LipReadingNet(tiny_config()).eval()
    x = events(3, 5, 16, density=0.6)
    with torch.no_grad():
        _, records = model(x, return_spikes=True)
        features = {r.name: r.spikes for r in records}["gru.0.ff"]        # [B, T, C]

        twin = copy.deepcopy(model)
        for m in twin.modules():
            if isinstance(m, (snn.PLIF, snn.IF)):
                m.batch_first = False
        h = twin.stem_bn(twin.stem_conv(x.permute(0, 2, 1, 3, 4)))         # [B, C, T, H, W]
        s = twin.stem_neuron(h.permute(2, 0, 1, 3, 4).contiguous())       # [T, B, C, H, W]
        steps, batch = s.shape[:2]
        s = twin.pool_neuron(twin.pool(s.flatten(0, 1)).unflatten(0, (steps, batch)))
        for blocks in twin.stages:
            for block in blocks:
                s = block(s)                                                # layout-agnostic
        p = twin.avgpool(s.flatten(0, 1)).flatten(1).unflatten(0, (steps, batch))
        time_major = twin.avgpool_neuron(p)                                 # [T, B, C]
    assert torch.equal(time_major.transpose(0, 1), features)

    # And one neuron directly: batch-major PLIF == time-major PLIF on the transposed input.
    current = torch.randn(3, 5, 4, 6, 6) * 2
    alpha = torch.rand(4)
    bf = F.plif(current, alpha, batch_first=True)
    tm = F.plif(current.transpose(0, 1).contiguous(), alpha)
    assert torch.equal(bf, tm.transpose(0, 1))


# ---------------------------------------------------------------------------------------------
# Leaky-integrator FC baseline and leak clamping
# ---------------------------------------------------------------------------------------------


def test_leaky_integrator_fc_equation():
    layer = M.LeakyIntegratorFC(3, 2)
    with torch.no_grad():
        layer.alpha.copy_(torch.tensor([0.5, 0.8]))
        layer.beta.copy_(torch.tensor([0.9, 0.0]))
    x = torch.randn(2, 4, 3)
    u = layer(x)
    drive = layer.linear(x)
    c = torch.zeros(2, 2)
    v = torch.zeros(2, 2)
    for t in range(4):
        c = layer.beta * c + drive[:, t]
        v = layer.alpha * v + (1 - layer.alpha) * c
        assert torch.allclose(u[:, t], v, atol=1e-6)


def test_clamp_leaks_covers_every_leak():
    model = M.LipReadingNet(tiny_config("li_fc"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "beta")) or ".alpha_" in name:
                p.fill_(1.7)
    snn.clamp_leaks_(model)
    leaks = [p for n, p in model.named_parameters() if n.endswith(("alpha", "beta"))]
    assert len(leaks) == 1 + 2 * 4 + 2
    assert all(bool((p <= 1.0).all()) for p in leaks)
    model = M.LipReadingNet(tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.fill_(-0.5)
    snn.clamp_leaks_(model)
    assert all(bool((p >= 0.0).all()) for n, p in model.named_parameters() if "alpha" in n)
    assert model.backend.layers[0].alpha_l0.detach().min().item() == 0.0
