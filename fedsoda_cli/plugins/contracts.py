"""The plugin contracts: what an aggregator and a pruning strategy receive and must return.

Write a subclass, decorate it with `aggregators.register("name")` or `pruners.register("name")`
(from `fedsoda_cli.plugins`), and list the file in the spec's `plugins` or publish it under the
entry-point group `fedsoda.aggregators` / `fedsoda.pruners`. See docs/plugins.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fedsoda_cli.round_record import RoundRecord
    from fedsoda_cli.spec.schema import PruneSpec

AdapterState = dict[str, "torch.Tensor"]  # PEFT adapter tensors by name (e.g. "...layers.3.self_attn.q_proj.lora_A.weight")


@dataclass
class ClientUpdate:
    """One client's validated result of a round."""

    client: int
    adapter: AdapterState
    num_samples: int  # the update's weight n_k, as federate.weighting says (default: examples trained this round)
    metrics: dict[str, float] = field(default_factory=dict)


class Aggregator(ABC):
    """Makes the new global adapter from the round's validated updates.

    Built once per federate run with keyword arguments `seed` (int). Hooks are optional.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    @abstractmethod
    def aggregate(self, round: int, global_adapter: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        """Return the new global adapter: same keys, shapes and dtypes as `global_adapter`.

        `updates` is never empty and holds only finite tensors with the global adapter's keys and
        shapes. Do not modify the inputs in place.
        """

    def state_dict(self) -> dict[str, Any]:
        """Server-side state saved in each checkpoint (tensors and JSON-able values); {} if stateless."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output when a run resumes."""

    # Lifecycle hooks, called by the round loop; override what you need.
    def on_round_start(self, round: int, clients: list[int]) -> None: ...

    def on_round_end(self, round: int, global_adapter: AdapterState, record: RoundRecord) -> None:
        """After aggregation. `record` is the round's `RoundRecord` so far (clients, updated, excluded,
        failed, train_loss, timings, global_digest); the server fills in its bytes, seconds, eval and
        drift after this hook. Read it, do not change it: it becomes the round's metrics.jsonl line."""

    def before_realign(self, round: int) -> None: ...

    def after_realign(self, round: int) -> None: ...


@dataclass
class LayerProfile:
    """What `profile` measured on the full model, handed to every pruner.

    `distances[n][l]` is the mean angular distance d_n(l) between the inputs of layers l and l+n
    (layer L means the output of the last layer), for l = 0..L-n. `block_influence[l]` is ShortGPT's
    BI_l = 1 - mean cos(h_l, h_{l+1}).
    """

    num_layers: int
    distances: dict[int, list[float]]
    block_influence: list[float]


class Pruner(ABC):
    """Chooses the layers to remove. Built with no arguments."""

    #: Whether `iterative = true` is meaningful: the stage re-profiles after each accepted group.
    supports_iterative: bool = False

    @abstractmethod
    def select(self, profile: LayerProfile, config: PruneSpec) -> list[list[int]]:
        """Return the removed groups, each a list of consecutive original layer indices.

        Groups must not overlap, must lie in 0..num_layers-1, must respect config.protect_first /
        protect_last, and must leave at least one layer.
        """
