"""Reading measurement files (sinograms, k-space) and checking them against an operator.

One reader for the CLI and the gateway. Formats, recognised by content, not by name:

* ``.npy`` (``numpy.save``, never pickled objects);
* ``.npz`` with one array, or ``real`` and ``imag`` arrays; every member's inflated size is
  capped so an archive bomb is refused before it is inflated;
* HDF5 k-space as fastMRI writes it: a ``kspace`` dataset, ``(slices, H, W)`` single-coil or
  ``(slices, coils, H, W)`` multi-coil, complex, centred (the convention of
  :func:`models.physics.mri.fft2c`);
* ISMRMRD raw data (HDF5 ``dataset/data``, one acquisition per readout line): the readout runs
  along image rows and phase-encode line ``idx.kspace_encode_step_1`` of slice ``idx.slice`` is
  a column, as the line masks of :mod:`models.physics.mri` select columns; the matrix size
  comes from ``dataset/xml``. Lines never acquired stay zero. Its noise measurements are
  read apart (:func:`read_noise_scan`), for the coil noise covariance.

A readout 2× oversampled (fastMRI's 640 rows for a field of view of 320; ISMRMRD's readouts of
twice the reconstruction's x) is cropped in image space to the spec's rows, with the √½ that
keeps the object's intensity; when the file's header states the reconstruction size
(``reconSpace``), the spec must ask for it. With coil maps estimated from the data the crop
waits for :func:`models.physics.slice_problems`, which first takes the coil noise from the
empty half and the maps from the whole field of view.

Errors are :class:`MeasurementError` (a :class:`~models.physics.spec.SpecError`) whose message
names what is wrong and how to fix it; :class:`MeasurementTooLarge` for archives that inflate
beyond the cap.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import torch

from models.physics.spec import SpecError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class MeasurementError(SpecError):
    """A measurement file that cannot be read, or does not fit the spec."""


class MeasurementTooLarge(MeasurementError):
    """An archive member that would inflate beyond the cap."""


def read_array(raw: bytes, max_inflated: int | None = None) -> np.ndarray:
    """The measurement array held by a file's bytes (format detected from its content)."""
    limit = max_inflated or 64 * max(len(raw), 1 << 20)
    if raw.startswith(HDF5_MAGIC):
        return _read_hdf5(raw, limit)
    if raw.startswith(b"PK"):
        return _read_npz(raw, limit)
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception:  # noqa: BLE001 - any unreadable file gets the same actionable message
        raise MeasurementError(
            "measurement must be .npy (numpy.save, no pickled objects), .npz, or HDF5 k-space "
            "(fastMRI 'kspace' or ISMRMRD 'dataset/data')"
        ) from None


def _read_npz(raw: bytes, limit: int) -> np.ndarray:
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            for info in z.infolist():
                kind = (info.external_attr >> 16) & 0o170000  # 0: no type recorded (numpy)
                if kind not in (0, 0o100000) or not _plain_npy(info.filename):
                    raise MeasurementError(
                        ".npz members must be plain .npy files at the top of the archive "
                        "(no folders or links); write it with numpy.savez"
                    )
                if info.file_size > limit:
                    raise MeasurementTooLarge(
                        f"{info.filename} inflates beyond {limit >> 20} MB; send a plain .npy"
                    )
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            names = set(npz.files)
            if names == {"real", "imag"}:
                arrays = [npz["real"], npz["imag"]]
            elif len(names) == 1:
                arrays = [npz[npz.files[0]]]
            else:
                raise MeasurementError(
                    f".npz must hold one array or 'real' and 'imag'; found {sorted(names)[:10]}"
                )
            if not all(isinstance(a, np.ndarray) for a in arrays):
                raise MeasurementError(".npz members must be .npy arrays (use numpy.savez)")
            return arrays[0] if len(arrays) == 1 else arrays[0] + 1j * arrays[1]
    except MeasurementError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MeasurementError(
            f".npz could not be read ({type(exc).__name__}); write it with numpy.savez of "
            "numeric arrays (no pickled objects)"
        ) from None


