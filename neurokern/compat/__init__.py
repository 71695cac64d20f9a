"""Drop-in neurons for SpikingJelly and snnTorch code, computed by `neurokern.functional.plif`.

- `neurokern.compat.spikingjelly`: `IFNode`, `LIFNode`, `ParametricLIFNode`
  (docs/compat-spikingjelly.md).
- `neurokern.compat.snntorch`: `Leaky` (docs/compat-snntorch.md).
- `neurokern.compat.surrogate`: the surrogate gradients they accept, for code without the
  libraries installed.

Each module translates the library's constructor arguments into `plif`'s keyword arguments
once, at construction, and refuses (ValueError naming the argument) what the fused neuron
cannot compute exactly. Neither library is needed to import them.
"""
