"""EncoderCache: references, LRU eviction of unreferenced entries, honest can_allocate, counters."""

import pytest
import torch

from mm_runtime.gpu_worker.encoder_cache import EncoderCache


def emb(num_tokens: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((num_tokens, 8), value)  # [num_tokens, hidden]


def test_put_get_and_token_accounting() -> None:
    cache = EncoderCache(capacity_tokens=10)
    cache.put("a", emb(4, 1.0), "r1")
    assert cache.contains("a") and not cache.contains("b")
    assert torch.equal(cache.get("a"), emb(4, 1.0))
    assert cache.num_used_tokens == 4 and cache.num_free_tokens == 6
    cache.put("a", emb(4, 2.0), "r2")  # already present: kept, acquired for r2
    assert torch.equal(cache.get("a"), emb(4, 1.0)) and cache.refs["a"] == {"r1", "r2"}
    assert cache.num_used_tokens == 4


def test_lru_eviction_of_unreferenced_entries() -> None:
    cache = EncoderCache(capacity_tokens=12)
    cache.put("a", emb(4), "r1")
    cache.put("b", emb(4), "r2")
    cache.put("c", emb(4), "r3")
    cache.release_request("r1")
    cache.release_request("r2")
    cache.release_request("r3")
    # A hit revives "a" and its release makes it the newest: "b" is now the oldest.
    cache.acquire("a", "r4")
    cache.release("a", "r4")
    cache.put("d", emb(4), "r5")
    assert not cache.contains("b")
    assert all(cache.contains(h) for h in ("a", "c", "d"))
    cache.put("e", emb(8), "r6")  # needs two evictions: "c" then "a"
    assert not cache.contains("c") and not cache.contains("a")
    assert cache.contains("d") and cache.contains("e")
    assert cache.num_used_tokens == 12 and cache.num_freeable_tokens == 0


def test_referenced_entries_never_evicted() -> None:
    cache = EncoderCache(capacity_tokens=10)
    cache.put("a", emb(4), "r1")
    cache.put("b", emb(4), "r2")
    cache.acquire("b", "r3")
    cache.release("b", "r2")  # r3 still needs "b"
    assert not cache.can_allocate(4)
    with pytest.raises(AssertionError):
        cache.put("c", emb(4), "r4")
    assert cache.contains("a") and cache.contains("b") and cache.num_used_tokens == 8

    cache.release_request("r3")
    assert cache.can_allocate(4)
    cache.put("c", emb(4), "r4")
    assert not cache.contains("b") and cache.contains("a")


def test_can_allocate_counts_free_evictable_and_reserved() -> None:
    cache = EncoderCache(capacity_tokens=10)
    cache.put("a", emb(3), "r1")
    cache.put("b", emb(3), "r2")
    cache.release_request("r1")  # "a" evictable: 4 free + 3 evictable
    assert cache.can_allocate(7) and not cache.can_allocate(8)
    assert cache.can_allocate(4, reserved_tokens=3)
    assert not cache.can_allocate(4, reserved_tokens=4)
    cache.put("c", emb(7), "r3")  # exactly fits after evicting "a"
    assert cache.num_used_tokens == 10 and not cache.can_allocate(1)


def test_release_request_and_idempotent_acquire() -> None:
    cache = EncoderCache(capacity_tokens=10)
    cache.put("a", emb(2), "r1")
    cache.put("b", emb(2), "r1")
    cache.acquire("a", "r1")  # twice: still one reference
    cache.acquire("a", "r2")
    cache.release_request("r1")
    assert list(cache.freeable) == ["b"] and cache.num_freeable_tokens == 2
    cache.release("a", "r1")  # already released: no-op
    cache.release_request("r2")
    cache.release_request("unknown")
    assert list(cache.freeable) == ["b", "a"] and cache.req_to_hashes == {}


def test_hit_miss_counting() -> None:
    cache = EncoderCache(capacity_tokens=10)
    cache.count_lookup(hit=False)
    cache.put("a", emb(2), "r1")
    cache.count_lookup(hit=True)
    assert (cache.hits, cache.misses) == (1, 1)
    cache.contains("a")  # not counted
    assert (cache.hits, cache.misses) == (1, 1)
