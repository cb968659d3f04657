"""What crosses a process boundary, defined once: every message of every socket.

msgspec structs sent as msgpack by `shared/zmq_io.py`; tensors are fields typed `torch.Tensor`,
which travel as out-of-band ZMQ frames. Each socket carries one tagged union of map-encoded
structs (msgspec unions cannot mix in array-like ones); `PROTOCOL_VERSION` is checked on every
message. The in-process `LLM` passes the same objects without serializing them.

Sockets (DESIGN.md section 4):
- SDK clients (DEALER) <-> frontend (ROUTER, TCP): `ClientMessage` in, `FrontendReply` out.
- frontend (PUSH) -> GPU worker (PULL): `GpuWorkerInput`, one ordered channel, so the feature
  cache operations carried in `AddRequest`s are applied in the order the mirror applied them.
- GPU worker (PUSH) -> frontend (PULL): `GpuWorkerOutput`.
- frontend (ROUTER) <-> preprocess workers (DEALER): `PreprocessJob` out, `PreprocessReply` in.
"""

import msgspec
import torch

from mm_runtime.shared.errors import InvalidRequest

PROTOCOL_VERSION = 1
_INT64_MAX = 2**63 - 1


class TensorRef(msgspec.Struct, array_like=True, frozen=True):
    """How a tensor field travels: dtype and shape here, the bytes in frame `frame` of the
    multipart message (or inline in `data` when small)."""

    dtype: str
    shape: list[int]
    frame: int  # index among the message's tensor frames; -1 when inline
    data: bytes | None = None


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
        if self.top_k > _INT64_MAX:  # the sampler holds top_k in an int64 tensor
            raise InvalidRequest(f"top_k must be at most {_INT64_MAX}, got {self.top_k}")
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

    `tensors` are the HF processor's outputs for this item alone, up to its last integer step:
    `pixel_values` is a uint8 image, which the GPU worker rescales, normalizes and patchifies on
    the device (gpu_worker/models/pixels.py). LLaVA's is resized and cropped, [1, channels,
    height, width]; Qwen2-VL's is the decoded image, [1, height, width, channels], resized on the
    device to `image_grid_thw`'s size (shared/image_resize.py; one over max_pixels comes
    resized). `mm_hash` keys the encoder cache, the prefix cache and the feature cache. On the
    frontend -> GPU worker channel, `tensors` is None for a feature-cache hit: the GPU worker
    fills it from its cache on arrival (DESIGN.md section 3).
    """

    modality: str
    mm_hash: str
    placeholder: PlaceholderRange
    tensors: dict[str, torch.Tensor] | None = None


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


class Usage(msgspec.Struct, array_like=True, frozen=True):
    prompt_tokens: int  # media placeholder tokens included
    completion_tokens: int


# ---- SDK client <-> frontend -------------------------------------------------------------------


class TextPart(msgspec.Struct, tag_field="type", tag="text", frozen=True):
    text: str


class ImageURL(msgspec.Struct, frozen=True):
    url: str  # data URL, file:// URL or local path (under --allowed-local-media-path)


class ImageURLPart(msgspec.Struct, tag_field="type", tag="image_url", frozen=True):
    image_url: ImageURL


class ImageBytesPart(msgspec.Struct, tag_field="type", tag="image_bytes", frozen=True):
    """Raw encoded image bytes (PNG, JPEG, ...): what the SDK sends for PIL images and paths."""

    data: bytes


ContentPart = TextPart | ImageURLPart | ImageBytesPart


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str | list[ContentPart]


class GenerateRequest(msgspec.Struct, tag="generate", kw_only=True):
    """A completion (`prompt` + `images`, one placeholder per image in the prompt, or the prompt
    already tokenized as `prompt_token_ids`, without images) or a chat (`messages`, images as
    content parts). Exactly one of prompt / prompt_token_ids / messages."""

    req_id: str  # unique per client connection
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None  # used as they are: no special tokens added
    images: list[ImageBytesPart | ImageURLPart] = msgspec.field(default_factory=list)
    messages: list[ChatMessage] | None = None
    sampling_params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = False


class AbortRequest(msgspec.Struct, tag="abort"):
    req_id: str


class HealthRequest(msgspec.Struct, tag="health"):
    pass


ClientMessage = GenerateRequest | AbortRequest | HealthRequest


class RequestDelta(msgspec.Struct, tag="delta", kw_only=True, omit_defaults=True):
    """New output of a request: when streaming, each step's delta; otherwise one final message
    with everything. `finish_reason` set on the last one, which also carries `usage`."""

    req_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None


class RequestFailed(msgspec.Struct, tag="failed"):
    req_id: str
    error: ErrorInfo


class HealthReply(msgspec.Struct, tag="health_reply", kw_only=True):
    ok: bool
    # Counters and gauges of every process, by metric name (DESIGN.md section 6 names).
    stats: dict[str, float]


class Ping(msgspec.Struct, tag="ping"):
    """Sent now and then to clients with requests in flight: a client that went away makes the
    send fail (ROUTER_MANDATORY), which aborts its requests. Clients ignore it."""


FrontendReply = RequestDelta | RequestFailed | HealthReply | Ping


# ---- frontend -> GPU worker --------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag="add", kw_only=True):
    """A tokenized request. `feature_epoch`: the mirror generation its cache operations were
    decided in; the GPU worker applies them only in the same generation (see FeatureCacheReset)."""

    request: EngineRequest
    feature_epoch: int


class AbortRequests(msgspec.Struct, tag="abort"):
    req_ids: list[str]


class StatsRequest(msgspec.Struct, tag="stats_request"):
    query_id: int


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


GpuWorkerInput = AddRequest | AbortRequests | StatsRequest | Shutdown


# ---- GPU worker -> frontend --------------------------------------------------------------------


class WorkerReady(msgspec.Struct, tag="ready", kw_only=True):
    max_model_len: int
    num_kv_blocks: int
    device: str
    dtype: str


class StepOutputs(msgspec.Struct, tag="outputs"):
    outputs: list[EngineOutput]


class FeatureCacheReset(msgspec.Struct, tag="reset"):
    """The GPU worker lacked features it was told it held: it emptied its cache and starts
    generation `epoch`; the frontend empties its mirror and tags later requests with it."""

    epoch: int


class WorkerStats(msgspec.Struct, tag="stats", kw_only=True):
    query_id: int
    stats: dict[str, float]
    feature_cache_keys: list[str]  # for tests that compare both sides of the cache


GpuWorkerOutput = WorkerReady | StepOutputs | FeatureCacheReset | WorkerStats


# ---- frontend <-> preprocess workers -----------------------------------------------------------


class PreprocessJob(msgspec.Struct, tag="job"):
    job_id: int
    modality: str
    data: bytes  # the encoded media, decoded in the worker


class PreprocessResult(msgspec.Struct, tag="result", kw_only=True):
    job_id: int
    tensors: dict[str, torch.Tensor]
    num_tokens: int  # placeholder tokens this item expands to
    seconds: float  # decode + processor time, for mm_runtime_preprocess_seconds


class PreprocessFailed(msgspec.Struct, tag="failed"):
    job_id: int
    error: ErrorInfo


class PreprocessReady(msgspec.Struct, tag="ready"):
    pid: int


PreprocessReply = PreprocessResult | PreprocessFailed | PreprocessReady
