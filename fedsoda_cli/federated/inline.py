"""The inline backend: clients train one after another inside the server process.

Same client code and the same byte messages as the worker processes (local.py), without the
processes: for debugging and for the round loop's tests (tests/federated/test_server.py), where a
subclass can tamper with or hold back a client's reply.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fedsoda_cli.federated.messages import ClientTask, TaskFailure
from fedsoda_cli.federated.transport import TaskOutcome
from fedsoda_cli.federated.worker import ClientRuntime, WorkerSetup


class InlineTransport:
    """A `ClientTransport` whose one model holder is the server process itself."""

    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.runtime: ClientRuntime | None = None
        self.model_loads = 0

    def start(self, layers: bytes | None = None) -> None:
        if self.runtime is None:
            self.runtime = ClientRuntime(self.setup)
            self.model_loads += self.runtime.model_loads
        if layers is not None:
            self.runtime.apply_layers(layers)

    def _started(self) -> ClientRuntime:
        """The runtime: the round loop starts the transport before anything else."""
        assert self.runtime is not None, "InlineTransport used before start()"
        return self.runtime

    def initial_adapter(self) -> bytes:
        return self._started().initial_adapter()

    def run_tasks(self, tasks: list[ClientTask]) -> Iterator[TaskOutcome]:
        for task in tasks:
            try:
                yield self._started().handle(task, worker=0)
            except Exception as exc:  # a client failing must not take the server down
                yield TaskFailure(task.round, task.client, f"{type(exc).__name__}: {exc}", worker=0)

    def broadcast_layers(self, layers: bytes, delta: bytes | None = None) -> int:
        sent = delta if delta is not None else layers
        self._started().apply_layers(sent)
        return len(sent)

    def stats(self) -> dict[str, Any]:
        return {"model_loads": {0: self.model_loads}, "processes_started": 0}

    def close(self) -> None:
        self.runtime = None
