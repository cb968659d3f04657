"""Tiny model directories load and run in transformers: processor, chat template, generate.

These are the fixtures every engine test compares against, so they are checked through the
public HF entry points (AutoProcessor, AutoTokenizer, AutoModelForImageTextToText) only.
"""

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from mm_runtime.cli import main
from mm_runtime.shared.errors import ConfigError
from mm_runtime.shared.tiny_models import (
    TinyModelSpec,
    legacy_name,
    tiny_model_dir,
    write_tiny_model,
)

ARCHS = ["llava", "qwen2_vl"]
PLACEHOLDER = {"llava": "<image>", "qwen2_vl": "<|image_pad|>"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(root / arch, arch) for arch in ARCHS}


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _prompt(processor: object, num_images: int, text: str = "Describe the picture.") -> str:
    parts = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": parts}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _generate(model_dir: Path, images: list[Image.Image], max_new_tokens: int = 8) -> list[int]:
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    inputs = processor(
        text=_prompt(processor, len(images)), images=images or None, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _weights(model_dir: Path) -> dict[str, list[str]]:
    """file name -> tensor names of every safetensors file in `model_dir`."""
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out[path.name] = list(f.keys())
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_0_1_2_images(model_dirs: dict[str, Path], arch: str) -> None:
    processor = AutoProcessor.from_pretrained(model_dirs[arch])
    model = AutoModelForImageTextToText.from_pretrained(model_dirs[arch])
    images = [_image(60, 80, seed=1), _image(120, 50, seed=2)]
    # llava: always (42 // 14) ** 2; qwen2_vl: 60x80 -> 56x84 px -> 2x3, 120x50 -> 112x56 -> 4x2.
    tokens_per_image = {"llava": [9, 9], "qwen2_vl": [6, 8]}[arch]
    image_token_id = processor.tokenizer.convert_tokens_to_ids(PLACEHOLDER[arch])
    assert image_token_id == model.config.image_token_id
    for num_images in range(3):
        inputs = processor(
            text=_prompt(processor, num_images),
            images=images[:num_images] or None,
            return_tensors="pt",
        )
        num_placeholders = (inputs["input_ids"] == image_token_id).sum().item()
        assert num_placeholders == sum(tokens_per_image[:num_images])
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        new_ids = out[0, inputs["input_ids"].shape[1] :]
        assert 1 <= len(new_ids) <= 6
        assert image_token_id not in new_ids  # muted output row


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_are_peaked_and_images_matter(model_dirs: dict[str, Path], arch: str) -> None:
    processor = AutoProcessor.from_pretrained(model_dirs[arch])
    model = AutoModelForImageTextToText.from_pretrained(model_dirs[arch])
    text = _prompt(processor, 1)
    last_logits = []
    for seed in (1, 2):
        inputs = processor(text=text, images=[_image(56, 56, seed)], return_tensors="pt")
        with torch.no_grad():
            last_logits.append(model(**inputs).logits[0, -1])
    # Wide init: a logit spread far above float noise, so greedy ties do not happen.
    assert last_logits[0].std() > 1.0
    # The image reaches the last position: two random images give visibly different logits.
    assert (last_logits[0] - last_logits[1]).abs().max() > 0.1


def test_qwen2_vl_grid_sizes(model_dirs: dict[str, Path]) -> None:
    processor = AutoProcessor.from_pretrained(model_dirs["qwen2_vl"])
    # Sides rounded to multiples of 28 px (patch 14 x merge 2), area kept within 4..64 tokens.
    cases = {(20, 20): 4, (60, 80): 6, (120, 50): 8, (28, 280): 10, (500, 500): 64}
    for (height, width), num_tokens in cases.items():
        text = "<|vision_start|><|image_pad|><|vision_end|>"
        inputs = processor(text=text, images=[_image(height, width)])
        grid = inputs["image_grid_thw"][0].tolist()
        assert grid[0] * grid[1] * grid[2] // 4 == num_tokens
        assert inputs["input_ids"][0].count(processor.image_token_id) == num_tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer(model_dirs: dict[str, Path], arch: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_dirs[arch])
    config = json.loads((model_dirs[arch] / "config.json").read_text())
    assert tok.is_fast
    assert len(tok) == config["text_config"]["vocab_size"]
    for text in ["The quick brown fox.", "Odd: x=3,  y_2 {ok}?\n\t42%!", "café ☕ 東京"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level
    text = "What is in the picture? There are two dogs playing in the park."
    assert len(tok.encode(text, add_special_tokens=False)) < len(text) / 2  # merges learned
    if arch == "llava":
        assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2]
        assert tok.encode("hi")[0] == tok.bos_token_id  # Llama prepends <s>
        assert config["image_token_index"] == tok.convert_tokens_to_ids("<image>")
    else:
        assert tok.bos_token_id is None and tok.eos_token == "<|im_end|>"
        assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
        ids = tok.convert_tokens_to_ids
        assert config["image_token_id"] == ids("<|image_pad|>")
        assert config["video_token_id"] == ids("<|video_pad|>")
        assert config["vision_start_token_id"] == ids("<|vision_start|>")
    generation = json.loads((model_dirs[arch] / "generation_config.json").read_text())
    assert generation["pad_token_id"] == tok.pad_token_id
    eos = generation["eos_token_id"]
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])


