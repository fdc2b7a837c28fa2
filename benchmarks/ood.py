"""Out-of-distribution scores and calibrated uncertainty on real held-out slices (issue 24).

For each bundled prior (``ct-default`` on sparse-view CT, ``mri-default`` on 8× MRI), under
the evaluation protocol (real slices no prior was trained on, measurements simulated on a
grid twice as fine, realistic noise), every slice of five groups is reconstructed with the
card's default settings and K posterior samples:

* ``validation``: the prior's own validation slices (calibration only);
* ``in-domain``: its own test slices (the inliers);
* ``other modality``: the other modality's test slices measured the same way (an MR slice
  through the CT prior, a CT slice through the MR prior);
* ``implant``: the in-domain test slices with metal: CT, dense inserts of 7 000 HU (their
  projections make the streaks metal makes); MR, a signal void with the dipole-shaped
  susceptibility artefact around it;
* ``heavy noise``: the in-domain test slices with ten times the protocol's noise.

Candidate scores, each an AUROC of in-domain test against each other group and seconds per
slice: (a) the prior's denoising score-matching loss (:mod:`models.ood`), on the
reconstruction and on the classical baseline image (FBP / zero-filled); (b) bits/dim
through the probability-flow ODE (:mod:`models.likelihood`, on a subset: it is slow);
(c) an AR-CSM's patch negative log-likelihood (:mod:`models.arcsm`, seed 000), trained here
on 8×8 patches of the prior's real training slices; (d) the mean posterior std.

The DSM check is calibrated on in-domain slices (the mean and covariance of log ℓ_t, the
99th percentile threshold: on the reconstruction, the validation slices; on the classical
image, which costs no reconstruction, every validation and training slice of the prior's
own sources; of the two, the better by mean AUROC of those whose threshold holds on
in-domain slices left out of their calibration, MAX_FALSE_ALARMS) and ``--write-card``
stores it in the card with the σ scale of the
posterior std: c such that |x − x̄| ≤ 2 c κ(K) s_K holds at 95 % of the object's pixels on
validation (:func:`models.inverse.calibrated_std`); ±2σ coverage on the test slices is
reported before and after.

Run: ``python benchmarks/ood.py [--n 8] [--n-val 12] [--write-card]``; ``--modalities mri``
reruns one prior and keeps the other's measurements from ``--raw`` (refused where it has
none: the page would lose that section).
Writes docs/benchmarks/ood.{md,json,png} and ood_examples.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.baselines import classical_image  # noqa: E402
from models.inverse import (  # noqa: E402
    OBJECT_LEVEL,
    Prior,
    ReconConfig,
    fit_std_scale,
    k_sample_factor,
    reconstruct,
    std_ratios,
)
from models.likelihood import bits_per_dim, log_likelihood  # noqa: E402
from models.ood import (  # noqa: E402
    DEFAULT_TIMES,
    auroc,
    calibrate,
    dsm_losses,
    held_out_false_alarms,
)
from models.protocol import simulate  # noqa: E402
from models.realdata import real_slices  # noqa: E402
from models.registry import BUNDLED, load_model, time_conditioned, update_card  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
TASKS = {  # the tasks the cards were tuned on (benchmarks/quality_real.py)
    "ct": ("ct-sparse", 23, "gaussian:0.005", "gaussian:0.05", "ct-default", "mr"),
    "mri": ("mri", 8, "complex:0.01", "complex:0.1", "mri-default", "ct"),
}
OUTLIERS = ("other modality", "implant", "heavy noise")
# A check may go in the card only if, calibrated without it, it flags at most this fraction
# of its calibration slices (leave one out; models.ood.held_out_false_alarms): a distance
# over six log losses fitted on the 12 validation reconstructions flags most in-domain
# slices it did not see, whatever its AUROC.
MAX_FALSE_ALARMS = 0.1
OTHER_SOURCES = "other sources"  # the same modality from other scanners and subjects
BPD_STEPS = 16


def implants(fine: torch.Tensor, modality: str, seed: int = 0) -> torch.Tensor:
    """``fine`` (N, 1, 2n, 2n) with a metal insert in the object of each slice: CT, one or
    two dense discs (radius 2-4 mm, 2.0 on the [0, 1] scale: about 7 000 HU, beyond the
    window); MR, a void of the same size with a dipole pattern, 1 + 0.8 cos 2θ (r/ρ)³."""
    g = torch.Generator().manual_seed(seed)
    out = fine.clone()
    size = fine.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(len(out)):
        inside = torch.nonzero(fine[i, 0] > 0.2)
        for _ in range(1 if modality == "mri" else 1 + int(torch.randint(2, (1,), generator=g))):
            cy, cx = inside[int(torch.randint(len(inside), (1,), generator=g))].tolist()
            r = 4 + 4 * float(torch.rand(1, generator=g))  # fine pixels of about 0.5 mm... 1 mm
            rho = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
            disc = rho <= r
            if modality == "ct":
                out[i, 0][disc] = 2.0
            else:
                theta = torch.atan2((yy - cy).float(), (xx - cx).float())
                dipole = 1 + 0.8 * torch.cos(2 * theta) * (r / rho.clamp_min(r)) ** 3
                out[i, 0] = (out[i, 0] * dipole).clamp(0, 1)
                out[i, 0][disc] = 0.0
    return out


# The real sources each prior's validation slices come from: in-domain test slices are
# their held-out test slabs; other sources of the same modality are a group of their own.
OWN_SOURCES = {"ct": ["cranium"], "mri": ["colin27"]}


def fine(modality: str, split: str, n: int | None, sources=None, exclude=None) -> torch.Tensor:
    """Real slices at 256² (twice the reconstruction's grid), ``n`` spread over the split."""
    kind = "ct" if modality == "ct" else "mr"
    names = sources
    if exclude is not None:
        from models.realdata import load_manifest

        names = [e["name"] for e in load_manifest()["sources"] if e["modality"] == kind]
        names = [x for x in names if x not in exclude]
        if not names:  # real_slices reads an empty list as every source
            return torch.zeros(0, 1, 256, 256)
    arr = torch.from_numpy(real_slices(kind, split, 256, sources=names))[:, None]
    if n is not None and n < len(arr):
        arr = arr[torch.linspace(0, len(arr) - 1, n).round().long()]
    return arr


def groups(modality: str, n: int, n_val: int) -> dict[str, tuple[torch.Tensor, str]]:
    task, level, noise, heavy, _, other = TASKS[modality]
    own = OWN_SOURCES[modality]
    test = fine(modality, "test", n, own)
    out = {
        "validation": (fine(modality, "val", n_val, own), noise),
        "in-domain": (test, noise),
        "other modality": (fine("mri" if other == "mr" else "ct", "test", n), noise),
        "implant": (implants(test, modality), noise),
        "heavy noise": (test, heavy),
    }
    others = fine(modality, "test", n, exclude=own)
    if len(others):
        out[OTHER_SOURCES] = (others, noise)
    return out


def calibration_set(modality: str) -> tuple[torch.Tensor, str]:
    """Every real validation and training slice of the prior's own sources, for a check on
    the classical image (cheap: no reconstruction), whose spread of anatomy the validation
    slab alone does not cover."""
    task, level, noise, *_ = TASKS[modality]
    own = OWN_SOURCES[modality]
    return torch.cat([fine(modality, "val", None, own), fine(modality, "train", None, own)]), noise


def arcsm_prior(modality: str, steps: int):
    """An AR-CSM on 8×8 patches of the prior's real training slices."""
    from models.arcsm import ARCSMConfig, image_patches, train_arcsm

    own = "ct" if modality == "ct" else "mr"
    train = torch.from_numpy(real_slices(own, "train", 128))[:, None]
    patches = image_patches(train, size=8, stride=4)
    return train_arcsm(patches, ARCSMConfig(steps=steps, seed=0))


def run_prior(modality: str, n: int, n_val: int, n_bpd: int, arcsm_steps: int) -> dict:
    task, level, _, _, name, _ = TASKS[modality]
    prior = Prior.load(name, bf16=None)
    net, sde, _ = load_model(name)
    with_grad = time_conditioned(net.eval(), sde)  # the ODE's divergence needs autograd
    config = ReconConfig.for_prior(prior, modality)
    config.std_scale, config.ood = 0.0, False  # raw std and no check: both are measured here
    arcsm = arcsm_prior(modality, arcsm_steps) if arcsm_steps else None
    if arcsm is not None:
        from models.arcsm import patch_nll_score
    rows: dict[str, list[dict]] = {"calibration": []}
    cal, cal_noise = calibration_set(modality)
    for i in tqdm(range(len(cal)), desc=f"{name} calibration (classical image)", unit="slice"):
        sim = simulate(cal[i : i + 1], task, level, cal_noise, seed=100 + i)
        base = classical_image(sim.operator, sim.y)
        losses = dsm_losses(prior.score_fn, prior.sde, base, seed=100 + i)[0].tolist()
        rows["calibration"].append({"dsm_base": losses})
    examples = {}
    for group, (fine_images, noise) in groups(modality, n, n_val).items():
        rows[group] = []
        for i in tqdm(range(len(fine_images)), desc=f"{name} {group}", unit="slice"):
            sim = simulate(fine_images[i : i + 1], task, level, noise, seed=i)
            t0 = time.perf_counter()
            rec = reconstruct(sim.operator, sim.y, prior, config, None, i)
            row: dict = {"recon_s": time.perf_counter() - t0}
            base = classical_image(sim.operator, sim.y)
            mean = rec.mean.clamp(0, 1)
            t0 = time.perf_counter()
            row["dsm_recon"] = dsm_losses(prior.score_fn, prior.sde, mean, seed=i)[0].tolist()
            row["dsm_s"] = time.perf_counter() - t0
            row["dsm_base"] = dsm_losses(prior.score_fn, prior.sde, base, seed=i)[0].tolist()
            row["std"] = float(rec.std.mean())
            if i < n_bpd and group != "validation":
                t0 = time.perf_counter()
                g = torch.Generator().manual_seed(i)
                logp = log_likelihood(sde, with_grad, mean, BPD_STEPS, generator=g)
                row["bpd"] = float(bits_per_dim(logp, mean[0].numel())[0])
                row["bpd_s"] = time.perf_counter() - t0
            if arcsm is not None:
                t0 = time.perf_counter()
                row["arcsm_recon"] = float(patch_nll_score(arcsm, mean[0, 0], size=8, stride=8))
                row["arcsm_s"] = time.perf_counter() - t0
                row["arcsm_base"] = float(patch_nll_score(arcsm, base[0, 0], size=8, stride=8))
            if group in ("validation", "in-domain"):
                row["coverage"] = coverage_terms(sim.reference, rec.mean, rec.std)
            rows[group].append(row)
            if i == 0:
                examples[group] = (sim.reference[0, 0], mean[0, 0])
    return {
        "prior": name,
        "date": time.strftime("%Y-%m-%d"),
        "task": f"{task} {level}",
        "samples": config.samples,
        "rows": rows,
        "examples": examples,
    }


def coverage_terms(ref: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Per pixel |x − x̄| / (2 s_K) of the object and of the whole slice, as quantiles are
    fitted later: kept as arrays of ratios (∞ where s_K = 0 and the error is not)."""
    return {
        "object": std_ratios(ref, mean, std, object_only=True).numpy(),
        "all": std_ratios(ref, mean, std).numpy(),
    }


def analyse(result: dict, percentile: float) -> dict:
    rows, k = result["rows"], result["samples"]
    times = DEFAULT_TIMES
    out: dict = {"prior": result["prior"], "task": result["task"], "samples": k}
    out["date"] = result.get("date")
    checks, false_alarms = {}, {}
    for where in ("recon", "base"):
        source = "calibration" if where == "base" and rows.get("calibration") else "validation"
        val = torch.tensor([r[f"dsm_{where}"] for r in rows[source]], dtype=torch.float64)
        checks[where] = calibrate(
            val,
            times,
            percentile,
            "reconstruction" if where == "recon" else "baseline",
            "benchmarks/ood.py",
        )
        false_alarms[f"dsm_{where}"] = held_out_false_alarms(val, times, percentile)

    def scores(group: str, method: str) -> list[float]:
        rs = rows[group]
        if method.startswith("dsm_"):
            check = checks[method[4:]]
            losses = torch.tensor([r[method] for r in rs], dtype=torch.float64)
            return check.typicality(losses).tolist()
        return [r[method] for r in rs if method in r]

    extra = [OTHER_SOURCES] if OTHER_SOURCES in rows else []
    methods = ["dsm_recon", "dsm_base", "bpd", "arcsm_recon", "arcsm_base", "std"]
    methods = [m for m in methods if scores("in-domain", m)]
    table = {}
    for m in methods:
        inl = scores("in-domain", m)
        entry = {}
        for g in (*OUTLIERS, *extra):
            outl = scores(g, m)
            if m == "bpd":  # bits/dim of an atypical image may be lower as well as higher
                centre = statistics.median(inl)
                entry[g] = auroc([abs(v - centre) for v in inl], [abs(v - centre) for v in outl])
            else:
                entry[g] = auroc(inl, outl) if outl else float("nan")
        seconds_key = {
            "dsm_recon": "dsm_s",
            "dsm_base": "dsm_s",
            "bpd": "bpd_s",
            "arcsm_recon": "arcsm_s",
            "arcsm_base": "arcsm_s",
        }.get(m)
        entry["seconds"] = (
            statistics.fmean(r[seconds_key] for g in rows for r in rows[g] if seconds_key in r)
            if seconds_key
            else 0.0
        )
        table[m] = entry
    out["auroc"] = table
    out["recon_s"] = statistics.fmean(r["recon_s"] for g in rows for r in rows[g] if "recon_s" in r)
    # The better by mean AUROC of the checks whose threshold holds on in-domain slices it
    # was not calibrated on (else the one that flags fewest of them).
    usable = [m for m in ("dsm_recon", "dsm_base") if false_alarms[m] <= MAX_FALSE_ALARMS]
    chosen = max(
        usable or [min(false_alarms, key=false_alarms.get)],
        key=lambda m: statistics.fmean(table[m][g] for g in OUTLIERS),
    )
    out["held_out_false_alarms"] = false_alarms
    check = checks[chosen[4:]]
    out["check"] = check.to_card()
    out["flag_rate"] = {
        g: statistics.fmean(s > check.threshold for s in scores(g, chosen))
        for g in ("validation", "in-domain", *OUTLIERS, *extra)
    }
    out["scores"] = {g: scores(g, chosen) for g in ("validation", "in-domain", *OUTLIERS, *extra)}
    out["calibration_slices"] = len(rows.get("calibration") or rows["validation"])
    out["extra"] = extra
    # σ scale: the 95th percentile of |x − x̄| / (2 κ s) on the validation object.
    kappa = k_sample_factor(k) if k > 1 else float("nan")
    val_ratio = np.concatenate([r["coverage"]["object"] for r in rows["validation"]])
    scale = fit_std_scale(torch.from_numpy(val_ratio), k)
    out["std_scale"] = scale
    out["kappa"] = kappa
    cov = {}
    for part in ("object", "all"):
        ratios = np.concatenate([r["coverage"][part] for r in rows["in-domain"]])
        cov[part] = {
            "before": float(np.mean(ratios <= 1.0)),
            "after": float(np.mean(ratios <= scale * kappa)),
        }
    out["coverage_test"] = cov
    return out


def figure(results: list[dict], analyses: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(analyses), figsize=(6 * len(analyses), 4), squeeze=False)
    for ax, a in zip(axes[0], analyses, strict=True):
        for j, vals in enumerate(a["scores"].values()):
            ax.scatter(np.full(len(vals), j) + np.linspace(-0.15, 0.15, len(vals)), vals, s=14)
        ax.axhline(
            a["check"]["threshold"], color="k", ls="--", lw=1, label="threshold (99th pct. val)"
        )
        ax.set_xticks(range(len(a["scores"])), list(a["scores"]), rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel(f"OOD score ({a['check']['method']} on the {a['check']['on']})")
        ax.set_title(f"{a['prior']}: {a['task']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def examples_figure(results: list[dict], analyses: list[dict], path: Path) -> None:
    groups_ = ["in-domain", *OUTLIERS]
    fig, axes = plt.subplots(
        len(results), len(groups_), figsize=(3 * len(groups_), 3.2 * len(results)), squeeze=False
    )
    for row, (res, a) in enumerate(zip(results, analyses, strict=True)):
        for col, g in enumerate(groups_):
            ax = axes[row, col]
            ax.imshow(res["examples"][g][1].numpy(), cmap="gray", vmin=0, vmax=1)
            s = a["scores"][g][0]
            flag = s > a["check"]["threshold"]
            ax.set_title(
                f"{res['prior']} · {g}\nscore {s:.3g} {'FLAGGED' if flag else 'ok'}",
                fontsize=9,
                color="red" if flag else "black",
            )
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(analyses: list[dict], args, stamp: str) -> str:
    names = {
        "dsm_recon": "(a) DSM loss, on the reconstruction",
        "dsm_base": "(a) DSM loss, on the classical image",
        "bpd": f"(b) bits/dim, probability-flow ODE ({BPD_STEPS} Heun steps, |bpd − median|)",
        "arcsm_recon": "(c) AR-CSM patch NLL, on the reconstruction",
        "arcsm_base": "(c) AR-CSM patch NLL, on the classical image",
        "std": "(d) mean posterior std",
    }
    lines = [
        "# Out-of-distribution scores and calibrated uncertainty",
        "",
        f"Measured by `python benchmarks/ood.py --n {args.n} --n-val {args.n_val} --n-bpd "
        f"{args.n_bpd} --arcsm-steps {args.arcsm_steps} --threads {args.threads}` on {stamp}. "
        "Real held-out slices under the evaluation protocol (measurements simulated on a "
        "grid twice as fine, realistic noise); each slice reconstructed with its prior "
        "card's default settings. "
        "In-domain: the held-out test slabs of the sources the validation slices come from "
        f"({', '.join(f'{k}: {v[0]}' for k, v in OWN_SOURCES.items())}); '{OTHER_SOURCES}': "
        "the same modality's test slices from other scanners and subjects, reported apart. "
        "AUROC: the in-domain test slices against each outlier group (1 = every outlier scores "
        "above every inlier). Seconds: per slice for the score alone; a reconstruction's "
        "time is given under each table. Bits/dim ran on the first "
        f"{args.n_bpd} slices of each group.",
        "",
    ]
    for a in analyses:
        cols = [*OUTLIERS, *a.get("extra", [])]
        lines += [
            f"## {a['prior']} ({a['task']}, K = {a['samples']})"
            + (f", measured {a['date']}" if a.get("date") else ""),
            "",
            "| score | " + " | ".join(cols) + " | s / slice | % of a reconstruction |",
            "|---|" + "---|" * (len(cols) + 2),
        ]
        for m, e in a["auroc"].items():
            lines.append(
                f"| {names[m]} | "
                + " | ".join(f"{e[g]:.3f}" for g in cols)
                + f" | {e['seconds']:.2f} | {100 * e['seconds'] / a['recon_s']:.1f} |"
            )
        c = a["check"]
        lines += [
            "",
            f"A reconstruction took {a['recon_s']:.1f} s per slice. The card's check: "
            f"{c['method']} on the {c['on']} (the better of the two by mean AUROC of those "
            f"that flag at most {100 * MAX_FALSE_ALARMS:.0f} % of their calibration slices "
            "when calibrated without each, leave one out: "
            + ", ".join(
                f"{names[m]} {100 * r:.0f} %" for m, r in a["held_out_false_alarms"].items()
            )
            + "), times "
            f"{', '.join(f'{t:g}' for t in c['times'])}, threshold {c['threshold']:.3f} "
            f"(the {c['percentile']:g}th percentile of the scores of "
            f"{a['calibration_slices']} in-domain slices: "
            + (
                "every real validation and training slice of the prior's own sources, "
                "their classical images)."
                if c["on"] == "baseline"
                else "the validation slices' reconstructions)."
            ),
            "",
            "| group | slices flagged |",
            "|---|---|",
        ]
        lines += [f"| {g} | {100 * r:.0f} % |" for g, r in a["flag_rate"].items()]
        chosen = a["auroc"]["dsm_" + ("base" if c["on"] == "baseline" else "recon")]
        share = chosen["seconds"] / a["recon_s"]
        lines += [
            "",
            "Against the issue's aims, the card's check: cross-modality AUROC "
            f"{chosen['other modality']:.3f} (aim ≥ 0.95: "
            f"{'met' if chosen['other modality'] >= 0.95 else 'not met'}), implants "
            f"{chosen['implant']:.3f} (aim ≥ 0.85: "
            f"{'met' if chosen['implant'] >= 0.85 else 'not met'}), "
            f"{100 * share:.1f} % of a reconstruction's time (aim < 10 %: "
            f"{'met' if share < 0.1 else 'not met'}).",
        ]
        cov = a["coverage_test"]
        lines += [
            "",
            f"±2σ coverage on the in-domain test slices: in the object (reference > "
            f"{OBJECT_LEVEL}) {100 * cov['object']['before']:.1f} % before calibration, "
            f"{100 * cov['object']['after']:.1f} % after; all pixels "
            f"{100 * cov['all']['before']:.1f} % → {100 * cov['all']['after']:.1f} %. "
            f"Calibration: std = c κ(K) s_K with κ({a['samples']}) = {a['kappa']:.3f} and "
            f"c = {a['std_scale']:.3f} fitted on the validation slices.",
            "",
        ]
    lines += ["![scores](ood.png)", "", "![examples](ood_examples.png)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="test slices per group")
    ap.add_argument("--n-val", type=int, default=12, help="validation slices for calibration")
    ap.add_argument("--n-bpd", type=int, default=3, help="slices per group scored by bits/dim")
    ap.add_argument("--arcsm-steps", type=int, default=2000, help="AR-CSM training (0: skip)")
    ap.add_argument("--percentile", type=float, default=99.0)
    ap.add_argument("--modalities", nargs="+", default=list(TASKS))
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--write-card", action="store_true")
    ap.add_argument("--raw", default="runs/ood_raw.pt", help="where the measurements are kept")
    ap.add_argument("--analyse-only", action="store_true", help="re-analyse --raw, run nothing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stamp = f"{platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    raw = Path(args.raw)
    # The page covers every modality: those not run now come from --raw, or are run too.
    kept = torch.load(raw, weights_only=False) if raw.exists() else []
    missing = [
        m
        for m in TASKS
        if m not in args.modalities and TASKS[m][4] not in {r["prior"] for r in kept}
    ]
    if args.analyse_only:
        results = kept
    elif missing:
        ap.error(
            f"--modalities {' '.join(args.modalities)}: {raw} holds no run of "
            f"{', '.join(missing)}, whose section the page would lose; run them too"
        )
    else:
        ran = [
            run_prior(m, args.n, args.n_val, args.n_bpd, args.arcsm_steps) for m in args.modalities
        ]
        by_prior = {r["prior"]: r for r in kept} | {r["prior"]: r for r in ran}
        results = [by_prior[TASKS[m][4]] for m in TASKS if TASKS[m][4] in by_prior]
        raw.parent.mkdir(parents=True, exist_ok=True)
        torch.save(results, raw)  # the measurements, to re-analyse without re-running
    analyses = [analyse(r, args.percentile) for r in results]
    DOCS.mkdir(parents=True, exist_ok=True)
    figure(results, analyses, DOCS / "ood.png")
    examples_figure(results, analyses, DOCS / "ood_examples.png")
    (DOCS / "ood.json").write_text(json.dumps(analyses, indent=2))
    (DOCS / "ood.md").write_text(markdown(analyses, args, stamp))
    import quality  # benchmarks/quality.py: its page shows the coverage measured here

    quality.write_page()
    if args.write_card:
        for m, a in (
            (m, a) for m in args.modalities for a in analyses if a["prior"] == TASKS[m][4]
        ):
            card_mod = "ct" if m == "ct" else "mri"
            path = BUNDLED / TASKS[m][4]
            card = json.loads((path / "card.json").read_text())
            recon = card.get("recon", {})
            recon.setdefault(card_mod, {})["std_scale"] = round(a["std_scale"], 4)
            recon[card_mod]["std_scale_tuned_by"] = (
                f"benchmarks/ood.py ({args.n_val} real val slices: 95 % of the object's pixels "
                "within 2 std)"
            )
            update_card(path, {"ood": a["check"], "recon": recon})
    print((DOCS / "ood.md").read_text())


if __name__ == "__main__":
    main()
