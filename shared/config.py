"""One frozen config object per process, built once from the CLI or the `LLM(...)` arguments."""

from dataclasses import dataclass

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
