"""The layers only import downward: protocol <- domain/util <- security/
packages/state <- net <- parent/child <- node <- admin <- cli.

Each module's imports are read from its source (``ast``), so a module that
reaches upward, or a wire module that imports rdsd at all, fails here with
the offending line named. docs/DESIGN.md draws the same map."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Layer rank of each part of rdsd; a module may import only its own rank or
#: lower. Siblings of one rank (parent and child, say) may not import each
#: other: they meet in the node.
RANK: dict[str, int] = {
    "_version": 0,
    "domain": 1,
    "errors": 1,
    "events": 1,
    "util": 1,
    "validate": 1,
    "config": 2,
    "settings": 2,
    "security": 2,
    "claims": 2,
    "packages": 3,
    "state": 3,
    "net": 4,
    "parent": 5,
    "child": 5,
    "node": 6,
    "admin": 7,
    "cli": 8,
}
SIBLINGS_APART = {frozenset({"parent", "child"}), frozenset({"packages", "state"})}


def part_of(module: str) -> str | None:
    """``rdsd.parent.routing`` -> ``parent``; ``rdsd`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "rdsd" else None


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def modules(top: str) -> list[tuple[Path, str]]:
    found = []
    for path in sorted((ROOT / top).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        dotted = ".".join(rel.parts)
        package = dotted if path.name == "__init__.py" else dotted.rsplit(".", 1)[0]
        found.append((path, package.removesuffix(".__init__")))
    return found


def test_every_part_has_a_rank() -> None:
    parts = {p.stem if p.is_file() else p.name for p in (ROOT / "rdsd").iterdir()}
    parts -= {"__init__", "__pycache__", "py"}
    assert parts <= set(RANK) | {"py.typed"}, parts - set(RANK)


def test_protocol_imports_nothing_of_rdsd() -> None:
    for path, package in modules("protocol"):
        for line, name in imports(path, package):
            assert not name.startswith("rdsd"), f"{path}:{line} imports {name}"


@pytest.mark.parametrize("path,package", modules("rdsd"), ids=lambda v: str(v))
def test_imports_point_down(path: Path, package: str) -> None:
    rel = path.relative_to(ROOT / "rdsd").parts
    if rel == ("__init__.py",):  # the public face: it may gather anything
        return
    me = rel[0].removesuffix(".py")
    for line, name in imports(path, package):
        other = part_of(name)
        if other is None or other == me:
            continue
        assert RANK[other] <= RANK[me], f"{path}:{line}: {me} imports {name} from a higher layer"
        assert frozenset({me, other}) not in SIBLINGS_APART, f"{path}:{line}: {me} imports {name}"
