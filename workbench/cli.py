"""The ``vibench`` command line: ``run`` a recipe, ``list`` the components, ``compare``
recipes, ``runs`` and ``show`` what was run.

Results go to stdout; progress and errors to stderr. Torch is imported only by ``run`` (and by
``runs`` for a run without a summary), so ``vibench list`` and ``--help`` start fast.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from workbench import signals
from workbench.config.kinds import KINDS
from workbench.errors import Interrupted, PeerLost, VibenchError

# Click's exception classes, found through typer so this works whether typer bundles click
# (typer >= 0.2x) or depends on it.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
ClickUsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Group(TyperGroup):
    """The app's commands, with flags shown in help without a type: typer labels each flag
    (--json, --help) "<bool>", as if it took a value."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_flags(command, ctx)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _plain_flags(self, ctx)
        super().format_help(ctx, formatter)


def _plain_flags(command: Any, ctx: Any) -> None:
    """Give each flag of ``command``, its --help included, an empty metavar, which help
    shows in place of the flag's type."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


app = typer.Typer(
    cls=_Group,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    """--version: the installed vibench's version, then exit."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("vibench")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from workbench import __version__ as number
        print(f"vibench {number}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _app_options(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True,
        help="Print vibench's version and exit.")] = False,
) -> None:
    """A workbench for stochastic variational inference on Pyro."""
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        text = ctx.get_help()  # rich prints the help itself and gives back ""
        if text:
            print(text)


def _stoppable(command: Callable) -> Callable:
    """A command whose stop signals (outside training, which saves first) end it with one line
    and the signal's exit code; typer would turn them into a silent exit 130, and an EOFError
    into "interrupted"."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise Interrupted("interrupted", _signum(exc)) from None
        except EOFError as exc:  # typer would report it as a Ctrl-C
            raise RuntimeError(f"EOFError: {exc}") from exc

    return wrapper


@app.command()
@_stoppable
def run(
    recipe: Annotated[Path | None, typer.Argument(
        help="The recipe, a YAML file.", show_default=False)] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", show_default=False,
                     help="Change the recipe: loss.num_particles=16, or guide=auto_normal to "
                          "swap a whole component. The value is YAML. Repeatable."),
    ] = None,
    out: Annotated[Path | None, typer.Option(
        help="The run directory (new or empty). Default: runs/<name>-<timestamp>.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    seed: Annotated[int | None, typer.Option(help="The random seed.")] = None,
    steps: Annotated[int | None, typer.Option(help="The number of SVI steps.")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Go on with a stopped run, in its directory, from its last checkpoint.",
        show_default=False)] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads for torch. Default: 1 (or OMP_NUM_THREADS), which gives "
                    "the same numbers run to run and suits small models; more may speed up "
                    "large ones. --resume keeps the run's.")] = None,
) -> None:
    """Run SVI as a recipe says and report the posterior.

    With --resume, go on with a stopped run from its last checkpoint; --steps
    and --set optimizer.* may change (say, a smaller learning rate after a
    divergence).

    Examples:
      vibench run recipes/coin.yaml
      vibench run recipes/coin.yaml --set guide=auto_normal --steps 2000
      vibench run recipes/coin.yaml --set loss.num_particles=16 --out runs/p16
      vibench run --resume runs/coin-20261125-141502 --steps 8000
      vibench run recipes/coin.yaml --threads 1
    """
    from workbench import service
    from workbench.errors import UsageError
    from workbench.plugins.registry import get_registry

    if (recipe is None) == (resume is None):
        raise UsageError("give a RECIPE to run, or --resume RUN_DIR to go on with a run")
    if resume is not None and (out or device or seed is not None):
        raise UsageError("--resume goes on with a run in its own directory, device and seed: "
                         "only --steps and --set optimizer.* may change")
    sets = list(set_ or []) + service.shorthands(device, seed, steps)
    done = service.run_recipe(recipe, sets, out, get_registry(), resume_dir=resume,
                              threads=threads, say=_err, setup=_setup_without_gc)
    if done is None:  # under torchrun, a process other than rank 0
        return
    summary, run_dir = done
    for line in report_lines(summary):
        print(line)
    print(final_line(summary, run_dir))


@app.command("list")
def list_components(
    kind: Annotated[str | None, typer.Argument(
        help=f"Only this kind: {', '.join(KINDS)}.",
        metavar="KIND", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every component by kind, with its plugin, options and description.

    A model also shows the data it takes: the recipe's data keys.

    Examples:
      vibench list
      vibench list guide
      vibench list model --json
    """
    from workbench import service
    from workbench.errors import UsageError, did_you_mean
    from workbench.plugins.registry import get_registry
    from workbench.rundir import jsonsafe

    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r}; {did_you_mean(kind, KINDS)}")
    kinds = [kind] if kind else list(KINDS)
    registry = get_registry()
    listing = service.catalogue(registry, kinds)
    if as_json:
        print(jsonsafe.dumps(listing, indent=2))
        return
    for line in _catalogue_lines(listing, registry, kinds, _text_width()):
        print(line)


