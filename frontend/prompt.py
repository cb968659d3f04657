"""Prompt building for the frontend: chat template, placeholder expansion and tokenization.

A user writes one placeholder per image (`<image>` for LLaVA, `<|vision_start|><|image_pad|>
<|vision_end|>` for Qwen2-VL); the image token is repeated as many times as the encoder will
emit for that image, then the whole string is tokenized at once, as the HF processor does, so
token ids match Hugging Face exactly. Each item's placeholder range is then found in the ids.

The chat template is the model's, unless `--chat-template` overrides it (`load_chat_template`).
"""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from mm_runtime.shared.errors import ConfigError, InvalidRequest
from mm_runtime.shared.model_info import ModelInfo
from mm_runtime.shared.wire import PlaceholderRange

ImageRef = Image.Image | str | bytes  # a PIL image, a URL (data URL, file path) or raw bytes


class PromptBuilder:
    def __init__(self, info: ModelInfo, chat_template: str | None = None) -> None:
        """`chat_template`: Jinja text that replaces the model's own (None: the model's)."""
        self.info = info
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(info.model_dir)
        processor = AutoProcessor.from_pretrained(info.model_dir)
        self.chat_template: str | None = (
            chat_template
            or getattr(processor, "chat_template", None)
            or getattr(self.tokenizer, "chat_template", None)
        )
        self._processor = processor

    def count_images(self, prompt: str) -> int:
        return prompt.count(self.info.image_token)

    def tokenize(
        self,
        prompt: str | list[int],
        num_tokens_per_image: list[int],
        add_special_tokens: bool = True,
    ) -> tuple[list[int], list[PlaceholderRange]]:
        """Expands each image placeholder to its token count, tokenizes, locates the ranges.
        A prompt of token ids is taken as it is; it has no placeholders to expand, so no images
        (and no image token: the check below refuses one that no image would fill)."""
        if isinstance(prompt, list):
            if num_tokens_per_image:
                raise InvalidRequest("a prompt of token ids cannot carry images")
            self._check_image_tokens(prompt.count(self.info.image_token_id), 0)
            return prompt, []
        token = self.info.image_token
        parts = prompt.split(token)
        if len(parts) - 1 != len(num_tokens_per_image):
            raise InvalidRequest(
                f"the prompt has {len(parts) - 1} image placeholders ({self.info.image_placeholder}"
                f") but {len(num_tokens_per_image)} images were given",
                code="placeholder_mismatch",
            )
        # The image token is an added (special) token, which the tokenizer splits the text
        # around: repeating its id n times gives the ids of the text with the token written n
        # times, at a fraction of the cost (a 1920x1080 image is 2691 tokens: 3.2 against 0.06
        # ms, on the frontend's event loop).
        ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        image_token_id = self.info.image_token_id
        self._check_image_tokens(ids.count(image_token_id), len(num_tokens_per_image))
        # The ranges are found while expanding (one run per image token of `ids`), not by
        # scanning the expanded ids (0.55 ms a prompt of bench/offline.py's mix on the dev box).
        counts = iter(num_tokens_per_image)
        expanded: list[int] = []
        ranges: list[PlaceholderRange] = []
        for t in ids:
            if t == image_token_id:
                n = next(counts)
                ranges.append(PlaceholderRange(len(expanded), n))
                expanded.extend([t] * n)
            else:
                expanded.append(t)
        return expanded, ranges

    def _check_image_tokens(self, found: int, expected: int) -> None:
        """Image tokens in the tokenized prompt: one per image, none written outside."""
        if found != expected:
            raise InvalidRequest(
                f"the prompt holds {found} image tokens, expected {expected}: do not write "
                "the image token outside placeholders",
                code="placeholder_mismatch",
            )

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
        try:
            prompt = self._processor.apply_chat_template(
                hf_messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as e:  # its raise_exception(), e.g. roles out of order
            raise InvalidRequest(f"the chat template refused these messages: {e}") from e
        return prompt, images


def load_chat_template(value: str) -> str:
    """`--chat-template`: the text of the file `value` names, or, as in vLLM, `value` itself
    when it is no file but looks like a template (has a brace or a line break). Fails with
    `ConfigError` at startup, not at the first chat request, on a missing file or bad Jinja."""
    try:
        text, where = Path(value).read_text(), f"file {value!r}"
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name, or not UTF-8
        if not any(c in value for c in "{}\n"):
            raise ConfigError(
                f"--chat-template {value!r} looks like a file path, but cannot be read: {e}"
            ) from e
        text, where = value, "given inline"
    try:
        # One trial conversation through transformers' own (sandboxed) Jinja environment, so the
        # check knows its extensions and filters; it compiles the template first.
        render_jinja_template(
            [[{"role": "user", "content": "Hello"}]], chat_template=text, add_generation_prompt=True
        )
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"the chat template {where} is not valid Jinja: line {e.lineno}: {e}"
        ) from e
    except Exception:
        pass  # it compiles; refusing this trial conversation is its right (a request's 400 then)
    return text


def _image_ref(part: dict[str, Any]) -> ImageRef:
    value = part.get(part["type"])
    if part["type"] == "image_url":
        value = value.get("url") if isinstance(value, dict) else value
    if isinstance(value, Image.Image | str | bytes):
        return value
    raise InvalidRequest(f"a {part['type']} part needs a PIL image, a URL string or bytes")
