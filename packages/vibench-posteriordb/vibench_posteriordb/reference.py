"""Each posterior's files, and the map from Stan's parameter names to Pyro sites.

Every posterior has a folder ``data/<posteriordb name>/`` in this package with ``data.json``
(the data), ``reference.json`` (mean, sd and 5/50/95 % quantiles of the reference draws per
Stan parameter name), ``draws.npz`` (the 10,000 reference draws, one float32 array per Stan
name), ``model.stan`` and ``info.json``.

A Stan name is a parameter's name with 1-based indices (``alpha``, ``beta[2]``,
``theta1[1]``); the port keeps the parameter's name as its site's name and its indices as the
site's last (event) dimensions, 0-based: ``beta[2]`` is element ``(1,)`` of site ``beta``.
``site_map`` writes that down once for every model, with a rename where a port's site is
called something else. Only numpy and the standard library are imported at the top, torch
inside the functions that need it, so ``vibench list`` stays fast.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files

# vibench name -> posteriordb's name for the posterior, which is its folder under data/.
POSTERIORS = {
    "pdb_kilpisjarvi": "kilpisjarvi_mod-kilpisjarvi",
    "pdb_earnings": "earnings-logearn_interaction",
    "pdb_nes": "nes2000-nes",
    "pdb_diamonds": "diamonds-diamonds",
    "pdb_arma11": "arma-arma11",
    "pdb_garch11": "garch-garch11",
    "pdb_gauss_mix": "low_dim_gauss_mix-low_dim_gauss_mix",
    "pdb_hmm_drive": "bball_drive_event_0-hmm_drive_0",
}

_STAN_NAME = re.compile(r"([A-Za-z][A-Za-z0-9_]*)(?:\[([0-9]+(?:,[0-9]+)*)\])?")


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
    """The reference draws: Stan name -> float32 array of 10,000 (10 chains of 1,000)."""
    import numpy as np

    with np.load(path(posterior, "draws.npz")) as npz:
        return {name: npz[name] for name in npz.files}


def stan_index(stan_name: str) -> tuple[str, tuple[int, ...]]:
    """``"beta[2]"`` -> ``("beta", (1,))``; ``"sigma"`` -> ``("sigma", ())``."""
    match = _STAN_NAME.fullmatch(stan_name)
    if match is None:
        raise ValueError(f"{stan_name!r} is not a Stan parameter name")
    indices = match.group(2)
    return match.group(1), tuple(int(i) - 1 for i in indices.split(",")) if indices else ()


def site_map(stan_names, rename: dict[str, str] | None = None
             ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Stan name -> (site name, 0-based index into the site's value), for each name.

    ``rename`` maps a Stan parameter's name (no indices) to the port's site name where they
    differ."""
    rename = rename or {}
    sites = {}
    for stan_name in stan_names:
        base, index = stan_index(stan_name)
        sites[stan_name] = (rename.get(base, base), index)
    return sites


def site_shapes(sites: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """The shape of each site that ``sites`` maps to: one past its largest index."""
    shapes: dict[str, tuple[int, ...]] = {}
    for site, index in sites.values():
        known = shapes.get(site, tuple(0 for _ in index))
        shapes[site] = tuple(max(k, i + 1) for k, i in zip(known, index))
    return shapes


def to_sites(values: dict, sites: dict[str, tuple[str, tuple[int, ...]]], dtype=None) -> dict:
    """Stan name -> tensor (any batch shape) to site -> tensor of batch + site shape, in
    ``dtype`` if given."""
    import torch

    values = {name: torch.as_tensor(value, dtype=dtype) for name, value in values.items()}
    out = {}
    for site, shape in site_shapes(sites).items():
        names = {index: name for name, (s, index) in sites.items() if s == site}
        if shape == ():
            out[site] = values[names[()]]
            continue
        flat = [values[names[index]] for index in _indices(shape)]
        stacked = torch.stack(torch.broadcast_tensors(*flat), dim=-1)
        out[site] = stacked.reshape(stacked.shape[:-1] + shape)
    return out


def from_sites(values: dict, sites: dict[str, tuple[str, tuple[int, ...]]]) -> dict:
    """Site -> tensor of batch + site shape to Stan name -> tensor of the batch shape."""
    return {name: values[site][(Ellipsis,) + index] for name, (site, index) in sites.items()}


def reference_posterior(posterior: str, rename: dict[str, str] | None = None) -> dict:
    """What a model's ``reference_posterior`` returns: the reference summaries per Stan name,
    the path of the reference draws and the Stan name -> (site, index) map."""
    reference = read_json(posterior, "reference.json")
    return {"params": reference["params"], "draws": path(posterior, "draws.npz"),
            "sites": site_map(reference["params"], rename)}


def _indices(shape):
    import itertools

    return itertools.product(*(range(n) for n in shape))
