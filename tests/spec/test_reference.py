from pathlib import Path

from fedsoda_cli.spec.reference import render
from fedsoda_cli.spec.schema import SECTIONS


def test_reference_is_current():
    committed = (Path(__file__).parents[2] / "docs" / "spec-reference.md").read_text()
    assert committed == render(), "regenerate: python -m fedsoda_cli.spec.reference > docs/spec-reference.md"


def test_every_key_is_described():
    for name, section in SECTIONS.items():
        for key, info in section.model_fields.items():
            assert info.description, f"{name}.{key} has no description"
