"""Qwen2-VL: our ViT (models/qwen2_vl_vision.py: dynamic resolution, patch merger) and our Qwen2
decoder with M-RoPE.

M-RoPE gives every prompt token three positions (temporal, height, width). Text tokens have three
equal positions counting up; an image's tokens take a grid (t, h, w) offset by the position where
the image starts, and the text after it resumes at start + max(h, w). Tokens generated later use
their index plus `mrope_delta` (max prompt position + 1 - prompt length) in all three sections,
exactly as transformers' `get_rope_index` / `compute_3d_position_ids`.
"""

import math

import numpy as np
import torch
from transformers import PretrainedConfig

from mm_runtime.gpu_worker.layers.attention import AttentionBackend
from mm_runtime.gpu_worker.models.base import MultimodalModel, item_tensor
from mm_runtime.gpu_worker.models.pixels import patchify
from mm_runtime.gpu_worker.models.qwen2_vl_vision import Qwen2VisionTransformer
from mm_runtime.gpu_worker.request import Request
from mm_runtime.gpu_worker.scheduler import ScheduledRequest
from mm_runtime.shared.errors import InvalidRequest
from mm_runtime.shared.image_resize import Qwen2VLResize
from mm_runtime.shared.model_info import num_image_tokens
from mm_runtime.shared.wire import MMItem, PlaceholderRange


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
        self.visual = Qwen2VisionTransformer(config.vision_config)
        self.spatial_merge_size: int = config.vision_config.spatial_merge_size
        self.resize = Qwen2VLResize.from_processor(self.pixel_normalizer.hf_processor)

    def item_length(self, item: MMItem) -> int:
        vision = self.config.vision_config
        grid = item_tensor(item, "image_grid_thw", 2)  # [1, 3]: (t, h, w) in patches
        if grid.shape != (1, 3):
            raise InvalidRequest(f"image_grid_thw of shape {tuple(grid.shape)}, expected (1, 3)")
        t, h, w = (int(x) for x in grid[0])
        if t != 1 or min(h, w) < 1 or h % self.spatial_merge_size or w % self.spatial_merge_size:
            raise InvalidRequest(f"image_grid_thw {[t, h, w]} is not a valid patch grid")
        size = (h * vision.patch_size, w * vision.patch_size)
        pixels = item_tensor(item, "pixel_values", 4)  # [1, height, width, channels]
        _, height, width, channels = pixels.shape
        if (
            pixels.dtype != torch.uint8
            or pixels.shape[0] != 1
            or channels != vision.in_channels
            or min(height, width) < 1
        ):
            raise InvalidRequest(
                f"pixel_values of shape {tuple(pixels.shape)} ({pixels.dtype}), expected "
                f"(1, height, width, {vision.in_channels}) uint8"
            )
        if not self.resize.ships_as(height, width, size):
            raise InvalidRequest(
                f"pixel_values of shape {tuple(pixels.shape)} do not resize to image_grid_thw "
                f"{[t, h, w]}"
            )
        return num_image_tokens(self.config, item.tensors)

    def dummy_encoder_items(self, max_tokens: int) -> list[MMItem]:
        # Square images at max_pixels (the most patches one image can have, and the largest
        # ViT attention); the last one keeps only the rows needed to reach max_tokens.
        side, min_rows = self._largest_image()
        merge = self.spatial_merge_size
        items: list[MMItem] = []
        num_tokens = 0
        while num_tokens < max(1, max_tokens):
            rows = min(side, max(min_rows, -(-(max_tokens - num_tokens) // side)))
            items.append(self._dummy_item(len(items), num_tokens, rows * merge, side * merge))
            num_tokens += items[-1].placeholder.length
        return items

    def warm_up(self) -> None:
        side, _ = self._largest_image()
        self.visual.warm_up((side * self.spatial_merge_size) ** 2)

    def _largest_image(self) -> tuple[int, int]:
        """(merged tokens along each side of the largest square image the processor makes, the
        fewest rows of merged tokens an image of that width has), by the loaded processor's
        settings: the ones the preprocess worker sizes images by."""
        factor = self.resize.factor  # image pixels per merged token, along each side
        side = max(1, math.isqrt(self.resize.max_pixels) // factor)
        return side, max(1, -(-self.resize.min_pixels // (factor * factor * side)))

    def _dummy_item(self, index: int, offset: int, grid_h: int, grid_w: int) -> MMItem:
        # At the grid's size, so not resized: the resize's buffers are freed before the ViT
        # reaches its peak, and the profile measures the peak.
        vision = self.config.vision_config
        shape = (1, grid_h * vision.patch_size, grid_w * vision.patch_size, vision.in_channels)
        tensors = {
            "pixel_values": torch.zeros(shape, dtype=torch.uint8),
            "image_grid_thw": torch.tensor([[1, grid_h, grid_w]]),
        }
        length = num_image_tokens(self.config, tensors)
        return MMItem(
            modality="image",
            mm_hash=f"dummy-{index}",
            placeholder=PlaceholderRange(offset, length),
            tensors=tensors,
        )

    def encoder_pixels(self, items: list[MMItem], dtype: torch.dtype) -> torch.Tensor:
        device = next(self.visual.parameters()).device
        vision = self.config.vision_config
        patches = []
        for it in items:
            _, h, w = (int(x) for x in it.tensors["image_grid_thw"][0])
            image = it.tensors["pixel_values"][0].to(device).permute(2, 0, 1)  # [C, H, W]
            image = self.resize.resize(image, (h * vision.patch_size, w * vision.patch_size))
            # Normalized in float32, as the processor does it, then in `dtype` for the patch
            # copy, which is pure data movement (half the bytes in bf16).
            pixels = self.pixel_normalizer(image.unsqueeze(0)).to(dtype)
            patches.append(
                patchify(
                    pixels, vision.patch_size, self.spatial_merge_size, vision.temporal_patch_size
                )
            )
        return torch.cat(patches) if len(patches) > 1 else patches[0]

    def encode(self, items: list[MMItem]) -> list[torch.Tensor]:
        if not items:
            return []
        pixels = self.encoder_pixels(items, next(self.visual.parameters()).dtype)
        grids = [tuple(int(x) for x in it.tensors["image_grid_thw"][0]) for it in items]
        merged = self.visual(pixels, grids)  # [tokens, hidden]
        return list(merged.split([t * h * w // self.spatial_merge_size**2 for t, h, w in grids]))

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

    def write_mrope_positions(
        self,
        scheduled: list[ScheduledRequest],
        query_start_loc: np.ndarray,
        token_pos: np.ndarray,
        out: np.ndarray,
    ) -> None:
        num_new = np.diff(query_start_loc)  # [num_reqs]
        deltas = np.fromiter((s.req.mrope_delta for s in scheduled), np.int64, len(scheduled))
        # Generated tokens: index + delta in all three sections. Prompt tokens are overwritten
        # below, so a decode-only batch takes this one vectorized line.
        out[:] = token_pos + np.repeat(deltas, num_new)
        for s, base in zip(scheduled, query_start_loc[:-1].tolist(), strict=True):
            prompt_end = min(s.end, s.req.num_prompt_tokens)
            if s.start < prompt_end:
                assert s.req.mrope_positions is not None
                prompt = s.req.mrope_positions.numpy()  # [3, num_prompt_tokens]
                out[:, base : base + prompt_end - s.start] = prompt[:, s.start : prompt_end]
