"""RMSNorm with an optional fused residual add: torch on the CPU, the csrc/ kernel on CUDA."""

import torch
from torch import nn

from mm_runtime.gpu_worker import kernels


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in float32 exactly as transformers does (bit-equal on CPU).

    `forward(x, residual)` first adds `residual` to `x` and returns (normed, new_residual): the
    decoder keeps the un-normalized stream in `residual`, which saves one add and one read of
    the hidden states per layer once the CUDA kernel fuses both.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:  # one kernel; the residual is updated in place
            return kernels.rms_norm(x.contiguous(), self.weight, self.eps, residual)
        if residual is not None:
            x = residual + x
        return self._norm(x), x
