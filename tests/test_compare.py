"""``vibench compare``: a grid of settings times seeds, each a real ``vibench run`` child."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from tests.helpers import COIN, REPO, read_csv, vibench
from workbench.compare.metrics import METRICS, combined, metrics, untrusted
from workbench.compare.plan import Spec, parse_grid
from workbench.compare.plot import from_best, write_plot
from workbench.compare.results import Result, group
from workbench.compare.table import CSV_TAIL, print_table, write_csv
from workbench.errors import UsageError

# Each run's own plots, which no test here reads (compare.png is compare's).
NO_PLOTS = ("--set", "train.plots=false")


def session_hparams(run_dir: Path) -> dict:
    """The hparams of the TensorBoard HParams session in a run directory, read with
    TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    assert metadata.SESSION_END_INFO_TAG in content
    assert metadata.EXPERIMENT_TAG not in content  # TensorBoard builds it from the sessions
    scalars = acc.Tags()["scalars"]
    assert "Train/loss" in scalars  # the run's own events are intact beside the hparams
    assert {"hparam/final_loss", "hparam/mean_error", "hparam/std_error",
            "hparam/steps_per_second", "hparam/elbo", "hparam/log_evidence",
            "hparam/mean_error_sd", "hparam/sd_ratio"} <= set(scalars)
    return {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for name, value in start.hparams.items()}


def test_a_grid_runs_every_combination_and_reports_them(tmp_path: Path):
    out = tmp_path / "cmp"
    result = vibench("compare", str(COIN), "--grid", "guide=beta,auto_normal",
                     "--grid", "loss.num_particles=1,4", "--steps", "30", *NO_PLOTS,
                     "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    names = {f"guide={g},loss.num_particles={n},seed=0" for g in ("beta", "auto_normal")
             for n in (1, 4)}
    assert {p.name for p in out.iterdir() if p.is_dir()} == names
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 30
        assert {"elbo", "elbo_se", "log_evidence", "log_evidence_se"} <= set(
            summary["diagnostics"])
        guide, particles = name.split(",")[:2]
        assert summary["recipe"]["guide"]["name"] == guide.split("=")[1]
        assert summary["recipe"]["loss"]["num_particles"] == int(particles.split("=")[1])
        assert (out / name / "stderr.txt").is_file()
    # a whole-component swap leaves none of the Beta guide's options behind
    swapped = json.loads((out / "guide=auto_normal,loss.num_particles=1,seed=0" /
                          "summary.json").read_text())
    assert "init_alpha" not in swapped["recipe"]["guide"]

    rows = read_csv(out / "compare.csv")
    assert len(rows) == 4
    assert list(rows[0]) == ["guide", "loss.num_particles", *CSV_TAIL]
    assert {(r["guide"], r["loss.num_particles"]) for r in rows} == {
        (g, n) for g in ("beta", "auto_normal") for n in ("1", "4")}
    for row in rows:
        assert row["status"] == "ok" and row["seed"] == "0" and row["error"] == ""
        assert float(row["final_loss"]) > 0
        assert 0 <= float(row["mean_error"]) < 0.2 and 0 <= float(row["std_error"]) < 0.2
        assert float(row["elbo"]) < float(row["log_evidence"]) < 0
        assert float(row["log_evidence_se"]) > 0 and float(row["mean_error_sd"]) >= 0
    # 30 steps leave auto_normal's sd far too small: k-hat says so, and compare marks it
    for row in rows:
        bad = row["guide"] == "auto_normal"
        assert (float(row["khat"]) > 0.7) == bad
        assert (row["khat_reading"] == "bad: do not trust") == bad
        assert (float(row["sd_ratio"]) < 0.5) == bad

    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for header in ("guide", "loss.num_particles", "ELBO", "log evidence", "mean error / sd",
                   "sd ratio", "k-hat", "train loss", "steps/s", "wall s"):
        assert header in result.stdout
    table_rows = [line for line in result.stdout.splitlines() if "auto_normal" in line]
    assert len(table_rows) == 2 and all("ok" in line and " ! " in line for line in table_rows)
    assert not any(" ! " in line for line in result.stdout.splitlines()
                   if line.strip().startswith("beta"))
    assert "! k-hat > 0.7 in at least one seed: do not trust this fit" in result.stdout
    assert f"compare.csv: {out / 'compare.csv'}" in result.stdout
    assert f"compare.png: {out / 'compare.png'}" in result.stdout
    assert "4 runs" in result.stderr

    hparams = session_hparams(out / "guide=beta,loss.num_particles=4,seed=0")
    assert hparams == {"guide": "beta", "loss.num_particles": 4.0, "seed": 0.0}


