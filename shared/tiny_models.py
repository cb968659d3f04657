"""Tiny random-weight Hugging Face model directories for tests and the `serve` demo model.

`write_tiny_model` writes everything `from_pretrained` needs, with no hub access: config.json,
generation_config.json, safetensors weights (optionally sharded), a byte-level BPE tokenizer
trained here on a built-in corpus, the image (and, for Qwen2-VL, video) processor and a chat
template. The weights come from `AutoModelForImageTextToText.from_config` under a fixed seed with
a wide `initializer_range`, so the logits are far from uniform and greedy decoding is decided by
the weights, not by float noise: tests compare our greedy tokens with HF `generate` exactly.

Architectures (shapes mirror the hub models, sizes are tiny):
- `llava`: LLaVA-1.5 (llava-hf/llava-1.5-7b-hf): CLIP vision tower, 2-layer GELU MLP projector,
  Llama LM. A `<image>` expands to (image_size // patch_size) ** 2 tokens (CLS dropped).
- `qwen2_vl`: Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct): ViT over dynamic-resolution patches with 2D
  RoPE and a 2x2 patch merger, Qwen2 LM with bias in q/k/v and M-RoPE. An image gets
  grid_h * grid_w / merge_size**2 `<|image_pad|>` tokens, between min/max_image_tokens.

Weight-name layouts (what a loader must accept; `N` is a layer index):
- default (`legacy_layout=False`): transformers 5 module names, `save_original_format=False`.
    llava:    model.language_model.{embed_tokens,layers.N,norm}.*, lm_head.weight,
              model.vision_tower.{embeddings,pre_layrnorm,encoder.layers.N,post_layernorm}.*,
              model.multi_modal_projector.{linear_1,linear_2}.*
    qwen2_vl: model.language_model.{embed_tokens,layers.N,norm}.*, lm_head.weight,
              model.visual.{patch_embed,blocks.N,merger}.*
- legacy (`legacy_layout=True`): the names of the original hub checkpoints.
    llava:    language_model.model.{embed_tokens,layers.N,norm}.*, language_model.lm_head.weight,
              vision_tower.vision_model.{embeddings,pre_layrnorm,encoder.layers.N,
              post_layernorm}.*, multi_modal_projector.{linear_1,linear_2}.*
    qwen2_vl: model.{embed_tokens,layers.N,norm}.*, lm_head.weight,
              visual.{patch_embed,blocks.N,merger}.*
  Beware a third variant in the wild: transformers 5 `save_pretrained` with its default
  `save_original_format=True` writes the legacy names, except that llava's vision tower loses
  its `vision_model.` level (`vision_tower.encoder.layers.N...`).
With tied embeddings there is no lm_head.weight in either layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mm_runtime.shared.errors import ConfigError

logger = logging.getLogger(__name__)

ARCHS = ("llava", "qwen2_vl")
# Bump when the files written for a given spec change, so stale caches are not reused.
TINY_MODEL_VERSION = 1
NUM_BPE_TOKENS = 384  # trained vocab (byte alphabet + merges); the special tokens come on top
# Seeded init draws from torch's global RNG: two threads initializing at once would interleave
# their draws and get weights that depend on timing.
_INIT_LOCK = threading.Lock()

# Special tokens in id order. llava: Llama's <unk>/<s>/</s> lead the vocab (ids 0-2), <image>
# and <pad> follow it as in llava-hf. qwen2_vl: all follow the vocab, in Qwen2's order.
_LLAVA_LEADING_SPECIALS = ["<unk>", "<s>", "</s>"]
_LLAVA_TRAILING_SPECIALS = ["<image>", "<pad>"]
_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

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


@dataclass(frozen=True, slots=True)
class TinyModelSpec:
    """Every size knob of a tiny model; defaults give a ~1 MB model that runs in milliseconds.

    Vision fields: llava uses image_size (the CLIP input and processor crop); qwen2_vl uses
    spatial_merge_size, temporal_patch_size and min/max_image_tokens (merged tokens per image,
    the processor's min/max_pixels divided by (patch_size * spatial_merge_size) ** 2).
    """

    arch: str  # "llava" | "qwen2_vl"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA ratio num_heads / num_kv_heads
    head_dim: int | None = None  # None: hidden_size // num_heads; llava only may differ
    intermediate_size: int = 128
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    # Wide init (HF default 0.02) spreads the logits, so greedy ties are practically impossible.
    initializer_range: float = 0.3
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 128  # qwen2_vl: a multiple of vision_hidden_size (mlp_ratio)
    patch_size: int = 14
    image_size: int = 42  # llava: 3x3 patches -> 9 tokens per image
    spatial_merge_size: int = 2  # qwen2_vl
    temporal_patch_size: int = 2  # qwen2_vl
    min_image_tokens: int = 4  # qwen2_vl
    max_image_tokens: int = 64  # qwen2_vl

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_heads must be a multiple of num_kv_heads")
        if self.vision_hidden_size % self.vision_heads:
            raise ConfigError("vision_hidden_size must be a multiple of vision_heads")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError("hidden_size must be a multiple of num_heads unless head_dim is set")
        if self.arch == "llava" and self.image_size % self.patch_size:
            raise ConfigError("image_size must be a multiple of patch_size")
        if self.arch == "qwen2_vl":
            self._check_qwen2_vl()

    def _check_qwen2_vl(self) -> None:
        # Qwen2VLAttention derives head_dim = hidden_size // num_heads and ignores
        # config.head_dim (its rotary embedding does not), so only the implied value works.
        if self.head_dim not in (None, self.hidden_size // self.num_heads):
            raise ConfigError("qwen2_vl: transformers' Qwen2-VL ignores head_dim; leave it None")
        # M-RoPE gives each of (t, h, w) a slice of the head_dim // 2 rotary frequencies.
        if self.resolved_head_dim % 2 or self.resolved_head_dim < 8:
            raise ConfigError("qwen2_vl: M-RoPE needs an even head_dim >= 8")
        # The ViT's 2D RoPE gives h and w a half each of its head_dim // 2 frequencies.
        if (self.vision_hidden_size // self.vision_heads) % 4:
            raise ConfigError("qwen2_vl: the vision head dim must be a multiple of 4")
        if self.vision_intermediate_size % self.vision_hidden_size:
            raise ConfigError("qwen2_vl: vision_intermediate_size % vision_hidden_size != 0")
        if not 1 <= self.min_image_tokens <= self.max_image_tokens:
            raise ConfigError("qwen2_vl: need 1 <= min_image_tokens <= max_image_tokens")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


def write_tiny_model(
    out_dir: str | Path,
    spec: TinyModelSpec | str,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    legacy_layout: bool = False,
) -> Path:
    """Write a complete tiny model directory for `spec` (or an arch name) and return its path.

    The same spec and seed give the same files. `max_shard_size` (e.g. "50KB") writes several
    shards plus model.safetensors.index.json; `legacy_layout` writes the original hub checkpoint
    names instead of transformers 5 module names (see the module docstring). `out_dir` must be
    new or empty: stale weight files beside the new ones would be loaded too.
    """
    if isinstance(spec, str):
        spec = TinyModelSpec(arch=spec)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(spec)
    config = _build_config(spec, tokenizer)
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):  # leaves the caller's RNG state as is
        torch.manual_seed(seed)
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _mute_vision_tokens(model, config)
    model.generation_config = _generation_config(spec.arch, tokenizer)
    # save_original_format=False: keep the module names; legacy names are written explicitly.
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, save_original_format=False, **kwargs)
    if legacy_layout:
        _rename_checkpoint(out, spec.arch)
    _build_processor(spec, tokenizer).save_pretrained(out)
    logger.debug("wrote tiny %s model to %s", spec.arch, out)
    return out


def tiny_model_dir(arch: str, cache_dir: str | Path | None = None) -> Path:
    """The default tiny model of `arch`, written once under ~/.cache/mm_runtime and reused.

    The directory appears atomically (written to a temp dir, then renamed), so concurrent
    processes either see a complete model or write their own copy and discard it.
    """
    spec = TinyModelSpec(arch=arch)  # validates arch before anything is written
    root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "mm_runtime"
    # The files depend on the transformers version that wrote them (config fields, processor
    # format), so each version gets its own copy.
    final = root / f"tiny-{arch}-v{TINY_MODEL_VERSION}-tf{transformers.__version__}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        write_tiny_model(tmp, spec)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _build_tokenizer(spec: TinyModelSpec) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (lossless on any text) trained on _CORPUS, with the arch's specials."""
    arch = spec.arch
    leading = _LLAVA_LEADING_SPECIALS if arch == "llava" else []
    trailing = _LLAVA_TRAILING_SPECIALS if arch == "llava" else _QWEN_SPECIALS
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
        model_max_length=spec.max_position_embeddings,
        **names,
    )