def _plain_npy(name: str) -> bool:
    return name.endswith(".npy") and "/" not in name and "\\" not in name and ".." not in name


def _check_inflated(name: str, nbytes: int, limit: int) -> None:
    if nbytes > limit:
        raise MeasurementTooLarge(
            f"{name} inflates beyond {limit >> 20} MB (to {nbytes >> 20} MB); send it uncompressed"
        )


# HDF5 filters built into the library: anything else would load a plugin from disk.
BUILTIN_FILTERS = {
    1: "deflate",
    2: "shuffle",
    3: "fletcher32",
    4: "szip",
    5: "nbit",
    6: "scaleoffset",
}


def _hdf5_node(f, path: str):
    """The object at ``path`` if every link on the way is a hard link; ``None`` if absent.

    Links are inspected without being followed (``H5Lexists``/``H5Lget_info``): resolving a
    soft or external link, even to test that it exists, would open another file.
    """
    import h5py
    from h5py import h5l

    node = f
    for depth, part in enumerate(path.split("/"), 1):
        name = part.encode()
        if not isinstance(node, h5py.Group) or not node.id.links.exists(name):
            return None
        kind = node.id.links.get_info(name).type
        if kind != h5l.TYPE_HARD:
            what = {h5l.TYPE_SOFT: "a soft link", h5l.TYPE_EXTERNAL: "an external link"}
            raise MeasurementError(
                f"HDF5 '{'/'.join(path.split('/')[:depth])}' is {what.get(kind, 'a user link')}; "
                "links are refused: store the data itself in the uploaded file"
            )
        node = node[part]
    return node


def _hdf5_dataset(f, path: str, limit: int):
    """The dataset at ``path``, refused unless its bytes lie inside the uploaded file.

    External raw storage, virtual datasets (whose sources are other files) and filters that
    are not built into HDF5 (a plugin loaded from disk) are refused; so is a dataset that
    would inflate beyond ``limit`` bytes.
    """
    import h5py
    from h5py import h5d

    ds = _hdf5_node(f, path)
    if ds is None:
        return None
    if not isinstance(ds, h5py.Dataset):
        raise MeasurementError(f"HDF5 '{path}' must be a dataset, not a group")
    plist = ds.id.get_create_plist()
    if plist.get_layout() not in (h5d.COMPACT, h5d.CONTIGUOUS, h5d.CHUNKED):
        raise MeasurementError(
            f"HDF5 '{path}' is a virtual dataset (its data lie in other files); "
            "write the data into the uploaded file"
        )
    if plist.get_external_count():
        raise MeasurementError(
            f"HDF5 '{path}' declares external raw storage (its data lie in other files); "
            "write the data into the uploaded file"
        )
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in BUILTIN_FILTERS:
            raise MeasurementError(
                f"HDF5 '{path}' uses filter {code}, which is not built into HDF5; "
                f"use one of {sorted(BUILTIN_FILTERS.values())} (gzip is deflate) or none"
            )
    _check_inflated(path, ds.size * ds.dtype.itemsize, limit)
    return ds


def _read_hdf5(raw: bytes, limit: int) -> np.ndarray:
    """``limit`` caps the bytes a dataset (compressed or a fill value) may inflate to.

    The file is opened from memory (no path on disk); only hard-linked datasets stored in
    the upload itself are read (:func:`_hdf5_dataset`).
    """
    import h5py

    try:
        with h5py.File(io.BytesIO(raw), "r") as f:
            ds = _hdf5_dataset(f, "kspace", limit)
            if ds is not None:
                k = np.asarray(ds[()])
                if k.ndim == 2:
                    k = k[None]
                return k[:, None] if k.ndim == 3 else k  # (slices, coils, H, W)
            ds = _hdf5_dataset(f, "dataset/data", limit)
            if ds is not None:
                header = _hdf5_dataset(f, "dataset/xml", limit)
                xml = header[0] if header is not None else None
                return _ismrmrd_kspace(ds[()], xml, limit)
    except MeasurementError:
        raise
    except Exception as exc:  # noqa: BLE001
        # The library's own text can name files on the server: only its kind is returned.
        raise MeasurementError(
            f"HDF5 measurement could not be read ({type(exc).__name__}); write it with h5py "
            "or the fastMRI/ISMRMRD tools, with the data stored in the file"
        ) from None
    raise MeasurementError(
        "HDF5 measurement needs a 'kspace' dataset (fastMRI) or 'dataset/data' (ISMRMRD)"
    )


