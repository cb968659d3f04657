"""Model directories without weights: every file a Hugging Face model directory has but safetensors.

`write_model_dir` turns a bench config (bench/configs/*.json: a hub model's config.json and
preprocessor_config.json, see bench/configs/README.md) into a directory that `ModelInfo`, the
frontend, the preprocess workers and the GPU worker under `load_format="dummy"` accept, with no
hub access: config.json (the hub's, verbatim), generation_config.json, a tokenizer with the hub
model's special-token ids, the processor and the chat template. Real-size models can then be
benchmarked with random weights.

The pieces are shared with `tiny_models`, which adds a tiny config and weights:
- `build_tokenizer`: a byte-level BPE (lossless on any text) trained here on a built-in corpus,
  with the arch's special tokens. With `hub_ids`, the specials sit at the hub tokenizer's ids
  (Qwen2-VL: <|endoftext|> 151643 .. <|video_pad|> 151656; LLaVA-1.5: <image> 32000, <pad>
  32001) and filler tokens fill the ids between the ~400 trained tokens and them, so every id
  in a prompt or a config means what it means for the real model.
- `build_processor`: the arch's HF processor (image, and for Qwen2-VL video, processor) with
  the tokenizer and chat template (`LLAVA_CHAT_TEMPLATE`, `QWEN2_VL_CHAT_TEMPLATE`).
- `build_generation_config`: greedy, with the hub models' bos/eos/pad ids.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import string
from collections.abc import Iterator
from pathlib import Path

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mm_runtime.shared.errors import ConfigError
from mm_runtime.shared.model_info import IMAGE_TOKENS

logger = logging.getLogger(__name__)

NUM_BPE_TOKENS = 384  # trained vocab (byte alphabet + merges); the special tokens come on top

# Llama's <unk>/<s>/</s> lead the LLaVA vocab (ids 0-2); Qwen2 has no leading specials.
LLAVA_LEADING_SPECIALS = ["<unk>", "<s>", "</s>"]
# arch -> the special tokens after the BPE vocab, in id order, with the hub tokenizers' ids
# (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-*-Instruct). Tiny models put them right after their
# small vocab instead. Qwen2's grounding tokens (<|object_ref_start|> 151646 .. <|quad_end|>
# 151651, <|vision_pad|> 151654) are unused by Qwen2-VL's template and processor: fillers there.
TRAILING_SPECIALS: dict[str, dict[str, int]] = {
    "llava": {"<image>": 32000, "<pad>": 32001},
    "qwen2_vl": {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
    },
}
# Config fields that name a special token: each must be the tokenizer's id of that token.
_CONFIG_TOKEN_FIELDS = {
    "image_token_id": None,  # None: the arch's image token (IMAGE_TOKENS)
    "image_token_index": None,  # LLaVA's name for it
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
_BENCH_CONFIG_KEYS = ("config", "preprocessor_config")  # a bench config file's two parts
# preprocessor_config.json fields that name classes rather than set the image processor.
_CLASS_FIELDS = ("image_processor_type", "processor_class")

# LLaVA-1.5 conversation format ("USER: <image>\n{text} ASSISTANT: {reply}</s>"), as llava-hf
# renders it: a message's image parts ({"type": "image"} or "image_url") first, one "<image>\n"
# each, then its text parts joined by spaces. Content may also be a plain string.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] in ['image', 'image_url'] %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2-VL's own chatml template (default system prompt, one vision block per image/video part).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url'] %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ['video', 'video_url'] %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the BPE: plain English plus the words the chat templates use, so common
# words become single tokens and prompts stay short.
_CORPUS = """\
USER: What is in this image? ASSISTANT: The image shows a small red ball on a wooden table.
USER: Describe the picture in detail. ASSISTANT: A cat is sitting on a mat next to a window.
system You are a helpful assistant. user assistant Picture Video
The quick brown fox jumps over the lazy dog. A man and a woman walk along the river at night.
There are two dogs playing in the park, and the sun is shining over the green trees.
What color is the car? The car is blue. How many people are there? There are three people.
Please answer the question with a short sentence. Thank you for your help, that was great.
The weather today is warm and sunny, with a light wind from the sea and a few white clouds.
She reads a book in the library while he writes a letter to his friend in the city.
Is this a photo of a kitchen? Yes, it is a kitchen with a white table, four chairs and a lamp.
The model looks at the image and answers the question about the objects it can see there.
In the morning the children go to school, and in the evening they come home and play games.
"""


def write_model_dir(out_dir: str | Path, bench_config: str | Path) -> Path:
    """Write every file of the model described by `bench_config` but its weights; return the path.

    Everything is built and checked in memory first (an unsupported model_type, or a config whose
    special-token ids disagree with the tokenizer, raises `ConfigError`), then written. `out_dir`
    must be new or empty. Serve the result with `load_format="dummy"`.
    """
    raw_config, image_settings = read_bench_config(bench_config)
    arch = raw_config.get("model_type")
    if arch not in TRAILING_SPECIALS:
        raise ConfigError(
            f"{bench_config}: model_type {arch!r} is not one of {sorted(TRAILING_SPECIALS)}"
        )
    try:  # on a copy: transformers rewrites rope_scaling in place
        config = transformers.AutoConfig.for_model(**copy.deepcopy(raw_config))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{bench_config}: invalid config: {e}") from e
    text_config = config.get_text_config()
    tokenizer = build_tokenizer(arch, text_config.max_position_embeddings, hub_ids=True)
    _check_special_ids(config, tokenizer, text_config.vocab_size)
    processor = build_processor(config, tokenizer, image_settings)
    out = prepare_out_dir(out_dir)
    # The hub's file as is, not `config.save_pretrained`: that would rewrite it in transformers
    # 5's layout, and the point is to serve what users of the hub model have.
    (out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    build_generation_config(arch, tokenizer).save_pretrained(out)
    processor.save_pretrained(out)
    logger.debug("wrote %s model directory (no weights) to %s", arch, out)
    return out


def read_bench_config(path: str | Path) -> tuple[dict[str, object], dict[str, object]]:
    """(config.json, preprocessor_config.json) of a bench config file, as plain dicts."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read bench config {path}: {e}") from e
    parts = [raw.get(key) if isinstance(raw, dict) else None for key in _BENCH_CONFIG_KEYS]
    if not all(isinstance(part, dict) for part in parts):
        raise ConfigError(
            f"{path}: a bench config is a JSON object with objects under"
            f" {' and '.join(_BENCH_CONFIG_KEYS)} (see bench/configs/README.md)"
        )
    return parts[0], parts[1]


