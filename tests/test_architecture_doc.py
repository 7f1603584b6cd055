"""docs/architecture.md's room list names every module: a module added without a word there fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("adapters", "backbones", "training", "serving", "cli", "benchmarks")


def rooms_section() -> str:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    return doc[doc.index("## Rooms"):doc.index("## What each room may import")]


def modules() -> list[Path]:
    """Every module of the rooms, less package markers and the quality protocol's package (listed as one)."""
    return sorted(path.relative_to(ROOT) for room in ROOMS for path in (ROOT / room).rglob("*.py")
                  if path.name != "__init__.py" and "quality" not in path.parts)


@pytest.mark.parametrize("module", modules(), ids=str)
def test_every_module_is_named_in_the_room_list(module: Path):
    named = rooms_section()
    within_room = module.relative_to(module.parts[0])
    assert any(f"`{name}" in named for name in (module.name, str(within_room), str(module))), (
        f"{module} is not named in docs/architecture.md's room list")
