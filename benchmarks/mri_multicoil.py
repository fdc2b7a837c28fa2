"""Multi-coil MRI on realistic data: the score solver against the field's classical methods.

The test set (models/multicoil.py): real MR slices no prior saw (the test slabs of
models/realdata.py; the validation slabs for tuning), simulated on a grid twice as fine with
a smooth phase, 8 Biot-Savart loop coils, coil noise of std 0.01 per component correlated
across coils, the readout 2× oversampled (files of 256 × 128), written as fastMRI HDF5 and
read back through the same reader as the gateway's. Reconstruction matrix 128 × 128, the
prior's (rectangular matrices run through the gateway's tests; cropping these slices to one
would cut the objects that fill the field of view).

Per task (4× and 8×, equispaced and random lines, fastMRI's centre fractions of 0.08 and
0.04 but never fewer than 9 lines, which ESPIRiT needs at this matrix), each slice is
solved as the worker solves it (models.physics.slice_problems): coil maps by ESPIRiT from
its own calibration lines, data and operator pre-whitened by the coil noise covariance
estimated from the empty half of the oversampled readout. Methods: zero-filled RSS, SENSE
(CG, Tikhonov), L1-wavelet SENSE (sigpy), TV-SENSE (FISTA), each with its weight tuned on
2 validation slices, their field-filling close-ups and the same as coarse noisy scans (the
test set has such slices); the score solver (mri-default, in bf16 where that measures
faster, as the workers run it) at its card's defaults, with the TV weight λ of its map
step (ReconConfig.tv) chosen on the same validation slices over all tasks (``--tv`` fixes
it), then its warm start and NFE (ReconConfig.start: the sampler started from the
forward-diffused least-squares image) by the same slices (``--write-card`` stores both in
the card's ``multicoil`` values). ``--priors A B ...``
compares priors (bundled names or candidate folders, all at the shipped card's values and
the chosen λ, start and NFE) on the same validation slices; the best runs the test.
``--tune-holdout`` compares the fixed λ with λ chosen per slice among λ × HOLDOUT_FACTORS by
k-space hold-out (models/holdout.py) on the same slices. ``--tune-rho-eta`` chooses ρ and η
(``--rho-grid`` and ``--eta-grid`` set where it looks). ``--calibrate-std`` fits the scale
of the posterior std of the card's K draws so that ±2 std holds the truth at 95 % of the
validation slices' object pixels (the single-coil scale, benchmarks/ood.py's, does not
fit draws that start from the data); the test slices' coverage is reported.
PSNR / SSIM against the magnitude of the fully sampled object (data range 1).

Each validation measurement (one task's mean PSNR at one configuration) is kept in
``--val-cache`` (runs/, not committed), keyed by the task, the slices, the prior's weights and
every solver value that moves a one-sample mean: the solves are seeded, so a later run of
any grid reads what an earlier one measured instead of solving again.

Run: ``python benchmarks/mri_multicoil.py [--n 4] [--tasks 4x-equispaced ...]``.
Writes docs/benchmarks/mri_multicoil.{md,json} and mri_multicoil_<task>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from models.baselines import cs_wavelet, fista_tv, reconstruct_baseline, sense  # noqa: E402
from models.inverse import (  # noqa: E402
    OBJECT_LEVEL,
    Prior,
    ReconConfig,
    fit_std_scale,
    k_sample_factor,
    reconstruct,
    std_ratios,
)
from models.measurements import as_measurement, read_array  # noqa: E402
from models.metrics import psnr, ssim  # noqa: E402
from models.multicoil import simulate_multicoil, write_fastmri  # noqa: E402
from models.physics import layout_operator, parse_spec, slice_problems  # noqa: E402
from models.protocol import fine_slices, validation_slices  # noqa: E402
from models.registry import load_card, update_card  # noqa: E402
from models.tuning import search_outward  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
TASKS = {
    "4x-equispaced": (4, "equispaced"),
    "4x-random": (4, "random"),
    "8x-equispaced": (8, "equispaced"),
    "8x-random": (8, "random"),
}
SHAPE = (128, 128)
COILS, NOISE, CORRELATION = 8, 0.01, 0.3
MIN_CENTRE_LINES = 9
NFE = 100
MODEL = "mri-default"
# λ of the TV term in the score solver's map step (ReconConfig.tv), chosen on validation.
TV_GRID = (0.0, 5.0, 10.0, 20.0)
# Then the warm start (ReconConfig.start) and NFE at that λ: the fewest NFE within
# MAX_LOSS dB of the best validation PSNR (benchmarks/warm_start.py's rule, single-coil).
START_GRID = ((1.0, 100), (0.6, 100), (0.4, 100), (1.0, 50), (0.8, 50), (0.6, 50), (0.4, 50))
MAX_LOSS = 0.2
# Then ρ (the map step's error scale r_t = ρ β/α) and η (the fraction of fresh noise when
# re-noising) at that λ, start and NFE, one after the other (``--tune-rho-eta``): the
# single-coil card's values were tuned without TV and without coil maps.
RHO_GRID = (0.3, 0.6, 1.0, 1.6)
RHO_STEP, RHO_EXTEND = 1.6, 3  # while the best ρ is the largest tried, try ×1.6, 3 times at most
ETA_GRID = (0.6, 0.85, 1.0)
# Then where each slice's unit lands in the prior's range (ReconConfig.intensity_level;
# ``--tune-level``): the data here are in the prior's unit, but a scanner's are not.
LEVEL_GRID = (0.7, 0.8, 0.9, 1.0)
LEVEL_STEP, LEVEL_EXTEND = 0.85, 3  # while the best level is the smallest tried, try ×0.85
# A candidate prior replaces the shipped one (``--priors``' first) only by more than this on
# validation: a tie is noise of one posterior sample on a few slices, and a new prior costs
# its OOD calibration and every figure measured with the old one.
PRIOR_MARGIN = 0.1
# Then the map step's λ fixed, or chosen per slice among λ × these by k-space hold-out
# (ReconConfig.tv_holdout, models/holdout.py; ``--tune-holdout``): at 8× the validation
# slices like the prior's data want λ 10 and the coarse ones 40, 1-2 dB apart either way.
HOLDOUT_FACTORS = (1.0, 4.0)
# Then the scale of the posterior std (``--calibrate-std``) at the card's K, fitted on the
# validation slices (models.inverse.fit_std_scale) as benchmarks/ood.py fits the
# single-coil one: these draws, started from the data, spread less. The PSNR of the mean
# of the first k of those K draws is reported for each k of SAMPLES_SHOWN up to K.
SAMPLES_SHOWN = (1, 2, 4, 8)
# Each classical method's weight, tuned on the validation slices from these.
WEIGHTS = {
    "sense": (1e-3, 1e-2, 3e-2, 0.1),
    "cs-wavelet": (1e-4, 3e-4, 1e-3, 3e-3),
    "cs-tv": (3e-4, 1e-3, 3e-3, 1e-2),
}
CLASSICAL = {
    "sense": lambda op, y, w: sense(op, y, lam=w),
    "cs-wavelet": lambda op, y, w: cs_wavelet(op, y, w),
    "cs-tv": lambda op, y, w: fista_tv(op, y, w),
}


def centre_fraction(acceleration: int) -> float:
    fastmri = 0.08 if acceleration <= 4 else 0.04
    return max(fastmri, MIN_CENTRE_LINES / SHAPE[1])


def case(split: str, n: int, acceleration: int, kind: str, seed: int):
    """Slices of ``split`` as a fastMRI file read back: (spec, per-slice problems, case).
    Validation adds a field-filling close-up of each slice (models.protocol.close_ups), and
    the same as a coarse noisy scan (coarse_close_ups), as the test set holds such slices
    (nibabel's small 2 mm volume)."""
    if split == "val":
        fine = validation_slices("mri", SHAPE[0], n)
    else:
        fine = fine_slices("mri", split, SHAPE[0], n)
    sim = simulate_multicoil(
        fine,
        COILS,
        acceleration,
        kind,
        centre_fraction(acceleration),
        NOISE,
        CORRELATION,
        seed=seed,
    )
    mask = {"kind": "explicit", "lines": sim.mask.nonzero().flatten().tolist()}
    spec = parse_spec(
        {"modality": "mri", "image_size": list(SHAPE), "sensitivities": "espirit", "mask": mask}
    )
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_fastmri(Path(tmp) / "case.h5", sim).read_bytes()
    arr = read_array(raw)
    y = as_measurement(arr, layout_operator(spec, arr))
    t0 = time.perf_counter()
    ops, y = slice_problems(spec, y)
    maps_s = (time.perf_counter() - t0) / len(y)
    return ops, y, sim.reference, maps_s


def tune(ops, y, ref) -> dict:
    """Each classical method's weight with the best mean validation PSNR."""
    best = {}
    for method, weights in WEIGHTS.items():
        scores = {
            w: statistics.fmean(
                psnr(CLASSICAL[method](op, y[i : i + 1], w)[0].abs().clamp(0, 1), ref[i])
                for i, op in enumerate(ops)
            )
            for w in weights
        }
        best[method] = max(scores, key=scores.get)
        print(f"  {method}: weight {best[method]} ({scores[best[method]]:.2f} dB on val)")
    return best


def val_psnr(prior: Prior, config: ReconConfig, ops, y, ref) -> float:
    """Mean PSNR over validation slices of one posterior sample each, at ``config``."""
    return statistics.fmean(
        psnr(reconstruct(op, y[i : i + 1], prior, config, 1, i).mean[0].clamp(0, 1), ref[i])
        for i, op in enumerate(ops)
    )


# ReconConfig fields that do not move the mean of one posterior sample: left out of the
# validation cache's key, so that calibrating K's std does not void what was measured.
UNUSED_BY_ONE_SAMPLE = ("samples", "std_scale", "ood")


class ValCache:
    """Validation PSNRs measured by earlier runs, in a JSON file (none: kept in memory)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.values: dict[str, float] = (
            json.loads(path.read_text()) if path is not None and path.exists() else {}
        )

    @staticmethod
    def key(name: str, prior: Prior, config: ReconConfig, n: int) -> str:
        settings = {
            k: v for k, v in dataclasses.asdict(config).items() if k not in UNUSED_BY_ONE_SAMPLE
        }
        weights = prior.card.get("weights_sha256") or prior.name
        return json.dumps(
            {"task": name, "slices": n, "weights": weights, "engine": prior.engine} | settings,
            sort_keys=True,
        )

    def put(self, key: str, value: float) -> None:
        self.values[key] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.values, indent=1))


VAL_CACHE = ValCache()  # main() opens --val-cache's file


def measured(prior: Prior, vals: dict, table: dict, key, label: str, nfe: int, **settings) -> float:
    """Mean validation PSNR over the tasks (one posterior sample) with the ReconConfig fields
    ``settings`` over the card's values; each task's kept in ``table[task][key]``, measured
    once (and read from VAL_CACHE where an earlier run measured it)."""
    for name, (ops, y, ref) in vals.items():
        if key in table.setdefault(name, {}):
            continue
        config = chosen_config(prior, ops[0], nfe, settings)
        cached = ValCache.key(name, prior, config, len(ops))
        if cached in VAL_CACHE.values:
            table[name][key] = VAL_CACHE.values[cached]
            source = "measured earlier"
        else:
            table[name][key] = val_psnr(prior, config, ops, y, ref)
            VAL_CACHE.put(cached, table[name][key])
            source = "measured"
        print(f"  {name} val: {label}: {table[name][key]:.2f} dB ({source})", flush=True)
    return statistics.fmean(t[key] for t in table.values())


def select_tv(prior: Prior, vals: dict) -> tuple[float, dict]:
    """The TV weight λ of TV_GRID with the best mean validation PSNR over the tasks, one
    posterior sample per slice; and each λ's mean PSNR per task."""
    table: dict[str, dict[float, float]] = {}
    best = max(
        TV_GRID,
        key=lambda tv: measured(prior, vals, table, tv, f"λ_TV {tv:g}", NFE, tv=tv, start=1.0),
    )
    return best, table


def start_nfe(text: str) -> tuple[float, int]:
    """``"START/NFE"`` (e.g. ``0.6/50``) as the pair (0.6, 50), for ``--start-grid``."""
    try:
        start, nfe = text.split("/")
        return float(start), int(nfe)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START/NFE such as 0.6/50, got {text!r}"
        ) from None


