"""csrc/ as text: every kernel takes part in programmatic dependent launch.

gpu_worker/kernels.py launches every kernel of csrc/ inside a CUDA graph allowed to start before
the kernel ahead of it has ended; that is safe only if each calls pdl_wait (through pdl_begin)
before it reads an earlier kernel's output or writes anything (csrc/common.cuh). A kernel that
forgot would race its inputs in graphs only, on Hopper only: this pins it without a GPU.
"""

import re

from mm_runtime.gpu_worker.kernels import CSRC

# The name as written, macro pastes (##) included; a macro's line continuations are spaces here.
KERNEL = re.compile(r'extern "C" __global__ void(?: __launch_bounds__\([^)]*\))?[\s\\]+([\w#]+)\(')


def kernel_bodies() -> dict[str, str]:
    """Each extern "C" kernel's name (as the macro spells it) and its body's text."""
    bodies = {}
    for path in sorted(CSRC.glob("*.cu")):
        text = path.read_text()
        for match in KERNEL.finditer(text):
            start = text.index("{", match.end())
            depth, end = 0, start
            for end in range(start, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    break
            bodies[f"{path.name}:{match.group(1)}"] = text[start : end + 1]
    return bodies


def test_every_kernel_waits_for_the_kernel_ahead() -> None:
    bodies = kernel_bodies()
    assert len(bodies) >= 12  # every file's kernels were found
    # csrc/gemv.cu's calls it inside its device function, after the weight loads (next test).
    missing = [
        name
        for name, body in bodies.items()
        if "pdl_begin();" not in body and not name.startswith("gemv.cu:")
    ]
    assert not missing, f"kernels without pdl_begin(): {missing}"


def test_gemv_waits_after_its_weight_loads_only() -> None:
    """csrc/gemv.cu's kernel issues its first weight loads (read-only) before pdl_begin, and
    everything else after: the norm's reads of x and every write."""
    source = (CSRC / "gemv.cu").read_text()
    body = source[source.index("__device__ void gemv(") :]
    before = body[: body.index("pdl_begin();")]
    assert "load_step(begin + lane);" in before
    assert not re.search(r"\b(out|residual_out|normed|sums)\s*\[", before)
    assert "x_row" not in before and "residual[" not in before
