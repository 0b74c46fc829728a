"""Writing an upstream stage folder by hand, so a test can run a later stage on top of it."""

from fedsoda_cli import artifacts, pipeline
from fedsoda_cli.spec import sections_hash


def write_stage_folder(workdir, spec, name, fill=lambda out: None):
    """A stage folder with a manifest that pipeline.status accepts as done; `fill(out)` writes its files."""
    stage = pipeline.stage_named(spec, name)
    inputs = {i: artifacts.read_manifest(workdir, i).digest() for i in stage.inputs}
    with artifacts.write_stage(workdir, name, sections_hash(spec, stage.sections), inputs) as writer:
        fill(writer.path)
