"""The receiver side of the mirrored feature cache (DESIGN.md section 3). GPU worker process.

Holds mm_hash -> the item's tensors (CPU memory) under the frontend mirror's capacity and
eviction rule, applying the operations each `AddRequest` carries strictly in arrival order. On
arrival every item of a request is resolved to its tensors, which the request then holds, so a
later eviction cannot take features from an accepted request.

A hit for a hash this side lacks is a bug or a restart: it never guesses. The request fails with
`FeatureCacheMiss`, this side empties its cache and starts a new generation (epoch), and the
frontend is told to empty its mirror. Until the frontend's messages carry the new epoch, their
cache operations are not applied here (their misses still serve their own request), so both
sides start the new generation empty.
"""

import torch

from mm_runtime.shared.errors import FeatureCacheMiss
from mm_runtime.shared.lru import SizedLRU, tensors_nbytes
from mm_runtime.shared.wire import MMItem


class FeatureCacheReceiver:
    def __init__(self, capacity_bytes: int) -> None:
        self.lru: SizedLRU[dict[str, torch.Tensor]] = SizedLRU(capacity_bytes)
        self.epoch = 0
        self.hits = 0
        self.misses = 0
        self.num_resets = 0

    def resolve(self, items: list[MMItem], epoch: int) -> None:
        """Fills every item's tensors, applying its cache operation when `epoch` is current.
        Raises `FeatureCacheMiss` when a hit cannot be served; when `epoch` was current, the
        cache was reset first (a new `self.epoch`, for the caller to tell the frontend)."""
        current = epoch == self.epoch
        for item in items:
            if item.tensors is not None:  # a miss: the tensors travelled
                self.misses += 1
                if current:
                    self.lru.put(item.mm_hash, item.tensors, tensors_nbytes(item.tensors))
                continue
            tensors = self.lru.touch(item.mm_hash) if current else None
            if tensors is None:
                if current:
                    self.reset()
                raise FeatureCacheMiss(
                    f"the GPU worker does not hold the features of media item {item.mm_hash[:16]}"
                    "... (feature cache out of sync); the cache was reset, retry the request"
                )
            item.tensors = tensors
            self.hits += 1

    def reset(self) -> None:
        self.lru.clear()
        self.epoch += 1
        self.num_resets += 1
