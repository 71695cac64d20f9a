"""Probe (GPU): the per-step recurrent product alone, and the Triton SpikGRU2+ loop ops eager vs
captured in one CUDA graph, at the issue's headline size. Prints a small table."""
import torch, triton.testing
import neurokern as nk
from neurokern.spikgru2plus_ops import spikgru2plus_ops

torch.backends.cuda.matmul.allow_tf32 = False
dev = torch.device("cuda")
B, T, I, H = 32, 90, 512, 1024
def bench(fn):
    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
for dt in (torch.float32, torch.bfloat16):
    s = torch.randint(-1, 2, (B, H), device=dev).to(dt)
    U = torch.randn(3 * H, H, device=dev, dtype=dt) / 32
    out = torch.empty(B, 3 * H, device=dev, dtype=dt)
    print(dt, "mm [32,1024]x[1024,3072]", bench(lambda: torch.mm(s, U.t(), out=out)))
    g = torch.cuda.CUDAGraph()
    torch.mm(s, U.t(), out=out); torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(T):
            torch.mm(s, U.t(), out=out)
    print(dt, "90 x mm in a graph", bench(g.replay))
fwd, bwd = spikgru2plus_ops("triton")
gi = torch.randn(T, B, 3 * H, device=dev)
U = torch.randn(3 * H, H, device=dev) / 32
bh = torch.randn(3 * H, device=dev) * 0.1
alpha = torch.rand(H, device=dev)
args = (gi, U, bh, alpha, None, None, None, 1.0, 10.0, True, True, True)
s_seq, v_seq, i_seq = fwd(*args)
print("fwd eager", bench(lambda: fwd(*args)))
g = torch.cuda.CUDAGraph()
torch.cuda.synchronize()
with torch.cuda.graph(g):
    out_g = fwd(*args)
g.replay(); torch.cuda.synchronize()
print("fwd graph equal", all(torch.equal(a, b) for a, b in zip(out_g, (s_seq, v_seq, i_seq))))
print("fwd graph", bench(g.replay))
grad_s = torch.randn(T, B, H, device=dev)
bargs = (grad_s, None, None, None, gi, U, bh, alpha, s_seq, v_seq, i_seq, None, None, None,
         1.0, 10.0, True, True)
ref = bwd(*bargs)
print("bwd eager", bench(lambda: bwd(*bargs)))
g2 = torch.cuda.CUDAGraph()
torch.cuda.synchronize()
with torch.cuda.graph(g2):
    out_b = bwd(*bargs)
g2.replay(); torch.cuda.synchronize()
print("bwd graph maxdiff", max((a - b).abs().max().item() for a, b in zip(out_b, ref)))
print("bwd graph", bench(g2.replay))