def _generation_config(
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
# Model config and weights


def _build_config(
    spec: TinyModelSpec, tok: transformers.PreTrainedTokenizerFast
) -> transformers.PreTrainedConfig:
    """The HF config; the vocab is the tokenizer's exactly, so every id the model emits decodes."""
    text = {
        "vocab_size": len(tok),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": spec.initializer_range,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "pad_token_id": tok.pad_token_id,
    }
    if spec.arch == "llava":
        return _llava_config(spec, tok, text)
    return _qwen2_vl_config(spec, tok, text)


def _llava_config(
    spec: TinyModelSpec, tok: transformers.PreTrainedTokenizerFast, text: dict[str, object]
) -> transformers.LlavaConfig:
    text_config = transformers.LlamaConfig(
        head_dim=spec.resolved_head_dim,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **text,
    )
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
    )
    return transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_select_strategy="default",  # drop CLS, as LLaVA-1.5
        vision_feature_layer=-2,
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def _qwen2_vl_config(
    spec: TinyModelSpec, tok: transformers.PreTrainedTokenizerFast, text: dict[str, object]
) -> transformers.Qwen2VLConfig:
    # M-RoPE splits the rotary half-dim over (t, h, w) as Qwen2-VL's [16, 24, 24] of 64 does.
    half = spec.resolved_head_dim // 2
    t_dim = half // 4
    h_dim = (half - t_dim) // 2
    text_config = {
        **text,
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.eos_token_id,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [t_dim, h_dim, half - t_dim - h_dim],
        },
        "use_sliding_window": False,
        "max_window_layers": spec.num_layers,
    }
    vision_config = {
        "depth": spec.vision_layers,
        "embed_dim": spec.vision_hidden_size,
        "hidden_size": spec.hidden_size,  # the merger's output width: the LM's hidden size
        "num_heads": spec.vision_heads,
        "mlp_ratio": spec.vision_intermediate_size // spec.vision_hidden_size,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "initializer_range": spec.initializer_range,
    }
    ids = tok.convert_tokens_to_ids
    return transformers.Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def _mute_vision_tokens(model: torch.nn.Module, config: transformers.PreTrainedConfig) -> None:
    """Zero the output rows of the placeholder and vision start/end tokens.

    Their logit is then 0 while the best of the other few hundred is clearly positive, so greedy
    decoding never emits them: a generated placeholder would break placeholder counting and
    M-RoPE positions when a request's prompt plus output is prefilled again. With tied
    embeddings their input rows become zero too: placeholders are replaced by vision features
    anyway, and a zero start/end embedding is still a valid input.
    """
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ids = [getattr(config, n) for n in names if getattr(config, n, None) is not None]
    with torch.no_grad():
        model.get_output_embeddings().weight[ids] = 0.0


