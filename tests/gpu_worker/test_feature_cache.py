"""The mirrored feature cache end to end: FeatureCacheMirror decides, the AddRequest crosses
MessageCodec, FeatureCacheReceiver resolves (DESIGN.md section 3).

Acceptance point: the two caches hold the same keys after a long random sequence of requests
with evictions. Property tests drive both sides with random requests (0-4 items from a pool of
12 hashes of varied sizes, some larger than the capacity, duplicates within a request) and check
after each one: the same keys in the same LRU order, the same used bytes, the order an
independent model of the eviction rule predicts, and every item resolved to its own tensors.
A second machine delivers messages late and makes the receiver lose entries, to check the
self-heal (reset, epochs) keeps that promise too.
"""

import hashlib
import random
from collections import deque
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mm_runtime.frontend.feature_cache import FeatureCacheMirror
from mm_runtime.gpu_worker.feature_cache import FeatureCacheReceiver
from mm_runtime.shared.errors import FeatureCacheMiss
from mm_runtime.shared.lru import tensors_nbytes
from mm_runtime.shared.wire import (
    AddRequest,
    EngineRequest,
    GpuWorkerInput,
    MMItem,
    PlaceholderRange,
    SamplingParams,
)
from mm_runtime.shared.zmq_io import MessageCodec

CAPACITY_BYTES = 16 * 1024


@dataclass(frozen=True)
class PoolItem:
    mm_hash: str
    tensors: dict[str, torch.Tensor]
    num_tokens: int

    @property
    def size(self) -> int:
        return tensors_nbytes(self.tensors)


def _pool() -> list[PoolItem]:
    """12 items from 256 B to 25 KiB: inline and out-of-band tensors, one exactly the capacity
    (fits, evicting everything), two larger (never cached)."""
    gen = torch.Generator().manual_seed(0)
    items = []
    for i, rows in enumerate([1, 2, 3, 5, 8, 13, 20, 28, 40, 64, 70, 100]):
        dtype = torch.bfloat16 if i % 4 == 3 else torch.float32
        cols = 128 if dtype == torch.bfloat16 else 64  # 256 B per row either way
        tensors = {"pixel_values": torch.randn(rows, cols, generator=gen).to(dtype)}
        if i % 2 == 0 and rows != 64:  # Qwen2-VL-like; the 64-row item stays exactly 16 KiB
            tensors["image_grid_thw"] = torch.tensor([[1, 2, rows]])
        mm_hash = hashlib.sha256(f"image-{i}".encode()).hexdigest()
        items.append(PoolItem(mm_hash, tensors, num_tokens=rows))
    return items


POOL = _pool()
BY_HASH = {p.mm_hash: p for p in POOL}
assert POOL[9].size == CAPACITY_BYTES and POOL[10].size > CAPACITY_BYTES


def make_items(indices: list[int]) -> list[MMItem]:
    """Fresh MMItems, as the frontend builds them per request (each its own tensors dict)."""
    return [
        MMItem(
            modality="image",
            mm_hash=POOL[i].mm_hash,
            placeholder=PlaceholderRange(10 * pos, POOL[i].num_tokens),
            tensors=dict(POOL[i].tensors),
        )
        for pos, i in enumerate(indices)
    ]


def assert_tensors_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def assert_resolved(items: list[MMItem]) -> None:
    for item in items:
        assert item.tensors is not None
        assert_tensors_equal(item.tensors, BY_HASH[item.mm_hash].tensors)


def assert_in_sync(mirror: FeatureCacheMirror, receiver: FeatureCacheReceiver) -> None:
    assert mirror.epoch == receiver.epoch
    assert list(mirror.lru.keys()) == list(receiver.lru.keys())
    assert mirror.lru.used_bytes == receiver.lru.used_bytes <= CAPACITY_BYTES
    for key in receiver.lru.keys():
        assert_tensors_equal(receiver.lru.peek(key), BY_HASH[key].tensors)
        assert mirror.lru.peek(key) == BY_HASH[key].num_tokens


