"""Turns one media item into the tensors its encoder takes: decode (Pillow), then the model's HF
processor.

Stateless apart from the loaded processor; runs in a preprocess worker process (or in-process for
the offline `LLM`). One item at a time, so items can be cached and shipped independently. Every
problem with the item itself becomes a `MediaError` naming it (corrupt bytes, an empty image, a
decompression bomb), so a bad image fails its own request and nothing else.
"""

import io
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor

from mm_runtime.shared.errors import MediaError, PreprocessError
from mm_runtime.shared.model_info import ModelInfo

# What Pillow raises on bad input: unknown format, truncated data, a header that claims more
# pixels than Image.MAX_IMAGE_PIXELS * 2 (DecompressionBombError is not an OSError).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes (PNG, JPEG, WebP, GIF, BMP, ...) -> an RGB image, fully decoded now, so a
    truncated file fails here and not inside the processor."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            image = img.convert("RGB")
    except _DECODE_ERRORS as e:
        raise MediaError(f"cannot decode image ({len(data)} bytes): {e}") from e
    return _check_has_pixels(image)


def convert_image(image: Image.Image) -> Image.Image:
    """A PIL image given in-process (the offline `LLM`) -> RGB. A lazily opened image
    (`Image.open`) decodes here, so a truncated file fails now."""
    try:
        rgb = image.convert("RGB")
    except _DECODE_ERRORS as e:
        raise MediaError(f"cannot decode image ({image.width}x{image.height}): {e}") from e
    return _check_has_pixels(rgb)


def _check_has_pixels(image: Image.Image) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise MediaError(f"image has no pixels ({image.width}x{image.height})")
    return image


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    tensors: dict[str, torch.Tensor]  # e.g. pixel_values (+ image_grid_thw for Qwen2-VL)
    num_tokens: int  # encoder output tokens, i.e. placeholder tokens in the prompt


class ImageProcessor:
    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.hf_processor = AutoImageProcessor.from_pretrained(info.model_dir)

    def process_bytes(self, data: bytes) -> ProcessedImage:
        """Encoded image bytes -> tensors: what a preprocess worker does with each job."""
        return self(decode_image(data))

    def __call__(self, image: Image.Image) -> ProcessedImage:
        """A decoded RGB image (from `decode_image` or `convert_image`) -> tensors."""
        try:
            out = self.hf_processor(images=[image], return_tensors="pt")
        except ValueError as e:  # the processor refuses this image (e.g. aspect ratio > 200)
            raise MediaError(f"the image processor rejects a {image.size} image: {e}") from e
        except (RuntimeError, TypeError) as e:
            raise PreprocessError(f"image processor failed on a {image.size} image: {e}") from e
        keys = ("pixel_values", "image_grid_thw")
        tensors = {k: out[k].contiguous() for k in keys if k in out}
        return ProcessedImage(tensors, self.info.num_image_tokens(tensors))
