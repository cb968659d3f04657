"""Acceptance on the GPU: the tiny models in bf16 agree with transformers in bf16 on the GPU by
vLLM's `check_logprobs_close` rule over 32 greedy tokens, with and without CUDA graphs, and the
two modes give the same tokens.

bf16 rounding differs between two correct implementations (other kernels, other summation
orders), so exact token equality is not required of HF and us: at the first position where the
greedy tokens differ, each side's token must be among the other side's top-5 logprobs, and the
comparison of that sequence stops there, as in vLLM's tests/models/utils.py.
"""

import copy

import pytest
import torch
from mm_testing import ARCHS, mm_prompt, prompt_text, random_image

from mm_runtime import LLM, SamplingParams
from mm_runtime.gpu_worker.layers.cuda_attention import CudaAttentionBackend
from mm_runtime.gpu_worker.models.decoder import head_dim_of
from mm_runtime.shared.model_info import ModelInfo

pytestmark = pytest.mark.gpu

NUM_TOKENS = 32
TOP = 5
QUESTIONS = ["What is in the image?", "Describe the colors.", "Count the objects.", "Hi"]
SIZES = [(336, 336), (640, 480), (200, 900), (1280, 720)]


def requests(arch: str) -> list[tuple[str, list]]:
    """Image requests of varied sizes (one or two images) and a text-only one."""
    out = []
    for i, (question, size) in enumerate(zip(QUESTIONS, SIZES, strict=True)):
        images = [random_image(*size, seed=i)] * (1 + i % 2)
        out.append((prompt_text(arch, question, len(images)), images))
    out.append((prompt_text(arch, "Tell me a story about a robot.", 0), []))
    return out


def hf_top_logprobs(model_dir: str, text: str, images: list) -> tuple[list[int], list[dict]]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = model.cuda().eval()
    inputs = processor(text=text, images=images or None, return_tensors="pt").to("cuda")
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.max_new_tokens = NUM_TOKENS
    config.do_sample = False
    with torch.inference_mode():
        out = model.generate(
            **inputs, generation_config=config, output_logits=True, return_dict_in_generate=True
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    top = []
    for logits in out.logits:
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        values, ids = logprobs.topk(TOP)
        top.append(dict(zip(ids.tolist(), values.tolist(), strict=True)))
    return tokens, top


def check_logprobs_close(
    hf: list[tuple[list[int], list[dict]]], ours: list[tuple[list[int], list[dict]]]
) -> None:
    for i, ((hf_tokens, hf_top), (our_tokens, our_top)) in enumerate(zip(hf, ours, strict=True)):
        assert len(hf_tokens) == len(our_tokens) == NUM_TOKENS
        for pos, (a, b) in enumerate(zip(hf_tokens, our_tokens, strict=True)):
            if a != b:
                assert a in our_top[pos], f"request {i} pos {pos}: HF's {a} not in our top"
                assert b in hf_top[pos], f"request {i} pos {pos}: our {b} not in HF's top"
                break


def run_ours(model_dir: str, reqs: list, enforce_eager: bool) -> list[tuple[list[int], list]]:
    llm = LLM(
        str(model_dir),
        device="cuda",
        dtype="bfloat16",
        enforce_eager=enforce_eager,
        max_num_seqs=8,
        gpu_memory_utilization=0.3,
    )
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True, logprobs=TOP)
    outs = llm.generate([mm_prompt(t, imgs) for t, imgs in reqs], params)
    result = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    del llm
    torch.cuda.empty_cache()
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logprobs_close_to_hf_with_and_without_graphs(arch: str, tiny_models: dict) -> None:
    model_dir = str(tiny_models[arch])
    config = ModelInfo.from_model_dir(model_dir).hf_config
    reqs = requests(arch)
    hf = [hf_top_logprobs(model_dir, text, images) for text, images in reqs]
    eager = run_ours(model_dir, reqs, enforce_eager=True)
    graphs = run_ours(model_dir, reqs, enforce_eager=False)
    assert CudaAttentionBackend.supports(torch.bfloat16, head_dim_of(config.get_text_config()))
    check_logprobs_close(hf, eager)
    check_logprobs_close(hf, graphs)
    # Acceptance 3: the graphs replay the same kernels on the same inputs.
    assert [t for t, _ in graphs] == [t for t, _ in eager]