# Transformers 5 module-name prefix -> original hub checkpoint prefix; first match wins.
_LEGACY_PREFIXES = {
    "llava": [
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ],
    "qwen2_vl": [
        ("model.language_model.", "model."),
        ("model.visual.", "visual."),
        ("lm_head.", "lm_head."),
    ],
}


def legacy_name(arch: str, name: str) -> str:
    """The original hub checkpoint's name for transformers 5 weight `name`."""
    for new, old in _LEGACY_PREFIXES[arch]:
        if name.startswith(new):
            return old + name[len(new) :]
    raise ConfigError(f"{arch}: no legacy name for weight {name!r}")


def _rename_checkpoint(out: Path, arch: str) -> None:
    """Rewrite every safetensors file (and the shard index) of `out` with legacy names."""
    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(path)
        save_file({legacy_name(arch, k): v for k, v in tensors.items()}, path, {"format": "pt"})
    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {legacy_name(arch, k): f for k, f in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Processor


def _build_processor(
    spec: TinyModelSpec, tok: transformers.PreTrainedTokenizerFast
) -> transformers.ProcessorMixin:
    if spec.arch == "llava":
        image_processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": spec.image_size},
            crop_size={"height": spec.image_size, "width": spec.image_size},
        )
        return transformers.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=spec.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, dropped again by "default"
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    token_px = spec.patch_size * spec.spatial_merge_size  # one merged token covers token_px^2
    vision = {
        "size": {
            "shortest_edge": spec.min_image_tokens * token_px**2,
            "longest_edge": spec.max_image_tokens * token_px**2,
        },
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.spatial_merge_size,
    }
    return transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**vision),
        tokenizer=tok,
        video_processor=transformers.Qwen2VLVideoProcessor(**vision),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
