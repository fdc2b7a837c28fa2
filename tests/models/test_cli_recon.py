"""``scorerecon reconstruct`` end to end: simulate, reconstruct with a saved model, report."""

import json

import numpy as np
import torch

from models.cli import main
from models.nets.ncsnpp import build
from models.phantoms import ct_phantoms
from models.registry import save_model
from models.sde import VESDE


def _model(tmp_path, size=32):
    sde = VESDE(0.01, 20.0)
    torch.manual_seed(0)
    return save_model(tmp_path / "m", build("tiny", sde.sigma), sde, {"image_size": size})


def test_reconstruct_writes_images_std_preview_and_report(tmp_path, capsys):
    model = _model(tmp_path)
    np.save(tmp_path / "ref.npy", ct_phantoms(1, 32, seed=5)[0, 0].numpy())
    spec = tmp_path / "spec.json"
    # noise_std 0 declares the simulated data noiseless: they are then fitted exactly.
    spec.write_text(json.dumps({"modality": "ct", "image_size": 32, "n_views": 10, "noise_std": 0}))
    meas = tmp_path / "y.npy"
    assert (
        main(
            [
                "simulate",
                "--image",
                str(tmp_path / "ref.npy"),
                "--spec",
                str(spec),
                "--out",
                str(meas),
            ]
        )
        == 0
    )
    out = tmp_path / "out"
    args = [
        "reconstruct",
        "--input",
        str(meas),
        "--spec",
        str(spec),
        "--model",
        str(model),
        "--out",
        str(out),
        "--nfe",
        "20",
        "--samples",
        "3",
        "--reference",
        str(tmp_path / "ref.npy"),
    ]
    capsys.readouterr()
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["nfe"] == 20 and report["residual"][0] < 1e-3
    assert {"psnr", "ssim", "baseline_psnr", "provenance"} <= set(report)
    assert report["provenance"]["samples"] == 3 and report["provenance"]["method"] == "map"
    assert np.load(out / "recon.npy").shape == (1, 1, 32, 32)
    std = np.load(out / "std.npy")
    assert std.shape == (1, 1, 32, 32) and std.max() > 0
    assert (out / "preview.png").stat().st_size > 500
    # PC at 20 NFE with this untrained model returns noise far outside [0, 1]: refused as
    # diverged, with the reason, rather than written as an image.
    capsys.readouterr()
    assert main(args[:-2] + ["--sampler", "pc", "--out", str(tmp_path / "pc")]) == 1
    assert "diverged" in capsys.readouterr().err
    assert not (tmp_path / "pc" / "recon.npy").exists()


def test_reconstruct_explains_bad_input(tmp_path, capsys):
    model = _model(tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"modality": "ct", "image_size": 32, "n_views": 10, "noise_std": 0}))
    np.save(tmp_path / "bad.npy", np.zeros((3, 3), np.float32))
    base = ["reconstruct", "--spec", str(spec), "--model", str(model), "--out", str(tmp_path)]
    assert main(base + ["--input", str(tmp_path / "bad.npy")]) == 2
    assert "does not match the spec" in capsys.readouterr().err
    spec64 = tmp_path / "spec64.json"
    spec64.write_text(json.dumps({"modality": "ct", "image_size": 64, "n_views": 10}))
    np.save(tmp_path / "y64.npy", np.zeros((1, 10, 93), np.float32))
    bad = ["reconstruct", "--spec", str(spec64), "--model", str(model), "--out", str(tmp_path)]
    # A CT image larger than the prior's is reconstructed with the prior applied patch-wise.
    assert main(bad + ["--input", str(tmp_path / "y64.npy"), "--nfe", "4"]) == 0
    assert np.load(tmp_path / "recon.npy").shape == (1, 1, 64, 64)
    assert main(base + ["--input", str(tmp_path / "bad.npy"), "--model", "nope"]) == 2


def test_evaluate_writes_table_and_figures(tmp_path, capsys):
    model = _model(tmp_path)
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--model",
        str(model),
        "--task",
        "ct-sparse",
        "--views",
        "8,16",
        "--methods",
        "fbp,score-fast",
        "--n",
        "2",
        "--nfe",
        "6",
        "--samples",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = json.loads((out / "ct-sparse.json").read_text())
    assert {(r["method"], r["level"]) for r in rows} == {
        ("fbp", 8),
        ("fbp", 16),
        ("score-fast", 8),
        ("score-fast", 16),
    }
    fbp8 = next(r for r in rows if r["method"] == "fbp" and r["level"] == 8)
    fbp16 = next(r for r in rows if r["method"] == "fbp" and r["level"] == 16)
    assert fbp16["psnr"] > fbp8["psnr"] and fbp8["n"] == 2
    assert "coverage_2std" in next(r for r in rows if r["method"] == "score-fast")
    assert (out / "ct-sparse_examples.png").exists() and (out / "ct-sparse_quality.png").exists()
    assert "| fbp | 8 |" in (out / "ct-sparse.md").read_text()
    assert main(args[:-2] + ["--methods", "magic", "--out", str(out)]) == 2
    assert "method 'magic'" in capsys.readouterr().err


