"""Is this slice like the prior's training data? An out-of-distribution score per slice.

A generative prior hallucinates most where the patient is least like what it learnt, so
every reconstruction carries a score, a threshold calibrated on the prior's validation
slices, and a flag (issue 24). The default method is the prior's own denoising
score-matching loss (seed 002, Eq. 7.3; seed 003, Eq. 2): perturb the image with the
forward process at a few times t, x_t = α(t) x + β(t) z, and measure how well the score
network predicts the noise,

    ℓ_t(x) = mean over pixels of (β(t) s_θ(x_t, t) + z)²,

which changes where the network meets what it never saw: it grows on structures and noise
it cannot explain, and shrinks on images simpler than its training data (a CT slice's flat
soft tissue through an MR prior is easier to denoise than brain), the failure of
likelihoods that typicality tests fix. Its level also varies with the anatomy in the slice
(the vertex against the skull base), but together over t, while an image of another kind
changes the profile across t. So the slice's score is two-sided and multivariate: the
Mahalanobis distance of (log ℓ_t)_t from the in-domain calibration slices' mean, under
their covariance. It costs one batch of len(times) network evaluations, a few percent of a
reconstruction.

The other candidates of ``benchmarks/ood.py`` (bits/dim through the probability-flow ODE,
:mod:`models.likelihood`; an AR-CSM's patch likelihood, :mod:`models.arcsm`; the mean
posterior std) are computed there with :func:`auroc`; the card names the method chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.sde import SDE, ScoreFn

DEFAULT_TIMES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
METHODS = ("dsm",)


def dsm_losses(
    score_fn: ScoreFn,
    sde: SDE,
    images: torch.Tensor,
    times: Sequence[float] = DEFAULT_TIMES,
    seed: int = 0,
) -> torch.Tensor:
    """ℓ_t(x) for each slice of ``images`` (N, C, H, W) and each t: (N, len(times)).
    Slice i draws its noise from a generator seeded ``seed + i``, so a slice scores the same
    alone or in a stack."""
    out = torch.empty(len(images), len(times), dtype=torch.float64)
    ts = torch.tensor([float(t) for t in times])
    for i, x in enumerate(images):
        g = torch.Generator().manual_seed(seed + i)
        x = x.float().expand(len(ts), *x.shape)
        z = torch.randn(x.shape, generator=g)
        mean, std = sde.marginal_prob(x, ts)
        std = std.reshape(-1, *([1] * (x.dim() - 1)))
        with torch.no_grad():
            s = score_fn(mean + std * z, ts).float()
        out[i] = (std * s + z).pow(2).flatten(1).mean(dim=1).double()
    return out


@dataclass
class OODCheck:
    """A prior's calibrated out-of-distribution check, as its card stores it (``ood``)."""

    method: str = "dsm"
    on: str = "reconstruction"  # what is scored: the reconstruction, or the classical image
    times: tuple[float, ...] = DEFAULT_TIMES
    centre: list[float] = field(default_factory=list)  # mean log ℓ_t of the calibration slices
    precision: list[list[float]] = field(default_factory=list)  # inverse covariance of log ℓ_t
    threshold: float = math.inf  # the score above which a slice is flagged
    percentile: float = 99.0  # of the validation scores, where the threshold lies
    tuned_by: str = ""

    @classmethod
    def from_card(cls, card: dict) -> OODCheck | None:
        """The card's check, or None for a prior that was never calibrated."""
        d = card.get("ood")
        if not d:
            return None
        if d.get("method") not in METHODS:
            raise ValueError(f"card ood.method must be one of {', '.join(METHODS)}")
        if d.get("on", "reconstruction") not in ("reconstruction", "baseline"):
            raise ValueError("card ood.on must be 'reconstruction' or 'baseline'")
        n = len(d.get("times") or [])
        if not n or len(d.get("centre") or []) != n or len(d.get("precision") or []) != n:
            raise ValueError("card ood: times, their centre and an n × n precision are needed")
        return cls(
            method=d["method"],
            on=d.get("on", "reconstruction"),
            times=tuple(float(t) for t in d["times"]),
            centre=[float(r) for r in d["centre"]],
            precision=[[float(v) for v in row] for row in d["precision"]],
            threshold=float(d["threshold"]),
            percentile=float(d.get("percentile", 99.0)),
            tuned_by=d.get("tuned_by", ""),
        )

    def to_card(self) -> dict:
        return {
            "method": self.method,
            "on": self.on,
            "times": list(self.times),
            "centre": self.centre,
            "precision": self.precision,
            "threshold": self.threshold,
            "percentile": self.percentile,
            "tuned_by": self.tuned_by,
        }

    def scores(
        self, score_fn: ScoreFn, sde: SDE, images: torch.Tensor, seed: int = 0, size: int = 0
    ) -> list[float]:
        """The score of each slice of ``images`` (N, 1, H, W) on the [0, 1] scale; with
        ``size``, each is first brought to the prior's grid as its validation slices were
        (:func:`to_prior_grid`), so a 256² or rectangular slice is not atypical for its
        pixel size alone."""
        images = to_prior_grid(images, size) if size else images
        losses = dsm_losses(score_fn, sde, images.clamp(0, 1), self.times, seed)
        return self.typicality(losses).tolist()

    def typicality(self, losses: torch.Tensor) -> torch.Tensor:
        """The score of losses ℓ_t (N, T): the Mahalanobis distance of log ℓ_t."""
        return mahalanobis(
            torch.log(losses.clamp_min(1e-12)),
            torch.tensor(self.centre, dtype=torch.float64),
            torch.tensor(self.precision, dtype=torch.float64),
        )

    def assess(
        self, score_fn: ScoreFn, sde: SDE, images: torch.Tensor, seed: int = 0, size: int = 0
    ) -> list[dict]:
        """One verdict per slice: ``{"score", "threshold", "flag", "method"}``."""
        return [
            {
                "score": round(s, 4),
                "threshold": round(self.threshold, 4),
                "flag": bool(s > self.threshold),
                "method": f"{self.method} on the {self.on.replace('baseline', 'classical image')}",
            }
            for s in self.scores(score_fn, sde, images, seed, size)
        ]


