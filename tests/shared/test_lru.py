"""SizedLRU: the one eviction rule both sides of the feature cache apply (DESIGN.md section 3)."""

import torch

from mm_runtime.shared.lru import SizedLRU, tensors_nbytes


def contents(lru: SizedLRU) -> list[tuple[str, object]]:
    return [(k, lru.peek(k)) for k in lru.keys()]


def test_put_evicts_least_recent_first_until_it_fits() -> None:
    lru: SizedLRU[str] = SizedLRU(10)
    assert lru.put("a", "A", 3) == []
    assert lru.put("b", "B", 3) == []
    assert lru.put("c", "C", 3) == []
    assert list(lru.keys()) == ["a", "b", "c"] and lru.used_bytes == 9
    assert lru.put("d", "D", 5) == ["a", "b"]  # one eviction is not enough: 3 + 3 + 5 > 10
    assert contents(lru) == [("c", "C"), ("d", "D")] and lru.used_bytes == 8
    assert lru.put("e", "E", 2) == []  # exactly full is fine
    assert lru.used_bytes == 10 and len(lru) == 3


def test_touch_refreshes_and_peek_does_not() -> None:
    lru: SizedLRU[str] = SizedLRU(9)
    for key in "abc":
        lru.put(key, key.upper(), 3)
    assert lru.touch("a") == "A"
    assert lru.peek("b") == "B"  # no refresh: b stays least recent
    assert list(lru.keys()) == ["b", "c", "a"]
    assert lru.put("d", "D", 3) == ["b"]
    assert lru.touch("b") is None and lru.peek("b") is None and "b" not in lru
    assert list(lru.keys()) == ["c", "a", "d"]  # a miss changes nothing


def test_replace_updates_size_and_recency() -> None:
    lru: SizedLRU[str] = SizedLRU(10)
    lru.put("a", "A", 3)
    lru.put("b", "B", 3)
    assert lru.put("a", "A2", 6) == []  # its own old size is freed first: 3 + 6 fits
    assert contents(lru) == [("b", "B"), ("a", "A2")] and lru.used_bytes == 9
    assert lru.put("a", "A3", 8) == ["b"]
    assert contents(lru) == [("a", "A3")] and lru.used_bytes == 8
    assert lru.put("a", "A4", 1) == []
    assert lru.used_bytes == 1


def test_oversize_is_never_stored_and_evicts_nothing() -> None:
    lru: SizedLRU[str] = SizedLRU(10)
    lru.put("a", "A", 4)
    lru.put("b", "B", 4)
    assert lru.put("big", "X", 11) == []
    assert "big" not in lru and list(lru.keys()) == ["a", "b"] and lru.used_bytes == 8
    # Replacing an entry by an oversize value drops the old one (it is no longer valid) and
    # still evicts nothing else.
    assert lru.put("a", "A2", 11) == []
    assert list(lru.keys()) == ["b"] and lru.used_bytes == 4


def test_zero_capacity_and_zero_size() -> None:
    lru: SizedLRU[str] = SizedLRU(0)
    assert lru.put("empty", "E", 0) == []  # a size-0 item fits any capacity
    assert lru.put("a", "A", 1) == [] and "a" not in lru
    assert list(lru.keys()) == ["empty"] and lru.used_bytes == 0


def test_clear() -> None:
    lru: SizedLRU[str] = SizedLRU(10)
    lru.put("a", "A", 4)
    lru.put("b", "B", 4)
    lru.clear()
    assert len(lru) == 0 and lru.used_bytes == 0 and list(lru.keys()) == []
    assert lru.put("c", "C", 10) == []  # the whole capacity is free again
    assert list(lru.keys()) == ["c"]


def test_tensors_nbytes_counts_elements_not_storage() -> None:
    base = torch.zeros(10, 10, dtype=torch.float32)
    tensors = {
        "view": base[:2],  # 2 x 10 of a 100-element storage
        "grid": torch.zeros(1, 3, dtype=torch.int64),
        "mask": torch.zeros(5, dtype=torch.bool),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }
    assert tensors_nbytes(tensors) == 2 * 10 * 4 + 3 * 8 + 5 + 0
    assert tensors_nbytes({}) == 0
