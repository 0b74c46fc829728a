"""FlowerTransport: the ClientTransport over a Flower deployment (SuperLink + one SuperNode per site).

`start()` submits fedsoda's Flower App with `flwr run`; the SuperLink starts its ServerApp
(serverapp.py), which connects back to this process over a unix socket and relays our requests to
the Grid. Each site's SuperNode runs the ClientApp (clientapp.py), which hands every request to the
site's long-lived worker (site.py), so each site loads the client model once per run.

Clients are found by asking every connected node which `fedsoda-client` it serves. Before a node
trains it is *prepared*: it loads the model for this run's [lora]/training setup, proves it holds
the server's client model (digest), and swaps in the latest realigned layers. A node that does not
answer in time fails its task (the FederatedServer's `min_clients` rule decides whether the round
still counts) and is not waited for again until it reconnects as a new node. "In time" is
`federate.flower_connect_timeout_s` for preparing (a model load, which a loaded machine slows far
more than a round's short timeout expects) and `federate.flower_round_timeout_s` for the rest.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsoda_cli.errors import FedsodaError
from fedsoda_cli.federated.flower.bundle import offline_env, write_app, write_cli_home
from fedsoda_cli.federated.flower.framing import recv_frame, send_frame
from fedsoda_cli.federated.messages import ClientTask, TaskFailure, pack, pack_task, unpack, unpack_result
from fedsoda_cli.federated.transport import TaskOutcome

if TYPE_CHECKING:
    from fedsoda_cli.federated.worker import WorkerSetup

_HELLO_TIMEOUT_S = 60.0  # a hello is answered by the ClientApp alone (no model): a process start


@dataclass
class FlowerSettings:
    superlink: str  # host:port of the SuperLink (one port for SuperNodes, `flwr run` and the ServerApp)
    root_certificates: Path | None  # CA certificate of the SuperLink's TLS; None = plain HTTP (loopback only)
    round_timeout_s: float
    connect_timeout_s: float


@dataclass
class _Node:
    node_id: int
    client: int
    layers_digest: str | None = None  # what it was prepared with; None = not prepared in this run
    dead: str = ""  # why it is not contacted again ("" = alive)


@dataclass
class _Exchanged:
    index: int
    reply: bytes | None = None
    reason: str = ""
    timed_out: bool = False


@dataclass
class _Wire:
    down: int = 0
    up: int = 0
    messages: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class FlowerTransport:
    """A `ClientTransport` whose model holders are the site workers of a Flower deployment."""

    def __init__(
        self, setup: WorkerSetup, clients: int, model_digest: str, settings: FlowerSettings, log: Callable[[str], None] = print
    ):
        """`setup` = what every site shares (`WorkerSetup.shared()`: lora, lora_seed, lora_layers, training, wire_dtype)."""
        self.setup, self.clients, self.model_digest, self.settings, self.log = setup, clients, model_digest, settings, log
        self._layers: bytes | None = None
        self._layers_digest = ""
        self._nodes: dict[int, _Node] = {}  # node id -> node
        self._loads: dict[int, int] = {}
        self._wire = _Wire()
        self._folder: Path | None = None
        self._listener: socket.socket | None = None
        self._link: socket.socket | None = None
        self.run_id: str = ""

    # ---- ClientTransport --------------------------------------------------------------------

    def start(self, layers: bytes | None = None) -> None:
        """Submit the run, wait for the ServerApp and for a SuperNode of every client, prepare them."""
        if layers is not None:
            self._set_layers(layers)
        self._launch()
        self._discover(wait=True)
        failures = self._prepare(list(self._nodes.values()))
        if failures:
            raise FedsodaError("could not prepare the client sites: " + "; ".join(failures))

    def initial_adapter(self) -> bytes:
        node = min(self._live_nodes(), key=lambda n: n.client)
        [outcome] = self._exchange([(node, "query", pack("init"))], self.settings.round_timeout_s)
        kind, header, payload = self._reply(node, outcome)
        if kind != "adapter":
            raise FedsodaError(
                f"client {node.client}'s site could not give the initial adapter: {header.get('message', outcome.reason)}"
            )
        return payload

    def run_tasks(self, tasks: list[ClientTask]) -> Iterator[TaskOutcome]:
        self._discover(wait=False)  # a restarted SuperNode comes back as a new node
        by_client = {n.client: n for n in self._live_nodes()}
        ready = []
        for task in tasks:
            node = by_client.get(task.client)
            if node is None:
                yield TaskFailure(task.round, task.client, self._absence(task.client), worker=task.client)
            else:
                ready.append((node, task))
        stale = [node for node, _ in ready if node.layers_digest != self._layers_digest]
        failed = dict(self._prepare_failures(stale))
        for node, task in ready:
            if node.node_id in failed:
                yield TaskFailure(task.round, task.client, failed[node.node_id], worker=task.client)
        ready = [(node, task) for node, task in ready if node.node_id not in failed]
        outcomes = self._exchange(
            [(node, "train", pack_task(task)) for node, task in ready], self.settings.round_timeout_s, stream=True
        )
        for outcome in outcomes:
            node, task = ready[outcome.index]
            yield self._task_outcome(node, task, outcome)

    def broadcast_layers(self, layers: bytes, delta: bytes | None = None) -> int:
        """New realigned layers: every live site swaps them in now; one that fails gets them before
        its next task. Sites are prepared by the digest of the whole layers (a restarted site must
        catch up from its download), so the whole layers travel and are counted, delta or not."""
        self._set_layers(layers)
        for failure in self._prepare(self._live_nodes()):
            self.log(failure)
        return len(layers)

    def stats(self) -> dict[str, Any]:
        return {
            "model_loads": dict(sorted(self._loads.items())),
            "processes_started": 0,
            "flower_run_id": self.run_id,
            "wire_bytes": {"down": self._wire.down, "up": self._wire.up, "messages": self._wire.messages},
        }

    def close(self) -> None:
        """End the Flower run (the ServerApp returns when told to stop), then remove the socket."""
        if self._link is not None:
            try:
                send_frame(self._link, pack("stop"))
            except OSError:
                pass
            self._link.close()
            self._link = None
        elif self.run_id:
            self._flwr("stop", self.run_id, "fedsoda", check=False)  # the ServerApp never connected
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    # ---- the run and its relay ----------------------------------------------------------------

    def _launch(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="fedsoda-flower-"))
        path, token = self._folder / "relay.sock", secrets.token_hex(16)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        write_cli_home(self._folder / "flwr-home", self.settings.superlink, self.settings.root_certificates)
        app = write_app(self._folder / "app")
        out = self._flwr(
            "run", str(app), "fedsoda", "--format", "json", "--run-config", f'fedsoda-socket="{path}" fedsoda-token="{token}"'
        )
        reply = json.loads(out[out.index("{") :]) if "{" in out else {}
        if not reply.get("run-id"):
            raise FedsodaError(
                f"the SuperLink at {self.settings.superlink} did not start the run: {' '.join(str(reply.get('error-message', out)).split())}"
            )
        self.run_id = str(reply["run-id"])
        self._listener.settimeout(self.settings.connect_timeout_s)
        try:
            link, _ = self._listener.accept()
        except TimeoutError:
            raise FedsodaError(
                f"the SuperLink at {self.settings.superlink} did not start fedsoda's ServerApp (run {self.run_id}) within "
                f"federate.flower_connect_timeout_s = {self.settings.connect_timeout_s:g} s; it must run on this machine "
                f"with fedsoda installed (`flwr log {self.run_id}` shows why)"
            ) from None
        link.settimeout(None)
        kind, header, _ = unpack(recv_frame(link))
        if kind != "hello" or not secrets.compare_digest(header.get("token", ""), token):
            link.close()
            raise FedsodaError("a process that is not this run's ServerApp connected to the relay socket; stopped")
        self._link = link

    def _flwr(self, *args: str, check: bool = True) -> str:
        """Run the `flwr` CLI against this run's SuperLink connection; its stdout."""
        assert self._folder is not None  # made by _launch, before the first flwr call; close() stops the run before removing it
        env = offline_env(self._folder / "flwr-home")
        done = subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            detail = (done.stdout + done.stderr).strip().splitlines()
            raise FedsodaError(
                f"`flwr {args[0]}` against the SuperLink at {self.settings.superlink} failed: "
                f"{' '.join(line.strip(' │╭╮╰╯─') for line in detail[-3:])}; is it running (see docs/flower.md)?"
            )
        return done.stdout

    def _exchange(
        self, items: list[tuple[_Node, str, bytes]], timeout_s: float, stream: bool = False
    ) -> Iterator[_Exchanged] | list[_Exchanged]:
        """Send each (node, message type, request); outcomes in completion order (a generator when
        `stream`, else a list)."""
        outcomes = self._exchange_stream(items, timeout_s)
        return outcomes if stream else list(outcomes)

    def _exchange_stream(self, items, timeout_s: float) -> Iterator[_Exchanged]:
        if not items:
            return
        send_frame(
            self._relay(),
            pack("exchange", {"timeout_s": timeout_s, "items": [{"node": n.node_id, "type": t} for n, t, _ in items]}),
        )
        for _, _, request in items:
            send_frame(self._relay(), request)
        while True:
            kind, header, payload = unpack(self._recv_relay())
            if kind == "done":
                return
            if kind == "reply":
                self._count(unpack(items[header["index"]][2])[0], header["wire_down"], header["wire_up"])
                yield _Exchanged(header["index"], reply=payload)
            else:
                yield _Exchanged(header["index"], reason=header["reason"], timed_out=header["timed_out"])

    def _relay(self) -> socket.socket:
        """The ServerApp's relay connection: start() (_launch) opens it before any exchange."""
        assert self._link is not None, "FlowerTransport used before start()"
        return self._link

    def _recv_relay(self) -> bytes:
        link = self._relay()
        try:
            return recv_frame(link)
        except (EOFError, OSError):
            self._link = None
            raise FedsodaError(
                f"fedsoda's ServerApp (Flower run {self.run_id}) went away; `flwr log {self.run_id}` shows why. "
                "Restart the SuperLink if needed and rerun with --resume"
            ) from None

    def _count(self, kind: str, down: int, up: int) -> None:
        self._wire.down += down
        self._wire.up += up
        self._wire.messages += 1
        self._wire.by_kind[kind] = self._wire.by_kind.get(kind, 0) + down + up

    # ---- nodes --------------------------------------------------------------------------------

    def _discover(self, wait: bool) -> None:
        """Learn which client each new node serves; with `wait`, until every client has a node."""
        deadline = time.monotonic() + self.settings.connect_timeout_s
        while True:
            send_frame(self._relay(), pack("nodes"))
            ids = unpack(self._recv_relay())[1]["ids"]
            unknown = [node_id for node_id in ids if node_id not in self._nodes]
            if unknown:
                self._greet(unknown)
            missing = sorted(set(range(self.clients)) - {n.client for n in self._live_nodes()})
            if not wait or not missing:
                return
            if time.monotonic() > deadline:
                raise FedsodaError(
                    f"no SuperNode serves client(s) {missing} after federate.flower_connect_timeout_s = "
                    f"{self.settings.connect_timeout_s:g} s ({len(self._live_nodes())} of {self.clients} connected to "
                    f"{self.settings.superlink}); start one per client with --node-config 'fedsoda-client=K ...' (docs/flower.md)"
                )
            time.sleep(1.0)

    def _greet(self, node_ids: list[int]) -> None:
        probes = [_Node(node_id, -1) for node_id in node_ids]
        for outcome in self._exchange([(n, "query", pack("hello")) for n in probes], _HELLO_TIMEOUT_S):
            node = probes[outcome.index]
            if outcome.reply is None:
                continue  # a node that cannot answer yet is asked again on the next discovery
            node.client = int(unpack(outcome.reply)[1]["client"])
            if not 0 <= node.client < self.clients:
                raise FedsodaError(
                    f"SuperNode {node.node_id} serves fedsoda-client={node.client}, but federate.clients = {self.clients} "
                    f"(clients are 0..{self.clients - 1}); fix its --node-config"
                )
            for other in self._live_nodes():
                if other.client == node.client:  # a restarted site replaces its old node
                    other.dead = f"replaced by SuperNode {node.node_id}"
            self._nodes[node.node_id] = node

    def _live_nodes(self) -> list[_Node]:
        return [n for n in self._nodes.values() if not n.dead]

    def _absence(self, client: int) -> str:
        gone = [n.dead for n in self._nodes.values() if n.client == client and n.dead]
        return f"client {client}'s SuperNode " + (gone[-1] if gone else "is not connected")

    def _prepare(self, nodes: list[_Node]) -> list[str]:
        """Prepare nodes; the reasons of those that failed (a wrong model raises)."""
        return [reason for _, reason in self._prepare_failures(nodes)]

    def _prepare_failures(self, nodes: list[_Node]) -> list[tuple[int, str]]:
        header = {"setup": self.setup.to_json(), "layers_digest": self._layers_digest}
        request = pack("prepare", header, self._layers or b"")
        failures = []
        timeout = ("federate.flower_connect_timeout_s", self.settings.connect_timeout_s)
        for outcome in self._exchange([(n, "query", request) for n in nodes], timeout[1]):
            node = nodes[outcome.index]
            kind, reply, _ = self._reply(node, outcome, timeout)
            if kind != "ready":
                failures.append(
                    (
                        node.node_id,
                        f"client {node.client}'s site could not load the client model: {reply.get('message', outcome.reason)}",
                    )
                )
                continue
            if reply["model_digest"] != self.model_digest:
                raise FedsodaError(
                    f"client {node.client}'s site (SuperNode {node.node_id}) holds a different client model "
                    f"(digest {reply['model_digest']}, the server's is {self.model_digest}); copy the server's "
                    f"<workdir>/quantize/model to its fedsoda-model folder"
                )
            node.layers_digest = self._layers_digest
            self._loads[node.client] = int(reply["model_loads"])
        return failures

    def _reply(
        self, node: _Node, outcome: _Exchanged, timeout: tuple[str, float] | None = None
    ) -> tuple[str, dict[str, Any], bytes]:
        """The reply's (kind, header, payload); a missing reply becomes ("failed", {message}, b"")
        and a node that timed out is marked dead. `timeout`: the (key, seconds) it was waited for
        (default: the round's)."""
        if outcome.reply is not None:
            return unpack(outcome.reply)
        key, seconds = timeout or ("federate.flower_round_timeout_s", self.settings.round_timeout_s)
        if outcome.timed_out:
            node.dead = f"(node {node.node_id}) did not answer within {key} = {seconds:g} s"
        return "failed", {"message": outcome.reason}, b""

    def _task_outcome(self, node: _Node, task: ClientTask, outcome: _Exchanged) -> TaskOutcome:
        kind, header, payload = self._reply(node, outcome)
        if kind == "result":
            return unpack_result(header, payload)
        if outcome.timed_out:
            return TaskFailure(task.round, task.client, f"client {task.client}'s SuperNode {node.dead}", worker=task.client)
        return TaskFailure(
            task.round, task.client, f"client {task.client}'s site: {header.get('message', outcome.reason)}", worker=task.client
        )

    def _set_layers(self, payload: bytes) -> None:
        self._layers = payload
        self._layers_digest = hashlib.sha256(payload).hexdigest()[:16]


