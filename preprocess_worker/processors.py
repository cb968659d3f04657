"""Turns one decoded media item into the tensors its encoder takes, with the model's HF processor.

Stateless apart from the loaded processor; runs in a preprocess worker process (or in-process for
the offline `LLM`). One item at a time, so items can be cached and shipped independently.
"""

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoImageProcessor

from mm_runtime.shared.errors import MediaError, PreprocessError
from mm_runtime.shared.model_info import ModelInfo


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    tensors: dict[str, torch.Tensor]  # e.g. pixel_values (+ image_grid_thw for Qwen2-VL)
    num_tokens: int  # encoder output tokens, i.e. placeholder tokens in the prompt


class ImageProcessor:
    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.hf_processor = AutoImageProcessor.from_pretrained(info.model_dir)

    def __call__(self, image: Image.Image) -> ProcessedImage:
        try:
            out = self.hf_processor(images=[image], return_tensors="pt")
        except ValueError as e:  # the processor refuses this image (e.g. aspect ratio > 200)
            raise MediaError(f"the image processor rejects a {image.size} image: {e}") from e
        except (RuntimeError, TypeError) as e:
            raise PreprocessError(f"image processor failed on a {image.size} image: {e}") from e
        keys = ("pixel_values", "image_grid_thw")
        tensors = {k: out[k].contiguous() for k in keys if k in out}
        return ProcessedImage(tensors, self.info.num_image_tokens(tensors))
