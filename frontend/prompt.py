"""Prompt building for the frontend: chat template, placeholder expansion and tokenization.

A user writes one placeholder per image (`<image>` for LLaVA, `<|vision_start|><|image_pad|>
<|vision_end|>` for Qwen2-VL); the image token is repeated as many times as the encoder will
emit for that image, then the whole string is tokenized at once, as the HF processor does, so
token ids match Hugging Face exactly. Each item's placeholder range is then found in the ids.
"""

from collections.abc import Iterable
from typing import Any

from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

from mm_runtime.shared.errors import InvalidRequest
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.wire import PlaceholderRange

ImageRef = Image.Image | str | bytes  # a PIL image, a URL (data URL, file path) or raw bytes


class PromptBuilder:
    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(info.model_dir)
        processor = AutoProcessor.from_pretrained(info.model_dir)
        self.chat_template: str | None = getattr(processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        self._processor = processor

    def count_images(self, prompt: str) -> int:
        return prompt.count(self.info.image_token)

    def tokenize(
        self, prompt: str, num_tokens_per_image: list[int], add_special_tokens: bool = True
    ) -> tuple[list[int], list[PlaceholderRange]]:
        """Expands each image placeholder to its token count, tokenizes, locates the ranges."""
        token = self.info.image_token
        parts = prompt.split(token)
        if len(parts) - 1 != len(num_tokens_per_image):
            raise InvalidRequest(
                f"the prompt has {len(parts) - 1} image placeholders ({self.info.image_placeholder}"
                f") but {len(num_tokens_per_image)} images were given",
                code="placeholder_mismatch",
            )
        expanded = parts[0] + "".join(
            token * n + part for n, part in zip(num_tokens_per_image, parts[1:], strict=True)
        )
        ids = self.tokenizer(expanded, add_special_tokens=add_special_tokens)["input_ids"]
        return ids, self._placeholder_ranges(ids, num_tokens_per_image)

    def _placeholder_ranges(
        self, ids: list[int], num_tokens_per_image: list[int]
    ) -> list[PlaceholderRange]:
        positions = [i for i, t in enumerate(ids) if t == self.info.image_token_id]
        if len(positions) != sum(num_tokens_per_image):
            raise InvalidRequest(
                f"the prompt holds {len(positions)} image tokens, expected "
                f"{sum(num_tokens_per_image)}: do not write the image token outside placeholders",
                code="placeholder_mismatch",
            )
        ranges, cursor = [], 0
        for n in num_tokens_per_image:
            start = positions[cursor]
            if positions[cursor + n - 1] != start + n - 1:
                raise InvalidRequest("an image placeholder was split by the tokenizer")
            ranges.append(PlaceholderRange(start, n))
            cursor += n
        return ranges

    def apply_chat_template(
        self, messages: Iterable[dict[str, Any]], add_generation_prompt: bool = True
    ) -> tuple[str, list[ImageRef]]:
        """OpenAI-style messages -> (prompt text with one placeholder per image, the images)."""
        if self.chat_template is None:
            raise InvalidRequest("the model has no chat template; use generate() with a prompt")
        hf_messages, images = [], []
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise InvalidRequest("each message must be a dict with a 'role'")
            content = message.get("content", "")
            if isinstance(content, str):
                hf_messages.append({"role": message["role"], "content": content})
                continue
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": part["text"]})
                elif kind in ("image_url", "image", "image_pil", "image_bytes"):
                    images.append(_image_ref(part))
                    parts.append({"type": "image"})
                else:
                    raise InvalidRequest(f"unsupported content part type {kind!r}")
            hf_messages.append({"role": message["role"], "content": parts})
        if not hf_messages:  # transformers would fail with an IndexError
            raise InvalidRequest("messages is empty")
        prompt = self._processor.apply_chat_template(
            hf_messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        return prompt, images


def _image_ref(part: dict[str, Any]) -> ImageRef:
    value = part.get(part["type"])
    if part["type"] == "image_url":
        value = value.get("url") if isinstance(value, dict) else value
    if isinstance(value, Image.Image | str | bytes):
        return value
    raise InvalidRequest(f"a {part['type']} part needs a PIL image, a URL string or bytes")
