"""vibench beside PyMC's ADVI on the hard and development posteriors (issue 21's table).

The posteriors: the seven of packages/vibench-hardcases and the eight of
packages/vibench-posteriordb, each with its reference. Per posterior and seed, each method
runs in its own process, timed whole (interpreter start, imports, compiling, fitting,
drawing, scoring), in wall time and in the child's CPU time (user + system), which a
shared machine's load moves much less:

- ``pymc_advi``, ``pymc_fullrank``: ``pm.fit(n=STEPS, method="advi" | "fullrank_advi")``
  with PyMC's defaults otherwise (one Monte Carlo draw a step, adagrad_window at 0.001),
  then 4,000 draws from the approximation (benchmarks/pymc_ports.py holds the models);
- ``vb_advi``, ``vb_fullrank``: ``vibench run RECIPE --set guide=auto_normal`` (or
  ``auto_multivariate_normal``) ``--set loss=elbo --set loss.num_particles=4 --set
  optimizer=adam --set optimizer.lr=LR --set train.steps=STEPS``, as a user would: the
  ADVI-like baseline of benchmarks/posteriordb.py at one fixed step size;
- ``vb_auto``: the automatic pipeline, as benchmarks/hard_suite.py and posteriordb.py run it
  (the hard recipes as they are; the posteriordb recipes with ``--set guide=auto``);
- ``vb_spline``, ``vb_renyi``: two of issue 21's levers as single fits, with ``vb_advi``'s
  settings otherwise: a spline coupling flow guide (benchmarks/spline_guide.py; vibench
  registers none) with the ELBO, and ``auto_multivariate_normal`` with Pyro's RenyiELBO at
  alpha 0.5 (``loss=renyi_elbo``), a mass-covering bound.

Each is scored against the reference with the same numbers: max z = |mean - ref mean| /
ref sd over the parameters, r = sd / ref sd, good when every z <= 0.2 and 0.8 <= r <= 1.2
(vibench's from its summary.json, PyMC's from its draws); for vibench also whether it
flagged its result (the pipeline's flags; elsewhere k-hat > 0.7). A failed run is a row.

``--check`` first verifies the PyMC ports: at 20 reference draws their log density (PyMC's
``logp`` with the value transforms removed, i.e. without Jacobians) minus the Pyro model's
log joint (float64) must be one constant, to 1e-6 relative.

    pip install pymc
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/peers_advi.py --check
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/peers_advi.py --seeds 0 --out /tmp/peers
    python benchmarks/peers_advi.py --table /tmp/peers/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hard_suite import NAMES as HARD
from hard_suite import RECIPES as HARD_RECIPES
from posteriordb import POSTERIORS as PDB
from posteriordb import QUIET
from posteriordb import RECIPES as PDB_RECIPES

NAMES = [*HARD, *(f"pdb_{n}" for n in PDB)]
METHODS = ["pymc_advi", "pymc_fullrank", "vb_advi", "vb_fullrank", "vb_auto", "vb_spline",
           "vb_renyi"]
SPLINE = Path(__file__).resolve().parent / "spline_guide.py"
GUIDES = {"vb_advi": "auto_normal", "vb_fullrank": "auto_multivariate_normal",
          "vb_spline": f"{SPLINE}:SplineFlow", "vb_renyi": "auto_multivariate_normal"}
LOSSES = {"vb_renyi": ["loss=renyi_elbo", "loss.alpha=0.5"]}
DRAWS = 4000
Z_MAX, R_RANGE = 0.2, (0.8, 1.2)


def package(name: str):
    """The reference module of the package that holds posterior ``name``."""
    if name.startswith("hard_"):
        from vibench_hardcases import reference
    else:
        from vibench_posteriordb import reference
    return reference


def posterior_files(name: str) -> tuple[dict, dict, dict]:
    """Posterior ``name``'s data (float64 arrays), reference summaries per parameter name,
    and parameter name -> (site, 0-based index)."""
    reference = package(name)
    folder = reference.POSTERIORS[name]
    params = reference.read_json(folder, "reference.json")["params"]
    return reference.load_data(folder), params, reference.site_map(params)


def score(moments: dict, params: dict) -> dict:
    """max z and the range of r over the reference's parameters, and the verdict."""
    z = {k: abs(moments[k][0] - p["mean"]) / p["sd"] for k, p in params.items()}
    r = {k: moments[k][1] / p["sd"] for k, p in params.items()}
    finite = all(math.isfinite(v) for v in [*z.values(), *r.values()])
    good = finite and max(z.values()) <= Z_MAX and all(R_RANGE[0] <= v <= R_RANGE[1]
                                                      for v in r.values())
    return {"max_z": max(z.values()), "min_r": min(r.values()), "max_r": max(r.values()),
            "worst": max(z, key=z.get), "good": good}


