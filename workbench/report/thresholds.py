"""The statistical thresholds behind every verdict vibench prints, in one place: the report,
the automatic pipeline's stages, compare's table and plot, and Pathfinder all ask here.

- PSIS k-hat (Yao, Vehtari, Simpson and Gelman 2018, "Yes, but did it work?"): below
  ``KHAT_GOOD`` good; up to ``KHAT_TRUSTED`` ok; above it the importance weights have no
  finite variance and the guide is not to be trusted (nor its importance-weighted moments).
- Against a reference posterior: a fit is good when every |mean error| / reference sd is at
  most ``MAX_Z`` and every sd ratio lies in ``SD_RATIO``.
- Agreement of independent fits: split R-hat at most ``RHAT_AGREE`` (Vehtari et al. 2021).
- A sampler's chains are trusted where every coordinate's rank-normalised R-hat (nested, for
  many short chains in groups: workbench/report/draws.py) is at most ``nested_rhat_limit`` of
  its ESS, its bulk and tail ESS at least ``ESS_CHAINS`` (Vehtari et al. 2021's 400: a mean's
  Monte Carlo error then 5% of its sd, and a 5% or 95% quantile's close to that), and no
  transition after the warm-up diverged (Betancourt 2017: a divergence marks a region the
  chains cannot enter, so their draws miss it).
- The nested R-hat's limit: squared, it is 1 + B / W, and B (the variance of the groups' means)
  holds, beside the spread of what the groups' chains have settled on, each mean's own Monte
  Carlo noise: about W x groups / ESS where the chains are stationary. Less that noise, B / W
  estimates the squared spread of the groups' means in posterior sds, which must be at most
  what ``RHAT_AGREE`` allows on chains of unlimited ESS (1.01: 0.14 sd). Against 1.01 itself,
  stationary chains of 50 draws (32 chains in 4 groups, ESS about 600, 40 coordinates) were
  flagged 81% of the time; with the limit, 32%, while groups 0.2 sd apart still were 99% of
  the time (1.01: 100%); at 100 draws, 0% against 3% (benchmarks/nested_rhat.py).
- A k-hat over ``KHAT_TRUSTED`` beside an importance-sampling ESS of at least
  ``ESS_NEARLY_ALL`` of the draws is no contradiction, and the reading says why: the weights
  barely vary where the draws reach, but grow without bound past them (a Gaussian guide of a
  skewed posterior, say), so the guide's tails, not its bulk, are not to be trusted.
- An importance-weighted sd is known to +-``SD_MCSE_MAX`` when its Monte Carlo standard error
  is at most that fraction of it and the tail of its squared deviations has a k-hat within
  ``KHAT_TRUSTED`` (workbench/report/iw_error.py). 0.1 because a reference's sd ratio r must
  lie in ``SD_RATIO``, +-20%: at two standard errors, an sd known to +-10% can tell.
- An sd not known so is a caution on that sd, not a reason to distrust the answer, where the
  draws are a good importance sampler (k-hat below ``KHAT_GOOD``): their weights then have a
  finite variance, so the means and the other sds stand, and what is left is most likely a
  tail of the posterior (a funnel's, a Student-t's) that no 10,000 draws pin down. Above it
  the weights may be what makes the tail heavy, and the answer is flagged.
"""

from __future__ import annotations

import math

KHAT_GOOD = 0.5
KHAT_TRUSTED = 0.7
MAX_Z = 0.2
SD_RATIO = (0.8, 1.2)
RHAT_AGREE = 1.01
ESS_NEARLY_ALL = 0.99
ESS_CHAINS = 400
SD_MCSE_MAX = 0.1


def khat_trusted(khat: float | None) -> bool:
    """Whether a k-hat lets the importance weights be used (False for None or NaN)."""
    return khat is not None and math.isfinite(khat) and khat <= KHAT_TRUSTED


def nested_rhat_limit(ess: float, groups: int) -> float:
    """The largest nested R-hat a coordinate with this bulk ESS may have, its chains in
    ``groups`` groups: ``RHAT_AGREE``'s spread of the groups' means, plus their own noise."""
    return math.sqrt(RHAT_AGREE ** 2 + groups / ess) if ess > 0 else math.inf


def chains_distrusted(rhat: float, limit: float, worst_rhat: str, ess: float, worst_ess: str,
                      divergences: int) -> str:
    """Why a sampler's chains are not to be trusted (the R-hat furthest past its limit and
    the smallest ESS, with the coordinates they belong to, and the divergent transitions
    after the warm-up), or "" where they are."""
    why = []
    if not rhat <= limit:
        why.append(f"R-hat {rhat:.3f} > {limit:.3f} ({worst_rhat}): the chains disagree")
    if not ess >= ESS_CHAINS:
        why.append(f"ESS {ess:.0f} < {ESS_CHAINS} ({worst_ess})")
    if divergences:
        why.append(f"{divergences} divergent transitions: a region the chains cannot enter")
    return "; ".join(why)


def khat_reading(khat: float, ess_fraction: float | None = None) -> str:
    """What a k-hat says, in the words the report prints; with the importance-sampling ESS
    as a fraction of the draws, why a bad k-hat can sit beside nearly equal weights."""
    if khat < KHAT_GOOD:
        return "good"
    if khat_trusted(khat):
        return "ok"
    return "bad: do not trust" + tails_note(ess_fraction)


def tails_note(ess_fraction: float | None) -> str:
    """Why a bad k-hat beside an ESS of nearly all the draws is no contradiction, or ''."""
    if ess_fraction is None or not ess_fraction >= ESS_NEARLY_ALL:
        return ""
    shown = math.floor(ess_fraction * 1000) / 10  # 99.96% is not all of them
    return (f" its tails: the weights barely vary (ESS {shown:.1f}% of the draws) but grow "
            "past where the draws reach, so the guide's tails are lighter than the posterior's")


def sd_caution_only(khat: float | None) -> bool:
    """Whether an sd not known to +-SD_MCSE_MAX, in an answer whose importance sampler has
    k-hat ``khat``, is a caution on that sd alone rather than a reason to distrust the answer."""
    return khat is not None and math.isfinite(khat) and khat < KHAT_GOOD


def sd_unknown(relative_mcse: float, khat: float) -> str:
    """Why an importance-weighted sd is not known to +-SD_MCSE_MAX, in a few words, or "":
    its MCSE as a fraction of it, or the k-hat of its squared deviations' tail (above
    KHAT_TRUSTED the estimate's variance is not finite, so no MCSE bounds its error)."""
    if math.isfinite(khat) and khat > KHAT_TRUSTED:
        return (f"the tail of its squared deviations has k-hat {khat:.2f} > {KHAT_TRUSTED}, "
                "so its Monte Carlo error cannot be bounded from these draws")
    if math.isfinite(relative_mcse) and relative_mcse > SD_MCSE_MAX:
        return f"its Monte Carlo standard error is {relative_mcse:.0%} of it"
    return ""
