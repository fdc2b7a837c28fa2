import json

import numpy as np
import pytest
import torch

from models.baselines import reconstruct_baseline, tv_prox
from models.cli import main
from models.io import bundled_image, load_image
from models.metrics import nmse, psnr, ssim
from models.physics import from_spec


@pytest.fixture(scope="module")
def phantom():
    return load_image(bundled_image(), 64)


def test_metrics_explicit_range():
    a = torch.zeros(16, 16)
    b = torch.full((16, 16), 0.1)
    assert psnr(b, a, data_range=1.0) == pytest.approx(20.0)
    assert ssim(a + 0.5, a + 0.5) == pytest.approx(1.0)
    assert nmse(b, b) == 0


def test_tv_prox_reduces_tv_and_keeps_mean(rng):
    v = torch.rand(1, 1, 32, 32, generator=rng)
    u = tv_prox(v, 0.1)

    def tv(x):
        return (x[..., 1:, :] - x[..., :-1, :]).abs().sum() + (x[..., 1:] - x[..., :-1]).abs().sum()

    assert tv(u) < 0.5 * tv(v)
    assert float(u.mean()) == pytest.approx(float(v.mean()), abs=1e-4)


def test_tv_prox_takes_one_weight_per_sample(rng):
    v = torch.rand(3, 1, 16, 16, generator=rng)
    weights = torch.tensor([0.0, 0.05, 0.2]).view(3, 1, 1, 1)
    batched = tv_prox(v, weights)
    assert torch.equal(batched[0], v[0])
    for i in (1, 2):
        assert torch.allclose(batched[i], tv_prox(v[i : i + 1], float(weights[i]))[0], atol=1e-6)


def test_tv_prox_axis_is_1d_tv_denoising_along_that_axis(rng):
    """Against the exact 1-D solution for two samples, u = v ∓ w moved toward each other and
    merged at the mean when |Δv| ≤ 2w; the other axes are untouched."""
    from models.baselines import tv_prox_axis

    v = torch.tensor([[0.0, 1.0], [0.0, 0.1]]).T.reshape(2, 2, 1)  # axis 0: the 2 slices
    u = tv_prox_axis(v, 0.2, dim=0, n_iter=500)
    assert torch.allclose(u[:, 0, 0], torch.tensor([0.2, 0.8]), atol=1e-3)
    assert torch.allclose(u[:, 1, 0], torch.tensor([0.05, 0.05]), atol=1e-3)
    stack = torch.rand(5, 3, 8, 8, generator=rng)
    out = tv_prox_axis(stack, 0.05, dim=0)
    z_tv = lambda x: (x[1:] - x[:-1]).abs().sum()  # noqa: E731
    assert z_tv(out) < z_tv(stack)
    assert torch.allclose(out.mean(0), stack.mean(0), atol=1e-4)  # slice sums kept


@pytest.mark.parametrize("method", ["fbp", "sirt", "cgls", "fista-tv"])
def test_ct_baselines_beat_nothing(phantom, method):
    op = from_spec({"modality": "ct", "image_size": 64, "n_views": 45})
    x = reconstruct_baseline(op, op.forward(phantom), method)
    assert x.shape == phantom.shape and psnr(x, phantom) > 20


def test_mri_cs_beats_zero_filled(phantom):
    """CS-TV works on the complex image (MR images carry a phase), with random lines: the
    incoherent sampling compressed sensing relies on."""
    op = from_spec(
        {
            "modality": "mri",
            "image_size": 64,
            "mask": {"kind": "random", "acceleration": 4, "center_fraction": 0.08},
        }
    )
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    y = op.forward(phantom * torch.exp(1j * (0.8 * xx + 0.5 * yy**2)))
    zf = reconstruct_baseline(op, y, "zero-filled")
    cs = reconstruct_baseline(op, y, "cs-tv")
    assert psnr(cs, phantom) > psnr(zf, phantom) + 3
    # Its weight holds for images in [0, 1]: data in a scanner's units are solved in them.
    scanner = reconstruct_baseline(op, y * 1e-5, "cs-tv")
    assert torch.allclose(scanner, cs * 1e-5, rtol=1e-3, atol=1e-5 * 1e-4)


def test_wrong_modality_method_is_explained(phantom):
    op = from_spec({"modality": "ct", "image_size": 32, "n_views": 10})
    with pytest.raises(ValueError, match="for CT use"):
        reconstruct_baseline(op, op.forward(load_image(bundled_image(), 32)), "cs-tv")


def test_cli_simulate_then_baseline(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"modality": "ct", "image_size": 64, "n_views": 30}))
    meas, ref, out = tmp_path / "m.npy", tmp_path / "r.npy", tmp_path / "out"
    assert (
        main(
            [
                "simulate",
                "--image",
                str(bundled_image()),
                "--spec",
                str(spec),
                "--out",
                str(meas),
                "--reference-out",
                str(ref),
                "--noise-std",
                "0.1",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert np.load(meas).shape == (1, 1, 30, 93)
    assert (
        main(
            [
                "baseline",
                "--input",
                str(meas),
                "--spec",
                str(spec),
                "--method",
                "fbp",
                "--out",
                str(out),
                "--reference",
                str(ref),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "fbp" and report["psnr"] > 15 and 0 < report["ssim"] <= 1
    assert (out / "preview.png").exists() and np.load(out / "recon.npy").shape == (1, 1, 64, 64)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"modality": "ct", "image_size": 64}))
    assert (
        main(
            [
                "simulate",
                "--image",
                str(bundled_image()),
                "--spec",
                str(spec),
                "--out",
                str(tmp_path / "m.npy"),
            ]
        )
        == 2
    )
    assert "n_views" in capsys.readouterr().err
    spec.write_text(json.dumps({"modality": "ct", "image_size": 64, "n_views": 30}))
    np.save(tmp_path / "bad.npy", np.zeros((1, 1, 5, 5), np.float32))
    assert (
        main(
            [
                "baseline",
                "--input",
                str(tmp_path / "bad.npy"),
                "--spec",
                str(spec),
                "--method",
                "fbp",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not match the spec" in capsys.readouterr().err
