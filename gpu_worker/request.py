"""A request's state inside the GPU worker: tokens so far, progress, status.

Derive, don't store: block counts and lengths are properties of the token list, so they cannot
drift from it. The scheduler advances `num_computed_tokens`; the KV cache manager owns blocks.
"""

from dataclasses import dataclass, field
from enum import IntEnum

import torch

from mm_runtime.shared.wire import MMItem, SamplingParams


class RequestStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # lost its KV blocks; back in the waiting queue, recomputes from scratch
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True, eq=False)
class Request:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    mm_items: list[MMItem] = field(default_factory=list)
    # prompt + output tokens; outputs are appended as they are sampled
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (or being written this step)
    # The request's length limit: prompt + max_tokens, capped at the model's maximum length.
    max_num_tokens: int = 0
    # Async scheduling: tokens sampled by steps in flight, not yet in `token_ids` (at most one
    # when the next step is planned; two from then until the older step is applied). The
    # scheduler plans the next step as if they were there; the runner takes their ids from the
    # previous step's sampled tokens on the device.
    num_pending_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # Prefix-cache keys of this request's full blocks, filled lazily by the KV cache manager.
    block_hashes: list[bytes] = field(default_factory=list)
    # Qwen2-VL M-RoPE: [3, num_prompt_tokens] positions and the offset of later (text) positions.
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0
    # Per-request RNG when sampling_params.seed is set: same seed, same tokens, whatever the batch.
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if not self.max_num_tokens:
            self.max_num_tokens = self.num_prompt_tokens + self.sampling_params.max_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_planned_tokens(self) -> int:
        """Tokens known or being sampled: what the scheduler may compute up to."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def all_tokens_planned(self) -> bool:
        """Every output token the request may have is sampled or being sampled."""
        return self.num_planned_tokens >= self.max_num_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_prefill(self) -> bool:
        """True while prompt tokens remain to be computed (a chunk, not a decode)."""
        return self.num_computed_tokens < self.num_prompt_tokens
