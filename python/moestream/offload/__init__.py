"""Weight streaming: run models far larger than device memory (or RAM).

- ``offload(model, ...)``: stream the repeated blocks of an in-memory model from host memory or disk;
- ``load_offloaded(checkpoint_dir, ...)``: build the model empty and stream a safetensors checkpoint in place;
- ``save_layered`` / ``load_layered``: a per-block safetensors layout written atomically.

The engine (pinned pool, copy stream and events, reader threads) is ``moestream._C.Streamer``.
"""

from .checkpoint import load_layered, load_offloaded, save_layered
from .core import OffloadState, find_blocks, fmt_bytes, get_state, offload, offload_stats, parse_bytes

__all__ = [
    "OffloadState",
    "find_blocks",
    "fmt_bytes",
    "get_state",
    "load_layered",
    "load_offloaded",
    "offload",
    "offload_stats",
    "parse_bytes",
    "save_layered",
]
