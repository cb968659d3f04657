"""Paged KV cache blocks with prefix caching: which block ids each request holds. GPU worker.

Bookkeeping only: the KV tensors live in the model runner, indexed by the block ids handed out
here. One KV cache group (every layer shares the request's block table). A compact version of
vLLM V1's `BlockPool` + `KVCacheManager` (vllm/v1/core/block_pool.py, kv_cache_manager.py, and
`FreeKVCacheBlockQueue` in kv_cache_utils.py).

Prefix caching: a full block is keyed by `hash_block(parent_key, its token ids, the media that
overlap it)`, so equal keys mean equal prefixes (media included) and hence equal KV. Blocks are
registered when allocated for tokens that fill them, i.e. before the step that writes them runs;
a request admitted in the same step may hit them, which is safe because every layer writes the
step's KV before its attention reads any.
"""

import logging
from collections import OrderedDict
from dataclasses import dataclass

from mm_runtime.gpu_worker.request import Request
from mm_runtime.shared.hashing import hash_block

logger = logging.getLogger(__name__)

# Never handed out: the model runner may pad block tables and slot mappings with it (CUDA graph
# padding, dummy runs) and write garbage there without touching any request's KV.
NULL_BLOCK_ID = 0


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0  # number of request block tables holding this block
    block_hash: bytes | None = None  # its prefix-cache key while registered in the cache


