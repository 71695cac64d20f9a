"""The paper's lip-reading network (SPEC.md 4), its variants, spike loss and efficiency count.

    from neurokern import models
    model = models.LipReadingNet(models.paper_config())      # hybrid SNN, 58.6 M parameters
    logits = model(frames)                                   # [B, T, 2, 88, 88] -> [B, 100]
    logits, records = model(frames, return_spikes=True)      # + the spikes entering each layer
    loss = cross_entropy(logits, y) + models.spike_loss(records, lam)      # paper eq. 15
    models.efficiency(records)                               # OPs/syn, GOPs/s (paper Table 2)

The network runs batch-major from end to end: spiking neurons take `[B, T, C, ...]`
(`batch_first=True`) and convolutions see the free `[B * T, C, H, W]` view of it. Only the stem's
Conv3d, which convolves over time, needs `[B, C, T, H, W]`: the input is permuted once before it
and its output once back.

Neurons come from `neurokern.nn` (`PLIF`, `IF`, `SpikGRU2Plus`), so the model runs on whichever
backend those select; nothing here names one.
"""

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as torch_F

import neurokern.nn as snn

__all__ = [
    "BACKENDS",
    "CONFIGS",
    "VARIANTS",
    "SAMPLE_SECONDS",
    "STEPS_PER_SECOND",
    "ModelConfig",
    "LipReadingNet",
    "BasicBlock",
    "RecurrentBackend",
    "LeakyIntegratorFC",
    "LayerSpikes",
    "EfficiencyMeter",
    "paper_config",
    "small_config",
    "get_config",
    "count_parameters",
    "spike_loss",
    "spike_rates",
    "efficiency",
]

# backend kind -> (signed spikes, reset gate) for the SpikGRU family (paper Table 5)
_SPIKGRU = {
    "spikgru": (False, False),
    "spikgru2": (False, True),
    "spikgru+": (True, False),
    "spikgru2+": (True, True),
}
BACKENDS = tuple(_SPIKGRU) + ("gru", "li_fc")

SAMPLE_SECONDS = 1.2  # a DVS-Lip sample: 30 frames of 40 ms (paper Sec. 3.3)
STEPS_PER_SECOND = 90 / SAMPLE_SECONDS  # 75: the paper's T = 90 bins (at other T: T / 1.2 s)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes a `LipReadingNet`. Defaults: the paper's hybrid SNN (SPEC.md 4).

    Attributes:
        num_classes: words (100 for DVS-Lip).
        in_channels: event polarities (2).
        input_size: H = W of the frames the model is meant for (88); the model accepts any size,
            this is what `example_input` builds.
        num_steps: time steps T the model is trained with (90); the model accepts any T.
        widths: channels of the four ResNet stages (the stem has `widths[0]`).
        blocks: basic blocks per stage.
        stem_kernel, stem_stride, stem_padding: the stem Conv3d over (T, H, W).
        hidden_size, num_layers, bidirectional: the recurrent backend.
        frontend_dropout: after the frontend (0.5); gru_dropout: between recurrent layers (0.2);
            backend_dropout: before the classifier (0.5).
        frontend_signed: `signed_spike` in the frontend neurons instead of `spike`.
        backend: "spikgru", "spikgru2", "spikgru+", "spikgru2+" (SPEC.md 3), "gru" (the ANN
            `nn.GRU`), or "li_fc" (the stateful-synapse leaky-integrator FC baseline, Table 5).
        ann: the ANN twin: ReLU instead of every spiking neuron; requires backend "gru".
        alpha_init, v_th, gamma: neuron leak initial value, threshold and surrogate sharpness.
    """

    num_classes: int = 100
    in_channels: int = 2
    input_size: int = 88
    num_steps: int = 90
    widths: Tuple[int, ...] = (64, 128, 256, 512)
    blocks: Tuple[int, ...] = (2, 2, 2, 2)
    stem_kernel: Tuple[int, int, int] = (5, 7, 7)
    stem_stride: Tuple[int, int, int] = (1, 2, 2)
    stem_padding: Tuple[int, int, int] = (2, 3, 3)
    hidden_size: int = 1024
    num_layers: int = 3
    bidirectional: bool = True
    frontend_dropout: float = 0.5
    gru_dropout: float = 0.2
    backend_dropout: float = 0.5
    frontend_signed: bool = False
    backend: str = "spikgru2+"
    ann: bool = False
    alpha_init: float = 0.9
    v_th: float = 1.0
    gamma: float = 10.0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.ann and self.backend != "gru":
            raise ValueError(f"the ANN twin (ann=True) needs backend='gru', got {self.backend!r}")
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(f"widths {self.widths} and blocks {self.blocks} must be non-empty "
                             "and of the same length (one entry per stage)")
        for name in ("num_classes", "in_channels", "input_size", "num_steps", "hidden_size",
                     "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(w < 1 for w in self.widths) or any(b < 1 for b in self.blocks):
            raise ValueError(f"widths and blocks must be positive, got {self.widths}, "
                             f"{self.blocks}")
        for name in ("frontend_dropout", "gru_dropout", "backend_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def spiking(self):
        return not self.ann

    def replace(self, **changes):
        """A copy with some fields changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)


