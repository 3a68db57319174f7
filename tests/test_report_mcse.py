"""The report's line on the Monte Carlo error of the importance-weighted estimates
(``service.mcse_lines``), for a run and for the automatic pipeline's answer, the weighed
mixture of fits at several modes among them (its MCSEs and its flag)."""

from __future__ import annotations

import math
from pathlib import Path

from tests.helpers import fit, vibench
from workbench import service


def test_a_run_s_report_and_show_say_the_estimates_monte_carlo_error(tmp_path: Path):
    summary, run_dir = fit(tmp_path, "train.steps=200", "train.plots=false",
                           "train.eval_every=0")
    entry = summary["posterior"]["latent_fairness"]
    sd_share = entry["iw_std_mcse"] / entry["iw_std"]
    mean_share = entry["iw_mean_mcse"] / entry["iw_std"]
    # 10,000 draws at nearly equal weights: about 1 / sqrt(2 S) and 1 / sqrt(S)
    assert 0.5 / math.sqrt(2e4) < sd_share < 2 / math.sqrt(2e4)
    assert 0.5 / math.sqrt(1e4) < mean_share < 2 / math.sqrt(1e4)
    expected = (f"MCSE of the importance-weighted estimates, largest: sd +-{sd_share:.1%} of "
                f"itself (latent_fairness), mean +-{mean_share:.3f} posterior sd "
                "(latent_fairness)")
    assert expected in service.report_lines(summary)
    shown = vibench("show", str(run_dir))
    assert shown.returncode == 0 and expected in shown.stdout.splitlines()


def test_no_weights_no_monte_carlo_error_line(tmp_path: Path):
    summary, _ = fit(tmp_path, "train.steps=20", "train.plots=false", "train.eval_every=0",
                     "train.diagnostics=false")
    assert "iw_std_mcse" not in summary["posterior"]["latent_fairness"]
    assert not [line for line in service.report_lines(summary) if line.startswith("MCSE")]


def test_the_weighed_mixture_s_answer_has_its_monte_carlo_error_and_flag(tmp_path: Path,
                                                                         monkeypatch):
    """Fits at two modes answered by their mixture weighed against the model
    (test_overdispersed_starts.py): its entries carry the MCSEs of its weighted moments, and
    its sd, held to a precision no 10,000 draws reach, is flagged or cautioned (by the
    mixture's k-hat) as the other answers' are."""
    from tests.test_overdispersed_starts import exact, run
    from workbench.report import thresholds

    monkeypatch.setattr(thresholds, "SD_MCSE_MAX", 1e-4)
    summary = run(tmp_path, modes=4, light=0.3, max_steps=60, lr=0.05)
    auto = summary["auto"]
    assert auto["answer"] == "weighed mixture"
    entry = summary["posterior"]["x"]
    _, sd = exact(0.3)
    # 10,000 draws, ESS near half of them: mean within a few hundredths of an sd
    assert 0 < entry["iw_mean_mcse"] < 0.05 * sd and 0 < entry["iw_std_mcse"] < 0.05 * sd
    assert entry["iw_std_khat"] < thresholds.KHAT_TRUSTED
    caution = thresholds.sd_caution_only(summary["diagnostics"]["khat"])
    said = auto["cautions"] if caution else auto["flags"]
    assert auto["trusted"] == caution
    noisy = [line for line in said if "is not known to +-" in line]
    assert noisy and noisy[0].startswith("the sd of x")
    worst = max((e["iw_std_mcse"] / e["std"], site) for site, e in summary["posterior"].items())
    line = [line for line in service.report_lines(summary) if line.startswith("MCSE")]
    assert line and f"sd +-{worst[0]:.1%} of itself ({worst[1]})" in line[0]
