"""Real-size model directories without weights, from bench/configs/*.json.

Each directory must load through the HF entry points (AutoTokenizer, AutoProcessor) and the
runtime's own (ModelInfo, PromptBuilder, ImageProcessor) with the hub models' special-token ids
and image token counts. No model is built here: the 7B ones would take minutes and tens of GB on
the CPU (the GPU test in tests/gpu_worker/test_loader.py builds them).
"""

import json
from pathlib import Path

import pytest
from mm_testing import random_image
from transformers import AutoProcessor, AutoTokenizer, GenerationConfig

from mm_runtime.cli import main
from mm_runtime.frontend.prompt import PromptBuilder
from mm_runtime.preprocess_worker.processors import ImageProcessor
from mm_runtime.shared.errors import ConfigError
from mm_runtime.shared.model_dirs import NUM_BPE_TOKENS, read_bench_config, write_model_dir
from mm_runtime.shared.model_info import ModelInfo

CONFIG_DIR = Path(__file__).resolve().parents[2] / "bench" / "configs"
NAMES = ["qwen2_vl_2b", "qwen2_vl_7b", "llava_1_5_7b"]

QWEN_SPECIALS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
LLAVA_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}
# name -> (model_type, special ids, vocab_size, max_position_embeddings)
EXPECTED = {
    "qwen2_vl_2b": ("qwen2_vl", QWEN_SPECIALS, 151936, 32768),
    "qwen2_vl_7b": ("qwen2_vl", QWEN_SPECIALS, 152064, 32768),
    "llava_1_5_7b": ("llava", LLAVA_SPECIALS, 32064, 4096),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("model_dirs")
    return {name: write_model_dir(root / name, CONFIG_DIR / f"{name}.json") for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_files_and_config_json_verbatim(model_dirs: dict[str, Path], name: str) -> None:
    out = model_dirs[name]
    assert not list(out.glob("*.safetensors"))
    assert (
        json.loads((out / "config.json").read_text())
        == read_bench_config(CONFIG_DIR / f"{name}.json")[0]
    )


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_has_hub_special_ids(model_dirs: dict[str, Path], name: str) -> None:
    _, specials, vocab_size, max_len = EXPECTED[name]
    tok = AutoTokenizer.from_pretrained(model_dirs[name])
    assert {t: tok.convert_tokens_to_ids(t) for t in specials} == specials
    # Contiguous ids up to the last special, none past it, all within the embedding rows.
    assert len(tok) == max(specials.values()) + 1 <= vocab_size
    assert sorted(tok.get_vocab().values()) == list(range(len(tok)))
    assert tok.model_max_length == max_len
    # The specials split out of text as one token each; plain text never hits a filler.
    text = "Hello, what is in this picture? naïve café 你好 " + "".join(specials)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    num_trained = NUM_BPE_TOKENS + (3 if "<s>" in specials else 0)
    assert all(i < num_trained or i in specials.values() for i in ids)
    assert ids[-len(specials) :] == list(specials.values())


@pytest.mark.parametrize("name", NAMES)
def test_fillers_decode_to_words(model_dirs: dict[str, Path], name: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_dirs[name])
    _, specials, vocab_size, _ = EXPECTED[name]
    filler_ids = [1000, 20000, max(specials.values()) - len(specials) - 1]
    words = tok.decode(filler_ids).split(" ")
    assert words[0] == "" and all(len(w) == 4 and w.isalpha() for w in words[1:])
    # Ids past the tokenizer (the embedding's padding rows) decode to nothing, as for the hub's.
    assert tok.decode([vocab_size - 1]) == ""


@pytest.mark.parametrize("name", NAMES)
def test_model_info_and_generation_config(model_dirs: dict[str, Path], name: str) -> None:
    model_type, specials, vocab_size, max_len = EXPECTED[name]
    info = ModelInfo.from_model_dir(model_dirs[name])
    assert info.model_type == model_type
    assert info.image_token_id == specials[info.image_token]
    assert info.max_position_embeddings == max_len
    assert info.hf_config.get_text_config().vocab_size == vocab_size
    gen = GenerationConfig.from_pretrained(model_dirs[name])
    if model_type == "llava":
        assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 32001)
    else:
        assert gen.eos_token_id == [151645, 151643] and gen.pad_token_id == 151643


# (name, image width x height, image tokens): LLaVA always (336 / 14) ** 2; Qwen2-VL one per
# 28x28 px after resizing each side to a multiple of 28 within min/max_pixels:
# 448x336 -> 16x12 = 192; 20x20 -> 56x56 (min_pixels 3136) -> 4; 1920x1080 -> 1932x1092 -> 2691.
EXPANSION_CASES = [
    ("llava_1_5_7b", (448, 336), 576),
    ("llava_1_5_7b", (20, 20), 576),
    ("qwen2_vl_2b", (448, 336), 192),
    ("qwen2_vl_2b", (20, 20), 4),
    ("qwen2_vl_7b", (1920, 1080), 2691),
]


@pytest.mark.parametrize(("name", "size", "num_tokens"), EXPANSION_CASES)
def test_chat_prompt_with_one_image(
    model_dirs: dict[str, Path], name: str, size: tuple[int, int], num_tokens: int
) -> None:
    info = ModelInfo.from_model_dir(model_dirs[name])
    prompts = PromptBuilder(info)
    image = random_image(*size)
    messages = [
        {"role": "user", "content": [{"type": "image_pil", "image_pil": image}]},
    ]
    messages[0]["content"].append({"type": "text", "text": "What is in this image?"})
    text, images = prompts.apply_chat_template(messages)
    assert prompts.count_images(text) == 1 and len(images) == 1
    processed = ImageProcessor(info)(image)
    assert processed.num_tokens == num_tokens
    add_special_tokens = info.model_type == "llava"  # Qwen2-VL's template has no bos
    ids, ranges = prompts.tokenize(text, [num_tokens], add_special_tokens)
    assert ids.count(info.image_token_id) == num_tokens
    assert len(ranges) == 1 and ranges[0].length == num_tokens
    hf = AutoProcessor.from_pretrained(model_dirs[name])
    assert list(hf(text=text, images=[image])["input_ids"][0]) == ids


def test_cli_writes_model_dir(tmp_path: Path) -> None:
    out = tmp_path / "llava"
    argv = ["make-model-dir", "--config", str(CONFIG_DIR / "llava_1_5_7b.json"), str(out)]
    assert main(argv) == 0
    assert ModelInfo.from_model_dir(out).image_token_id == 32000
    assert main(argv) == 1  # not over an existing model: a user error, not a traceback


def _bench_config(tmp_path: Path, name: str, **config_changes: object) -> Path:
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    raw["config"].update(config_changes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"image_token_id": 151654}, "image_token_id=151654"),
        ({"vocab_size": 151000}, "vocab_size 151000"),
    ],
)
def test_refuses_configs_the_tokenizer_does_not_fit(
    tmp_path: Path, changes: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        write_model_dir(tmp_path / "out", _bench_config(tmp_path, "qwen2_vl_2b", **changes))
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_refuses_malformed_bench_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"config": {"model_type": "llava"}}))
    with pytest.raises(ConfigError, match="preprocessor_config"):
        write_model_dir(tmp_path / "out", path)
