"""Seeds and thread counts, set the same way before every stage so runs repeat exactly."""

from __future__ import annotations

import os
import random

from fedsoda_cli.spec import Spec


def prepare(spec: Spec) -> None:
    """Seed every generator from run.seed and size torch's thread pool from run.threads."""
    import numpy as np
    import torch

    random.seed(spec.run.seed)
    np.random.seed(spec.run.seed)
    torch.manual_seed(spec.run.seed)
    torch.set_num_threads(spec.run.threads or os.cpu_count() or 1)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from its parts, the same in every process (unlike hash())."""
    import hashlib

    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