def select_start(
    prior: Prior, vals: dict, tv: float, grid: tuple[tuple[float, int], ...] = START_GRID
) -> tuple[tuple[float, int], dict]:
    """(start, NFE) of ``grid`` at the map step's λ = ``tv`` and the card's other values: the
    fewest NFE within MAX_LOSS dB of the best mean validation PSNR over the tasks (one
    posterior sample); and each pair's mean PSNR per task."""
    table: dict[str, dict[tuple, float]] = {}
    mean = {
        (start, nfe): measured(
            prior, vals, table, (start, nfe), f"start {start}, {nfe} NFE", nfe, tv=tv, start=start
        )
        for start, nfe in grid
    }
    kept = [pair for pair in grid if mean[pair] >= max(mean.values()) - MAX_LOSS]
    return min(kept, key=lambda pair: (pair[1], -mean[pair])), table


def select_rho_eta(
    prior: Prior,
    vals: dict,
    chosen: dict,
    nfe: int,
    rho_grid: tuple[float, ...] = RHO_GRID,
    eta_grid: tuple[float, ...] = ETA_GRID,
    extend: int = RHO_EXTEND,
) -> tuple[tuple[float, float], dict]:
    """(ρ, η): ρ of ``rho_grid`` (extended ``extend`` times at most while its largest is
    best) at the card's η, then η of ``eta_grid`` at that ρ, each the best mean validation
    PSNR over the tasks (one posterior sample) at the values ``chosen`` before and the card's
    others; and each pair's mean PSNR per task."""
    table: dict[str, dict[tuple, float]] = {}

    def measure(rho: float, eta: float) -> float:
        label = f"ρ {rho:g}, η {eta:g}"
        return measured(prior, vals, table, (rho, eta), label, nfe, **chosen, rho=rho, eta=eta)

    eta = ReconConfig.for_prior(prior, "mri", operator=next(iter(vals.values()))[0][0]).eta
    rhos = search_outward(
        lambda r: measure(r, eta), rho_grid, RHO_STEP, extend, down=False, digits=3
    )
    rho = max(rhos, key=rhos.get)
    eta = max(eta_grid, key=lambda e: measure(rho, e))
    return (rho, eta), table


