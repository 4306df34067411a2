"""Weights of models that need not fit in memory: read safetensors layer by layer, write shards.

* :class:`SafetensorsStore` -- the weight store of :func:`orthoopt.pipeline.rotate_streamed` (the
  fixed methods, OptRot, and the data methods (optrot+, kurtosis, dfrot), R1 and every R2.i, equal to
  the in-memory run); peak memory about one layer (``docs/performance.md``).
* :class:`FusedLayers`, :func:`layer_statistics` -- calibration inputs taken one layer at a time
  (:mod:`orthoopt.streaming.statistics`).
* :class:`StreamedFourthPower` -- OptRot's R1 objective read from disk each step; :class:`StreamedBlockSum`
  -- any block-separable data-free objective, read the same way (``orthoopt.methods.summed_by_layer``).
* :class:`DecoderLayout`, :class:`FusedReader` -- the naming (from ``orthoopt.adapters.arch_table``) and norm fusion;
  :class:`SafetensorsCheckpoint` and :class:`ShardedWriter` (from :mod:`orthoopt.models`) the reading and the
  sharded writing underneath.

The phase loop lives in :mod:`orthoopt.pipeline`; this package never imports it.
"""

from orthoopt.models.safetensors_folder import SafetensorsCheckpoint
from orthoopt.streaming.fused import FusedReader
from orthoopt.streaming.layout import DecoderLayout
from orthoopt.streaming.objective import StreamedBlockSum, StreamedFourthPower
from orthoopt.streaming.rotate import SafetensorsStore, peak_rss_mib
from orthoopt.streaming.statistics import FusedLayers, layer_statistics
from orthoopt.models.shards import ShardedWriter

__all__ = [
    "DecoderLayout", "FusedLayers", "FusedReader", "SafetensorsCheckpoint", "SafetensorsStore", "ShardedWriter",
    "StreamedBlockSum", "StreamedFourthPower", "layer_statistics", "peak_rss_mib",
]
