"""SpikGRU2+ benchmark: forward (no grad), backward and forward+backward of every provider side
by side, with peak memory, appended to results/spikgru2plus.csv.

    python benchmarks/bench_spikgru2plus.py         # GPU: the paper's sizes; CPU: B=8, H=256

Providers, one layer one direction: the reference (careful PyTorch: the input product hoisted,
one stacked recurrent product per step), the paper-style loop (per-step nn.Linear calls),
torch.nn.GRU of the same size (cuDNN on a GPU), and neurokern's fused backends available on the
device. On a GPU also the paper's backend: 3 layers, bidirectional, hidden 1024, as modules.
Variable lengths ("varlen" rows; `--lengths` runs only them): one layer of neurokern's fused
backends on a padded batch (every row T steps) against the same batch with row lengths drawn
uniformly in [T/2, T] (`lengths=`), unsorted and sorted longest first (a PackedSequence's
order), and torch.nn.GRU on it padded and packed.
fp32 with TF32 off; on a GPU also bf16: every provider under autocast (the products in bf16;
neurokern's Triton backend keeps its state and gate arithmetic in float32).
"""

import argparse
import os

import torch
from torch.nn import functional as torch_F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import neurokern as nk
from neurokern import reference

import common


def paper_loop(x, weight_ih, weight_hh, bias_ih, bias_hh, alpha, v_th=1.0):
    """The paper's code: per step, one nn.Linear call for the input and one for the state."""
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    v = i = s = x.new_zeros(batch, hidden)
    out = []
    for t in range(steps):
        gi = torch_F.linear(x[t], weight_ih, bias_ih)
        gh = torch_F.linear(s, weight_hh, bias_hh)
        r = torch.sigmoid(gi[:, :hidden] + gh[:, :hidden])
        z = torch.sigmoid(gi[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
        i = alpha * i + gi[:, 2 * hidden:] + gh[:, 2 * hidden:] * r
        v = z * v + (1 - z) * i - v_th * s
        s = reference.signed_spike(v, v_th, 10.0)
        out.append(s)
    return torch.stack(out)


def layer_providers(device, inputs, hidden):
    layer = nk.nn.SpikGRU2Plus(inputs, hidden).to(device)
    params = [p.detach().requires_grad_() for p in layer.layer_parameters(0, 0)]
    gru = torch.nn.GRU(inputs, hidden).to(device)
    out = {
        "reference (careful PyTorch)": lambda x: nk.spikgru2plus(x, *params,
                                                                 backend="reference")[0],
        "paper loop (nn.Linear)": lambda x: paper_loop(x, *params),
        "torch.nn.GRU" + (" (cuDNN)" if device.type == "cuda" else ""): lambda x: gru(x)[0],
    }
    for backend in common.fused_backends("spikgru2plus", device):
        out[f"neurokern {backend}"] = (
            lambda x, b=backend: nk.spikgru2plus(x, *params, backend=b)[0])
    return out, params + list(gru.parameters())


def stack_providers(device, inputs, hidden, layers):
    gru = torch.nn.GRU(inputs, hidden, layers, bidirectional=True, dropout=0.2).to(device)
    out = {"torch.nn.GRU" + (" (cuDNN)" if device.type == "cuda" else ""): lambda x: gru(x)[0]}
    leaves = list(gru.parameters())
    for backend in ["reference"] + common.fused_backends("spikgru2plus", device):
        model = nk.nn.SpikGRU2Plus(inputs, hidden, layers, bidirectional=True, dropout=0.2,
                                   backend=backend).to(device)
        leaves += list(model.parameters())
        out[f"neurokern {backend}"] = lambda x, m=model: m(x)[0]
        if backend == "triton":  # the same stack with the two directions run one after the
            # other (as before the two-direction loop): what the combined launch saves
            out["neurokern triton, directions in turn"] = (
                lambda x, m=model: directions_in_turn(m, x))
    return out, leaves


def varlen_providers(device, inputs, hidden, steps, batch):
    layer = nk.nn.SpikGRU2Plus(inputs, hidden).to(device)
    params = [p.detach().requires_grad_() for p in layer.layer_parameters(0, 0)]
    gru = torch.nn.GRU(inputs, hidden).to(device)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(steps // 2, steps + 1, (batch,), generator=gen)  # [B] on the CPU
    ordered = lengths.sort(descending=True).values
    print(f"  lengths {lengths.tolist()}: {lengths.sum().item() / (steps * batch):.0%} of the "
          f"padded batch's steps", flush=True)
    out = {}
    for backend in common.fused_backends("spikgru2plus", device):
        for tag, rows in (("padded", None), ("lengths in [T/2, T]", lengths),
                          ("lengths in [T/2, T] sorted", ordered)):
            out[f"neurokern {backend}, {tag}"] = (
                lambda x, b=backend, rows=rows: nk.spikgru2plus(x, *params, lengths=rows,
                                                                backend=b)[0])
    out["torch.nn.GRU, padded"] = lambda x: gru(x)[0]
    out["torch.nn.GRU, packed"] = lambda x: pad_packed_sequence(
        gru(pack_padded_sequence(x, lengths, enforce_sorted=False))[0], total_length=steps)[0]
    return out, params + list(gru.parameters())


def directions_in_turn(model, x):
    """`model`'s forward (training mode, dropout between layers) with each bidirectional layer
    run as two one-direction calls of its backend."""
    def layer(*args, **kwargs):
        return nk.spikgru2plus(*args, backend=model.backend, **kwargs)

    for k in range(model.num_layers):
        x, _ = reference.spikgru2plus_bidirectional(
            x, model.layer_parameters(k, 0), model.layer_parameters(k, 1), layer=layer)
        if k < model.num_layers - 1:
            x = torch_F.dropout(x, model.dropout, training=model.training)
    return x


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-slow", action="store_true",
                        help="time the Python loops in forward+backward only")
    parser.add_argument("--quick", action="store_true",
                        help="GPU: the headline layer and the 3-layer stack only")
    parser.add_argument("--split-products", action="store_true",
                        help="only the 3-layer stack on neurokern's GPU backends, with the "
                             "products of the spike inputs as split bf16 products "
                             "(NEUROKERN_SPLIT_PRODUCTS=1)")
    parser.add_argument("--lengths", action="store_true",
                        help="only the variable-length case (padded against lengths in "
                             "[T/2, T], unsorted and sorted)")
    args = parser.parse_args(argv)
    previous = os.environ.get("NEUROKERN_SPLIT_PRODUCTS")
    if args.split_products:
        os.environ["NEUROKERN_SPLIT_PRODUCTS"] = "1"
    try:
        run(args)
    finally:  # leave the environment as it was (benchmarks/main.py runs more after this)
        if previous is None:
            os.environ.pop("NEUROKERN_SPLIT_PRODUCTS", None)
        else:
            os.environ["NEUROKERN_SPLIT_PRODUCTS"] = previous


def run(args):
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"SpikGRU2+ on {common.device_name(device)}, torch {common.versions()[0]}")
    if gpu:
        cases = [("layer", 32, 90, 512, 1024, 1), ("stack", 32, 90, 512, 1024, 3)]
        if not args.quick:
            cases += [("layer", b, 90, 512, h, 1) for b, h in ((8, 1024), (64, 1024), (32, 512))]
        cases.append(("varlen", 32, 90, 512, 1024, 1))
        dtypes = [torch.float32, torch.bfloat16]
    else:
        cases = [("layer", 8, 90, 256, 256, 1), ("varlen", 16, 90, 256, 256, 1)]
        dtypes = [torch.float32]
    if args.lengths:
        cases, dtypes = [c for c in cases if c[0] == "varlen"], [torch.float32]
    if args.split_products:  # the switch acts on the stack's float32 products only
        cases, dtypes = [c for c in cases if c[0] == "stack"], [torch.float32]
    results = common.Results("spikgru2plus", device)
    for kind, batch, steps, inputs, hidden, layers in cases:
        for dtype in dtypes:
            label = f"{kind} L{layers} B{batch} T{steps} I{inputs} H{hidden}"
            print(f"{label} {str(dtype)[6:]}", flush=True)
            if kind == "layer":
                providers, leaves = layer_providers(device, inputs, hidden)
            elif kind == "varlen":
                providers, leaves = varlen_providers(device, inputs, hidden, steps, batch)
            else:
                providers, leaves = stack_providers(device, inputs, hidden, layers)
            x = torch.randn(steps, batch, inputs, device=device, requires_grad=True)
            for name, fn in providers.items():
                if args.split_products:  # neurokern's GPU backends only
                    if name not in ("neurokern triton", "neurokern cuda"):
                        continue
                    name += " (split products)"
                slow = "loop" in name or "reference" in name
                modes = ("fwd+bwd",) if slow and args.skip_slow else (
                    "forward", "backward", "fwd+bwd")
                def run(fn=fn, autocast=dtype != torch.float32):
                    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                        return fn(x)

                try:
                    timings = common.time_modes(run, [x, *leaves], device, modes)
                except Exception as exc:  # a provider refusing a case: say so, go on
                    print(f"  {name:<22} failed: {exc!r}", flush=True)
                    continue
                for mode, (ms, q20, q80, peak) in timings.items():
                    results.add(op="spikgru2plus", provider=name, size=label,
                                dtype=str(dtype)[6:], mode=mode, ms=ms, q20_ms=q20, q80_ms=q80,
                                peak_mb=peak)
    results.save()


if __name__ == "__main__":
    main()