def _catalogue_lines(listing: dict, registry: Any, kinds: list[str],
                     columns: int | None) -> list[str]:
    """``vibench list``'s text: per kind, each component's name and wrapped description, its
    options with their defaults and its plugin (and a model's data); then conflicts and
    broken plugins."""

    def shown(default: Any) -> str:
        from workbench.service import json_default

        plain = json_default(default)
        return plain if isinstance(plain, str) and not isinstance(default, str) else repr(plain)

    lines = []
    for k in kinds:
        lines.append(f"{k}:")
        width = max((len(entry["name"]) for entry in listing[k]), default=0)
        for entry in listing[k]:
            lines.append(_wrapped(entry["name"], width, entry["description"], columns))
            if entry.get("built_in"):
                lines.append(f"  {'':<{width}}  options: -; its stages under auto.stages, "
                             f"default {', '.join(entry['stages'])} (vibench list stage)   "
                             "[built in]")
                continue
            component = registry.components[k][entry["name"]]
            options = ", ".join(
                o.name if o.required else f"{o.name}={shown(o.default)}"
                for o in component.options.values()
            )
            lines.append(f"  {'':<{width}}  options: {options or '-'}   "
                         f"[plugin {entry['plugin']}]")
            if entry.get("data_arguments") is not None:
                lines.append(f"  {'':<{width}}  data: "
                             f"{', '.join(entry['data_arguments']) or '-'}")
    lines += [f"conflict: {c['kind']} {c['name']!r} is registered by " + " and ".join(c["plugins"])
              for c in listing["conflicts"]]
    lines += [f"broken: {problem}" for problem in registry.problems]
    return lines


# ``vibench compare``'s options for where its runs go (--backend ray and its settings).
_Backend = Annotated[str, typer.Option(
    metavar="local|ray",
    help="Where the runs go: child processes here, or Ray tasks on a Ray cluster "
         "(pip install 'vibench\\[ray]').")]
_Address = Annotated[str | None, typer.Option(
    show_default=False,
    help="With --backend ray: the cluster to use (as for ray.init; default RAY_ADDRESS, "
         "else a Ray started for this comparison on this machine's cores).")]
_CpusPerRun = Annotated[float | None, typer.Option(
    show_default=False, help="With --backend ray: CPUs each run's task asks for. Default: 1.")]
_GpusPerRun = Annotated[float | None, typer.Option(
    show_default=False, help="With --backend ray: GPUs each run's task asks for (a run "
                             "with device auto uses the one Ray gives it). Default: 0.")]