def read_mask(raw: bytes) -> np.ndarray | None:
    """The measured lines a fastMRI file declares (its ``mask`` dataset, over the columns),
    as booleans; ``None`` for other files or when there is none."""
    if not raw.startswith(HDF5_MAGIC):
        return None
    import h5py

    try:
        with h5py.File(io.BytesIO(raw), "r") as f:
            ds = _hdf5_dataset(f, "mask", 1 << 24)
            if ds is None:
                return None
            mask = np.asarray(ds[()])
    except MeasurementError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MeasurementError(
            f"HDF5 'mask' could not be read ({type(exc).__name__}); store it as fastMRI does, "
            "one number per phase-encoding line"
        ) from None
    if mask.dtype.kind not in "biuf" or mask.ndim not in (1, 2):
        raise MeasurementError("HDF5 'mask' must be numbers, one per phase-encoding line")
    mask = mask != 0
    return mask.any(axis=0) if mask.ndim == 2 else mask


def check_mask(lines: np.ndarray, operator) -> None:
    """The file's measured lines must be the spec's: a mismatch would fit the data to the
    wrong samples."""
    expected = operator.mask.any(dim=0).numpy()
    if lines.shape != expected.shape or not np.array_equal(lines, expected):
        got = np.flatnonzero(lines).tolist() if lines.shape == expected.shape else lines.shape
        raise MeasurementError(
            f"mask: the file's mask dataset measures lines {_brief(got)} but the spec's mask "
            f"measures {_brief(np.flatnonzero(expected).tolist())} of {expected.size}; send "
            "the spec's mask as it was acquired (kind 'explicit' with these lines)"
        )


def _brief(items) -> str:
    if not isinstance(items, list):
        return f"of shape {tuple(items)}"
    text = ", ".join(map(str, items[:12]))
    return f"[{text}{', …' if len(items) > 12 else ''}] ({len(items)} lines)"


def _header_matrices(xml) -> dict[str, tuple[int, int]]:
    """The ``encodedSpace`` and ``reconSpace`` matrix sizes (x: readout, y: phase encoding)
    of an ISMRMRD XML header, those it has."""
    if xml is None:
        return {}
    text = xml.decode() if isinstance(xml, bytes) else str(xml)
    if "<!DOCTYPE" in text.upper() or "<!ENTITY" in text.upper():
        raise MeasurementError(
            "the ISMRMRD header must not declare a DTD or entities; send the plain XML header"
        )
    try:
        root = ET.fromstring(text)  # nosec B314 # no DTD, so no entity expansion (refused above)
    except ET.ParseError:
        raise MeasurementError(
            "the ISMRMRD header is not well-formed XML; send the header the scanner wrote"
        ) from None
    found: dict[str, tuple[int, int]] = {}
    for el in root.iter():
        name = el.tag.split("}")[-1]
        if name in ("encodedSpace", "reconSpace") and name not in found:
            size = {c.tag.split("}")[-1]: c for c in el}.get("matrixSize")
            if size is None:
                continue
            try:
                dims = {c.tag.split("}")[-1]: int(c.text or "") for c in size}
                found[name] = (dims["x"], dims["y"])
            except (KeyError, ValueError):
                raise MeasurementError(
                    f"the ISMRMRD header's {name} matrixSize needs integer x and y"
                ) from None
    return found