def to_prior_grid(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` (N, C, H, W) as the real slices a prior is validated on are made
    (:func:`models.realdata.real_slices`): padded with zeros (air, background) to a square,
    then resized to ``size``² with anti-aliasing."""
    h, w = images.shape[-2:]
    side = max(h, w)
    if (h, w) != (side, side):
        top, left = (side - h) // 2, (side - w) // 2
        images = F.pad(images, (left, side - w - left, top, side - h - top))
    if side != size:
        images = F.interpolate(
            images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return images


def mahalanobis(v: torch.Tensor, centre: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """√((v − c)ᵀ P (v − c)) for each row of v (N, T): (N,)."""
    d = v.double() - centre
    return ((d @ precision) * d).sum(dim=1).clamp_min(0).sqrt()


def calibrate(
    validation_losses: torch.Tensor,
    times: Sequence[float],
    percentile: float = 99.0,
    on: str = "reconstruction",
    tuned_by: str = "",
) -> OODCheck:
    """The check centred on the calibration slices' mean log ℓ_t, with the inverse of their
    covariance (a ridge of 1e-6 of its trace keeps it invertible with few slices), and the
    threshold at the ``percentile`` of their scores (linear interpolation)."""
    if len(validation_losses) < 2:
        raise ValueError("calibration needs at least two validation slices")
    if validation_losses.shape[1] != len(times):
        raise ValueError(f"{validation_losses.shape[1]} losses per slice for {len(times)} times")
    logs = torch.log(validation_losses.double().clamp_min(1e-12))
    centre = logs.mean(dim=0)
    cov = torch.cov(logs.T).reshape(len(times), len(times))
    cov = cov + 1e-6 * (float(cov.trace()) + 1e-12) * torch.eye(len(times), dtype=cov.dtype)
    precision = torch.linalg.inv(cov)
    threshold = float(torch.quantile(mahalanobis(logs, centre, precision), percentile / 100.0))
    return OODCheck(
        "dsm",
        on,
        tuple(times),
        centre.tolist(),
        precision.tolist(),
        threshold,
        percentile,
        tuned_by,
    )


def held_out_false_alarms(
    validation_losses: torch.Tensor, times: Sequence[float], percentile: float = 99.0
) -> float:
    """The fraction of the calibration slices flagged by a check calibrated on the others
    (leave one out): what the check's threshold does to in-domain slices it never saw.

    In sample, the threshold flags 1 − percentile of its slices by construction; a
    Mahalanobis distance over len(times) log losses fitted on few slices fits their
    covariance too closely, and flags far more of the next in-domain slices than that.
    """
    n = len(validation_losses)
    if n < 3:
        raise ValueError("a held-out false-alarm rate needs at least three calibration slices")
    flagged = 0
    for i in range(n):
        others = torch.cat([validation_losses[:i], validation_losses[i + 1 :]])
        check = calibrate(others, times, percentile)
        flagged += int(float(check.typicality(validation_losses[i : i + 1])) > check.threshold)
    return flagged / n


def summary(per_slice: list[dict]) -> dict | None:
    """A stack's verdict for ``report.json`` and the job: the worst slice's score, flagged
    when any slice is, and which slices are."""
    if not per_slice:
        return None
    worst = max(per_slice, key=lambda v: v["score"])
    return {
        "score": worst["score"],
        "threshold": worst["threshold"],
        "flag": any(v["flag"] for v in per_slice),
        "method": worst["method"],
        "flagged_slices": [i for i, v in enumerate(per_slice) if v["flag"]],
        "scores": [v["score"] for v in per_slice],
    }


def warning(verdict: dict) -> str:
    """What a radiologist reads on a flagged result (console, DICOM ImageComments)."""
    return (
        f"OUT OF DISTRIBUTION: this input is unlike the prior's training data (score "
        f"{verdict['score']:.3g} > threshold {verdict['threshold']:.3g}, {verdict['method']}); "
        "the prior may have hallucinated structure: compare with the classical image"
    )


def slice_comment(verdict_summary: dict, i: int) -> str:
    """Slice i's line for its DICOM ImageComments, from a stack's :func:`summary`."""
    v = {**verdict_summary, "score": verdict_summary["scores"][i]}
    if i in verdict_summary["flagged_slices"]:
        return warning(v)
    return (
        f"In-distribution check passed (score {v['score']:.3g} <= threshold "
        f"{v['threshold']:.3g}, {v['method']})."
    )


def auroc(inliers: Sequence[float], outliers: Sequence[float]) -> float:
    """Area under the ROC curve of a score that should be higher on ``outliers``: the
    probability that a random outlier outscores a random inlier (ties count half), i.e. the
    Mann-Whitney U statistic over the product of the counts."""
    if not inliers or not outliers:
        raise ValueError("AUROC needs at least one inlier and one outlier")
    wins = 0.0
    for o in outliers:
        for i in inliers:
            wins += 1.0 if o > i else 0.5 if o == i else 0.0
    return wins / (len(inliers) * len(outliers))