def select_level(prior: Prior, vals: dict, chosen: dict, nfe: int) -> tuple[float, dict]:
    """The intensity level of LEVEL_GRID (extended below while its smallest is best) with the
    best mean validation PSNR over the tasks (one posterior sample), at the values ``chosen``
    before and the card's others; and each level's mean PSNR per task."""
    table: dict[str, dict[float, float]] = {}

    def measure(level: float) -> float:
        return measured(
            prior, vals, table, level, f"level {level:g}", nfe, **chosen, intensity_level=level
        )

    levels = search_outward(measure, LEVEL_GRID, 1 / LEVEL_STEP, LEVEL_EXTEND, up=False, digits=3)
    return max(levels, key=levels.get), table


def select_holdout(
    prior: Prior, vals: dict, chosen: dict, nfe: int
) -> tuple[tuple[float, ...], dict]:
    """The map step's λ for every slice, or each slice's own among λ × HOLDOUT_FACTORS by
    k-space hold-out, whichever has the better mean validation PSNR over the tasks (one
    posterior sample) at the values ``chosen`` before; the candidates (empty: fixed) and
    each choice's mean PSNR per task."""
    table: dict[str, dict[str, float]] = {}
    candidates = tuple(chosen["tv"] * f for f in HOLDOUT_FACTORS)
    options = {"fixed": (), "hold-out " + "/".join(f"{c:g}" for c in candidates): candidates}
    mean = {
        key: measured(prior, vals, table, key, key, nfe, tv_holdout=grid, **chosen)
        for key, grid in options.items()
    }
    return options[max(mean, key=mean.get)], table