def paper_config(**changes):
    """The paper's best model: hybrid SNN (spike frontend, SpikGRU2+ backend), 58.6 M parameters."""
    return ModelConfig(**changes)


def small_config(**changes):
    """A configuration that trains on a 2-core CPU in minutes: widths 8-16-32-64, one block per
    stage, a stride-4 stem (88x88 frames -> 22x22, then 11, 6, 3, 2), one bidirectional
    SpikGRU2+ layer of 64 units, T = 16."""
    base = dict(
        num_classes=10, num_steps=16, widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1),
        stem_stride=(1, 4, 4), hidden_size=64, num_layers=1,
    )
    base.update(changes)
    return ModelConfig(**base)


# The paper's table rows as changes to a base configuration.
VARIANTS: Dict[str, Dict] = {
    "hybrid": {},                                                  # Tables 1, 2, 5, 6 (best)
    "signed": {"frontend_signed": True},                           # Table 6 "Signed SNN"
    "binary": {"backend": "spikgru2"},                             # Table 6 "SNN"
    "spikgru": {"backend": "spikgru"},                             # Table 5 rows
    "spikgru2": {"backend": "spikgru2"},
    "spikgru+": {"backend": "spikgru+"},
    "spikgru2+": {"backend": "spikgru2+"},
    "gru": {"backend": "gru"},                                     # SNN frontend + ANN GRU
    "li_fc": {"backend": "li_fc"},                                 # Table 5 "FC (as [3])"
    "ann": {"ann": True, "backend": "gru"},                        # the ANN twin (Tables 1, 2)
}

CONFIGS = ("paper", "small") + tuple(VARIANTS) + tuple(f"small-{v}" for v in VARIANTS)


def get_config(name, **changes):
    """A named configuration: "paper", "small", a variant ("hybrid", "signed", "binary",
    "spikgru", "spikgru2", "spikgru+", "spikgru2+", "gru", "li_fc", "ann") at paper size, or
    "small-<variant>" at small size. Keyword arguments override fields."""
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose one of {CONFIGS}")
    base, _, variant = name.partition("-")
    if base not in ("paper", "small"):
        base, variant = "paper", base
    overrides = dict(VARIANTS[variant or "hybrid"])
    overrides.update(changes)
    return small_config(**overrides) if base == "small" else paper_config(**overrides)


