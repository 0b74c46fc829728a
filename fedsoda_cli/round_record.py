"""The record of one federated round: one type, one set of field names, for every writer and reader.

The server builds a `RoundRecord` per round (the aggregator's `on_round_end` hook sees it before
bytes, seconds, eval and drift are filled in), keeps them as its history, stores them in every round
checkpoint, prints them (federate's console), writes them as `federate/metrics.jsonl` and sums them
into `summary.json`; `fedsoda report` reads them back. `to_json()` is exactly one metrics.jsonl line
(before `json.dumps(..., sort_keys=True)`), and `from_json()` is its inverse: it checks every field
and raises `RoundRecordError` naming the first missing, unknown or ill-typed one.

A line holds `eval` only on rounds where the server evaluated, `drift` only when it measures drift
(federate.realign_when = "drift"), and `drift.after_realign` only when it realigned after that round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class RoundRecordError(ValueError):
    """A round record that is not what fedsoda writes; the message names the field."""


@dataclass
class ClientProblem:
    """A client left out of a round's aggregate: its update was excluded, or its task failed."""

    client: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"client": self.client, "reason": self.reason}

    @classmethod
    def from_json(cls, data: Any, where: str = "client entry") -> ClientProblem:
        data = _object(data, where)
        _only(data, ("client", "reason"), where)
        return cls(client=_integer(data, "client", where), reason=_string(data, "reason", where))


@dataclass
class EvalEntry:
    """The server's score of the global adapter on one target (sub or plugin) of the validation slice."""

    accuracy: float
    ci95: list[float]  # [low, high], the 95 % Wilson interval
    correct: int
    count: int
    label_shares: dict[str, float] | None  # share of each predicted label; None for generation tasks
    loss: float | None  # mean NLL of the gold label word; None for generation tasks
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "ci95": list(self.ci95),
            "correct": self.correct,
            "count": self.count,
            "label_shares": None if self.label_shares is None else dict(self.label_shares),
            "loss": self.loss,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "eval entry") -> EvalEntry:
        data = _object(data, where)
        _only(data, ("accuracy", "ci95", "correct", "count", "label_shares", "loss", "seconds"), where)
        ci95 = _list(data, "ci95", where, _number_value)
        if len(ci95) != 2:
            raise RoundRecordError(f"field '{_join(where, 'ci95')}': expected [low, high], got {len(ci95)} value(s)")
        shares = _present(data, "label_shares", where)
        return cls(
            accuracy=_number(data, "accuracy", where),
            ci95=ci95,
            correct=_integer(data, "correct", where),
            count=_integer(data, "count", where),
            label_shares=None if shares is None else _mapping(data, "label_shares", where, _number_value),
            loss=None if _present(data, "loss", where) is None else _number(data, "loss", where),
            seconds=_number(data, "seconds", where),
        )


@dataclass
class DriftEntry:
    """The round's drift: KL of the deployed client model to the full LLM, both with the global adapter."""

    kl: float
    reference: float  # the KL right after the last alignment
    ratio: float  # kl / reference
    threshold: float  # federate.drift_threshold
    after_realign: float | None = None  # the KL under the layers realigned after this round: the next reference

    def to_json(self) -> dict[str, Any]:
        data = {"kl": self.kl, "reference": self.reference, "ratio": self.ratio, "threshold": self.threshold}
        if self.after_realign is not None:
            data["after_realign"] = self.after_realign
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "drift") -> DriftEntry:
        data = _object(data, where)
        _only(data, ("kl", "reference", "ratio", "threshold", "after_realign"), where)
        return cls(
            kl=_number(data, "kl", where),
            reference=_number(data, "reference", where),
            ratio=_number(data, "ratio", where),
            threshold=_number(data, "threshold", where),
            after_realign=_number(data, "after_realign", where) if "after_realign" in data else None,
        )


