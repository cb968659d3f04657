"""How csrc/gemv.cu spreads a projection over the GPU (`kernels.gemv_shape`): shapes only, so
these run without a GPU. The kernel's results at every launch shape are pinned on the GPU by
test_kernels.py's test_gemv_launch_shapes_agree."""

import pytest

from mm_runtime.gpu_worker import kernels

H200_SMS = 132


@pytest.mark.parametrize(
    "num_out,k,silu_pairs,parts",
    [
        (2048, 1536, False, 4),  # Qwen2-VL-2B QKV: 512 groups; a 1536 row has 192 vectors
        (1536, 1536, False, 4),  # its O projection: 384 groups
        (8960, 1536, True, 1),  # gate-up: 4480 groups fill the GPU alone
        (1536, 8960, False, 4),  # down: 384 groups, 1120 vectors a row
        (4608, 3584, False, 1),  # Qwen2-VL-7B QKV: 1152 groups
        (3584, 18944, False, 2),  # 7B down: 896 groups
    ],
)
def test_decode_layer_shapes(num_out: int, k: int, silu_pairs: bool, parts: int) -> None:
    shape = kernels.gemv_shape(num_out, k, silu_pairs, H200_SMS)
    assert (shape.rows, shape.vecs) in kernels.GEMV_SHAPES
    assert shape.parts == parts


@pytest.mark.parametrize("num_out", [1, 7, 100, 1000, 30000])
@pytest.mark.parametrize("k", [8, 64, 1536, 8960, 20000])
@pytest.mark.parametrize("sms", [8, 132])
def test_slices_keep_a_vector_a_lane(num_out: int, k: int, sms: int) -> None:
    """K is split only while the groups give fewer than eight warps an SM, and never into slices
    of less than a 16-byte vector a lane (below that lanes would idle)."""
    shape = kernels.gemv_shape(num_out, k, False, sms)
    assert shape.parts in (1, 2, 4, 8) and kernels.GEMV_WARPS % shape.parts == 0
    if shape.parts > 1:
        groups = -(-num_out // shape.rows)
        assert k // 8 // shape.parts >= 32
        assert groups * shape.parts // 2 < sms * 8
