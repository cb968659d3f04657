"""Linear layers that fuse several Hugging Face projections into one matrix.

Parameters load themselves: each fused parameter has a `weight_loader(param, loaded, shard_id)`
that copies one HF projection (q/k/v, or gate/up) into its rows, so the loader only needs the
name mapping (`packed_modules_mapping` in the model) and never knows the layout.
"""

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One matmul for several projections stacked along the output dim: `shard_sizes` in order."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_sizes = shard_sizes
        self.weight.weight_loader = self.load_shard  # type: ignore[attr-defined]
        if bias:
            self.bias.weight_loader = self.load_shard  # type: ignore[attr-defined]

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        offset, size = self.shard_offsets[shard_id], self.shard_sizes[shard_id]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard_id} has {loaded.shape[0]} rows, expected {size}")
        param.data[offset : offset + size].copy_(loaded)