@app.command()
def compare(
    recipe: Annotated[list[Path], typer.Argument(
        help="The recipe, a YAML file; or several (a suite: each runs with every grid "
             "combination, and the table has a row per recipe).", show_default=False)],
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", metavar="KEY=V1,V2", show_default=False,
                     help="Values to compare: optimizer.lr=0.01,0.05, or guide=beta,auto_normal "
                          "to swap whole components. Each value is YAML, as for --set. "
                          "Repeatable: every combination runs."),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Run each combination with seeds 0..N-1.")] = 1,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", show_default=False,
                     help="Change the recipe for every run (the grid goes on top). Repeatable."),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="The number of SVI steps.")] = None,
    jobs: Annotated[int | None, typer.Option(
        min=1, help="Runs at a time. Default: one per CPU core (with --backend ray: all, "
                     "as the cluster has room).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="The compare directory (new or empty). Default: runs/compare-<name>-<timestamp>.")
    ] = None,
    timeout: Annotated[float | None, typer.Option(
        metavar="SECONDS", show_default=False,
        help="Stop a run that takes longer (SIGTERM: it saves, then is killed if it does not "
             "stop); it is reported as timed out and the others go on. Default: no limit.")
    ] = None,
    backend: _Backend = "local",
    address: _Address = None,
    cpus_per_run: _CpusPerRun = None,
    gpus_per_run: _GpusPerRun = None,
) -> None:
    """Run a recipe (or a suite of recipes) for every combination of --grid values and
    seeds, side by side.

    Each run is a `vibench run` in its own directory; they run in parallel. At
    the end: a table (seeds averaged), compare.csv, compare.png, TensorBoard
    hparams. Ctrl-C stops the runs (each saves); a second Ctrl-C kills them.
    Either way the results so far are written. With --backend ray each run is a
    Ray task on a cluster instead.

    Examples:
      vibench compare recipes/coin.yaml --grid guide=beta,auto_normal
      vibench compare recipes/coin.yaml --grid optimizer.lr=0.01,0.05 --seeds 3
      vibench compare recipes/coin.yaml --grid loss=elbo,renyi_elbo --jobs 2
      vibench compare recipes/coin.yaml --grid loss=elbo,iwae --backend ray --address HOST:6379
      vibench compare packages/vibench-posteriordb/recipes/*.yaml --grid guide=auto,auto_normal
    """
    from workbench.compare.grid import compare as run_compare

    run_compare(recipe, grid or [], set_ or [], seeds, steps, jobs, out, timeout, backend,
                address, cpus_per_run, gpus_per_run)


@app.command()
def runs(
    directory: Annotated[Path, typer.Argument(
        metavar="DIR", help="Where to look: its run directories and its compare "
                            "directories' runs.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: a list, newest first.")
                       ] = False,
) -> None:
    """List the runs in DIR, newest first, with their status and results.

    One line a run: its recipe's name, status, steps, final loss, k-hat, wall
    time and directory. A run is "running" while a vibench process writes it;
    one killed before its first summary shows what its checkpoint says
    (interrupted); one that stopped in set-up, before any checkpoint, is failed.

    Examples:
      vibench runs
      vibench runs runs/compare-coin-20261125-141502
      vibench runs --json
    """
    from workbench import service
    from workbench.rundir import jsonsafe

    found = service.list_runs(directory)
    if as_json:
        print(jsonsafe.dumps(found, indent=2))
        return
    if not found:
        _err(f"no runs in {directory}")
        return
    header = ["name", "status", "steps", "final loss", "k-hat", "wall", "directory"]
    rows = [[info["name"] or "?", info["status"] + (" (report missing)" if info.get(
        "report_missing") else ""), _shown(info["steps"], "d"),
             _shown(info["final_loss"], ".4f"), _shown(info["khat"], ".2f"),
             _duration(info["wall_seconds"]), info["path"]] for info in found]
    for line in _table(header, rows, right={2, 3, 4, 5}):
        print(line)


