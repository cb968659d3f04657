"""Tensor transfer over ZMQ IPC with `MessageCodec`, beside a plain in-process memory copy.

What the frontend -> GPU worker channel costs per byte of pixel_values: a sender process
encodes a `PreprocessResult` holding one float32 [rows, 1024] tensor and sends it on a PUSH
socket (`send_multipart(copy=False)`: the tensor's own memory is the frame); this process
receives on PULL with `recv_multipart(copy=False)` and decodes (the tensor is rebuilt on the
received frame, no copy). GB/s counts payload bytes from the "go" signal to the last decoded
message. Beside it, the same bytes copied in this process: `torch.Tensor.copy_` into a
preallocated tensor on one thread, and `bytes(...)` into a fresh allocation (what a receive
buffer is). The ratio says how close the socket path comes to a single memcpy.

    python bench/zmq_transfer.py
    python bench/zmq_transfer.py --sizes-mib 1 16 64 256 --total-mib 2048 --json out.json
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import time

import torch
import zmq

from mm_runtime.shared.wire import PreprocessReply, PreprocessResult
from mm_runtime.shared.zmq_io import IpcPaths, MessageCodec, send

ROW_FLOATS = 1024  # pixel_values-like [rows, 1024] float32: 4 KiB a row


def payload(size_mib: int) -> PreprocessResult:
    rows = size_mib * 1024 * 1024 // (ROW_FLOATS * 4)
    pixel_values = torch.randn(rows, ROW_FLOATS)  # [rows, 1024]
    return PreprocessResult(
        job_id=size_mib, tensors={"pixel_values": pixel_values}, num_tokens=rows, seconds=0.0
    )


def num_iters(size_mib: int, total_mib: int) -> int:
    return max(4, total_mib // size_mib)


def sender(data_addr: str, ctrl_addr: str, sizes_mib: list[int], total_mib: int) -> None:
    """Child process: for each size, on "go", sends warm-up + timed messages back to back."""
    torch.set_num_threads(1)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(data_addr)
    ctrl = ctx.socket(zmq.PULL)
    ctrl.connect(ctrl_addr)
    codec = MessageCodec()
    for size_mib in sizes_mib:
        msg = payload(size_mib)
        for _ in range(2):  # warm-up round, then the timed round
            count = int(ctrl.recv())
            for _ in range(count):
                send(push, codec, msg)
    push.close(linger=-1)  # flush before exiting
    ctrl.close()
    ctx.term()


def zmq_gbps(pull: zmq.Socket, ctrl: zmq.Socket, size_mib: int, total_mib: int) -> float:
    codec = MessageCodec(PreprocessReply)
    iters = num_iters(size_mib, total_mib)
    expected = payload(size_mib).tensors["pixel_values"].nbytes
    seconds = 0.0
    for timed in (False, True):
        count = 2 if not timed else iters
        start = time.perf_counter()
        ctrl.send(str(count).encode())
        for _ in range(count):
            frames = pull.recv_multipart(copy=False)
            msg = codec.decode(frames)
            assert msg.tensors["pixel_values"].nbytes == expected
            del msg, frames
        seconds = time.perf_counter() - start
    return expected * iters / seconds / 1e9


def copy_gbps(size_mib: int, total_mib: int) -> tuple[float, float]:
    """(torch copy_ into a preallocated tensor, bytes() into a fresh allocation), one thread."""
    src = payload(size_mib).tensors["pixel_values"]
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the destination pages in, as a reused buffer would be
    iters = num_iters(size_mib, total_mib)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    copy_s = time.perf_counter() - start
    view = memoryview(src.numpy()).cast("B")
    bytes(view)
    start = time.perf_counter()
    for _ in range(iters):
        copied = bytes(view)
        del copied
    bytes_s = time.perf_counter() - start
    return src.nbytes * iters / copy_s / 1e9, src.nbytes * iters / bytes_s / 1e9


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument(
        "--total-mib", type=int, default=4096, help="bytes moved per size (at least 4 messages)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the copy baseline: one core, like ZMQ's one I/O thread per side

    paths = IpcPaths.create()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(paths.address("data"))
    ctrl = ctx.socket(zmq.PUSH)
    ctrl.bind(paths.address("ctrl"))
    child = mp.get_context("spawn").Process(
        target=sender,
        args=(paths.address("data"), paths.address("ctrl"), args.sizes_mib, args.total_mib),
    )
    child.start()
    rows = []
    try:
        for size_mib in args.sizes_mib:
            zmq_rate = zmq_gbps(pull, ctrl, size_mib, args.total_mib)
            copy_rate, bytes_rate = copy_gbps(size_mib, args.total_mib)
            rows.append(
                {
                    "size_mib": size_mib,
                    "messages": num_iters(size_mib, args.total_mib),
                    "zmq_ipc_gbps": zmq_rate,
                    "torch_copy_gbps": copy_rate,
                    "bytes_copy_gbps": bytes_rate,
                    "zmq_over_copy": zmq_rate / copy_rate,
                }
            )
        child.join(timeout=60)
    finally:
        if child.is_alive():
            child.terminate()
        pull.close(linger=0)
        ctrl.close(linger=0)
        ctx.term()
        paths.remove()

    print(
        f"ZMQ IPC PUSH/PULL, MessageCodec, copy=False both sides; {cpu_name()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, libzmq {zmq.zmq_version()}"
    )
    print(
        f"{'payload':>9} {'msgs':>5} {'zmq ipc':>10} {'copy_ 1T':>10} {'bytes()':>10} "
        f"{'zmq/copy_':>9}"
    )
    for r in rows:
        print(
            f"{r['size_mib']:>5} MiB {r['messages']:>5} {r['zmq_ipc_gbps']:>6.2f} GB/s "
            f"{r['torch_copy_gbps']:>6.2f} GB/s {r['bytes_copy_gbps']:>6.2f} GB/s "
            f"{r['zmq_over_copy']:>9.2f}"
        )
    if args.json:
        meta = {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "libzmq": zmq.zmq_version(),
            "pyzmq": zmq.__version__,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