def chosen_config(prior: Prior, op, nfe: int, chosen: dict) -> ReconConfig:
    """The card's multi-coil values for ``op`` with the ReconConfig fields ``chosen`` here
    over them."""
    config = ReconConfig.for_prior(prior, "mri", nfe=nfe, operator=op)
    for field, value in chosen.items():
        setattr(config, field, value)
    return config


def calibrate_std(prior: Prior, vals: dict, config_of) -> tuple[float, dict[str, dict]]:
    """The scale c of the posterior std at K = the config's samples (``config_of(op)``: the
    chosen values), fitted on the object pixels of every task's validation slices, each
    solved once with K draws; and per task the mean PSNR of the mean of the first k draws
    for each k of SAMPLES_SHOWN up to K (the draws are independent: what K = k scores)."""
    draws: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    table: dict[str, dict[int, float]] = {}
    k = 1
    for name, (ops, y, ref) in vals.items():
        draws[name] = []
        for i, op in enumerate(ops):
            config = config_of(op)
            k, config.std_scale, config.ood = config.samples, 0.0, False
            rec = reconstruct(op, y[i : i + 1], prior, config, k, i)
            draws[name].append((rec.samples[0], ref[i]))
        table[name] = {
            j: statistics.fmean(psnr(s[:j].mean(0).clamp(0, 1), r[0]) for s, r in draws[name])
            for j in SAMPLES_SHOWN
            if j <= k
        }
        print(f"  {name} val: " + ", ".join(f"K {j}: {v:.2f} dB" for j, v in table[name].items()))
    ratios = torch.cat(
        [
            std_ratios(r[0], s.mean(0), s.std(0), object_only=True)
            for slices in draws.values()
            for s, r in slices
        ]
    )
    return fit_std_scale(ratios, k), table