@app.command()
def show(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="A run directory.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print its summary.json.")] = False,
) -> None:
    """Print a run's report again from its summary.json, computing nothing.

    The lines `vibench run` printed at its end: the posterior, k-hat, the final
    loss. With --json, summary.json as it is.

    Examples:
      vibench show runs/coin-20261125-141502
      vibench show runs/coin-20261125-141502 --json
    """
    from workbench import service
    from workbench.rundir import jsonsafe
    from workbench.rundir import summary as schema

    summary = service.read_summary(run_dir)
    if as_json:
        print(jsonsafe.dumps(summary, indent=2))
        return
    read = schema.read(summary)
    if service.is_running(run_dir):
        _err("note: a vibench process is writing this run; this is its last summary")
    elif read.status != "completed":
        _err(f"note: this run is {read.status}" + (f": {read.error}" if read.error else ""))
    elif read.report_missing:
        _err(f"note: this run is completed (report missing): {read.report_missing}"
             f"; vibench run --resume {run_dir} writes it")
    for line in report_lines(summary):
        print(line)
    print(final_line(summary, run_dir))


@app.command()
@_stoppable
def export(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="A run directory.", show_default=False)],
    trust_code: Annotated[bool, typer.Option(
        "--trust-code", help="Import the code the run's recipe names (file.py:attr); "
                             "without it such a run is refused.")] = False,
) -> None:
    """Write a run's posterior draws as ArviZ InferenceData, posterior.nc in its directory.

    For a run from before every run wrote it: the draws its report would have
    written, from its last checkpoint. For an automatic pipeline's directory: the
    draws of its answer, from its fits' checkpoints, as the pipeline wrote them.
    Read it with arviz.from_netcdf. A run whose recipe names your own code needs
    --trust-code: read recipe.yaml first.

    Examples:
      vibench export runs/coin-20261125-141502
    """
    from workbench import service
    from workbench.plugins.registry import get_registry

    registry = get_registry()
    for problem in registry.problems:
        _err(f"warning: {problem}")
    print(service.export(run_dir, registry, trust_code))


def report_lines(summary: dict, limit: int = 10) -> list[str]:
    """The report's lines, as ``workbench.service.report_lines`` words them for the terminal
    and for Python alike (imported here when asked for: the service stays out of --help)."""
    from workbench.service import report_lines as lines

    return lines(summary, limit)


def final_line(summary: dict, run_dir: Path | str) -> str:
    """The report's last line (``workbench.service.final_line``)."""
    from workbench.service import final_line as line

    return line(summary, run_dir)


def _shown(value: Any, spec: str) -> str:
    """A number for a table, "-" where there is none."""
    return "-" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    """Seconds as 6.2 s, or as 1:02:03 from a minute on."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Rows in columns as wide as their widest cell, the columns in ``right`` (numbers)
    aligned right."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(width) if i in right else cell.ljust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *map(line, rows)]


def _text_width() -> int | None:
    """The width to wrap text to: COLUMNS, else the terminal's; None for a pipe or a file,
    which get each description on one line."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        import shutil

        return shutil.get_terminal_size().columns
    return None


def _wrapped(name: str, width: int, text: str, columns: int | None) -> str:
    """A catalogue entry's first lines: its name, then its description wrapped at spaces to
    ``columns`` (never inside a word), each further line under the first."""
    indent = " " * (width + 4)
    if columns is None:
        return f"  {name:<{width}}  {text}"
    import textwrap

    return textwrap.fill(text, max(columns, len(indent) + 30), initial_indent=indent,
                         subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False).replace(indent, f"  {name:<{width}}  ", 1)


def _leads() -> bool:
    """Whether this process speaks for the run: always, but under torchrun only rank 0."""
    from workbench import distributed

    try:
        return distributed.detect().leader
    except VibenchError:
        return True


# Whether this process is the console script's own (main() sets it): then a run may tune the
# garbage collector for the whole process; an app invoked inside another program (a test's
# CliRunner) leaves it alone.
_OWNS_PROCESS = False


