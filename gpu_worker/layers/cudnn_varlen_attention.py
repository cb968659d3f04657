"""Non-causal attention within each of several packed sequences (a ViT's images), through cuDNN's
fused attention graph: the GPU path of the vision encoders' attention.

Why cuDNN, and why not through torch: at the Qwen2-VL ViT's head dim 80, cuDNN's fused kernel runs
1.5x torch's flash attention on a 1920x1080 image (1.62 against 2.44 ms per layer on an H200), and
3.8x on sixteen small images, one call against sixteen (bench/vit_attention.py); but torch's cuDNN
backend keys its execution plans on the exact sequence length and builds a new one (about 44 ms)
for every image size it meets. Here sequence lengths are run-time tensors (cuDNN's
padding mask) and each sequence is found by a ragged offset, so one graph serves every call whose
sequence count and longest sequence fall in the same power-of-two bucket: a handful of graphs for
all image sizes. The graph API comes from NVIDIA's `cudnn` Python frontend
(`nvidia-cudnn-frontend`, on top of the cuDNN library torch already loads); where it is missing,
`supports()` says no and the caller keeps torch's flash attention.
"""

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

_UID_Q, _UID_K, _UID_V, _UID_O = 1, 2, 3, 4
_UID_SEQ_LEN, _UID_QKV_OFFSETS, _UID_O_OFFSETS = 5, 6, 7
MIN_LEN_BUCKET = 256  # shorter sequences share one graph; tiles past a length exit at once
# Calls of 1 to 16 sequences share a graph: the padding sequences' tiles exit at once, where a
# graph costs ~70 ms of host time to build, with the GPU idle (per power of two from 1, a
# 500-request offline run built 20 graphs, 1.4 s of its 20 s, on an H200).
MIN_BATCH_BUCKET = 16
MAX_OFFSET = 2**31 - 1  # ragged offsets are int32 element counts


@dataclass(frozen=True, slots=True)
class _GraphKey:
    """What one graph is built for: calls that agree on all of it share the graph."""

    device: torch.device
    dtype: torch.dtype
    batch: int  # sequences, a power of two (empty ones pad the rest)
    max_len: int  # tokens of the longest sequence, a power of two
    heads: int
    head_dim: int
    token_stride: int  # elements from one token of q/k/v to the next


@dataclass(slots=True)
class _Graph:
    graph: Any  # cudnn.pygraph, built and planned
    workspace_bytes: int


_lock = threading.Lock()
_graphs: dict[_GraphKey, _Graph] = {}
_handles: dict[int, Any] = {}  # device index -> cudnn handle
_cudnn: Any = None  # the module, once imported
_last_metadata: tuple[tuple, torch.Tensor] | None = None  # see _metadata


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether this path takes these inputs: half precision, a head dim cuDNN's fused kernel
    has (a multiple of 8 up to 128), and the cudnn frontend importable (a GPU-only dependency;
    without it the caller keeps torch's attention)."""
    return (
        dtype in (torch.bfloat16, torch.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
        and _import()
    )


def _import() -> bool:
    global _cudnn
    if _cudnn is None:
        try:
            import cudnn

            _cudnn = cudnn
        except (ImportError, OSError) as e:
            logger.warning("cudnn frontend unavailable (%s): ViT attention stays on flash", e)
            _cudnn = False
    return _cudnn is not False


def bucket(n: int, minimum: int) -> int:
    """The power of two at or above n (at least `minimum`): the sizes one graph is built for."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def varlen_attention(
    q: torch.Tensor,  # [num_tokens, heads, head_dim], any token stride, head stride head_dim
    k: torch.Tensor,  # same shape and strides as q
    v: torch.Tensor,
    lengths: list[int],  # tokens of each sequence, in order; they sum to num_tokens
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v within each sequence: [num_tokens, heads, head_dim]."""
    num_tokens, heads, head_dim = q.shape
    assert k.stride() == q.stride() and v.stride() == q.stride(), "q, k, v share one layout"
    assert q.stride(1) == head_dim and q.stride(2) == 1, "heads packed inside each token"
    assert sum(lengths) == num_tokens and min(lengths) > 0
    out = torch.empty(num_tokens, heads, head_dim, dtype=q.dtype, device=q.device)
    # Ragged offsets are int32 element counts: one call reaches at most 2^31 elements of q.
    max_tokens = MAX_OFFSET // q.stride(0)
    assert max(lengths) <= max_tokens
    groups: list[list[int]] = [[]]
    for n in lengths:
        if sum(groups[-1]) + n > max_tokens:
            groups.append([])
        groups[-1].append(n)
    start = 0
    for group in groups:
        end = start + sum(group)
        _attend(q[start:end], k[start:end], v[start:end], group, out[start:end])
        start = end
    return out


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], out: torch.Tensor
) -> None:
    _, heads, head_dim = q.shape
    token_stride = q.stride(0)
    batch = bucket(len(lengths), MIN_BATCH_BUCKET)
    max_len = bucket(max(lengths), MIN_LEN_BUCKET)
    g = _graph(_GraphKey(q.device, q.dtype, batch, max_len, heads, head_dim, token_stride))
    meta = _metadata(q.device, tuple(lengths), batch, token_stride, heads * head_dim)
    workspace = torch.empty(g.workspace_bytes, dtype=torch.uint8, device=q.device)
    variant_pack = {
        _UID_Q: q.data_ptr(),
        _UID_K: k.data_ptr(),
        _UID_V: v.data_ptr(),
        _UID_O: out.data_ptr(),
        _UID_SEQ_LEN: meta[:batch].data_ptr(),
        _UID_QKV_OFFSETS: meta[batch : 2 * batch + 1].data_ptr(),
        _UID_O_OFFSETS: meta[2 * batch + 1 :].data_ptr(),
    }
    handle = _handle(q.device)
    _cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    g.graph.execute(variant_pack, workspace.data_ptr(), handle=handle)