def read_header(raw: bytes) -> dict[str, tuple[int, int]]:
    """The matrix sizes an HDF5 file's ISMRMRD header states: ``{"encodedSpace": (x, y),
    "reconSpace": (x, y)}``, from fastMRI's ``ismrmrd_header`` or ISMRMRD's ``dataset/xml``;
    empty for other files or without a header."""
    if not raw.startswith(HDF5_MAGIC):
        return {}
    import h5py

    try:
        with h5py.File(io.BytesIO(raw), "r") as f:
            for path in ("ismrmrd_header", "dataset/xml"):
                ds = _hdf5_dataset(f, path, 1 << 24)
                if ds is not None:
                    value = ds[()]
                    return _header_matrices(value if ds.shape == () else value[0])
    except MeasurementError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MeasurementError(
            f"HDF5 ISMRMRD header could not be read ({type(exc).__name__}); store the XML "
            "header as one string"
        ) from None
    return {}


# ISMRMRD acquisition flags (1-based bits) of readouts that are not image lines: noise
# measurements, navigators, phase correction and dummy scans.
NOISE_MEASUREMENT = 19
NOT_IMAGING = (NOISE_MEASUREMENT, 23, 24, 27)


def _flagged(acqs: np.ndarray, bits: tuple[int, ...]) -> np.ndarray:
    """Which acquisitions carry any of the flag ``bits`` (none when the header has no flags)."""
    if "flags" not in (acqs["head"].dtype.names or ()):  # a header without flags: image lines
        return np.zeros(len(acqs), bool)
    flags = acqs["head"]["flags"].astype(np.uint64)
    out = np.zeros(len(acqs), bool)
    for bit in bits:
        out |= ((flags >> np.uint64(bit - 1)) & np.uint64(1)).astype(bool)
    return out


def _ismrmrd_kspace(acqs: np.ndarray, xml, limit: int) -> np.ndarray:
    """(slices, coils, readout, ny) complex64 from ISMRMRD acquisitions (one readout each),
    the readout kept as acquired: an oversampled one (twice the reconstruction's x) is
    removed later, once its empty half has given the coil noise and its whole field of view
    the coil maps."""
    if len(acqs) == 0:
        raise MeasurementError("ISMRMRD file holds no acquisitions")
    acqs = acqs[~_flagged(acqs, NOT_IMAGING)]
    if len(acqs) == 0:
        raise MeasurementError(
            "ISMRMRD file holds only noise, navigator, phase-correction or dummy acquisitions"
        )
    head = acqs["head"]
    samples = int(head["number_of_samples"][0])
    coils = int(head["active_channels"][0])
    ky = head["idx"]["kspace_encode_step_1"].astype(int)
    sl = head["idx"]["slice"].astype(int)
    matrix = _header_matrices(xml).get("encodedSpace")
    nx, ny = matrix if matrix else (samples, int(ky.max()) + 1)
    if samples not in (nx, 2 * nx):
        raise MeasurementError(
            f"ISMRMRD readouts have {samples} samples but the encoded x size is {nx}: "
            "only no or 2× readout oversampling is supported"
        )
    if ky.max() >= ny:
        raise MeasurementError(f"kspace_encode_step_1 reaches {ky.max()} beyond matrix y {ny}")
    shape = (int(sl.max()) + 1, coils, samples, ny)
    _check_inflated("ISMRMRD k-space", 8 * int(np.prod(shape, dtype=object)), limit)
    k = np.zeros(shape, np.complex64)
    for a, data in enumerate(acqs["data"]):
        pairs = np.asarray(data, np.float32).reshape(coils, samples, 2)
        k[sl[a], :, :, ky[a]] = pairs[..., 0] + 1j * pairs[..., 1]
    return k


def remove_readout_oversampling(k: np.ndarray, rows: int) -> np.ndarray:
    """k-space ``(..., 2 rows, cols)`` whose readout (rows) was oversampled 2× (the field of
    view doubled) → ``(..., rows, cols)``: the central half of the image along the readout,
    with the √½ that keeps the object's intensity under the orthonormal FFT."""
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, -2), axis=-2, norm="ortho"), -2)
    lo = (k.shape[-2] - rows) // 2
    img = img[..., lo : lo + rows, :] * np.sqrt(0.5)
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, -2), axis=-2, norm="ortho"), -2)


