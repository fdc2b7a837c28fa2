"""Coil sensitivities (Biot-Savart loops, ESPIRiT), coil noise whitening, multi-coil specs,
and the multi-coil baselines checked against sigpy."""

import numpy as np
import pytest
import torch

from models.baselines import cs_wavelet, fista_tv, reconstruct_baseline, sense
from models.metrics import psnr
from models.phantoms import mri_phantoms
from models.physics import adjointness_test
from models.physics.coils import (
    espirit_maps,
    loop_coil_sensitivities,
    noise_covariance,
    noise_from_kspace,
    rss,
    whiten,
    whitening_matrix,
)
from models.physics.mri import MultiCoilMRIOperator, equispaced_mask, fft2c, ifft2c
from models.physics.spec import SpecError, from_spec, parse_spec, slice_problems

SHAPE = (64, 56)


def _object() -> torch.Tensor:
    """A complex phantom (64×56) with a smooth phase."""
    img = mri_phantoms(1, 64, seed=5)[0, 0][:, 4:60]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 56), indexing="ij")
    return img * torch.exp(1j * (0.8 * xx + 0.4 * yy * yy))


def _noise(shape, sigma: float, g: torch.Generator) -> torch.Tensor:
    """Complex white Gaussian noise, ``sigma`` per real component."""
    return sigma * torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))


def _aligned_error(true: torch.Tensor, est: torch.Tensor, support: torch.Tensor) -> float:
    """||S − Ŝ e^{iφ}|| / ||S|| inside ``support``, φ the per-pixel phase that aligns them
    (ESPIRiT maps are unique up to one phase per pixel)."""
    phase = torch.exp(1j * torch.angle((est.conj() * true).sum(0)))
    diff = (true - est * phase)[:, support]
    return float(diff.abs().pow(2).sum().sqrt() / true[:, support].abs().pow(2).sum().sqrt())


def test_loop_coils_are_local_and_distinct():
    s = loop_coil_sensitivities(SHAPE, 8)
    assert s.shape == (8, *SHAPE) and s.dtype == torch.complex64
    assert float(rss(s, 0).max()) == pytest.approx(1.0, rel=1e-5)
    # Each coil is brightest at the edge it faces and weak on the far side.
    peaks = [np.unravel_index(int(m.abs().argmax()), SHAPE) for m in s]
    assert len(set(peaks)) == 8
    for m in s:
        assert float(m.abs().max()) > 4 * float(m.abs().min())
    # Two rings for larger arrays: 15 coils, none identical.
    big = loop_coil_sensitivities((40, 24), 15)
    gram = torch.einsum("chw,dhw->cd", big.abs(), big.abs())
    gram = gram / gram.diagonal().sqrt()[:, None] / gram.diagonal().sqrt()[None]
    assert float((gram - torch.eye(15)).max()) < 0.999


def test_espirit_recovers_known_maps_up_to_phase():
    """Maps from 24 ACS lines of noisy data match the true maps (normalised to RSS 1) to
    within 3 % inside the object; the true (unnormalised) fields differ far more."""
    s = loop_coil_sensitivities(SHAPE, 8)
    obj = _object()
    g = torch.Generator().manual_seed(0)
    k = fft2c(obj[None] * s)
    k = k + _noise(k.shape, 0.002, g)
    mask = equispaced_mask(SHAPE, 4, 24 / 56)
    est = espirit_maps(k * mask, mask)
    support = obj.abs() > 0.05
    truth = s / rss(s, 0)
    error = _aligned_error(truth, est, support)
    assert error < 0.03, error
    assert _aligned_error(s, est, support) > 10 * error
    assert float(rss(est, 0).max()) <= 1.0 + 1e-3  # normalised: RSS 1 inside, 0 outside