def select_prior(
    shipped: Prior, models: list[str], vals: dict, chosen: dict, nfe: int
) -> tuple[str, dict]:
    """Of ``models`` (bundled names or model folders; the first, the one shipped, is kept
    unless another beats it by more than PRIOR_MARGIN dB), the prior with the best mean
    validation PSNR over the tasks, every one at the same solver: the values ``chosen``
    before over the card values of ``shipped`` (the first, loaded; one posterior sample);
    and each prior's mean PSNR per task. A candidate's own card keeps the values of the day
    it was made, which the shipped card's later tuning moves on from: at those, the
    comparison would be of solvers as much as of weights."""
    op = next(iter(vals.values()))[0][0]
    settings = dataclasses.asdict(chosen_config(shipped, op, nfe, chosen))
    table: dict[str, dict[str, float]] = {}
    mean = {
        model: measured(
            shipped if model == models[0] else Prior.load(model, bf16=None),
            vals,
            table,
            model,
            model,
            nfe,
            **settings,
        )
        for model in models
    }
    best = max(models, key=mean.get)
    return (best if mean[best] > mean[models[0]] + PRIOR_MARGIN else models[0]), table


def run(
    name: str,
    n: int,
    val,
    prior: Prior,
    model: str,
    nfe: int,
    chosen: dict,
) -> dict:
    acceleration, kind = TASKS[name]
    print(f"{name}: tuning on {len(val[0])} validation slices", flush=True)
    weights = tune(*val)
    ops, y, ref, maps_s = case("test", n, acceleration, kind, seed=2)
    config = chosen_config(prior, ops[0], nfe, chosen)
    # the single-coil scale, which multi-coil results had before: its coverage is shown too
    single = ((prior.card.get("recon") or {}).get("mri") or {}).get("std_scale")
    rows, examples = [], []
    for i, op in enumerate(ops):
        yi, images = y[i : i + 1], {}
        row = {"slice": i}
        t0 = time.perf_counter()
        images["zero-filled"] = reconstruct_baseline(op, yi, "zero-filled")[0]
        row["zero-filled"] = time.perf_counter() - t0
        for method, w in weights.items():
            t0 = time.perf_counter()
            images[method] = CLASSICAL[method](op, yi, w)[0].abs()
            row[method] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rec = reconstruct(op, yi, prior, config, None, i)
        images["score"] = rec.mean[0]
        row["score"] = time.perf_counter() - t0
        row["nfe"] = rec.nfe
        row["tv_used"] = rec.provenance["tv_used"][0]
        if config.samples > 1 and config.std_scale > 0:  # the calibrated std's ±2 coverage
            ratios = std_ratios(ref[i], rec.mean[0], rec.std[0], object_only=True)
            row["coverage"] = float((ratios <= 1).double().mean())
            if single:
                within = ratios * config.std_scale / single <= 1
                row["coverage_single_coil_scale"] = float(within.double().mean())
        for method, img in images.items():
            img = img.clamp(0, 1)
            row[method] = [psnr(img, ref[i]), ssim(img, ref[i]), row[method]]
        rows.append(row)
        print(f"  slice {i}: " + ", ".join(f"{m} {row[m][0]:.2f}" for m in images), flush=True)
        if i < 3:
            examples.append((ref[i], images))
    figure(name, examples)
    return {
        "acceleration": acceleration,
        "mask": kind,
        "centre_fraction": centre_fraction(acceleration),
        "coils": COILS,
        "noise": NOISE,
        "correlation": CORRELATION,
        "shape": list(SHAPE),
        "weights": weights,
        "model": model,
        "model_steps": prior.card.get("total_steps"),
        "config": {
            "sampler": config.sampler,
            "nfe": config.n_steps * config.nfe_per_step(),
            "start": config.start,
            "rho": config.rho,
            "eta": config.eta,
            "samples": config.samples,
            "std_scale": config.std_scale,
            "tv": config.tv,
            "tv_holdout": list(config.tv_holdout),
            "intensity_level": config.intensity_level,
            "engine": prior.engine,
        },
        "maps_seconds_per_slice": maps_s,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }


METHODS = ("zero-filled", "sense", "cs-wavelet", "cs-tv", "score")


def figure(name: str, examples) -> None:
    fig, axes = plt.subplots(
        len(examples),
        1 + len(METHODS),
        figsize=(2.1 * (1 + len(METHODS)), 2.4 * len(examples)),
        squeeze=False,
    )
    for r, (ref, images) in enumerate(examples):
        panels = [("reference", ref)] + [(m, images[m].clamp(0, 1)) for m in METHODS]
        for c, (title, img) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title if c == 0 else f"{title} {psnr(img, ref):.1f} dB", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(DOCS / f"mri_multicoil_{name}.png", dpi=90)
    plt.close(fig)


