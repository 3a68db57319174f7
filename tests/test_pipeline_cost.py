"""What the automatic pipeline leaves out because it does not pay: the Laplace start and the
mode searches make their L-BFGS without importing torch._dynamo (a second or more of an
eager process, to guard against a tracer that is not running)."""

from __future__ import annotations

from tests.helpers import python


def test_the_mode_search_s_lbfgs_imports_no_dynamo():
    probe = ("import sys, torch\n"
             "from vibench_plugins.laplace import descend\n"
             "fit = descend(lambda x: ((x - 1) ** 2).sum(), torch.zeros(3), True)\n"
             "print(fit.converged, [round(v, 4) for v in fit.point.tolist()],\n"
             "      'torch._dynamo' in sys.modules)")
    done = python(probe)
    assert done.stdout.strip() == "True [1.0, 1.0, 1.0] False", done.stderr
