"""One step's batch layout: host buffers written with numpy, sent to device buffers that never
move (CUDA graphs read them by address), and the views the model reads (`StepInputs`).

As vLLM V1's input batch (vllm/v1/worker/gpu_input_batch.py): each field is allocated once for
the largest step; a step writes the used prefix of each host field and `InputBuffers.send`
copies it with one non-blocking copy from pinned memory.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from mm_runtime.gpu_worker.kv_cache import NULL_BLOCK_ID
from mm_runtime.gpu_worker.layers.attention import AttentionMetadata


@dataclass(slots=True)
class StepInputs:
    """One step's batch on the device (views of the input buffers), ready to run."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens], or [3, num_tokens] with M-RoPE
    meta: AttentionMetadata
    num_sampling: int  # rows whose logits are sampled
    # Batch rows of those, or None when they are the first num_sampling rows.
    logits_indices: torch.Tensor | None
    # (req_id, mm_hash, first item row, end item row, first batch row) per media slice.
    mm_segments: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    graph_size: int | None = None  # the captured decode graph to replay; None: run eagerly


@dataclass(slots=True)
class _Buffer:
    """One int64 field of the batch layout: written on the host, read on the device."""

    cpu: torch.Tensor  # pinned on CUDA
    array: np.ndarray  # numpy view of `cpu`
    gpu: torch.Tensor  # `cpu` itself on CPU

    @classmethod
    def zeros(cls, shape: tuple[int, ...], device: torch.device) -> "_Buffer":
        on_cuda = device.type == "cuda"
        cpu = torch.zeros(shape, dtype=torch.int64, pin_memory=on_cuda)
        gpu = torch.zeros(shape, dtype=torch.int64, device=device) if on_cuda else cpu
        return cls(cpu, cpu.numpy(), gpu)

    def copy_to_device(self, n: int) -> None:
        if self.gpu is not self.cpu:
            self.gpu[:n].copy_(self.cpu[:n], non_blocking=True)


class InputBuffers:
    """The batch layout of one step, sized once for the largest: max_num_batched_tokens tokens,
    max_num_seqs requests, ceil(max_model_len / block_size) blocks per request.

    A step writes the used prefix of each host field, then `send` copies each to the device with
    one non-blocking copy. Device tensors never move (CUDA graphs read them by address), and block
    table rows are full width, so `block_tables[:num_reqs]` is contiguous. Positions are a flat
    buffer viewed as [3, num_tokens] (M-RoPE) or [num_tokens], contiguous for any num_tokens.
    """

    def __init__(
        self,
        max_num_tokens: int,
        max_num_reqs: int,
        max_blocks_per_req: int,
        block_size: int,
        mrope: bool,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.mrope = mrope
        self._positions_per_token = 3 if mrope else 1
        self.input_ids = _Buffer.zeros((max_num_tokens,), device)
        self.positions = _Buffer.zeros((max_num_tokens * self._positions_per_token,), device)
        self.slot_mapping = _Buffer.zeros((max_num_tokens,), device)
        self.query_start_loc = _Buffer.zeros((max_num_reqs + 1,), device)
        self.seq_lens = _Buffer.zeros((max_num_reqs,), device)
        self.block_tables = _Buffer.zeros((max_num_reqs, max_blocks_per_req), device)
        self.logits_indices = _Buffer.zeros((max_num_reqs,), device)
        # Async scheduling: batch rows whose input id is a token the previous step sampled, and
        # that token's row in the previous step's sampled ids.
        self.pending_rows = _Buffer.zeros((max_num_reqs,), device)
        self.pending_sources = _Buffer.zeros((max_num_reqs,), device)
        # Host buffers are rewritten only once the last step's copies out of them are done.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def positions_np(self, num_tokens: int) -> np.ndarray:
        flat = self.positions.array[: num_tokens * self._positions_per_token]
        return flat.reshape(3, num_tokens) if self.mrope else flat

    def positions_view(self, num_tokens: int) -> torch.Tensor:
        flat = self.positions.gpu[: num_tokens * self._positions_per_token]
        return flat.view(3, num_tokens) if self.mrope else flat

    def wait_until_copied(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    def pad_decode(self, num_reqs: int, padded: int) -> None:
        """Rows num_reqs..padded-1 of a decode batch become harmless dummies: token 0 at
        position 0, one token of context in the null block (the slot it writes belongs to no
        request)."""
        self.input_ids.array[num_reqs:padded] = 0
        self.positions_np(padded)[..., num_reqs:padded] = 0
        self.slot_mapping.array[num_reqs:padded] = NULL_BLOCK_ID * self.block_size
        self.query_start_loc.array[num_reqs + 1 : padded + 1] = np.arange(num_reqs + 1, padded + 1)
        self.seq_lens.array[num_reqs:padded] = 1
        self.block_tables.array[num_reqs:padded] = NULL_BLOCK_ID

    def send(
        self,
        num_tokens: int,
        num_reqs: int,
        num_sampling: int,
        max_query_len: int,
        max_seq_len: int,
        sample_first_rows: bool = False,
    ) -> StepInputs:
        """Copies the written prefix of every field to the device (one non-blocking copy each);
        the returned inputs are views of the device buffers."""
        self.input_ids.copy_to_device(num_tokens)
        self.positions.copy_to_device(num_tokens * self._positions_per_token)
        self.slot_mapping.copy_to_device(num_tokens)
        self.query_start_loc.copy_to_device(num_reqs + 1)
        self.seq_lens.copy_to_device(num_reqs)
        self.block_tables.copy_to_device(num_reqs)
        self.logits_indices.copy_to_device(num_sampling)
        if self._copied is not None:
            self._copied.record()
        return StepInputs(
            input_ids=self.input_ids.gpu[:num_tokens],
            positions=self.positions_view(num_tokens),
            meta=self.metadata(num_tokens, num_reqs, max_query_len, max_seq_len),
            num_sampling=num_sampling,
            logits_indices=None if sample_first_rows else self.logits_indices.gpu[:num_sampling],
        )

    def fill_pending_ids(self, num_pending: int, sampled: torch.Tensor) -> None:
        """Writes the first `num_pending` pending input ids on the device, from the previous
        step's sampled ids (queued after `send`'s copies, before the step reads them)."""
        self.pending_rows.copy_to_device(num_pending)
        self.pending_sources.copy_to_device(num_pending)
        if self._copied is not None:
            self._copied.record()  # these host fields are copied too
        rows = self.pending_rows.gpu[:num_pending]
        sources = self.pending_sources.gpu[:num_pending]
        self.input_ids.gpu.index_copy_(0, rows, sampled.index_select(0, sources))

    def metadata(
        self, num_tokens: int, num_reqs: int, max_query_len: int, max_seq_len: int
    ) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.gpu[:num_tokens],
            query_start_loc=self.query_start_loc.gpu[: num_reqs + 1],
            seq_lens=self.seq_lens.gpu[:num_reqs],
            block_tables=self.block_tables.gpu[:num_reqs],
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
        )
