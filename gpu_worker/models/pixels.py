"""The image processor's float steps, run by the encoder on its own device: rescale and normalize
the uint8 images the preprocess workers send (preprocess_worker/processors.py says why they stop
there), and Qwen2-VL's patchify.

The operations are the HF processor's own, in its order and precision: the rescale folded into
mean and std, then `(x - mean) / std` in float32 (transformers' `rescale_and_normalize`), then
Qwen2-VL's reshape into merge-block-ordered patches with the frame repeated for the temporal patch.
Elementwise float32 arithmetic and data movement round the same on the CPU and on CUDA, so the
result is the processor's `pixel_values` bit for bit (tests/test_pixel_pipeline.py).
"""

from pathlib import Path

import torch
from transformers import AutoImageProcessor

from mm_runtime.shared.errors import ConfigError


class PixelNormalizer:
    """uint8 [batch, channels, height, width] -> float32, as the image processor leaves them."""

    def __init__(self, model_dir: str | Path) -> None:
        try:
            hf = AutoImageProcessor.from_pretrained(model_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the image processor of {model_dir}: {e}") from e
        self.hf_processor = hf  # its other settings (Qwen2-VL's resize) are read from here
        self.do_rescale = bool(hf.do_rescale)
        self.do_normalize = bool(hf.do_normalize)
        self.rescale_factor = float(hf.rescale_factor)
        # float32 on the CPU whatever the default dtype and device (models are built under both)
        mean = torch.tensor(hf.image_mean, dtype=torch.float32, device="cpu")  # [channels]
        std = torch.tensor(hf.image_std, dtype=torch.float32, device="cpu")
        if self.do_rescale and self.do_normalize:  # one pass, as the processor fuses them
            mean = mean * (1.0 / self.rescale_factor)
            std = std * (1.0 / self.rescale_factor)
        self._mean_std = {torch.device("cpu"): (mean.view(-1, 1, 1), std.view(-1, 1, 1))}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32)
        if self.do_normalize:
            mean, std = self._on(x.device)
            return x.sub_(mean).div_(std)
        if self.do_rescale:
            return x.mul_(self.rescale_factor)
        return x

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._mean_std:
            mean, std = self._mean_std[torch.device("cpu")]
            self._mean_std[device] = (mean.to(device), std.to(device))
        return self._mean_std[device]


def patchify(
    images: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> torch.Tensor:
    """[batch, channels, height, width] -> [batch * grid_h * grid_w, channels * t * p * p]:
    Qwen2-VL's patches, merge x merge blocks in row-major order and the patches of a block
    row-major inside it, each patch flattened as (channel, frame, row, column) with the image
    repeated `temporal_patch_size` times (one still frame fills the temporal patch)."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    blocks = images.reshape(
        batch,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    # -> [batch, block row, block col, row in block, col in block, channel, p, p]
    patches = blocks.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6)
    frames = patches.expand(*patches.shape[:6], temporal_patch_size, patch_size, patch_size)
    return frames.reshape(batch * grid_h * grid_w, -1)
