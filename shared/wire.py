"""What crosses a process boundary: the request the GPU worker consumes and what it sends back.

msgspec structs, so the multi-process runtime can send them as msgpack; tensors are fields typed
`torch.Tensor`, which the ZMQ layer moves as out-of-band frames. The in-process `LLM` passes the
same objects without serializing them.
"""

import msgspec
import torch

from mm_runtime.shared.errors import InvalidRequest

PROTOCOL_VERSION = 1


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to sample one request, shaped like vLLM's `SamplingParams`.

    temperature 0 is greedy; top_k 0 (or -1) and top_p 1.0 disable those filters; a `seed` makes
    the request's samples reproducible whatever else runs in the same batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # also return this many top logprobs per sampled token

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k < 0:
            self.top_k = 0
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0:  # written so that NaN fails too
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise InvalidRequest(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class PlaceholderRange(msgspec.Struct, array_like=True, frozen=True):
    """Where one item's encoder outputs go in the prompt: positions [offset, offset+length)."""

    offset: int
    length: int


class MMItem(msgspec.Struct, kw_only=True):
    """One preprocessed media item of a request.

    `tensors` are the HF processor's outputs for this item alone (e.g. `pixel_values`, and
    `image_grid_thw` for Qwen2-VL); `mm_hash` keys the encoder cache and the prefix cache.
    """

    modality: str
    mm_hash: str
    placeholder: PlaceholderRange
    tensors: dict[str, torch.Tensor]


class EngineRequest(msgspec.Struct, kw_only=True):
    """A tokenized request with its placeholders already expanded: final before the GPU worker."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    mm_items: list[MMItem] = msgspec.field(default_factory=list)


class Logprob(msgspec.Struct, array_like=True, frozen=True):
    token_id: int
    logprob: float


class TokenLogprobs(msgspec.Struct, array_like=True, frozen=True):
    """The sampled token's logprob and the top-n alternatives at one position."""

    sampled: Logprob
    top: list[Logprob]


class ErrorInfo(msgspec.Struct, array_like=True, frozen=True):
    code: str
    message: str
    req_id: str


class EngineOutput(msgspec.Struct, kw_only=True):
    """What one engine step produced for one request: only the new tokens (a diff)."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    error: ErrorInfo | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