def flower_transport(setup: WorkerSetup, spec, log: Callable[[str], None] = print) -> FlowerTransport:
    """A FlowerTransport for the federate stage: `setup` is the local backend's WorkerSetup (its
    shards stay on the server: each site reads its own); refuses plain HTTP beyond loopback."""
    import importlib.util

    from fedsoda_cli.errors import SpecError
    from fedsoda_cli.federated.flower.site import model_digest
    from fedsoda_cli.spec import spec_dir

    if importlib.util.find_spec("flwr") is None:
        raise SpecError('federate.backend = "flower" needs Flower: pip install "fedsoda[flower]" (flwr 1.42)')
    fed = spec.federate
    certificates = None
    if fed.flower_root_certificates:
        certificates = Path(fed.flower_root_certificates)
        if not certificates.is_absolute():
            certificates = (spec_dir(spec) or Path.cwd()) / certificates
        if not certificates.is_file():
            raise SpecError(f"federate.flower_root_certificates: {certificates} does not exist")
    elif fed.flower_superlink.rsplit(":", 1)[0].strip("[]") not in ("127.0.0.1", "localhost", "::1"):
        raise SpecError(
            f"federate.flower_root_certificates: the SuperLink {fed.flower_superlink} is not on this machine, so its "
            "traffic must be encrypted; give the CA certificate of its TLS (docs/flower.md, 'A real deployment')"
        )
    settings = FlowerSettings(fed.flower_superlink, certificates, fed.flower_round_timeout_s, fed.flower_connect_timeout_s)
    return FlowerTransport(setup.shared(), fed.clients, model_digest(Path(setup.model_dir)), settings, log)