def render(results: dict, machine: str) -> str:
    lines = [
        "# Multi-coil MRI on realistic data",
        "",
        f"Measured by `python benchmarks/mri_multicoil.py` on {machine}. Real MR test slices",
        f"no prior saw, simulated as a scanner measures them ({COILS} loop coils by Biot-Savart,",
        f"coil noise std {NOISE} per component correlated across coils, smooth phase, a grid",
        "twice as fine, readout 2× oversampled), written as fastMRI HDF5 and read back; coil",
        "maps by ESPIRiT from each slice's own calibration lines and pre-whitening from the",
        "empty half of its oversampled readout, as the worker does. Classical weights tuned on",
        "validation slices, their field-filling close-ups (models.protocol.close_ups) and the",
        "same as coarse noisy scans (coarse_close_ups); the score solver with its prior's",
        "card defaults (engine in the config: bf16 where it measures faster), and the TV",
        "weight λ of its map step chosen on the same validation slices; each slice solved in",
        "the prior's unit read from its own SENSE image (intensity_scale), as any scanner's",
        "data are.",
        "PSNR / SSIM, data range 1;",
        "seconds per slice in the last row.",
        "",
    ]
    for name, r in results.items():
        best = lambda row: max(row[m][0] for m in METHODS if m != "score")  # noqa: E731
        lines += [
            f"## {name}: {r['acceleration']}× {r['mask']}, centre fraction "
            f"{r['centre_fraction']:.3f}, {r['shape'][0]}×{r['shape'][1]} ({r['date']})",
            "",
            f"Weights (val): {r['weights']}; model `{r['model']}` ({r['model_steps']} steps), "
            f"{r['config']}, posterior samples K = {r['config'].get('samples', 1)}; "
            f"ESPIRiT + whitening {r['maps_seconds_per_slice']:.1f} s per slice."
            + (f" {r['note']}" if r.get("note") else ""),
            "",
        ]
        cfg = r["config"]
        for key, what, item, chosen in (
            ("tv_selection", "λ_TV of the map step", "λ {}", f": λ = {cfg.get('tv', 0):g}"),
            (
                "start_selection",
                "Warm start and NFE (start/NFE) at that λ",
                "{}",
                f" (fewest NFE within {MAX_LOSS} dB of the best): start "
                f"{cfg.get('start', 1.0):g}, {cfg['nfe']} NFE",
            ),
            (
                "rho_eta_selection",
                "ρ then η (ρ/η) at that λ, start and NFE and the card's other values",
                "{}",
                f": ρ {cfg.get('rho', 1.0):g}, η {cfg.get('eta', 1.0):g}",
            ),
            (
                "level_selection",
                "Intensity level (where each slice's unit, read from its SENSE image, lands in "
                "the prior's range)",
                "{}",
                f": {cfg.get('intensity_level', 1.0):g}",
            ),
            (
                "holdout_selection",
                "The map step's λ fixed or chosen per slice by k-space hold-out "
                "(models/holdout.py) at those values",
                "{}",
                ": "
                + (
                    "hold-out over " + "/".join(f"{c:g}" for c in cfg["tv_holdout"])
                    if cfg.get("tv_holdout")
                    else "fixed"
                ),
            ),
            (
                "draws_table",
                f"The mean of the first K of the {cfg.get('samples', 1)} draws at those values "
                "(one solve per slice)",
                "K {}",
                f"; the scale of the std of all {cfg.get('samples', 1)} fitted on these "
                f"slices: c = {cfg.get('std_scale', 0.0):.3f}, κ(K) c = "
                f"{k_sample_factor(max(cfg.get('samples', 1), 2)) * cfg.get('std_scale', 0.0):.1f} "
                "times the draws' own spread",
            ),
            (
                "prior_selection",
                "Priors at those values",
                "`{}`",
                f" (another replaces the first only by more than {PRIOR_MARGIN} dB): "
                f"`{r['model']}`",
            ),
        ):
            if r.get(key):
                how = "" if key == "draws_table" else " with one posterior sample"
                over = "" if key == "draws_table" else "; chosen over all tasks"
                lines += [
                    f"{what}, mean validation PSNR{how}: "
                    + ", ".join(f"{item.format(k)}: {v:.2f} dB" for k, v in r[key].items())
                    + f"{over}{chosen}.",
                    "",
                ]
        lines += [
            "| slice | " + " | ".join(METHODS) + " | score − best classical (dB) |",
            "|---|" + "---|" * (len(METHODS) + 1),
        ]
        for row in r["rows"]:
            cells = " | ".join(f"{row[m][0]:.2f} / {row[m][1]:.3f}" for m in METHODS)
            lines.append(f"| {row['slice']} | {cells} | {row['score'][0] - best(row):+.2f} |")
        mean = {m: statistics.fmean(row[m][0] for row in r["rows"]) for m in METHODS}
        secs = {m: statistics.fmean(row[m][2] for row in r["rows"]) for m in METHODS}
        gap = statistics.fmean(row["score"][0] - best(row) for row in r["rows"])
        below = sum(row["score"][0] < best(row) for row in r["rows"])
        lines += [
            "| mean | " + " | ".join(f"{mean[m]:.2f}" for m in METHODS) + f" | {gap:+.2f} |",
            "| s / slice | " + " | ".join(f"{secs[m]:.1f}" for m in METHODS) + " | |",
            "",
            f"NFE {r['rows'][0]['nfe']}; slices where the score solver is below the best "
            f"classical method: {below} of {len(r['rows'])}."
            + (
                " λ per slice (hold-out): "
                + ", ".join(f"{row['tv_used']:g}" for row in r["rows"])
                + "; seconds include the hold-out solves."
                if cfg.get("tv_holdout")
                else ""
            )
            + (
                " ±2 std (calibrated) holds the truth at "
                + ", ".join(f"{100 * row['coverage']:.0f} %" for row in r["rows"])
                + " of each slice's object pixels (reference > "
                + f"{OBJECT_LEVEL}; fitted for 95 % on validation)"
                + (
                    "; with the single-coil scale, "
                    + ", ".join(
                        f"{100 * row['coverage_single_coil_scale']:.0f} %" for row in r["rows"]
                    )
                    if all("coverage_single_coil_scale" in row for row in r["rows"])
                    else ""
                )
                + "."
                if all("coverage" in row for row in r["rows"])
                else ""
            ),
            "",
            f"![{name}](mri_multicoil_{name}.png)",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4, help="test slices per task")
    parser.add_argument(
        "--n-val", type=int, default=2, help="validation slices for tuning (each + a close-up)"
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--tv", type=float, default=None, help="λ_TV of the map step (default: chosen on val)"
    )
    parser.add_argument(
        "--write-card", action="store_true", help="store the chosen λ_TV in the model's card"
    )
    parser.add_argument(
        "--start-nfe",
        nargs=2,
        type=float,
        default=None,
        metavar=("START", "NFE"),
        help="the warm start and NFE (default: chosen on val)",
    )
    parser.add_argument(
        "--start-grid",
        nargs="+",
        type=start_nfe,
        default=START_GRID,
        metavar="START/NFE",
        help="the (start, NFE) pairs the choice on val tries, e.g. 0.6/50 1/50",
    )
    parser.add_argument(
        "--tune-rho-eta", action="store_true", help="choose ρ and η on val (else the card's)"
    )
    parser.add_argument(
        "--rho-grid", nargs="+", type=float, default=RHO_GRID, help="ρ tried by --tune-rho-eta"
    )
    parser.add_argument(
        "--rho-extend",
        type=int,
        default=RHO_EXTEND,
        help=f"at most this many ρ past the grid while its largest is best (×{RHO_STEP})",
    )
    parser.add_argument(
        "--eta-grid", nargs="+", type=float, default=ETA_GRID, help="η tried by --tune-rho-eta"
    )
    parser.add_argument(
        "--val-cache",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "runs" / "mri_multicoil_val.json",
        help="validation PSNRs measured by earlier runs (read and extended)",
    )
    parser.add_argument(
        "--tune-level",
        action="store_true",
        help="choose the intensity level on val (else the card's)",
    )
    parser.add_argument(
        "--tune-holdout",
        action="store_true",
        help="choose on val between a fixed λ and λ per slice by k-space hold-out",
    )
    parser.add_argument(
        "--calibrate-std",
        action="store_true",
        help="fit the scale of the posterior std on val (else the card's)",
    )
    parser.add_argument(
        "--priors",
        nargs="+",
        default=[MODEL],
        help="priors (bundled names or model folders) compared on validation; the best one "
        "runs the test and takes --write-card's values",
    )
    parser.add_argument("--note", default="", help="a line on the run's conditions, for the doc")
    args = parser.parse_args()
    global VAL_CACHE
    VAL_CACHE = ValCache(args.val_cache)
    store = DOCS / "mri_multicoil.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    # bf16 autocast where it measures faster: what the workers run (docs/benchmarks/speed.md)
    model = args.priors[0]
    prior = Prior.load(model, bf16=None)
    vals = {name: case("val", args.n_val, *TASKS[name], seed=1)[:3] for name in args.tasks}
    table: dict = {}
    tv = args.tv
    if tv is None:
        print("choosing λ_TV on validation", flush=True)
        tv, table = select_tv(prior, vals)
        print(f"λ_TV = {tv:g}", flush=True)
    starts: dict = {}
    if args.start_nfe is None:
        print("choosing the warm start on validation", flush=True)
        (start, nfe), starts = select_start(prior, vals, tv, tuple(args.start_grid))
    else:
        start, nfe = args.start_nfe[0], int(args.start_nfe[1])
    print(f"start {start}, {nfe} NFE", flush=True)
    # ReconConfig fields chosen so far: each later step measures at them
    chosen: dict = {"tv": tv, "start": start}
    pairs: dict = {}
    if args.tune_rho_eta:
        print("choosing ρ and η on validation", flush=True)
        (chosen["rho"], chosen["eta"]), pairs = select_rho_eta(
            prior, vals, chosen, nfe, tuple(args.rho_grid), tuple(args.eta_grid), args.rho_extend
        )
        print(f"ρ {chosen['rho']:g}, η {chosen['eta']:g}", flush=True)
    levels: dict = {}
    if args.tune_level:
        print("choosing the intensity level on validation", flush=True)
        chosen["intensity_level"], levels = select_level(prior, vals, chosen, nfe)
        print(f"intensity level {chosen['intensity_level']:g}", flush=True)
    holdouts: dict = {}
    if args.tune_holdout:
        print("choosing fixed λ or hold-out on validation", flush=True)
        chosen["tv_holdout"], holdouts = select_holdout(prior, vals, chosen, nfe)
        print(f"hold-out candidates {chosen['tv_holdout'] or 'none (fixed)'}", flush=True)
    priors: dict = {}
    if len(args.priors) > 1:
        print("choosing the prior on validation", flush=True)
        model, priors = select_prior(prior, args.priors, vals, chosen, nfe)
        if model != args.priors[0]:
            prior = Prior.load(model, bf16=None)
        print(f"prior {model}", flush=True)
    counts: dict = {}
    if args.calibrate_std:
        print("fitting the posterior std's scale on validation", flush=True)
        scale, counts = calibrate_std(prior, vals, lambda op: chosen_config(prior, op, nfe, chosen))
        chosen["std_scale"] = round(scale, 4)  # as the card keeps it, for the test below
        print(f"std scale {chosen['std_scale']:.3f}", flush=True)
    if args.write_card:
        card = load_card(model)
        recon = card.get("recon", {})
        mri = recon.get("mri", {})
        # Multi-coil only: single-coil values are benchmarks/quality_real.py's and
        # benchmarks/warm_start.py's, untouched.
        mri["multicoil"] = {
            **mri.get("multicoil", {}),
            **chosen,
            "nfe": nfe,
            "tuned_by": "benchmarks/mri_multicoil.py (grids over validation slices, their "
            "close-ups and coarse close-ups, 8-coil data, all four tasks: λ_TV, then start "
            "and NFE, then ρ and η, "
            "then the intensity level, then λ fixed or by k-space hold-out, then the "
            "scale of the posterior std)",
        }
        recon["mri"] = mri
        update_card(model, {"recon": recon})
        prior = Prior.load(model, bf16=None)
    for name in args.tasks:
        # With --tv, the λ table of the run that chose it stays in the doc.
        earlier = results.get(name, {}).get("tv_selection", {})
        results[name] = run(name, args.n, vals[name], prior, model, nfe, chosen) | {
            "note": args.note,
            "tv_selection": {f"{k:g}": v for k, v in table.get(name, {}).items()} or earlier,
            "start_selection": {f"{a:g}/{b}": v for (a, b), v in starts.get(name, {}).items()}
            or results.get(name, {}).get("start_selection", {}),
            "rho_eta_selection": {f"{a:g}/{b:g}": v for (a, b), v in pairs.get(name, {}).items()}
            or results.get(name, {}).get("rho_eta_selection", {}),
            "prior_selection": priors.get(name, {}),
            "holdout_selection": holdouts.get(name, {})
            or results.get(name, {}).get("holdout_selection", {}),
            "level_selection": {f"{k:g}": v for k, v in levels.get(name, {}).items()}
            or results.get(name, {}).get("level_selection", {}),
            "draws_table": {str(k): v for k, v in counts.get(name, {}).items()}
            or results.get(name, {}).get("draws_table", {}),
        }
        store.write_text(json.dumps(results, indent=2))
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    (DOCS / "mri_multicoil.md").write_text(render(results, machine))


if __name__ == "__main__":
    main()