class ReferenceLRU:
    """An independent model of the eviction rule, to check both sides are right, not only
    equally wrong: most recent last; evict from the front until it fits; oversize not kept."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.order: list[str] = []

    def access(self, mm_hash: str) -> bool:
        """Applies one item; returns whether it was a hit."""
        if mm_hash in self.order:
            self.order.remove(mm_hash)
            self.order.append(mm_hash)
            return True
        size = BY_HASH[mm_hash].size
        if size <= self.capacity_bytes:
            while sum(BY_HASH[k].size for k in self.order) + size > self.capacity_bytes:
                self.order.pop(0)
            self.order.append(mm_hash)
        return False

    def clear(self) -> None:
        self.order.clear()


class Link:
    """Frontend mirror -> MessageCodec -> GPU worker receiver, one ordered channel."""

    def __init__(self) -> None:
        self.mirror = FeatureCacheMirror(CAPACITY_BYTES)
        self.receiver = FeatureCacheReceiver(CAPACITY_BYTES)
        self.encoder = MessageCodec()
        self.decoder = MessageCodec(GpuWorkerInput)
        self.num_requests = 0

    def send(self, indices: list[int]) -> list[bytes]:
        """What the frontend does at send time: decide hits/misses, encode. Returns the frames
        as the socket would deliver them (copied out of the sender's tensors)."""
        items = make_items(indices)
        self.mirror.apply(items, [POOL[i].num_tokens for i in indices])
        self.num_requests += 1
        request = EngineRequest(
            req_id=f"r{self.num_requests}",
            prompt_token_ids=[1, 2, 3],
            sampling_params=SamplingParams(),
            mm_items=items,
        )
        msg = AddRequest(request=request, feature_epoch=self.mirror.epoch)
        return [bytes(f) for f in self.encoder.encode(msg)]

    def receive(self, frames: list[bytes]) -> tuple[AddRequest, list[bool]]:
        """What the GPU worker does on arrival: decode, resolve (may raise FeatureCacheMiss).
        Also returns, per item, whether its tensors travelled (a miss) or only its hash."""
        msg = self.decoder.decode(frames)
        assert isinstance(msg, AddRequest)
        carried = [item.tensors is not None for item in msg.request.mm_items]
        self.receiver.resolve(msg.request.mm_items, msg.feature_epoch)
        return msg, carried

    def request(self, indices: list[int]) -> tuple[AddRequest, list[bool]]:
        return self.receive(self.send(indices))

    def forget_on_receiver(self, mm_hash: str) -> None:
        """Loses one entry on the receiver only (a bug, a partial restart). A put over the
        capacity drops the key and evicts nothing else (SizedLRU's contract)."""
        assert mm_hash in self.receiver.lru
        self.receiver.lru.put(mm_hash, {}, CAPACITY_BYTES + 1)
        assert mm_hash not in self.receiver.lru


# Small items drawn more often than large ones, so hits, evictions and oversize items all occur.
item_indices = st.one_of(st.integers(0, 5), st.integers(0, len(POOL) - 1))
requests = st.lists(item_indices, max_size=4)


class MirroredCaches(RuleBasedStateMachine):
    """Synchronous delivery: each request is decided, encoded, decoded and resolved in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.link = Link()
        self.model = ReferenceLRU(CAPACITY_BYTES)

    @rule(indices=requests)
    def request(self, indices: list[int]) -> None:
        msg, carried = self.link.request(indices)
        expected_hits = [self.model.access(POOL[i].mm_hash) for i in indices]
        assert carried == [not hit for hit in expected_hits]
        assert_resolved(msg.request.mm_items)

    @rule(data=st.data())
    def repeat_cached(self, data: st.DataObject) -> None:
        """A request for items the mirror holds: all hits, touching them in a new order."""
        held = [i for i, p in enumerate(POOL) if p.mm_hash in self.link.mirror.lru]
        if not held:
            return
        indices = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=4))
        msg, carried = self.link.request(indices)
        assert not any(carried)
        assert all(self.model.access(POOL[i].mm_hash) for i in indices)
        assert_resolved(msg.request.mm_items)

    @invariant()
    def in_sync(self) -> None:
        assert_in_sync(self.link.mirror, self.link.receiver)
        assert list(self.link.mirror.lru.keys()) == self.model.order
        assert self.link.receiver.num_resets == 0


TestMirroredCaches = MirroredCaches.TestCase
TestMirroredCaches.settings = settings(
    max_examples=60,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_long_random_sequence_stays_in_sync() -> None:
    """One long run (the property test explores many short ones)."""
    rng = random.Random(0)
    link = Link()
    num_hits = num_evictions = 0
    for _ in range(3000):
        indices = [rng.randrange(len(POOL)) for _ in range(rng.randint(0, 4))]
        before = set(link.mirror.lru.keys())
        msg, carried = link.request(indices)
        num_hits += carried.count(False)
        num_evictions += len(before - set(link.mirror.lru.keys()))
        assert_resolved(msg.request.mm_items)
        assert_in_sync(link.mirror, link.receiver)
    assert num_hits > 500 and num_evictions > 500  # the run exercised both


def test_duplicates_within_a_request() -> None:
    link = Link()
    msg, carried = link.request([0, 0, 4, 0])
    assert carried == [True, False, True, False]  # later copies are hits on the first
    assert_resolved(msg.request.mm_items)
    big, carried = link.request([10, 10])  # over the capacity: never cached, both carry tensors
    assert carried == [True, True]
    assert_resolved(big.request.mm_items)
    assert_in_sync(link.mirror, link.receiver)
    assert list(link.receiver.lru.keys()) == [POOL[4].mm_hash, POOL[0].mm_hash]


def test_item_of_exactly_the_capacity_evicts_everything_else() -> None:
    link = Link()
    link.request([0, 1, 2])
    link.request([9])
    assert list(link.receiver.lru.keys()) == [POOL[9].mm_hash]
    assert link.receiver.lru.used_bytes == CAPACITY_BYTES
    assert_in_sync(link.mirror, link.receiver)


def test_accepted_request_keeps_its_tensors_after_eviction() -> None:
    link = Link()
    link.request([3])
    msg, carried = link.request([3])
    assert carried == [False]  # a hit: filled from the receiver's cache
    link.request([9])  # evicts item 3
    assert POOL[3].mm_hash not in link.receiver.lru
    assert_resolved(msg.request.mm_items)


def test_forced_miss_resets_then_stale_epoch_then_back_in_sync() -> None:
    link = Link()
    mirror, receiver = link.mirror, link.receiver
    link.request([0, 1, 2])
    assert_in_sync(mirror, receiver)

    # The receiver loses item 1; the mirror still believes it is held.
    link.forget_on_receiver(POOL[1].mm_hash)
    with pytest.raises(FeatureCacheMiss):
        link.request([3, 1])  # item 3 is a miss (inserted), item 1 a hit that cannot be served
    assert len(receiver.lru) == 0 and receiver.lru.used_bytes == 0
    assert receiver.epoch == 1 and receiver.num_resets == 1
    assert mirror.epoch == 0  # not told yet: the FeatureCacheReset is on its way

    # Messages decided before the mirror hears of the reset still carry epoch 0.
    msg, carried = link.request([4, 5])  # misses: they serve their own request...
    assert carried == [True, True] and msg.feature_epoch == 0
    assert_resolved(msg.request.mm_items)
    assert len(receiver.lru) == 0  # ...but are not inserted
    for stale_hit in ([0], [4], [6, 5]):  # hits fail, without a second reset
        with pytest.raises(FeatureCacheMiss):
            link.request(stale_hit)
        assert receiver.epoch == 1 and receiver.num_resets == 1 and len(receiver.lru) == 0

    # The frontend receives FeatureCacheReset(1): both sides start generation 1 empty.
    mirror.reset(receiver.epoch)
    assert_in_sync(mirror, receiver)
    assert len(mirror.lru) == 0
    rng = random.Random(1)
    for _ in range(300):
        msg, _ = link.request([rng.randrange(len(POOL)) for _ in range(rng.randint(0, 4))])
        assert msg.feature_epoch == 1
        assert_resolved(msg.request.mm_items)
        assert_in_sync(mirror, receiver)
    assert receiver.num_resets == 1


class SelfHealingCaches(RuleBasedStateMachine):
    """Asynchronous delivery with receiver losses: messages wait in the channel, the reset
    notice waits on the way back, and the receiver may forget entries. Checks: no item ever
    resolves to wrong tensors; FeatureCacheMiss only where the receiver lost an entry this
    generation (a reset) or for a hit decided in an older generation (no reset); and whenever
    nothing is in flight and this generation lost nothing, both sides hold the same keys."""

    def __init__(self) -> None:
        super().__init__()
        self.link = Link()
        self.channel: deque[list[bytes]] = deque()  # frontend -> GPU worker, in order
        self.resets: deque[int] = deque()  # GPU worker -> frontend FeatureCacheReset epochs
        self.lossy_epochs: set[int] = set()  # receiver generations that lost an entry

    @rule(indices=requests)
    def send(self, indices: list[int]) -> None:
        self.channel.append(self.link.send(indices))

    @precondition(lambda self: self.channel)
    @rule()
    def deliver(self) -> None:
        receiver = self.link.receiver
        epoch, num_resets = receiver.epoch, receiver.num_resets
        keys_before = list(receiver.lru.keys())
        msg = self.link.decoder.decode(self.channel.popleft())
        carried = [item.tensors is not None for item in msg.request.mm_items]
        stale = msg.feature_epoch != epoch
        try:
            receiver.resolve(msg.request.mm_items, msg.feature_epoch)
        except FeatureCacheMiss:
            if stale:  # a hit decided in an older generation: fails, without a second reset
                assert not all(carried) and receiver.num_resets == num_resets
            else:  # only a generation that lost an entry resets
                assert epoch in self.lossy_epochs
                assert receiver.epoch == epoch + 1 and len(receiver.lru) == 0
                self.resets.append(receiver.epoch)
            return
        assert_resolved(msg.request.mm_items)
        if stale:  # only misses: they serve their request but are not inserted
            assert all(carried) and list(receiver.lru.keys()) == keys_before
        assert receiver.epoch == epoch

    @precondition(lambda self: self.resets)
    @rule()
    def notify_frontend(self) -> None:
        self.link.mirror.reset(self.resets.popleft())

    @precondition(lambda self: len(self.link.receiver.lru) > 0)
    @rule(data=st.data())
    def receiver_loses_an_entry(self, data: st.DataObject) -> None:
        keys = list(self.link.receiver.lru.keys())
        self.link.forget_on_receiver(data.draw(st.sampled_from(keys)))
        self.lossy_epochs.add(self.link.receiver.epoch)

    @invariant()
    def in_sync_when_quiet(self) -> None:
        quiet = not self.channel and not self.resets
        if quiet and self.link.receiver.epoch not in self.lossy_epochs:
            assert_in_sync(self.link.mirror, self.link.receiver)

    @invariant()
    def at_most_one_reset_per_loss(self) -> None:
        assert self.link.receiver.num_resets <= len(self.lossy_epochs)


TestSelfHealingCaches = SelfHealingCaches.TestCase
TestSelfHealingCaches.settings = settings(
    max_examples=60,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
