"""Splitting training examples over K clients: iid, Dirichlet label skew, or label-sorted shards.

All schemes are seeded with a numpy Generator (same seed, same split) and use every example at
most once; iid and shards use every example exactly once. A client left with no example is an
error naming the client and what to change, never a silently idle client.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedsoda_cli.errors import DataError
from fedsoda_cli.spec.schema import FederateSpec

Scheme = Literal["iid", "dirichlet", "shards"]

# Dirichlet draws are repeated (still deterministic) until no client is empty, as in the NIID-Bench
# recipe (Li et al. 2022); after this many tries the split is declared impossible.
_DIRICHLET_TRIES = 100


def partition(
    n_examples: int,
    labels: list[int] | None,
    clients: int,
    scheme: Scheme,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[list[int]]:
    """Example indices (sorted) for each of `clients` clients.

    iid: a seeded permutation cut into near-equal parts. dirichlet: for every label, its examples
    are spread with proportions ~ Dirichlet(alpha); small alpha = strong label skew. shards: sort by
    label, cut into clients * shards_per_client shards, deal them out at random.
    Raises DataError when dirichlet/shards get no labels, or when a client would get no example.
    """
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if labels is not None and len(labels) != n_examples:
        raise ValueError(f"{len(labels)} labels for {n_examples} examples")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(n_examples, clients, rng)
    elif scheme in ("dirichlet", "shards"):
        if labels is None:
            raise DataError(
                f"federate.partition = {scheme!r} needs a labelled task (sst2, boolq); use federate.partition = 'iid' for this task"
            )
        if scheme == "dirichlet":
            parts = _dirichlet(np.asarray(labels), clients, alpha, rng)
        else:
            parts = _shards(np.asarray(labels), clients, shards_per_client, rng)
    else:
        raise DataError(f"federate.partition = {scheme!r} is unknown; use iid, dirichlet or shards")
    _require_nonempty(parts, n_examples, scheme)
    return [sorted(int(i) for i in part) for part in parts]


def partition_examples(examples: list, federate: FederateSpec, seed: int) -> list[list[int]]:
    """`partition` driven by the [federate] section, over `Example`s (labels from `example.label`)."""
    labels = [e.label for e in examples]
    return partition(
        len(examples),
        None if any(label is None for label in labels) else labels,
        federate.clients,
        federate.partition,
        seed,
        alpha=federate.dirichlet_alpha,
        shards_per_client=federate.shards_per_client,
    )


def partition_stats(parts: list[list[int]], labels: list[int] | None) -> list[dict]:
    """Per client: {"client", "size", "label_histogram"} ({label: count} over all labels, None if unlabelled)."""
    all_labels = sorted(set(labels)) if labels is not None else []
    stats = []
    for client, part in enumerate(parts):
        hist = None
        if labels is not None:
            counts = Counter(labels[i] for i in part)
            hist = {label: counts.get(label, 0) for label in all_labels}
        stats.append({"client": client, "size": len(part), "label_histogram": hist})
    return stats


def _iid(n: int, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), clients)


def _dirichlet(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per label, split its (shuffled) examples at cumulative Dirichlet(alpha) proportions.

    As in the standard recipe, a client that already holds more than n / K examples gets no share
    of the next label, which keeps client sizes from exploding while the label mix stays skewed.
    """
    n = len(labels)
    parts: list[list[int]] = []
    for _ in range(_DIRICHLET_TRIES):
        parts = [[] for _ in range(clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            open_ = np.array([len(p) < n / clients for p in parts], dtype=float)
            shares = rng.dirichlet(np.full(clients, alpha)) * open_
            # a tiny alpha can put all the mass on full clients: then spread evenly over the open ones
            shares = shares / shares.sum() if shares.sum() > 0 else open_ / open_.sum()
            cuts = (np.cumsum(shares) * len(members)).astype(int)[:-1]
            for part, piece in zip(parts, np.split(members, cuts)):
                part.extend(piece.tolist())
        if min(len(p) for p in parts) > 0:
            break
    return [np.asarray(p, dtype=int) for p in parts]


def _shards(labels: np.ndarray, clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    # Shuffle first so the order inside each label (the stable sort keeps it) is random, not file order.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, clients * per_client)
    deal = rng.permutation(len(shards)).reshape(clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in deal]


def _require_nonempty(parts: list, n: int, scheme: str) -> None:
    for client, part in enumerate(parts):
        if len(part) == 0:
            fix = {
                "iid": "use fewer federate.clients or more task.train_examples",
                "dirichlet": "use fewer federate.clients, a larger federate.dirichlet_alpha or more task.train_examples",
                "shards": "use fewer federate.clients or federate.shards_per_client, or more task.train_examples",
            }[scheme]
            raise DataError(
                f"client {client} of {len(parts)} gets no training example ({scheme} partition of {n} examples): {fix}"
            )


def client_shards(spec, out: Path) -> tuple[dict[int, list[tuple[str, str]]], list[dict[str, Any]]]:
    """Each client's training examples as (prompt, answer) pairs; writes partition.json into `out`.
    The federate stage, its baselines and the Flower shard writer all split the data this one way."""
    from fedsoda_cli import artifacts
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.data.tasks import load_task
    from fedsoda_cli.seeding import stable_seed
    from fedsoda_cli.spec import spec_dir

    folder = spec_dir(spec)
    examples = load_task(spec.task, resolve_data_dir(spec.data, folder), "train", spec.run.seed, spec_dir=folder)
    parts = partition_examples(examples, spec.federate, stable_seed(spec.run.seed, "partition"))
    labels = [e.label for e in examples if e.label is not None]
    stats = partition_stats(parts, labels if len(labels) == len(examples) else None)
    record = {
        "scheme": spec.federate.partition,
        "clients": len(parts),
        "examples": len(examples),
        "per_client": stats,
        "indices": parts,
        "example_ids": [[examples[i].id for i in part] for part in parts],
    }
    artifacts.write_json_atomic(out / "partition.json", record)
    shards = {client: [(examples[i].prompt, examples[i].answer) for i in part] for client, part in enumerate(parts)}
    return shards, stats