def test_chat_templates(model_dirs: dict[str, Path]) -> None:
    image_url = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    messages = [
        {"role": "user", "content": [image_url, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, {"type": "image"}]},
    ]
    llava = AutoProcessor.from_pretrained(model_dirs["llava"])
    assert (
        llava.apply_chat_template(messages, add_generation_prompt=True)
        == "USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: <image>\nAnd now? ASSISTANT:"
    )
    assert llava.apply_chat_template(messages[:1]) == "USER: <image>\nWhat is this? "
    qwen = AutoProcessor.from_pretrained(model_dirs["qwen2_vl"])
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert qwen.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{vision}What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        f"<|im_start|>user\nAnd now?{vision}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tok = AutoTokenizer.from_pretrained(model_dirs["qwen2_vl"])
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_and_legacy_layouts_load_same_weights(
    tmp_path: Path, model_dirs: dict[str, Path], arch: str
) -> None:
    ref_dir = model_dirs[arch]
    ref_names = _weights(ref_dir)["model.safetensors"]
    assert "lm_head.weight" in ref_names
    assert all(n.startswith(("model.", "lm_head.")) for n in ref_names)
    ref = AutoModelForImageTextToText.from_pretrained(ref_dir).state_dict()
    for legacy in (False, True):
        for shard in (None, "50KB"):
            out = tmp_path / f"{legacy}-{shard}"
            write_tiny_model(out, arch, max_shard_size=shard, legacy_layout=legacy)
            files = _weights(out)
            names = sorted(n for file_names in files.values() for n in file_names)
            expected = [legacy_name(arch, n) if legacy else n for n in ref_names]
            assert names == sorted(expected)
            if shard:
                assert len(files) > 3
                index = json.loads((out / "model.safetensors.index.json").read_text())
                assert sorted(index["weight_map"]) == names
            model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"]
            state = model.state_dict()
            assert state.keys() == ref.keys()
            assert all(torch.equal(state[k], ref[k]) for k in ref)


def test_legacy_names() -> None:
    assert legacy_name("llava", "model.language_model.layers.0.mlp.up_proj.weight") == (
        "language_model.model.layers.0.mlp.up_proj.weight"
    )
    assert legacy_name("llava", "lm_head.weight") == "language_model.lm_head.weight"
    assert legacy_name("llava", "model.vision_tower.encoder.layers.1.mlp.fc1.bias") == (
        "vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias"
    )
    assert legacy_name("llava", "model.multi_modal_projector.linear_1.weight") == (
        "multi_modal_projector.linear_1.weight"
    )
    assert legacy_name("qwen2_vl", "model.language_model.embed_tokens.weight") == (
        "model.embed_tokens.weight"
    )
    assert legacy_name("qwen2_vl", "model.visual.blocks.0.attn.qkv.weight") == (
        "visual.blocks.0.attn.qkv.weight"
    )
    assert legacy_name("qwen2_vl", "lm_head.weight") == "lm_head.weight"


