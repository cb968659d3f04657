"""Qwen2-VL's vision transformer: patch embedding, blocks with 2-D rotary and full attention
within each image (each frame of a video), and the 2x2 patch merger.

Ours rather than transformers' module because the ViT is most of an image request's GPU time
(transformers' ViT took 10.7 s of the 15.3 s of model time for 300 VisionArena-like requests on
Qwen2-VL-2B), and that module spends much of it on float32 copies for the rotary, three-op
activations and the slower of torch's attention kernels (bench/vision_encoder.py compares).
Parameter names are transformers' (`blocks.0.attn.qkv.weight`, ...), so checkpoints load
unchanged. On the CPU every operation is transformers' own (float32 outputs are bit-equal, see
tests/gpu_worker/test_qwen2_vl_vision.py). On CUDA:
- the patch embedding is one GEMM: a Conv3d whose stride equals its kernel is a linear map of
  each flattened patch, so no 3-D convolution is needed;
- cos/sin are computed once per forward, and a kernel rotates q and k in place inside the fused
  QKV output (transformers makes float32 copies of q and k in every layer);
- attention is one cuDNN call for all images of the batch, on views of the QKV output
  (layers/cudnn_varlen_attention.py), else one flash SDPA call per image;
- QuickGELU is one in-place kernel instead of three torch ops;
- each residual add is fused into the LayerNorm after it (one kernel instead of two).
"""

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

from mm_runtime.gpu_worker import kernels
from mm_runtime.gpu_worker.layers import cudnn_varlen_attention

# Where cuDNN's varlen graph is missing (no cudnn frontend, or a head dim it does not take):
# flash attention per image first. torch's cuDNN backend is faster at head dim 80 but builds an
# execution plan for every new sequence length (44 ms, measured), and images come in any size.
VISION_SDPA_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
]


def vision_positions(grid_thw: list[tuple[int, int, int]], merge: int) -> np.ndarray:
    """Each patch's (row, column) in its image, [num_patches, 2], in the processor's patch
    order: merge x merge blocks row-major, the patches of a block row-major inside it
    (transformers' `get_vision_position_ids`). A video's frames repeat the grid."""
    out = []
    for t, h, w in grid_thw:
        rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
        cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
        blocks = [
            a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
            for a in (rows, cols)
        ]
        out.append(np.tile(np.stack(blocks, axis=-1), (t, 1)))
    return np.concatenate(out)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_vision(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb_vision: q, k [num_patches, heads, head_dim] rotated
    in float32 by cos/sin [num_patches, head_dim // 2] (the reference of the CUDA kernel)."""
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(-2).float()  # [num_patches, 1, head_dim]
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    q_out = (qf * cos) + (_rotate_half(qf) * sin)
    k_out = (kf * cos) + (_rotate_half(kf) * sin)
    return q_out.to(q.dtype), k_out.to(k.dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,  # [num_patches, dim]
        cos: torch.Tensor,  # [num_patches, head_dim // 2] float32
        sin: torch.Tensor,
        lengths: list[int],  # patches of each image (each video frame), in order
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        if x.is_cuda:
            kernels.apply_rotary_vision(qkv, cos, sin)
            q, k, v = qkv.unbind(1)  # [num_patches, num_heads, head_dim], strided views
            out = _attend_cuda(q, k, v, lengths)
        else:
            out = self._attend_reference(qkv, cos, sin, lengths)
        return self.proj(out.reshape(n, -1))

    def _attend_reference(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        """transformers' VisionAttention with SDPA, operation for operation."""
        q, k, v = qkv.permute(1, 0, 2, 3).unbind(0)
        q, k = rotate_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, head_dim]
        outs = [
            F.scaled_dot_product_attention(qi, ki, vi, dropout_p=0.0, is_causal=False)
            .transpose(1, 2)
            .contiguous()
            for qi, ki, vi in zip(*(t.split(lengths, dim=2) for t in (q, k, v)), strict=True)
        ]
        return torch.cat(outs, dim=1)  # [1, num_patches, heads, head_dim]


def _attend_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    """Non-causal attention within each image, [num_patches, heads, head_dim], on strided views
    of the QKV output (no copies): all images in one cuDNN call (1.5x flash on a 1920x1080
    image, 3.8x on sixteen small ones, bench/vit_attention.py), else one SDPA call per image
    under `VISION_SDPA_BACKENDS`."""
    if cudnn_varlen_attention.supports(q.dtype, q.shape[-1]):
        return cudnn_varlen_attention.varlen_attention(q, k, v, lengths)
    outs = [
        F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in qkv))[0]
        for qkv in zip(*(t.split(lengths) for t in (q, k, v)), strict=True)
    ]  # each [heads, patches, head_dim]
    if len(outs) == 1:
        return outs[0].transpose(0, 1)
    return torch.cat([o.transpose(0, 1) for o in outs])


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[hidden_act]
        self.quick_gelu = hidden_act == "quick_gelu"
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = kernels.quick_gelu_(h) if h.is_cuda and self.quick_gelu else self.act(h)
        return self.fc2(h)


class VisionBlock(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, config.num_heads)
        self.mlp = VisionMlp(dim, int(dim * config.mlp_ratio), config.hidden_act)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        lengths: list[int],
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))

    def forward_fused(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        lengths: list[int],
        next_norm: nn.LayerNorm,
    ) -> torch.Tensor:
        """`forward` with each residual add fused into the LayerNorm after it (CUDA): given
        h = norm1(x), updates x in place to the block's output and returns next_norm(x) (the
        next block's norm1, or the merger's)."""
        h = _add_layer_norm(self.attn(h, cos, sin, lengths), self.norm2, residual=x)
        return _add_layer_norm(self.mlp(h), next_norm, residual=x)