def test_a_failing_combination_is_reported_and_the_others_complete(tmp_path: Path):
    out = tmp_path / "cmp"
    result = vibench("compare", str(COIN), "--grid", "loss=elbo,analytic_kl_elbo",
                     "--set", "guide=auto_normal", "--steps", "30", *NO_PLOTS, "--out", str(out),
                     cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 runs failed")
    rows = {r["loss"]: r for r in read_csv(out / "compare.csv")}
    assert rows["elbo"]["status"] == "ok" and rows["elbo"]["error"] == ""
    failed = rows["analytic_kl_elbo"]
    assert failed["status"] == "failed" and failed["exit_code"] == "2"
    assert failed["error"].startswith("error: model 'beta_bernoulli', guide 'auto_normal' and "
                                      "loss 'analytic_kl_elbo' do not work together")
    assert failed["final_loss"] == ""
    assert (out / "loss=elbo,seed=0" / "summary.json").is_file()
    assert "do not work together" in (out / "loss=analytic_kl_elbo,seed=0" /
                                      "stderr.txt").read_text()
    assert "failed: model 'beta_bernoulli'" in result.stdout  # in the table
    assert (out / "compare.png").is_file()
    session_hparams(out / "loss=elbo,seed=0")


def test_seeds_multiply_the_runs_and_a_name_grid_keeps_options(tmp_path: Path):
    """--seeds 2 runs each combination twice. ``guide.name=...`` keeps the Beta guide's
    options: auto_normal cannot take them, so those runs fail (found before any child starts)
    while beta's run."""
    out = tmp_path / "cmp"
    result = vibench("compare", str(COIN), "--grid", "guide.name=beta,auto_normal",
                     "--seeds", "2", "--steps", "10", *NO_PLOTS, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    rows = read_csv(out / "compare.csv")
    assert [(r["guide.name"], r["seed"], r["status"]) for r in rows] == [
        ("beta", "0", "ok"), ("beta", "1", "ok"),
        ("auto_normal", "0", "failed"), ("auto_normal", "1", "failed")]
    assert "guide 'auto_normal' has no option 'init_" in rows[2]["error"]
    seeds = [json.loads((out / f"guide.name=beta,seed={s}" / "summary.json").read_text())
             ["recipe"]["seed"] for s in (0, 1)]
    assert seeds == [0, 1]
    assert session_hparams(out / "guide.name=beta,seed=1") == {"guide.name": "beta",
                                                               "seed": 1.0}
    assert "2/2" in result.stdout and "0/2" in result.stdout  # the table aggregates seeds


@pytest.mark.parametrize("args, expected", [
    (["--grid", "loss.num_particle=1,4"],
     f"error: {COIN}: loss.num_particle: loss 'elbo' has no option 'num_particle'; "
     "did you mean 'num_particles'? (set on the command line)"),
    (["--grid", "guide=beta,betta"],
     f"error: {COIN}: guide.name: unknown guide 'betta'; did you mean 'beta'? "
     "(set on the command line)"),
    (["--grid", "gide=beta"],
     "error: command line: --grid 'gide=beta': no recipe section 'gide'; did you mean 'guide'?"),
    (["--grid", "optimizer.lr=0.01,fast"],
     f"error: {COIN}: optimizer.lr: expected float, got 'fast' (set on the command line)"),
    (["--grid", "optimizer.lr"], "error: command line: --grid 'optimizer.lr': expected KEY=V1,V2"),
    (["--grid", "optimizer.lr="], "error: command line: --grid 'optimizer.lr=': an empty value"),
    (["--grid", "optimizer.lr=0.1,,0.2"], "error: command line: --grid 'optimizer.lr=0.1,,0.2': "
                                          "an empty value"),
    (["--grid", "seed=1,2"], "error: command line: --grid 'seed=1,2': use --seeds N"),
    (["--grid", "optimizer.lr=0.1", "--set", "loss.num_particle=2"],
     f"error: {COIN}: loss.num_particle: loss 'elbo' has no option 'num_particle'"),
    (["--seeds", "0"], "error: Invalid value for '--seeds'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, args, expected):
    result = vibench("compare", str(COIN), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_every_bad_grid_is_reported_at_once(tmp_path: Path):
    result = vibench("compare", str(COIN), "--grid", "gide=x", "--grid", "guide=betta",
                     "--grid", "loss.num_particle=1", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert list(tmp_path.iterdir()) == []


def test_out_must_be_new_or_empty(tmp_path: Path):
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "x").write_text("")
    result = vibench("compare", str(COIN), "--grid", "optimizer.lr=0.1", "--out",
                     str(tmp_path / "cmp"), cwd=tmp_path)
    assert result.returncode == 2
    assert "already exists and is not an empty directory" in result.stderr


def test_grid_values_split_on_top_level_commas_only():
    grids = parse_grid(["optimizer.betas=[0.9, 0.99],[0.8,0.9]", "guide=beta, auto_normal",
                        "name='a,b',c"])
    assert [g.values for g in grids] == [["[0.9, 0.99]", "[0.8,0.9]"], ["beta", "auto_normal"],
                                         ["'a,b'", "c"]]
    with pytest.raises(UsageError):
        parse_grid(["loss.num_particles=1,1"])
    with pytest.raises(UsageError):
        parse_grid(["guide=beta", "guide=auto_normal"])


def test_metrics_take_the_largest_error_over_sites_and_elements():
    summary = {
        "final_loss": 3.5, "steps_per_second": 100.0,
        "posterior": {
            "a": {"mean": 0.5, "std": 0.1, "exact_mean": 0.4, "exact_std": 0.1},
            "b": {"mean": [1.0, 2.0], "std": [1.0, 1.0], "exact_mean": [1.0, 2.5],
                  "exact_std": [0.8, 1.0]},
            "c": {"mean": 9.0, "std": 9.0},  # no exact posterior
        },
        "diagnostics": {"khat": 0.3},
    }
    got = metrics(summary)
    assert got["final_loss"] == 3.5 and got["steps_per_second"] == 100.0
    assert got["mean_error"] == pytest.approx(0.5) and got["std_error"] == pytest.approx(0.2)
    assert got["khat"] == 0.3
    assert metrics({"final_loss": 1.0, "posterior": {"c": {"mean": 1.0, "std": 1.0}}}) == {
        **{key: None for key in METRICS}, "final_loss": 1.0}


def test_errors_are_in_exact_sds_and_the_sd_ratio_is_the_one_furthest_from_one():
    """|mean - exact| / exact sd, worst over sites and elements; the sd ratio furthest from 1
    on a log scale (0.5 is further off than 1.8); the common yardstick from the diagnostics."""
    summary = {
        "posterior": {
            "a": {"mean": 0.5, "std": 0.1, "exact_mean": 0.4, "exact_std": 0.2},
            "b": {"mean": [10.0, 20.0], "std": [18.0, 10.0], "exact_mean": [10.0, 21.0],
                  "exact_std": [10.0, 10.0]},
        },
        "diagnostics": {"khat": 0.85, "reading": "bad: do not trust", "elbo": -7.7,
                        "elbo_se": 0.01, "log_evidence": -7.2, "log_evidence_se": 0.04},
    }
    got = metrics(summary)
    assert got["mean_error_sd"] == pytest.approx(0.5)  # site a: 0.1 / 0.2 (b: 1 / 10)
    assert got["sd_ratio"] == pytest.approx(0.5)
    assert got["mean_error"] == pytest.approx(1.0)  # the raw one: site b's 20 vs 21
    assert (got["elbo"], got["elbo_se"], got["log_evidence"], got["log_evidence_se"]) == (
        -7.7, 0.01, -7.2, 0.04)
    assert metrics({"posterior": {"a": {"mean": 1.0, "std": 3.0, "exact_mean": 1.0,
                                        "exact_std": 2.0}}})["sd_ratio"] == 1.5


def test_against_a_reference_posterior_the_errors_are_the_reports_z_and_r():
    """A posteriordb model has reference moments, not an exact posterior: the table's
    mean error / sd and sd ratio are the worst of the report's z and r."""
    summary = {"posterior": {"beta": {"mean": [1.0, 2.0], "std": [1.0, 1.0]}},
               "reference": {"params": {"beta[1]": {"z": 0.1, "r": 1.1},
                                        "beta[2]": {"z": 0.3, "r": 0.6},
                                        "sigma": {"reason": "no such site"}}},
               "diagnostics": {"khat": 0.2}}
    got = metrics(summary)
    assert got["mean_error_sd"] == pytest.approx(0.3) and got["sd_ratio"] == pytest.approx(0.6)


def test_a_suite_of_recipes_runs_each_with_every_combination(tmp_path: Path):
    """Several recipes: each runs with every grid value, the recipe is the table's first
    column and the CSV's first key; the same recipe twice is refused."""
    out = tmp_path / "suite"
    linear = COIN.parent / "linear_regression.yaml"
    result = vibench("compare", str(COIN), str(linear), "--grid", "guide=auto_normal",
                     "--steps", "20", *NO_PLOTS, "--out", str(out),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_csv(out / "compare.csv")
    assert [(r["recipe"], r["guide"], r["status"]) for r in rows] == [
        ("coin", "auto_normal", "ok"), ("linear_regression", "auto_normal", "ok")]
    table = result.stdout.splitlines()
    assert "recipe" in table[1] and any(line.strip().startswith("linear_regression")
                                        for line in table)
    twice = vibench("compare", str(COIN), str(COIN), cwd=tmp_path)
    assert twice.returncode == 2 and twice.stderr.strip().splitlines() == [
        f"error: the recipe {COIN} is given twice"]


def test_importance_weighted_estimates_are_not_taken_for_the_exact_posterior():
    summary = {"posterior": {"a": {"mean": 1.0, "std": 0.5, "iw_mean": 1.2, "iw_std": 1.0}},
               "diagnostics": {"khat": 0.2, "elbo": -3.0, "log_evidence": -2.9}}
    got = metrics(summary)
    assert got["mean_error_sd"] is got["sd_ratio"] is got["mean_error"] is None
    assert got["elbo"] == -3.0


def synthetic(combo: tuple[str, ...], seed: int, khat: float, mean_error_sd: float | None,
              sd_ratio: float | None, status: str = "ok") -> Result:
    """A finished run with the given numbers, as read_summary would make it."""
    spec = Spec(combo, seed, [], f"guide={combo[0]},seed={seed}")
    numbers = {"elbo": -7.0 - khat, "elbo_se": 0.01, "log_evidence": -7.0, "log_evidence_se":
               0.02, "mean_error_sd": mean_error_sd, "sd_ratio": sd_ratio, "khat": khat,
               "final_loss": 7.0 + seed, "steps_per_second": 100.0}
    result = Result(spec, Path(spec.name), status, metrics={key: None for key in METRICS})
    if status == "ok":
        result.metrics.update(numbers)
        result.khat_reading = "bad: do not trust" if khat > 0.7 else "good"
        result.draws, result.wall_seconds = 10_000, 1.0
    else:
        result.error = "error: it broke"
    return result


SYNTHETIC = [  # auto_normal's mean looks best, but one seed's k-hat says not to trust it
    synthetic(("beta",), 0, 0.1, 0.20, 1.01), synthetic(("beta",), 1, 0.2, 0.30, 0.98),
    synthetic(("auto_normal",), 0, 0.6, 0.05, 0.50), synthetic(("auto_normal",), 1, 0.85, 0.07,
                                                               1.50),
    synthetic(("no_exact",), 0, 0.3, None, None), synthetic(("no_exact",), 1, 0.3, None, None),
    synthetic(("broken",), 0, 0.0, None, None, "failed"),
    synthetic(("broken",), 1, 0.0, None, None, "failed"),
]


def test_seeds_combine_to_the_worst_for_accuracy_and_the_mean_for_the_yardstick():
    runs = SYNTHETIC[2:4]
    assert combined(runs, "khat") == 0.85  # one untrusted seed makes the fit untrusted
    assert combined(runs, "sd_ratio") == 0.5  # not the mean, 1.0, which looks perfect
    assert combined(runs, "mean_error_sd") == 0.07
    assert combined(runs, "elbo") == pytest.approx(-7.725)
    assert combined(runs, "log_evidence_se") == pytest.approx(0.02 / 2**0.5)


def test_the_table_marks_an_untrusted_fit_and_says_n_a_without_an_exact_posterior(capsys):
    grids = parse_grid(["guide=beta,auto_normal,no_exact,broken"])
    print_table(grids, SYNTHETIC)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "guide" in line)
    assert header.split() == ["guide", "runs", "ELBO", "log", "evidence", "mean", "error", "/",
                              "sd", "sd", "ratio", "k-hat", "train", "loss", "steps/s", "wall",
                              "s", "status"]
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.strip().split(" ")[0] in ("beta", "auto_normal", "no_exact", "broken")}
    assert rows["beta"][:9] == ["beta", "2/2", "-7.150", "-7.000", "±", "0.014", "0.300",
                                "0.98", "0.20"]
    assert rows["auto_normal"][6:10] == ["0.070", "0.50", "0.85", "!"]
    assert rows["no_exact"][6:9] == ["n/a", "n/a", "0.30"]
    assert rows["broken"][1:4] == ["0/2", "-", "-"]
    assert "! k-hat > 0.7 in at least one seed: do not trust this fit" in out
    assert "n/a: not known for these runs" in out
    assert "from the same 10000 guide draws for every run" in out
    assert "failed: guide=broken,seed=0: error: it broke" in out


def test_the_table_keeps_a_long_component_name_whole_on_one_line(capsys):
    names = ("auto_lowrank_multivariate_normal", "beta")
    print_table(parse_grid([f"guide={','.join(names)}"]),
                [synthetic((name,), 0, 0.1, 0.2, 1.0) for name in names])
    lines = capsys.readouterr().out.splitlines()
    (row,) = [line for line in lines if "auto_lowrank" in line]
    assert row.split()[:2] == ["auto_lowrank_multivariate_normal", "1/1"]
    assert not any(line.split()[:1] == ["e_normal"] for line in lines)


def test_the_csv_has_every_run_with_the_standardised_errors_and_the_k_hat_reading(
        tmp_path: Path):
    grids = parse_grid(["guide=beta,auto_normal,no_exact,broken"])
    write_csv(tmp_path / "compare.csv", grids, SYNTHETIC)
    rows = read_csv(tmp_path / "compare.csv")
    assert list(rows[0]) == ["guide", *CSV_TAIL]
    for name in ("elbo", "log_evidence", "log_evidence_se", "mean_error_sd", "sd_ratio",
                 "khat", "khat_reading", "final_loss", "mean_error", "std_error"):
        assert name in CSV_TAIL
    untrusted = rows[3]
    assert (untrusted["guide"], untrusted["khat"], untrusted["khat_reading"]) == (
        "auto_normal", "0.85", "bad: do not trust")
    assert (untrusted["mean_error_sd"], untrusted["sd_ratio"]) == ("0.07", "1.5")
    assert rows[4]["mean_error_sd"] == "" and rows[4]["khat_reading"] == "good"
    assert rows[6]["status"] == "failed" and rows[6]["elbo"] == ""


def test_the_plot_draws_every_combination_whatever_it_lacks(tmp_path: Path):
    grids = parse_grid(["guide=beta,auto_normal,no_exact,broken"])
    assert write_plot(tmp_path / "compare.png", grids, SYNTHETIC)
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_plot(tmp_path / "failed.png", grids, SYNTHETIC[-2:])


def test_a_suites_plot_measures_each_elbo_from_the_best_of_its_recipe(tmp_path: Path):
    """Two models' ELBOs (about -7 and -2000) share no scale: the suite's ELBO and log
    evidence panels show each run's distance from its own recipe's best."""
    results = []
    for recipe, shift in (("coin", 0.0), ("nes", -2000.0)):
        for guide, khat in (("a", 0.1), ("b", 0.5)):
            run = synthetic((recipe, guide), 0, khat, 0.1, 1.0)
            run.metrics["elbo"] += shift
            results.append(run)
    shifted = from_best(group(results), "elbo")
    assert [[round(r.metrics["elbo"], 6) for r in rs] for rs in shifted] == [
        [0.0], [-0.4], [0.0], [-0.4]]
    assert results[3].metrics["elbo"] == pytest.approx(-2007.5)  # the runs are left as they were
    grids = parse_grid(["recipe=coin,nes", "guide=a,b"])
    assert write_plot(tmp_path / "suite.png", grids, results)


def test_compare_takes_each_shared_name_from_its_one_owner():
    """The interruption and its exit code (workbench.errors), the stop signals
    (workbench.signals), the k-hat threshold (workbench.report.thresholds) and the names of a
    run directory's files (workbench.rundir.layout) each have one owner: compare defines none
    of them again."""
    from workbench.rundir import layout

    file_names = {value for name, value in vars(layout).items() if name.isupper()}
    owned = {"Interrupted", "STOP_SIGNALS", "KHAT_LIMIT", "KHAT_TRUSTED", "KHAT_GOOD"}
    found = []
    for path in sorted((REPO / "workbench" / "compare").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name in owned:
                found.append(f"{path.name}:{node.lineno}: class {node.name}")
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) \
                    and node.id in owned:
                found.append(f"{path.name}:{node.lineno}: {node.id} = ...")
            elif isinstance(node, ast.Constant) and node.value in file_names:
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)


def test_the_k_hat_verdict_is_the_thresholds_and_nan_is_not_trusted(monkeypatch):
    """Over KHAT_TRUSTED, or NaN, is not to be trusted; no k-hat at all is no verdict. The
    limit is workbench.report.thresholds': moved there, compare's verdict moves with it."""
    from workbench.report import thresholds

    assert [untrusted(k) for k in (0.3, 0.7, 0.71, math.nan, math.inf, None)] == [
        False, False, True, True, True, False]
    monkeypatch.setattr(thresholds, "KHAT_TRUSTED", 0.9)
    assert not untrusted(0.85) and untrusted(0.95)


def test_a_run_directory_removed_while_its_output_is_written_is_made_again(tmp_path: Path,
                                                                          monkeypatch):
    """A run whose Ray worker died is sent SIGTERM and, stopping in its set-up, removes the
    directory it claimed, possibly while compare writes its output there: the output is
    written all the same and the run is reported lost, not "could not run it"."""
    import shutil

    from workbench.compare import results
    from workbench.compare.backends import Outcome

    run_dir = tmp_path / "run"
    real, removed = results.files.write_atomic, []

    def write_after_the_run_removed_its_directory(path, data):
        if not removed:
            removed.append(shutil.rmtree(path.parent))
        return real(path, data)

    monkeypatch.setattr(results.files, "write_atomic", write_after_the_run_removed_its_directory)
    lost = "lost: the Ray worker running it died (killed, or out of memory)"
    spec = Spec((), 0, [], "run")
    result = results.collect(spec, run_dir, Outcome(None, lost=lost), None)
    assert removed and result.status == "failed" and result.error == lost
    assert (run_dir / results.STDERR).read_text() == f"error: {lost}\n"
