"""Continuous-batching scheduler with chunked prefill, an encoder budget and preemption.

No prefill or decode phase (as in vLLM V1): every step, each request's computed tokens catch up
towards its token count, within a per-step token budget. Running requests go first, in arrival
order; when KV blocks run out, the most recently admitted running request is preempted (its
blocks freed, recomputed later from scratch, with the tokens it already produced). Waiting
requests are admitted in FCFS order while budget, blocks and `max_num_seqs` allow.

Async scheduling (as vLLM V1's): the engine plans step N+1 while the GPU runs step N, before
step N's tokens are known. A request sampled by step N has one pending token; it is planned as if
it were there (`Request.num_planned_tokens`) and is not planned further once every token it may
have is sampled or pending (`all_tokens_planned`), so a length-limited request wastes no step.

A media item is encoded whole in the step where the first chunk overlapping its placeholder
range is scheduled; if the encoder budget or the encoder cache cannot take it this step, the
chunk stops right before the item. Encoder outputs stay in the encoder cache, referenced by the
request, until the request has computed past the item.
"""

from collections import deque
from dataclasses import dataclass, field

from mm_runtime.gpu_worker.encoder_cache import EncoderCache
from mm_runtime.gpu_worker.kv_cache import KVCacheManager
from mm_runtime.gpu_worker.request import Request, RequestStatus
from mm_runtime.shared.config import GpuWorkerConfig


@dataclass(slots=True)
class ScheduledRequest:
    req: Request
    start: int  # num_computed_tokens before this step
    num_new_tokens: int
    end: int = field(init=False)  # start + num_new_tokens
    # The step computes the request's last known token, so its logits give the next one. Set
    # once here: the step reads it per request several times, and the tokens don't change
    # until the step's output is applied.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.end = self.start + self.num_new_tokens
        self.samples = self.end == self.req.num_planned_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # (request, item index) to encode this step; each mm_hash appears once.
    encoder_inputs: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass(slots=True)
class _StepBudget:
    tokens: int
    encoder_tokens: int
    encoder_reserved: int = 0  # encoder-cache tokens of items already planned this step
    new_hashes: set[str] = field(default_factory=set)  # items encoded this step


class Scheduler:
    def __init__(
        self, config: GpuWorkerConfig, kv: KVCacheManager, encoder_cache: EncoderCache
    ) -> None:
        self.config = config
        self.kv = kv
        self.encoder_cache = encoder_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = _StepBudget(
            tokens=self.config.max_num_batched_tokens,
            encoder_tokens=self.config.encoder_budget_per_step,
        )
        self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        self._count_encoder_lookups(out)
        for s in out.scheduled:
            s.req.num_computed_tokens = s.end
            if s.samples:
                s.req.num_pending_tokens += 1  # until the engine applies this step's output
        return out

    def _count_encoder_lookups(self, out: SchedulerOutput) -> None:
        """One encoder-cache hit or miss per item, in the step whose chunk takes the item's first
        token: a miss if this request encodes it, a hit if the cache held it or another request
        encodes it this step. Counted here, once the step is final: a request that waits for
        encoder budget is planned again every step, and counting there counted each step (500
        images gave 10133 misses in a load test)."""
        encoded = {(id(req), index) for req, index in out.encoder_inputs}
        for s in out.scheduled:
            if s.start >= s.req.num_prompt_tokens:
                continue  # a decode: items lie in the prompt (the step's common case, kept cheap)
            for index, item in enumerate(s.req.mm_items):
                if s.start <= item.placeholder.offset < s.end:
                    self.encoder_cache.count_lookup(hit=(id(s.req), index) not in encoded)

    def _schedule_running(self, out: SchedulerOutput, budget: _StepBudget) -> None:
        i = 0
        while i < len(self.running) and budget.tokens > 0:
            req = self.running[i]
            start = req.num_computed_tokens
            if req.all_tokens_planned:
                i += 1  # its last token is in flight: nothing left to compute
                continue
            n = self._fit_encoder(
                req, start, min(req.num_planned_tokens - start, budget.tokens), budget, out
            )
            if n == 0:
                i += 1
                continue
            while self.kv.allocate_slots(req, n) is None:
                victim = self.running.pop()  # lowest priority: admitted last
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.PREEMPTED:
                self._unplan_encoder(req, out, budget)
                break
            out.scheduled.append(ScheduledRequest(req, start, n))
            budget.tokens -= n
            i += 1

    def _schedule_waiting(self, out: SchedulerOutput, budget: _StepBudget) -> None:
        while self.waiting and budget.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit_block_ids, num_hit_tokens = self.kv.get_computed_blocks(req)
            n = min(req.num_planned_tokens - num_hit_tokens, budget.tokens)
            n = self._fit_encoder(req, num_hit_tokens, n, budget, out)
            if n == 0 or self.kv.allocate_slots(req, n, hit_block_ids) is None:
                self._unplan_encoder(req, out, budget)
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_hit_tokens, n))
            budget.tokens -= n

    def _fit_encoder(
        self, req: Request, start: int, n: int, budget: _StepBudget, out: SchedulerOutput
    ) -> int:
        """Shrinks the chunk [start, start+n) to stop before the first item that cannot be
        encoded this step; plans the encoding of the items it overlaps."""
        for index, item in enumerate(req.mm_items):
            offset, length = item.placeholder.offset, item.placeholder.length
            if offset >= start + n or offset + length <= start:
                continue  # outside the chunk
            h = item.mm_hash
            if self.encoder_cache.contains(h):
                self.encoder_cache.acquire(h, req.req_id)  # no eviction may take it this step
                continue
            if h in budget.new_hashes:
                continue  # another request encodes it this step
            first_item = not budget.new_hashes
            fits_budget = length <= budget.encoder_tokens or first_item
            if not fits_budget or not self.encoder_cache.can_allocate(
                length, budget.encoder_reserved
            ):
                return max(0, offset - start)
            budget.new_hashes.add(h)
            budget.encoder_tokens -= length
            budget.encoder_reserved += length
            out.encoder_inputs.append((req, index))
        return n

    def _unplan_encoder(self, req: Request, out: SchedulerOutput, budget: _StepBudget) -> None:
        """Drops the encoder work planned for a request that ended up not scheduled."""
        for r, index in [e for e in out.encoder_inputs if e[0] is req]:
            item = r.mm_items[index]
            out.encoder_inputs.remove((r, index))
            budget.new_hashes.discard(item.mm_hash)
            budget.encoder_tokens += item.placeholder.length
            budget.encoder_reserved -= item.placeholder.length
        self.encoder_cache.release_request(req.req_id)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self.encoder_cache.release_request(req.req_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def release_finished_items(self, req: Request) -> None:
        """After a step: encoder outputs the request has computed past are no longer needed."""
        for item in req.mm_items:
            if item.placeholder.offset + item.placeholder.length <= req.num_computed_tokens:
                self.encoder_cache.release(item.mm_hash, req.req_id)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Removes a request from the queues and frees everything it holds."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        self.encoder_cache.release_request(req.req_id)