@dataclass
class RoundRecord:
    """One round: who took part, the training loss, time, memory, traffic, and the server's measurements."""

    round: int
    clients: list[int]  # sampled this round
    updated: list[int]  # whose updates went into the aggregate
    excluded: list[ClientProblem]  # updates that failed validation
    failed: list[ClientProblem]  # tasks that failed after their retries
    train_loss: float  # mean over the aggregated updates, weighted by their n_k
    step_seconds: float | None  # mean seconds per client optimizer step (None when no update measured it)
    train_seconds: float  # seconds inside local training, summed over workers
    train_seconds_by_worker: dict[str, float]
    worker_rss_mb: float  # the largest worker RSS reported this round
    global_digest: str  # digest of the new global adapter
    # filled in at the end of the round (after the on_round_end hook):
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_realign: int = 0  # realigned layers sent to all clients after this round
    seconds: float = 0.0  # the round's wall time
    eval: dict[str, EvalEntry] | None = None  # target -> score, on rounds the server evaluated
    drift: DriftEntry | None = None  # with federate.realign_when = "drift"

    def to_json(self) -> dict[str, Any]:
        """The round's metrics.jsonl line (a dict; the writer sorts its keys)."""
        data: dict[str, Any] = {
            "round": self.round,
            "clients": list(self.clients),
            "updated": list(self.updated),
            "excluded": [p.to_json() for p in self.excluded],
            "failed": [p.to_json() for p in self.failed],
            "train_loss": self.train_loss,
            "step_seconds": self.step_seconds,
            "train_seconds": self.train_seconds,
            "train_seconds_by_worker": dict(self.train_seconds_by_worker),
            "worker_rss_mb": self.worker_rss_mb,
            "global_digest": self.global_digest,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "bytes_realign": self.bytes_realign,
            "seconds": self.seconds,
        }
        if self.eval is not None:
            data["eval"] = {target: entry.to_json() for target, entry in self.eval.items()}
        if self.drift is not None:
            data["drift"] = self.drift.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any) -> RoundRecord:
        """The record of a metrics.jsonl line (or a checkpoint's history entry); RoundRecordError
        naming the field when one is missing, unknown or not of its type."""
        data = _object(data, "")
        _only(data, (*_RECORD_FIELDS, "eval", "drift"), "")
        evals = _object(data["eval"], "eval") if "eval" in data else None
        return cls(
            round=_integer(data, "round"),
            clients=_list(data, "clients", "", _integer_value),
            updated=_list(data, "updated", "", _integer_value),
            excluded=[ClientProblem.from_json(p, f"excluded[{i}]") for i, p in enumerate(_list(data, "excluded"))],
            failed=[ClientProblem.from_json(p, f"failed[{i}]") for i, p in enumerate(_list(data, "failed"))],
            train_loss=_number(data, "train_loss"),
            step_seconds=None if _present(data, "step_seconds", "") is None else _number(data, "step_seconds"),
            train_seconds=_number(data, "train_seconds"),
            train_seconds_by_worker=_mapping(data, "train_seconds_by_worker", "", _number_value),
            worker_rss_mb=_number(data, "worker_rss_mb"),
            global_digest=_string(data, "global_digest"),
            bytes_down=_integer(data, "bytes_down"),
            bytes_up=_integer(data, "bytes_up"),
            bytes_realign=_integer(data, "bytes_realign"),
            seconds=_number(data, "seconds"),
            eval=None if evals is None else {t: EvalEntry.from_json(e, f"eval.{t}") for t, e in evals.items()},
            drift=DriftEntry.from_json(data["drift"]) if "drift" in data else None,
        )


_RECORD_FIELDS = (
    "round",
    "clients",
    "updated",
    "excluded",
    "failed",
    "train_loss",
    "step_seconds",
    "train_seconds",
    "train_seconds_by_worker",
    "worker_rss_mb",
    "global_digest",
    "bytes_down",
    "bytes_up",
    "bytes_realign",
    "seconds",
)


# ---- checks -------------------------------------------------------------------------------------
# Numbers are checked, not converted: from_json(to_json(r)) == r and to_json(from_json(d)) == d, so a
# history read back from a checkpoint writes the same bytes as the run that produced it.


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RoundRecordError(f"{f'field {where!r}' if where else 'a round record'}: expected an object, got {_shown(value)}")
    return value


def _only(data: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise RoundRecordError(f"unknown field '{_join(where, unknown[0])}'")


def _present(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise RoundRecordError(f"field '{_join(where, key)}' is missing")
    return data[key]


def _typed(data: dict[str, Any], key: str, where: str, check) -> Any:
    value = _present(data, key, where)
    try:
        return check(value)
    except (TypeError, ValueError) as exc:
        raise RoundRecordError(f"field '{_join(where, key)}': {exc}") from None


def _integer_value(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a whole number, got {_shown(value)}")
    return value


def _number_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {_shown(value)}")
    return value


def _integer(data: dict[str, Any], key: str, where: str = "") -> int:
    return _typed(data, key, where, _integer_value)


def _number(data: dict[str, Any], key: str, where: str = "") -> float:
    return _typed(data, key, where, _number_value)


def _string(data: dict[str, Any], key: str, where: str = "") -> str:
    def check(value):
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {_shown(value)}")
        return value

    return _typed(data, key, where, check)


def _list(data: dict[str, Any], key: str, where: str = "", item=None) -> list:
    def check(value):
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {_shown(value)}")
        if item is None:
            return list(value)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except TypeError as exc:
                raise TypeError(f"item {i}: {exc}") from None
        return out

    return _typed(data, key, where, check)


def _mapping(data: dict[str, Any], key: str, where: str, item) -> dict[str, Any]:
    def check(value):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {_shown(value)}")
        out = {}
        for k, v in value.items():
            try:
                out[str(k)] = item(v)
            except TypeError as exc:
                raise TypeError(f"key {k!r}: {exc}") from None
        return out

    return _typed(data, key, where, check)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
