"""Time how long the vibench CLI takes to start, beside the cost of importing torch.

``vibench --help`` and ``vibench list`` should not import torch (only ``run`` does); this
prints the median wall time of each command over a few runs, and checks the import directly.

    python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NO_TORCH_CHECK = """\
import sys
from workbench.cli import main
for argv in (["--help"], ["list"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("torch" in sys.modules, file=sys.stderr)
"""


def vibench_command() -> list[str]:
    """The ``vibench`` console script beside this interpreter, or the CLI through ``-c``."""
    script = Path(sys.executable).with_name("vibench")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from workbench.cli import main; main()"]


def median_seconds(command: list[str], repeats: int) -> float:
    """Median wall time of ``command`` over ``repeats`` runs, after one untimed warm-up run."""
    times = []
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        if attempt:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def imports_torch() -> bool:
    """Whether ``vibench --help`` and ``vibench list`` import torch, asked in a fresh process."""
    done = subprocess.run([sys.executable, "-c", NO_TORCH_CHECK], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return done.stderr.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs each (default 5)")
    args = parser.parse_args()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "vibench --help": vibench_command() + ["--help"],
        "vibench list": vibench_command() + ["list"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    print(f"median wall time of {args.repeats} runs each")
    for label, command in commands.items():
        print(f"  {label:<26}{median_seconds(command, args.repeats):6.3f} s")
    print(f"torch imported by vibench --help / list: {'yes' if imports_torch() else 'no'}")


if __name__ == "__main__":
    main()