def test_seed_decides_weights(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    ref = (model_dirs["llava"] / "model.safetensors").read_bytes()
    write_tiny_model(tmp_path / "same", "llava", seed=0)
    write_tiny_model(tmp_path / "other", "llava", seed=1)
    assert (tmp_path / "same" / "model.safetensors").read_bytes() == ref
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != ref


SPECS = [
    pytest.param(TinyModelSpec("llava", num_kv_heads=4), id="llava-mha"),
    pytest.param(
        TinyModelSpec("llava", num_heads=8, head_dim=16, tie_word_embeddings=True),
        id="llava-gqa4-tied",
    ),
    pytest.param(
        TinyModelSpec("llava", hidden_size=48, num_heads=2, num_kv_heads=1, head_dim=32),
        id="llava-head_dim32",
    ),
    pytest.param(
        TinyModelSpec(
            "llava",
            vision_hidden_size=48,
            vision_heads=3,
            vision_layers=1,
            vision_intermediate_size=64,
            patch_size=7,
            image_size=28,
        ),
        id="llava-clip-patch7",
    ),
    pytest.param(
        TinyModelSpec("qwen2_vl", num_kv_heads=4, tie_word_embeddings=True), id="qwen2_vl-mha-tied"
    ),
    pytest.param(
        TinyModelSpec("qwen2_vl", hidden_size=96, num_heads=8, num_kv_heads=2, num_layers=3),
        id="qwen2_vl-gqa4-head_dim12",
    ),
    pytest.param(
        TinyModelSpec(
            "qwen2_vl",
            vision_hidden_size=48,
            vision_heads=3,
            vision_intermediate_size=96,
            patch_size=7,
            min_image_tokens=2,
            max_image_tokens=16,
        ),
        id="qwen2_vl-vit-patch7",
    ),
]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_variants_build_and_generate(tmp_path: Path, spec: TinyModelSpec) -> None:
    out = write_tiny_model(tmp_path / "m", spec)
    config = json.loads((out / "config.json").read_text())
    text = config["text_config"]
    assert text["num_key_value_heads"] == spec.num_kv_heads
    assert text["hidden_size"] == spec.hidden_size
    if spec.arch == "llava":
        assert text["head_dim"] == spec.resolved_head_dim
    assert config["tie_word_embeddings"] == spec.tie_word_embeddings
    assert ("lm_head.weight" in _weights(out)["model.safetensors"]) != spec.tie_word_embeddings
    assert len(_generate(out, [_image(64, 48)], max_new_tokens=4)) >= 1


def test_spec_rejects_unsupported() -> None:
    with pytest.raises(ConfigError):
        TinyModelSpec("qwen2_vl", hidden_size=64, num_heads=4, head_dim=32)
    with pytest.raises(ConfigError):
        TinyModelSpec("gpt2")
    with pytest.raises(ConfigError):
        TinyModelSpec("llava", num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError):  # ViT head dim 6: its 2D RoPE needs a multiple of 4
        TinyModelSpec("qwen2_vl", vision_hidden_size=12, vision_heads=2)


def test_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "stale.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError):
        write_tiny_model(tmp_path, "llava")


def test_tiny_model_dir_is_cached(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # Two writers racing for the same cache entry: one rename wins, the other copy is dropped.
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: tiny_model_dir("qwen2_vl", cache_dir=cache), [0, 1])
    assert first == second == tiny_model_dir("qwen2_vl", cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temp dir left behind
    fresh = write_tiny_model(tmp_path / "fresh", "qwen2_vl")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (fresh / name).read_bytes()


def test_cli_in_process(tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert main(["make-tiny-model", "--arch", "llava", "--seed", "1", str(out)]) == 0
    assert len(_generate(out, [_image(30, 40)], max_new_tokens=3)) >= 1
    assert main(["make-tiny-model", "--arch", "llava", str(out)]) == 1  # not empty now


def test_cli_subprocess(tmp_path: Path) -> None:
    exe = shutil.which("mm-runtime")
    assert exe is not None, "the mm-runtime entry point is not installed (pip install -e .)"
    out = tmp_path / "m"
    cmd = [exe, "make-tiny-model", "--arch", "qwen2_vl", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert AutoProcessor.from_pretrained(out).image_processor.merge_size == 2
    assert AutoModelForImageTextToText.from_pretrained(out).config.model_type == "qwen2_vl"
