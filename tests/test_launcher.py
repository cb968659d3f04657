"""`mm-runtime serve` as a user runs it: a real process tree, stopped by a signal or by the
death of its GPU worker (acceptance 4, second half), leaving no process or socket behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mm_testing import free_port, prompt_text

from mm_runtime import SamplingParams
from mm_runtime.frontend.sdk import Client
from mm_runtime.shared.errors import MMRuntimeError


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def wait_gone(pids: set[int], timeout_s: float = 10) -> list[int]:
    """The pids still alive after up to `timeout_s` (multiprocessing's resource tracker leaves
    once it sees its parent's pipe close, a moment after the parent)."""
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if Path(f"/proc/{p}").exists()]
    return alive


def socket_dirs() -> set[Path]:
    return {p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("mm-runtime-*") if p.is_dir()}


def start_server(model_dir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mm_runtime.cli", "serve", "--model", str(model_dir),
         "--zmq-port", str(port), "--port", str(free_port()), "--device", "cpu",
         "--preprocess-workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_healthy(address: str, proc: subprocess.Popen, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with Client(address, timeout_s=2) as client:
                return client.health()
        except MMRuntimeError:
            time.sleep(0.5)
    raise AssertionError("server did not become healthy")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_signal(sig: int, tiny_models: dict[str, Path]) -> None:
    dirs_before = socket_dirs()
    port = free_port()
    proc = start_server(tiny_models["llava"], port)
    address = f"tcp://127.0.0.1:{port}"
    wait_healthy(address, proc)
    with Client(address, timeout_s=60) as client:
        out = client.generate(prompt_text("llava", "hi", 0), None, SamplingParams(max_tokens=4))
    assert len(out.token_ids) == 4
    children = children_of(proc.pid)
    assert len(children) >= 2  # the GPU worker and a preprocess worker
    proc.send_signal(sig)
    assert proc.wait(30) == 0
    assert not wait_gone(children)
    assert socket_dirs() == dirs_before


def test_gpu_worker_death_fails_requests_and_exits_nonzero(tiny_models: dict[str, Path]) -> None:
    dirs_before = socket_dirs()
    port = free_port()
    proc = start_server(tiny_models["qwen2_vl"], port)
    address = f"tcp://127.0.0.1:{port}"
    stats = wait_healthy(address, proc)
    children = children_of(proc.pid)
    long = SamplingParams(max_tokens=3000, ignore_eos=True)
    with Client(address, timeout_s=60) as client:
        stream = client.stream(prompt_text("qwen2_vl", "tell me a long story", 0), None, long)
        next(stream)
        os.kill(int(stats["gpu_worker_pid"]), signal.SIGKILL)
        with pytest.raises(MMRuntimeError) as err:
            for _ in stream:
                pass
    assert err.value.code == "engine_dead"
    assert proc.wait(30) == 1
    assert not wait_gone(children)
    assert socket_dirs() == dirs_before
