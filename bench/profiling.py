"""torch.profiler for the benchmarks' --profile flag: where a run's time went.

ModelRunner marks the phases of a step with record_function ranges ("runner.prepare",
"runner.encode", "runner.model", "runner.decode_graph", "runner.sample", ...); the summary lists
their CPU and GPU time, the GPU's busy time against the wall time, and the top kernels.
"""

import contextlib
from collections.abc import Iterator

import torch

PHASE_PREFIX = "runner."


@contextlib.contextmanager
def profiled(enabled: bool) -> Iterator[torch.profiler.profile | None]:
    """torch.profiler over the block when asked (CPU and CUDA activities), else nothing."""
    if not enabled:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield prof


def print_profile(prof: torch.profiler.profile, elapsed: float) -> None:
    averages = prof.key_averages()
    # Kernels and copies only: the phases' GPU-side ranges would count their kernels twice.
    busy_us = sum(
        e.self_device_time_total
        for e in averages
        if e.device_type.name == "CUDA" and not e.key.startswith(PHASE_PREFIX)
    )
    share = busy_us / 1e4 / elapsed
    print(f"GPU busy {busy_us / 1e6:.2f} s of {elapsed:.2f} s wall ({share:.0f} %)")
    phases: dict[str, list[float]] = {}  # name -> [calls, CPU s, GPU s]
    for e in averages:
        if e.key.startswith(PHASE_PREFIX):
            row = phases.setdefault(e.key, [0, 0.0, 0.0])
            if e.device_type.name == "CUDA":
                row[2] += e.device_time_total / 1e6
            else:
                row[0] += e.count
                row[1] += e.cpu_time_total / 1e6
    for name, (calls, cpu, gpu) in sorted(phases.items()):
        print(f"  {name:24s} calls {calls:6d}  CPU {cpu:7.2f} s  GPU {gpu:7.2f} s")
    print(averages.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70))
