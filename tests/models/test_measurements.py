"""Measurement files: NPY, NPZ, fastMRI HDF5 and ISMRMRD raw data, written here with numpy and
h5py as those tools write them, read back to exactly what the operator produced."""

import io
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from models.io import load_measurement
from models.measurements import (
    MeasurementError,
    MeasurementTooLarge,
    as_measurement,
    read_array,
)
from models.multicoil import ACQUISITION as HEADER
from models.phantoms import mri_phantoms
from models.physics import from_spec

SIZE = 32
MRI = {"modality": "mri", "image_size": SIZE, "mask": {"kind": "equispaced", "acceleration": 4}}

XML = (
    '<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
    "<encodedSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize>"
    "<fieldOfView_mm><x>256</x><y>256</y><z>5</z></fieldOfView_mm></encodedSpace>"
    "</encoding></ismrmrdHeader>"
)


def _kspace(n_slices: int = 2, spec=MRI) -> tuple[torch.Tensor, object]:
    op = from_spec(spec)
    with torch.no_grad():
        return op.forward(mri_phantoms(n_slices, SIZE, seed=3)), op


def _h5(write) -> bytes:
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        write(f)
    return buf.getvalue()


def _ismrmrd(k: np.ndarray, lines: np.ndarray, oversample: bool = False) -> bytes:
    """One acquisition per measured (slice, ky) line of a full (slices, coils, x, ky) k-space,
    channel-major interleaved re/im."""
    if oversample:  # the same object seen by a readout twice as long: FOV doubled in x
        img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, -2), axis=-2, norm="ortho"), -2)
        pad = np.zeros(img.shape[:-2] + (2 * SIZE, SIZE), complex)
        pad[..., SIZE // 2 : SIZE // 2 + SIZE, :] = img * np.sqrt(2)
        k = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(pad, -2), axis=-2, norm="ortho"), -2)
    n_slices, coils, samples, _ = k.shape
    vlen = h5py.vlen_dtype("<f4")
    acqs = np.zeros(n_slices * len(lines), [("head", HEADER), ("traj", vlen), ("data", vlen)])
    a = 0
    for s in range(n_slices):
        for ky in lines:
            acqs[a]["head"]["number_of_samples"] = samples
            acqs[a]["head"]["active_channels"] = coils
            acqs[a]["head"]["available_channels"] = coils
            acqs[a]["head"]["idx"]["kspace_encode_step_1"] = ky
            acqs[a]["head"]["idx"]["slice"] = s
            line = k[s, :, :, ky]
            acqs[a]["traj"] = np.zeros(0, np.float32)
            acqs[a]["data"] = np.stack([line.real, line.imag], -1).astype(np.float32).ravel()
            a += 1

    def write(f):
        g = f.create_group("dataset")
        g.create_dataset("data", data=acqs)
        xml = XML.format(nx=SIZE, ny=SIZE).encode()
        g.create_dataset("xml", data=[xml], dtype=h5py.string_dtype())

    return _h5(write)


def test_npy_and_npz_read_back_exactly():
    k, op = _kspace()
    arr = k.numpy()
    buf = io.BytesIO()
    np.save(buf, arr)
    assert np.array_equal(read_array(buf.getvalue()), arr)
    buf = io.BytesIO()
    np.savez(buf, real=arr.real, imag=arr.imag)
    y = as_measurement(read_array(buf.getvalue()), op)
    assert torch.equal(y, k)


def test_fastmri_hdf5_single_and_multi_coil():
    k, op = _kspace()
    full = op.pad(k).numpy()[:, 0]  # zero-filled (slices, H, W), as fastMRI stores it
    raw = _h5(lambda f: f.create_dataset("kspace", data=full))
    assert torch.equal(as_measurement(read_array(raw), op), k)
    mc_spec = {**MRI, "coils": 4}
    kmc, opmc = _kspace(spec=mc_spec)
    raw = _h5(lambda f: f.create_dataset("kspace", data=kmc.numpy()))
    assert torch.equal(as_measurement(read_array(raw), opmc), kmc)