def test_espirit_matches_sigpy_on_a_square_calibration_region():
    """Where sigpy's EspiritCalib applies (a square fully sampled centre), our ESPIRiT gives
    the same maps up to the per-pixel phase; and with 10 ACS lines only, where sigpy's
    square region would take in unmeasured lines, ours still recovers the true maps."""
    import sigpy.mri

    s = loop_coil_sensitivities(SHAPE, 8)
    obj = _object()
    k = fft2c(obj[None] * s) + _noise((8, *SHAPE), 0.002, torch.Generator().manual_seed(4))
    mask = equispaced_mask(SHAPE, 2, 24 / 56)
    ours = espirit_maps(k * mask, mask, kernel_width=6, calib_rows=24)
    theirs = sigpy.mri.app.EspiritCalib(
        (k * mask).numpy(), calib_width=24, kernel_width=6, show_pbar=False
    ).run()
    support = obj.abs() > 0.05
    assert _aligned_error(torch.as_tensor(theirs), ours, support) < 0.01
    narrow = equispaced_mask(SHAPE, 4, 10 / 56)
    est = espirit_maps(k * narrow, narrow)
    assert _aligned_error(s / rss(s, 0), est, support) < 0.04


def test_espirit_refuses_data_without_acs_lines():
    s = loop_coil_sensitivities(SHAPE, 4)
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[:, ::4] = True  # no fully sampled centre
    k = fft2c(_object()[None] * s) * mask
    with pytest.raises(ValueError, match="auto-calibration lines"):
        espirit_maps(k, mask)
    spec = {
        "modality": "mri",
        "image_size": list(SHAPE),
        "sensitivities": "espirit",
        "mask": {"kind": "explicit", "lines": list(range(0, 56, 4))},
    }
    with pytest.raises(SpecError, match="this mask has 1 centre lines"):
        from_spec(spec, k)
    # A mask with a centre, but data whose centre was not acquired: refused by the maps.
    with pytest.raises(SpecError, match="sensitivities: ESPIRiT needs a fully sampled"):
        spec["mask"] = {"kind": "equispaced", "acceleration": 4, "center_fraction": 0.2}
        from_spec(spec, k)


def test_whitening_decorrelates_coil_noise():
    g = torch.Generator().manual_seed(1)
    c = 6
    a = torch.randn(c, c, generator=g) * 0.3 + torch.eye(c)
    mix = torch.complex(a, 0.2 * torch.randn(c, c, generator=g))
    white = _noise((c, 20000), 1.0, g)
    noise = mix @ white
    cov = noise_covariance(noise)
    w = whitening_matrix(cov)
    out = noise_covariance(w @ noise)
    scale = cov.diagonal().real.mean()
    assert torch.allclose(out, scale * torch.eye(c, dtype=out.dtype), atol=0.05 * float(scale))
    # Applied to k-space along the coil axis.
    k = noise.reshape(c, 100, 200)
    assert torch.allclose(whiten(k, w), (w @ noise).reshape(c, 100, 200), atol=1e-4)
    with pytest.raises(ValueError, match="noise samples"):
        noise_covariance(noise[:, :5])


def test_noise_from_kspace_sees_only_noise_at_the_readout_ends():
    s = loop_coil_sensitivities(SHAPE, 4)
    g = torch.Generator().manual_seed(2)
    k = fft2c(_object()[None] * s)
    sigma = 0.01
    k = k + _noise(k.shape, sigma, g)
    mask = equispaced_mask(SHAPE, 4, 0.1)
    samples = noise_from_kspace(k * mask, mask)
    variance = noise_covariance(samples).diagonal().real
    assert torch.allclose(variance, torch.full((4,), 2 * sigma**2, dtype=variance.dtype), rtol=0.35)


def test_rectangular_multicoil_operator_is_adjoint_and_zero_filled_is_rss():
    s = loop_coil_sensitivities(SHAPE, 5)
    op = MultiCoilMRIOperator(SHAPE, equispaced_mask(SHAPE, 4, 0.1), s)
    assert op.image_shape == SHAPE and op.image_size is None and op.coils == 5
    assert op.measurement_shape() == (5, *SHAPE)
    assert adjointness_test(op).relative_mismatch < 1e-5
    y = op.forward(_object()[None, None])
    assert torch.allclose(op.zero_filled(y), rss(ifft2c(y), 1)[:, None])
    with pytest.raises(ValueError, match="mask must be"):
        MultiCoilMRIOperator(SHAPE, equispaced_mask(64, 4, 0.1), s)


