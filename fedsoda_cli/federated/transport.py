"""How client tasks reach clients: the small protocol every backend implements.

The round loop (server.py) only talks to a `ClientTransport`; a backend decides where a client's
local training runs (local worker processes in local.py, the server process itself in inline.py,
machines elsewhere in a future backend). Everything handed over is already bytes (messages.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from fedsoda_cli.federated.messages import ClientResult, ClientTask, TaskFailure

TaskOutcome = ClientResult | TaskFailure


class ClientTransport(Protocol):
    """A way of running client tasks."""

    def start(self, layers: bytes | None = None) -> None:
        """Bring up the clients' model holders; `layers` = the latest realigned partial layers
        (serialized) that must be swapped in before any training (resume after a realign)."""

    def initial_adapter(self) -> bytes:
        """The clients' freshly initialised LoRA adapter, serialized (round 1's global adapter)."""

    def run_tasks(self, tasks: list[ClientTask]) -> Iterator[TaskOutcome]:
        """Run the tasks; yield exactly one outcome per task, in completion order. A task whose
        worker died or timed out yields a TaskFailure; a replacement worker takes over."""

    def broadcast_layers(self, layers: bytes, delta: bytes | None = None) -> int:
        """Send realigned partial layers to every model holder; later tasks train on them. `delta`
        (federated.layer_delta), when given, is what a holder at the previous version needs; a
        backend that cannot keep holders at the previous version sends `layers`. Returns the bytes
        one client received."""

    def stats(self) -> dict[str, Any]:
        """Counters for the summary, at least {"model_loads": {holder: loads}, "processes_started": n}."""

    def close(self) -> None:
        """Stop every worker (no orphans); safe to call twice and after a failure."""
