"""The sender side of the mirrored feature cache (DESIGN.md section 3). Frontend process.

Holds mm_hash -> (num_tokens) with the byte size the GPU worker's copy of the tensors takes,
under the same capacity and eviction rule (`SizedLRU`), so it knows which items the GPU worker
holds without asking. Decisions are made at send time, synchronously with the send, so the
order of cache operations here is the order of messages on the one channel to the GPU worker.
"""

from mm_runtime.shared.lru import SizedLRU, tensors_nbytes
from mm_runtime.shared.wire import MMItem


class FeatureCacheMirror:
    def __init__(self, capacity_bytes: int) -> None:
        self.lru: SizedLRU[int] = SizedLRU(capacity_bytes)  # mm_hash -> num_tokens
        self.epoch = 0  # generation; bumped by the GPU worker when it had to reset
        self.hits = 0
        self.misses = 0
        self.tensor_bytes_sent = 0

    def num_tokens(self, mm_hash: str) -> int | None:
        """Placeholder tokens of an item the GPU worker holds (None: not held). No touch."""
        return self.lru.peek(mm_hash)

    def apply(self, items: list[MMItem], num_tokens: list[int]) -> None:
        """Decides hit or miss for each item of a request about to be sent, in order, and
        records the operation: a hit drops the item's tensors (the hash travels alone) and
        refreshes the entry; a miss keeps them and inserts. Every miss must carry tensors."""
        for item, n in zip(items, num_tokens, strict=True):
            if self.lru.touch(item.mm_hash) is not None:
                item.tensors = None
                self.hits += 1
                continue
            assert item.tensors is not None, "a miss must carry its tensors"
            size = tensors_nbytes(item.tensors)
            self.lru.put(item.mm_hash, n, size)
            self.misses += 1
            self.tensor_bytes_sent += size

    def reset(self, epoch: int) -> None:
        """The GPU worker emptied its cache and started generation `epoch`."""
        self.lru.clear()
        self.epoch = epoch
