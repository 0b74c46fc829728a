"""The local backend: a pool of worker processes on this machine, each holding one client model.

Workers are spawned once (`multiprocess`, spawn context), load the client model once, and then
serve any number of client tasks: a task carries only the global adapter bytes and the client id.
Every worker talks to the server over its own pipe, so a worker that is killed mid-write can only
break its own channel. A worker that dies or runs past `task_timeout_s` is killed and replaced by a
fresh process (which loads the model once); its task is reported as failed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsoda_cli.errors import FedsodaError
from fedsoda_cli.federated.messages import ClientTask, TaskFailure, pack, pack_task, unpack, unpack_result
from fedsoda_cli.federated.transport import TaskOutcome
from fedsoda_cli.federated.worker import WorkerSetup, serve

_POLL_S = 0.5  # how often timeouts are checked while nothing arrives
_MIN_LOAD_TIMEOUT_S = 600.0  # loading a large model may take minutes, whatever the task timeout


@dataclass
class _Worker:
    slot: int
    process: Any
    conn: Any
    spawned_at: float
    ready: bool = False
    dead: bool = False
    pid: int = 0
    task: ClientTask | None = None
    task_started: float = 0.0


class LocalWorkerPool:
    """A `ClientTransport` over `workers` local processes."""

    def __init__(self, setup: WorkerSetup, workers: int, task_timeout_s: float, log: Callable[[str], None] = print):
        import multiprocess

        self._setup, self._size, self._timeout, self._log = setup, workers, task_timeout_s, log
        self._context = multiprocess.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._loads: dict[int, int] = {}
        self._processes_started = 0
        self._layers: bytes | None = None
        self._folder: Path | None = None
        self._setup_path: Path | None = None
        self._adapter_reply: bytes | None = None

    # ---- ClientTransport --------------------------------------------------------------------

    def start(self, layers: bytes | None = None) -> None:
        """Spawn the workers and wait until every one has loaded the model."""
        self._layers = layers
        for slot in range(self._size):
            self._spawn(slot)
        while not all(w.ready for w in self._workers.values()):
            self._step()

    def initial_adapter(self) -> bytes:
        self._adapter_reply, asked = None, None
        while self._adapter_reply is None:
            if asked is None or asked.dead:  # ask a ready worker (again, if the one asked died)
                asked = next((w for w in self._workers.values() if w.ready and not w.dead), None)
                if asked is not None:
                    asked.conn.send_bytes(pack("init"))
            self._step()
        return self._adapter_reply

    def run_tasks(self, tasks: list[ClientTask]) -> Iterator[TaskOutcome]:
        pending = deque(tasks)
        outstanding = len(tasks)
        while outstanding:
            self._assign_idle(pending)
            outcomes = self._step()
            # Hand out the next tasks before the server validates these results, so it never keeps
            # a worker waiting.
            self._assign_idle(pending)
            for outcome in outcomes:
                outstanding -= 1
                yield outcome

    def broadcast_layers(self, layers: bytes, delta: bytes | None = None) -> int:
        # Every ready worker got every broadcast since it became ready, so it holds the previous
        # version and takes the delta; a worker still loading (or a replacement) gets the whole
        # layers when it reports ready, as a fresh download would.
        self._layers = layers
        sent = delta if delta is not None else layers
        for worker in self._workers.values():
            if worker.ready:
                worker.conn.send_bytes(pack("layers", {}, sent))
        return len(sent)

    def stats(self) -> dict[str, Any]:
        return {
            "model_loads": dict(self._loads),
            "processes_started": self._processes_started,
            "worker_pids": {w.slot: w.pid for w in self._workers.values()},
            "busy": {w.slot: w.task.client for w in self._workers.values() if w.task is not None},
        }

    def close(self) -> None:
        """Stop every worker, no orphans: idle ones are asked to exit, the rest (loading or training,
        whose work is discarded anyway) are terminated, and any that linger are killed."""
        for worker in self._workers.values():
            try:
                if worker.ready and worker.task is None:
                    worker.conn.send_bytes(pack("stop"))
                elif worker.process.is_alive():
                    worker.process.terminate()
            except (OSError, ValueError):
                pass  # already gone
        deadline = time.monotonic() + 5
        for worker in self._workers.values():
            worker.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=2)
            worker.conn.close()
        self._workers.clear()
        self._remove_setup()

    # ---- internals ------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        if self._folder is None:  # the setup file only exists while some worker still has to read it
            self._folder = Path(tempfile.mkdtemp(prefix="fedsoda-workers-"))
            self._setup_path = self._setup.write(self._folder / "setup.json")
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=serve, args=(child, slot, str(self._setup_path)), name=f"fedsoda-worker-{slot}", daemon=True
        )
        process.start()
        child.close()  # the child holds its end; closing ours lets the pipe report EOF when it dies
        self._workers[slot] = _Worker(slot, process, parent, spawned_at=time.monotonic(), pid=process.pid)
        self._processes_started += 1

    def _assign_idle(self, pending: deque) -> None:
        for worker in self._workers.values():
            if pending and worker.ready and worker.task is None:
                self._assign(worker, pending.popleft())

    def _assign(self, worker: _Worker, task: ClientTask) -> None:
        worker.task, worker.task_started = task, time.monotonic()
        try:
            worker.conn.send_bytes(pack_task(task))
        except (OSError, ValueError):
            pass  # the worker died: its sentinel fires on the next step and the task is reported

    def _step(self) -> list[TaskOutcome]:
        """Wait briefly for messages or deaths; handle them and any timeouts; return finished tasks."""
        from multiprocess.connection import wait

        owners = {}
        for worker in self._workers.values():
            owners[worker.conn] = worker
            owners[worker.process.sentinel] = worker
        outcomes: list[TaskOutcome] = []
        for handle in wait(list(owners), timeout=_POLL_S):
            worker = owners[handle]
            if worker.dead:
                continue
            if handle is worker.conn or worker.conn.poll():
                outcomes.extend(self._receive(worker))  # read what it sent before looking at its death
            else:
                outcomes.extend(self._bury(worker, "died"))
        outcomes.extend(self._check_timeouts())
        return outcomes

    def _receive(self, worker: _Worker) -> list[TaskOutcome]:
        try:
            kind, header, payload = unpack(worker.conn.recv_bytes())
        except (EOFError, OSError):
            return self._bury(worker, "died")
        if kind == "ready":
            return self._on_ready(worker, header)
        if kind == "fatal":
            self.close()
            raise FedsodaError(f"client worker {worker.slot} {header['message']}")
        if kind == "adapter":
            self._adapter_reply = payload
            return []
        task, worker.task = worker.task, None
        if kind == "result":
            return [unpack_result(header, payload)]
        if kind == "error":
            return [TaskFailure(header["round"], header["client"], f"training raised {header['message']}", worker.slot)]
        raise RuntimeError(f"worker {worker.slot} sent an unknown message {kind!r} (task {task})")

    def _on_ready(self, worker: _Worker, header: dict[str, Any]) -> list[TaskOutcome]:
        worker.ready, worker.pid = True, int(header["pid"])
        self._loads[worker.slot] = self._loads.get(worker.slot, 0) + int(header["model_loads"])
        if self._layers is not None:
            worker.conn.send_bytes(pack("layers", {}, self._layers))
        if all(w.ready for w in self._workers.values()):
            self._remove_setup()  # so a server killed later leaves nothing in the temp folder
        return []

    def _remove_setup(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _check_timeouts(self) -> list[TaskOutcome]:
        now = time.monotonic()
        outcomes: list[TaskOutcome] = []
        for worker in list(self._workers.values()):
            if worker.task is not None and now - worker.task_started > self._timeout:
                worker.process.kill()
                outcomes.extend(self._bury(worker, f"ran past federate.task_timeout_s = {self._timeout:g} s and was killed"))
            elif not worker.ready and now - worker.spawned_at > max(self._timeout, _MIN_LOAD_TIMEOUT_S):
                self.close()
                raise FedsodaError(
                    f"client worker {worker.slot} did not finish loading the client model in {max(self._timeout, _MIN_LOAD_TIMEOUT_S):g} s; check memory or use fewer federate.workers"
                )
        return outcomes

    def _bury(self, worker: _Worker, how: str) -> list[TaskOutcome]:
        """A worker is gone: report its task as failed and start a replacement in its slot."""
        worker.dead = True
        worker.conn.close()
        worker.process.join(timeout=5)  # reap it, for the exit code (a large process takes a moment to die)
        how += f" ({_exit_reason(worker.process.exitcode)})"
        if not worker.ready:
            self.close()
            raise FedsodaError(
                f"client worker {worker.slot} (pid {worker.pid}) {how} while loading the client model; check memory (each of federate.workers = {self._size} workers holds one model)"
            )
        self._log(f"client worker {worker.slot} (pid {worker.pid}) {how}; starting a replacement")
        self._spawn(worker.slot)
        if worker.task is None:
            return []
        task = worker.task
        return [
            TaskFailure(
                task.round,
                task.client,
                f"worker {worker.slot} (pid {worker.pid}) {how} while training client {task.client}",
                worker.slot,
            )
        ]


def _exit_reason(code: int | None) -> str:
    """'exit code 1', 'killed by SIGKILL' (what an OOM kill looks like too), or 'still exiting'."""
    import signal

    if code is None:
        return "still exiting"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