def prepare_out_dir(out_dir: str | Path) -> Path:
    """`out_dir`, created if missing. It must be empty: stale weight files beside the new ones
    would be loaded too."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_special_ids(
    config: transformers.PreTrainedConfig,
    tokenizer: transformers.PreTrainedTokenizerFast,
    vocab_size: int,
) -> None:
    """Every token id the config names is the tokenizer's id of that token, and the model's
    vocab (embedding rows) covers the tokenizer."""
    for field, token in _CONFIG_TOKEN_FIELDS.items():
        value = getattr(config, field, None)
        token = token or IMAGE_TOKENS[config.model_type]
        if value is not None and value != tokenizer.convert_tokens_to_ids(token):
            raise ConfigError(
                f"config {field}={value}, but the {config.model_type} tokenizer has {token} at"
                f" {tokenizer.convert_tokens_to_ids(token)}"
            )
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"vocab_size {vocab_size} < the tokenizer's {len(tokenizer)} tokens")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(
    arch: str, model_max_length: int, hub_ids: bool = False
) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on _CORPUS with the arch's specials: right after the trained vocab,
    or with `hub_ids` at the hub tokenizer's ids (`TRAILING_SPECIALS`) behind filler tokens."""
    leading = LLAVA_LEADING_SPECIALS if arch == "llava" else []
    trailing = TRAILING_SPECIALS[arch]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if arch == "llava" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_BPE_TOKENS + len(leading),
        special_tokens=leading,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    if hub_ids:
        tok = _pad_vocab(tok, trailing)
    # A special already in the vocab (placed by _pad_vocab) keeps its id; others get the next.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in trailing])
    if arch == "llava":
        # Llama prepends <s> to every encoded text; Qwen2 adds nothing.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        names["pad_token"] = "<pad>"
    else:
        names = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,  # keep decode(encode(s)) == s
        model_max_length=model_max_length,
        **names,
    )


def _pad_vocab(tok: Tokenizer, special_ids: dict[str, int]) -> Tokenizer:
    """`tok` with its BPE vocab extended up to the largest special id: each special at its id,
    a filler token at every other new id.

    The specials go into the BPE vocab too because the tokenizers library gives a new added
    token the next free id, but keeps the vocab id of one it already has. Encoding never yields
    a filler (no merge produces it), so tokenization is that of the small trained vocab.
    """
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    first_id = len(vocab)
    if min(special_ids.values()) < first_id:
        raise ConfigError(f"special ids {special_ids} collide with the {first_id} trained tokens")
    by_id = {i: t for t, i in special_ids.items()}
    fillers = _filler_tokens(set(vocab))
    for token_id in range(first_id, max(by_id) + 1):
        vocab[by_id[token_id] if token_id in by_id else next(fillers)] = token_id
    return Tokenizer.from_str(json.dumps(data))


def _filler_tokens(taken: set[str]) -> Iterator[str]:
    """Byte-level tokens "Ġaaaa", "Ġaaab", ... (decoding to " aaaa", ...): word-sized text, so a
    random-weight model's output costs the detokenizer about what real text does."""
    for letters in itertools.product(string.ascii_lowercase, repeat=4):
        token = "Ġ" + "".join(letters)
        if token not in taken:
            yield token


def build_generation_config(
    arch: str, tok: transformers.PreTrainedTokenizerFast
) -> transformers.GenerationConfig:
    """Greedy by default; eos/bos/pad as the hub models' generation_config.json has them."""
    if arch == "llava":
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    else:
        # Qwen2-VL stops on <|im_end|> and on <|endoftext|>; it has no bos in its prompts.
        end = tok.convert_tokens_to_ids("<|endoftext|>")
        ids = {"bos_token_id": end, "eos_token_id": [tok.eos_token_id, end]}
    return transformers.GenerationConfig(pad_token_id=tok.pad_token_id, **ids)


# ---------------------------------------------------------------------------------------------
# Processor


def build_processor(
    config: transformers.PreTrainedConfig,
    tok: transformers.PreTrainedTokenizerFast,
    image_settings: dict[str, object],
) -> transformers.ProcessorMixin:
    """The arch's HF processor with the tokenizer and chat template. `image_settings` are the
    image processor's fields as preprocessor_config.json holds them (LLaVA: CLIP's size and
    crop_size; Qwen2-VL: min/max_pixels or size, patch_size, temporal_patch_size, merge_size);
    Qwen2-VL's video processor takes the same."""
    settings = {k: v for k, v in image_settings.items() if k not in _CLASS_FIELDS}
    if config.model_type == "llava":
        return transformers.LlavaProcessor(
            image_processor=transformers.CLIPImageProcessor(**settings),
            tokenizer=tok,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS, dropped again by "default"
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    return transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**settings),
        tokenizer=tok,
        video_processor=transformers.Qwen2VLVideoProcessor(**settings),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
