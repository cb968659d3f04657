"""Tiny random-weight Hugging Face model directories for tests and the `serve` demo model.

`write_tiny_model` writes everything `from_pretrained` needs, with no hub access: config.json,
generation_config.json, safetensors weights (optionally sharded), and from `model_dirs` the
byte-level BPE tokenizer trained on a built-in corpus (its specials right after its ~400 tokens),
the image (and, for Qwen2-VL, video) processor and the chat template. The weights come from
`AutoModelForImageTextToText.from_config` under a fixed seed with a wide `initializer_range`, so
the logits are far from uniform and greedy decoding is decided by the weights, not by float
noise: tests compare our greedy tokens with HF `generate` exactly.

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

from mm_runtime.shared.errors import ConfigError
from mm_runtime.shared.model_dirs import (
    build_generation_config,
    build_processor,
    build_tokenizer,
    prepare_out_dir,
)

logger = logging.getLogger(__name__)

ARCHS = ("llava", "qwen2_vl")
# Bump when the files written for a given spec change, so stale caches are not reused.
TINY_MODEL_VERSION = 1
# Seeded init draws from torch's global RNG: two threads initializing at once would interleave
# their draws and get weights that depend on timing.
_INIT_LOCK = threading.Lock()


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
    out = prepare_out_dir(out_dir)
    tokenizer = build_tokenizer(spec.arch, spec.max_position_embeddings)
    config = _build_config(spec, tokenizer)
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):  # leaves the caller's RNG state as is
        torch.manual_seed(seed)
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _mute_vision_tokens(model, config)
    model.generation_config = build_generation_config(spec.arch, tokenizer)
    # save_original_format=False: keep the module names; legacy names are written explicitly.
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, save_original_format=False, **kwargs)
    if legacy_layout:
        _rename_checkpoint(out, spec.arch)
    build_processor(config, tokenizer, _image_settings(spec)).save_pretrained(out)
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


def _image_settings(spec: TinyModelSpec) -> dict[str, object]:
    """The image processor's fields, as preprocessor_config.json holds them, for `spec`."""
    if spec.arch == "llava":
        return {
            "size": {"shortest_edge": spec.image_size},
            "crop_size": {"height": spec.image_size, "width": spec.image_size},
        }
    token_px = spec.patch_size * spec.spatial_merge_size  # one merged token covers token_px^2
    return {
        "size": {
            "shortest_edge": spec.min_image_tokens * token_px**2,
            "longest_edge": spec.max_image_tokens * token_px**2,
        },
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.spatial_merge_size,
    }
