"""Model construction: built on the target device in the target dtype, dummy or loaded weights.

Float32 on the CPU is covered end to end by the HF equivalence tests; here: other dtypes keep the
float32 buffers right, dummy weights need no files, and (GPU) the real-size bench configs build
and generate with dummy weights.
"""

import gc
import shutil
from pathlib import Path

import pytest
import torch
from mm_testing import ARCHS, mm_prompt, prompt_text, random_image

from mm_runtime import LLM, SamplingParams
from mm_runtime.gpu_worker.layers.attention import TorchAttentionBackend
from mm_runtime.gpu_worker.models import MODEL_CLASSES, MultimodalModel
from mm_runtime.gpu_worker.models.loader import build_model
from mm_runtime.shared.errors import ConfigError
from mm_runtime.shared.model_dirs import write_model_dir
from mm_runtime.shared.model_info import ModelInfo

CONFIG_DIR = Path(__file__).resolve().parents[2] / "bench" / "configs"
CPU = torch.device("cpu")


def _build(
    model_dir: Path, dtype: torch.dtype, load_format: str = "dummy", seed: int = 0
) -> MultimodalModel:
    info = ModelInfo.from_model_dir(model_dir)
    return build_model(info, TorchAttentionBackend(), dtype, CPU, load_format, seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_build_keeps_float32_buffers(tiny_models: dict[str, Path], arch: str) -> None:
    model = _build(tiny_models[arch], torch.bfloat16, seed=1)
    ref = _build(tiny_models[arch], torch.float32, seed=1)
    assert torch.get_default_dtype() == torch.float32  # restored
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # Ours: a plain attribute, computed in float32 whatever the default dtype.
    assert model.language_model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.language_model.rotary.inv_freq, ref.language_model.rotary.inv_freq)
    if arch == "qwen2_vl":  # our ViT's rotary frequencies too
        assert model.visual.inv_freq.dtype == torch.float32
        assert torch.equal(model.visual.inv_freq, ref.visual.inv_freq)
    # transformers' vision modules compute buffers at init (CLIP's position_ids): not rounded
    # to bfloat16.
    ref_buffers = dict(ref.named_buffers())
    buffers = dict(model.named_buffers())
    assert buffers.keys() == ref_buffers.keys()
    for name, buffer in buffers.items():
        assert buffer.dtype == ref_buffers[name].dtype, name
        assert torch.equal(buffer, ref_buffers[name]), name


def test_dummy_weights_are_seeded_and_small(tiny_models: dict[str, Path]) -> None:
    a = _build(tiny_models["llava"], torch.bfloat16, seed=1)
    b = _build(tiny_models["llava"], torch.bfloat16, seed=1)
    c = _build(tiny_models["llava"], torch.bfloat16, seed=2)
    params = zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True)
    for (name, pa), pb, pc in params:
        assert torch.equal(pa, pb), name
        assert pa.abs().max() <= 1e-2 and not torch.equal(pa, pc), name


def test_dummy_needs_no_weight_files(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "no_weights"
    shutil.copytree(
        tiny_models["qwen2_vl"], model_dir, ignore=shutil.ignore_patterns("*.safetensors*")
    )
    _build(model_dir, torch.float32, "dummy")
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        _build(model_dir, torch.float32, "auto")


def test_default_dtype_restored_when_construction_fails(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> MultimodalModel:
        assert torch.get_default_dtype() == torch.bfloat16  # built under the target dtype
        raise RuntimeError("construction failed")

    monkeypatch.setitem(MODEL_CLASSES, "llava", broken)
    with pytest.raises(RuntimeError, match="construction failed"):
        _build(tiny_models["llava"], torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen2_vl_2b", "qwen2_vl_7b", "llava_1_5_7b"])
def test_real_size_dummy_model_on_gpu(tmp_path: Path, name: str) -> None:
    model_dir = write_model_dir(tmp_path / name, CONFIG_DIR / f"{name}.json")
    llm = LLM(
        str(model_dir),
        device="cuda",
        dtype="bfloat16",
        load_format="dummy",
        max_model_len=4096,
        max_num_seqs=4,
    )
    model = llm.engine.runner.model
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.is_cuda for b in model.buffers())
    if name.startswith("qwen2_vl"):
        assert model.visual.inv_freq.dtype == torch.float32  # not rounded to the model's dtype
    arch = llm.engine.info.model_type
    prompt = mm_prompt(prompt_text(arch, "What is this?", 1), [random_image(448, 336)])
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8
    del llm, model
    gc.collect()
    torch.cuda.empty_cache()