# ---- PyMC: one fit, in its own process ----

def fit_pymc(name: str, method: str, seed: int, steps: int) -> dict:
    """``pm.fit`` on the port, draws from the approximation, and their score."""
    import numpy as np
    import pymc as pm
    from pymc_ports import build

    data, params, sites = posterior_files(name)
    model = build(name, data)
    with model:
        approx = pm.fit(n=steps, method={"pymc_advi": "advi",
                                         "pymc_fullrank": "fullrank_advi"}[method],
                        random_seed=seed, progressbar=False)
        idata = approx.sample(DRAWS, random_seed=seed)
    moments = {}
    for key, (site, index) in sites.items():
        values = idata.posterior[site].values.reshape((-1, *idata.posterior[site].shape[2:]))
        column = values[(slice(None), *index)].astype(np.float64)
        moments[key] = (float(column.mean()), float(column.std(ddof=1)))
    hist = np.asarray(approx.hist, dtype=float)
    return {**score(moments, params), "steps": steps, "final_loss": float(np.mean(hist[-100:]))}


# ---- vibench: one run of its command line ----

def vibench_command(name: str, method: str, seed: int, steps: int, lr: float,
                    out: Path) -> list[str]:
    """The ``vibench run`` command of one vibench row."""
    hard = name.startswith("hard_")
    recipe = (HARD_RECIPES / f"{name}.yaml" if hard else PDB_RECIPES / f"{name}.yaml")
    sets = [*QUIET, f"seed={seed}"]
    if method == "vb_auto":
        sets += [] if hard else ["guide=auto"]
    else:
        sets += [f"guide={GUIDES[method]}", *LOSSES.get(method, ["loss=elbo"]),
                 "loss.num_particles=4", "optimizer=adam", f"optimizer.lr={lr}",
                 f"train.steps={steps}"]
    vibench = shutil.which("vibench") or f"{sys.executable} -m workbench"
    return [*vibench.split(), "run", str(recipe), "--out", str(out),
            *(part for s in sets for part in ("--set", s))]


def vibench_row(summary: dict) -> dict:
    """Score, k-hat and flags from a run's summary.json."""
    ref = summary.get("reference") or {}
    diagnostics = summary.get("diagnostics") or {}
    khat = diagnostics.get("khat")  # null where it is infinite or was not computed
    auto = summary.get("auto")
    if auto:
        flags = auto.get("flags") or []
    elif khat is None:
        flags = ["k-hat inf" if "bad" in diagnostics.get("reading", "") else
                 "k-hat not computed"]
    else:
        flags = [f"k-hat {khat:.2f}"] if khat > 0.7 else []
    return {"status": summary.get("status"), "max_z": ref.get("max_z"),
            "min_r": ref.get("min_r"), "max_r": ref.get("max_r"),
            "good": bool(ref.get("good")) and summary.get("status") == "completed",
            "khat": khat, "flags": flags, "cautions": (auto or {}).get("cautions") or [],
            "trusted": auto.get("trusted") if auto else not flags,
            "estimates": auto.get("estimates") if auto else None,
            "final_loss": summary.get("final_loss"), "steps": summary.get("steps")}


