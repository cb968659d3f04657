"""CUDA kernels from csrc/: compiled at first use with NVRTC, cached on disk, launched on torch's
current stream (so CUDA graphs capture them).

The cache key is a hash of every source file, the compile options and the GPU architecture, so
an edit or another GPU recompiles and nothing stale is ever loaded. Only cuda-python's low-level
bindings (`cuda.bindings`) are used: they ship with torch's CUDA wheels and with the GPU image.
Each kernel's torch reference lives beside the layer that uses it (gpu_worker/layers/) and is
the oracle of tests/gpu_worker/test_kernels.py.
"""

import ctypes
import functools
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

from mm_runtime.shared.errors import ConfigError

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CACHE_DIR = Path.home() / ".cache" / "mm_runtime" / "kernels"
DTYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _check(result: tuple) -> object:
    """cuda.bindings calls return (status, *values); raise on a bad status."""
    status, *values = result
    if int(status) != 0:
        raise RuntimeError(f"CUDA call failed: {status}")
    return values[0] if len(values) == 1 else values


def _cuda_include_dirs() -> list[str]:
    """Where cuda_bf16.h / cuda_fp16.h live: the toolkit, or the pip wheels' include dirs."""
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    candidates = [str(Path(c) / "include") for c in candidates if c]
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += [str(p.parent) for p in Path(root).glob("*/include/cuda_bf16.h")]
    except ImportError:
        pass
    return [c for c in candidates if (Path(c) / "cuda_bf16.h").is_file()]


class KernelLibrary:
    """Compiles csrc/ once per process (and once per machine, through the disk cache)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._functions: dict[str, object] = {}
        self._shared_limits: dict[str, int] = {}  # dynamic shared memory raised past 48 KB
        self._module: object | None = None

    def _sources(self) -> str:
        # One translation unit: every .cu file, with the shared header inlined by NVRTC.
        return "\n".join(p.read_text() for p in sorted(CSRC.glob("*.cu")))

    def _load(self) -> None:
        from cuda.bindings import driver, nvrtc

        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
        includes = _cuda_include_dirs()
        if not includes:
            raise ConfigError("cannot find the CUDA headers (cuda_bf16.h); set CUDA_HOME")
        options = [
            f"--gpu-architecture={arch}",
            "-std=c++17",
            "--use_fast_math",
            f"-I{CSRC}",
            *(f"-I{d}" for d in includes),
        ]
        source = self._sources()
        headers = "".join(p.read_text() for p in sorted(CSRC.glob("*.cuh")))
        key = hashlib.sha256("\0".join([source, headers, *options[:3]]).encode()).hexdigest()
        cubin_path = CACHE_DIR / f"{key}.cubin"
        if cubin_path.is_file():
            cubin = cubin_path.read_bytes()
        else:
            cubin = self._compile(nvrtc, source, options)
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            tmp = cubin_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(cubin)
            tmp.replace(cubin_path)  # atomic: concurrent processes never read half a file
            logger.info("compiled csrc/ for %s (%d bytes)", arch, len(cubin))
        torch.cuda.current_device()  # makes torch's primary context current on this thread
        self._module = _check(driver.cuModuleLoadData(cubin))

    @staticmethod
    def _compile(nvrtc: object, source: str, options: list[str]) -> bytes:
        program = _check(nvrtc.nvrtcCreateProgram(source.encode(), b"csrc.cu", 0, [], []))
        opts = [o.encode() for o in options]
        status = nvrtc.nvrtcCompileProgram(program, len(opts), opts)[0]
        log_size = _check(nvrtc.nvrtcGetProgramLogSize(program))
        log = b" " * log_size
        _check(nvrtc.nvrtcGetProgramLog(program, log))
        if int(status) != 0:
            raise RuntimeError(f"NVRTC failed to compile csrc/:\n{log.decode(errors='replace')}")
        size = _check(nvrtc.nvrtcGetCUBINSize(program))
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(program, cubin))
        return cubin

    def function(self, name: str) -> object:
        with self._lock:
            if self._module is None:
                self._load()
            fn = self._functions.get(name)
            if fn is None:
                from cuda.bindings import driver

                fn = _check(driver.cuModuleGetFunction(self._module, name.encode()))
                self._functions[name] = fn
            return fn

    def launch(
        self,
        name: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: list[tuple[object, type]],
        shared_bytes: int = 0,
    ) -> None:
        """Launches `name` on torch's current stream; `args` are (value, ctypes type) pairs (a
        ctypes.Structure goes as (struct, None): the kernel takes it by value)."""
        from cuda.bindings import driver

        fn = self.function(name)
        if shared_bytes > 48 * 1024 and self._shared_limits.get(name, 0) < shared_bytes:
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(driver.cuFuncSetAttribute(fn, attr, shared_bytes))
            # All of the SM's unified L1 / shared memory as shared (a hint the driver may
            # otherwise settle below what two blocks of this size need: paged attention's CTAs
            # of 87-109 KB count on two an SM).
            attrs = driver.CUfunction_attribute
            carveout = attrs.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
            _check(driver.cuFuncSetAttribute(fn, carveout, 100))
            self._shared_limits[name] = shared_bytes
        values = tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v for v, _ in args)
        types = tuple(t for _, t in args)
        stream = torch.cuda.current_stream().cuda_stream
        _check(driver.cuLaunchKernel(fn, *grid, *block, shared_bytes, stream, (values, types), 0))


KERNELS = KernelLibrary()
_PTR = ctypes.c_void_p


def _threads(width: int) -> int:
    """Threads per row block: a multiple of 32 up to 1024, about one element each."""
    return min(1024, max(32, (width + 31) // 32 * 32))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * d] -> [num_tokens, d]; the CUDA twin of layers/activation.py."""
    assert gate_up.is_cuda and gate_up.is_contiguous() and gate_up.dim() == 2
    num_tokens, d = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, d, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens:
        name = f"silu_and_mul_{DTYPE_SUFFIX[gate_up.dtype]}"
        args = [(out, _PTR), (gate_up, _PTR), (d, ctypes.c_int)]
        KERNELS.launch(name, (num_tokens, 1, 1), (_threads(d), 1, 1), args)
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new residual) as layers/norm.py's RMSNorm; `residual` is updated in place."""
    assert x.is_cuda and x.is_contiguous() and weight.dtype == x.dtype
    hidden = x.shape[-1]
    num_tokens = x.numel() // hidden
    out = torch.empty_like(x)
    if num_tokens:
        assert residual is None or (residual.is_contiguous() and residual.shape == x.shape)
        name = f"rms_norm_{DTYPE_SUFFIX[x.dtype]}"
        args = [
            (out, _PTR),
            (residual if residual is not None else x, _PTR),
            (x, _PTR),
            (weight, _PTR),
            (hidden, ctypes.c_int),
            (eps, ctypes.c_float),
            (int(residual is not None), ctypes.c_int),
        ]
        KERNELS.launch(name, (num_tokens, 1, 1), (_threads(hidden), 1, 1), args)
    return out, (residual if residual is not None else x)