def test_espirit_spec_builds_one_operator_per_slice_from_the_data():
    s = loop_coil_sensitivities(SHAPE, 6)
    spec = parse_spec(
        {
            "modality": "mri",
            "image_size": list(SHAPE),
            "sensitivities": "espirit",
            "mask": {"kind": "equispaced", "acceleration": 3, "center_fraction": 0.3},
        }
    )
    mask = equispaced_mask(SHAPE, 3, 0.3)
    objs = torch.stack([_object(), _object().flip(-1)])
    y = fft2c(objs[:, None] * s[None]) * mask
    ops, yw = slice_problems(spec, y)
    assert yw.shape == y.shape and ops[0].whitening is not None
    assert len(ops) == 2 and ops[0] is not ops[1]
    assert ops[0].coils == 6 and ops[0].image_shape == SHAPE
    with pytest.raises(SpecError, match="coils: the spec says 8"):
        from_spec(spec.model_copy(update={"coils": 8}), y[0])
    with pytest.raises(SpecError, match="estimates the coil maps from the measurement"):
        from_spec(spec)
    with pytest.raises(SpecError, match=r"must be \(coils, 64, 56\)"):
        from_spec(spec, y[0, :, :, :40])


def test_multicoil_complex_phantom_reconstructs_with_its_phase():
    """SENSE with ESPIRiT maps at 3× recovers the complex object, phase included (up to the
    maps' own phase, which the coil-combined image carries). The fields are normalised to
    RSS 1, so that the object is not shaded by the receive profile."""
    s = loop_coil_sensitivities(SHAPE, 8)
    s = s / rss(s, 0)
    obj = _object()
    mask = equispaced_mask(SHAPE, 3, 0.3)
    y = fft2c(obj[None, None] * s[None]) * mask
    op = from_spec(
        {
            "modality": "mri",
            "image_size": list(SHAPE),
            "sensitivities": "espirit",
            "mask": {"kind": "equispaced", "acceleration": 3, "center_fraction": 0.3},
        },
        y[0],
    )
    x = sense(op, y)[0, 0]
    support = obj.abs() > 0.2
    inside = obj.abs() > 0.05  # ESPIRiT's maps are zero outside the object
    assert psnr((x.abs() * inside).clamp(0, 1)[None], (obj.abs() * inside)[None]) > 27
    # ESPIRiT leaves one phase per pixel free (sigpy references it to the first coil): the
    # complex image is the object times that phase, which the maps themselves fix.
    phase = torch.exp(1j * torch.angle((op.sensitivities.conj() * s).sum(0)))
    error = (x - obj * phase)[support].norm() / obj[support].norm()
    assert float(error) < 0.12, float(error)


def test_multicoil_baselines_agree_with_sigpy():
    """Our SENSE (CG) matches sigpy's ``SenseRecon``; L1-wavelet (sigpy) and our TV-SENSE both
    beat zero-filled RSS at 4×, and our (isotropic) TV-SENSE does at least as well as sigpy's
    (anisotropic) ``TotalVariationRecon`` at the same weight."""
    import sigpy.mri

    s = loop_coil_sensitivities(SHAPE, 8)
    s = s / rss(s, 0)
    obj = _object()
    mask = equispaced_mask(SHAPE, 4, 0.1)
    g = torch.Generator().manual_seed(3)
    y = fft2c(obj[None, None] * s[None])
    y = (y + _noise(y.shape, 0.005, g)) * mask
    op = MultiCoilMRIOperator(SHAPE, mask, s)
    ref = obj.abs()[None]
    ours = sense(op, y, n_iter=20, lam=0.0)[0, 0]
    theirs = sigpy.mri.app.SenseRecon(
        y[0].numpy(),
        s.numpy(),
        weights=mask.numpy().astype("float32"),
        max_iter=20,
        show_pbar=False,
    ).run()
    theirs = torch.as_tensor(theirs)
    assert float((ours - theirs).abs().norm() / theirs.abs().norm()) < 0.02
    zero = reconstruct_baseline(op, y, "zero-filled")[0]
    wave = cs_wavelet(op, y, 1e-3)[0].abs()
    tv = fista_tv(op, y, 2e-3).abs()[0]
    sigpy_tv = torch.as_tensor(
        sigpy.mri.app.TotalVariationRecon(
            y[0].numpy(),
            s.numpy(),
            2e-3,
            weights=mask.numpy().astype("float32"),
            max_iter=200,
            show_pbar=False,
        ).run()
    ).abs()[None]
    p = {
        name: psnr(img.clamp(0, 1), ref)
        for name, img in {"zero": zero, "wave": wave, "tv": tv, "sigpy_tv": sigpy_tv}.items()
    }
    assert p["wave"] > p["zero"] + 2 and p["tv"] > p["zero"] + 2, p
    assert p["sigpy_tv"] > p["zero"] + 2 and p["tv"] > p["sigpy_tv"] - 0.5, p
    for method in ("sense", "cs-wavelet", "cs-tv"):
        assert reconstruct_baseline(op, y, method).shape == (1, 1, *SHAPE)


