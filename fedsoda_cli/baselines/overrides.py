"""Running a standard stage with a few spec keys fixed by the baseline's definition."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedsoda_cli.stages.contract import StageContext


def with_overrides(ctx: StageContext, **sections: dict[str, Any]) -> StageContext:
    """A copy of `ctx` whose spec has the given keys replaced, section by section, e.g.
    `with_overrides(ctx, federate={"realign_every": 0})`. The values are validated as usual."""
    spec = ctx.spec
    updates = {
        name: getattr(spec, name).model_validate({**getattr(spec, name).model_dump(), **values})
        for name, values in sections.items()
    }
    changed = spec.model_copy(update=updates)
    return dataclasses.replace(ctx, spec=changed)
