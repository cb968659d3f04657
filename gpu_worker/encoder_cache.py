"""Encoder outputs kept on the device, keyed by media hash. GPU worker.

An item is encoded once, whole, even when its placeholder spans several prefill chunks; each chunk
slices the rows it needs from here. Like vLLM V1's `EncoderCacheManager`
(vllm/v1/core/encoder_cache_manager.py), but holding the tensors too, and keeping unreferenced
entries for reuse by later requests with the same media until their space is needed.
"""

from collections import OrderedDict

import torch


class EncoderCache:
    """mm_hash -> embeddings [num_tokens, hidden], with a budget in tokens.

    Invariants:
    - An entry referenced by a request that still needs it (`refs[mm_hash]` non-empty) is never
      evicted; the scheduler checks `can_allocate` before planning an encode, then `put` fits.
    - Unreferenced entries sit in `freeable`, oldest first; a hit revives one (`acquire`), and
      `put` evicts from the oldest end only as much as it needs.
    - `num_used_tokens` = sum over entries, `num_freeable_tokens` = sum over `freeable`, both
      <= `capacity_tokens`.
    """

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.entries: dict[str, torch.Tensor] = {}  # mm_hash -> embeddings [num_tokens, hidden]
        self.refs: dict[str, set[str]] = {}  # mm_hash -> req_ids still needing it (every entry)
        self.req_to_hashes: dict[str, set[str]] = {}  # req_id -> mm_hashes it references
        self.freeable: OrderedDict[str, int] = OrderedDict()  # mm_hash -> num_tokens, LRU first
        self.num_used_tokens = 0
        self.num_freeable_tokens = 0
        # Cumulative, for mm_runtime_encoder_cache_{hits,misses}_total.
        self.hits = 0
        self.misses = 0

    @property
    def num_free_tokens(self) -> int:
        """Tokens not taken by any entry (evictable entries not counted as free)."""
        return self.capacity_tokens - self.num_used_tokens

    def contains(self, mm_hash: str) -> bool:
        return mm_hash in self.entries

    def count_lookup(self, hit: bool) -> None:
        """Counts one item's lookup (the scheduler calls it once per item it schedules)."""
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def get(self, mm_hash: str) -> torch.Tensor:
        return self.entries[mm_hash]

    def acquire(self, mm_hash: str, req_id: str) -> None:
        """The request needs this (existing) entry until it releases it; idempotent."""
        refs = self.refs[mm_hash]
        if not refs:
            self.num_freeable_tokens -= self.freeable.pop(mm_hash)
        refs.add(req_id)
        self.req_to_hashes.setdefault(req_id, set()).add(mm_hash)

    def release(self, mm_hash: str, req_id: str) -> None:
        """The request no longer needs the entry; the last release makes it evictable (newest)."""
        refs = self.refs.get(mm_hash)
        if refs is None or req_id not in refs:
            return
        refs.discard(req_id)
        hashes = self.req_to_hashes[req_id]
        hashes.discard(mm_hash)
        if not hashes:
            del self.req_to_hashes[req_id]
        if not refs:
            num_tokens = self.entries[mm_hash].shape[0]
            self.freeable[mm_hash] = num_tokens
            self.num_freeable_tokens += num_tokens

    def release_request(self, req_id: str) -> None:
        """Release every entry of a finished or preempted request."""
        for mm_hash in list(self.req_to_hashes.get(req_id, ())):
            self.release(mm_hash, req_id)

    def can_allocate(self, num_tokens: int, reserved_tokens: int = 0) -> bool:
        """Whether `num_tokens` more fit, after `reserved_tokens` already planned this step, by
        evicting unreferenced entries if needed."""
        return self.num_free_tokens + self.num_freeable_tokens >= num_tokens + reserved_tokens

    def put(self, mm_hash: str, embeddings: torch.Tensor, req_id: str) -> None:
        """Store an item's encoder output [num_tokens, hidden] and acquire it for `req_id`.

        Evicts the least recently released unreferenced entries as needed. An entry already
        present is kept (same hash, same output) and just acquired.
        """
        if mm_hash in self.entries:
            self.acquire(mm_hash, req_id)
            return
        num_tokens = embeddings.shape[0]
        assert self.can_allocate(num_tokens), "scheduler must check can_allocate first"
        while self.num_free_tokens < num_tokens:
            self._evict_oldest()
        self.entries[mm_hash] = embeddings
        self.refs[mm_hash] = {req_id}
        self.req_to_hashes.setdefault(req_id, set()).add(mm_hash)
        self.num_used_tokens += num_tokens

    def _evict_oldest(self) -> None:
        mm_hash, num_tokens = self.freeable.popitem(last=False)
        self.num_freeable_tokens -= num_tokens
        self.num_used_tokens -= num_tokens
        del self.entries[mm_hash]
        del self.refs[mm_hash]