class KVCacheManager:
    """Hands out KV blocks to requests; keeps freed full blocks findable by their prefix key.

    Invariants (the property test in tests/gpu_worker/test_kv_cache.py checks them):
    - Every block but the null block is either held (`ref_cnt` = number of block tables it is
      in, >= 1) or in `free_queue` (`ref_cnt == 0`), never both.
    - `cached_blocks[h] == b` iff `blocks[b].block_hash == h`: one block per key, so a second
      block computed with the same key (two requests racing on one prefix) stays unregistered.
    - A free block keeps its key until it is popped for reuse (evicted), so a later request with
      the same prefix revives it (a hit takes it out of the free queue).
    - The first `num_cached_blocks[req_id]` blocks of a block table are registered (or were
      skipped as duplicates); the rest are not yet full.

    Free queue order (front is reused first): uncached blocks at the front, since they hold
    nothing worth keeping; cached blocks at the back, a freed request's blocks tail first, so
    eviction takes a sequence's tail before the head that other requests are likeliest to share.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        assert num_blocks >= 2, "block 0 is the null block"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        # block_id -> None, front is reused first; an OrderedDict gives O(1) removal of any block.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.cached_blocks: dict[bytes, int] = {}  # block_hash -> block_id
        self.req_to_block_ids: dict[str, list[int]] = {}  # req_id -> block table
        self.num_cached_blocks: dict[str, int] = {}  # req_id -> leading blocks already registered
        # Cumulative, for mm_runtime_prefix_cache_{queries,hits}_tokens_total.
        self.prefix_cache_queries_tokens = 0
        self.prefix_cache_hits_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take, free cached ones included (they are evicted then)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks (all but the null block) held by requests."""
        num_usable = self.num_blocks - 1
        return (num_usable - self.num_free_blocks) / num_usable

    def block_ids(self, req_id: str) -> list[int]:
        """The request's block table (the live list: read it, don't modify it)."""
        return self.req_to_block_ids.get(req_id, [])

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request's full blocks: (block_ids, num_computed_tokens).

        Takes no references: pass the ids to `allocate_slots` in the same scheduling pass, before
        any other allocation can evict them. Works for a preempted request too (its outputs are in
        `token_ids` and its `block_hashes` stay valid). Query and hit tokens are counted on
        every call, as in vLLM: a request whose admission is retried is counted again.
        """
        if not self.enable_prefix_caching:
            return [], 0
        # Leave at least one token to compute: its logits sample the next token.
        max_hit_blocks = (req.num_tokens - 1) // self.block_size
        self._update_block_hashes(req, max_hit_blocks)
        block_ids = []
        # Keys chain their parent, so the first miss ends the cached prefix.
        for block_hash in req.block_hashes[:max_hit_blocks]:
            block_id = self.cached_blocks.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        num_computed_tokens = len(block_ids) * self.block_size
        self.prefix_cache_queries_tokens += req.num_tokens
        self.prefix_cache_hits_tokens += num_computed_tokens
        return block_ids, num_computed_tokens

    def allocate_slots(
        self, req: Request, num_new_tokens: int, new_computed_block_ids: list[int] | None = None
    ) -> list[int] | None:
        """Make the request hold blocks for its computed tokens, its prefix hits (admission only)
        and `num_new_tokens` more. Returns the newly allocated block ids, or None, changing
        nothing, when too few blocks are free.
        """
        hit_ids = new_computed_block_ids or []
        block_ids = self.req_to_block_ids.get(req.req_id, [])
        if not hit_ids and block_ids:
            # The common case, a running request whose blocks have room (15 of 16 decode steps):
            # nothing to take from the free queue, only newly full blocks to register.
            num_tokens = req.num_computed_tokens + num_new_tokens
            if num_tokens <= len(block_ids) * self.block_size:
                if self.enable_prefix_caching:
                    self._cache_full_blocks(req, block_ids, num_tokens)
                return []
        assert not hit_ids or self.enable_prefix_caching, "prefix hits with prefix caching off"
        assert not hit_ids or not (block_ids or req.num_computed_tokens), "hits only at admission"
        num_tokens = req.num_computed_tokens + len(hit_ids) * self.block_size + num_new_tokens
        num_required = -(-num_tokens // self.block_size)
        num_new_blocks = max(0, num_required - len(block_ids) - len(hit_ids))
        assert all(
            self.blocks[block_id].block_hash == req.block_hashes[i]
            for i, block_id in enumerate(hit_ids)
        ), "hit block evicted since get_computed_blocks"
        # Free hit blocks leave the free queue, so they cannot be handed out as new blocks too.
        num_free_hits = sum(1 for block_id in hit_ids if self.blocks[block_id].ref_cnt == 0)
        if num_new_blocks > self.num_free_blocks - num_free_hits:
            return None

        # Commit: nothing below can fail.
        block_ids = self.req_to_block_ids.setdefault(req.req_id, [])
        for block_id in hit_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self.free_queue[block_id]
            block.ref_cnt += 1
        block_ids.extend(hit_ids)
        if hit_ids:
            self.num_cached_blocks[req.req_id] = len(hit_ids)
        new_block_ids = [self._pop_free_block() for _ in range(num_new_blocks)]
        block_ids.extend(new_block_ids)
        if self.enable_prefix_caching:
            self._cache_full_blocks(req, block_ids, num_tokens)
        return new_block_ids

    def free(self, req: Request) -> None:
        """Drop the request's references (finished, aborted or preempted)."""
        block_ids = self.req_to_block_ids.pop(req.req_id, [])
        self.num_cached_blocks.pop(req.req_id, None)
        # Tail first, so the tail's cached blocks sit nearer the front (evicted sooner).
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0
            if block.ref_cnt == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Refused (False) while any request holds blocks, as in vLLM:
        their block tables would keep blocks registered under keys no longer in the cache."""
        if self.num_free_blocks != self.num_blocks - 1:
            num_held = self.num_blocks - 1 - self.num_free_blocks
            logger.warning("prefix cache not reset: %d blocks still held", num_held)
            return False
        for block_id in self.cached_blocks.values():
            self.blocks[block_id].block_hash = None
        self.cached_blocks.clear()
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its KV is about to be overwritten
            del self.cached_blocks[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block_id

    def _cache_full_blocks(self, req: Request, block_ids: list[int], num_tokens: int) -> None:
        """Register the blocks that will be full once `num_tokens` tokens are computed. Only
        tokens already in `token_ids` can be hashed (a block reserved ahead is not full yet)."""
        num_full_blocks = min(num_tokens, req.num_tokens) // self.block_size
        num_cached = self.num_cached_blocks.get(req.req_id, 0)
        if num_full_blocks <= num_cached:
            return
        self._update_block_hashes(req, num_full_blocks)
        for i in range(num_cached, num_full_blocks):
            block = self.blocks[block_ids[i]]
            block_hash = req.block_hashes[i]
            if block_hash not in self.cached_blocks:
                block.block_hash = block_hash
                self.cached_blocks[block_hash] = block.block_id
        self.num_cached_blocks[req.req_id] = num_full_blocks

    def _update_block_hashes(self, req: Request, num_blocks: int) -> None:
        """Extend `req.block_hashes` to its first `num_blocks` full blocks (only new ones)."""
        bs = self.block_size
        for i in range(len(req.block_hashes), min(num_blocks, req.num_tokens // bs)):
            parent = req.block_hashes[i - 1] if i else None
            start = i * bs
            token_ids = req.token_ids[start : start + bs]
            req.block_hashes.append(hash_block(parent, token_ids, _mm_extra_keys(req, start, bs)))


def _mm_extra_keys(req: Request, start: int, block_size: int) -> tuple[tuple[str, int], ...]:
    """(mm_hash, item offset relative to the block start) of each media item overlapping the block
    [start, start + block_size): placeholder token ids are equal for every image, so without the
    media hash two different images would share KV."""
    end = start + block_size
    return tuple(
        (item.mm_hash, item.placeholder.offset - start)
        for item in req.mm_items
        if item.placeholder.offset < end
        and item.placeholder.offset + item.placeholder.length > start
    )
