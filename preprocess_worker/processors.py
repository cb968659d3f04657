"""Turns one media item into the tensors its encoder takes: decode (Pillow), then the model's HF
processor up to its last integer step: the resized (and cropped) image as uint8. Qwen2-VL's
resize itself runs on the GPU worker (shared/image_resize.py): this side ships the decoded image
and the patch grid, which fixes the size.

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
from transformers import AutoImageProcessor

from mm_runtime.shared.errors import MediaError, PreprocessError
from mm_runtime.shared.image_resize import Qwen2VLResize
from mm_runtime.shared.model_info import ModelInfo

# Qwen2-VL's image is a read-only numpy view of PIL's bytes (no copy); nothing writes it.
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
    """A PIL image given in-process (the offline `LLM`) -> RGB: the image itself if it is RGB
    already (`convert` would copy it), else a converted copy. A lazily opened image
    (`Image.open`) decodes here, so a truncated file fails now."""
    try:
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except _DECODE_ERRORS as e:
        raise MediaError(f"cannot decode image ({image.width}x{image.height}): {e}") from e
    return _check_has_pixels(rgb)


def _check_has_pixels(image: Image.Image) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise MediaError(f"image has no pixels ({image.width}x{image.height})")
    return image


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    # pixel_values: uint8, not yet rescaled or normalized. LLaVA: [1, channels, height, width],
    # resized and cropped. Qwen2-VL: [1, height, width, channels], the decoded image (resized
    # only above max_pixels), and image_grid_thw [1, 3], the (t, h, w) patch grid the GPU worker
    # resizes it to.
    tensors: dict[str, torch.Tensor]
    num_tokens: int  # encoder output tokens, i.e. placeholder tokens in the prompt


class ImageProcessor:
    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.hf_processor = AutoImageProcessor.from_pretrained(info.model_dir)
        if info.model_type == "qwen2_vl":
            self.qwen2_vl_resize = Qwen2VLResize.from_processor(self.hf_processor)

    def process_bytes(self, data: bytes) -> ProcessedImage:
        """Encoded image bytes -> tensors: what a preprocess worker does with each job."""
        return self(decode_image(data))

    def __call__(self, image: Image.Image, pixels: np.ndarray | None = None) -> ProcessedImage:
        """A decoded RGB image (from `decode_image` or `convert_image`) -> tensors. `pixels`:
        `np.asarray(image)` when the caller has it already (each call copies PIL's bytes)."""
        try:
            if self.info.model_type == "qwen2_vl":
                tensors = self._qwen2_vl_tensors(image, pixels)
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

    def _qwen2_vl_tensors(
        self, image: Image.Image, array: np.ndarray | None
    ) -> dict[str, torch.Tensor]:
        """The decoded image and the patch grid the processor resizes it to; the resize runs
        on the encoder's device (shared/image_resize.py says why), except above max_pixels."""
        # np.asarray: a read-only view of PIL's one bytes copy, already [height, width, channels]
        # (a CHW copy here cost as much as the resize); nothing writes it.
        pixels = torch.from_numpy(np.asarray(image) if array is None else array)
        height, width = self.qwen2_vl_resize.target_size(image.height, image.width)
        if self.qwen2_vl_resize.ships_resized(image.height, image.width):
            chw = self.qwen2_vl_resize.resize(pixels.permute(2, 0, 1), (height, width))
            pixels = chw.permute(1, 2, 0)
        patch = self.qwen2_vl_resize.patch_size
        grid = torch.tensor([[1, height // patch, width // patch]])
        return {"pixel_values": pixels.unsqueeze(0).contiguous(), "image_grid_thw": grid}