def _add_layer_norm(
    x: torch.Tensor, norm: nn.LayerNorm, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """norm(residual + x), with residual updated in place to the sum; norm(x) without one."""
    return kernels.layer_norm(x, norm.weight, norm.bias, norm.eps, residual)[0]


class PatchEmbed(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.patch_shape = (
            config.in_channels,
            config.temporal_patch_size,
            config.patch_size,
            config.patch_size,
        )
        kernel = self.patch_shape[1:]
        self.proj = nn.Conv3d(
            config.in_channels, config.embed_dim, kernel_size=kernel, stride=kernel, bias=False
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight  # [embed_dim, channels, t_patch, patch, patch]
        pixels = pixels.to(weight.dtype)
        if pixels.is_cuda:  # the flattened patch is (channels, t_patch, patch, patch) already
            return F.linear(pixels.reshape(pixels.shape[0], -1), weight.flatten(1))
        return self.proj(pixels.view(-1, *self.patch_shape)).view(-1, weight.shape[0])


class Qwen2VisionTransformer(nn.Module):
    """[num_patches, patch_dim] pixels of several images -> [num_patches / merge^2, hidden]."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.spatial_merge_size: int = config.spatial_merge_size
        head_dim = config.embed_dim // config.num_heads
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", 10000.0)
        # On the CPU (CUDA's pow differs in the last bit); a plain attribute, so no dtype cast
        # of the module ever rounds it.
        rotary_dim = head_dim // 2  # half the head rotates by row, half by column
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float, device="cpu") / rotary_dim
        self.inv_freq = 1.0 / (theta**exponents)  # [head_dim // 4]
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(
            dim=config.hidden_size,
            context_dim=config.embed_dim,
            spatial_merge_size=config.spatial_merge_size,
        )

    def forward(self, pixels: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        device = pixels.device
        positions = torch.from_numpy(vision_positions(grid_thw, self.spatial_merge_size))
        if device.type == "cuda":  # pinned, so the copy does not wait for the queued work
            positions = positions.pin_memory().to(device, non_blocking=True)
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        freqs = positions[..., None].float() * self.inv_freq  # [patches, 2, head_dim / 4]
        freqs = freqs.flatten(1)  # rows' frequencies, then columns'
        cos, sin = freqs.cos().contiguous(), freqs.sin().contiguous()
        # Each image (each frame of a video) attends within itself.
        lengths = [h * w for t, h, w in grid_thw for _ in range(t)]
        with _sdpa_backends(device):
            x = self.patch_embed(pixels)
            if x.is_cuda and kernels.layer_norm_fits(x):
                return self._blocks_fused(x, cos, sin, lengths)
            for block in self.blocks:
                x = block(x, cos, sin, lengths)
            return self.merger(x)

    def warm_up(self, max_patches: int) -> None:
        """Builds the attention's cuDNN graphs for images of up to max_patches (CUDA)."""
        param = next(self.parameters())
        if param.is_cuda:
            attn = self.blocks[0].attn
            width = attn.num_heads * attn.head_dim
            cudnn_varlen_attention.prebuild(
                param.device, param.dtype, attn.num_heads, attn.head_dim, 3 * width, max_patches
            )

    def _blocks_fused(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        """The blocks and the merger with every residual add fused into the LayerNorm that
        follows it, the merger's ln_q included: per layer two kernels that read two rows and
        write two, where torch ran two adds and two norms (bench/vision_encoder.py)."""
        next_norms = [block.norm1 for block in self.blocks[1:]] + [self.merger.ln_q]
        h = _add_layer_norm(x, self.blocks[0].norm1)
        for block, next_norm in zip(self.blocks, next_norms, strict=True):
            h = block.forward_fused(x, h, cos, sin, lengths, next_norm)
        return self.merger.mlp(h.view(-1, self.merger.hidden_size))  # PatchMerger after ln_q


def _sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type != "cuda":
        return contextlib.nullcontext()  # the CPU reference: SDPA as transformers calls it
    return sdpa_kernel(VISION_SDPA_BACKENDS, set_priority=True)
