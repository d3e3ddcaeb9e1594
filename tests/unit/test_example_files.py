"""Example workflows ship as the template browser expects: <name>.json in UI format + <name>.jpg."""
from pathlib import Path

import pytest
from PIL import Image

from support.workflow import load_workflow, validate_ui_workflow

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))


def test_there_are_examples():
    assert "relay_upscale_2x" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_example_is_well_formed_with_a_thumbnail(name):
    validate_ui_workflow(load_workflow(EXAMPLES / f"{name}.json"))
    thumb = EXAMPLES / f"{name}.jpg"
    assert thumb.is_file(), f"{thumb.name} missing: the template browser shows a thumbnail of the same name"
    assert Image.open(thumb).size[0] >= 256
