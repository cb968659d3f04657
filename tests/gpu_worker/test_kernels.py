"""CUDA kernels of csrc/ against their torch references (gpu_worker/layers/), on random shapes.

Outputs are poisoned first: a NaN-filled block of the same size is freed just before the call,
so torch's caching allocator hands it to the kernel's output and any element the kernel fails
to write stays NaN.
"""

import pytest
import torch
from transformers import Qwen2Config

from mm_runtime.gpu_worker.layers.activation import SiluAndMul
from mm_runtime.gpu_worker.layers.norm import RMSNorm
from mm_runtime.gpu_worker.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.gpu

TOLERANCE = {  # (rtol, atol): a few ulps of the storage type
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = list(TOLERANCE)
SHAPES = [(1, 64), (7, 80), (33, 128), (256, 1536), (5, 4096), (3, 8960), (1000, 1000)]


def poison(numel: int, dtype: torch.dtype) -> None:
    torch.full((numel,), float("nan"), dtype=dtype, device="cuda")  # freed at once


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_mul(shape: tuple[int, int], dtype: torch.dtype) -> None:
    from mm_runtime.gpu_worker import kernels

    torch.manual_seed(0)
    num_tokens, d = shape
    gate_up = torch.randn(num_tokens, 2 * d, dtype=dtype, device="cuda") * 3
    poison(num_tokens * d, dtype)
    out = kernels.silu_and_mul(gate_up)
    torch.testing.assert_close(
        out, SiluAndMul()(gate_up), rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(shape: tuple[int, int], dtype: torch.dtype, with_residual: bool) -> None:
    from mm_runtime.gpu_worker import kernels

    torch.manual_seed(1)
    num_tokens, hidden = shape
    norm = RMSNorm(hidden, eps=1e-6).to(device="cuda", dtype=dtype)
    norm.weight.data.normal_(1.0, 0.1)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
    residual = torch.randn_like(x) if with_residual else None
    expected, expected_residual = norm(x, None if residual is None else residual.clone())
    poison(x.numel(), dtype)
    out, new_residual = kernels.rms_norm(x, norm.weight.data, 1e-6, residual)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(new_residual, expected_residual, rtol=0, atol=0)  # one rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 80), (1031, 1280), (33, 1536), (5, 4096), (9, 24)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm(shape: tuple[int, int], dtype: torch.dtype, with_residual: bool) -> None:
    from mm_runtime.gpu_worker import kernels

    torch.manual_seed(6)
    rows, hidden = shape
    weight = torch.randn(hidden, dtype=dtype, device="cuda") * 0.1 + 1
    bias = torch.randn(hidden, dtype=dtype, device="cuda") * 0.1
    x = torch.randn(rows, hidden, dtype=dtype, device="cuda") * 3 + 0.5  # a mean to remove
    residual = torch.randn_like(x) if with_residual else None
    summed = x if residual is None else residual + x  # rounded to dtype, as the model adds
    expected = torch.nn.functional.layer_norm(summed, (hidden,), weight, bias, 1e-6)
    if dtype == torch.float32 and hidden > 2048:  # 16 vectors of 4 floats per lane at most
        assert not kernels.layer_norm_fits(x)
        return
    assert kernels.layer_norm_fits(x)
    poison(x.numel(), dtype)
    out, new_residual = kernels.layer_norm(x, weight, bias, 1e-6, residual)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(new_residual, summed, rtol=0, atol=0)  # one rounding
    assert (new_residual is residual) if with_residual else (new_residual is x)


def test_layer_norm_fits_only_whole_vectors_up_to_the_registers() -> None:
    from mm_runtime.gpu_worker import kernels

    assert kernels.layer_norm_fits(torch.empty(1, 4096, dtype=torch.bfloat16))
    assert not kernels.layer_norm_fits(torch.empty(1, 4104, dtype=torch.bfloat16))
    assert not kernels.layer_norm_fits(torch.empty(1, 1284, dtype=torch.bfloat16))  # not % 8
    assert kernels.layer_norm_fits(torch.empty(1, 1284, dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 80), (8, 128)])
def test_write_kv_cache(dtype: torch.dtype, num_kv_heads: int, head_dim: int) -> None:
    from mm_runtime.gpu_worker import kernels
    from mm_runtime.gpu_worker.layers.attention import write_kv_cache

    torch.manual_seed(2)
    num_blocks, block_size, num_tokens = 64, 16, 300
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    expected = cache.clone()
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    write_kv_cache(k, v, expected, slots)
    padded = torch.cat([slots, torch.full((5,), -1, device="cuda")])  # padding slots skipped
    kernels.write_kv_cache(torch.cat([k, k[:5]]), torch.cat([v, v[:5]]), cache, padded)
    assert torch.equal(cache.isnan(), expected.isnan())
    assert torch.equal(cache.nan_to_num(), expected.nan_to_num())


def rotary_embedding(head_dim: int, mrope: bool) -> RotaryEmbedding:
    """Qwen2's RoPE at theta 1e6, 1-D or with three M-RoPE sections."""
    config = Qwen2Config(rope_theta=1e6)
    if mrope:
        quarter = head_dim // 8
        sections = [head_dim // 2 - 2 * quarter, quarter, quarter]
        config.rope_parameters = {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": sections,
        }
    return RotaryEmbedding(config, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mrope", [False, True])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(12, 2, 128), (16, 16, 64), (4, 1, 80)]
)
def test_rotary(
    dtype: torch.dtype, mrope: bool, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    from mm_runtime.gpu_worker import kernels

    torch.manual_seed(3)
    rotary = rotary_embedding(head_dim, mrope)
    num_tokens = 257
    positions = torch.randint(0, 30000, (3, num_tokens) if mrope else (num_tokens,), device="cuda")
    q = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device="cuda")
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device="cuda")
    expected_q, expected_k = rotary(positions, q, k)
    cos, sin = rotary.cos_sin(positions, dtype)
    kernels.apply_rotary(q, k, cos, sin)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(q, expected_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(k, expected_k, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mrope", [False, True])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(12, 2, 128), (16, 16, 64), (4, 1, 80), (28, 4, 128)]
)
def test_rotary_kv_cache(
    dtype: torch.dtype, mrope: bool, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """The fused kernel equals the unfused CUDA path bit for bit (split, rotary in place, cache
    write), and the torch reference within a few ulps; padding slots write no K/V."""
    from mm_runtime.gpu_worker import kernels
    from mm_runtime.gpu_worker.layers.attention import write_kv_cache

    torch.manual_seed(7)
    rotary = rotary_embedding(head_dim, mrope)
    num_tokens, num_blocks, block_size = 203, 64, 16
    positions = torch.randint(0, 30000, (3, num_tokens) if mrope else (num_tokens,), device="cuda")
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, device="cuda")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[-7:] = -1  # padding tokens
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    expected_cache = cache.clone()
    reference_cache = cache.clone()

    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(num_tokens, num_heads, head_dim).contiguous()  # the unfused path's copies
    k = k.reshape(num_tokens, num_kv_heads, head_dim).contiguous()
    v = v.reshape(num_tokens, num_kv_heads, head_dim)
    valid = slots >= 0
    ref_q, ref_k = rotary(positions, q.clone(), k.clone())  # torch
    write_kv_cache(ref_k[valid], v[valid], reference_cache, slots[valid])
    cos, sin = rotary.prepare(positions, dtype)
    kernels.apply_rotary(q, k, cos, sin)  # the unfused CUDA path, in place
    kernels.write_kv_cache(k, v.contiguous(), expected_cache, slots)

    poison(num_tokens * q_size, dtype)
    fused_q = kernels.rotary_kv_cache(qkv, cos, sin, cache, slots, num_heads)
    assert torch.equal(fused_q, q)
    assert torch.equal(cache.isnan(), expected_cache.isnan())
    assert torch.equal(cache.nan_to_num(), expected_cache.nan_to_num())
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(fused_q, ref_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(
        cache.nan_to_num(), reference_cache.nan_to_num(), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 2])
@pytest.mark.parametrize("k,n", [(1536, 2048), (64, 1000), (3584, 4608), (4096, 22016)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("silu_pairs", [False, True])
def test_norm_linear(
    dtype: torch.dtype, num_tokens: int, k: int, n: int, with_residual: bool, silu_pairs: bool
) -> None:
    """RMSNorm, the projection (and SiLU-and-mul) in one kernel against the three: the residual
    bit for bit, the output within a few ulps (float32 sums in another order than cuBLAS's)."""
    from mm_runtime.gpu_worker import kernels

    torch.manual_seed(8)
    norm = RMSNorm(k, eps=1e-6).to(device="cuda", dtype=dtype)
    norm.weight.data.normal_(1.0, 0.1)
    weight = torch.randn(n, k, dtype=dtype, device="cuda") / k**0.5
    bias = None if n == 22016 else torch.randn(n, dtype=dtype, device="cuda")  # LLaVA: no bias
    x = torch.randn(num_tokens, k, dtype=dtype, device="cuda")
    residual = torch.randn_like(x) if with_residual else None
    normed, expected_residual = norm(x, None if residual is None else residual.clone())
    expected = torch.nn.functional.linear(normed, weight, bias)
    if silu_pairs:
        expected = SiluAndMul()(expected)
    assert kernels.gemv_fits(x, weight)
    poison(expected.numel(), dtype)
    out, new_residual = kernels.norm_linear(
        x, residual, norm.weight, 1e-6, weight, bias, silu_pairs
    )
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    assert torch.equal(new_residual, expected_residual)
    assert new_residual is x if residual is None else new_residual is not residual


def test_gemv_fits_small_half_batches_only() -> None:
    from mm_runtime.gpu_worker import kernels

    weight = torch.empty(64, 128, dtype=torch.bfloat16, device="cuda")
    rows = torch.empty(3, 128, dtype=torch.bfloat16, device="cuda")
    assert kernels.gemv_fits(rows[:2], weight)
    assert not kernels.gemv_fits(rows, weight)  # 3 tokens: cuBLAS's
    assert not kernels.gemv_fits(rows[:1].float(), weight.float())
    assert not kernels.gemv_fits(rows[:1].cpu(), weight.cpu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 2])
@pytest.mark.parametrize("k,n", [(1536, 1536), (8960, 1536), (72, 1000), (4096, 4100)])
def test_small_linear(dtype: torch.dtype, num_tokens: int, k: int, n: int) -> None:
    """The weight stream without the norm (the O and down projections) against nn.Linear."""
    from mm_runtime.gpu_worker import kernels

    torch.manual_seed(9)
    weight = torch.randn(n, k, dtype=dtype, device="cuda") / k**0.5
    bias = torch.randn(n, dtype=dtype, device="cuda") if n == 1000 else None
    x = torch.randn(num_tokens, k, dtype=dtype, device="cuda")
    expected = torch.nn.functional.linear(x, weight, bias)
    assert kernels.gemv_fits(x, weight)
    poison(expected.numel(), dtype)
    out = kernels.small_linear(x, weight, bias)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "launch", [(r, v, p) for r, v in [(2, 2), (2, 4), (4, 2), (4, 4)] for p in (1, 2, 4, 8)]
)
@pytest.mark.parametrize("silu_pairs", [False, True])
def test_gemv_launch_shapes_agree(launch: tuple[int, int, int], silu_pairs: bool) -> None:
    """Every launch shape csrc/gemv.cu is built for (bench/decode_linear.py --sweep times them)
    computes the same projection: rows past N, K slices of uneven length, two token rows."""
    from mm_runtime.gpu_worker import kernels

    torch.manual_seed(10)
    k, n, dtype = 1992, 2 * 1003, torch.bfloat16  # 249 vectors: no slice count divides them
    norm = RMSNorm(k, eps=1e-6).to(device="cuda", dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype, device="cuda") / k**0.5
    bias = torch.randn(n, dtype=dtype, device="cuda")
    x, residual = torch.randn(2, 2, k, dtype=dtype, device="cuda")
    normed, expected_residual = norm(x, residual.clone())
    expected = torch.nn.functional.linear(normed, weight, bias)
    if silu_pairs:
        expected = SiluAndMul()(expected)
    poison(expected.numel(), dtype)
    shape = kernels.GemvShape(*launch)
    out, new_residual = kernels.norm_linear(
        x, residual, norm.weight, 1e-6, weight, bias, silu_pairs, shape
    )
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1.6e-2)
    assert torch.equal(new_residual, expected_residual)
    plain = kernels.small_linear(normed, weight, bias, shape)
    torch.testing.assert_close(
        plain, torch.nn.functional.linear(normed, weight, bias), rtol=1.6e-2, atol=1.6e-2
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quick_gelu(shape: tuple[int, int], dtype: torch.dtype) -> None:
    from transformers.activations import ACT2FN

    from mm_runtime.gpu_worker import kernels

    torch.manual_seed(4)
    x = torch.randn(*shape, dtype=dtype, device="cuda") * 4
    expected = ACT2FN["quick_gelu"](x.float()).to(dtype)  # the reference, rounded once
    out = kernels.quick_gelu_(x.clone())
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,head_dim", [(16, 80), (4, 16), (12, 128)])
def test_rotary_vision(dtype: torch.dtype, num_heads: int, head_dim: int) -> None:
    from mm_runtime.gpu_worker import kernels
    from mm_runtime.gpu_worker.models.qwen2_vl_vision import rotate_vision

    torch.manual_seed(5)
    num_patches = 1031
    qkv = torch.randn(num_patches, 3, num_heads, head_dim, dtype=dtype, device="cuda")
    angles = torch.rand(num_patches, head_dim // 2, device="cuda") * 100
    cos, sin = angles.cos(), angles.sin()
    expected_q, expected_k = rotate_vision(qkv[:, 0], qkv[:, 1], cos, sin)
    v = qkv[:, 2].clone()
    kernels.apply_rotary_vision(qkv, cos, sin)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(qkv[:, 0], expected_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(qkv[:, 1], expected_k, rtol=rtol, atol=atol)
    assert torch.equal(qkv[:, 2], v)  # v untouched