@contextlib.contextmanager
def _setup_without_gc():
    """A run's set-up with Python's cyclic garbage collector off, the objects it leaves frozen,
    and torch.broadcast_shapes without its import of sympy (``seams``), where the process is
    the console script's.

    Importing torch's compiler and tracing the step make some 400,000 objects that live as
    long as the process; each full collection walked all of them again (0.6-0.8 s of a coin
    run), to find next to no garbage: SVI steps make none (measured: none in 2,000 eager
    steps). Frozen, the collector sees only what training and the report make."""
    if not _OWNS_PROCESS or not gc.isenabled():
        yield
        return
    from workbench import seams

    seams.broadcast_shapes_without_sympy()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """The console script: runs the app and turns our errors into one line each and an exit code."""
    global _OWNS_PROCESS
    try:
        _OWNS_PROCESS = True
        signals.install()
        code = invoke(argv)
        signals.finishing()
    except KeyboardInterrupt as exc:  # a stop signal while an error was being reported
        signals.finishing()  # a further one ends the process at once
        cut = _cut_short(exc)
        if cut is None:
            signals.stop_now(_signum(exc))
        code = _report(cut)
    _exit(code)


def invoke(argv: list[str] | None) -> int:
    """Run the command line inside this process (``main`` does, and so can a notebook or a
    test) and return its exit code, each error of ours told in one line; unlike ``main`` it
    neither takes over the stop signals nor exits."""
    try:
        code = app(args=argv, prog_name="vibench", standalone_mode=False)
        if code == 128 + signal.SIGINT and signals.first() is not None:
            raise KeyboardInterrupt  # typer's silent Exit(130) for a signal while it parsed
    except ClickUsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "vibench"
        _err(f"error: {exc.format_message()} (see '{command} --help')")
        code = 2
    except ClickException as exc:
        _err(f"error: {exc.format_message()}")
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt) as exc:  # click makes one in parsing an Abort
        _err("interrupted")
        code = 128 + _signum(exc)
    except VibenchError as exc:
        if os.environ.get("VIBENCH_DEBUG"):
            raise
        code = _report(_cut_short(exc, PeerLost) or exc)
    except Exception as exc:  # a bug, ours or a plugin's: still one line, and how to see more
        if os.environ.get("VIBENCH_DEBUG"):
            raise
        from workbench.errors import one_line

        _err(f"error: unexpected {type(exc).__name__}: {one_line(exc)} (a bug: VIBENCH_DEBUG=1 "
             "shows the traceback; please report it)")
        code = 1
    return code if isinstance(code, int) else 0


def _report(exc: VibenchError) -> int:
    """Tell one of our errors in its lines (under torchrun, an interruption by rank 0 alone)
    and give its exit code."""
    if not getattr(exc, "reported", False):
        prefix = "" if exc.exit_code > 128 else "error: "
        if exc.exit_code <= 128 or _leads():
            for line in exc.lines():
                _err(prefix + line)
        exc.reported = True
    return exc.exit_code


def _cut_short(exc: BaseException, kind: type[VibenchError] = VibenchError
               ) -> VibenchError | None:
    """The error of this ``kind`` that a stop signal cut into, if ``exc`` is that signal and
    came while the error was on its way out: the error says why the run ended. Under torchrun
    a rank that dies is both at once, as torchrun then stops the other ranks."""
    if not isinstance(exc, (KeyboardInterrupt, Interrupted)):
        return None
    seen = exc.__context__
    while seen is not None:
        if isinstance(seen, kind) and not isinstance(seen, Interrupted):
            return seen
        seen = seen.__context__
    return None


def _signum(exc: BaseException) -> int:
    """The stop signal behind a KeyboardInterrupt (or click's Abort made of one): its own, else
    the first this process was sent, else Ctrl-C's."""
    return getattr(exc, "signum", None) or signals.first() or signal.SIGINT


def _exit(code: int) -> None:
    """Exit with ``code``, or with a stop signal's, which is never ignored: one that came while
    the command went on to succeed still ends it as a stop. After a stop signal the process
    ends at once, so no thread left in an import (a plugin's) or exit handler can hang or
    abort its exit."""
    if signals.first() is not None:
        if code == 0:
            _err("interrupted")
            code = 128 + signals.first()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    # Python's last collections at exit would walk every object left, only to drop them all
    # (0.6 s after a compiled run); frozen, they are skipped. Every file is closed by now.
    gc.freeze()
    sys.exit(code)
