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


@pytest.mark.parametrize(
    "name",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"],
)
def test_compressed_dicom_decodes_to_the_same_pixels(name, tmp_path):
    """Archives store series compressed (RLE, JPEG 2000, JPEG-LS): reading and training scans
    decode them (pylibjpeg) to exactly the pixels of the uncompressed file."""
    from models.data import scan

    reference, _ = read_dicom_hu(get_testdata_file("MR_small.dcm"))
    compressed = pydicom.dcmread(get_testdata_file(name))
    assert compressed.file_meta.TransferSyntaxUID.is_compressed
    decoded, modality = read_dicom_hu(get_testdata_file(name))
    assert modality == "MR" and np.array_equal(decoded, reference)
    compressed.save_as(tmp_path / "slice.dcm")
    report = scan(tmp_path)
    assert report.skipped == [] and np.array_equal(report.volumes[0].data[0], reference)


def test_jpeg_extended_lossy_dicom_decodes():
    arr, _ = read_dicom_hu(get_testdata_file("JPGExtended.dcm"))
    assert arr.shape == (1024, 256) and np.ptp(arr) > 0


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
