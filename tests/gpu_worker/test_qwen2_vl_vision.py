"""Our Qwen2-VL ViT against transformers' on the same weights: bit-equal in float32 on the CPU;
on the GPU in bf16, no further from transformers' float32 output than transformers' own bf16."""

import pytest
import torch
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from mm_runtime.gpu_worker.models.qwen2_vl_vision import Qwen2VisionTransformer, vision_positions

# (t, h, w) patch grids: one image; several images of other shapes, a two-frame video among them.
GRIDS = [[(1, 4, 6)], [(1, 8, 8), (2, 4, 4), (1, 2, 10), (1, 6, 2)]]


def _config(**overrides: object) -> Qwen2VLVisionConfig:
    fields = dict(depth=2, embed_dim=64, num_heads=4, hidden_size=48, mlp_ratio=4)
    fields.update(overrides)
    config = Qwen2VLVisionConfig(**fields)
    config._attn_implementation = "sdpa"
    return config


def _pair(
    config: Qwen2VLVisionConfig, device: str, dtype: torch.dtype
) -> tuple[Qwen2VisionTransformerPretrainedModel, Qwen2VisionTransformer]:
    torch.manual_seed(0)
    config.dtype = dtype
    hf = Qwen2VisionTransformerPretrainedModel._from_config(config).to(device).eval()
    with torch.no_grad():  # random weights of realistic scale (the init leaves biases at 0)
        for param in hf.parameters():
            param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5 if param.dim() > 1 else 0.1)
            if param.dim() == 1 and param.shape[0] == config.embed_dim:
                param.add_(1.0)  # norm weights near one
    ours = Qwen2VisionTransformer(config).to(device=device, dtype=dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _pixels(grids: list[tuple[int, int, int]], config: Qwen2VLVisionConfig) -> torch.Tensor:
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    num_patches = sum(t * h * w for t, h, w in grids)
    return torch.randn(num_patches, patch_dim, generator=torch.Generator().manual_seed(1))


def _hf_forward(
    hf: Qwen2VisionTransformerPretrainedModel, pixels: torch.Tensor, grids: list
) -> torch.Tensor:
    out = hf(pixels, grid_thw=torch.tensor(grids, device=pixels.device))
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_positions_follow_the_merge_block_order() -> None:
    # A 2x4 grid with 2x2 merge blocks: block (0,0) holds patches (0,0),(0,1),(1,0),(1,1).
    rows_cols = vision_positions([(1, 2, 4)], merge=2).tolist()
    assert rows_cols == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert len(vision_positions([(3, 2, 2)], merge=2)) == 12  # frames repeat the grid


@pytest.mark.parametrize("grids", GRIDS)
def test_equals_transformers_on_cpu(grids: list[tuple[int, int, int]]) -> None:
    config = _config()
    hf, ours = _pair(config, "cpu", torch.float32)
    pixels = _pixels(grids, config)
    with torch.no_grad():
        expected = _hf_forward(hf, pixels, grids)
        got = ours(pixels, grids)
    assert got.shape == (sum(t * h * w for t, h, w in grids) // 4, config.hidden_size)
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grids", [*GRIDS, [(1, 40, 60), (1, 16, 16)]])
def test_half_precision_on_gpu_is_as_close_as_transformers(
    grids: list[tuple[int, int, int]], dtype: torch.dtype
) -> None:
    # Qwen2-VL-2B's ViT widths (head dim 80), four blocks.
    config = _config(depth=4, embed_dim=1280, num_heads=16, hidden_size=1536)
    hf32, _ = _pair(config, "cuda", torch.float32)
    hf, ours = _pair(config, "cuda", dtype)
    pixels = _pixels(grids, config).cuda()
    with torch.no_grad():
        reference = _hf_forward(hf32, pixels, grids).double()
        torch.full((reference.numel() * 4,), float("nan"), dtype=dtype, device="cuda")  # poison
        got = ours(pixels, grids)
        theirs = _hf_forward(hf, pixels, grids)
    assert torch.isfinite(got).all()

    def error(x: torch.Tensor) -> float:
        return float((x.double() - reference).norm() / reference.norm())

    assert error(got) <= 1.25 * error(theirs) + 1e-3, (error(got), error(theirs))