# ---------------------------------------------------------------------------------------------
# Spike records
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerSpikes:
    """What enters one synaptic layer during a forward pass.

    Attributes:
        name: the layer ("stem", "layer2.0.conv1", "gru.1.rec", "fc", ...).
        source: the neuron group that emitted `spikes` ("input" for the event frames).
        spikes: `[B, T, ...]` the values reaching the layer's synapses at each step: spikes,
            event counts for the stem, or real activations for ANN layers (`dense`). For a
            recurrent record, step t holds the layer's own output of its previous step (zero at
            its first step), in the layer's processing order.
        synapses: connections per time step, fan-in x outputs (the MACs of one step of the
            equivalent ANN layer).
        kind: "conv3d", "conv2d", "pool" (average pooling, depthwise) or "linear".
        fan_out: for "linear", synapses per input neuron; for convolutions and pooling, output
            channels each input position reaches (1 for pooling).
        kernel, stride, padding: geometry of "conv3d" / "conv2d" / "pool".
        dense: real-valued input (ANN layer): every synapse operates at every step.
        recurrent: the input is the layer's own previous output.
        part: "frontend" or "backend".
    """

    name: str
    source: str
    spikes: torch.Tensor
    synapses: int
    kind: str
    fan_out: int
    kernel: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = ()
    padding: Tuple[int, ...] = ()
    dense: bool = False
    recurrent: bool = False
    part: str = "frontend"


def _conv_record(name, source, spikes, conv, out_shape, dense, *, kind="conv2d"):
    # out_shape: the conv output's spatial shape; synapses = outputs x fan-in per step
    outputs = math.prod(out_shape) * conv.out_channels
    fan_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return LayerSpikes(name, source, spikes, outputs * fan_in, kind, conv.out_channels,
                       tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), dense)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _init_conv(conv, ann):
    """The paper's public code: ANN convs Kaiming normal (fan-out, as torchvision's ResNet), SNN
    convs U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), larger than PyTorch's default so that the
    first spikes come early in training."""
    if ann:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    else:
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(6.0 / fan_in)
        nn.init.uniform_(conv.weight, -bound, bound)


class _Neurons:
    """Makes the frontend's neurons for a configuration: PLIF (learnable leak per channel) and IF
    for pooling, or ReLU for both in the ANN twin. All batch-major."""

    def __init__(self, config):
        self.config = config

    def plif(self, channels):
        c = self.config
        if c.ann:
            return nn.ReLU()
        return snn.PLIF(channels, alpha_init=c.alpha_init, v_th=c.v_th, gamma=c.gamma,
                        signed=c.frontend_signed, batch_first=True)

    def integrate_and_fire(self):
        c = self.config
        if c.ann:
            return nn.ReLU()
        return snn.IF(v_th=c.v_th, gamma=c.gamma, signed=c.frontend_signed, batch_first=True)


class BasicBlock(nn.Module):
    """Spiking ResNet basic block (paper Fig. 5): conv3x3-BN-PLIF, conv3x3-BN, + shortcut (the
    input spikes, or conv1x1(stride)-BN of them), PLIF. Input and output `[B, T, C, H, W]`."""

    def __init__(self, in_channels, out_channels, stride, neurons):
        super().__init__()
        ann = neurons.config.ann
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.neuron1 = neurons.plif(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)
            self.bn3 = nn.BatchNorm2d(out_channels)
        for conv in (self.conv1, self.conv2, self.downsample):
            if conv is not None:
                _init_conv(conv, ann)
        self.neuron2 = neurons.plif(out_channels)

    def forward(self, s, records=None, name="", source="", dense=False):
        batch, steps = s.shape[:2]
        x = s.flatten(0, 1)                                  # [B*T, C, H, W], a view
        h = self.bn1(self.conv1(x))                          # [B*T, C', H', W']
        s1 = self.neuron1(h.unflatten(0, (batch, steps)))    # [B, T, C', H', W']
        h = self.bn2(self.conv2(s1.flatten(0, 1)))
        shortcut = x if self.downsample is None else self.bn3(self.downsample(x))
        out = self.neuron2((h + shortcut).unflatten(0, (batch, steps)))
        if records is not None:
            spatial = h.shape[-2:]
            records.append(_conv_record(f"{name}.conv1", source, s, self.conv1, spatial, dense))
            records.append(_conv_record(f"{name}.conv2", f"{name}.neuron1", s1, self.conv2,
                                        spatial, dense))
            if self.downsample is not None:
                records.append(_conv_record(f"{name}.downsample", source, s, self.downsample,
                                            spatial, dense))
        return out


