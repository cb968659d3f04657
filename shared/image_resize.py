"""Qwen2-VL's image resize, the one both sides run: the preprocess worker decides the size and
the patch grid (preprocess_worker/processors.py), the GPU worker resizes
(gpu_worker/models/qwen2_vl.py).

The steps are the HF processor's own (`Qwen2VLImageProcessor`): smart_resize's size (multiples
of patch x merge, within min_pixels and max_pixels), then torchvision's antialiased resize of
the uint8 image, rounded back to uint8. Run where it is cheapest: on the encoder's device it is a
few small kernels, where a core of the dev box spends 19 ms on a 1920x1080 image. So the
preprocess worker ships the decoded image (uint8 [height, width, channels], the layout Pillow
decodes to: no transposing copy) with the grid it is to be resized to. An image of more than
max_pixels is resized by the preprocess worker instead, so no item ships more pixels than the
processor's largest output. On the CPU the result is the processor's bit for bit (the same call
on the same tensor). Elsewhere torchvision would resize in one float32 pass, where the CPU's
uint8 kernel runs a width pass, rounds to uint8, then a height pass; on noise that is 20-odd
levels apart wherever bicubic overshoots. So off the CPU the two passes run as the CPU's do,
each rounded to uint8, in float32: at most 2 levels from the CPU's fixed-point result, on about
1 % of the values of a noise image (tests/shared/test_image_resize.py, test_pixel_pipeline.py).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF
from transformers.image_utils import pil_torch_interpolation_mapping
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize


@dataclass(frozen=True, slots=True)
class Qwen2VLResize:
    patch_size: int
    factor: int  # image pixels per merged token along each side: patch_size * merge_size
    min_pixels: int
    max_pixels: int
    do_resize: bool
    interpolation: InterpolationMode

    @classmethod
    def from_processor(cls, hf: object) -> "Qwen2VLResize":
        """From a loaded `Qwen2VLImageProcessor` (transformers 5 keeps min/max_pixels in `size`)."""
        return cls(
            patch_size=hf.patch_size,  # type: ignore[attr-defined]
            factor=hf.patch_size * hf.merge_size,  # type: ignore[attr-defined]
            min_pixels=hf.size["shortest_edge"],  # type: ignore[attr-defined]
            max_pixels=hf.size["longest_edge"],  # type: ignore[attr-defined]
            do_resize=bool(hf.do_resize),  # type: ignore[attr-defined]
            interpolation=pil_torch_interpolation_mapping[hf.resample],  # type: ignore[attr-defined]
        )

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor gives an image of this size; `ValueError` for one it
        refuses (an aspect ratio over 200, or a size it cannot keep with do_resize off)."""
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise ValueError(
                    f"do_resize is off and {width}x{height} is no multiple of {self.factor}"
                )
            return height, width
        size = smart_resize(
            height,
            width,
            factor=self.factor,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )
        return int(size[0]), int(size[1])

    def ships_resized(self, height: int, width: int) -> bool:
        """Whether the preprocess worker resizes this image itself (more than max_pixels)."""
        return height * width > self.max_pixels

    def ships_as(self, height: int, width: int, size: tuple[int, int]) -> bool:
        """Whether the preprocess worker ships an image of height x width for one the processor
        resizes to `size`: one it resized (over max_pixels), or one for the GPU worker to resize."""
        if (height, width) == size:
            return True
        try:
            return not self.ships_resized(height, width) and self.target_size(height, width) == size
        except ValueError:  # a size the processor refuses
            return False

    def resize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 [channels, height, width] (any strides) -> uint8 [channels, *size]; the image
        itself when it has that size already."""
        if tuple(image.shape[-2:]) == size:
            return image
        if image.device.type == "cpu" or self.interpolation not in _SEPARABLE_MODES:
            return tvF.resize(image, list(size), interpolation=self.interpolation, antialias=True)
        return _resize_as_uint8_passes(image, size, _SEPARABLE_MODES[self.interpolation])


# The resamplers torch's uint8 CPU kernel runs as two separable passes (horizontal first).
_SEPARABLE_MODES = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}


def _resize_as_uint8_passes(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """torch's CPU uint8 resize in float32: the width pass, rounded and clamped to uint8 levels,
    then the height pass, likewise (an antialiased pass at an unchanged size is skipped, as
    there; it would be the identity)."""
    pixels = image.unsqueeze(0).float()
    height = pixels.shape[-2]
    for pass_size in ((height, size[1]), size):
        if tuple(pixels.shape[-2:]) != tuple(pass_size):
            pixels = F.interpolate(pixels, size=pass_size, mode=mode, antialias=True)
            pixels = pixels.clamp_(0, 255).round_()
    return pixels[0].to(torch.uint8)