def children_cpu() -> float:
    """User + system CPU seconds of this process's finished children, grandchildren included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(name: str, method: str, seed: int, args, out: Path) -> dict:
    """One row: the method on the posterior with the seed, in a child process, timed."""
    folder = out / name / f"{method}-s{seed}"  # the run's folder; its log beside it
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if method.startswith("pymc"):
        result = folder.with_suffix(".json")
        command = [sys.executable, __file__, "--pymc-one", name, method, str(seed),
                   str(args.pymc_steps), str(result)]
    else:
        command = vibench_command(name, method, seed, args.vb_steps, args.vb_lr, folder)
    start, used = time.perf_counter(), children_cpu()
    done = subprocess.run(command, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu() - used
    folder.with_suffix(".log").write_text(done.stdout + done.stderr)
    row = {"posterior": name, "method": method, "seed": seed, "wall_s": wall, "cpu_s": cpu,
           "exit": done.returncode}
    found = (result if method.startswith("pymc") else folder / "summary.json")
    if not found.exists():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**row, "error": f"exit {done.returncode}: {last[0][:200]}"}
    body = json.loads(found.read_text())
    return {**row, **(body if method.startswith("pymc") else vibench_row(body))}


# ---- the ports' check ----

def pyro_model(name: str):
    """Posterior ``name``'s Pyro model, as its package registers it."""
    if name.startswith("hard_"):
        from vibench_hardcases.plugin import MODELS
    else:
        from vibench_posteriordb.plugin import MODELS
    return MODELS[name]()


def check_port(name: str, points: int = 20) -> dict:
    """PyMC's log density minus Pyro's at ``points`` reference draws: their spread (which
    must be ~0: the two agree up to a constant) relative to the log density's size."""
    import numpy as np
    import torch
    from pymc.model.transform.conditioning import remove_value_transforms
    from pymc_ports import build
    from pyro import poutine

    reference = package(name)
    data, params, sites = posterior_files(name)
    draws = reference.load_draws(reference.POSTERIORS[name])
    picks = np.random.default_rng(0).choice(len(next(iter(draws.values()))), points, False)
    model = pyro_model(name)
    tensors = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in data.items()}
    plain = remove_value_transforms(build(name, data, start=False))
    logp = plain.compile_logp()
    free = {v.name for v in plain.value_vars}
    diffs, sizes = [], []
    for i in picks:
        values = {k: v[i].astype(np.float64) for k, v in draws.items()}
        if name.startswith("hard_"):
            latent = reference.to_sites(values, dtype=torch.float64)
        else:
            latent = model.latent_values(values, dtype=torch.float64)
        trace = poutine.trace(poutine.condition(model, data=latent)).get_trace(**tensors)
        ours = float(trace.log_prob_sum())
        point = {k: v.numpy() for k, v in latent.items() if k in free}
        diffs.append(float(logp(point)) - ours)
        sizes.append(abs(ours))
    spread = max(diffs) - min(diffs)
    return {"posterior": name, "draws": points, "constant": float(np.mean(diffs)),
            "spread": spread, "relative": spread / max(1.0, max(sizes)),
            "ok": spread / max(1.0, max(sizes)) <= 1e-6}


def check(names: list[str]) -> bool:
    """Every port's check as a Markdown table; whether all pass."""
    print("| posterior | draws | PyMC - Pyro (mean) | spread | spread / max abs log p | ok |")
    print("|---|---:|---:|---:|---:|---|")
    ok = True
    for name in names:
        try:
            c = check_port(name)
        except Exception as exc:  # a port that cannot be evaluated is a failed check
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0]} |"
                  " | | | no |", flush=True)
            ok = False
            continue
        ok &= c["ok"]
        print(f"| {name} | {c['draws']} | {c['constant']:.6g} | {c['spread']:.2g} | "
              f"{c['relative']:.2g} | {'yes' if c['ok'] else 'NO'} |", flush=True)
    return ok


# ---- the table ----

def cell(value, spec=".2f") -> str:
    """A number as the table shows it: ``spec``, or powers of ten from 100,000 up."""
    if value is None:
        return "-"
    return format(value, ".1e" if spec == ".2f" and abs(value) >= 1e5 else spec)


def verdict_cell(row: dict) -> str:
    """"trusted" (with a caution on the sd its head names: "the sd of x[4] is not known to
    +-10%") or "flagged: " and each flag's head ("R-hat 1.183", "k-hat 0.80")."""
    flags = [f.split(" > ")[0].split(":")[0] for f in row.get("flags") or []]
    cautions = [c.split(" is not known")[0] for c in row.get("cautions") or []]
    if row.get("trusted") and not flags:
        return "trusted" + (f" (caution: {', '.join(cautions)})" if cautions else "")
    return "flagged: " + ", ".join(flags) if flags else "not trusted"


