"""The declarative TOML experiment spec: schema, loading and overrides."""

from fedsoda_cli.spec.load import key_hashes, load_spec, resolve_workdir, sections_hash, spec_dir
from fedsoda_cli.spec.schema import SECTIONS, Spec

__all__ = ["SECTIONS", "Spec", "key_hashes", "load_spec", "resolve_workdir", "sections_hash", "spec_dir"]