def test_tune_writes_best_values_into_the_card_and_reconstruct_uses_them(tmp_path, capsys):
    model = _model(tmp_path)
    args = [
        "tune",
        "--model",
        str(model),
        "--task",
        "ct-sparse",
        "--level",
        "8",
        "--sampler",
        "fast",
        "--trials",
        "3",
        "--n",
        "1",
        "--nfe",
        "4",
        "--data",
        "phantoms",
    ]
    assert main(args) == 0
    card = json.loads((model / "card.json").read_text())
    best = card["recon"]["ct"]
    assert best["sampler"] == "fast" and 0.02 <= best["rho"] <= 3.0 and 0 <= best["eta"] <= 1
    assert best["trials"] == 3 and best["noise"] == "gaussian:0.005" and best["nfe"] == 4
    from models.registry import load_model

    load_model(model)  # the card changed, the weights (and their sha256) did not
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"modality": "ct", "image_size": 32, "n_views": 8}))
    np.save(tmp_path / "y.npy", np.zeros((1, 8, 48), np.float32))
    out = tmp_path / "r"
    assert (
        main(
            [
                "reconstruct",
                "--input",
                str(tmp_path / "y.npy"),
                "--spec",
                str(spec),
                "--model",
                str(model),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())  # the card's sampler, ρ, η and NFE
    assert report["provenance"]["config.rho"] == best["rho"] and report["nfe"] == 4
    assert report["provenance"]["config.eta"] == best["eta"]


def test_tuning_pc_keeps_the_default_samplers_values_and_pc_then_uses_its_own(tmp_path):
    from models.inverse import Prior, ReconConfig

    model = _model(tmp_path)
    base = ["tune", "--model", str(model), "--task", "ct-sparse", "--level", "8", "--n", "1"]
    base += ["--trials", "2", "--nfe", "4", "--data", "phantoms"]
    assert main([*base, "--sampler", "fast"]) == 0
    assert main([*base, "--sampler", "pc"]) == 0
    recon = json.loads((model / "card.json").read_text())["recon"]["ct"]
    assert recon["sampler"] == "fast" and "rho" in recon  # the default stays
    pc = recon["samplers"]["pc"]
    assert 0.05 <= pc["lam"] <= 1.0 and 0.02 <= pc["snr"] <= 0.4
    prior = Prior.load(str(model))
    assert ReconConfig.for_prior(prior, "ct").sampler == "fast"
    config = ReconConfig.for_prior(prior, "ct", "pc")
    assert (config.lam, config.snr) == (pc["lam"], pc["snr"]) and config.n_steps == 2
    assert main([*base, "--sampler", "fast"]) == 0  # re-tuning the default keeps PC's
    assert json.loads((model / "card.json").read_text())["recon"]["ct"]["samplers"]["pc"] == pc


def test_reconstruct_removes_a_thresholded_metal_trace(tmp_path):
    model = _model(tmp_path)
    img = ct_phantoms(1, 32, seed=3, kinds=("abdomen",))[0, 0].numpy().copy()
    img[14:17, 20:23] = 1.0  # a metal implant (3000 HU)
    np.save(tmp_path / "img.npy", img)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "modality": "ct",
                "image_size": 32,
                "n_views": 60,
                "metal_threshold_hu": 2000,
                "noise_std": 0,
            }
        )
    )
    meas = tmp_path / "y.npy"
    assert (
        main(
            [
                "simulate",
                "--image",
                str(tmp_path / "img.npy"),
                "--spec",
                str(spec),
                "--out",
                str(meas),
            ]
        )
        == 0
    )
    out = tmp_path / "mar"
    assert (
        main(
            [
                "reconstruct",
                "--input",
                str(meas),
                "--spec",
                str(spec),
                "--model",
                str(model),
                "--out",
                str(out),
                "--nfe",
                "6",
                "--sampler",
                "fast",
            ]
        )
        == 0
    )
    mask = np.load(out / "metal_mask.npy")
    assert mask[14:17, 20:23].all() and mask.sum() < 60
    report = json.loads((out / "report.json").read_text())
    assert report["residual"][0] < 1e-2  # fits the bins that miss the metal
