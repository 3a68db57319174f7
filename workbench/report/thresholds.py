"""The statistical thresholds behind every verdict vibench prints, in one place: the report,
the automatic pipeline's stages, compare's table and plot, and Pathfinder all ask here.

- PSIS k-hat (Yao, Vehtari, Simpson and Gelman 2018, "Yes, but did it work?"): below
  ``KHAT_GOOD`` good; up to ``KHAT_TRUSTED`` ok; above it the importance weights have no
  finite variance and the guide is not to be trusted (nor its importance-weighted moments).
- Against a reference posterior: a fit is good when every |mean error| / reference sd is at
  most ``MAX_Z`` and every sd ratio lies in ``SD_RATIO``.
- Agreement of independent fits: split R-hat at most ``RHAT_AGREE`` (Vehtari et al. 2021).
"""

from __future__ import annotations

import math

KHAT_GOOD = 0.5
KHAT_TRUSTED = 0.7
MAX_Z = 0.2
SD_RATIO = (0.8, 1.2)
RHAT_AGREE = 1.01


def khat_trusted(khat: float | None) -> bool:
    """Whether a k-hat lets the importance weights be used (False for None or NaN)."""
    return khat is not None and math.isfinite(khat) and khat <= KHAT_TRUSTED


def khat_reading(khat: float) -> str:
    """What a k-hat says, in the words the report prints."""
    if khat < KHAT_GOOD:
        return "good"
    if khat_trusted(khat):
        return "ok"
    return "bad: do not trust"