GEMV_WARPS = 8  # warps per block of csrc/gemv.cu's norm_gemv
GEMV_ROWS = 2  # output rows per warp
GEMV_MAX_TOKENS = 4  # token rows it is instantiated for (1 to 4)


def norm_linear_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `norm_linear` takes x [tokens, K] and weight [N, K]: 1 to 4 token rows (a small
    decode batch) in fp16/bf16, K a multiple of 8, the weight contiguous and 16-byte aligned."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and 1 <= x.shape[0] <= GEMV_MAX_TOKENS
        and x.shape[-1] % 8 == 0
        and weight.is_contiguous()
        and weight.data_ptr() % 16 == 0
    )


def norm_linear(
    x: torch.Tensor,  # [tokens, K]
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N]
    silu_pairs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, new residual): RMSNorm (with the residual add, not in place) then the projection
    in one kernel; with `silu_pairs` the projection is a merged gate-up and out its SiLU-and-mul
    [tokens, N / 2]. The CUDA twin of layers/norm.py, nn.Linear (and layers/activation.py)."""
    assert norm_linear_fits(x, weight) and x.is_contiguous() and norm_weight.dtype == x.dtype
    num_tokens, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.dtype == x.dtype and (not silu_pairs or n % 2 == 0)
    assert residual is None or (residual.is_contiguous() and residual.shape == x.shape)
    assert bias is None or (bias.is_contiguous() and bias.shape == (n,))
    num_out = n // 2 if silu_pairs else n
    out = torch.empty(num_tokens, num_out, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else x
    args = [
        (out, _PTR),
        (new_residual, _PTR),
        (x, _PTR),
        (residual if residual is not None else x, _PTR),
        (norm_weight, _PTR),
        (eps, ctypes.c_float),
        (weight, _PTR),
        (bias.data_ptr() if bias is not None else 0, _PTR),
        (k, ctypes.c_int),
        (n, ctypes.c_int),
        (int(residual is not None), ctypes.c_int),
        (int(silu_pairs), ctypes.c_int),
    ]
    rows_per_block = GEMV_WARPS * GEMV_ROWS
    grid = (-(-num_out // rows_per_block), 1, 1)
    name = f"norm_gemv_{DTYPE_SUFFIX[x.dtype]}_m{num_tokens}"
    shared = num_tokens * k * x.element_size()
    KERNELS.launch(name, grid, (32 * GEMV_WARPS, 1, 1), args, shared)
    return out, new_residual


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """The CUDA twin of layers/attention.py's write_kv_cache (negative slots are skipped)."""
    assert kv_cache.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert slot_mapping.dtype == torch.int64 and k.dtype == kv_cache.dtype
    num_tokens = k.shape[0]
    width = k.shape[1] * k.shape[2]  # num_kv_heads * head_dim
    if num_tokens:
        args = [
            (kv_cache, _PTR),
            (k, _PTR),
            (v, _PTR),
            (slot_mapping, _PTR),
            (kv_cache[0].numel(), ctypes.c_long),
            (width, ctypes.c_int),
        ]
        name = f"write_kv_cache_{DTYPE_SUFFIX[k.dtype]}"
        KERNELS.launch(name, (num_tokens, 1, 1), (_threads(width), 1, 1), args)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place on q [T, H, D] and k [T, Hkv, D] with cos/sin [T, D/2] (or [T, 1, D] as
    RotaryEmbedding.cos_sin returns them: the two halves are equal, the first is used)."""
    num_tokens, num_heads, head_dim = q.shape
    half = head_dim // 2
    cos = cos.reshape(num_tokens, -1)[:, :half].contiguous()
    sin = sin.reshape(num_tokens, -1)[:, :half].contiguous()
    assert q.is_contiguous() and k.is_contiguous() and cos.dtype == q.dtype
    if num_tokens:
        args = [
            (q, _PTR),
            (k, _PTR),
            (cos, _PTR),
            (sin, _PTR),
            (num_heads, ctypes.c_int),
            (k.shape[1], ctypes.c_int),
            (head_dim, ctypes.c_int),
        ]
        name = f"rotary_{DTYPE_SUFFIX[q.dtype]}"
        KERNELS.launch(name, (num_tokens, 1, 1), (_threads(num_heads * half), 1, 1), args)


def rotary_kv_cache(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim / 2], as RotaryEmbedding.prepare gives on CUDA
    sin: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative: padding, no K/V written
    num_heads: int,
) -> torch.Tensor:
    """q rotated [num_tokens, num_heads, head_dim]; k rotated and v written to the cache: the
    CUDA twin of RotaryEmbedding.apply then write_kv_cache, from the fused QKV projection."""
    num_tokens = qkv.shape[0]
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    assert qkv.is_contiguous() and kv_cache.is_contiguous() and qkv.dtype == kv_cache.dtype
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim and head_dim % 2 == 0
    assert cos.shape == sin.shape == (num_tokens, head_dim // 2) and cos.dtype == qkv.dtype
    assert cos.is_contiguous() and sin.is_contiguous() and slot_mapping.dtype == torch.int64
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens:
        args = [
            (q, _PTR),
            (kv_cache, _PTR),
            (qkv, _PTR),
            (cos, _PTR),
            (sin, _PTR),
            (slot_mapping, _PTR),
            (kv_cache[0].numel(), ctypes.c_long),
            (num_heads, ctypes.c_int),
            (num_kv_heads, ctypes.c_int),
            (head_dim, ctypes.c_int),
        ]
        threads = _threads((num_heads + num_kv_heads) * head_dim // 2)
        name = f"rotary_kv_cache_{DTYPE_SUFFIX[qkv.dtype]}"
        KERNELS.launch(name, (num_tokens, 1, 1), (threads, 1, 1), args)
    return q


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) in place (the Qwen2-VL ViT's MLP activation); returns x."""
    assert x.is_cuda and x.is_contiguous() and x.data_ptr() % 16 == 0
    n = x.numel()
    if n:
        threads = 256
        vectors = -(-n // (16 // x.element_size()))
        blocks = min(-(-vectors // threads), _num_sms(x.device) * 16)  # grid-stride past that
        args = [(x, _PTR), (n, ctypes.c_long)]
        KERNELS.launch(f"quick_gelu_{DTYPE_SUFFIX[x.dtype]}", (blocks, 1, 1), (threads, 1, 1), args)
    return x


def apply_rotary_vision(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The Qwen2-VL ViT's rotary in place on q and k of the fused QKV output [T, 3, H, D], with
    float32 cos/sin [T, D/2] (computed and rounded once as transformers does); D % 4 == 0."""
    num_tokens, three, num_heads, head_dim = qkv.shape
    assert three == 3 and qkv.is_contiguous() and cos.dtype == sin.dtype == torch.float32
    assert cos.shape == sin.shape == (num_tokens, head_dim // 2) and head_dim % 4 == 0
    assert cos.is_contiguous() and sin.is_contiguous()
    if num_tokens:
        args = [
            (qkv, _PTR),
            (cos, _PTR),
            (sin, _PTR),
            (num_heads, ctypes.c_int),
            (head_dim, ctypes.c_int),
        ]
        threads = _threads(num_heads * head_dim // 2)  # one per two pairs of q and of k
        name = f"rotary_vision_{DTYPE_SUFFIX[qkv.dtype]}"
        KERNELS.launch(name, (num_tokens, 1, 1), (threads, 1, 1), args)


LAYER_NORM_VECS = (2, 4, 8, 16)  # registers per lane of csrc/norm.cu's layer_norm variants
LAYER_NORM_ROWS = 4  # rows per block: one warp each


def layer_norm_fits(x: torch.Tensor) -> bool:
    """Whether `layer_norm` takes rows of this width and type (else use torch's)."""
    per_vector = 16 // x.element_size()
    hidden = x.shape[-1]
    return hidden % per_vector == 0 and hidden <= 32 * LAYER_NORM_VECS[-1] * per_vector


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new residual): F.layer_norm(residual + x) with `residual` updated in place to the
    sum (rounded to x's type first, as `residual = residual + x` does); without `residual`,
    F.layer_norm(x) and x."""
    assert x.is_cuda and x.is_contiguous() and layer_norm_fits(x)
    assert weight.dtype == bias.dtype == x.dtype and weight.is_contiguous() and bias.is_contiguous()
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    out = torch.empty_like(x)
    if rows:
        assert residual is None or (residual.is_contiguous() and residual.shape == x.shape)
        operands = (x, weight, bias) if residual is None else (x, weight, bias, residual)
        assert all(t.data_ptr() % 16 == 0 for t in operands), "16-byte vectors"
        per_vector = 16 // x.element_size()
        vecs = next(v for v in LAYER_NORM_VECS if 32 * v * per_vector >= hidden)
        args = [
            (out, _PTR),
            (residual if residual is not None else x, _PTR),
            (x, _PTR),
            (weight, _PTR),
            (bias, _PTR),
            (rows, ctypes.c_long),
            (hidden, ctypes.c_int),
            (eps, ctypes.c_float),
            (int(residual is not None), ctypes.c_int),
        ]
        name = f"layer_norm_v{vecs}_{DTYPE_SUFFIX[x.dtype]}"
        blocks = -(-rows // LAYER_NORM_ROWS)
        KERNELS.launch(name, (blocks, 1, 1), (32 * LAYER_NORM_ROWS, 1, 1), args)
    return out, (residual if residual is not None else x)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---- paged attention (csrc/attention.cu) ----

ATTN_ROWS = 64  # query rows per CTA; ATTN_ROWS in csrc/attention.cu
DECODE_ROWS = 16  # query rows per CTA of paged_decode (steps of decodes only); DECODE_ROWS there
ATTN_THREADS = 128
ATTN_HEAD_DIMS = (16, 32, 64, 80, 128)
MAX_SPLITS = 64  # MERGE_MAX_SPLITS in csrc/attention.cu


class _AttentionParams(ctypes.Structure):
    """Mirror of csrc/attention.cu's AttentionParams (passed by value)."""

    _fields_ = [
        ("out", ctypes.c_void_p),
        ("partial_out", ctypes.c_void_p),
        ("partial_lse", ctypes.c_void_p),
        ("q", ctypes.c_void_p),
        ("kv_cache", ctypes.c_void_p),
        ("query_start_loc", ctypes.c_void_p),
        ("seq_lens", ctypes.c_void_p),
        ("block_tables", ctypes.c_void_p),
        ("tiles", ctypes.c_void_p),
        ("v_offset", ctypes.c_int64),
        ("num_tokens", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("max_blocks", ctypes.c_int32),
        ("block_size_log2", ctypes.c_int32),
        ("scale_log2", ctypes.c_float),
    ]


def attention_tiles(
    query_start_loc: torch.Tensor, num_tokens: int, group: int, rows: int = ATTN_ROWS
) -> torch.Tensor:
    """The step's query tiles [capacity, 2] int32 (request, first query token; request -1 for
    unused entries) of `rows` query rows (ATTN_ROWS, or DECODE_ROWS for paged_decode), listed
    on the device. capacity = ceil(num_tokens / tokens_per_tile) + num_reqs bounds the count
    from shapes alone, so a CUDA graph can capture it."""
    assert query_start_loc.dtype == torch.int64 and 1 <= group <= rows
    num_reqs = query_start_loc.shape[0] - 1
    tokens_per_tile = rows // group
    capacity = -(-num_tokens // tokens_per_tile) + num_reqs
    tiles = torch.empty(capacity, 2, dtype=torch.int32, device=query_start_loc.device)
    args = [
        (tiles, _PTR),
        (query_start_loc, _PTR),
        (num_reqs, ctypes.c_int),
        (tokens_per_tile, ctypes.c_int),
        (capacity, ctypes.c_int),
    ]
    KERNELS.launch("attention_plan", (1, 1, 1), (1024, 1, 1), args)
    return tiles


def attention_splits(tiles: torch.Tensor, num_tokens: int, num_kv_heads: int) -> int:
    """How many CTAs share each tile's keys: as many as two CTAs an SM hold in one wave when the
    batch alone gives fewer than one an SM. Counts the tiles with work: at most one per query
    token, however many entries the plan has room for (its capacity has a spare per request).
    Depends on shapes only (CUDA graphs replay it); a CTA whose slice of a short context is
    empty exits at once."""
    num_sms = _num_sms(tiles.device)
    ctas = min(tiles.shape[0], num_tokens) * num_kv_heads
    return 1 if ctas >= num_sms else max(1, min(MAX_SPLITS, 2 * num_sms // ctas))


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int64
    seq_lens: torch.Tensor,  # [num_reqs] int64
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int64
    tiles: torch.Tensor,  # from attention_tiles
    scale: float,
    num_splits: int = 1,
    rows: int = ATTN_ROWS,
) -> torch.Tensor:
    """Causal attention of every query over its request's cached context (the CUDA twin of
    TorchAttentionBackend after the cache write); [num_tokens, num_heads, head_dim]. `rows`:
    the tiles' query rows, as `attention_tiles` made them (DECODE_ROWS runs paged_decode)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    assert q.is_contiguous() and kv_cache.is_contiguous() and block_tables.is_contiguous()
    assert q.dtype == kv_cache.dtype and q.dtype in (torch.float16, torch.bfloat16)
    assert head_dim in ATTN_HEAD_DIMS and kv_cache.shape[4] == head_dim
    assert num_heads % num_kv_heads == 0 and block_size & (block_size - 1) == 0
    assert seq_lens.dtype == block_tables.dtype == torch.int64
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    partial_out = partial_lse = None
    if num_splits > 1:
        partial_out = torch.empty(num_splits, *q.shape, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(num_splits, num_tokens, num_heads, device=q.device)
    params = _AttentionParams(
        out.data_ptr(),
        0 if partial_out is None else partial_out.data_ptr(),
        0 if partial_lse is None else partial_lse.data_ptr(),
        q.data_ptr(),
        kv_cache.data_ptr(),
        query_start_loc.data_ptr(),
        seq_lens.data_ptr(),
        block_tables.data_ptr(),
        tiles.data_ptr(),
        kv_cache[0].numel(),
        num_tokens,
        num_heads,
        num_kv_heads,
        block_tables.shape[1],
        block_size.bit_length() - 1,
        scale * 1.4426950408889634,  # log2(e)
    )
    suffix = DTYPE_SUFFIX[q.dtype]
    row = head_dim + 8  # SMEM_PAD
    assert rows in (ATTN_ROWS, DECODE_ROWS)
    stages = 2 if rows == ATTN_ROWS else 3  # the kernels' STAGES
    shared_bytes = (rows + 2 * stages * 64) * row * q.element_size()  # Q + the stages' K and V
    grid = (tiles.shape[0], num_kv_heads, num_splits)
    kind = "attention" if rows == ATTN_ROWS else "decode"
    name = f"paged_{kind}_{suffix}_d{head_dim}"
    KERNELS.launch(name, grid, (ATTN_THREADS, 1, 1), [(params, None)], shared_bytes)
    if num_splits > 1:
        args = [
            (out, _PTR),
            (partial_out, _PTR),
            (partial_lse, _PTR),
            (num_splits, ctypes.c_int),
            (num_tokens, ctypes.c_int),
            (num_heads, ctypes.c_int),
            (head_dim, ctypes.c_int),
        ]
        grid = (num_tokens, num_heads, 1)
        KERNELS.launch(f"attention_merge_{suffix}", grid, (_threads(head_dim), 1, 1), args)
    return out