class LeakyIntegratorFC(nn.Module):
    """Fully connected layer with stateful synapses feeding leaky integrators (the FC backend of
    Spiking MSTP, paper Table 5; SPEC.md 4). Non-spiking:

        c_t = beta * c_{t-1} + W x_t + b,   u_t = alpha * u_{t-1} + (1 - alpha) * c_t

    with learnable per-unit leaks `beta`, `alpha` `[out_features]` (initial `alpha_init`),
    clamped into [0, 1] by `clamp_leaks_`. Input `[B, T, in_features]`, output `u`
    `[B, T, out_features]`. Zero initial state.
    """

    def __init__(self, in_features, out_features, alpha_init=0.9):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.alpha = nn.Parameter(torch.full((out_features,), float(alpha_init)))
        self.beta = nn.Parameter(torch.full((out_features,), float(alpha_init)))

    def forward(self, x):
        drive = self.linear(x)                     # [B, T, O], all steps in one product
        c = torch.zeros_like(drive[:, 0])          # [B, O]
        u = torch.zeros_like(c)
        outputs = []
        for drive_t in drive.unbind(1):
            c = self.beta * c + drive_t
            u = self.alpha * u + (1.0 - self.alpha) * c
            outputs.append(u)
        return torch.stack(outputs, 1)             # [B, T, O]

    @torch.no_grad()
    def clamp_leaks_(self):
        self.alpha.clamp_(0.0, 1.0)
        self.beta.clamp_(0.0, 1.0)
        return self


class RecurrentBackend(nn.Module):
    """A stack of bidirectional recurrent layers, batch-first, with dropout between layers.

    One single-layer module per layer (`neurokern.nn.SpikGRU2Plus` or `nn.GRU`), so the spikes
    between layers, which the spike loss and the efficiency count need, come out of the one
    forward pass; the computation equals the `num_layers` module of `nn.GRU`'s stacking.
    Input `[B, T, I]`, output `[B, T, D * H]`.
    """

    def __init__(self, config, input_size):
        super().__init__()
        c = config
        self.kind, self.hidden_size, self.dropout = c.backend, c.hidden_size, c.gru_dropout
        self.directions = 2 if c.bidirectional else 1
        self.gates = 3 if c.backend == "gru" or _SPIKGRU[c.backend][1] else 2
        self.layers = nn.ModuleList()
        for layer in range(c.num_layers):
            size = input_size if layer == 0 else c.hidden_size * self.directions
            if c.backend == "gru":
                module = nn.GRU(size, c.hidden_size, batch_first=True,
                                bidirectional=c.bidirectional)
            else:
                signed, reset_gate = _SPIKGRU[c.backend]
                module = snn.SpikGRU2Plus(
                    size, c.hidden_size, batch_first=True, bidirectional=c.bidirectional,
                    signed=signed, reset_gate=reset_gate, alpha_init=c.alpha_init, v_th=c.v_th,
                    gamma=c.gamma)
            self.layers.append(module)

    def forward(self, x, records=None, source="", input_dense=False, seen=None):
        """`x` `[B, T, I]` -> `[B, T, D*H]`. With `records`, appends each layer's feed-forward
        and recurrent inputs; `seen` is `x` before the caller's dropout (records hold what the
        neurons emitted, not the dropout mask)."""
        dense = self.kind == "gru"
        hidden, directions = self.hidden_size, self.directions
        seen = x if seen is None else seen
        for index, layer in enumerate(self.layers):
            if index > 0 and self.dropout > 0:
                x = torch_F.dropout(x, self.dropout, self.training)
            if dense:
                out, _ = layer(x)                                 # [B, T, D*H]
            else:  # the layers after the first read spikes through dropout
                out, _ = layer(x, spike_input=index > 0 and snn.spike_input_after_dropout(
                    layer.spiking, self.dropout, self.training))
            if records is not None:
                name = f"gru.{index}"
                fan_out = directions * self.gates * hidden
                records.append(LayerSpikes(
                    f"{name}.ff", source, seen, fan_out * seen.shape[-1], "linear", fan_out,
                    dense=input_dense if index == 0 else dense, part="backend"))
                records.append(LayerSpikes(
                    f"{name}.rec", name, _previous_step(out, hidden, directions),
                    directions * self.gates * hidden * hidden, "linear", self.gates * hidden,
                    dense=dense, recurrent=True, part="backend"))
                source = name
            seen = x = out
        return x


