"""One frozen config object per process, built once from the CLI or the `LLM(...)` arguments."""

from dataclasses import dataclass, field

from mm_runtime.shared.errors import ConfigError


@dataclass(frozen=True, slots=True)
class GpuWorkerConfig:
    """Everything the engine core (scheduler, KV cache, model runner) needs to know."""

    model: str  # a Hugging Face model directory
    device: str = "auto"  # "auto" picks cuda when available
    dtype: str = "auto"  # "auto": the checkpoint's dtype on GPU, float32 on CPU
    load_format: str = "auto"  # "dummy": random weights of the real shapes, no safetensors read
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256  # running requests per step
    max_num_batched_tokens: int = 8192  # tokens (prefill chunks + decodes) per step
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_gb (CPU) or free GPU memory
    kv_cache_memory_gb: float = 1.0  # KV pool size on CPU, where no memory profile is made
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # Encoder outputs cached on the device, in tokens; None: max(max_num_batched_tokens, 8192).
    encoder_cache_tokens: int | None = None
    # Encoder tokens computed per step; None: max_num_batched_tokens. An item is encoded whole.
    max_encoder_tokens_per_step: int | None = None
    seed: int = 0  # seeds the dummy weights and unseeded sampling
    # Run every step eagerly: no CUDA graphs for decode steps (a debugging and memory knob).
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ConfigError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"unknown dtype {self.dtype!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")

    @property
    def encoder_cache_size(self) -> int:
        return self.encoder_cache_tokens or max(self.max_num_batched_tokens, 8192)

    @property
    def encoder_budget_per_step(self) -> int:
        return self.max_encoder_tokens_per_step or self.max_num_batched_tokens


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    """The frontend process: sockets, media limits, the feature-cache mirror, its workers."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000  # HTTP (OpenAI API)
    served_model_name: str | None = None  # the HTTP API's model name; None: the model directory
    zmq_port: int = 5570  # the SDK's ROUTER socket
    preprocess_workers: int = 2
    feature_cache_gb: float = 4.0  # both sides of the mirrored feature cache
    allowed_local_media_path: str | None = None
    # Jinja text replacing the model's chat template (the CLI reads --chat-template's file).
    chat_template: str | None = None
    # Hosts whose http(s) image URLs are fetched; none by default, so a request cannot make the
    # server reach into its own network (SSRF) unless the operator lists the hosts.
    allowed_media_domains: tuple[str, ...] = ()
    media_fetch_timeout_s: float = 10.0  # per http(s) image URL, connect and each read
    max_media_fetch_mb: float = 32.0  # an http(s) image larger than this fails its request
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_request_body_mb: float = 64.0  # larger HTTP bodies get 413 before they are parsed
    # Requests in the frontend (preparing or generating) beyond which new ones get 429; the
    # GPU worker's own queue is bounded by this too, so memory stays bounded under overload.
    max_waiting_requests: int = 4096
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 4})
    ready_timeout_s: float = 900.0  # model loading on the GPU worker

    def __post_init__(self) -> None:
        if self.preprocess_workers < 1:
            raise ConfigError("preprocess_workers must be >= 1")
        if self.feature_cache_gb < 0:
            raise ConfigError("feature_cache_gb must be >= 0")
        if self.max_waiting_requests < 1:
            raise ConfigError("max_waiting_requests must be >= 1")
        if self.max_request_body_mb <= 0 or self.max_media_fetch_mb <= 0:
            raise ConfigError("max_request_body_mb and max_media_fetch_mb must be > 0")
        if self.media_fetch_timeout_s <= 0:
            raise ConfigError("media_fetch_timeout_s must be > 0")
        for port in (self.port, self.zmq_port):
            if not 0 <= port < 65536:
                raise ConfigError(f"port {port} out of range")

    @property
    def feature_cache_bytes(self) -> int:
        return int(self.feature_cache_gb * 2**30)

    @property
    def max_request_body_bytes(self) -> int:
        return int(self.max_request_body_mb * 2**20)

    @property
    def max_media_fetch_bytes(self) -> int:
        return int(self.max_media_fetch_mb * 2**20)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def parse_domains(text: str) -> tuple[str, ...]:
    """`example.com, Cdn.Example.com` -> ("example.com", "cdn.example.com")."""
    return tuple(d.strip().lower() for d in text.split(",") if d.strip())


def parse_limit_mm_per_prompt(text: str) -> dict[str, int]:
    """`image=4,video=1` -> {"image": 4, "video": 1}."""
    limits: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ConfigError(f"--limit-mm-per-prompt wants modality=N[,...], got {text!r}")
        limits[name.strip()] = int(value)
    return limits
