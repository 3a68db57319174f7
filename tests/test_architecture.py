"""The layout's promises: the subpackages of workbench depend on each other one way (the order
below), and the modules that only read run directories or recipes import no torch."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO, python

# Each room may import only from rooms before it (and itself).
ORDER = ["errors", "environment", "hookspecs", "signals", "progress", "distributed", "seams",
         "rundir", "data", "config", "device", "plugins", "report", "compile", "train", "auto",
         "compare", "service", "api", "cli"]


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "workbench"


def imports(path: Path) -> set[str]:
    """The workbench modules a file imports, at run time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("workbench"):
            found.update(f"workbench.{a.name}" for a in node.names) if node.module == "workbench" \
                else found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("workbench"))
    return found


def test_rooms_depend_on_each_other_one_way():
    wrong = []
    for path in sorted((REPO / "workbench").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        here = parts[1] if len(parts) > 2 else parts[-1]
        if here not in ORDER:
            continue
        for target in imports(path):
            there = room(target)
            if there in ORDER and ORDER.index(there) > ORDER.index(here):
                wrong.append(f"{path.relative_to(REPO)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_room_is_placed():
    rooms = {p.name for p in (REPO / "workbench").iterdir() if p.is_dir() and
             (p / "__init__.py").exists()}
    modules = {p.stem for p in (REPO / "workbench").glob("*.py")} - {"__init__", "__main__"}
    assert rooms | modules <= set(ORDER)


def test_reading_runs_and_recipes_imports_no_torch():
    probe = ("import sys\n"
             "import workbench.rundir.claim, workbench.rundir.files, workbench.rundir.jsonsafe\n"
             "import workbench.config.recipe, workbench.service, workbench.cli\n"
             "print('torch' in sys.modules)")
    done = python(probe)
    assert done.stdout.strip() == "False", done.stderr