def prebuild(
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    head_dim: int,
    token_stride: int,
    max_len: int,
) -> int:
    """Builds the graphs that calls of up to MIN_BATCH_BUCKET sequences of up to max_len tokens
    use (one per length bucket), so that no step waits for one; returns how many there are.
    Calls of more sequences still build theirs on first use."""
    if not supports(dtype, head_dim):
        return 0
    lengths = []
    while not lengths or lengths[-1] < bucket(max_len, MIN_LEN_BUCKET):
        lengths.append(MIN_LEN_BUCKET << len(lengths))
    for n in lengths:
        _graph(_GraphKey(device, dtype, MIN_BATCH_BUCKET, n, heads, head_dim, token_stride))
    return len(lengths)


def _metadata(
    device: torch.device,
    lengths: tuple[int, ...],
    batch: int,
    token_stride: int,
    out_token_stride: int,
) -> torch.Tensor:
    """[lengths | q/k/v offsets | out offsets], int32 on the device. Padding entries are empty
    sequences at the end (length 0, offset = num_tokens); offsets count elements. The last one
    is kept: every layer of a ViT forward asks for the same, and making it (a pinned copy) cost
    as much host time as launching the attention."""
    global _last_metadata
    key = (device, lengths, batch, token_stride, out_token_stride)
    if _last_metadata is not None and _last_metadata[0] == key:
        return _last_metadata[1]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    starts += [starts[-1]] * (batch - len(lengths))
    host = torch.tensor(
        [
            *lengths,
            *[0] * (batch - len(lengths)),
            *(s * token_stride for s in starts),
            *(s * out_token_stride for s in starts),
        ],
        dtype=torch.int32,
    ).pin_memory()
    meta = host.to(device, non_blocking=True)  # pinned: does not wait for queued work
    _last_metadata = (key, meta)
    return meta


def _handle(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _handles:
            with torch.cuda.device(index):
                _handles[index] = _cudnn.create_handle()
        return _handles[index]


def _graph(key: _GraphKey) -> _Graph:
    with _lock:
        g = _graphs.get(key)
    if g is None:
        g = _build(key)
        with _lock:
            _graphs[key] = g
        logger.info("cuDNN varlen attention graph %s (%d built)", key, len(_graphs))
    return g


def _build(key: _GraphKey) -> _Graph:
    cudnn = _cudnn
    batch, max_len, heads, head_dim = key.batch, key.max_len, key.heads, key.head_dim
    io_type = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}
    dtype = io_type[key.dtype]
    graph = cudnn.pygraph(
        io_data_type=dtype,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=_handle(key.device),
    )
    # (batch, heads, tokens, head_dim) as cuDNN orders them; the batch stride is unused with
    # ragged offsets but must describe a valid layout.
    dims = [batch, heads, max_len, head_dim]
    qkv_strides = [max_len * key.token_stride, head_dim, key.token_stride, 1]
    o_strides = [max_len * heads * head_dim, head_dim, heads * head_dim, 1]

    def int_tensor(uid: int, rows: int) -> Any:
        t = graph.tensor(dim=[rows, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
        t.set_uid(uid)
        return t

    qkv_offsets = int_tensor(_UID_QKV_OFFSETS, batch + 1)
    q, k, v = (
        graph.tensor(dim=dims, stride=qkv_strides, data_type=dtype, ragged_offset=qkv_offsets)
        for _ in range(3)
    )
    for t, uid in ((q, _UID_Q), (k, _UID_K), (v, _UID_V)):
        t.set_uid(uid)
    seq_len = int_tensor(_UID_SEQ_LEN, batch)
    out, _ = graph.sdpa(
        q=q,
        k=k,
        v=v,
        generate_stats=False,
        attn_scale=1.0 / math.sqrt(head_dim),
        use_padding_mask=True,
        seq_len_q=seq_len,
        seq_len_kv=seq_len,
        compute_data_type=cudnn.data_type.FLOAT,
        name="varlen_attention",
    )
    out.set_uid(_UID_O)
    out.set_output(True)
    out.set_dim(dims)
    out.set_stride(o_strides)
    out.set_data_type(dtype)
    out.set_ragged_offset(int_tensor(_UID_O_OFFSETS, batch + 1))
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return _Graph(graph, graph.get_workspace_size())
