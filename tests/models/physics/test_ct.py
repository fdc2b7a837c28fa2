import gc
import math
import resource

import numpy as np
import pytest
import torch
from skimage.transform import iradon, radon

from models.physics.ct import CTGeometry, CTOperator, metal_trace_operator, sparse_view


def test_gradcheck_forward_double():
    op = sparse_view(12, 6)
    x = torch.rand(1, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    # The map is linear, so a large finite-difference step is exact up to float32 rounding.
    assert torch.autograd.gradcheck(op.forward, (x,), eps=1e-1, atol=1e-3, rtol=1e-3)


def _aligned(theta_deg: np.ndarray, n: int) -> CTOperator:
    """ASTRA geometry with skimage's conventions: centre at pixel n//2, detector bin n//2."""
    geom = CTGeometry(
        image_size=n,
        angles=tuple(np.deg2rad(theta_deg)),
        n_detectors=n,
        volume_offset=(-0.5, 0.5),
        detector_offset=-0.5,
    )
    return CTOperator(geom)


def test_radon_matches_skimage(smooth_image):
    theta = np.linspace(0.0, 180.0, 45, endpoint=False)
    ref = radon(smooth_image[0, 0].numpy().astype(np.float64), theta, circle=True).T
    ours = _aligned(theta, 64).T(smooth_image)[0, 0].numpy()
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 5e-3


def test_half_pixel_shift_is_what_the_alignment_fixes(smooth_image):
    theta = np.linspace(0.0, 180.0, 45, endpoint=False)
    ref = radon(smooth_image[0, 0].numpy().astype(np.float64), theta, circle=True).T
    plain = CTOperator(CTGeometry(64, tuple(np.deg2rad(theta)), 64)).T(smooth_image)[0, 0].numpy()
    assert np.linalg.norm(plain - ref) / np.linalg.norm(ref) > 2e-2


def test_fbp_matches_skimage_iradon(smooth_image):
    theta = np.linspace(0.0, 180.0, 180, endpoint=False)
    op = _aligned(theta, 64)
    ours = op.fbp(op.T(smooth_image))[0, 0].numpy()
    sino = radon(smooth_image[0, 0].numpy().astype(np.float64), theta, circle=True)
    ref = iradon(sino, theta, circle=True, filter_name="ramp")
    inside = np.hypot(*np.mgrid[-32:32, -32:32]) < 28
    rel = np.linalg.norm((ours - ref)[inside]) / np.linalg.norm(ref[inside])
    assert rel < 3e-2


@pytest.mark.parametrize("beam", ["parallel", "fan"])
def test_t_inv_recovers_image(smooth_image, beam):
    extra = {"source_distance": 150.0, "detector_distance": 100.0} if beam == "fan" else {}
    op = sparse_view(64, 180 if beam == "parallel" else 360, beam=beam, **extra)
    z = op.T(smooth_image)
    cg = op.T_inv(z, method="cg", n_iter=150)
    assert (cg - smooth_image).norm() / smooth_image.norm() < 1e-2
    fbp = op.T_inv(z, method="fbp")
    assert (fbp - smooth_image).norm() / smooth_image.norm() < 5e-2


def test_sparse_view_keeps_exactly_the_measured_angles():
    op = sparse_view(32, 23)
    assert op.mask.shape[0] == 184 and op.measurement_shape()[1] == 23
    rows = op.measured_rows()
    angles = np.asarray(op.geometry.angles)[rows.numpy()]
    np.testing.assert_allclose(np.diff(angles), math.pi / 23, rtol=1e-9)


def test_metal_trace_removes_rays_through_metal():
    base = sparse_view(32, 90)
    metal = torch.zeros(32, 32, dtype=torch.bool)
    metal[10:12, 20:22] = True
    op = metal_trace_operator(base, metal)
    hidden = op.T(metal.float()[None, None])[0, 0][~op.mask]
    assert (~op.mask).sum() > 0 and hidden.min() > 0
    assert float(op.forward(metal.float()[None, None]).abs().max()) < 1e-5


def test_memory_flat_over_create_destroy_cycles():
    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    x = torch.rand(1, 1, 64, 64)
    for _ in range(50):  # warm up allocator pools
        op = sparse_view(64, 23)
        op.adjoint(op.forward(x))
        op.close()
    before = rss_mb()
    for _ in range(500):
        op = sparse_view(64, 23)
        op.adjoint(op.forward(x))
        op.close()
    gc.collect()
    assert rss_mb() - before < 30


@pytest.mark.parametrize("pixel_size,spacing", [(0.5, 0.5), (2.0, 1.0)])
def test_fbp_scales_with_physical_units(smooth_image, pixel_size, spacing):
    """Line integrals in mm: FBP must return the image whatever the pixel and bin sizes."""
    par = sparse_view(64, 180, pixel_size=pixel_size, detector_spacing=spacing)
    fan = sparse_view(
        64,
        360,
        beam="fan",
        source_distance=150.0 * pixel_size,
        detector_distance=100.0 * pixel_size,
        pixel_size=pixel_size,
        detector_spacing=spacing,
    )
    for op in (par, fan):
        rec = op.fbp(op.T(smooth_image))
        assert float(rec.sum() / smooth_image.sum()) == pytest.approx(1.0, abs=0.01)
        assert (rec - smooth_image).norm() / smooth_image.norm() < 0.2


def test_metal_trace_is_found_by_threshold_and_removed_from_the_data():
    from models.physics import from_spec
    from models.physics.ct import remove_metal_trace

    op = from_spec({"modality": "ct", "image_size": 64, "n_views": 90, "metal_threshold_hu": 2500})
    assert op.measured_rows() is not None and len(op.measured_rows()) == 90
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    body = (((xx - 31.5) / 26) ** 2 + ((yy - 31.5) / 20) ** 2 < 1).float() * 0.26
    disk = (xx - 40) ** 2 + (yy - 30) ** 2 < 9
    with_metal = torch.where(disk, torch.tensor(1.0), body)[None, None]
    y = op.forward(with_metal)
    mar, y_kept, mask = remove_metal_trace(op, y, threshold_hu=2500)
    assert mask[disk].float().mean() > 0.95 and mask.sum() < 3 * disk.sum()
    # The kept bins never see the metal: they are the data of the metal-free body.
    assert torch.allclose(mar.forward(body[None, None]), y_kept, atol=1e-3)
    assert y_kept.numel() < y.numel()
    with pytest.raises(ValueError, match="fully sampled"):
        remove_metal_trace(from_spec({"modality": "ct", "image_size": 64, "n_views": 10}), y)