@pytest.mark.parametrize("oversample", [False, True])
def test_ismrmrd_lines_land_where_they_were_acquired(oversample):
    k, op = _kspace()
    lines = np.flatnonzero(op.mask.any(dim=0).numpy())  # measured columns
    assert 0 < len(lines) < SIZE
    raw = _ismrmrd(op.pad(k).numpy(), lines, oversample)
    full = read_array(raw)
    assert full.shape == (2, 1, 2 * SIZE if oversample else SIZE, SIZE)  # kept as acquired
    unmeasured = np.setdiff1d(np.arange(SIZE), lines)
    assert np.abs(full[..., unmeasured]).max() == 0.0
    y = as_measurement(full, op)
    assert y.shape == k.shape
    assert torch.allclose(y, k, atol=1e-5 * float(k.abs().max()))


def test_ismrmrd_noise_and_navigator_readouts_are_not_image_lines():
    """A noise scan (flag 19, another length) and a navigator (flag 23) before the image
    lines change nothing; a file of such readouts alone is refused."""
    k, op = _kspace(1)
    lines = np.flatnonzero(op.mask.any(dim=0).numpy())
    plain = read_array(_ismrmrd(op.pad(k).numpy(), lines))
    raw = _ismrmrd(op.pad(k).numpy(), lines)
    with h5py.File(io.BytesIO(raw)) as f:
        acqs = f["dataset/data"][()]
        xml = f["dataset/xml"][()]
    extra = np.zeros(2, acqs.dtype)
    for a, bit in zip(extra, (19, 23), strict=True):
        a["head"]["flags"] = 1 << (bit - 1)
        a["head"]["number_of_samples"] = 7
        a["head"]["active_channels"] = 1
        a["head"]["idx"]["kspace_encode_step_1"] = lines[0]
        a["traj"] = np.zeros(0, np.float32)
        a["data"] = np.full(14, 1e3, np.float32)

    def write(acquisitions):
        def w(f):
            g = f.create_group("dataset")
            g.create_dataset("data", data=acquisitions)
            g.create_dataset("xml", data=xml, dtype=h5py.string_dtype())

        return _h5(w)

    mixed = read_array(write(np.concatenate([extra, acqs])))
    assert np.array_equal(mixed, plain)
    with pytest.raises(MeasurementError, match="only noise"):
        read_array(write(extra))


def test_load_measurement_reads_hdf5_for_the_cli(tmp_path):
    k, op = _kspace(1)
    path = tmp_path / "scan.h5"
    path.write_bytes(_h5(lambda f: f.create_dataset("kspace", data=op.pad(k).numpy()[:, 0])))
    assert torch.equal(load_measurement(path, op), k)


@pytest.mark.parametrize(
    "raw,message",
    [
        (b"\x93NUMPY garbage", ".npy"),
        (_h5(lambda f: f.create_dataset("images", data=np.zeros(3))), "'kspace' dataset"),
        (b"\x89HDF\r\n\x1a\n truncated", "HDF5 measurement could not be read"),
    ],
)
def test_unreadable_files_name_the_fix(raw, message):
    with pytest.raises(MeasurementError, match=message):
        read_array(raw)


def test_checks_shape_dtype_finiteness_and_kind():
    k, op = _kspace(1)
    with pytest.raises(MeasurementError, match="expects"):
        as_measurement(k.numpy()[..., :-1], op)
    with pytest.raises(MeasurementError, match="must be complex"):
        as_measurement(k.numpy().real, op)
    bad = k.numpy().copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(MeasurementError, match="NaN"):
        as_measurement(bad, op)
    ct = from_spec({"modality": "ct", "image_size": SIZE, "n_views": 8})
    sino = np.zeros((1,) + ct.measurement_shape(), np.complex64)
    with pytest.raises(MeasurementError, match="real"):
        as_measurement(sino, ct)
    with pytest.raises(MeasurementError, match="not numeric"):
        as_measurement(np.array(["a"]), ct)
    pairs = np.stack([k.numpy().real, k.numpy().imag], -1)
    assert torch.equal(as_measurement(pairs, op), k)


def test_npz_bomb_is_refused_before_inflating():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("y.npy", b"\0" * (8 << 20))
    with pytest.raises(MeasurementTooLarge, match="inflates beyond"):
        read_array(buf.getvalue(), max_inflated=1 << 20)


