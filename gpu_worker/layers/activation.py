"""SiLU-and-mul, the gated activation of Llama/Qwen2 MLPs over a fused gate-up projection."""

import torch
import torch.nn.functional as F
from torch import nn

from mm_runtime.gpu_worker import kernels


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.is_cuda:
            return kernels.silu_and_mul(gate_up.contiguous())
        gate, up = gate_up.chunk(2, dim=-1)  # [num_tokens, intermediate] each
        return F.silu(gate) * up
