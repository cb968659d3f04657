"""Facts about a model directory that every process needs: architecture and image placeholders.

Read once from config.json; an architecture we do not serve fails here with a clear error,
before any weights are touched.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from mm_runtime.shared.errors import ConfigError

# model_type -> the placeholder a user writes once per image in a raw prompt.
IMAGE_PLACEHOLDERS = {
    "llava": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}
# model_type -> the text of the token that the runtime repeats once per encoder output token.
IMAGE_TOKENS = {"llava": "<image>", "qwen2_vl": "<|image_pad|>"}


def num_image_tokens(config: PretrainedConfig, tensors: dict[str, torch.Tensor]) -> int:
    """Encoder output tokens of one processed image, known before encoding so the frontend can
    expand placeholders: LLaVA's patch count (+1 CLS under "full"), Qwen2-VL's merged grid."""
    if config.model_type == "llava":
        pixels = tensors["pixel_values"]  # [1, channels, height, width]
        patch = config.vision_config.patch_size
        num = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        return num if config.vision_feature_select_strategy == "default" else num + 1
    grid = tensors["image_grid_thw"].reshape(-1)  # (t, h, w) in patches
    return int(grid.prod()) // config.vision_config.spatial_merge_size**2


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model_dir: str
    model_type: str
    image_placeholder: str  # what a prompt contains per image
    image_token: str  # what it is expanded to, repeated
    image_token_id: int
    max_position_embeddings: int
    hf_config: PretrainedConfig

    def num_image_tokens(self, tensors: dict[str, torch.Tensor]) -> int:
        return num_image_tokens(self.hf_config, tensors)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelInfo":
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{model_dir} is not a model directory (no config.json)")
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path / 'config.json'}: {e}") from e
        # Checked on the raw JSON: a model_type transformers does not know either would
        # otherwise fail in AutoConfig with a message that omits what we do serve.
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        if model_type not in IMAGE_PLACEHOLDERS:
            architectures = raw.get("architectures") if isinstance(raw, dict) else None
            raise ConfigError(
                f"unsupported architecture {model_type!r} ({architectures});"
                f" supported: {', '.join(sorted(IMAGE_PLACEHOLDERS))}"
            )
        try:
            config = AutoConfig.from_pretrained(path)
        except (ValueError, KeyError, OSError) as e:
            raise ConfigError(f"cannot read {path / 'config.json'}: {e}") from e
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = config.image_token_index
        return cls(
            model_dir=str(path),
            model_type=model_type,
            image_placeholder=IMAGE_PLACEHOLDERS[model_type],
            image_token=IMAGE_TOKENS[model_type],
            image_token_id=int(image_token_id),
            max_position_embeddings=config.get_text_config().max_position_embeddings,
            hf_config=config,
        )
