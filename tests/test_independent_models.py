"""Models built straight from transformers' classes, not by our tiny-model module (acceptance 7).

Other choices than our fixtures make: LLaVA with a Mistral LM, features of several CLIP layers
concatenated under the "full" strategy (CLS kept), transformers' default init and default
`save_pretrained` naming; Qwen2-VL from an old-style config (`rope_scaling` type "mrope") with
another vision size. Each is checked token for token against HF `generate`.
"""

from pathlib import Path

import pytest
import torch
from mm_testing import hf_greedy, mm_prompt, prompt_text, random_image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from mm_runtime import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def build_llava(out: Path, tokenizer_dir: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlavaConfig(
        text_config=MistralConfig(
            vocab_size=len(tok),
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            sliding_window=None,
            max_position_embeddings=512,
            rope_theta=500.0,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=3,
            image_size=28,
            patch_size=7,
        ),
        vision_feature_layer=[-3, -1],
        vision_feature_select_strategy="full",
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
    )
    torch.manual_seed(11)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(
        out
    )
    LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        ),
        tokenizer=tok,
        patch_size=7,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
    ).save_pretrained(out)
    return out


def build_qwen2_vl(out: Path, tokenizer_dir: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 40,
            "intermediate_size": 72,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "rope_scaling": {"type": "mrope", "mrope_section": [4, 3, 3]},
        },
        vision_config={
            "depth": 2,
            "embed_dim": 16,
            "hidden_size": 40,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
    )
    torch.manual_seed(12)
    Qwen2VLForConditionalGeneration(config).save_pretrained(out)
    GenerationConfig(eos_token_id=ids("<|im_end|>")).save_pretrained(out)
    unit = 8 * 2  # patch * merge: pixels per merged token side
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=8, merge_size=2, min_pixels=4 * unit**2, max_pixels=30 * unit**2
        ),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(patch_size=8, merge_size=2),
    ).save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_independently_built_model_matches_hf(
    arch: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    build = build_llava if arch == "llava" else build_qwen2_vl
    model_dir = build(tmp_path / arch, tiny_models[arch])
    llm = LLM(model_dir, device="cpu")
    cases = [
        (prompt_text(arch, "Describe the weather.", 0), []),
        (prompt_text(arch, "What is this?", 1), [random_image(70, 50, seed=1)]),
        (prompt_text(arch, "Compare them.", 2), [random_image(30, 90, 2), random_image(99, 99, 3)]),
    ]
    outputs = llm.generate([mm_prompt(t, ims) for t, ims in cases], GREEDY, use_tqdm=False)
    for (text, images), out in zip(cases, outputs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, text, images), text
