"""Rotate checkpoints that do not fit in memory: read safetensors layer by layer, write shards.

* :func:`rotate_streamed` -- OptRot (R1 and every R2.i) on a model folder, equal to the in-memory
  ``rotate_model(model, "optrot", ...)``; peak memory about one layer (``docs/performance.md``).
* :class:`StreamedFourthPower` -- the R1 objective read from disk each step.
* :class:`SafetensorsCheckpoint`, :class:`DecoderLayout`, :class:`FusedReader`, :class:`ShardedWriter`
  -- the reading, naming (from ``orthoopt.adapters.archs``), norm fusion and sharded writing underneath.
"""

from orthoopt.streaming.checkpoint import SafetensorsCheckpoint
from orthoopt.streaming.fused import FusedReader
from orthoopt.streaming.layout import DecoderLayout
from orthoopt.streaming.objective import StreamedFourthPower
from orthoopt.streaming.rotate import STREAMED_METHODS, peak_rss_mib, rotate_streamed
from orthoopt.streaming.shards import ShardedWriter

__all__ = [
    "STREAMED_METHODS", "DecoderLayout", "FusedReader", "SafetensorsCheckpoint", "ShardedWriter",
    "StreamedFourthPower", "peak_rss_mib", "rotate_streamed",
]