def answer_cell(row: dict) -> str:
    """The pipeline's answer in a few words ("PSIS, pooled over 4 fits", "guide's own, from
    flow"); "-" for a single fit."""
    text = row.get("estimates") or "-"
    for long, short in [(" estimates", ""), ("importance-weighted (PSIS)", "PSIS"),
                        ("mixed (importance-weighted where k-hat allows)", "mixed"),
                        ("the guide's own", "guide's own"), (", which sit at several modes", "")]:
        text = text.replace(long, short)
    return re.sub(r" \(gaussian-[^)]*\)", "", text)


def table(rows: list[dict]) -> str:
    """The rows as one Markdown table, posterior by posterior."""
    lines = ["| posterior | method | seed | exit | steps | max z | r | good | k-hat | "
             "vibench's verdict | answer | wall s | cpu s |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---|---|---:|---:|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (NAMES.index(r["posterior"]), order[r["method"]],
                                         r["seed"])):
        head = f"| {r['posterior']} | {r['method']} | {r['seed']} | {cell(r.get('exit'), 'd')} |"
        times = f"{r['wall_s']:.0f} | {cell(r.get('cpu_s'), '.0f')} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | | | | {times}")
            continue
        verdict = "-" if r["method"].startswith("pymc") else verdict_cell(r)
        if verdict == "trusted" and not r["good"]:
            verdict = "**trusted: a silent miss**"
        lines.append(f"{head} {cell(r.get('steps'), 'd')} | {cell(r['max_z'])} | "
                     f"{cell(r['min_r'])}-{cell(r['max_r'])} | {'yes' if r['good'] else 'no'} "
                     f"| {cell(r.get('khat'))} | {verdict} | {answer_cell(r)} | {times}")
    return "\n".join(lines)


def latest(rows: list[dict]) -> list[dict]:
    """One row per posterior, method and seed: the last given, so that a later file's rerun
    replaces an earlier one's."""
    return list({(r["posterior"], r["method"], r["seed"]): r for r in rows}.values())


def tally(rows: list[dict]) -> str:
    """Per method: good rows, failed rows and, for vibench, misses it trusted (silent)."""
    lines = ["| method | rows | good | failed | trusted but not good | flagged but good |",
             "|---|---:|---:|---:|---:|---:|"]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        ran = [r for r in mine if "error" not in r]
        vb = not method.startswith("pymc")
        silent = sum(1 for r in ran if not r["good"] and r.get("trusted")) if vb else "-"
        alarm = sum(1 for r in ran if r["good"] and not r.get("trusted")) if vb else "-"
        lines.append(f"| {method} | {len(mine)} | {sum(1 for r in ran if r['good'])} | "
                     f"{len(mine) - len(ran)} | {silent} | {alarm} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="default: all")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--pymc-steps", type=int, default=10000,
                        help="pm.fit's n (default 10,000, PyMC's own)")
    parser.add_argument("--vb-steps", type=int, default=3000,
                        help="the vibench baselines' steps (the posteriordb recipes' 3,000)")
    parser.add_argument("--vb-lr", type=float, default=0.01,
                        help="the vibench baselines' Adam step size (the recipes' 0.01)")
    parser.add_argument("--out", type=Path, default=Path("peers_advi_runs"))
    parser.add_argument("--check", action="store_true", help="only check the PyMC ports")
    parser.add_argument("--table", type=Path, nargs="+",
                        help="only print the table of these results.jsonl files, together "
                        "(where a run is in several, the last file's)")
    parser.add_argument("--pymc-one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pymc_one:
        name, method, seed, steps, result = args.pymc_one
        Path(result).write_text(json.dumps(fit_pymc(name, method, int(seed), int(steps))))
        return 0
    names = args.names or NAMES
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        parser.error(f"unknown posterior {unknown[0]!r}; choose from {', '.join(NAMES)}")
    if args.check:
        return 0 if check(names) else 1
    if args.table:
        rows = latest([json.loads(line) for path in args.table
                       for line in path.read_text().splitlines() if line])
        print(table(rows) + "\n\n" + tally(rows))
        return 0
    return grid(names, args)


def grid(names: list[str], args) -> int:
    """Every posterior x seed x method, one row each, appended to OUT/results.jsonl."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"error: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            for method in methods:
                rows.append(run_one(name, method, seed, args, args.out))
                with results.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows) + "\n\n" + tally(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
