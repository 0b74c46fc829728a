"""Plugin contracts, their registries, and the built-in implementations."""

from fedsoda_cli.plugins.contracts import Aggregator, ClientUpdate, LayerProfile, Pruner
from fedsoda_cli.plugins.registry import Registry, load_plugin_files
from fedsoda_cli.round_record import RoundRecord

# The built-ins live in the submodules `aggregators` and `pruners`, which share their names with the
# registries below. Importing a submodule binds it as an attribute of this package, which would
# overwrite a registry the first time a built-in is loaded; importing them first lets the registries win.
import fedsoda_cli.plugins.aggregators  # noqa: E402,F401  (isort: skip)
import fedsoda_cli.plugins.pruners  # noqa: E402,F401  (isort: skip)

# The built-ins are declared here and only here. Entry points are how other packages publish
# plugins; fedsoda's own would need installed metadata to exist at all, so a source checkout on
# PYTHONPATH, or an install older than a new built-in, would run without it or with a stale target.
aggregators: Registry = Registry(
    "aggregator",
    "fedsoda.aggregators",
    Aggregator,
    {"fedavg": "fedsoda_cli.plugins.aggregators.fedavg:FedAvg", "fedavgm": "fedsoda_cli.plugins.aggregators.fedavgm:FedAvgM"},
)
pruners: Registry = Registry(
    "pruner",
    "fedsoda.pruners",
    Pruner,
    {
        "sgp": "fedsoda_cli.plugins.pruners:SimilarityGroupPruner",
        "block-influence": "fedsoda_cli.plugins.pruners:BlockInfluencePruner",
        "uniform": "fedsoda_cli.plugins.pruners:UniformPruner",
        "last": "fedsoda_cli.plugins.pruners:LastLayersPruner",
    },
)

__all__ = [
    "Aggregator",
    "ClientUpdate",
    "LayerProfile",
    "Pruner",
    "Registry",
    "RoundRecord",
    "aggregators",
    "load_plugin_files",
    "pruners",
]
