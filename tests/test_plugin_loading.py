"""Plugins and options that misbehave must neither take vibench down nor make it lie.

Each case was found by an adversarial tester. Plugins that act at import are real packages,
pip-installed into a private directory (``tests/plugin_packages.py``); hooks and
factories are tested in process, on a plugin manager holding only the plugin under test.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pluggy
import pytest
import torch

from tests.helpers import COIN, REPO
from tests.helpers import vibench as run_vibench
from tests.plugin_packages import (
    by_name,
    pip_install,
    plugin_env,
    vibench,
    vibench_script,
    write_package,
)
from workbench import hookimpl, hookspecs
from workbench.config.options import Option, read_options
from workbench.errors import UsageError, did_you_mean
from workbench.plugins.registry import collect


def manager(*plugins: object) -> pluggy.PluginManager:
    """A plugin manager with vibench's hook specs and only ``plugins``, each under its own name."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        pm.register(plugin, name=type(plugin).__name__)
    return pm


def listing_of(site: Path) -> dict:
    """``vibench list --json`` with the plugins in ``site``: it must succeed and print JSON."""
    result = vibench("list", "--json", site=site)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return strict_json(result.stdout)


def strict_json(text: str) -> dict:
    """JSON as a strict reader takes it: a bare NaN or Infinity is an error."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# -- the plugin packages ---------------------------------------------------------------


ARRAY_DEFAULTS_SOURCE = '''
    import numpy
    import torch

    from workbench import hookimpl


    @hookimpl
    def register_models(register):
        register("tp_array_model", array_model)


    def array_model(loc=torch.zeros(3), weights=numpy.ones(2), scale: float = 1.0):
        """A model whose defaults are a tensor and an array."""


    @hookimpl
    def register_losses(register):
        register("tp_nan_loss", nan_loss)


    def nan_loss(delta: float = float("nan"), cap: float = float("inf")):
        """A loss whose defaults are not finite."""
'''

GREEDY_SOURCE = '''
    from workbench import hookimpl


    @hookimpl
    def register_models(register, device):
        register("tp_greedy_model", device)
'''

NOISY_SOURCE = '''
    import sys

    from workbench import hookimpl

    print("hello from tp_noisy at import")


    @hookimpl
    def register_models(register):
        sys.stdout.write("hello from tp_noisy.register_models\\n")
        register("tp_noisy_model", noisy_model)


    def noisy_model(scale: float = 1.0):
        """A model from a plugin that prints."""
'''

CTRL_C_SOURCE = '''
    raise KeyboardInterrupt
'''

SLEEPY_SOURCE = '''
    import os
    import pathlib
    import time

    marker = os.environ.get("TP_SLEEPY_MARKER")
    if marker:
        pathlib.Path(marker).write_text("importing")
    time.sleep(3)
    print("LATE OUTPUT from tp_sleepy")
    time.sleep(600)
'''


@pytest.fixture(scope="module")
def odd_site(tmp_path_factory):
    """Plugins that are odd but not broken: they must be listed, and listed truthfully."""
    root = tmp_path_factory.mktemp("odd")
    packages = [
        write_package(root / "src", "vibench-tp-arrays", "tp_arrays", "tp_arrays",
                      ARRAY_DEFAULTS_SOURCE),
    ]
    return pip_install(packages, root / "site")


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory):
    """Plugins that misbehave at import or in their hooks, each to be named as broken."""
    root = tmp_path_factory.mktemp("bad")
    packages = [
        write_package(root / "src", "vibench-tp-greedy", "tp_greedy", "tp_greedy",
                      GREEDY_SOURCE),
        write_package(root / "src", "vibench-tp-noisy", "tp_noisy", "tp_noisy", NOISY_SOURCE),
        write_package(root / "src", "vibench-tp-ctrl-c", "tp_ctrl_c", "tp_ctrl_c",
                      CTRL_C_SOURCE),
    ]
    return pip_install(packages, root / "site")


@pytest.fixture(scope="module")
def sleepy_site(tmp_path_factory):
    """A plugin whose import blocks, printing to stdout after 3 s."""
    root = tmp_path_factory.mktemp("sleepy")
    package = write_package(root / "src", "vibench-tp-sleepy", "tp_sleepy", "tp_sleepy",
                            SLEEPY_SOURCE)
    return pip_install([package], root / "site")


# -- an array or tensor default ----------------------------------------------------------


def tensor_and_array_defaults(loc=torch.zeros(3), weights=np.ones(2), scale=1.5):
    """A factory whose defaults cannot be compared with ==."""


def test_array_and_tensor_defaults_are_options_of_any_value():
    options, _, _ = read_options(tensor_and_array_defaults, frozenset())
    assert list(options) == ["loc", "weights", "scale"]
    for name in ("loc", "weights"):
        assert not options[name].required
        assert options[name].type_name() == "any value"
        assert options[name].accepts([1.0, 2.0, 3.0])
    assert options["scale"].type_name() == "float"


class ArrayDefaults:
    @hookimpl
    def register_guides(self, register):
        register("array_guide", tensor_and_array_defaults)


def test_component_with_array_defaults_is_registered():
    registry = collect(manager(ArrayDefaults()))
    assert registry.problems == []
    assert registry.get("guide", "array_guide").options["loc"].default is not None


def test_list_shows_array_defaults_as_their_repr(odd_site):
    found = listing_of(odd_site)
    assert found["broken"] == []
    options = by_name(found["model"])["tp_array_model"]["options"]
    assert options["loc"] == {"default": "tensor([0., 0., 0.])", "required": False,
                              "type": "any value"}
    assert options["weights"] == {"default": "array([1., 1.])", "required": False,
                                  "type": "any value"}

    text = vibench("list", site=odd_site)
    assert text.returncode == 0, text.stderr
    assert "options: loc=tensor([0., 0., 0.]), weights=array([1., 1.]), scale=1.0" in text.stdout


# -- non-finite option values ------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
def test_float_options_refuse_non_finite_numbers(value):
    option = Option("lr", 0.001, float)
    assert not option.accepts(value)
    assert option.refusal(value) == f"expected a finite number, got {value!r}"
    assert not Option("lr", None, float | None).accepts(value)
    assert Option("lr", 0.001, float).accepts(1e300)


def test_list_of_floats_refuses_a_non_finite_item():
    option = Option("betas", (0.9, 0.999), tuple[float, float])
    assert not option.accepts([0.9, math.nan])
    assert "finite" in option.refusal([0.9, math.nan])
    assert option.refusal([0.9]) == "expected list of 2 float/float, got [0.9]"


def test_a_non_finite_default_still_fits_so_a_saved_recipe_runs_again():
    assert Option("max_norm", math.inf, float).accepts(math.inf)
    assert Option("delta", math.nan, float).accepts(math.nan)
    assert not Option("max_norm", math.inf, float).accepts(-math.inf)


@pytest.mark.parametrize("key, value", [("optimizer.lr", ".inf"),
                                        ("train.early_stop_min_delta", ".nan"),
                                        ("guide.init_alpha", "-.inf")])
def test_recipe_with_non_finite_number_is_refused_before_training(key, value, tmp_path):
    out = tmp_path / "run"
    result = run_vibench("run", str(COIN), "--set", f"{key}={value}", "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and "expected a finite number" in lines[0], result.stderr
    assert not out.exists()


# -- vibench list --json with a NaN default ---------------------------------------------


def test_list_json_writes_non_finite_defaults_as_null(odd_site):
    options = by_name(listing_of(odd_site)["loss"])["tp_nan_loss"]["options"]
    assert options["delta"] == {"default": None, "required": False, "type": "float"}
    assert options["cap"]["default"] is None


# -- an unknown name among very many -----------------------------------------------------


def test_did_you_mean_names_a_few_of_many_choices():
    names = [f"guide_{i:05d}" for i in range(10_000)]
    hint = did_you_mean("zzz", names, see="'vibench list guide'")
    assert len(hint) < 300, hint
    assert hint.startswith("choose from guide_00000, ")
    assert hint.endswith("... and 9990 more; see 'vibench list guide'")
    assert did_you_mean("guide_0042x", names).startswith("did you mean 'guide_")
    assert did_you_mean("zzz", names[:20]) == "choose from " + ", ".join(names[:20])


class ManyGuides:
    @hookimpl
    def register_guides(self, register):
        for i in range(10_000):
            register(f"guide_{i:05d}", tensor_and_array_defaults)


def test_unknown_name_among_ten_thousand_is_one_short_line():
    registry = collect(manager(ManyGuides()))
    assert len(registry.names("guide")) == 10_000
    with pytest.raises(UsageError) as caught:
        registry.get("guide", "zzz")
    message = str(caught.value)
    assert len(message) < 400 and "\n" not in message, message
    assert "9990 more; see 'vibench list guide'" in message


def test_list_one_kind():
    result = run_vibench("list", "schedule", "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert set(found) == {"schedule", "conflicts", "broken"}
    assert "exponential" in by_name(found["schedule"])

    text = run_vibench("list", "schedule")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("schedule:\n") and "model:" not in text.stdout

    wrong = run_vibench("list", "guid")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "error: unknown kind 'guid'; did you mean 'guide'?"


# -- what a hook is given ----------------------------------------------------------------


class QuietHooks:
    """Hooks that take no register, or a further argument with a default: both are valid."""

    seen: list = []

    @hookimpl
    def register_models(self):
        QuietHooks.seen.append("no arguments")

    @hookimpl
    def register_guides(self, register, prefix="quiet_"):
        QuietHooks.seen.append(prefix)
        register(prefix + "guide", tensor_and_array_defaults)


def test_register_goes_only_to_the_argument_named_register():
    registry = collect(manager(QuietHooks()))
    assert registry.problems == []
    assert QuietHooks.seen == ["no arguments", "quiet_"]
    assert registry.names("guide") == ["quiet_guide"]


def test_hook_asking_for_more_than_register_is_refused_by_pluggy():
    class Greedy:
        @hookimpl
        def register_models(self, register, device):
            register("greedy", device)

    with pytest.raises(pluggy.PluginValidationError, match="device"):
        manager(Greedy())


def test_hook_asking_for_more_than_register_is_a_broken_plugin(bad_site):
    found = listing_of(bad_site)
    greedy = [b for b in found["broken"] if b["plugin"] == "tp_greedy"]
    assert len(greedy) == 1, found["broken"]
    assert "device" in greedy[0]["error"] and "register_models" in greedy[0]["error"]
    assert "tp_greedy_model" not in by_name(found["model"])
    assert "beta_bernoulli" in by_name(found["model"])


# -- a plugin that prints to stdout ------------------------------------------------------


def test_plugin_printing_to_stdout_leaves_list_json_intact(bad_site):
    result = vibench("list", "--json", site=bad_site)
    assert result.returncode == 0, result.stderr
    found = strict_json(result.stdout)
    assert by_name(found["model"])["tp_noisy_model"]["plugin"] == "tp_noisy"
    assert not [b for b in found["broken"] if b["plugin"] == "tp_noisy"]
    warnings = [l for l in result.stderr.splitlines() if l.startswith("warning: plugin 'tp_noisy'")]
    assert len(warnings) == 2, result.stderr
    assert "importing tp_noisy.plugin" in warnings[0]
    assert "hello from tp_noisy at import" in warnings[0]
    assert "register_models" in warnings[1] and "hello from tp_noisy.register_models" in warnings[1]


class Chatty:
    @hookimpl
    def register_guides(self, register):
        print("chatty says hi")
        register("chatty_guide", tensor_and_array_defaults)


def test_hook_output_goes_to_stderr(capsys):
    registry = collect(manager(Chatty()))
    assert registry.names("guide") == ["chatty_guide"]
    out, err = capsys.readouterr()
    assert out == ""
    assert "warning: plugin 'Chatty' printed to stdout while register_guides" in err
    assert "chatty says hi" in err
    assert type(sys.stdout).__name__ != "_RoutedStdout"  # stdout is given back


# -- a plugin that raises KeyboardInterrupt itself ---------------------------------------


def test_keyboard_interrupt_at_import_is_a_broken_plugin(bad_site):
    found = listing_of(bad_site)
    ctrl_c = [b for b in found["broken"] if b["plugin"] == "tp_ctrl_c"]
    assert len(ctrl_c) == 1, found["broken"]
    assert "KeyboardInterrupt" in ctrl_c[0]["error"] and "tp_ctrl_c.plugin" in ctrl_c[0]["where"]

    text = vibench("list", site=bad_site)
    assert text.returncode == 0, text.stderr
    assert any(l.startswith("broken: plugin 'tp_ctrl_c'") for l in text.stdout.splitlines())


class InterruptingHook:
    @hookimpl
    def register_losses(self, register):
        raise KeyboardInterrupt


def test_keyboard_interrupt_in_a_hook_is_a_plugin_problem():
    registry = collect(manager(InterruptingHook(), ArrayDefaults()))
    assert [(p.plugin, p.where) for p in registry.problems] == [
        ("InterruptingHook", "register_losses")]
    assert "KeyboardInterrupt" in registry.problems[0].error
    assert registry.names("guide") == ["array_guide"]


# -- a plugin that blocks ----------------------------------------------------------------


def test_plugin_that_blocks_at_import_is_left_behind(sleepy_site):
    started = time.monotonic()
    result = vibench("list", "--json", site=sleepy_site, env={"VIBENCH_PLUGIN_TIMEOUT": "1"},
                     timeout=60)
    assert time.monotonic() - started < 30  # it does not wait the plugin's 600 s to exit
    assert result.returncode == 0, result.stderr
    found = strict_json(result.stdout)
    sleepy = [b for b in found["broken"] if b["plugin"] == "tp_sleepy"]
    assert len(sleepy) == 1, found["broken"]
    assert "tp_sleepy.plugin" in sleepy[0]["where"]
    assert "did not finish importing within 1 s" in sleepy[0]["error"]
    assert "VIBENCH_PLUGIN_TIMEOUT" in sleepy[0]["error"]
    assert "beta_bernoulli" in by_name(found["model"])


def test_run_goes_on_without_a_blocked_plugin_and_keeps_its_late_output_off_stdout(
        sleepy_site, tmp_path):
    out = tmp_path / "run"
    result = vibench("run", str(COIN), "--steps", "20", "--out", str(out), site=sleepy_site,
                     env={"VIBENCH_PLUGIN_TIMEOUT": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert any(l.startswith("warning: plugin 'tp_sleepy'") and "within 1 s" in l
               for l in result.stderr.splitlines()), result.stderr
    assert "latent_fairness:" in result.stdout
    assert "LATE OUTPUT" not in result.stdout + result.stderr  # printed after the plugin's 3 s
    assert (out / "summary.json").exists()


def test_ctrl_c_while_a_plugin_loads_exits_130_naming_it(sleepy_site, tmp_path):
    marker = tmp_path / "importing"
    env = {**plugin_env(sleepy_site), "TP_SLEEPY_MARKER": str(marker)}
    child = subprocess.Popen(
        [vibench_script(), "list"], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "the plugin never started importing"
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        "interrupted while loading plugin 'tp_sleepy' (importing tp_sleepy.plugin)"], stderr
    assert stdout == ""


class SlowHook:
    """A hook that overruns the time limit, then registers once more and says so."""

    def __init__(self):
        self.done = threading.Event()

    @hookimpl
    def register_guides(self, register):
        register("slow_early", tensor_and_array_defaults)
        time.sleep(1)
        register("slow_late", tensor_and_array_defaults)
        self.done.set()

    @hookimpl
    def register_losses(self, register):
        register("slow_loss", tensor_and_array_defaults)


def test_hook_that_overruns_is_left_out_with_the_plugins_later_hooks(monkeypatch):
    monkeypatch.setenv("VIBENCH_PLUGIN_TIMEOUT", "0.2")
    slow = SlowHook()
    registry = collect(manager(slow, ArrayDefaults()))
    assert [(p.plugin, p.where) for p in registry.problems] == [("SlowHook", "register_guides")]
    assert "did not return within 0.2 s" in registry.problems[0].error
    assert registry.names("guide") == ["array_guide"]
    assert registry.names("loss") == []
    assert slow.done.wait(60)  # the hook goes on in its thread and registers late: not taken
    assert registry.names("guide") == ["array_guide"]


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_a_bad_timeout_setting_is_warned_about(monkeypatch, capsys, value):
    from workbench.plugins.registry import PLUGIN_TIMEOUT, plugin_timeout

    monkeypatch.setenv("VIBENCH_PLUGIN_TIMEOUT", value)
    assert plugin_timeout() == PLUGIN_TIMEOUT
    assert "VIBENCH_PLUGIN_TIMEOUT" in capsys.readouterr().err
    monkeypatch.setenv("VIBENCH_PLUGIN_TIMEOUT", "2.5")
    assert plugin_timeout() == 2.5


# -- tracing -----------------------------------------------------------------------------


def test_trace_plugins_says_what_each_plugin_does_on_stderr(bad_site):
    result = vibench("list", "--json", site=bad_site, env={"VIBENCH_TRACE_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr
    strict_json(result.stdout)
    trace = [l for l in result.stderr.splitlines() if l.startswith("trace: ")]
    assert "trace: plugin 'vibench.models': importing vibench_plugins.models ..." in trace
    assert any(l.startswith("trace: plugin 'tp_noisy': register_models: done") for l in trace)
    assert any(l.startswith("trace: plugin 'tp_ctrl_c': importing tp_ctrl_c.plugin: raised "
                            "KeyboardInterrupt") for l in trace), trace
