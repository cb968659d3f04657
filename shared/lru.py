"""The byte-capacity LRU used on both sides of the mirrored feature cache.

Both sides must evict the same keys given the same operations, so the rule lives here once:
`put` inserts as most recent and evicts least recent entries until the total fits; an entry
larger than the whole capacity is not stored at all (and evicts nothing); `touch` refreshes.
"""

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

import torch

V = TypeVar("V")


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """An item's size in the feature cache, computed the same way on both sides."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class SizedLRU(Generic[V]):
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()  # key -> (value, size)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> Iterator[str]:
        """Least recent first."""
        return iter(self._entries)

    def peek(self, key: str) -> V | None:
        """The value without refreshing it (None when absent)."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def touch(self, key: str) -> V | None:
        """Marks the entry most recent; returns its value (None when absent)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: V, size_bytes: int) -> list[str]:
        """Inserts (or replaces) as most recent; returns the keys evicted to make room."""
        if key in self._entries:
            self.used_bytes -= self._entries.pop(key)[1]
        if size_bytes > self.capacity_bytes:
            return []  # never fits: not cached, on both sides alike
        evicted = []
        while self.used_bytes + size_bytes > self.capacity_bytes:
            old_key, (_, old_size) = self._entries.popitem(last=False)
            self.used_bytes -= old_size
            evicted.append(old_key)
        self._entries[key] = (value, size_bytes)
        self.used_bytes += size_bytes
        return evicted

    def clear(self) -> None:
        self._entries.clear()
        self.used_bytes = 0
