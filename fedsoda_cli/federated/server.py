"""The federated round loop, as a template: one concrete `run()`, small overridable steps.

A round: seeded sampling -> one task per sampled client through the transport (retried once if
its worker dies) -> validation of every update -> the aggregator plugin -> (every k rounds) the
server evaluates the global adapter -> (every r rounds, unless it is the last) the server realigns
and broadcasts the partial layers -> accounting -> an atomic checkpoint.

Nothing here knows how a task reaches a client (transport.py), what a client does (client.py) or
what realignment computes (the `Realigner` it is given). Reproducibility does not depend on an RNG
stream carried across rounds: round r's sample and client c's seed derive from (run.seed, r, c),
and updates are aggregated in client order, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fedsoda_cli.errors import FedsodaError, PluginError
from fedsoda_cli.federated.accounting import Ledger
from fedsoda_cli.federated.checkpoint import Checkpoint, CheckpointStore, capture_rng, restore_rng
from fedsoda_cli.federated.messages import (
    ClientResult,
    ClientTask,
    TaskFailure,
    adapter_digest,
    adapter_from_bytes,
    adapter_to_bytes,
)
from fedsoda_cli.federated.validation import check_aggregate, check_update
from fedsoda_cli.plugins.contracts import Aggregator, ClientUpdate
from fedsoda_cli.round_record import ClientProblem, DriftEntry, EvalEntry, RoundRecord
from fedsoda_cli.seeding import stable_seed

if TYPE_CHECKING:
    from fedsoda_cli.federated.layer_delta import HeldLayers
    from fedsoda_cli.federated.transport import ClientTransport
    from fedsoda_cli.plugins.contracts import AdapterState


@dataclass(frozen=True)
class RoundPlan:
    """The [federate] knobs the round loop itself uses."""

    seed: int
    clients: int
    clients_per_round: int
    rounds: int
    min_clients: int = 1
    max_update_norm: float = 1e3
    realign_every: int = 0
    weighting: str = "examples"  # n_k of each update: "examples" trained this round, "shard" size, "uniform"
    eval_every: int = 0
    retries: int = 1  # a client whose worker died is tried again this many times in the same round
    wire_dtype: str = "fp32"  # adapter tensors on the wire; the server's master and aggregation stay fp32
    realign_when: str = "every"  # "every" realign_every rounds, or on measured "drift"
    drift_threshold: float = 1.5  # realign when drift > threshold x the drift right after the last alignment


class Realigner(Protocol):
    """Server-side ODA realignment: new partial layers from the current global adapter."""

    def realign(self, round: int, global_adapter: AdapterState) -> bytes:
        """Realign and re-quantize; return the partial layers serialized exactly as sent to clients."""

    def state_dict(self) -> dict[str, Any]:
        """State carried between realignments (e.g. the float master copy of the partial layers)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def drift(self, round: int, global_adapter: AdapterState) -> float:
        """How far the client model with `global_adapter` is from the full LLM with it (KL on a fixed batch)."""


class Evaluator(Protocol):
    """Server-side per-round evaluation of the global adapter on validation examples."""

    def evaluate(self, round: int, global_adapter: AdapterState, realign_layers: bytes | None) -> dict[str, EvalEntry]:
        """{target: EvalEntry} for the adapter as clients hold it (on the client model with
        `realign_layers`, the latest realigned partial layers, swapped in)."""


class RoundReporter:
    """Progress callbacks of the round loop; the base class reports nothing (see console.py)."""

    def run_started(self, first_round: int, rounds: int) -> None: ...

    def round_started(self, round: int, clients: list[int]) -> None: ...

    def client_finished(self, round: int, client: int, loss: float | None) -> None: ...

    def client_excluded(self, round: int, client: int, reason: str) -> None: ...

    def client_failed(self, round: int, client: int, reason: str, retrying: bool) -> None: ...

    def realigned(self, round: int, nbytes: int) -> None: ...

    def round_finished(self, record: RoundRecord) -> None: ...


