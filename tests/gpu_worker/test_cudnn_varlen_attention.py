"""cuDNN varlen attention (the ViT's, gpu_worker/layers/cudnn_varlen_attention.py) against float32
attention within each sequence, on strided views of one fused QKV tensor as the ViT passes them.

Outputs are poisoned first (a NaN block of the output's size is freed just before the call, so the
caching allocator hands it over): a row the kernel does not write stays NaN.
"""

import pytest
import torch
import torch.nn.functional as F

from mm_runtime.gpu_worker.layers import cudnn_varlen_attention as cva

# Lengths: one sequence; single tokens; batches padded to 16 (and 20 to 32) with empty entries;
# lengths across several length buckets (256 .. 16384) in one call.
LENGTHS = [
    [1000],
    [1, 1, 1],
    [5, 700, 33],
    [256, 257, 1, 4096, 80],
    [576, 10764, 1296],
    [17 * i + 3 for i in range(20)],
]


def test_buckets_are_powers_of_two_with_a_floor() -> None:
    assert [cva.bucket(n, 1) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
    assert [cva.bucket(n, 256) for n in (1, 256, 257, 10764)] == [256, 256, 512, 16384]


def _reference(qkv: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    outs = []
    for part in qkv.double().split(lengths):
        q, k, v = (t.transpose(0, 1) for t in part.unbind(1))  # [heads, n, head_dim]
        outs.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1))
    return torch.cat(outs)


def _check(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype) -> None:
    torch.manual_seed(sum(lengths) + head_dim)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, device="cuda", dtype=dtype)
    q, k, v = qkv.unbind(1)  # strided views: token stride 3 * heads * head_dim
    torch.full((q.numel(),), float("nan"), dtype=dtype, device="cuda")  # poison
    out = cva.varlen_attention(q, k, v, lengths)
    assert out.shape == q.shape and torch.isfinite(out).all()
    reference = _reference(qkv, lengths)
    error = float((out.double() - reference).norm() / reference.norm())
    assert error < 1e-2, error


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_matches_attention_within_each_sequence(
    lengths: list[int], head_dim: int, dtype: torch.dtype
) -> None:
    assert cva.supports(dtype, head_dim), "the cudnn frontend should import on a GPU machine"
    _check(lengths, 16 if head_dim == 80 else 4, head_dim, dtype)


@pytest.mark.gpu
def test_calls_split_where_int32_offsets_would_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    # With offsets capped at 700 tokens' worth, [300, 300, 300, 500, 200] runs as three calls.
    heads, head_dim = 4, 64
    monkeypatch.setattr(cva, "MAX_OFFSET", 700 * 3 * heads * head_dim)
    _check([300, 300, 300, 500, 200], heads, head_dim, torch.bfloat16)


@pytest.mark.gpu
def test_prebuilt_graphs_serve_every_call_up_to_their_length() -> None:
    heads, head_dim, dtype = 2, 64, torch.bfloat16  # a layout no other test builds
    device = torch.device("cuda", torch.cuda.current_device())
    stride = 3 * heads * head_dim
    assert cva.prebuild(device, dtype, heads, head_dim, stride, 3000) == 5  # 256 .. 4096
    built = len(cva._graphs)
    for lengths in ([3000], [1, 2, 3], [100] * 16, [4096, 7]):
        _check(lengths, heads, head_dim, dtype)
    assert len(cva._graphs) == built  # no call built a graph
    _check([5] * 17, heads, head_dim, dtype)  # 17 sequences: the next batch bucket, built now
    assert len(cva._graphs) == built + 1