def read_noise_scan(raw: bytes, coils: int | None = None) -> np.ndarray | None:
    """The coil noise samples ``(coils, M)`` complex64 of an ISMRMRD file's noise
    measurements (acquisitions flagged ``ACQ_IS_NOISE_MEASUREMENT``), which the scanner
    records with the receivers on and no excitation; ``None`` when it has none. With
    ``coils`` (the measurement's), the scan must have as many, and enough samples to
    estimate their covariance."""
    if not raw.startswith(HDF5_MAGIC):
        return None
    import h5py

    try:
        with h5py.File(io.BytesIO(raw), "r") as f:
            ds = _hdf5_dataset(f, "dataset/data", 64 * max(len(raw), 1 << 20))
            if ds is None:
                return None
            acqs = ds[()]
            noise = acqs[_flagged(acqs, (NOISE_MEASUREMENT,))]
            if len(noise) == 0:
                return None
            channels = {int(c) for c in noise["head"]["active_channels"]}
            if len(channels) != 1:
                raise MeasurementError(
                    f"noise: ISMRMRD noise measurements have differing channel counts "
                    f"{sorted(channels)}; record the noise scan with every receiver channel"
                )
            c = channels.pop()
            parts = [np.asarray(d, np.float32).reshape(c, -1, 2) for d in noise["data"]]
    except MeasurementError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MeasurementError(
            f"ISMRMRD noise measurements could not be read ({type(exc).__name__}); write them "
            "as the ISMRMRD tools do (one acquisition per noise readout)"
        ) from None
    pairs = np.concatenate(parts, axis=1)
    scan = (pairs[..., 0] + 1j * pairs[..., 1]).astype(np.complex64)
    if not np.isfinite(scan).all():
        raise MeasurementError("ISMRMRD noise measurements contain NaN or Inf; send finite values")
    if coils is not None and scan.shape[0] != coils:
        raise MeasurementError(
            f"noise: the ISMRMRD noise measurements have {scan.shape[0]} channels but the image "
            f"acquisitions {coils}; record the noise scan with the same receiver channels"
        )
    if scan.shape[1] < 2 * scan.shape[0]:
        raise MeasurementError(
            f"noise: {scan.shape[1]} noise samples per channel cannot estimate a "
            f"{scan.shape[0]}-channel covariance; record a longer noise scan (or none: the "
            "noise is then taken from the data)"
        )
    return scan


def read_measurement(raw: bytes, spec) -> torch.Tensor:
    """A measurement file's bytes read and checked against a parsed spec: format, shape,
    dtype, finiteness, and a fastMRI file's own mask. For coil maps estimated from the data
    (``espirit``) only the layout is checked here; the maps come per slice later
    (:func:`models.physics.slice_problems`)."""
    from models.physics.spec import from_spec, layout_operator, needs_data

    arr = read_array(raw)
    if spec.modality == "mri":
        _check_recon_space(read_header(raw), arr.shape, spec.shape)
    op = layout_operator(spec, arr) if needs_data(spec) else from_spec(spec)
    lines = read_mask(raw)
    if lines is not None and spec.modality == "mri":
        check_mask(lines, op)
    return as_measurement(arr, op)


def _check_recon_space(header: dict, shape: tuple, image: tuple[int, int]) -> None:
    """The readout is reduced to the reconstruction size the file's header states
    (``reconSpace`` x): the spec must ask for that size, or the data would be cropped or
    padded to another field of view than the scanner's."""
    recon = header.get("reconSpace")
    if recon is None or len(shape) < 2:
        return
    rows, readout = image[0], shape[-2]
    if readout in (recon[0], 2 * recon[0]) and rows != recon[0]:
        raise MeasurementError(
            f"image_size: the file's ISMRMRD header reconstructs {recon[0]} readout points "
            f"(reconSpace x) of the {readout} acquired, but the spec asks for {rows} rows; set "
            f"image_size to [{recon[0]}, {image[1]}]"
        )


