"""LLaVA-1.5: CLIP vision tower (transformers' own module), MLP projector, Llama decoder.

Features: hidden states of `vision_feature_layer` (or several layers concatenated), minus the
CLS token under the "default" select strategy, projected to the LM's hidden size.
"""

import torch
from transformers import AutoModel, PretrainedConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mm_runtime.gpu_worker.layers.attention import AttentionBackend
from mm_runtime.gpu_worker.models.base import MultimodalModel, item_image
from mm_runtime.shared.model_info import num_image_tokens
from mm_runtime.shared.wire import MMItem, PlaceholderRange


class LlavaModel(MultimodalModel):
    checkpoint_prefixes = [
        ("model.language_model.", "language_model."),  # transformers 5 save_pretrained
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("language_model.model.", "language_model."),  # hub layout (llava-hf)
        ("language_model.lm_head.", "lm_head."),
    ]

    def __init__(self, config: PretrainedConfig, backend: AttentionBackend) -> None:
        super().__init__(config, backend)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)

    def checkpoint_name(self, name: str) -> str:
        # CLIP's vision tower has a `vision_model.` level in hub checkpoints (and in older
        # transformers' module tree) but not in transformers 5's: match whichever we built.
        name = super().checkpoint_name(name)
        nested = hasattr(self.vision_tower, "vision_model")
        inner = "vision_tower.vision_model."
        if name.startswith(inner) and not nested:
            return "vision_tower." + name[len(inner) :]
        if name.startswith("vision_tower.") and nested and not name.startswith(inner):
            return inner + name[len("vision_tower.") :]
        return name

    def item_length(self, item: MMItem) -> int:
        vision = self.config.vision_config
        item_image(item, (1, vision.num_channels, vision.image_size, vision.image_size))
        return num_image_tokens(self.config, item.tensors)

    def dummy_encoder_items(self, max_tokens: int) -> list[MMItem]:
        # Every CLIP image is the processor's crop (image_size^2, 336^2 for LLaVA-1.5).
        vision = self.config.vision_config
        shape = (1, vision.num_channels, vision.image_size, vision.image_size)
        tensors = {"pixel_values": torch.zeros(shape, dtype=torch.uint8)}
        length = num_image_tokens(self.config, tensors)
        return [
            MMItem(
                modality="image",
                mm_hash=f"dummy-{i}",
                placeholder=PlaceholderRange(i * length, length),
                tensors=tensors,
            )
            for i in range(max(1, -(-max_tokens // length)))
        ]

    def encoder_pixels(self, items: list[MMItem], dtype: torch.dtype) -> torch.Tensor:
        # CLIP images are all the processor's crop size, so one batch serves every item.
        pixels = torch.cat([item.tensors["pixel_values"] for item in items])  # uint8
        device = self.multi_modal_projector.linear_1.weight.device
        return self.pixel_normalizer(pixels.to(device)).to(dtype)

    def encode(self, items: list[MMItem]) -> list[torch.Tensor]:
        if not items:
            return []
        pixels = self.encoder_pixels(items, self.multi_modal_projector.linear_1.weight.dtype)
        out = self.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        selected = [out.hidden_states[i] for i in layers]  # each [num_items, 1 + patches, vision]
        if self.config.vision_feature_select_strategy == "default":
            selected = [hs[:, 1:] for hs in selected]  # drop CLS
        features = self.multi_modal_projector(torch.cat(selected, dim=-1))
        return list(features)  # num_items x [tokens, hidden]
