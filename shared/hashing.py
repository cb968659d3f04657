"""The one media hash of the runtime, used by the frontend, the feature cache and prefix caching.

Full-width digests everywhere they key anything: a truncated hash could let two different images
share features or KV blocks.
"""

import hashlib
import json
from collections.abc import Sequence

import numpy as np

# What hashlib reads: bytes or any C-contiguous buffer, such as a numpy array of pixels.
Buffer = bytes | bytearray | memoryview | np.ndarray


def hash_media(
    data: Buffer | Sequence[Buffer], processor_kwargs: dict[str, object] | None = None
) -> str:
    """SHA-256 over the raw media bytes (one buffer, or several hashed as their concatenation,
    so a header and an image's pixels need no joined copy) plus the processor kwargs that
    change the tensors."""
    h = hashlib.sha256()
    for part in data if isinstance(data, list | tuple) else [data]:
        h.update(part)  # without the GIL past 2 KB: threads hash images in parallel
    if processor_kwargs:
        h.update(json.dumps(processor_kwargs, sort_keys=True, default=str).encode())
    return h.hexdigest()


def hash_block(
    parent_hash: bytes | None, token_ids: list[int], extra_keys: tuple[object, ...]
) -> bytes:
    """Prefix-cache key of one full KV block: it chains the parent block's key, so equal keys
    mean equal prefixes; `extra_keys` holds the (mm_hash, offset) of media overlapping the block."""
    h = hashlib.sha256()
    h.update(parent_hash or b"\0")
    h.update(json.dumps([token_ids, list(extra_keys)]).encode())
    return h.digest()
