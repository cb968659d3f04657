"""Rotary position embedding: 1-D (Llama) and Qwen2-VL's 3-section M-RoPE.

The inverse frequencies come from transformers' own rope-init functions, so every rope type a
config can name (default, linear, dynamic, llama3, yarn, ...) matches Hugging Face exactly.
The decoder computes cos/sin once per step (`prepare`) and every layer applies them (`apply`):
in torch on the CPU, with the csrc/ kernel in place on CUDA tensors.
"""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mm_runtime.gpu_worker import kernels


def rope_parameters(config: PretrainedConfig) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs at the top level."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    return {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given positions [num_tokens] or, with M-RoPE, [3, num_tokens]."""

    def __init__(self, config: PretrainedConfig, head_dim: int) -> None:
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in ("default", "mrope"):  # old Qwen2-VL configs name M-RoPE as a type
            base = params["rope_theta"]
            # On the CPU, as the init functions below: the loader builds under `torch.device`,
            # and CUDA's pow differs from the CPU's in the last bit of some frequencies.
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
            inv_freq = 1.0 / (base**exponents)
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        # A plain attribute, not a buffer: `model.to(bfloat16)` must not round the frequencies.
        self.inv_freq = inv_freq  # [head_dim // 2] float32
        self.attention_scaling = scaling
        # Qwen2-VL: the rotary dims are split into (temporal, height, width) sections.
        self.mrope_section: list[int] | None = params.get("mrope_section")

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # [(3,) num_tokens, head_dim // 2]
        if self.mrope_section is not None:
            if freqs.dim() == 2:  # text-only positions: the three sections are equal
                freqs = freqs.expand(3, -1, -1)
            sections = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([s[i % 3] for i, s in enumerate(sections)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)  # [num_tokens, head_dim]
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]  # broadcast over heads

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The step's cos/sin for `apply`: [num_tokens, 1, head_dim] for the torch path, the
        first halves [num_tokens, head_dim // 2] for the kernel (the halves are equal)."""
        cos, sin = self.cos_sin(positions, dtype)
        if positions.is_cuda:
            half = cos.shape[-1] // 2
            return cos[:, 0, :half].contiguous(), sin[:, 0, :half].contiguous()
        return cos, sin

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]
        if q.is_cuda:
            q, k = q.contiguous(), k.contiguous()  # views of the fused QKV output
            kernels.apply_rotary(q, k, cos, sin)
            return q, k
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch reference: cos/sin and the rotation in one call."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin
