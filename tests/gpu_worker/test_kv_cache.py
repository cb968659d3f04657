"""KVCacheManager: allocation, ref counts, prefix caching (media-aware), eviction order."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mm_runtime.gpu_worker.kv_cache import NULL_BLOCK_ID, KVCacheManager
from mm_runtime.gpu_worker.request import Request
from mm_runtime.shared.wire import MMItem, PlaceholderRange, SamplingParams

BS = 4


def make_req(
    req_id: str, token_ids: list[int], mm: tuple[tuple[str, int, int], ...] = ()
) -> Request:
    items = [
        MMItem(modality="image", mm_hash=h, placeholder=PlaceholderRange(o, n), tensors={})
        for h, o, n in mm
    ]
    return Request(
        req_id=req_id,
        prompt_token_ids=list(token_ids),
        sampling_params=SamplingParams(),
        mm_items=items,
    )


def admit(kv: KVCacheManager, req: Request) -> tuple[list[int], list[int] | None]:
    """Admit with prefix lookup and compute the whole rest of the request (one step)."""
    hit_ids, num_hit_tokens = kv.get_computed_blocks(req)
    num_new = req.num_tokens - num_hit_tokens
    new_ids = kv.allocate_slots(req, num_new, hit_ids)
    if new_ids is not None:
        req.num_computed_tokens = num_hit_tokens + num_new
    return hit_ids, new_ids


def snapshot(kv: KVCacheManager) -> tuple:
    return (
        list(kv.free_queue),
        dict(kv.cached_blocks),
        {r: list(ids) for r, ids in kv.req_to_block_ids.items()},
        dict(kv.num_cached_blocks),
        [(b.ref_cnt, b.block_hash) for b in kv.blocks],
    )


def test_allocate_and_free_ref_counts() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    assert kv.num_free_blocks == 9 and kv.usage == 0.0
    req = make_req("a", list(range(10)))
    _, new_ids = admit(kv, req)
    assert new_ids is not None and len(new_ids) == 3
    assert NULL_BLOCK_ID not in new_ids
    assert kv.block_ids("a") == new_ids
    assert all(kv.blocks[b].ref_cnt == 1 for b in new_ids)
    assert kv.num_free_blocks == 6 and kv.usage == 3 / 9

    # Decode: slots 10 and 11 fit in the third block; slot 12 needs a fourth.
    for expected in (0, 0, 1):
        req.token_ids.append(7)
        new_ids = kv.allocate_slots(req, 1)
        assert new_ids is not None and len(new_ids) == expected
        req.num_computed_tokens += 1
    assert len(kv.block_ids("a")) == 4

    kv.free(req)
    assert kv.num_free_blocks == 9 and kv.block_ids("a") == []
    assert all(b.ref_cnt == 0 for b in kv.blocks)


def test_allocate_returns_none_and_changes_nothing_when_full() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", list(range(12)))
    admit(kv, a)
    kv.free(a)  # 3 cached free blocks + 2 never used
    b = make_req("b", list(range(12)) + [50, 51, 52])  # hits 3 blocks, needs 1 new
    hit_ids, _ = kv.get_computed_blocks(b)
    assert len(hit_ids) == 3
    before = snapshot(kv)
    # 5 free blocks, but the 3 hits are among them: 2 allocatable, 3 more needed -> None.
    assert kv.allocate_slots(b, 3 + 2 * BS, hit_ids) is None
    assert snapshot(kv) == before
    assert kv.allocate_slots(b, 3 + BS, hit_ids) is not None  # 2 new blocks fit exactly
    assert kv.num_free_blocks == 0

    c = make_req("c", [99] * 5)
    before = snapshot(kv)
    assert kv.allocate_slots(c, 5) is None
    assert snapshot(kv) == before and kv.block_ids("c") == []


def test_prefix_hit_for_same_tokens_shares_blocks() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", list(range(14)))
    hit_ids, new_ids = admit(kv, a)
    assert hit_ids == [] and new_ids is not None
    assert (kv.prefix_cache_queries_tokens, kv.prefix_cache_hits_tokens) == (14, 0)
    assert len(a.block_hashes) == 3  # full blocks only
    assert all(len(h) == 32 for h in a.block_hashes)  # full-width sha256

    b = make_req("b", list(range(13)) + [100, 101])
    hit_ids, _ = admit(kv, b)
    assert hit_ids == kv.block_ids("a")[:3]
    assert kv.block_ids("b")[:3] == hit_ids and b.num_computed_tokens == 15
    assert all(kv.blocks[i].ref_cnt == 2 for i in hit_ids)
    assert (kv.prefix_cache_queries_tokens, kv.prefix_cache_hits_tokens) == (29, 12)

    kv.free(a)
    assert all(kv.blocks[i].ref_cnt == 1 for i in hit_ids)
    assert not set(hit_ids) & set(kv.free_queue)

    c = make_req("c", [1] + list(range(1, 14)))  # first block differs: the chain misses
    assert kv.get_computed_blocks(c) == ([], 0)


def test_never_the_whole_request() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", list(range(12)))
    admit(kv, a)
    b = make_req("b", list(range(12)))  # exactly three cached blocks: only two may hit
    assert kv.get_computed_blocks(b) == (kv.block_ids("a")[:2], 8)
    c = make_req("c", list(range(4)))
    assert kv.get_computed_blocks(c) == ([], 0)
    d = make_req("d", list(range(5)))
    assert kv.get_computed_blocks(d) == (kv.block_ids("a")[:1], 4)


def test_media_hash_keys_blocks() -> None:
    kv = KVCacheManager(num_blocks=30, block_size=BS, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4] + [9] * 8 + [5, 6, 7, 8, 10]  # image placeholder at [4, 12)
    a = make_req("a", tokens, (("img-1", 4, 8),))
    admit(kv, a)

    other_image = make_req("b", tokens, (("img-2", 4, 8),))
    hit_ids, num_hit = kv.get_computed_blocks(other_image)
    assert num_hit == 4  # the text block before the image only
    assert hit_ids == kv.block_ids("a")[:1]
    admit(kv, other_image)
    assert set(kv.block_ids("a")[1:]).isdisjoint(kv.block_ids("b")[1:])

    same_image = make_req("c", tokens, (("img-1", 4, 8),))
    hits_before = kv.prefix_cache_hits_tokens
    hit_ids, num_hit = admit(kv, same_image)[0], same_image.num_computed_tokens
    assert hit_ids == kv.block_ids("a")[:4] and num_hit == 17
    assert kv.prefix_cache_hits_tokens - hits_before == 16

    # Same image hash, placed differently: its blocks are keyed apart.
    shifted = make_req("d", tokens, (("img-1", 8, 4),))
    assert kv.get_computed_blocks(shifted)[1] == 4


def test_free_cached_blocks_evicted_tail_first() -> None:
    kv = KVCacheManager(num_blocks=9, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", list(range(13)))  # 3 full blocks (cached) + 1 partial (uncached)
    admit(kv, a)
    a_ids = list(kv.block_ids("a"))
    kv.free(a)
    # Uncached block reused first, then never-used blocks, then a's cached blocks tail first.
    assert list(kv.free_queue) == [a_ids[3], 5, 6, 7, 8, a_ids[2], a_ids[1], a_ids[0]]

    filler = make_req("f", [77] * (6 * BS - 1))  # takes 6 blocks: evicts a's last full block
    admit(kv, filler)
    assert a_ids[2] in kv.block_ids("f") and kv.blocks[a_ids[2]].block_hash is None
    assert a.block_hashes[2] not in kv.cached_blocks

    again = make_req("a2", list(range(13)))
    assert kv.get_computed_blocks(again) == (a_ids[:2], 8)


def test_hit_on_free_cached_block_revives_it() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", list(range(8)))
    admit(kv, a)
    a_ids = list(kv.block_ids("a"))
    kv.free(a)
    assert kv.num_free_blocks == 7

    b = make_req("b", list(range(9)))
    hit_ids, new_ids = admit(kv, b)
    assert hit_ids == a_ids and new_ids is not None and len(new_ids) == 1
    assert all(kv.blocks[i].ref_cnt == 1 and i not in kv.free_queue for i in a_ids)
    assert kv.num_free_blocks == 4

    # Filling the pool now never takes the revived blocks.
    filler = make_req("f", [5] * (4 * BS))
    admit(kv, filler)
    assert set(kv.block_ids("f")).isdisjoint(a_ids)
    assert all(kv.cached_blocks[h] == i for h, i in zip(a.block_hashes, a_ids, strict=True))


def test_prefix_caching_off() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    a = make_req("a", list(range(12)))
    admit(kv, a)
    kv.free(a)
    b = make_req("b", list(range(12)))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.cached_blocks == {} and a.block_hashes == []
    assert (kv.prefix_cache_queries_tokens, kv.prefix_cache_hits_tokens) == (0, 0)
    # Freed blocks are plain free blocks, all reused in some order.
    admit(kv, b)
    assert len(kv.block_ids("b")) == 3


def test_decode_blocks_cached_as_they_fill_and_preemption() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", list(range(6)))
    admit(kv, a)
    assert kv.num_cached_blocks["a"] == 1
    outputs = [40, 41, 42, 43]
    for tok in outputs:  # sampled token appended, then computed next step
        a.token_ids.append(tok)
        assert kv.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
    # 10 tokens computed: blocks 0 and 1 full and cached, block 2 partial.
    assert kv.num_cached_blocks["a"] == 2 and len(a.block_hashes) == 2
    assert kv.cached_blocks[a.block_hashes[1]] == kv.block_ids("a")[1]

    # Another request whose prompt continues a's prompt + outputs hits the decode block too.
    b = make_req("b", list(range(6)) + outputs[:2] + [0])
    assert kv.get_computed_blocks(b) == (kv.block_ids("a")[:2], 8)

    # Preempt a (recompute): re-admitted with its outputs, it hits its own former blocks.
    a_ids = list(kv.block_ids("a"))
    hashes = list(a.block_hashes)
    kv.free(a)
    a.num_computed_tokens = 0
    hit_ids, new_ids = admit(kv, a)
    assert hit_ids == a_ids[:2] and a.block_hashes == hashes
    assert new_ids is not None and len(new_ids) == 1 and a.num_computed_tokens == 10


def test_reserved_block_not_full_yet_is_not_cached() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", list(range(6)))
    # Allocate ahead for 10 tokens while only 6 are known: block 1 is not hashable yet.
    assert kv.allocate_slots(a, 10) is not None
    assert kv.num_cached_blocks["a"] == 1 and len(a.block_hashes) == 1
    a.num_computed_tokens = 6
    a.token_ids.extend([6, 7])
    kv.allocate_slots(a, 2)
    assert kv.num_cached_blocks["a"] == 2


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    a = make_req("a", list(range(12)))
    admit(kv, a)
    assert not kv.reset_prefix_cache()  # blocks still held
    assert len(kv.cached_blocks) == 3
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.cached_blocks == {} and all(b.block_hash is None for b in kv.blocks)
    assert kv.get_computed_blocks(make_req("b", list(range(12)))) == ([], 0)
    assert kv.num_free_blocks == 9


# Property test: random admissions (with prefix hits), chunked prefill, decodes, preemptions,
# finishes; after each operation the pool's invariants hold and every prefix hit reads KV
# written for exactly the same tokens and media.

BASES = [[1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], [1, 2, 3, 1, 5, 5, 5, 5, 5, 5, 2, 2, 2]]

op_strategy = st.one_of(
    st.tuples(
        st.just("admit"),
        st.integers(0, len(BASES) - 1),  # base sequence
        st.integers(1, 14),  # prompt length (a prefix of the base)
        st.sampled_from([None, "img-a", "img-b"]),  # an image at [4, 10) or none
        st.integers(1, 16),  # first chunk size
    ),
    st.tuples(st.just("readmit"), st.integers(0, 50), st.integers(1, 16)),
    st.tuples(st.just("step"), st.integers(0, 50), st.integers(1, 16), st.integers(0, 3)),
    st.tuples(st.just("step"), st.integers(0, 50), st.just(1), st.integers(0, 3)),
    st.tuples(st.just("finish"), st.integers(0, 50)),
)


class Sim:
    """Plays the scheduler and the model runner: writes each computed token's (token, media)
    into a shadow of the KV pool, and checks that prefix hits read what they would write."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.running: list[Request] = []
        self.preempted: list[Request] = []
        self.kv_content: dict[int, list[tuple[int, int, str | None] | None]] = {}
        self.num_reqs = 0

    def slot_value(self, req: Request, pos: int) -> tuple[int, int, str | None]:
        for item in req.mm_items:
            if item.placeholder.offset <= pos < item.placeholder.offset + item.placeholder.length:
                return (req.token_ids[pos], pos, item.mm_hash)
        return (req.token_ids[pos], pos, None)

    def compute(self, req: Request, num_new: int) -> None:
        table = self.kv.block_ids(req.req_id)
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + num_new):
            block = self.kv_content.setdefault(table[pos // BS], [None] * BS)
            block[pos % BS] = self.slot_value(req, pos)
        req.num_computed_tokens += num_new

    def try_admit(self, req: Request, chunk: int) -> bool:
        hit_ids, num_hit = self.kv.get_computed_blocks(req)
        assert num_hit < req.num_tokens and num_hit == len(hit_ids) * BS
        for i, block_id in enumerate(hit_ids):
            expected = [self.slot_value(req, p) for p in range(i * BS, (i + 1) * BS)]
            assert self.kv_content[block_id] == expected
        num_new = min(chunk, req.num_tokens - num_hit)
        before = snapshot(self.kv)
        if self.kv.allocate_slots(req, num_new, hit_ids) is None:
            assert snapshot(self.kv) == before
            return False
        req.num_computed_tokens = num_hit
        self.compute(req, num_new)
        self.running.append(req)
        return True

    def apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "admit":
            _, base, length, image, chunk = op
            mm = ((image, 4, 6),) if image and length > 4 else ()
            self.num_reqs += 1
            self.try_admit(make_req(f"r{self.num_reqs}", BASES[base][:length], mm), chunk)
        elif kind == "readmit" and self.preempted:
            req = self.preempted[op[1] % len(self.preempted)]
            if self.try_admit(req, op[2]):
                self.preempted.remove(req)
        elif kind == "step" and self.running:
            _, idx, chunk, token = op
            req = self.running[idx % len(self.running)]
            if req.num_computed_tokens == req.num_tokens:  # decode: the sampled token
                req.token_ids.append(token)
            num_new = min(chunk, req.num_tokens - req.num_computed_tokens)
            before = snapshot(self.kv)
            if self.kv.allocate_slots(req, num_new) is None:
                assert snapshot(self.kv) == before
                self.kv.free(req)  # preempt by recompute
                req.num_computed_tokens = 0
                self.running.remove(req)
                self.preempted.append(req)
            else:
                self.compute(req, num_new)
        elif kind == "finish" and self.running:
            req = self.running.pop(op[1] % len(self.running))
            self.kv.free(req)

    def check_invariants(self) -> None:
        kv = self.kv
        held: dict[int, int] = {}
        for req in self.running:
            table = kv.block_ids(req.req_id)
            assert len(table) == len(set(table)), "a block twice in one table"
            assert len(table) == -(-req.num_computed_tokens // BS)
            for block_id in table:
                held[block_id] = held.get(block_id, 0) + 1
        assert set(kv.req_to_block_ids) == {r.req_id for r in self.running}
        assert NULL_BLOCK_ID not in held and NULL_BLOCK_ID not in kv.free_queue
        assert set(held).isdisjoint(kv.free_queue)
        assert len(held) + kv.num_free_blocks == kv.num_blocks - 1
        for block in kv.blocks:
            assert block.ref_cnt >= 0
            assert block.ref_cnt == held.get(block.block_id, 0)
            if block.block_hash is not None:
                assert kv.cached_blocks[block.block_hash] == block.block_id
        assert all(kv.blocks[b].block_hash == h for h, b in kv.cached_blocks.items())
        assert 0 <= kv.prefix_cache_hits_tokens <= kv.prefix_cache_queries_tokens


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(op_strategy, min_size=10, max_size=80),
    num_blocks=st.integers(2, 24),
    caching=st.booleans(),
)
def test_random_operations_keep_invariants(
    ops: list[tuple], num_blocks: int, caching: bool
) -> None:
    sim = Sim(KVCacheManager(num_blocks, BS, caching))
    for op in ops:
        sim.apply(op)
        sim.check_invariants()
    for req in sim.running:
        sim.kv.free(req)
    sim.running.clear()
    sim.check_invariants()
    assert sim.kv.num_free_blocks == num_blocks - 1 and sim.kv.usage == 0.0