def test_score_reconstruction_of_rectangular_multicoil_data_keeps_shape_and_phase():
    """A prior of another size (8², scored pixel by pixel) reconstructs a 12×10 multi-coil
    measurement patch-wise; the result has the measurement's shape, a phase, and fits."""
    from models.inverse import Prior, ReconConfig, reconstruct
    from models.sde import VESDE

    sde = VESDE(0.01, 5.0, N=10)

    def grey(x, t):  # N(0.5, 0.1²) per pixel, an image-like prior on [0, 1]
        return -(x - 0.5) / (0.01 + sde.sigma(t) ** 2).reshape(-1, 1, 1, 1)

    shape = (12, 10)
    s = loop_coil_sensitivities(shape, 4)
    s = s / rss(s, 0)
    op = MultiCoilMRIOperator(shape, torch.ones(shape, dtype=torch.bool), s)
    obj = (0.5 + 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(0))) * 1j
    y = op.forward(obj[None, None])
    rec = reconstruct(op, y, Prior(grey, sde, 8), ReconConfig(n_steps=20), noise_std=0)
    assert rec.mean.shape == (1, 1, *shape) and rec.phase.shape == (1, 1, *shape)
    assert rec.diverged is None and rec.residual[0] < 1e-2
    assert torch.allclose(rec.mean[0, 0], obj.abs(), atol=1e-2)


def test_prewhitened_operator_is_adjoint_and_keeps_the_image_scale():
    """W M F S with whitened data: adjoint, the same least-squares image scale, and a better
    SENSE image than ignoring the correlation when coil noise is strongly correlated."""
    from models.multicoil import coil_mixing
    from models.physics.coils import prewhiten

    s = loop_coil_sensitivities(SHAPE, 6)
    s = s / rss(s, 0)
    mask = equispaced_mask(SHAPE, 2, 0.2)
    op = MultiCoilMRIOperator(SHAPE, mask, s)
    obj = _object()
    g = torch.Generator().manual_seed(5)
    mix = coil_mixing(6, 0.9, g)
    noise = 0.03 * torch.einsum("dc,bchw->bdhw", mix, _noise((1, 6, *SHAPE), 1.0, g))
    y = (op.forward(obj[None, None]) + noise) * mask
    scan = 0.03 * mix @ _noise((6, 512), 1.0, g)
    op_w, y_w = prewhiten(op, y, scan)
    assert adjointness_test(op_w).relative_mismatch < 1e-5
    assert torch.allclose(op_w.zero_filled(y_w), op.zero_filled(y), atol=1e-4)
    ref = obj.abs()[None]
    plain = psnr(sense(op, y)[0].abs().clamp(0, 1), ref)
    white = psnr(sense(op_w, y_w)[0].abs().clamp(0, 1), ref)
    assert white > plain, (white, plain)
    # Without a scan, the covariance comes from the data's readout ends.
    op_d, _ = prewhiten(op, y)
    assert op_d.whitening.shape == (6, 6)


