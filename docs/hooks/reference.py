"""MkDocs hook: the reference pages' tables, generated from the code at build time.

A page asks for a table with a marker on a line of its own, ``<!-- generated: NAME -->``;
NAME is one of GENERATORS below. Hand-written descriptions live in ``descriptions.yml`` beside
this file, and the build fails when the code has a recipe key or an environment variable that
file does not describe, or the file describes one the code no longer has.
"""

from __future__ import annotations

import ast
import functools
import html
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- generated: ([a-z_]+) -->$", re.MULTILINE)


def workbench() -> SimpleNamespace:
    """Everything the generators take from vibench: update this function (only) when its
    modules move."""
    import typer.main

    from workbench.cli import app
    from workbench.config.kinds import COMPONENTS, LISTS
    from workbench.config.recipe import DEFAULT_STAGES, SECTIONS, TRAIN
    from workbench.rundir import summary

    def catalogue() -> dict:  # what `vibench list --json` prints, from a fresh process
        out = subprocess.run([sys.executable, "-m", "workbench", "list", "--json"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        if out.returncode:
            raise PluginError(f"vibench list --json failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    return SimpleNamespace(
        command=typer.main.get_command(app),  # the click group behind `vibench`
        train=TRAIN,  # train: key -> Option(name, default, annotation) with .type_name()
        sections=SECTIONS,  # the recipe's top-level keys
        components=COMPONENTS,  # component sections: path in the recipe -> kind
        lists=LISTS,  # sections that list components: path -> kind
        default_stages=DEFAULT_STAGES,
        catalogue=catalogue,
        # vibench's default plugins, and what is built in (guide: auto)
        own_plugin=lambda entry: entry.get("built_in") or str(entry["plugin"]).startswith(
            "vibench."),
        sources=[ROOT / "workbench", ROOT / "plugins"],  # where environment variables are read
        summary=summary,  # summary.json's schema: FIELDS, Summary, RunSummary, PipelineSummary
    )


@functools.cache
def _wb() -> SimpleNamespace:
    return workbench()


@functools.cache
def _descriptions() -> dict:
    return yaml.safe_load((Path(__file__).parent / "descriptions.yml").read_text())


def _same_keys(what: str, found: list[str], described: dict) -> None:
    missing = [key for key in found if key not in described]
    stale = [key for key in described if key not in found]
    if missing or stale:
        raise PluginError(f"docs/hooks/descriptions.yml, {what}: "
                          + "; ".join(filter(None, [
                              missing and f"undocumented {', '.join(missing)}",
                              stale and f"described but not in the code {', '.join(stale)}"])))


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _text(text: Any) -> str:
    """Plain text from the code (help, descriptions) as Markdown that shows it as it is."""
    return _cell(html.escape(str(text), quote=False).replace("*", "\\*"))


def _code(value: Any) -> str:
    shown = json.dumps(value) if not isinstance(value, str) else value
    return f"`{_cell(shown)}`"


# -- the command line ---------------------------------------------------------------------

def _help_markdown(text: str) -> str:
    """A command's docstring: paragraphs reflowed, its Examples block as a code block."""
    out = []
    for block in (text or "").strip().split("\n\n"):
        lines = block.splitlines()
        if lines[0].rstrip().endswith(":") and all(line.startswith("  ") for line in lines[1:]):
            out.append(f"**{lines[0].strip()}**\n\n```sh\n"
                       + "\n".join(line.strip() for line in lines[1:]) + "\n```")
        else:
            out.append(_text(" ".join(line.strip() for line in lines)))
    return "\n\n".join(out)


def _params_table(command: Any, ctx: Any) -> str:
    rows = ["| argument or option | what |", "| --- | --- |"]
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(ctx) if hasattr(param, "get_help_record") else None
        name, help_text = record if record else (param.human_readable_name, "")
        rows.append(f"| `{_cell(name)}` | {_text(help_text)} |")
    return "\n".join(rows)


def cli() -> str:
    group = _wb().command
    ctx = group.make_context("vibench", [], resilient_parsing=True)
    parts = ["## `vibench`", "", _help_markdown(group.help), "",
             "```text\n" + group.get_usage(ctx) + "\n```", "", _params_table(group, ctx)]
    for name, command in group.commands.items():
        if getattr(command, "hidden", False):
            continue
        sub = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        parts += ["", f"## `vibench {name}`", "", _help_markdown(command.help), "",
                  "```text\n" + command.get_usage(sub) + "\n```", "", _params_table(command, sub)]
    return "\n".join(parts)


# -- recipes --------------------------------------------------------------------------------

def recipe_sections() -> str:
    described = _descriptions()["sections"]
    _same_keys("sections", list(_wb().sections), described)
    rows = ["| key | default | what |", "| --- | --- | --- |"]
    for key in _wb().sections:
        entry = described[key]
        rows.append(f"| `{key}` | {entry['default']} | {entry['what']} |")
    return "\n".join(rows)


def recipe_components() -> str:
    rows = ["| section | names a | holds |", "| --- | --- | --- |"]
    for path, kind in _wb().components.items():
        rows.append(f"| `{'.'.join(path)}` | [{kind}](components.md#{kind}) | `name` and that "
                    f"{kind}'s options |")
    for path, kind in _wb().lists.items():
        rows.append(f"| `{'.'.join(path)}` | list of [{kind}](components.md#{kind}) | each item a "
                    f"name, or `name` and that {kind}'s options |")
    stages = ", ".join(_wb().default_stages)
    return "\n".join(rows) + (f"\n\nWhere a recipe lists no `auto.stages`, they are `[{stages}]`, "
                              "each with its default options.")


def train_options() -> str:
    described = _descriptions()["train"]
    train = _wb().train
    _same_keys("train", list(train), described)
    rows = ["| key | default | type | what |", "| --- | --- | --- | --- |"]
    for key, option in train.items():
        rows.append(f"| `{key}` | {_code(option.default)} | {_cell(option.type_name())} | "
                    f"{_cell(described[key]).strip()} |")
    return "\n".join(rows)


# -- the component catalogue ----------------------------------------------------------------

@functools.cache
def _catalogue() -> dict:
    return _wb().catalogue()


def components() -> str:
    listing = _catalogue()
    kinds = [kind for kind, entries in listing.items() if kind not in ("conflicts", "broken")]
    parts = []
    for kind in kinds:
        entries = [e for e in listing[kind] if _wb().own_plugin(e)]
        parts += [f"## {kind}", ""]
        if not entries:
            parts += ["vibench ships none; plugins may add some.", ""]
            continue
        data = kind == "model"
        parts.append("| name | what | options |" + (" data |" if data else "")
                     + " plugin |")
        parts.append("| --- | --- | --- |" + (" --- |" if data else "") + " --- |")
        for entry in entries:
            options = "<br>".join(
                f"`{name}`: {_text(o['type'])}" + (", required" if o["required"]
                                                   else f" = {_code(o['default'])}")
                for name, o in entry["options"].items()) or "-"
            row = f"| `{entry['name']}` | {_text(entry['description'])} | {options} |"
            if data:
                row += " " + (", ".join(f"`{a}`" for a in entry.get("data_arguments") or [])
                              or "-") + " |"
            plugin = "built in" if entry.get("built_in") else f"`{entry['plugin']}`"
            parts.append(row + f" {plugin} |")
        parts.append("")
    return "\n".join(parts)


# -- environment variables ------------------------------------------------------------------

def _is_environ(node: ast.AST) -> bool:
    return ((isinstance(node, ast.Attribute) and node.attr == "environ")
            or (isinstance(node, ast.Name) and node.id in ("environ", "env")))


def _is_reader(func: ast.Attribute) -> bool:
    """``environment.seconds``, ``.count`` or ``.switch`` (workbench/environment.py)."""
    return (func.attr in ("seconds", "count", "switch") and isinstance(func.value, ast.Name)
            and func.value.id == "environment")


def _env_names(tree: ast.Module) -> set[str]:
    """The environment variables a module reads or sets: os.environ.get(X), os.environ[X],
    X in os.environ, os.getenv(X) (also through a mapping named env),
    environment.seconds(X, ...), .count(X, ...) or .switch(X, ...), X a string or a
    module-level constant holding one."""
    constants = {target.id: node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 and isinstance(node.value.value, str)
                 for target in node.targets if isinstance(target, ast.Name)}

    def name(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return constants.get(node.id) if isinstance(node, ast.Name) else None

    found = set()
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if ((node.func.attr in ("get", "pop", "setdefault") and _is_environ(node.func.value))
                    or node.func.attr == "getenv" or _is_reader(node.func)):
                key = name(node.args[0])
        elif isinstance(node, ast.Subscript) and _is_environ(node.value):
            key = name(node.slice)
        elif (isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn))
              and _is_environ(node.comparators[0])):
            key = name(node.left)
        if key and re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            found.add(key)
    return found


def environment() -> str:
    where: dict[str, list[str]] = {}
    for source in _wb().sources:
        for path in sorted(source.rglob("*.py")):
            for key in _env_names(ast.parse(path.read_text(), str(path))):
                where.setdefault(key, []).append(str(path.relative_to(ROOT)))
    described = _descriptions()["environment"]
    _same_keys("environment", sorted(where), described)
    rows = ["| variable | what | read in |", "| --- | --- | --- |"]
    for key in sorted(where, key=lambda k: (not k.startswith("VIBENCH_"), k)):
        files = ", ".join(f"`{path}`" for path in where[key])
        rows.append(f"| `{key}` | {_cell(described[key]).strip()} | {files} |")
    return "\n".join(rows)


# -- summary.json ---------------------------------------------------------------------------

def summary_fields() -> str:
    import dataclasses

    schema = _wb().summary
    common = {f.name for f in dataclasses.fields(schema.Summary)}
    run = {f.name for f in dataclasses.fields(schema.RunSummary)}
    rows = ["| key | type | in | what | read as, where an older summary lacks it |",
            "| --- | --- | --- | --- | --- |"]
    for name, spec in schema.FIELDS:
        meta = spec.metadata
        said = meta["kind"] + (" or null" if meta["null"] and not meta["omit"] else "")
        where = "every" if name in common else "a run's" if name in run else "the pipeline's"
        required = spec.default is dataclasses.MISSING and \
            spec.default_factory is dataclasses.MISSING
        default = "required" if required else "absent" if meta["omit"] else \
            _code(meta["default"])
        what = meta["doc"] + (" (contract)" if meta["contract"] else "")
        rows.append(f"| `{name}` | {said} | {where} | {_cell(what)} | {default} |")
    return "\n".join(rows)


GENERATORS = {
    "cli": cli,
    "recipe_sections": recipe_sections,
    "recipe_components": recipe_components,
    "train_options": train_options,
    "components": components,
    "environment": environment,
    "summary_fields": summary_fields,
}


def on_pre_build(config: Any) -> None:
    for cached in (_wb, _descriptions, _catalogue):
        cached.cache_clear()


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def generate(match: re.Match) -> str:
        generator = GENERATORS.get(match.group(1))
        if generator is None:
            raise PluginError(f"{page.file.src_path}: no generator {match.group(1)!r}; "
                              f"there are {', '.join(GENERATORS)}")
        return generator()

    return MARKER.sub(generate, markdown)
