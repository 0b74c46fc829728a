import numpy as np
import pytest

from fedsoda_cli.data.partition import partition, partition_examples, partition_stats
from fedsoda_cli.data.tasks import Example
from fedsoda_cli.errors import DataError
from fedsoda_cli.spec.schema import FederateSpec

LABELS = [i % 2 for i in range(400)]  # balanced, two labels


def flat(parts):
    return sorted(i for p in parts for i in p)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_seeded_determinism(scheme):
    a = partition(400, LABELS, 4, scheme, seed=0)
    assert a == partition(400, LABELS, 4, scheme, seed=0)
    assert a != partition(400, LABELS, 4, scheme, seed=1)


@pytest.mark.parametrize("scheme", ["iid", "shards"])
def test_every_index_exactly_once(scheme):
    assert flat(partition(400, LABELS, 7, scheme, seed=3)) == list(range(400))


def test_dirichlet_uses_each_index_at_most_once_and_all():
    parts = partition(400, LABELS, 5, "dirichlet", seed=0, alpha=0.3)
    assert flat(parts) == sorted(set(flat(parts)))
    assert flat(parts) == list(range(400))  # proportions sum to one per label: all are dealt


def test_iid_is_balanced():
    sizes = [len(p) for p in partition(403, None, 4, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_skews_labels():
    def mean_skew(alpha):
        stats = partition_stats(partition(400, LABELS, 4, "dirichlet", seed=0, alpha=alpha), LABELS)
        return np.mean([abs(s["label_histogram"][1] / s["size"] - 0.5) for s in stats])

    assert mean_skew(0.1) > 0.3  # clients are mostly one label
    assert mean_skew(100.0) < 0.1  # near iid
    assert mean_skew(0.1) > mean_skew(100.0)


def test_shards_give_few_labels_per_client():
    labels = [i % 10 for i in range(1000)]
    parts = partition(1000, labels, 10, "shards", seed=0, shards_per_client=2)
    for stats in partition_stats(parts, labels):
        assert stats["size"] == 100
        assert sum(1 for c in stats["label_histogram"].values() if c) <= 2


def test_unlabelled_task_needs_iid():
    with pytest.raises(DataError, match=r"federate\.partition = 'dirichlet' needs a labelled task.*iid"):
        partition(10, None, 2, "dirichlet", seed=0)
    with pytest.raises(DataError, match="labelled"):
        partition(10, None, 2, "shards", seed=0)


def test_empty_client_is_named():
    with pytest.raises(DataError, match=r"client 3 of 4 gets no training example.*federate\.clients"):
        partition(3, None, 4, "iid", seed=0)
    with pytest.raises(DataError, match=r"client \d+ of 8 .*federate\.shards_per_client"):
        partition(10, [i % 2 for i in range(10)], 8, "shards", seed=0)
    with pytest.raises(DataError, match=r"dirichlet_alpha"):
        partition(2, [0, 1], 3, "dirichlet", seed=0, alpha=0.01)


def test_stats_histogram_lists_all_labels():
    stats = partition_stats([[0, 2], [1]], [0, 1, 0])
    assert stats == [
        {"client": 0, "size": 2, "label_histogram": {0: 2, 1: 0}},
        {"client": 1, "size": 1, "label_histogram": {0: 0, 1: 1}},
    ]
    assert partition_stats([[0], [1]], None)[0]["label_histogram"] is None


def test_partition_examples_uses_federate_section():
    examples = [Example(str(i), "p", " a", i % 2, [" a", " b"]) for i in range(40)]
    fed = FederateSpec(clients=4, partition="shards", shards_per_client=1)
    parts = partition_examples(examples, fed, seed=0)
    assert len(parts) == 4 and flat(parts) == list(range(40))
    unlabelled = [Example(str(i), "p", " a", None, None) for i in range(40)]
    with pytest.raises(DataError):
        partition_examples(unlabelled, fed, seed=0)