def test_espirit_calibrates_an_oversampled_readout_over_its_whole_field_of_view():
    """An object that fills the reconstruction's field of view along the readout (a close-up)
    wraps onto itself once the oversampling is removed: maps calibrated on the cropped data
    go wrong along its top and bottom edges. ``slice_problems`` calibrates on the oversampled
    data and crops the maps after, and recovers the true maps there."""
    from models.measurements import remove_readout_oversampling
    from models.multicoil import simulate_multicoil

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 112), indexing="ij")
    fine = (0.6 + 0.3 * torch.cos(3 * xx + 2 * yy)) * (xx.abs() < 0.7)
    case = simulate_multicoil(fine[None, None], coils=8, acceleration=2, center_fraction=0.3)
    spec = parse_spec(
        {
            "modality": "mri",
            "image_size": [64, 56],
            "sensitivities": "espirit",
            "mask": {"kind": "explicit", "lines": case.mask.nonzero().flatten().tolist()},
        }
    )
    support = case.reference[0, 0] > 0.05
    assert bool(support[0].any() and support[-1].any())  # it touches the top and bottom
    ops, _ = slice_problems(spec, case.kspace)
    whole = _aligned_error(case.sensitivities, ops[0].sensitivities, support)
    cropped = torch.from_numpy(remove_readout_oversampling(case.kspace.numpy(), 64))
    mask = case.mask[None].expand(64, 56)
    wrapped = _aligned_error(case.sensitivities, espirit_maps(cropped[0], mask), support)
    assert whole < 0.05 and wrapped > 3 * whole, (whole, wrapped)  # measured 0.021, 0.117


def _write_cfl(stem, arr: np.ndarray) -> None:
    """BART's .hdr/.cfl pair: the dimensions, then complex64 in column-major order."""
    dims = list(arr.shape) + [1] * (16 - arr.ndim)
    (stem.parent / f"{stem.name}.hdr").write_text(
        "# Dimensions\n" + " ".join(map(str, dims)) + "\n"
    )
    arr.astype(np.complex64).ravel(order="F").tofile(stem.parent / f"{stem.name}.cfl")


def _read_cfl(stem) -> np.ndarray:
    dims = [int(d) for d in (stem.parent / f"{stem.name}.hdr").read_text().split("\n")[1].split()]
    data = np.fromfile(stem.parent / f"{stem.name}.cfl", np.complex64)
    return data.reshape(dims, order="F")


def test_espirit_matches_bart_ecalib(tmp_path):
    """BART's ``ecalib`` (Debian ``bart``), the field's reference ESPIRiT, on the same data:
    our maps agree with its to within 2 % inside the object, and both recover the true maps."""
    import shutil
    import subprocess

    if shutil.which("bart") is None:
        pytest.skip("BART is not installed (make bart)")
    s = loop_coil_sensitivities(SHAPE, 8)
    obj = _object()
    g = torch.Generator().manual_seed(1)
    k = fft2c(obj[None] * s)
    k = k + _noise(k.shape, 0.002, g)
    mask = equispaced_mask(SHAPE, 4, 24 / 56)
    k = k * mask
    ours = espirit_maps(k, mask, calib_rows=24)
    # BART's axes: read (our rows), phase (our columns), slice, coil.
    _write_cfl(tmp_path / "k", k.permute(1, 2, 0)[:, :, None].numpy())
    subprocess.run(
        ["bart", "ecalib", "-m", "1", "-r", "24", "k", "maps"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    maps = _read_cfl(tmp_path / "maps").reshape(*SHAPE, 8)  # (read, phase, 1, coil, 1, …)
    bart = torch.from_numpy(np.ascontiguousarray(maps)).permute(2, 0, 1)
    assert bart.shape == ours.shape == (8, *SHAPE)
    support = (obj.abs() > 0.05) & (rss(bart, 0) > 0.5) & (rss(ours, 0) > 0.5)
    assert float(support.float().mean()) > 0.3
    truth = s / rss(s, 0)
    agree = _aligned_error(bart, ours, support)
    assert agree < 0.02, agree  # measured 0.7 %
    assert _aligned_error(truth, bart, support) < 0.03  # measured 1.9 % for each
    assert _aligned_error(truth, ours, support) < 0.03
