import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from models.io import HUMapping, load_image, read_dicom_hu, save_png


def test_dicom_ct_to_hu_and_unit_range():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu, modality = read_dicom_hu(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert modality == "CT"
    np.testing.assert_allclose(hu, expected)
    x = load_image(path, 64)
    assert x.shape == (1, 1, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_hu_mapping_is_proportional_to_attenuation():
    m = HUMapping()
    assert m.to_unit(np.array(-1000.0)) == 0.0
    assert m.to_unit(np.array(0.0)) == pytest.approx(0.25)
    np.testing.assert_allclose(
        m.to_hu(m.to_unit(np.array([-500.0, 40.0, 1200.0]))), [-500, 40, 1200]
    )


def test_png_round_trip_and_bad_suffix(tmp_path):
    img = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    save_png(tmp_path / "a.png", img)
    back = load_image(tmp_path / "a.png")
    assert back.shape == (1, 1, 32, 32) and abs(float(back.max()) - 1) < 1e-6
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="must be .npy, .png or .dcm"):
        load_image(tmp_path / "a.txt")
