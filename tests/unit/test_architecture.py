"""docs/architecture.md names every module of each package, and none that is gone, so the
page a newcomer reads first stays true to the tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "architecture.md"
PACKAGES = {
    "cert_service": ROOT / "cert_service",
    "key_service": ROOT / "key_service",
    "shared": ROOT / "shared",
    "deploy.devstack": ROOT / "deploy" / "devstack",
    "deploy.kubernetes": ROOT / "deploy" / "kubernetes",
}


def _sections() -> dict[str, str]:
    """Each `## <package>: ...` section's text, by package."""
    parts = re.split(r"^## ", PAGE.read_text(), flags=re.MULTILINE)
    return {part.split(":", 1)[0]: part for part in parts[1:] if ":" in part.splitlines()[0]}


def _modules(directory: Path) -> set[str]:
    names = {path.name for path in directory.glob("*.py") if path.name != "__init__.py"}
    return names | {
        f"{path.name}/"
        for path in directory.iterdir()
        if path.name == "migrations" or (path / "__init__.py").is_file()
    }


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_the_architecture_page_lists_each_module_of(package: str) -> None:
    section = _sections()[package]
    listed = set(re.findall(r"^\| `([a-z0-9_]+(?:\.py|/))` \|", section, flags=re.MULTILINE))
    present = _modules(PACKAGES[package])
    assert sorted(present - listed) == [], f"docs/architecture.md ({package}) does not list them"
    assert sorted(listed - present) == [], f"docs/architecture.md ({package}) lists modules gone"
