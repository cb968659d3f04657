"""What the model runner needs from a multimodal model: encode items, embed, positions, logits.

Each architecture is a subclass: its encoder (our Qwen2-VL ViT; transformers' CLIP tower for
LLaVA, run once per item, not per token), our own `Decoder`, and the map from Hugging Face
checkpoint names to ours (both the hub layout and transformers 5's `save_pretrained` layout).
"""

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from mm_runtime.gpu_worker.layers.attention import AttentionBackend, AttentionMetadata
from mm_runtime.gpu_worker.models.decoder import Decoder
from mm_runtime.gpu_worker.models.pixels import PixelNormalizer
from mm_runtime.gpu_worker.request import Request
from mm_runtime.gpu_worker.scheduler import ScheduledRequest
from mm_runtime.shared.errors import InvalidRequest
from mm_runtime.shared.wire import MMItem


def ties_word_embeddings(config: PretrainedConfig) -> bool:
    # Pre-v5 saves put `tie_word_embeddings` inside text_config; transformers forwards it out.
    return bool(
        getattr(config, "tie_word_embeddings", False)
        or getattr(config.get_text_config(), "tie_word_embeddings", False)
    )


class MultimodalModel(nn.Module, ABC):
    # Checkpoint-name prefixes rewritten to ours, first match wins; unmatched names are kept.
    checkpoint_prefixes: list[tuple[str, str]] = []

    def __init__(self, config: PretrainedConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        text_config = config.get_text_config()
        self.language_model = Decoder(text_config, backend)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        if ties_word_embeddings(config):
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.pixel_normalizer = PixelNormalizer(config.name_or_path)

    @abstractmethod
    def encode(self, items: list[MMItem]) -> list[torch.Tensor]:
        """Encoder outputs of each item, [placeholder length, hidden] in the LM's dtype."""

    @abstractmethod
    def encoder_pixels(self, items: list[MMItem], dtype: torch.dtype) -> torch.Tensor:
        """The items' uint8 images, on the encoder's device, turned into the HF processor's
        `pixel_values` (what the preprocess worker left undone), in `dtype`; in float32 they are
        the processor's own (tests/test_pixel_pipeline.py)."""

    @abstractmethod
    def item_length(self, item: MMItem) -> int:
        """Encoder output tokens the item's tensors will give; `InvalidRequest` if malformed."""

    @abstractmethod
    def dummy_encoder_items(self, max_tokens: int) -> list[MMItem]:
        """The worst-case encoder input of one step for the memory profile: items of the
        largest size the processor makes, together at least `max_tokens` encoder tokens (CPU
        tensors, zeros; each placeholder's length is the item's `item_length`)."""

    def warm_up(self) -> None:
        """Builds, before serving, what the encoder would otherwise build on first use (the
        ViT attention's cuDNN graphs); nothing by default."""

    def prepare_request(self, req: Request) -> None:
        """Per-request state computed once on arrival (Qwen2-VL's M-RoPE positions)."""

    @property
    def uses_mrope(self) -> bool:
        """Positions are [3, num_tokens] (M-RoPE), written by `write_mrope_positions`."""
        return self.language_model.uses_mrope

    def write_mrope_positions(
        self,
        scheduled: list[ScheduledRequest],
        query_start_loc: np.ndarray,  # [num_reqs + 1]: where each request's tokens start
        token_pos: np.ndarray,  # [num_tokens]: each token's index in its request
        out: np.ndarray,  # [3, num_tokens], written
    ) -> None:
        """M-RoPE positions of a flattened batch; other models' positions are `token_pos`."""
        raise NotImplementedError(f"{type(self).__name__} does not use M-RoPE")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.language_model(inputs_embeds, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_name(self, name: str) -> str:
        for prefix, ours in self.checkpoint_prefixes:
            if name.startswith(prefix):
                return ours + name[len(prefix) :]
        return name


def item_image(item: MMItem, shape: tuple[int, ...]) -> torch.Tensor:
    """The item's `pixel_values`: the uint8 image of the preprocess worker, of this shape."""
    pixels = item_tensor(item, "pixel_values", len(shape))
    if pixels.dtype != torch.uint8 or tuple(pixels.shape) != shape:
        raise InvalidRequest(
            f"pixel_values of shape {tuple(pixels.shape)} ({pixels.dtype}), expected {shape} uint8"
        )
    return pixels


def item_tensor(item: MMItem, key: str, ndim: int) -> torch.Tensor:
    """The item's tensor `key`, checked for presence and rank."""
    tensor = item.tensors.get(key)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != ndim:
        raise InvalidRequest(f"media item lacks a {ndim}-d tensor {key!r}")
    return tensor
