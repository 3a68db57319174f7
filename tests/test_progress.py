"""Silent work says what it is doing: a spinner with the seconds so far on a terminal, which
ends cleanly however the work ends; elsewhere one line."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from tests.helpers import REPO

# rich's "dots" spinner, the one progress.working shows
FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
SHOW_CURSOR = "\x1b[?25h"

# The child: works inside progress.working until the parent writes a byte to its pipe (or
# signals it), then fails if asked; says how it ended on a line of its own.
CHILD = """
import os, sys
from workbench import progress, signals
signals.install()
how, go = sys.argv[1], int(sys.argv[2])
try:
    with progress.working("compiling the thing", "compiled the thing in {seconds:.0f} s"):
        os.read(go, 1)
        if how == "fail":
            raise RuntimeError("it broke")
    print("ended: done", file=sys.stderr)
except RuntimeError as exc:
    print(f"ended: fell back after {exc}", file=sys.stderr)
except signals.Signalled as exc:
    print(f"ended: stopped by {exc}", file=sys.stderr)
"""


def on_a_terminal(how: str, then, code: str = CHILD, env: dict | None = None) -> str:
    """``code``'s output on a pseudo-terminal of 60 columns, narrower than the line;
    ``then(child, go)`` runs once two different spinner frames have appeared. Returns
    everything the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    go_read, go = os.pipe()
    env_extra = env
    env = {key: value for key, value in os.environ.items()
           if key not in ("NO_COLOR", "TTY_COMPATIBLE", "JUPYTER_COLUMNS", "COLUMNS", "LINES")}
    child = subprocess.Popen([sys.executable, "-c", code, how, str(go_read)], cwd=REPO,
                             stdin=slave, stdout=slave, stderr=slave, pass_fds=(go_read,),
                             env={**env, "TERM": "xterm-256color", **(env_extra or {})})
    os.close(slave)
    os.close(go_read)
    out, acted = b"", False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # every end of the terminal is closed: the child has ended
                break
            if not chunk:
                break
            out += chunk
            seen = {c for c in out.decode(errors="replace") if c in FRAMES}
            if not acted and len(seen) >= 2:
                then(child, go)
                acted = True
    finally:
        os.close(master)
        os.close(go)
        child.wait(timeout=60)
    assert acted, f"no spinner frames: {out!r}"
    return out.decode(errors="replace")


def finish(child, go):
    os.write(go, b"x")


def test_a_spinner_turns_on_a_terminal_then_leaves_the_line_with_its_time():
    out = on_a_terminal("done", finish)
    assert "compiling the thing" in out
    after = out[out.rindex(SHOW_CURSOR):]  # the spinner gone, the cursor back
    assert "compiled the thing in " in after and " s" in after
    assert not set(after) & set(FRAMES) and "ended: done" in after


@pytest.mark.parametrize("how, then, ended", [
    ("fail", finish, "ended: fell back after it broke"),
    ("done", lambda child, go: child.send_signal(signal.SIGINT), "ended: stopped by SIGINT"),
])
def test_a_spinner_ends_cleanly_on_a_failure_and_on_a_stop_signal(how, then, ended):
    """What handles the failure or the stop says so; the spinner leaves nothing behind."""
    out = on_a_terminal(how, then)
    after = out[out.rindex(SHOW_CURSOR):]
    assert ended in after and "compiled the thing" not in out
    assert not set(after) & set(FRAMES)


def test_off_a_terminal_only_the_line():
    go_read, go = os.pipe()
    os.write(go, b"x")
    done = subprocess.run([sys.executable, "-c", CHILD, "done", str(go_read)], cwd=REPO,
                          pass_fds=(go_read,), capture_output=True, text=True, timeout=120)
    os.close(go_read)
    os.close(go)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "compiling the thing\nended: done\n"


# A run set up with train.compile: auto whose compiler breaks after the step is traced.
BROKEN_COMPILE = """
import sys
import torch._inductor
from tests.helpers import setup
from workbench.compile import package_cache

def broken(*args, **kwargs):
    raise RuntimeError("inductor broke")

package_cache.build = torch._inductor.standalone_compile = broken
run = setup("train.compile=auto", "train.steps=100000", "train.eval_every=0")
print("notes:", run.notes, file=sys.stderr)
"""


def test_a_failed_compile_stops_the_spinner_and_the_run_says_it_trains_eagerly(tmp_path):
    out = on_a_terminal("", lambda child, go: None, BROKEN_COMPILE,
                        {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert "compiling the step (" in out and "compiled the step" not in out
    after = out[out.rindex(SHOW_CURSOR):]
    assert not set(after) & set(FRAMES)
    assert "notes: ['training eagerly, not compiled: torch.compile failed: inductor broke']" \
        in after
