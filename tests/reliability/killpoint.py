"""Run the fedsoda CLI, announce one moment of a stage's write on stdout, and (except for `computing`)
hold still there, so that a test can SIGKILL the process at exactly that moment.

    python -m tests.reliability.killpoint POINT fedsoda-arguments...

POINT, in the order a stage write goes through them:
  computing  the stage function has started in its scratch folder (announced, not held: the kill
             lands while it computes and writes its files)
  written    the stage function returned: its files are complete in the scratch folder, the
             manifest is not written yet
  sealed     the manifest is written; the scratch folder is about to be synced and swapped in for the stage folder
  swapping   the previous output has been moved aside to .retired/ and the new one is not yet
             renamed into place (the one moment the stage folder does not exist)
Nothing in fedsoda is replaced: the real stage runs, and the pause is added around real calls.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

MARKER = "KILLPOINT"


def announce_and_hold(point: str, hold: bool = True) -> None:
    print(f"{MARKER} {point}", flush=True)
    while hold:
        time.sleep(60)


def install(point: str) -> None:
    from fedsoda_cli import artifacts, pipeline

    if point in ("computing", "written"):
        resolve = pipeline.Stage.function

        def function(stage):
            real = resolve(stage)

            def paused(ctx):
                if point == "computing":
                    announce_and_hold(point, hold=False)
                result = real(ctx)
                if point == "written":
                    announce_and_hold(point)
                return result

            return paused

        pipeline.Stage.function = function
    elif point == "sealed":
        swap = artifacts.replace_folder

        def sealed(new, target, **kwargs):
            if kwargs.get("retired_in") is not None:  # a stage's swap; models and caches swap their own folders
                announce_and_hold(point)
            return swap(new, target, **kwargs)

        artifacts.replace_folder = sealed
    elif point == "swapping":
        rename = os.rename

        def retire_then_hold(src, dst, *args, **kwargs):
            rename(src, dst, *args, **kwargs)
            if artifacts._RETIRED in Path(dst).parts:
                announce_and_hold(point)

        os.rename = retire_then_hold
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def main(argv: list[str]) -> None:
    point, args = argv[0], argv[1:]
    install(point)
    from fedsoda_cli.cli.app import app

    sys.argv = ["fedsoda", *args]
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
