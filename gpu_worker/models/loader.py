"""Builds a model from a Hugging Face directory and loads its safetensors (single or sharded).

The model is constructed on the target device in the target dtype, and checkpoint tensors are
copied straight into its parameters: no float32 copy on the CPU first (28 GB for a 7B model).
`load_format="dummy"` skips the files (a directory from `shared/model_dirs.py` has none) and
fills every parameter on the device with small seeded random values of the real shapes, for
benchmarks of real-size models without downloads.
"""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from mm_runtime.gpu_worker.layers.attention import AttentionBackend
from mm_runtime.gpu_worker.models import MODEL_CLASSES, MultimodalModel
from mm_runtime.gpu_worker.models.decoder import Decoder
from mm_runtime.shared.errors import ConfigError
from mm_runtime.shared.model_info import ModelInfo

logger = logging.getLogger(__name__)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors in {model_dir}")
    return files


def _load_tensor(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> str | None:
    """Copy one checkpoint tensor into its (maybe fused) parameter; returns the parameter name."""
    for hf_part, (our_part, shard_id) in Decoder.packed_modules_mapping.items():
        fused = name.replace(f".{hf_part}.", f".{our_part}.")
        if fused != name and fused in params:
            param = params[fused]
            param.weight_loader(param, tensor, shard_id)
            return fused
    param = params.get(name)
    if param is None:
        return None
    if param.shape != tensor.shape:
        raise ConfigError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
    param.data.copy_(tensor)
    return name


def load_weights(model: MultimodalModel, model_dir: Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    files = checkpoint_files(model_dir)
    logger.info("loading weights from %d safetensors file(s)", len(files))
    for path in tqdm(files, desc="Loading safetensors", disable=len(files) < 2):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = model.checkpoint_name(key)
                target = _load_tensor(params, name, f.get_tensor(key))
                if target is None:
                    logger.debug("skipping checkpoint tensor %s", key)
                else:
                    loaded.add(target)
    tied = (
        {"lm_head.weight"}
        if model.lm_head.weight is model.language_model.embed_tokens.weight
        else set()
    )
    missing = set(params) - loaded - tied
    if missing:
        raise ConfigError(
            f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}"
        )


def fill_dummy_weights(model: nn.Module, seed: int) -> None:
    """Uniform in [-1e-2, 1e-2], drawn in place on the parameters' device and dtype. On the CPU in
    float32 the values are those of a float32 CPU draw: the same seed gives the same model."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-1e-2, 1e-2, generator=generator)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Floating tensors created without a dtype get `dtype`; the old default comes back after.

    Process-wide, not per thread: nothing else should create tensors meanwhile (the engine
    builds its model before it serves). Tensors created with an explicit dtype keep it, which
    keeps the rotary `inv_freq`s (ours, and the Qwen2-VL ViT's buffer) in float32.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    info: ModelInfo,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
    seed: int = 0,
) -> MultimodalModel:
    """The model of `info` on `device` in `dtype`, its weights loaded (or dummy), in eval mode.

    Built under `torch.device(device)` and `dtype` as the default dtype, so parameters are born
    where and as they will live. No `model.to(dtype)` afterwards: it would also round float32
    state computed at init (CLIP's position ids, the rotary frequencies).
    """
    config = info.hf_config
    vision_config = getattr(config, "vision_config", None)
    # LLaVA's CLIP tower is transformers' own module: make it use SDPA as from_pretrained would,
    # and our dtype (`_from_config` builds under `config.dtype`, float32 in tiny models' configs).
    for sub in (config, vision_config):
        if sub is not None and getattr(sub, "_attn_implementation", None) is None:
            sub._attn_implementation = "sdpa"
    if vision_config is not None:
        vision_config.dtype = dtype
    with torch.device(device), _default_dtype(dtype):
        model = MODEL_CLASSES[info.model_type](config, backend)
    wrong = {p.dtype for p in model.parameters()} - {dtype}
    assert not wrong, f"parameters built in {wrong}, not {dtype}"
    if load_format == "dummy":
        fill_dummy_weights(model, seed)
    else:
        load_weights(model, Path(info.model_dir))
    return model.eval()
