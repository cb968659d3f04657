"""The frontend's side of the preprocess workers: N worker processes behind one ROUTER socket.

Runs in the frontend's event loop (zmq.asyncio); nothing here blocks it. The workers are
stateless (DESIGN.md section 1), so the pool only has to route jobs and survive crashes:

- Dispatch: a job goes to the ready worker with the fewest jobs in flight, at most
  `MAX_JOBS_PER_WORKER` each; the rest wait in a FIFO queue here. One per worker means a job
  never waits in a worker's socket behind a large image while another worker is idle, and a crash
  loses one job only; the cost, a worker idle for one IPC round trip between jobs (~0.1 ms), is
  small beside decoding and processing an image (milliseconds).
- Crashes: a background task polls the processes. A dead worker is replaced with a fresh one
  (`spawn_worker()`) and the jobs it held are re-sent, first in line, to another worker; a job
  whose retry crashes a worker too fails with `PreprocessError`, so a poisonous item cannot kill
  workers forever.
- Replies are matched by job_id and by the worker that holds the job; others are stale (a
  caller that gave up, a dead worker's last words) and dropped.

The processes are made by the launcher's `spawn_worker` factory, so this package never imports
`preprocess_worker/` (each process package imports only itself and `shared/`).
"""

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess

import zmq
import zmq.asyncio

from mm_runtime.shared.errors import (
    ConfigError,
    MediaError,
    MMRuntimeError,
    PreprocessError,
    ProtocolError,
)
from mm_runtime.shared.wire import (
    ErrorInfo,
    PreprocessFailed,
    PreprocessJob,
    PreprocessReady,
    PreprocessReply,
    PreprocessResult,
)
from mm_runtime.shared.zmq_io import MessageCodec

logger = logging.getLogger(__name__)

MAX_JOBS_PER_WORKER = 1  # see the module docstring
MONITOR_INTERVAL_S = 0.2  # how soon a dead worker is noticed
TERMINATE_GRACE_S = 5.0  # close(): SIGTERM, then SIGKILL after this long
# Workers in a row that die before their PreprocessReady (a broken model dir, no memory): past
# this the pool stops respawning and fails its jobs instead of crash-looping silently.
MAX_FAILED_STARTS = 3

SpawnWorker = Callable[[], BaseProcess]


@dataclass(slots=True, eq=False)
class _Job:
    job_id: int
    modality: str
    data: bytes  # kept until the reply, to re-send it if the worker dies
    future: "asyncio.Future[PreprocessResult]"
    num_crashes: int = 0  # workers that died while holding it


@dataclass(slots=True, eq=False)
class _Worker:
    process: BaseProcess
    identity: bytes | None = None  # its DEALER's routing id, learned from its PreprocessReady
    # Jobs sent to it and not answered yet, including jobs whose caller has given up: the worker
    # is busy with those all the same until it replies.
    job_ids: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(slots=True)
class _Stats:
    jobs_done: int = 0
    jobs_failed: int = 0  # the worker's PreprocessFailed, and jobs that crashed twice
    jobs_retried: int = 0  # re-sent after their worker died
    workers_replaced: int = 0
    busy_seconds: float = 0.0  # sum of the workers' decode + processor time


