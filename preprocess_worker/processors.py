"""Turns one media item into the tensors its encoder takes: decode (Pillow), then the model's HF
processor up to its last integer step: the resized (and cropped) image as uint8.

The processor's rescale, normalize and (Qwen2-VL) patchify are elementwise or pure data movement,
so the GPU worker does them on the device (gpu_worker/models/pixels.py) with the same float32
operations, bit for bit. What this saves: Qwen2-VL's processor writes 50 MB of float32 patches for
a 1920x1080 image (the frame twice, for the temporal patch), the uint8 image is 6.3 MB; every hop
after this one (the ZMQ transfer, the feature cache, pinning, the copy to the GPU) moves 8x fewer
bytes, and the processor's time for that image fell from 128.5 to 22.5 ms (one core of the dev
box, bench/RESULTS.md).

Stateless apart from the loaded processor; runs in a preprocess worker process (or in-process for
the offline `LLM`). One item at a time, so items can be cached and shipped independently. Every
problem with the item itself becomes a `MediaError` naming it (corrupt bytes, an empty image, a
decompression bomb), so a bad image fails its own request and nothing else.
"""

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as tvF
from transformers import AutoImageProcessor
from transformers.image_utils import pil_torch_interpolation_mapping
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from mm_runtime.shared.errors import MediaError, PreprocessError
from mm_runtime.shared.model_info import ModelInfo

# Qwen2-VL's resize reads the image through a read-only numpy view (no copy); nothing writes it.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

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
    # pixel_values: uint8 [1, channels, height, width], resized (and cropped), not yet rescaled
    # or normalized; Qwen2-VL adds image_grid_thw [1, 3], the (t, h, w) patch grid.
    tensors: dict[str, torch.Tensor]
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
            if self.info.model_type == "qwen2_vl":
                tensors = self._resize_qwen2_vl(image)
            else:  # the HF processor with its float steps off: resize and crop, still uint8
                out = self.hf_processor(
                    images=[image], return_tensors="pt", do_rescale=False, do_normalize=False
                )
                tensors = {"pixel_values": out["pixel_values"].contiguous()}
        except ValueError as e:  # the processor refuses this image (e.g. aspect ratio > 200)
            raise MediaError(f"the image processor rejects a {image.size} image: {e}") from e
        except (RuntimeError, TypeError) as e:
            raise PreprocessError(f"image processor failed on a {image.size} image: {e}") from e
        dtype = tensors["pixel_values"].dtype
        if dtype != torch.uint8:  # a processor that makes floats before its normalize step
            raise PreprocessError(f"the image processor gave {dtype} pixels, not uint8")
        return ProcessedImage(tensors, self.info.num_image_tokens(tensors))

    def _resize_qwen2_vl(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """Qwen2VLImageProcessor's resize, as it does it (smart_resize's size, torchvision's
        antialiased resize of the uint8 image), without its patchify: the patches are a
        reshape of this image, made on the GPU."""
        hf = self.hf_processor
        # np.asarray: a read-only view of PIL's one bytes copy of the image, where np.array
        # copied it again (16 against 5 ms for 1920x1080 on the dev CPU, with the GIL held);
        # the resize reads it and writes a new tensor.
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)  # [3, height, width]
        factor = hf.patch_size * hf.merge_size
        height, width = smart_resize(
            image.height,
            image.width,
            factor=factor,
            min_pixels=hf.size["shortest_edge"],
            max_pixels=hf.size["longest_edge"],
        )
        if hf.do_resize:
            mode = pil_torch_interpolation_mapping[hf.resample]
            pixels = tvF.resize(pixels, [height, width], interpolation=mode, antialias=True)
        elif (height, width) != (image.height, image.width):
            raise ValueError(f"do_resize is off and {image.size} is not a multiple of {factor}")
        grid = torch.tensor([[1, height // hf.patch_size, width // hf.patch_size]])
        return {"pixel_values": pixels.unsqueeze(0).contiguous(), "image_grid_thw": grid}
