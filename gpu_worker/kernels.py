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
from dataclasses import dataclass
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
        params = (values, types)
        if not (torch.cuda.is_current_stream_capturing() and _has_pdl()):
            _check(driver.cuLaunchKernel(fn, *grid, *block, shared_bytes, stream, params, 0))
            return
        # In a CUDA graph: programmatic dependent launch (csrc/common.cuh's pdl_wait says why
        # this is safe); the graph keeps the edge as a programmatic one.
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid
        config.blockDimX, config.blockDimY, config.blockDimZ = block
        config.sharedMemBytes = shared_bytes
        config.hStream = stream
        attr = driver.CUlaunchAttribute()
        attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        config.attrs = [attr]
        config.numAttrs = 1
        _check(driver.cuLaunchKernelEx(config, fn, params, 0))


KERNELS = KernelLibrary()


@functools.cache
def _has_pdl() -> bool:
    """Programmatic dependent launch: Hopper (sm_90) and later, unless MM_RUNTIME_PDL=0 (to
    measure what it gains: bench/decode_step.py)."""
    return torch.cuda.get_device_capability()[0] >= 9 and os.environ.get("MM_RUNTIME_PDL") != "0"


_PTR = ctypes.c_void_p


def threads_per_row(width: int) -> int:
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
        KERNELS.launch(name, (num_tokens, 1, 1), (threads_per_row(d), 1, 1), args)
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
        KERNELS.launch(name, (num_tokens, 1, 1), (threads_per_row(hidden), 1, 1), args)
    return out, (residual if residual is not None else x)


GEMV_WARPS = 8  # warps per block of csrc/gemv.cu
# Token rows it is instantiated for. At 3 and 4 rows cuBLAS reads the QKV and gate-up weights
# faster (bench/decode_linear.py on an H200: Qwen2-VL-2B's gate-up 28 against 41 us at 4 rows),
# so those steps take the separate norm, cuBLAS and activation kernels.
GEMV_MAX_TOKENS = 2
GEMV_SHAPES = ((2, 2), (2, 4), (4, 2), (4, 4))  # (weight rows a warp, vectors a lane a row)


@dataclass(frozen=True)
class GemvShape:
    """How csrc/gemv.cu spreads one projection: `rows` weight rows a warp (a group), `vecs`
    16-byte loads a lane a row in flight, `parts` warps sharing a group's K."""

    rows: int
    vecs: int
    parts: int


def _gemv_groups(num_out: int, rows: int, silu_pairs: bool) -> int:
    """Warp groups of csrc/gemv.cu for `num_out` outputs: `rows` weight rows a group, which with
    `silu_pairs` are half gate rows and half their up rows (so rows / 2 outputs a group)."""
    return -(-num_out // (rows // 2 if silu_pairs else rows))


def gemv_shape(num_out: int, k: int, silu_pairs: bool, sms: int) -> GemvShape:
    """Four weight rows a warp, two loads a lane a row (eight in flight); K split over 2, 4 or 8
    warps while the groups alone give fewer than eight warps an SM and each slice keeps a 16-byte
    vector a lane or more. Picked from bench/decode_linear.py --sweep on an H200 (Qwen2-VL-2B and
    -7B layers, one and two token rows): within 10 % of the fastest of the 16 shapes swept for
    every projection, and the fastest for the 2B's O and gate-up."""
    rows, vecs = 4, 2
    groups = _gemv_groups(num_out, rows, silu_pairs)
    num_vecs = k // 8
    parts = 1
    while parts < GEMV_WARPS and groups * parts < sms * 8 and num_vecs // (2 * parts) >= 32:
        parts *= 2
    return GemvShape(rows, vecs, parts)


def gemv_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether csrc/gemv.cu takes x [tokens, K] and weight [N, K]: 1 or 2 token rows (a small
    decode batch) in fp16/bf16, K a multiple of 8, the weight contiguous and 16-byte aligned."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.dim() == 2
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
    shape: GemvShape | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, new residual): RMSNorm (with the residual add, not in place) then the projection
    in one kernel; with `silu_pairs` the projection is a merged gate-up and out its SiLU-and-mul
    [tokens, N / 2]. The CUDA twin of layers/norm.py, nn.Linear (and layers/activation.py).
    `shape` overrides `gemv_shape` (bench/decode_linear.py's sweep)."""
    assert norm_weight.dtype == x.dtype and norm_weight.shape == (x.shape[1],)
    assert residual is None or (residual.is_contiguous() and residual.shape == x.shape)
    new_residual = torch.empty_like(x) if residual is not None else x
    out = _gemv(x, weight, bias, silu_pairs, shape, residual, new_residual, norm_weight, eps)
    return out, new_residual


def small_linear(
    x: torch.Tensor,  # [tokens, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N]
    shape: GemvShape | None = None,
) -> torch.Tensor:
    """nn.Linear of 1 or 2 token rows as csrc/gemv.cu's weight stream (no norm)."""
    return _gemv(x, weight, bias, False, shape)


def _gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu_pairs: bool,
    shape: GemvShape | None,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    assert gemv_fits(x, weight) and x.is_contiguous()
    num_tokens, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.dtype == x.dtype and (not silu_pairs or n % 2 == 0)
    assert bias is None or (bias.is_contiguous() and bias.shape == (n,))
    num_out = n // 2 if silu_pairs else n
    shape = shape or gemv_shape(num_out, k, silu_pairs, num_sms(x.device))
    assert (shape.rows, shape.vecs) in GEMV_SHAPES and GEMV_WARPS % shape.parts == 0
    out = torch.empty(num_tokens, num_out, dtype=x.dtype, device=x.device)
    args = [
        (out, _PTR),
        (residual_out if residual_out is not None else x, _PTR),
        (x, _PTR),
        (residual if residual is not None else x, _PTR),
        (norm_weight if norm_weight is not None else x, _PTR),
        (eps, ctypes.c_float),
        (weight, _PTR),
        (bias.data_ptr() if bias is not None else 0, _PTR),
        (k, ctypes.c_int),
        (n, ctypes.c_int),
        (int(norm_weight is not None), ctypes.c_int),
        (int(residual is not None), ctypes.c_int),
        (int(silu_pairs), ctypes.c_int),
        (shape.parts, ctypes.c_int),
    ]
    groups = _gemv_groups(num_out, shape.rows, silu_pairs)
    grid = (-(-groups * shape.parts // GEMV_WARPS), 1, 1)
    name = f"gemv_{DTYPE_SUFFIX[x.dtype]}_m{num_tokens}_r{shape.rows}_v{shape.vecs}"
    shared = GEMV_WARPS * shape.rows * num_tokens * 4  # the warps' sums
    shared += num_tokens * k * x.element_size() if norm_weight is not None else 0  # normed rows
    KERNELS.launch(name, grid, (32 * GEMV_WARPS, 1, 1), args, shared)
    return out


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
        KERNELS.launch(name, (num_tokens, 1, 1), (threads_per_row(width), 1, 1), args)


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
        KERNELS.launch(name, (num_tokens, 1, 1), (threads_per_row(num_heads * half), 1, 1), args)


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
        threads = threads_per_row((num_heads + num_kv_heads) * head_dim // 2)
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
        blocks = min(-(-vectors // threads), num_sms(x.device) * 16)  # grid-stride past that
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
        threads = threads_per_row(num_heads * head_dim // 2)  # one per two pairs of q and of k
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
def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