def hostile_containers(secret: Path, k: np.ndarray) -> dict[str, bytes]:
    """HDF5 and NPZ uploads whose data would come from ``secret`` (a raw file) or the HDF5
    file ``secret.h5`` beside it (issue 17: an upload must never read a server file)."""
    other = secret.with_suffix(".h5")
    with h5py.File(other, "w") as f:
        f["kspace"] = k
        f.create_group("dataset").create_dataset("data", data=np.zeros(4))
    nbytes = k.size * k.dtype.itemsize
    dt = k.dtype

    def external(f):
        f.create_dataset("kspace", k.shape, dt, external=[(str(secret), 0, nbytes)])

    def virtual(f):
        layout = h5py.VirtualLayout(k.shape, dt)
        layout[...] = h5py.VirtualSource(str(other), "kspace", k.shape, dt)
        f.create_virtual_dataset("kspace", layout)

    def external_link(f):
        f["kspace"] = h5py.ExternalLink(str(other), "kspace")

    def soft_to_external(f):
        f["elsewhere"] = h5py.ExternalLink(str(other), "kspace")
        f["kspace"] = h5py.SoftLink("/elsewhere")

    def soft_link(f):
        f["real"] = k
        f["kspace"] = h5py.SoftLink("/real")

    def ismrmrd_group_link(f):
        f["dataset"] = h5py.ExternalLink(str(other), "dataset")

    def ismrmrd_external_header(f):
        g = f.create_group("dataset")
        g.create_dataset("data", data=np.zeros(4))
        g.create_dataset("xml", (1,), "S64", external=[(str(secret), 0, 64)])

    def plugin_filter(f):  # blosc (32001), not built into HDF5: reading would load a plugin
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_chunk(k.shape)
        plist.set_filter(32001, h5py.h5z.FLAG_OPTIONAL)
        space = h5py.h5s.create_simple(k.shape)
        h5py.h5d.create(f.id, b"kspace", h5py.h5t.py_create(dt), space, dcpl=plist)

    files = {
        name: _h5(write)
        for name, write in {
            "HDF5 external raw storage": external,
            "HDF5 virtual dataset": virtual,
            "HDF5 external link": external_link,
            "HDF5 soft link to an external link": soft_to_external,
            "HDF5 soft link": soft_link,
            "ISMRMRD group as an external link": ismrmrd_group_link,
            "ISMRMRD header with external storage": ismrmrd_external_header,
            "HDF5 filter plugin": plugin_filter,
        }.items()
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        link = zipfile.ZipInfo("kspace.npy")
        link.external_attr = 0o120777 << 16
        z.writestr(link, str(secret))
    files["NPZ member that is a symlink"] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../../kspace.npy", _npy_bytes(k))
    files["NPZ member outside the archive root"] = buf.getvalue()
    return files


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_containers_that_point_outside_the_upload_are_refused(tmp_path):
    """Issue 17: external storage, virtual datasets, soft and external links and filter
    plugins are refused by what they are, naming the dataset and never the server path."""
    k, _ = _kspace(1)
    arr = k.numpy()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(arr.size * 2, 7, np.float32).tobytes())
    for name, raw in hostile_containers(secret, arr).items():
        with pytest.raises(MeasurementError) as info:
            read_array(raw)
        message = str(info.value)
        assert str(tmp_path) not in message and "secret" not in message, (name, message)
        assert any(w in message for w in ("link", "external", "virtual", "filter", ".npz")), (
            name,
            message,
        )
    # The ordinary files still read: chunked and compressed, and contiguous.
    plain = _h5(lambda f: f.create_dataset("kspace", data=arr, compression="gzip", chunks=True))
    assert np.array_equal(read_array(plain), arr)


def test_hdf5_library_errors_are_not_echoed(tmp_path):
    """A damaged file gets the library's error kind, not its text (which can name paths)."""
    k, _ = _kspace(1)
    raw = _h5(lambda f: f.create_dataset("kspace", data=k.numpy()))
    broken = raw[: len(raw) // 2]
    with pytest.raises(MeasurementError) as info:
        read_array(broken)
    kind = str(info.value).split("(")[1].split(")")[0]
    assert kind.isidentifier(), str(info.value)  # an exception's class name, nothing more
