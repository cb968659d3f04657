"""Qwen2-VL: transformers' ViT (dynamic resolution, patch merger) and our Qwen2 decoder with M-RoPE.

M-RoPE gives every prompt token three positions (temporal, height, width). Text tokens have three
equal positions counting up; an image's tokens take a grid (t, h, w) offset by the position where
the image starts, and the text after it resumes at start + max(h, w). Tokens generated later use
their index plus `mrope_delta` (max prompt position + 1 - prompt length) in all three sections,
exactly as transformers' `get_rope_index` / `compute_3d_position_ids`.
"""

import torch
from transformers import PretrainedConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from mm_runtime.gpu_worker.layers.attention import AttentionBackend
from mm_runtime.gpu_worker.models.base import MultimodalModel, item_tensor
from mm_runtime.gpu_worker.request import Request
from mm_runtime.shared.errors import InvalidRequest
from mm_runtime.shared.model_info import num_image_tokens
from mm_runtime.shared.wire import MMItem


class Qwen2VLModel(MultimodalModel):
    checkpoint_prefixes = [
        ("model.language_model.", "language_model."),  # transformers 5 save_pretrained
        ("model.visual.", "visual."),
        (
            "model.",
            "language_model.",
        ),  # hub layout (Qwen/Qwen2-VL-*): LM at model.*, ViT at visual.*
    ]

    def __init__(self, config: PretrainedConfig, backend: AttentionBackend) -> None:
        super().__init__(config, backend)
        self.visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.spatial_merge_size: int = config.vision_config.spatial_merge_size

    def item_length(self, item: MMItem) -> int:
        vision = self.config.vision_config
        grid = item_tensor(item, "image_grid_thw", 2)  # [1, 3]: (t, h, w) in patches
        pixels = item_tensor(item, "pixel_values", 2)  # [t * h * w, channels * t_patch * p * p]
        if grid.shape != (1, 3):
            raise InvalidRequest(f"image_grid_thw of shape {tuple(grid.shape)}, expected (1, 3)")
        t, h, w = (int(x) for x in grid[0])
        merge = self.spatial_merge_size
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise InvalidRequest(f"image_grid_thw {[t, h, w]} is not a valid patch grid")
        if tuple(pixels.shape) != (t * h * w, patch_dim):
            raise InvalidRequest(
                f"pixel_values of shape {tuple(pixels.shape)}, expected {(t * h * w, patch_dim)}"
            )
        return num_image_tokens(self.config, item.tensors)

    def encode(self, items: list[MMItem]) -> list[torch.Tensor]:
        if not items:
            return []
        param = next(self.visual.parameters())
        pixels = torch.cat([it.tensors["pixel_values"] for it in items]).to(
            param.device, param.dtype
        )
        grid_thw = torch.cat([it.tensors["image_grid_thw"] for it in items]).to(param.device)
        out = self.visual(pixels, grid_thw=grid_thw)
        # transformers >= 5.x returns a ModelOutput whose pooler_output is the merged features.
        merged = out if isinstance(out, torch.Tensor) else out.pooler_output  # [tokens, hidden]
        sizes = (grid_thw.prod(-1) // self.spatial_merge_size**2).tolist()
        return list(merged.split(sizes))

    def prepare_request(self, req: Request) -> None:
        chunks: list[torch.Tensor] = []  # each [3, n]
        cursor = 0  # next prompt token index
        position = 0  # next position id
        for item in sorted(req.mm_items, key=lambda it: it.placeholder.offset):
            num_text = item.placeholder.offset - cursor
            chunks.append(torch.arange(position, position + num_text).expand(3, -1))
            position += num_text
            t, h, w = (int(x) for x in item.tensors["image_grid_thw"].reshape(-1, 3)[0])
            h, w = h // self.spatial_merge_size, w // self.spatial_merge_size
            grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            chunks.append(torch.stack(grid).reshape(3, -1) + position)
            position += max(h, w)
            cursor = item.placeholder.offset + item.placeholder.length
        num_text = req.num_prompt_tokens - cursor
        chunks.append(torch.arange(position, position + num_text).expand(3, -1))
        req.mrope_positions = torch.cat(chunks, dim=1)  # [3, num_prompt_tokens]
        req.mrope_delta = int(req.mrope_positions.max()) + 1 - req.num_prompt_tokens

    def positions(self, req: Request, start: int, end: int) -> torch.Tensor:
        assert req.mrope_positions is not None
        prompt_end = min(end, req.num_prompt_tokens)
        parts = [req.mrope_positions[:, start:prompt_end]]
        if end > req.num_prompt_tokens:  # generated tokens: index + delta in all three sections
            gen = torch.arange(max(start, req.num_prompt_tokens), end) + req.mrope_delta
            parts.append(gen.expand(3, -1))
        return torch.cat(parts, dim=1)  # [3, end - start]
