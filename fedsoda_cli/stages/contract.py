"""The stage contract: what the orchestrator (pipeline.py) and a stage agree on, and nothing else.

A stage is a plain function `run(ctx: StageContext) -> StageResult`. It lives here, below the
orchestrator, so that stages and baselines import the contract and never the pipeline that runs
them; the orchestrator names a stage by a "module:function" string and imports it only when run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fedsoda_cli.spec import Spec


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    sections: tuple[str, ...]
    entry: str | Callable[[StageContext], StageResult]  # "module:function" is imported only when run

    def function(self) -> Callable[[StageContext], StageResult]:
        if callable(self.entry):
            return self.entry
        module, _, attr = self.entry.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass
class StageContext:
    """What a stage function gets: the spec, its scratch output folder and its inputs' folders."""

    spec: Spec
    workdir: Path
    out: Path
    inputs: dict[str, Path]
    console: Console
    options: dict[str, Any] = field(default_factory=dict)  # command-line options of one stage, e.g. resume
    # the spec sections the stage's output depends on (its Stage.sections), so that a stage that
    # keys something on them (federate's resumable checkpoints) need not ask the orchestrator
    sections: tuple[str, ...] = ()


@dataclass
class StageResult:
    """What a stage function returns: metrics for the manifest, rows for the summary table."""

    metrics: dict[str, Any] = field(default_factory=dict)
    summary: list[tuple[str, str]] = field(default_factory=list)
