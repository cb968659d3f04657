"""Greedy tokens identical to Hugging Face `generate` (float32, CPU) for both architectures.

Acceptance 1 (text, one image, two images of different sizes, a batch of 8 mixed requests) and
7 (any valid config: sizes, heads, GQA, head_dim, tied embeddings, vision sizes, checkpoint
layouts), each against transformers on the very same model directory.
"""

from pathlib import Path

import pytest
from mm_testing import ARCHS, hf_greedy, mm_prompt, prompt_text, random_image

from mm_runtime import LLM, SamplingParams
from mm_runtime.shared.tiny_models import TinyModelSpec, write_tiny_model

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)

# (question, image sizes): text only, one image, two images of different sizes, and more.
CASES = [
    ("Describe the weather today.", []),
    ("What is in this image?", [(64, 48)]),
    ("Compare the two pictures.", [(40, 90), (120, 64)]),
    ("Is this a kitchen? Please answer with a short sentence.", [(300, 200)]),
    ("hi", []),
    ("What color is the car in the first photo?", [(56, 56), (200, 30)]),
    ("The quick brown fox jumps over the lazy dog. " * 3, []),
    ("Tell me about it.", [(33, 77)]),
]


def build_cases(arch: str, cases: list[tuple[str, list[tuple[int, int]]]]) -> list[tuple]:
    out = []
    for i, (question, sizes) in enumerate(cases):
        images = [random_image(w, h, seed=10 * i + j) for j, (w, h) in enumerate(sizes)]
        out.append((prompt_text(arch, question, len(images)), images))
    return out


def assert_matches_hf(llm: LLM, model_dir: Path, cases: list[tuple]) -> None:
    outputs = llm.generate([mm_prompt(t, ims) for t, ims in cases], GREEDY, use_tqdm=False)
    for (text, images), out in zip(cases, outputs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, text, images), text


@pytest.fixture(scope="module", params=ARCHS)
def arch_llm(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> tuple:
    arch = request.param
    return arch, tiny_models[arch], LLM(tiny_models[arch], device="cpu")


@pytest.mark.parametrize("case", range(3), ids=["text", "one_image", "two_images"])
def test_single_request_matches_hf(arch_llm: tuple, case: int) -> None:
    arch, model_dir, llm = arch_llm
    assert_matches_hf(llm, model_dir, build_cases(arch, CASES[case : case + 1]))


def test_batch_of_eight_matches_hf(arch_llm: tuple) -> None:
    arch, model_dir, llm = arch_llm
    assert_matches_hf(llm, model_dir, build_cases(arch, CASES))


def test_chat_matches_hf_chat_template(arch_llm: tuple) -> None:
    """llm.chat renders the model's template and tokenizes without a second BOS, like HF."""
    from transformers import AutoProcessor

    arch, model_dir, llm = arch_llm
    image = random_image(64, 64, seed=3)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": "Hi"}],
        }
    ]
    processor = AutoProcessor.from_pretrained(model_dir)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    hf_inputs = processor(text=text, images=[image], add_special_tokens=False)
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == list(hf_inputs["input_ids"][0])
    assert out.outputs[0].token_ids == hf_greedy(model_dir, text, [image], add_special_tokens=False)


# Acceptance 7: configs other than the fixtures'. Each spec is a model built from scratch.
SPECS = [
    TinyModelSpec("llava", hidden_size=96, num_heads=6, num_kv_heads=6),  # MHA, GQA ratio 1
    TinyModelSpec("llava", num_heads=8, num_kv_heads=2, head_dim=16),  # GQA 4, head_dim != h/n
    TinyModelSpec("llava", tie_word_embeddings=True, num_layers=3, num_kv_heads=1),  # MQA
    TinyModelSpec(
        "llava",
        vision_hidden_size=48,
        vision_heads=4,
        vision_layers=3,
        patch_size=7,
        image_size=28,
        intermediate_size=200,
    ),
    TinyModelSpec("qwen2_vl", hidden_size=128, num_heads=4, num_kv_heads=4),  # head_dim 32
    TinyModelSpec("qwen2_vl", hidden_size=48, num_heads=4, num_kv_heads=1),  # head_dim 12, MQA
    TinyModelSpec("qwen2_vl", tie_word_embeddings=True, num_layers=3),
    TinyModelSpec(
        "qwen2_vl",
        vision_hidden_size=64,
        vision_heads=4,
        vision_layers=1,
        vision_intermediate_size=256,
        patch_size=8,
        min_image_tokens=2,
        max_image_tokens=20,
    ),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.arch}-{hash(s) % 10_000}")
def test_any_valid_config_matches_hf(spec: TinyModelSpec, tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "model", spec, seed=7)
    llm = LLM(model_dir, device="cpu")
    assert_matches_hf(llm, model_dir, build_cases(spec.arch, CASES[:3]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", ["legacy", "sharded"])
def test_checkpoint_layouts_load_identically(arch: str, layout: str, tmp_path: Path) -> None:
    """Hub-style names and sharded safetensors (with an index) give the same model."""
    kwargs = {"legacy_layout": True} if layout == "legacy" else {"max_shard_size": "50KB"}
    model_dir = write_tiny_model(tmp_path / "model", arch, seed=3, **kwargs)
    if layout == "sharded":
        assert (model_dir / "model.safetensors.index.json").is_file()
    llm = LLM(model_dir, device="cpu")
    assert_matches_hf(llm, model_dir, build_cases(arch, CASES[1:3]))