def _previous_step(out, hidden, directions):
    """`[B, T, D*H]` outputs -> what each direction's recurrent synapses see at each step: the
    forward half shifted one step later, the reverse half one step earlier, zeros at the first
    processed step."""
    zeros = out.new_zeros(out.shape[0], 1, hidden)
    parts = [torch.cat([zeros, out[:, :-1, :hidden]], 1)]
    if directions == 2:
        parts.append(torch.cat([out[:, 1:, hidden:], zeros], 1))
    return torch.cat(parts, 2)


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class LipReadingNet(nn.Module):
    """Spiking ResNet-18 frontend + recurrent backend + per-step classifier (SPEC.md 4, Fig. 4).

    forward(x, return_spikes=False)
        x: event frames `[B, T, in_channels, H, W]` (batch-major; T and H, W free).
        returns logits `[B, num_classes]` (the per-step classifier outputs averaged over time),
        or `(logits, records)` with `return_spikes`: a list of `LayerSpikes`, one per synaptic
        layer in forward order, holding the tensors of this same pass (no extra computation
        beyond the recurrent-input shift).
    """

    def __init__(self, config: Optional[ModelConfig] = None, **changes):
        super().__init__()
        config = config or paper_config()
        self.config = c = config.replace(**changes) if changes else config
        neurons = _Neurons(c)
        self.stem_conv = nn.Conv3d(c.in_channels, c.widths[0], c.stem_kernel, c.stem_stride,
                                   c.stem_padding, bias=False)
        _init_conv(self.stem_conv, c.ann)
        self.stem_bn = nn.BatchNorm3d(c.widths[0])
        self.stem_neuron = neurons.plif(c.widths[0])
        self.pool = nn.AvgPool2d(3, 2, 1)
        self.pool_neuron = neurons.integrate_and_fire()
        self.stages = nn.ModuleList()
        channels = c.widths[0]
        for stage, (width, count) in enumerate(zip(c.widths, c.blocks)):
            blocks = nn.ModuleList()
            for b in range(count):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, neurons))
                channels = width
            self.stages.append(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.avgpool_neuron = neurons.integrate_and_fire()
        self.features = channels
        self.frontend_dropout = nn.Dropout(c.frontend_dropout)
        self.backend_dropout = nn.Dropout(c.backend_dropout)
        if c.backend == "li_fc":
            self.backend = None
            self.classifier = LeakyIntegratorFC(channels, c.num_classes, c.alpha_init)
        else:
            self.backend = RecurrentBackend(c, channels)
            directions = 2 if c.bidirectional else 1
            self.classifier = nn.Linear(directions * c.hidden_size, c.num_classes)

    def example_input(self, batch=1, steps=None, device=None):
        """Zeros `[batch, steps, in_channels, input_size, input_size]` (steps: `num_steps`)."""
        c = self.config
        steps = c.num_steps if steps is None else steps
        return torch.zeros(batch, steps, c.in_channels, c.input_size, c.input_size, device=device)

    def forward(self, x, return_spikes=False):
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be event frames [B, T, C, H, W], got {got}")
        if x.shape[2] != self.config.in_channels:
            raise ValueError(f"x has {x.shape[2]} channels (dim 2), the model expects "
                             f"{self.config.in_channels}")
        records = [] if return_spikes else None
        dense = self.config.ann
        batch, steps = x.shape[:2]

        # Stem: Conv3d over (T, H, W) needs [B, C, T, H, W]; one permute in, one back.
        h = self.stem_bn(self.stem_conv(x.permute(0, 2, 1, 3, 4)))   # [B, C0, T, H1, W1]
        h = h.permute(0, 2, 1, 3, 4).contiguous()                      # [B, T, C0, H1, W1]
        s = self.stem_neuron(h)
        if records is not None:
            records.append(_conv_record("stem", "input", x, self.stem_conv, h.shape[-2:],
                                        dense, kind="conv3d"))

        p = self.pool(s.flatten(0, 1))                                 # [B*T, C0, H2, W2]
        if records is not None:
            outputs = math.prod(p.shape[1:])
            records.append(LayerSpikes("pool", "stem", s, outputs * 9, "pool", 1, (3, 3),
                                       (2, 2), (1, 1), dense))
        s = self.pool_neuron(p.unflatten(0, (batch, steps)))          # [B, T, C0, H2, W2]
        source = "pool"
        for stage, blocks in enumerate(self.stages):
            for b, block in enumerate(blocks):
                name = f"layer{stage + 1}.{b}"
                s = block(s, records, name, source, dense)
                source = f"{name}.neuron2"

        p = self.avgpool(s.flatten(0, 1))                              # [B*T, C, 1, 1]
        if records is not None:
            records.append(LayerSpikes("avgpool", source, s, math.prod(s.shape[2:]), "linear",
                                       1, dense=dense))
        s = self.avgpool_neuron(p.flatten(1).unflatten(0, (batch, steps)))  # [B, T, C]

        x = self.frontend_dropout(s)
        source = "avgpool"
        if self.backend is not None:
            x = self.backend(x, records, source, input_dense=dense, seen=s)
            source = f"gru.{len(self.backend.layers) - 1}"
            classifier_input = x
        else:
            classifier_input = s
        if records is not None:
            fan_out = self.config.num_classes
            records.append(LayerSpikes(
                "fc", source, classifier_input, fan_out * classifier_input.shape[-1], "linear",
                fan_out, dense=dense or self.config.backend == "gru", part="backend"))
        out = self.classifier(self.backend_dropout(x))                 # [B, T, classes]
        logits = out.mean(1)                                           # [B, classes]
        return (logits, records) if return_spikes else logits


def count_parameters(model, trainable_only=True):
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
# ---------------------------------------------------------------------------------------------
# Spike loss (paper eq. 15) and spike rates (Fig. 7)
# ---------------------------------------------------------------------------------------------


def _loss_records(records):
    # Spikes of neurons only: the event frames are data (no gradient), ANN activations are not
    # spikes.
    return [r for r in records if r.source != "input" and not r.dense]


def spike_loss(records, lam):
    """Paper eq. 15, averaged over the batch:

        lam * sum_l [ (1 / (2 T N_l)) sum_t ||s_in_t^l||^2 * Syn_l ] / sum_l Syn_l

    over the layers whose input is neuron spikes (`records` from `model(x, return_spikes=True)`;
    the stem's event input and ANN layers are left out). `N_l` is the number of input neurons,
    `Syn_l` the synapse count. Returns a 0-d tensor (zero if no layer qualifies)."""
    chosen = _loss_records(records)
    if not chosen:
        return torch.zeros(())
    total = sum(r.synapses for r in chosen)
    loss = sum(0.5 * r.spikes.square().mean() * (r.synapses / total) for r in chosen)
    return lam * loss


@torch.no_grad()
def spike_rates(records) -> "OrderedDict[str, float]":
    """Average spikes per neuron per step (counting -1 spikes too) of every spiking neuron group,
    in forward order: `{source: rate}`. The paper's Fig. 7."""
    return OrderedDict((k, s.abs().mean().item()) for k, s in _rate_inputs(records).items())


def _rate_inputs(records):
    """`{neuron group: its output spikes}`, each group once, from the first feed-forward layer
    that reads it (recurrent records hold a shifted copy that misses one step)."""
    groups = OrderedDict()
    for r in records:
        if r.source != "input" and not r.dense and not r.recurrent and r.source not in groups:
            groups[r.source] = r.spikes
    return groups


@torch.no_grad()
def _synaptic_ops(r):
    """Synaptic operations of one record summed over batch and steps: every nonzero input
    counted |value| times (events, signed spikes) for each synapse it reaches."""
    if r.dense:
        return float(r.synapses) * r.spikes.shape[0] * r.spikes.shape[1]
    a = r.spikes.abs()
    if r.kind == "linear":
        return a.sum().item() * r.fan_out
    # Exact fan-out at borders and with strides: convolve the channel-summed activity with a
    # ones kernel of the layer's geometry.
    if r.kind == "conv3d":
        a = a.sum(2).unsqueeze(1)                         # [B, 1, T, H, W]
        ones = a.new_ones((1, 1) + r.kernel)
        reached = torch_F.conv3d(a, ones, stride=r.stride, padding=r.padding)
    else:
        a = a.sum(2).flatten(0, 1).unsqueeze(1)           # [B*T, 1, H, W]
        ones = a.new_ones((1, 1) + r.kernel)
        reached = torch_F.conv2d(a, ones, stride=r.stride, padding=r.padding)
    return reached.sum().item() * r.fan_out


class EfficiencyMeter:
    """Accumulates, over forward passes, what the paper's Table 2 and Fig. 7 report.

        meter = EfficiencyMeter()
        for x, _ in loader:
            _, records = model(x, return_spikes=True)
            meter.update(records)
        meter.summary()

    Synaptic operations per synapse per step (OPs/syn) is the number of operations the spikes
    trigger (each spike counted once per synapse it reaches) divided by the number of synapses
    (connections per step, i.e. the ANN's MACs); GOPs/s is operations per step x 75 steps/s.
    Layers with real-valued input (ANN) count one operation per synapse per step.
    """

    def __init__(self, steps_per_second=STEPS_PER_SECOND):
        self.steps_per_second = steps_per_second
        self.layers: "OrderedDict[str, Dict]" = OrderedDict()
        self.rates: "OrderedDict[str, List[float]]" = OrderedDict()

    @torch.no_grad()
    def update(self, records):
        for r in records:
            entry = self.layers.setdefault(r.name, dict(
                synapses=r.synapses, ops=0.0, sample_steps=0, part=r.part, kind=r.kind,
                dense=r.dense, source=r.source))
            entry["ops"] += _synaptic_ops(r)
            entry["sample_steps"] += r.spikes.shape[0] * r.spikes.shape[1]
        for source, rate_input in _rate_inputs(records).items():
            total, count = self.rates.get(source, (0.0, 0))
            self.rates[source] = (total + rate_input.abs().sum().item(),
                                  count + rate_input.numel())

    def spike_rates(self):
        """`{neuron group: spikes per neuron per step}` over everything seen."""
        return OrderedDict((k, total / count) for k, (total, count) in self.rates.items())

    def summary(self):
        """Per layer and total: synapses, operations per step, OPs/syn; GOPs/s at the steps
        rate (total, frontend, backend); the MAC rate of an ANN with the same layers
        (`ann_gops`, `ann_frontend_gops`, `ann_backend_gops`: one MAC per synapse per step,
        pooling excluded, as the paper's 29.5 = 26.0 + 3.6 GOPs/s); spike rates per neuron
        group."""
        layers = OrderedDict()
        total_syn = total_ops = 0.0
        parts = {"frontend": 0.0, "backend": 0.0}
        macs = {"frontend": 0.0, "backend": 0.0}
        for name, e in self.layers.items():
            ops = e["ops"] / max(e["sample_steps"], 1)
            layers[name] = dict(synapses=e["synapses"], ops_per_step=ops,
                                ops_per_synapse=ops / e["synapses"], part=e["part"])
            total_syn += e["synapses"]
            total_ops += ops
            parts[e["part"]] += ops
            if e["kind"] != "pool":
                macs[e["part"]] += e["synapses"]
        g = self.steps_per_second / 1e9
        return dict(
            layers=layers,
            synapses=total_syn,
            ops_per_step=total_ops,
            ops_per_synapse=total_ops / total_syn if total_syn else 0.0,
            gops=total_ops * g,
            frontend_gops=parts["frontend"] * g,
            backend_gops=parts["backend"] * g,
            ann_gops=(macs["frontend"] + macs["backend"]) * g,
            ann_frontend_gops=macs["frontend"] * g,
            ann_backend_gops=macs["backend"] * g,
            spike_rates=self.spike_rates(),
        )


def efficiency(records, steps_per_second=STEPS_PER_SECOND):
    """`EfficiencyMeter.summary()` of one forward pass's records."""
    meter = EfficiencyMeter(steps_per_second)
    meter.update(records)
    return meter.summary()
