"""``vibench run`` sets up with the cyclic garbage collector off and freezes what set-up
made, but only in the console script's own process: an app invoked inside another program
(a test's CliRunner, a notebook) keeps its collector as it was."""

from __future__ import annotations

import gc

import pytest

from workbench import cli


@pytest.fixture
def restore_gc():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_the_console_script_sets_up_without_collections_then_freezes(monkeypatch, restore_gc):
    monkeypatch.setattr(cli, "_OWNS_PROCESS", True)
    gc.enable()
    with cli._setup_without_gc():
        assert not gc.isenabled()
        made = [[]]
        made[0].append(made)  # a cycle made during set-up
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0
    assert not any(obj is made for obj in gc.get_objects())  # frozen: never walked again


def test_a_set_up_that_fails_leaves_the_collector_on(monkeypatch, restore_gc):
    monkeypatch.setattr(cli, "_OWNS_PROCESS", True)
    gc.enable()
    with pytest.raises(ValueError), cli._setup_without_gc():
        raise ValueError("bad recipe")
    assert gc.isenabled()


def test_an_app_inside_another_program_leaves_the_collector_alone(restore_gc):
    assert not cli._OWNS_PROCESS
    gc.enable()
    frozen = gc.get_freeze_count()
    with cli._setup_without_gc():
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
