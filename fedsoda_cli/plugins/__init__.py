"""Plugin contracts, their registries, and the built-in implementations."""

from fedsoda_cli.plugins.contracts import Aggregator, ClientUpdate, LayerProfile, Pruner
from fedsoda_cli.plugins.registry import Registry, load_plugin_files

aggregators: Registry = Registry(
    "aggregator", "fedsoda.aggregators", Aggregator,
    {"fedavg": "fedsoda_cli.plugins.aggregators.fedavg:FedAvg"},
)
pruners: Registry = Registry(
    "pruner", "fedsoda.pruners", Pruner,
    {
        "sgp": "fedsoda_cli.plugins.pruners:SimilarityGroupPruner",
        "block-influence": "fedsoda_cli.plugins.pruners:BlockInfluencePruner",
        "uniform": "fedsoda_cli.plugins.pruners:UniformPruner",
        "last": "fedsoda_cli.plugins.pruners:LastLayersPruner",
    },
)

__all__ = ["Aggregator", "ClientUpdate", "LayerProfile", "Pruner", "Registry", "aggregators", "load_plugin_files", "pruners"]
