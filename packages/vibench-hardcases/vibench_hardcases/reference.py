"""Each posterior's files, and the map from reference names to Pyro sites.

Every posterior has a folder ``data/<name>/`` in this package with ``data.json`` (the data
set: the target's constants for the analytic ones, synthetic observations for the others),
``reference.json`` (mean, sd and 5/50/95 % quantiles per parameter name, with how each was
computed), ``draws.npz`` (the reference draws, one float32 array per parameter name) and
``info.json`` (provenance: how the data and the reference were made, diagnostics, checks).

A parameter name is a site's name, with 1-based indices for an element of a vector site
(``x[3]`` is element ``(2,)`` of site ``x``), as Stan and posteriordb write them. Only the
standard library is imported at the top, numpy and torch inside the functions that need them,
so ``vibench list`` stays fast.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files

# vibench name -> the posterior's folder under data/.
POSTERIORS = {
    "hard_funnel10": "funnel10",
    "hard_banana": "banana",
    "hard_mixture2": "mixture2",
    "hard_student_t": "student_t",
    "hard_hier_centred": "hier_centred",
    "hard_latent_gp": "latent_gp",
    "hard_hier_logistic": "hier_logistic",
}

_NAME = re.compile(r"([A-Za-z][A-Za-z0-9_]*)(?:\[([0-9]+(?:,[0-9]+)*)\])?")


def path(posterior: str, filename: str) -> str:
    """The path of one of a posterior's files (``draws.npz``, ...) inside this package."""
    return str(files(__package__) / "data" / posterior / filename)


def read_json(posterior: str, filename: str) -> dict:
    return json.loads((files(__package__) / "data" / posterior / filename).read_text("utf-8"))


def load_data(posterior: str) -> dict:
    """The posterior's data.json, each value a float64 numpy array (vibench makes tensors)."""
    import numpy as np

    return {key: np.asarray(value, dtype=np.float64)
            for key, value in read_json(posterior, "data.json").items()}


def load_draws(posterior: str) -> dict:
    """The reference draws: parameter name -> float32 array (one draw per entry)."""
    import numpy as np

    with np.load(path(posterior, "draws.npz")) as npz:
        return {name: npz[name] for name in npz.files}


def site_index(name: str) -> tuple[str, tuple[int, ...]]:
    """``"x[2]"`` -> ``("x", (1,))``; ``"tau"`` -> ``("tau", ())``."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a parameter name")
    indices = match.group(2)
    return match.group(1), tuple(int(i) - 1 for i in indices.split(",")) if indices else ()


def site_map(names) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parameter name -> (site name, 0-based index into the site's value)."""
    return {name: site_index(name) for name in names}


def check_data(posterior: str, data: dict) -> None:
    """Refuse data other than the posterior's data.json: the reference is the posterior of
    that data (or that target's constants) only. Each given value must equal the stored one
    to float32 rounding; a value not given takes the model's default, which is the stored
    one."""
    import numpy as np

    stored = load_data(posterior)
    for key, value in data.items():
        if key not in stored:
            raise ValueError(f"the reference is for data.json's data, which has no {key!r}")
        given = value.detach().cpu().double().numpy() if hasattr(value, "detach") else value
        given = np.asarray(given, dtype=np.float64)
        if given.shape != stored[key].shape or not np.allclose(given, stored[key], rtol=1e-5,
                                                               atol=1e-6):
            raise ValueError(f"the reference is for data.json's {key!r}, and these data "
                             "differ from it")


def reference_posterior(posterior: str, data: dict) -> dict:
    """What a model's ``reference_posterior`` returns: the reference summaries per parameter
    name, the path of the reference draws and the name -> (site, index) map."""
    check_data(posterior, data)
    reference = read_json(posterior, "reference.json")
    return {"params": reference["params"], "draws": path(posterior, "draws.npz"),
            "sites": site_map(reference["params"])}


def to_sites(values: dict, dtype=None) -> dict:
    """Parameter name -> value (any batch shape, the same for all) to site -> tensor of batch
    + site shape: the values for ``poutine.condition``."""
    import itertools

    import torch

    sites = site_map(values)
    shapes: dict[str, tuple[int, ...]] = {}
    for site, index in sites.values():
        known = shapes.get(site, tuple(0 for _ in index))
        shapes[site] = tuple(max(k, i + 1) for k, i in zip(known, index))
    values = {name: torch.as_tensor(value, dtype=dtype) for name, value in values.items()}
    out = {}
    for site, shape in shapes.items():
        names = {index: name for name, (s, index) in sites.items() if s == site}
        if shape == ():
            out[site] = values[names[()]]
            continue
        flat = [values[names[index]] for index in itertools.product(*(range(n) for n in shape))]
        stacked = torch.stack(torch.broadcast_tensors(*flat), dim=-1)
        out[site] = stacked.reshape(stacked.shape[:-1] + shape)
    return out
