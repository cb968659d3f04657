"""Our decoder for the Llama family and Qwen2 (QKV bias, tied embeddings, M-RoPE).

Runs a flattened variable-length batch (tokens of all requests concatenated, no padding) and
reads/writes the paged KV cache through the attention backend. Takes input embeddings, so the
multimodal wrapper can merge encoder outputs at placeholder positions before the first layer.
Follows transformers' LlamaModel / Qwen2VLTextModel operation for operation, so float32 on CPU
reproduces Hugging Face's greedy tokens.
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from mm_runtime.gpu_worker import kernels
from mm_runtime.gpu_worker.layers.activation import SiluAndMul
from mm_runtime.gpu_worker.layers.attention import Attention, AttentionBackend, AttentionMetadata
from mm_runtime.gpu_worker.layers.linear import MergedLinear
from mm_runtime.gpu_worker.layers.norm import RMSNorm
from mm_runtime.gpu_worker.layers.rotary import RotaryEmbedding


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderAttention(nn.Module):
    def __init__(
        self, config: PretrainedConfig, rotary: RotaryEmbedding, backend: AttentionBackend
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        # Qwen2 has bias on q/k/v only; Llama's `attention_bias` covers o_proj too.
        qkv_bias = config.model_type.startswith("qwen2") or getattr(config, "attention_bias", False)
        o_bias = getattr(config, "attention_bias", False) and not config.model_type.startswith(
            "qwen"
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, backend)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        qkv: torch.Tensor,  # [num_tokens, q_size + 2 * kv_size]: qkv_proj's output
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        out = self.attn(qkv, self.rotary, rope, kv_cache, meta)  # [num_tokens, heads, head_dim]
        return _linear(self.o_proj, out.reshape(qkv.shape[0], self.q_size))


class DecoderMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=bias
        )
        self.act = SiluAndMul()
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        # Applied by DecoderLayer: gate_up_proj and act fuse with the norm before them on CUDA.


def _linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x); csrc/gemv.cu's weight stream for a decode batch of 1 or 2 on CUDA (cuBLAS took
    6.7 against 3.0 us for Qwen2-VL-2B's O projection at one row on an H200, 12.0 against 9.4
    for its down projection: bench/decode_linear.py)."""
    if kernels.gemv_fits(x, linear.weight):
        return kernels.small_linear(x.contiguous(), linear.weight, linear.bias)
    return linear(x)


def _norm_then_linear(
    norm: RMSNorm,
    linear: nn.Linear,
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    act: SiluAndMul | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(linear(norm(hidden + residual))), the new residual): one csrc/gemv.cu kernel for a
    small decode batch on CUDA, where the norm and the activation are otherwise two of a layer's
    small kernels (at batch 1 their launches, not their bytes, are what they cost)."""
    if kernels.gemv_fits(hidden, linear.weight):
        return kernels.norm_linear(
            hidden.contiguous(),
            residual,
            norm.weight,
            norm.eps,
            linear.weight,
            linear.bias,
            silu_pairs=act is not None,
        )
    hidden, residual = norm(hidden, residual)
    out = linear(hidden)
    return (out if act is None else act(out)), residual


class DecoderLayer(nn.Module):
    def __init__(
        self, config: PretrainedConfig, rotary: RotaryEmbedding, backend: AttentionBackend
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config, rotary, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DecoderMLP(config)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = _norm_then_linear(self.input_layernorm, attn.qkv_proj, hidden, residual)
        hidden = attn(rope, qkv, kv_cache, meta)
        act, residual = _norm_then_linear(
            self.post_attention_layernorm, mlp.gate_up_proj, hidden, residual, mlp.act
        )
        return _linear(mlp.down_proj, act), residual


class Decoder(nn.Module):
    """Embeddings, layers and final norm; `compute_logits` applies the (maybe tied) LM head."""

    # HF checkpoint names that our fused parameters absorb: hf name part -> (ours, shard id).
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config, head_dim_of(config))
        self.layers = nn.ModuleList(
            DecoderLayer(config, self.rotary, backend) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def uses_mrope(self) -> bool:
        return self.rotary.mrope_section is not None

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [num_tokens, hidden]
        positions: torch.Tensor,  # [num_tokens], or [3, num_tokens] with M-RoPE
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden, residual = inputs_embeds, None
        rope = self.rotary.prepare(positions, inputs_embeds.dtype)  # once for all layers
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden  # [num_tokens, hidden]