class PreprocessPool:
    """N stateless preprocess worker processes behind one ROUTER socket.

    Invariants: every job in `_jobs` is either in `_queue` or in exactly one worker's `job_ids`;
    a worker is in `_by_identity` iff it has sent its PreprocessReady and is not known dead.
    """

    def __init__(self, address: str, num_workers: int, spawn_worker: SpawnWorker) -> None:
        """`spawn_worker()` returns a Process (started or not) that runs
        `run_preprocess_worker(model_dir, address)`; the launcher builds it."""
        if num_workers < 1:
            raise ConfigError(f"the preprocess pool needs at least 1 worker, got {num_workers}")
        self.address = address
        self.num_workers = num_workers
        self._spawn_worker = spawn_worker
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._encoder = MessageCodec()
        self._decoder = MessageCodec(PreprocessReply)
        self._handlers = {
            PreprocessReady: self._on_ready,
            PreprocessResult: self._on_result,
            PreprocessFailed: self._on_failed,
        }
        self._workers: dict[int, _Worker] = {}  # pid -> worker, ready or starting
        self._by_identity: dict[bytes, _Worker] = {}  # routing id -> ready worker
        self._unclaimed_ready: dict[int, bytes] = {}  # pid -> routing id, Ready before registered
        self._jobs: dict[int, _Job] = {}  # job_id -> job, queued or in flight
        self._queue: deque[_Job] = deque()  # waiting for a free worker, oldest first
        self._next_job_id = itertools.count()
        self._stats = _Stats()
        self._recv_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._workers_changed = asyncio.Event()  # a worker got ready, or the pool broke
        self._num_failed_starts = 0  # consecutive workers that died before their Ready
        self._started = False
        self._closed = False
        self._broken: str | None = None  # why the pool can no longer serve, once it cannot

    # ---- lifecycle ----

    async def start(self, timeout_s: float = 120) -> None:
        """Binds the socket, starts the workers and waits until all of them are ready. On a
        worker that dies while starting, or on the timeout, closes everything and raises."""
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.bind(self.address)
        self._recv_task = asyncio.create_task(self._recv_loop(), name="preprocess-recv")
        self._monitor_task = asyncio.create_task(self._monitor_loop(), name="preprocess-monitor")
        try:
            for _ in range(self.num_workers):
                await self._spawn()
            await self._wait_all_ready(timeout_s)
        except BaseException:
            await self.close()
            raise
        self._started = True
        logger.info("%d preprocess workers ready at %s", self.num_workers, self.address)

    async def _wait_all_ready(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self._by_identity) < self.num_workers and self._broken is None:
            self._workers_changed.clear()
            try:
                await asyncio.wait_for(self._workers_changed.wait(), deadline - loop.time())
            except TimeoutError:
                raise PreprocessError(
                    f"only {len(self._by_identity)} of {self.num_workers} preprocess workers "
                    f"were ready after {timeout_s:g} s"
                ) from None
        if self._broken is not None:
            raise PreprocessError(self._broken)

    async def close(self) -> None:
        """Fails the jobs still pending, stops every worker (SIGTERM, then SIGKILL after
        `TERMINATE_GRACE_S`) and closes the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._recv_task is not None:
            self._recv_task.cancel()
        # The monitor is not cancelled but sees `_closed` and ends: cancelling it mid-spawn would
        # lose a process that is starting, and leave it running.
        tasks = [t for t in (self._recv_task, self._monitor_task) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_all(PreprocessError("the preprocess pool is closed"))
        await _stop_processes([w.process for w in self._workers.values()])
        self._workers.clear()
        self._by_identity.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
        self._ctx.term()
        logger.info("preprocess pool closed")

    # ---- jobs ----

    async def process(self, modality: str, data: bytes) -> PreprocessResult:
        """Preprocesses one encoded media item in a worker. Raises `MediaError` for a bad item,
        `PreprocessError` when the processor or the workers fail."""
        if self._closed or self._sock is None:
            raise PreprocessError("the preprocess pool is not running")
        if self._broken is not None:
            raise PreprocessError(self._broken)
        future = asyncio.get_running_loop().create_future()
        job = _Job(next(self._next_job_id), modality, data, future)
        self._jobs[job.job_id] = job
        self._queue.append(job)
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up (e.g. its request was aborted)
            self._forget(job)
            raise

    def stats(self) -> dict[str, float]:
        """Counters (jobs_done, jobs_failed, jobs_retried, workers_replaced, busy_seconds) and
        gauges (workers_ready, jobs_queued, jobs_in_flight)."""
        out = {k: float(v) for k, v in asdict(self._stats).items()}
        out["workers_ready"] = float(len(self._by_identity))
        out["jobs_queued"] = float(len(self._queue))
        out["jobs_in_flight"] = float(sum(len(w.job_ids) for w in self._workers.values()))
        return out

    def in_flight(self) -> dict[int, int]:
        """pid -> jobs in flight, for every live worker (ready or still starting)."""
        return {pid: len(w.job_ids) for pid, w in self._workers.items()}

    def _dispatch(self) -> None:
        """Sends queued jobs to free workers, fewest jobs in flight first."""
        while self._queue:
            free = [w for w in self._by_identity.values() if len(w.job_ids) < MAX_JOBS_PER_WORKER]
            if not free:
                return
            worker = min(free, key=lambda w: len(w.job_ids))
            job = self._queue.popleft()
            worker.job_ids.add(job.job_id)
            assert self._sock is not None and worker.identity is not None
            frames = self._encoder.encode(PreprocessJob(job.job_id, job.modality, job.data))
            # A ROUTER never blocks: this sends now. A worker that has just died drops the job
            # silently; the monitor sees the death and re-sends it.
            sent = self._sock.send_multipart([worker.identity, *frames], copy=False)
            sent.add_done_callback(_log_send_error)
            logger.debug("job %d -> worker %d", job.job_id, worker.pid)

    def _forget(self, job: _Job) -> None:
        self._jobs.pop(job.job_id, None)
        try:
            self._queue.remove(job)
        except ValueError:
            pass  # in flight: the worker's reply will be dropped as stale

    def _fail_all(self, error: MMRuntimeError) -> None:
        for job in self._jobs.values():
            if not job.future.done():
                job.future.set_exception(error)
        self._jobs.clear()
        self._queue.clear()

    # ---- replies ----

    async def _recv_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            identity = frames[0].bytes
            try:
                msg = self._decoder.decode(frames[1:])
            except ProtocolError as e:
                logger.warning("dropped a malformed message from a preprocess worker: %s", e)
                continue
            try:
                self._handlers[type(msg)](identity, msg)
            except Exception:  # a bug here must not stop every later reply
                logger.exception("error while handling %s", type(msg).__name__)

    def _on_ready(self, identity: bytes, msg: PreprocessReady) -> None:
        worker = self._workers.get(msg.pid)
        if worker is None:  # its Ready raced its registration in _spawn
            self._unclaimed_ready[msg.pid] = identity
            return
        if worker.identity is not None:
            logger.warning("preprocess worker %d said ready twice; ignored", msg.pid)
            return
        worker.identity = identity
        self._by_identity[identity] = worker
        self._num_failed_starts = 0
        logger.info("preprocess worker %d ready", msg.pid)
        self._workers_changed.set()
        self._dispatch()

    def _on_result(self, identity: bytes, msg: PreprocessResult) -> None:
        job = self._take(identity, msg.job_id)
        if job is None:
            return
        self._stats.jobs_done += 1
        self._stats.busy_seconds += msg.seconds
        job.future.set_result(msg)

    def _on_failed(self, identity: bytes, msg: PreprocessFailed) -> None:
        job = self._take(identity, msg.job_id)
        if job is None:
            return
        self._stats.jobs_failed += 1
        logger.debug("job %d failed: [%s] %s", msg.job_id, msg.error.code, msg.error.message)
        job.future.set_exception(_error_from_info(msg.error))

    def _take(self, identity: bytes, job_id: int) -> _Job | None:
        """The job a reply answers, now off its worker and out of the pool; None if stale."""
        worker = self._by_identity.get(identity)
        held = worker is not None and job_id in worker.job_ids
        if held:
            worker.job_ids.discard(job_id)
            self._dispatch()  # the worker is free again
        job = self._jobs.get(job_id) if held else None
        if job is None:
            logger.debug("dropped a stale reply for job %d", job_id)
            return None
        del self._jobs[job_id]
        return None if job.future.done() else job

    # ---- crashes ----

    async def _monitor_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            if self._closed:  # close() stops the workers: their deaths are no crashes
                return
            try:
                dead = [w for w in self._workers.values() if not w.process.is_alive()]
                for worker in dead:
                    self._on_death(worker)
                self._dispatch()  # retried jobs go to the live workers before any respawn
                for _ in dead:
                    await self._replace()
            except Exception:  # the monitor must outlive its own bugs too
                logger.exception("error in the preprocess pool monitor")

    def _on_death(self, worker: _Worker) -> None:
        del self._workers[worker.pid]
        if worker.identity is not None:
            del self._by_identity[worker.identity]
        else:
            self._num_failed_starts += 1
        logger.error(
            "preprocess worker %d died (exit code %s) with %d jobs in flight",
            worker.pid,
            worker.process.exitcode,
            len(worker.job_ids),
        )
        if not self._started:
            self._break(
                f"a preprocess worker died while starting (exit code {worker.process.exitcode});"
                " see its log"
            )
        for job_id in sorted(worker.job_ids):
            job = self._jobs.get(job_id)
            if job is None:
                continue  # its caller has given up
            job.num_crashes += 1
            if job.num_crashes < 2:
                self._stats.jobs_retried += 1
                self._queue.appendleft(job)
                continue
            del self._jobs[job_id]
            self._stats.jobs_failed += 1
            job.future.set_exception(
                PreprocessError(
                    f"preprocess workers crashed twice on this {job.modality} item "
                    f"({len(job.data)} bytes); giving up on it"
                )
            )
        worker.process.close()

    async def _replace(self) -> None:
        if self._closed or self._broken is not None:
            return
        if self._num_failed_starts >= MAX_FAILED_STARTS:
            self._break(
                f"{self._num_failed_starts} preprocess workers in a row died while starting;"
                " see their logs"
            )
            return
        self._stats.workers_replaced += 1
        await self._spawn()

    async def _spawn(self) -> None:
        # Process.start() forks and writes the spawn data to a pipe: a few ms, off the loop.
        process = await asyncio.to_thread(self._start_process)
        worker = _Worker(process)
        self._workers[worker.pid] = worker
        logger.debug("started preprocess worker %d", worker.pid)
        identity = self._unclaimed_ready.pop(worker.pid, None)
        if identity is not None:
            self._on_ready(identity, PreprocessReady(worker.pid))

    def _start_process(self) -> BaseProcess:
        process = self._spawn_worker()
        if process.pid is None:
            process.start()
        return process

    def _break(self, reason: str) -> None:
        """No worker can be relied on any more: fail every job now and later, not hang them."""
        logger.error("preprocess pool broken: %s", reason)
        self._broken = reason
        self._fail_all(PreprocessError(reason))
        self._workers_changed.set()


_ERRORS: dict[str, type[MMRuntimeError]] = {
    MediaError.code: MediaError,
    PreprocessError.code: PreprocessError,
}


def _error_from_info(info: ErrorInfo) -> MMRuntimeError:
    """A worker's ErrorInfo as the exception it was; unknown codes stay PreprocessErrors."""
    error_type = _ERRORS.get(info.code)
    if error_type is not None:
        return error_type(info.message)
    return PreprocessError(info.message, code=info.code)


def _log_send_error(sent: "asyncio.Future[object]") -> None:
    if not sent.cancelled() and sent.exception() is not None:
        logger.error("cannot send a preprocess job: %s", sent.exception())


async def _stop_processes(processes: list[BaseProcess]) -> None:
    """SIGTERM, a grace period for a job in hand to finish, SIGKILL for any still alive."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TERMINATE_GRACE_S
    while any(p.is_alive() for p in processes) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    for p in processes:
        if p.is_alive():
            logger.warning("preprocess worker %d ignored SIGTERM; killing it", p.pid)
            p.kill()
    while any(p.is_alive() for p in processes):  # SIGKILL cannot be ignored: this is short
        await asyncio.sleep(0.01)
    for p in processes:
        p.close()
