"""Hostile inputs, made on demand: what an attacker or a damaged disk leaves in a run folder,
a checkpoint or a cache folder. Each maker changes the files it is given and returns what a
test needs to check that nothing was run, followed or exhausted."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

OTHER_UID = 65534  # "nobody": the other local user of a shared machine


def rewrite_checkpoint(run_dir: Path, change: Callable[[dict], Any]) -> None:
    """Load the run's checkpoint, let ``change`` edit it in place, save it back."""
    path = run_dir / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    change(saved)
    torch.save(saved, path)


def shared_list(depth: int) -> list:
    """A list nested ``depth`` deep whose every level holds the level below twice: a few bytes
    pickled, 2**depth items to walk naively."""
    value: list = [0]
    for _ in range(depth):
        value = [value, value]
    return value


def inflating_checkpoint(run_dir: Path, megabytes: int = 64) -> None:
    """The checkpoint archive rewritten with one extra entry that is all zeros, deflated: a
    small file that would inflate to ``megabytes`` MB."""
    path = run_dir / "checkpoint.pt"
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, content in entries:
            archive.writestr(info, content)
        prefix = entries[0][0].filename.split("/")[0]
        archive.writestr(f"{prefix}/padding", b"\0" * (megabytes * 2**20),
                         compress_type=zipfile.ZIP_DEFLATED)
    path.write_bytes(buffer.getvalue())


def names_code(run_dir: Path, marker: Path) -> Path:
    """A module beside the run whose import writes ``marker``; the checkpoint's recipe (not
    recipe.yaml, which stays harmless) names it as the model."""
    evil = run_dir.parent / "evil.py"
    evil.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                    "def model(**data):\n    pass\n")
    rewrite_checkpoint(run_dir, lambda saved: saved["recipe"]["model"].update(
        name=f"{evil}:model"))
    return evil


def link_to_victim(link: Path, victim: Path) -> None:
    """``link`` made a symbolic link to ``victim`` (a file the user cares about)."""
    victim.write_text("precious\n")
    link.unlink(missing_ok=True)
    link.symlink_to(victim)


def sparse_file(path: Path, size: int) -> None:
    """A file of ``size`` bytes that takes no room on disk."""
    with open(path, "wb") as handle:
        handle.truncate(size)


def others_can_write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o777)


def owned_by_another_user(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, OTHER_UID, OTHER_UID)
    os.chmod(folder, 0o755)


def can_chown() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def one_line_exit_2(result, *words: str) -> str:
    """The line a refused command printed: exit 2, no traceback, one ``error`` line holding
    each of ``words``."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def nested(depth: int, leaf: Any = 1.0) -> Any:
    """``leaf`` inside ``depth`` lists of one item each: deeper than any array can be."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def recipe_with(base: Path, folder: Path, name: str = "hostile.yaml", **sections: Any) -> Path:
    """A copy of the recipe ``base`` in ``folder`` with ``sections`` replaced whole."""
    recipe = yaml.safe_load(base.read_text())
    recipe.update(sections)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def optim_args_plugin(folder: Path) -> Path:
    """A file of optim_args rules that fail the ways a plugin's bug does: ``Raises`` raises,
    ``GivesInt`` gives 3 where a mapping of settings belongs."""
    path = folder / "hostile_rules.py"
    path.write_text("class Raises:\n    def __call__(self, name):\n"
                    "        raise RuntimeError('boom in the plugin')\n\n\n"
                    "class GivesInt:\n    def __call__(self, name):\n        return 3\n")
    return path


def failing_models(folder: Path) -> Path:
    """A file of models that fail at set-up: ``broken`` raises, ``discrete`` has a discrete
    latent (no Gaussian guide fits it), ``no_latent`` has nothing to infer."""
    path = folder / "failing_models.py"
    path.write_text(
        "import pyro\nimport pyro.distributions as dist\n\n\n"
        "def broken(flips):\n    pyro.sample('f', dist.Beta(10.0, 10.0))\n"
        "    raise RuntimeError('broken model')\n\n\n"
        "def discrete(flips):\n    k = pyro.sample('k', dist.Bernoulli(0.5))\n"
        "    with pyro.plate('flips', len(flips)):\n"
        "        pyro.sample('obs', dist.Bernoulli(0.3 + 0.4 * k), obs=flips)\n\n\n"
        "def no_latent(flips):\n    with pyro.plate('flips', len(flips)):\n"
        "        pyro.sample('obs', dist.Bernoulli(0.5), obs=flips)\n")
    return path


def packed(*members: tuple[str, str, str]) -> bytes:
    """A run folder as a Ray task sends it back (.tar.gz bytes), of ``(name, kind, what)``
    members: kind "file" (``what`` its text), "dir", "symlink" or "hardlink" (``what`` the
    link's target)."""
    import tarfile

    types = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, kind, what in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(what.encode())
                tar.addfile(info, io.BytesIO(what.encode()))
                continue
            info.type, info.linkname, info.mode = types[kind], what, 0o777
            tar.addfile(info)
    return buffer.getvalue()


def escaping_link_chain(dest: Path) -> list[tuple[str, str, str]]:
    """The CVE-2025-4517 pattern (CPython's test_realpath_limit_attack), for unpacking into
    ``dest``: links under names so long that the expanded path passes PATH_MAX, where
    ``os.path.realpath`` (and so tarfile's ``data`` filter before Python 3.11.13) stops
    resolving; through them a link to ``dest``'s parent, and a hard link to its ``flag``
    file, which the last member writes."""
    steps = "abcdefghijklmnop"
    length = (os.pathconf(dest.parent, "PC_PATH_MAX") - len(str(dest)) - 1) // (len(steps) + 1)
    component, path, members = "d" * length, "", []
    for step in steps:
        members += [(os.path.join(path, component), "dir", ""),
                    (os.path.join(path, step), "symlink", component)]
        path = os.path.join(path, component)
    link = os.path.join(*steps, "l" * 254)
    members.append((link, "symlink", os.path.join(*[".."] * len(steps))))
    members.append(("escape", "symlink", os.path.join(link, "..")))
    members.append(("flaglink", "hardlink", os.path.join("escape", "flag")))
    members.append(("flaglink", "file", "overwritten\n"))
    return members


def report_lost(run_dir: Path, reason: str | None = None) -> None:
    """summary.json as a run leaves it whose report was killed (the summary written before
    the report), or, with ``reason``, whose report failed that way."""
    import json

    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary.pop("report_seconds")
    summary["posterior"], summary["diagnostics"] = {}, {"khat": None}
    if reason is not None:
        summary["report_seconds"], summary["diagnostics"]["reason"] = 0.1, reason
    path.write_text(json.dumps(summary))


def plugin_site(folder: Path, module: str, source: str) -> dict[str, str]:
    """An installed vibench plugin, ``module`` with ``source``, as a folder to put on
    PYTHONPATH (a module and its dist-info with the entry point): the environment to run
    vibench with it."""
    site = folder / "site"
    info = site / f"vibench_{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (site / f"{module}.py").write_text(source)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vibench-{module}\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text(f"[vibench]\n{module} = {module}\n")
    return {"PYTHONPATH": str(site)}


ECHO_AT_IMPORT = """import subprocess
import sys

subprocess.run(["echo", "from the plugin's import"], check=True)
print("and from print", flush=True)
"""
