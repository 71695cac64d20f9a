"""neurokern: fused GPU and CPU kernels for spiking neural networks (PLIF, SpikGRU2+).

    import neurokern
    s = neurokern.plif(x, alpha)                 # [T, B, C, ...] -> spikes
    gru = neurokern.nn.SpikGRU2Plus(512, 1024, num_layers=3, bidirectional=True)
    neurokern.backends()                         # what runs where on this machine
"""

from neurokern import dispatch, functional, nn, reference
# Register the fused kernels with the dispatcher.
from neurokern import plif_ops, spike_ops, spikgru2plus_ops  # noqa: F401
from neurokern._kernels import clear_cuda_graphs
from neurokern.dispatch import BackendUnavailableError, backends
from neurokern.functional import (
    plif, signed_spike, spike, spikgru2plus, spikgru2plus_bidirectional,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "backends",
    "clear_cuda_graphs",
    "dispatch",
    "functional",
    "nn",
    "plif",
    "reference",
    "signed_spike",
    "spike",
    "spikgru2plus",
    "spikgru2plus_bidirectional",
]