@dataclass
class RunResult:
    adapter: AdapterState
    history: list[RoundRecord]
    ledger: Ledger
    resumed_after: int  # the checkpoint round a resumed run continued after (0 = fresh run)
    aggregator_state: dict[str, Any]
    realign_layers: bytes | None
    transport: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Collected:
    updates: list[ClientUpdate] = field(default_factory=list)
    excluded: list[ClientProblem] = field(default_factory=list)
    failed: list[ClientProblem] = field(default_factory=list)
    train_seconds: dict[int, float] = field(default_factory=dict)  # worker -> seconds inside local training
    rss_mb: float = 0.0


class FederatedServer:
    """Runs rounds over a `ClientTransport`; override a step method to change one step."""

    def __init__(
        self,
        plan: RoundPlan,
        transport: ClientTransport,
        aggregator: Aggregator,
        aggregator_name: str,
        store: CheckpointStore,
        *,
        realigner: Realigner | None = None,
        reporter: RoundReporter | None = None,
        model_bytes: int = 0,
        evaluator: Evaluator | None = None,
        held_layers: HeldLayers | None = None,
    ):
        self.plan, self.transport, self.aggregator, self.aggregator_name = plan, transport, aggregator, aggregator_name
        self.store, self.realigner, self.reporter, self.model_bytes = store, realigner, reporter or RoundReporter(), model_bytes
        self.evaluator = evaluator
        # With held_layers (federate.realign_wire = "delta"): the partial layers every client holds,
        # so a realignment ships only the blocks that changed against them.
        self.held_layers = held_layers
        self.global_adapter: AdapterState = {}
        self.history: list[RoundRecord] = []
        self.ledger = Ledger()
        self.realign_layers: bytes | None = None
        self.initial_adapter: AdapterState | None = None
        self.drift_reference: float | None = None  # drift right after the last (re)alignment
        self.drift_now: float | None = None

    # ---- the template -------------------------------------------------------------------------

    def run(self, resume: Checkpoint | None = None) -> RunResult:
        """Rounds after `resume` (or from 1) up to plan.rounds; workers are stopped however it ends."""
        try:
            if resume is None or resume.round < self.plan.rounds:  # a finished run needs no workers
                self.transport.start(resume.realign_layers if resume else None)
            first = self.restore(resume) if resume else self.begin()
            self.reporter.run_started(first, self.plan.rounds)
            for round in range(first, self.plan.rounds + 1):
                self.run_round(round)
        finally:
            self.transport.close()
        return RunResult(
            self.global_adapter,
            self.history,
            self.ledger,
            resume.round if resume else 0,
            self.aggregator.state_dict(),
            self.realign_layers,
            self.transport.stats(),
        )

    def run_round(self, round: int) -> None:
        started = time.perf_counter()
        clients = self.sample_clients(round)
        self._plugin("on_round_start", round, clients)
        self.reporter.round_started(round, clients)
        collected = self.collect(round, clients)
        if len(collected.updates) < self.plan.min_clients:
            self.stop_short(round, collected)
        self.global_adapter = self.aggregate(round, collected.updates)
        record = self.record(round, clients, collected)
        self._plugin("on_round_end", round, self.global_adapter, record)
        if self.evaluates(round):
            assert self.evaluator is not None  # evaluates() is False without one
            # before any realignment: the adapter is scored on the client model it was trained on
            record.eval = self.evaluator.evaluate(round, self.global_adapter, self.realign_layers)
        if self.measures_drift():
            record.drift = self.measure_drift(round)
        if self.realigns(round):
            self.realign(round)
            if self.measures_drift():  # the new layers under the same adapter: the next reference
                assert self.realigner is not None and record.drift is not None  # measures_drift(): both set above
                self.drift_reference = record.drift.after_realign = self.realigner.drift(round, self.global_adapter)
        traffic = self.ledger.take_round()
        record.bytes_down, record.bytes_up = traffic["adapter_down"], traffic["adapter_up"]
        record.bytes_realign = traffic["realign"]
        record.seconds = round_(time.perf_counter() - started)
        self.history.append(record)
        self.checkpoint(round)
        self.reporter.round_finished(record)

    # ---- steps --------------------------------------------------------------------------------

    def realigns(self, round: int) -> bool:
        """Every r rounds (with realign_when = "drift": those of them where the drift passed the
        threshold), and only when another round follows: new base weights under an adapter that no
        client trains on again would only change what the clients hold, and cost bytes."""
        every = self.plan.realign_every
        if self.realigner is None or round >= self.plan.rounds or not every or round % every:
            return False
        if self.plan.realign_when == "drift":  # a scheduled realignment happens only if drift passed the threshold
            # measure_drift() (this round, before realigns()) sets the reference along with drift_now
            return (
                self.drift_now is not None
                and self.drift_reference is not None
                and self.drift_now > self.plan.drift_threshold * self.drift_reference
            )
        return True

    def measures_drift(self) -> bool:
        return self.realigner is not None and self.plan.realign_when == "drift"

    def measure_drift(self, round: int) -> DriftEntry:
        """This round's drift, against the reference (the drift right after the last alignment;
        before round 1: the aligned client model under the initial adapter, whose LoRA B is zero)."""
        assert self.realigner is not None  # called only when measures_drift(), which needs one
        if self.drift_reference is None:
            self.drift_reference = self.realigner.drift(
                0, self.initial_adapter if self.initial_adapter is not None else self.global_adapter
            )
        self.drift_now = self.realigner.drift(round, self.global_adapter)
        return DriftEntry(
            kl=self.drift_now,
            reference=self.drift_reference,
            ratio=self.drift_now / max(self.drift_reference, 1e-12),
            threshold=self.plan.drift_threshold,
        )

    def evaluates(self, round: int) -> bool:
        """Every `eval_every` rounds, and after the last one."""
        every = self.plan.eval_every
        return self.evaluator is not None and bool(every) and (round % every == 0 or round == self.plan.rounds)

    def begin(self) -> int:
        """A fresh run: the clients' initial adapter, and every client's one-time model download."""
        self.global_adapter = self.initial_adapter = adapter_from_bytes(self.transport.initial_adapter())
        for client in range(self.plan.clients):
            self.ledger.add("model", client, self.model_bytes)
        self.ledger.take_round()
        return 1

    def restore(self, checkpoint: Checkpoint) -> int:
        """Continue after `checkpoint.round`: adapter, aggregator, realigner, history, bytes, RNG."""
        self.global_adapter = checkpoint.adapter
        self._plugin("load_state_dict", checkpoint.aggregator_state)
        if self.realigner is not None and checkpoint.realign_layers is not None:
            self.realigner.load_state_dict(checkpoint.realigner_state)
        self.realign_layers = checkpoint.realign_layers
        if self.held_layers is not None and checkpoint.realign_layers is not None:
            from safetensors.torch import load

            self.held_layers.update(load(checkpoint.realign_layers))
        self.history = list(checkpoint.history)
        drifts = [h.drift for h in self.history if h.drift is not None]
        if drifts:  # the reference a drift-triggered run compares against carries over
            last = drifts[-1]
            self.drift_reference = last.after_realign if last.after_realign is not None else last.reference
        self.ledger = Ledger.from_state(checkpoint.ledger)
        restore_rng(checkpoint.rng)
        return checkpoint.round + 1

    def sample_clients(self, round: int) -> list[int]:
        return sample_clients(self.plan.seed, round, self.plan.clients, self.plan.clients_per_round)

    def collect(self, round: int, clients: list[int]) -> _Collected:
        """Send every sampled client the global adapter; validate what comes back. A client whose
        task failed is retried (plan.retries times) in the same round, then dropped."""
        payload = adapter_to_bytes(self.global_adapter, self.plan.wire_dtype)
        digest = adapter_digest(adapter_from_bytes(payload))  # what a client starts from: the master as the wire rounds it
        collected, attempts = _Collected(), dict.fromkeys(clients, 0)
        tasks = [self.make_task(round, client, payload) for client in clients]
        while tasks:
            retry = []
            for outcome in self.transport.run_tasks(tasks):
                if isinstance(outcome, TaskFailure):
                    attempts[outcome.client] += 1
                    retrying = attempts[outcome.client] <= self.plan.retries
                    self.reporter.client_failed(round, outcome.client, outcome.reason, retrying)
                    if retrying:
                        retry.append(self.make_task(round, outcome.client, payload))
                    else:
                        collected.failed.append(ClientProblem(outcome.client, outcome.reason))
                    continue
                self.accept(round, outcome, digest, collected)
            tasks = retry
        collected.updates.sort(key=lambda u: u.client)  # aggregation order must not depend on timing
        return collected

    def make_task(self, round: int, client: int, payload: bytes) -> ClientTask:
        self.ledger.add("adapter_down", client, len(payload))
        return ClientTask(round=round, client=client, seed=stable_seed(self.plan.seed, "client", round, client), adapter=payload)

    def accept(self, round: int, result: ClientResult, global_digest: str, collected: _Collected) -> None:
        """Count the upload, validate it, and keep it as a ClientUpdate or exclude it with a reason."""
        self.ledger.add("adapter_up", result.client, len(result.adapter))
        collected.train_seconds[result.worker] = collected.train_seconds.get(result.worker, 0.0) + result.train_seconds
        collected.rss_mb = max(collected.rss_mb, result.rss_mb)
        adapter, reason = self.screen(round, result, global_digest, collected)
        if reason is not None:
            collected.excluded.append(ClientProblem(result.client, reason))
            self.reporter.client_excluded(round, result.client, reason)
            return
        assert adapter is not None  # screen(): no reason, so the upload was read
        collected.updates.append(ClientUpdate(result.client, adapter, self.weight(result), dict(result.metrics)))
        self.reporter.client_finished(round, result.client, result.metrics.get("train_loss"))

    def screen(
        self, round: int, result: ClientResult, global_digest: str, collected: _Collected
    ) -> tuple[AdapterState | None, str | None]:
        """(the uploaded adapter, None) if the result is usable, else (anything, why it is not)."""
        if result.round != round or any(u.client == result.client for u in collected.updates):
            return None, f"unexpected result for round {result.round} (a duplicate or a stale answer)"
        if result.start_digest != global_digest:
            return None, "did not start from the global adapter (client state leaked between clients)"
        if not isinstance(result.num_samples, int) or result.num_samples < 0:
            return None, f"invalid sample count {result.num_samples!r}"
        try:
            adapter = adapter_from_bytes(result.adapter)
        except ValueError as exc:
            return None, f"unreadable upload: {exc}"
        return adapter, self.validate(adapter)

    def weight(self, result: ClientResult) -> int:
        """The update's n_k for the aggregator, as `plan.weighting` says."""
        if self.plan.weighting == "uniform":
            return 1
        if self.plan.weighting == "shard":
            return int(result.metrics.get("shard_size", result.num_samples))
        return int(result.num_samples)

    def validate(self, adapter: AdapterState) -> str | None:
        return check_update(self.global_adapter, adapter, self.plan.max_update_norm)

    def aggregate(self, round: int, updates: list[ClientUpdate]) -> AdapterState:
        """The aggregator's new global adapter, checked (PluginError naming it if malformed)."""
        global_copy = {name: tensor.clone() for name, tensor in self.global_adapter.items()}
        new = self._plugin("aggregate", round, global_copy, updates)
        return check_aggregate(self.aggregator_name, self.global_adapter, new)

    def realign(self, round: int) -> None:
        """Realign on the server; every client (all K hold the model) downloads the new layers."""
        assert self.realigner is not None  # called only when realigns(), which needs one
        self._plugin("before_realign", round)
        self.realign_layers = self.realigner.realign(round, self.global_adapter)
        delta = None
        if self.held_layers is not None:
            from safetensors.torch import load

            from fedsoda_cli.federated.layer_delta import make_delta

            new = load(self.realign_layers)
            delta = make_delta(self.held_layers, new)
            self.held_layers.update(new)
        sent = self.transport.broadcast_layers(self.realign_layers, delta)  # bytes each client received
        for client in range(self.plan.clients):
            self.ledger.add("realign", client, sent)
        self._plugin("after_realign", round)
        self.reporter.realigned(round, sent)

    def record(self, round: int, clients: list[int], collected: _Collected) -> RoundRecord:
        """The round's record (bytes, seconds, eval and drift are added by run_round)."""
        weights = sum(u.num_samples for u in collected.updates)
        loss = sum(u.metrics.get("train_loss", 0.0) * u.num_samples for u in collected.updates) / weights
        steps = [u.metrics["step_seconds"] for u in collected.updates if "step_seconds" in u.metrics]
        return RoundRecord(
            round=round,
            clients=clients,
            updated=[u.client for u in collected.updates],
            excluded=collected.excluded,
            failed=collected.failed,
            train_loss=loss,
            step_seconds=round_(sum(steps) / len(steps)) if steps else None,
            train_seconds=round_(sum(collected.train_seconds.values())),
            train_seconds_by_worker={str(w): round_(t) for w, t in sorted(collected.train_seconds.items())},
            worker_rss_mb=round_(collected.rss_mb),
            global_digest=adapter_digest(self.global_adapter),
        )

    def checkpoint(self, round: int) -> None:
        realigner_state = self.realigner.state_dict() if self.realigner is not None and self.realign_layers is not None else {}
        checkpoint = Checkpoint(
            round=round,
            adapter=self.global_adapter,
            aggregator_state=self._plugin("state_dict"),
            realign_layers=self.realign_layers,
            realigner_state=realigner_state,
            history=self.history,
            ledger=self.ledger.state(),
            rng=capture_rng(),
        )
        self.store.save(checkpoint, self.aggregator_name)

    def stop_short(self, round: int, collected: _Collected) -> None:
        problems = [f"client {p.client}: {p.reason}" for p in collected.excluded + collected.failed]
        last = f"round {round - 1}, checkpoint in {self.store.folder}" if round > 1 else "none yet"
        raise FedsodaError(
            f"round {round}: only {len(collected.updates)} valid client update(s), federate.min_clients = "
            f"{self.plan.min_clients} ({'; '.join(problems) or 'no client answered'}); stopped, last good round: {last}. "
            f"Fix the cause and rerun with --resume"
        )

    def _plugin(self, method: str, *args: Any) -> Any:
        """Call an aggregator method; anything it raises becomes a PluginError naming it."""
        try:
            return getattr(self.aggregator, method)(*args)
        except FedsodaError:
            raise
        except Exception as exc:
            where = type(self.aggregator).__module__
            raise PluginError(
                f"aggregator '{self.aggregator_name}' ({where}) raised {type(exc).__name__} in {method}(): {exc}; fix the plugin"
            ) from None


def sample_clients(seed: int, round: int, clients: int, per_round: int) -> list[int]:
    """The clients of `round`: `per_round` of `clients` without replacement, sorted; a function of
    (seed, round) alone, so a resumed run samples exactly what the uninterrupted one did."""
    import numpy as np

    rng = np.random.default_rng(stable_seed(seed, "sample", round))
    return sorted(int(c) for c in rng.choice(clients, size=per_round, replace=False))


def round_(value: float) -> float:
    return float(f"{value:.4g}") if value else 0.0
