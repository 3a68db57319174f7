"""The suite's environment (one thread, no GPU, eager steps) and its fixtures; the functions
tests share are in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Tests run two at a time (pytest-xdist): one thread each keeps them from fighting over the
# cores, in this process and in every vibench child it starts. Results do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The suite trains on the CPU, where the device is not the point, so a GPU machine runs it in
# the same time and with the same random streams; tests/test_gpu.py gives the GPU back to the
# vibench children it starts (``vibench(..., gpu=True)``).
# The machine's own setting is kept for pytest-xdist's workers, which inherit the hidden one.
os.environ.setdefault("VIBENCH_TEST_GPUS", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Runs are eager unless a test asks for train.compile (tests/test_compile.py does): a fresh CI
# machine meets a cold compile cache, tens of seconds per graph, which would be most of the
# suite's time. The eager step is the reference every compiled one is tested against.
os.environ["VIBENCH_COMPILE"] = "false"
# Nor does a run start a compile for later runs in the background unless a test asks
# (tests/test_compile_later.py does).
os.environ["VIBENCH_BACKGROUND_COMPILE"] = "false"

# Compiled steps go to an inductor cache of the session's own, which its xdist workers share
# and which is removed after it: no test meets the machine's earlier packages, or a failure
# note another run left there (a build that broke while torch was being reinstalled, say),
# and the suite leaves nothing in the user's cache.
WORKER = "PYTEST_XDIST_WORKER" in os.environ
if not WORKER:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="vibench-tests-inductor-")

from tests.helpers import vibench  # noqa: E402


def pytest_unconfigure(config: pytest.Config) -> None:
    if not WORKER:
        shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def run_vibench():
    return vibench


@pytest.fixture
def float64():
    """torch's default dtype float64 for one test, with an empty Pyro parameter store."""
    import pyro
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(previous)
    pyro.clear_param_store()



@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the tests sharing a test module's module-scoped fixture in one xdist group, so that
    ``--dist loadgroup`` builds the fixture once rather than once on each worker."""
    for item in items:
        module = item.getparent(pytest.Module).nodeid
        if not item.get_closest_marker("xdist_group"):
            for name, defs in item._fixtureinfo.name2fixturedefs.items():
                if defs[-1].scope == "module" and defs[-1].baseid == module:
                    item.add_marker(pytest.mark.xdist_group(f"{module}::{name}"))
                    break
    if getattr(config.option, "loadgroup", False):  # set on xdist workers by --dist loadgroup
        name_the_groups(items)
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONG_FIRST)  # stable


# Modules whose tests wait on child processes (torchrun, Ray, compare, signals) or fit for
# tens of seconds: handed out first, so that the two workers finish together rather than
# one waiting while the other runs a long group at the end.
LONG_FIRST = {"tests/test_distributed.py", "tests/test_compare_ray.py",
              "tests/test_compare_signals.py", "tests/test_compare.py",
              "tests/adversarial/test_stop_anywhere.py", "tests/adversarial/test_advice.py",
              "tests/test_user_model.py", "tests/test_run.py"}


def name_the_groups(items: list[pytest.Item]) -> None:
    """End each grouped test's node id with ``@group``, which is how the xdist controller
    learns the groups: pytest-xdist 3.8 sets the old ``_nodeid`` that pytest 9 no longer reads,
    so without this every ``xdist_group`` is ignored."""
    from _pytest.nodeid import NodeId

    for item in items:
        mark = item.get_closest_marker("xdist_group")
        if mark is None or item.nodeid.rfind("@") > item.nodeid.rfind("]"):
            continue
        group = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
        item._id = NodeId.parse(f"{item.nodeid}@{group}")
