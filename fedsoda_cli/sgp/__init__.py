"""Similarity-based group pruning (SGP), the measurement: angular distances between the residual
stream at layer boundaries (`angular.py`). The profile stage records them, the prune stage and
the `sgp` pruner read them."""