def display_columns(raw: bytes, spec) -> int | None:
    """The columns a scanner displays of an MR image reconstructed on all its encoded lines:
    the header's ``reconSpace`` y where it is narrower than the spec's columns (fastMRI knee:
    320 of 368, the phase-encoding oversampling that keeps aliasing out of the field of
    view); None otherwise. The image is solved on every encoded column and cropped, centred,
    to these afterwards (the data determine the image only on the whole encoded field)."""
    recon = read_header(raw).get("reconSpace") if spec.modality == "mri" else None
    if recon is None or not 0 < recon[1] < spec.shape[1]:
        return None
    return recon[1]


def as_measurement(arr: np.ndarray, operator) -> torch.Tensor:
    """``(B, *measurement_shape)`` from an array, checked for dtype, shape and finiteness.

    A single measurement may omit the batch axis; complex data may come as real/imag pairs
    in a last axis of 2; for an operator ``A = P(Λ) T`` the full ``T``-domain data (zero-filled
    k-space as fastMRI and ISMRMRD store it, or every view of a sinogram) is accepted and
    subsampled to the measured entries by ``P(Λ)``.
    """
    if arr.dtype.kind not in "iufc":
        raise MeasurementError(
            f"dtype {arr.dtype} is not numeric: send float32 (or complex64 k-space)"
        )
    expected = tuple(operator.measurement_shape())
    complex_data = operator.complex_measurements
    if complex_data and not np.iscomplexobj(arr) and arr.ndim >= 1 and arr.shape[-1] == 2:
        arr = arr[..., 0] + 1j * arr[..., 1]
    full = _full_shape(operator)
    if arr.ndim == len(expected) or (full is not None and arr.ndim == len(full)):
        arr = arr[None]
    if complex_data and not np.iscomplexobj(arr):
        raise MeasurementError(
            "MRI k-space must be complex (or real/imag pairs in a last axis of 2)"
        )
    if not complex_data and np.iscomplexobj(arr):
        raise MeasurementError("a CT sinogram is real: send the real array, not a complex one")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = np.ascontiguousarray(arr.astype(np.complex64 if complex_data else np.float32))
    grid = full or expected  # k-space as stored: every line, or the measured ones
    if complex_data and arr.ndim == 4 and arr.shape[-2:] == (2 * grid[-2], grid[-1]):
        # fastMRI stores the readout 2× oversampled (640 for a 320 field of view).
        arr = remove_readout_oversampling(arr, grid[-2]).astype(np.complex64)
    if not np.isfinite(arr).all():
        raise MeasurementError(
            "measurement contains NaN or Inf, or values beyond the float32 range; "
            "send finite values"
        )
    y = torch.from_numpy(arr)
    if full is not None and tuple(y.shape[1:]) == full and full != expected:
        y = operator.subsample(y)
    if tuple(y.shape[1:]) != expected:
        also = f" (or the full {full})" if full is not None and full != expected else ""
        raise MeasurementError(
            f"measurement shape {tuple(arr.shape[1:])} does not match the spec, "
            f"which expects {expected}{also}"
        )
    _check_calibration(operator, y)
    return y


def _check_calibration(operator, y: torch.Tensor) -> None:
    """MRI k-space whose fully sampled centre is all zero cannot be reconstructed (and its
    phase and noise cannot be estimated): refused, naming the lines."""
    from models.physics.mri import calibration_lines

    mask = getattr(operator, "mask", None)
    if not operator.complex_measurements or mask is None or y.ndim != 4:
        return
    lines = calibration_lines(mask)
    if len(lines) == 0:
        return
    if y.shape[-1] != mask.shape[-1]:  # only the measured lines: find the centre among them
        measured = mask.any(dim=0).nonzero().flatten().tolist()
        lines = torch.tensor([measured.index(int(i)) for i in lines])
    empty = (y[..., lines] == 0).flatten(1).all(dim=1)
    if bool(empty.any()):
        first = int(empty.nonzero()[0])
        raise MeasurementError(
            f"slice {first}: the k-space calibration lines (the fully sampled centre, columns "
            f"{int(calibration_lines(mask)[0])}-{int(calibration_lines(mask)[-1])}) are all zero; "
            "send the acquired centre of k-space, or a mask that matches the data"
        )


def _full_shape(operator) -> tuple[int, ...] | None:
    return tuple(operator.range_shape()) if operator.has_decomposition else None
