"""Real CT and MR images for training and evaluation, fetched offline from Debian packages.

The bundled priors were first trained on procedural phantoms only; these sources add real
scans that any Debian mirror serves (``scorerecon data fetch``, ``make realdata``):

============================  =====================================  ========================
source                        what                                   split
============================  =====================================  ========================
``cranium`` (CT)              InVesalius' ``Cranium.inv3``: a head   train / val / test slabs
                              CT, 108 axial slices, HU
``colin27`` (MR)              MRIcron's ``ch2.nii.gz``: the Colin27  train / val / test slabs
                              single-subject T1 (1 mm, with scalp)
``itk-mr`` (MR)               ITK example slices: BrainWeb T1 and    test only
                              PD brain slices, an abdominal MR slice
``itk-complex`` (complex MR)  ITK's ``itkBrainSliceComplex.mha``     test only
``nibabel-anatomical`` (MR)   nibabel's ``tests/data/anatomical.nii``  test only
============================  =====================================  ========================

:data:`SPLITS` is the one definition of the train / validation / test split that the whole
project uses: whole contiguous ranges of axial slices (slabs), with at least :data:`GAP`
slices between slabs of different splits so that neighbouring slices cannot leak. The ITK
brain slices are BrainWeb images of the Colin27 anatomy (the T1 slice is Colin27's axial
slice 94, the PD one about 88), so Colin27's *test* slab is placed around them: they stay
unseen by any prior trained on the train split.

The fetch writes, under :func:`data_dir`, folders that :mod:`models.data` reads
(``<split>/ct``, ``<split>/mr``: NIfTI slabs in HU or raw magnitude, PNG slices), a
``<split>/complex`` folder (complex64 NPY), the packages' copyright files under
``licences/`` and ``sources.json`` (package, version, file, licence, shape, spacing,
intensity mapping and the files of each split). :func:`real_slices` and
:func:`real_complex_slices` read them back as model-ready [0, 1] slices.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess  # apt-get and dpkg-deb with fixed argument lists, no shell
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models.data import MR_PERCENTILE, mr_scale, read_nifti, write_nifti
from models.formats import read_inv3, read_metaimage
from models.io import HUMapping

ENV = "SCORERECON_REALDATA"
ROOT = Path(__file__).resolve().parent.parent
REPO_CACHE = ROOT / ".cache" / "realdata"  # where ``make realdata`` puts it (git-ignored)
MANIFEST = "sources.json"
FORMAT = 1
HU = HUMapping()

# --------------------------------------------------------------------------------------
# The split (the one place it is defined)
# --------------------------------------------------------------------------------------

Slab = tuple[int, int]  # [start, stop) indices of axial slices
SPLIT_NAMES = ("train", "val", "test")
GAP = 4  # at least this many slices between slabs of different splits

SPLITS: dict[str, dict] = {
    # Cranium.inv3: 108 axial slices of 1.5 mm, 0 at the teeth, 107 above the vertex.
    # Test: mid-head (orbits to ventricles); validation: upper brain; train: the rest.
    "cranium": {
        "n": 108,
        "train": ((0, 38), (86, 108)),
        "test": ((42, 66),),
        "val": ((70, 82),),
    },
    # Colin27 (ch2.nii.gz): 181 axial slices of 1 mm, 0 below the chin (MNI z = -71 mm).
    # Test holds slices 74..109, around the levels of the ITK BrainWeb slices (88, 94).
    "colin27": {
        "n": 181,
        "train": ((0, 50), (114, 181)),
        "val": ((54, 70),),
        "test": ((74, 110),),
    },
}
TEST_ONLY = ("itk-mr", "itk-complex", "nibabel-anatomical")

MIN_FOREGROUND = 0.15  # a slice with fewer pixels than this above FOREGROUND_LEVEL is air
FOREGROUND_LEVEL = 0.05  # in [0, 1] units: HU -800 for CT, 5 % of the MR scale


def check_split(n: int, split: Mapping[str, Sequence[Slab]], gap: int = GAP) -> None:
    """Raise ``ValueError`` unless the slabs lie in ``[0, n)``, do not overlap, and slabs of
    different splits are at least ``gap`` slices apart."""
    slabs = []
    for name in SPLIT_NAMES:
        for start, stop in split.get(name, ()):
            if not 0 <= start < stop <= n:
                raise ValueError(f"{name} slab [{start}, {stop}) is not inside [0, {n})")
            slabs.append((start, stop, name))
    slabs.sort()
    for (a0, a1, an), (b0, _, bn) in zip(slabs, slabs[1:], strict=False):
        if b0 < a1:
            raise ValueError(f"{an} slab [{a0}, {a1}) overlaps the {bn} slab starting at {b0}")
        if an != bn and b0 - a1 < gap:
            raise ValueError(
                f"only {b0 - a1} slice(s) between the {an} slab ending at {a1} and the {bn} "
                f"slab starting at {b0} (at least {gap} required)"
            )


def split_record() -> dict:
    """The split as ``sources.json`` records it (a fetch with another split is stale)."""
    return {
        "gap": GAP,
        "slabs": {
            name: {k: [list(s) for s in v] if k != "n" else v for k, v in spec.items()}
            for name, spec in SPLITS.items()
        },
        "test_only": list(TEST_ONLY),
    }


# --------------------------------------------------------------------------------------
# Where the data are
# --------------------------------------------------------------------------------------


def _home() -> Path:
    if os.environ.get("SCORERECON_HOME"):
        return Path(os.environ["SCORERECON_HOME"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "scorerecon"


def data_dir(root: str | Path | None = None) -> Path:
    """The real-data folder: ``root`` if given, else ``$SCORERECON_REALDATA``, else the
    checkout's ``.cache/realdata`` when ``make realdata`` filled it, else
    ``$SCORERECON_HOME/data/real`` (``~/.local/share/scorerecon/data/real``)."""
    if root is not None:
        return Path(root)
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    if (REPO_CACHE / MANIFEST).is_file():
        return REPO_CACHE
    return _home() / "data" / "real"


def load_manifest(root: str | Path | None = None) -> dict:
    """``sources.json`` of a fetched folder; a missing one or one written with another split
    raises ``FileNotFoundError`` / ``ValueError`` saying how to fetch again."""
    folder = data_dir(root)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no real data in '{folder}' ({MANIFEST} missing): run `scorerecon data fetch "
            f"--dest {folder}` (or `make realdata`)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("split") != split_record():
        raise ValueError(
            f"'{folder}' was fetched with another split than models/realdata.py's SPLITS: "
            f"run `scorerecon data fetch --dest {folder}` again"
        )
    return manifest


def available(root: str | Path | None = None) -> bool:
    """Whether fetched real data (with the current split) are there."""
    try:
        load_manifest(root)
    except (OSError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------
# Sources and their conversion
# --------------------------------------------------------------------------------------


class FetchError(RuntimeError):
    """A source could not be had; the message says what was needed and why."""


@dataclass(frozen=True)
class Source:
    name: str
    modality: str  # "ct", "mr" or "complex"
    package: str  # Debian package
    members: tuple[str, ...]  # files inside the package
    licence: str
    origin: str
    convert: Callable[[Source, dict[str, Path], Path], dict]
    python_dist: str | None = None  # take the files from this installed distribution first


def _mr_intensity(scale: float, what: str) -> dict:
    return {
        "unit": "arbitrary (MR magnitude)",
        "to_unit": f"x = clip(v / scale, 0, 1), scale = the {MR_PERCENTILE}th percentile of "
        f"{what}'s voxels above 1 % of its maximum",
        "scale": round(scale, 4),
    }


def _slab_outputs(
    src: Source,
    out: Path,
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    dtype,
    folder: str,
    scale: float | None = None,
) -> list[dict]:
    spec = SPLITS[src.name]
    if volume.shape[0] != spec["n"]:
        raise ValueError(
            f"{src.name}: {volume.shape[0]} axial slices, but SPLITS['{src.name}'] is defined "
            f"for {spec['n']} (a changed package? update models/realdata.py)"
        )
    check_split(spec["n"], spec)
    outputs = []
    for split in SPLIT_NAMES:
        for start, stop in spec[split]:
            rel = f"{split}/{folder}/{src.name}_z{start:03d}-{stop - 1:03d}.nii.gz"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            write_nifti(out / rel, volume[start:stop], spacing, dtype, z0=start)
            item = {"path": rel, "split": split, "slices": [start, stop]}
            if scale is not None:
                item["scale"] = round(scale, 4)
            outputs.append(item)
    return outputs


def _convert_cranium(src: Source, files: dict[str, Path], out: Path) -> dict:
    vol = read_inv3(files[src.members[0]])
    if vol.modality.upper() not in ("", "CT"):
        raise ValueError(f"main.plist says modality '{vol.modality}', expected CT")
    # The file stores rows posterior first (the head rest at the top, the face at the
    # bottom); flipped so that anterior is up, as models.data.read_nifti shows volumes.
    hu = np.ascontiguousarray(vol.data[:, ::-1, :])
    return {
        "shape": list(hu.shape),
        "spacing_mm": [round(s, 6) for s in vol.spacing],
        "dtype": str(vol.data.dtype),
        "byte_order": "little-endian" if vol.byte_order == "<" else "big-endian",
        "range": [int(hu.min()), int(hu.max())],
        "intensity": {
            "unit": "HU",
            "to_unit": f"x = clip((HU + {-HU.hu_air:g}) / {HU.hu_max - HU.hu_air:g}, 0, 1) "
            "(models/io.py HUMapping)",
        },
        "orientation": "(z, y, x): z from the teeth (0) to the vertex; rows flipped so that "
        "anterior is up; left-right as stored",
        "series_name": vol.name,
        "outputs": _slab_outputs(src, out, hu, vol.spacing, np.int16, "ct"),
    }


def _convert_colin27(src: Source, files: dict[str, Path], out: Path) -> dict:
    import nibabel as nib

    path = files[src.members[0]]
    vol = read_nifti(path)  # (z, y, x), anterior up
    dtype = nib.load(str(path)).get_data_dtype()
    scale = mr_scale(vol.data)
    return {
        "shape": list(vol.data.shape),
        "spacing_mm": [float(s) for s in vol.spacing],
        "dtype": str(dtype),
        "range": [float(vol.data.min()), float(vol.data.max())],
        "intensity": _mr_intensity(scale, "the whole volume"),
        "orientation": "(z, y, x) from the NIfTI (RAS, MNI space): z inferior to superior, "
        "anterior up (models.data.read_nifti)",
        "outputs": _slab_outputs(src, out, vol.data, vol.spacing, dtype, "mr", scale),
    }


ITK_DATA = "usr/share/doc/insighttoolkit4-examples/examples/Data/"
ITK_LICENCE = (
    "Apache-2.0 (debian/copyright 'Files: *': Copyright 1999-2011 Insight Software Consortium)"
)
ITK_SLICES = {  # member -> (output name, flip rows to anterior-up)
    ITK_DATA + "BrainT1Slice.png": ("itk_brain_t1", True),
    ITK_DATA + "BrainProtonDensitySlice.png": ("itk_brain_pd", True),
    ITK_DATA + "FatMRISlice.png": ("itk_abdomen_fat", False),
}


def _convert_itk_mr(src: Source, files: dict[str, Path], out: Path) -> dict:
    from PIL import Image

    outputs, shapes = [], []
    for member in src.members:
        name, flip = ITK_SLICES[member]
        img = Image.open(files[member])
        arr = np.asarray(img.convert("RGB" if img.mode in ("RGB", "RGBA") else "L"))
        if arr.ndim == 3:
            if not (np.all(arr[..., 0] == arr[..., 1]) and np.all(arr[..., 1] == arr[..., 2])):
                raise ValueError(f"{Path(member).name}: a colour image, expected greyscale")
            arr = arr[..., 0]
        if flip:
            arr = arr[::-1]
        rel = f"test/mr/{name}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)), "L").save(out / rel)
        scale = mr_scale(arr)
        outputs.append({"path": rel, "split": "test", "file": member, "scale": round(scale, 4)})
        shapes.append(list(arr.shape))
    return {
        "shape": shapes,
        "spacing_mm": [1.0, 1.0],
        "dtype": "uint8",
        "intensity": _mr_intensity(float("nan"), "each image")
        | {"scale": "per file (outputs[].scale)"},
        "orientation": "(y, x); the brain slices' rows flipped so that anterior is up (they "
        "match Colin27's axial slices 94 and ~88 with the flip), the abdominal slice as stored",
        "outputs": outputs,
    }


def _convert_itk_complex(src: Source, files: dict[str, Path], out: Path) -> dict:
    img = read_metaimage(files[src.members[0]])
    if img.data.ndim != 3 or img.data.shape[-1] != 2:
        raise ValueError(f"expected a 2-D image of 2 channels (re, im), got {img.data.shape}")
    z = (img.data[..., 0] + 1j * img.data[..., 1]).astype(np.complex64)[::-1]
    rel = "test/complex/itk_brain_slice.npy"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    np.save(out / rel, np.ascontiguousarray(z))
    scale = mr_scale(np.abs(z))
    return {
        "shape": list(z.shape),
        "spacing_mm": [float(s) for s in img.spacing],
        "dtype": "complex64 (from MET_FLOAT, 2 channels)",
        "intensity": {
            "unit": "arbitrary (complex)",
            "to_unit": f"z / scale, magnitude clipped to 1 (phase kept); scale = the "
            f"{MR_PERCENTILE}th percentile of |z| above 1 % of its maximum",
            "scale": round(scale, 4),
        },
        "phase": "synthetic: the real part is the PD slice and the imaginary part the T1 "
        "slice (both >= 0), so the phase lies in [0, pi/2]; not a measured MR phase",
        "orientation": "(y, x), rows flipped so that anterior is up (as the ITK brain slices)",
        "outputs": [{"path": rel, "split": "test", "scale": round(scale, 4)}],
    }


def _convert_nibabel(src: Source, files: dict[str, Path], out: Path) -> dict:
    import nibabel as nib

    path = files[src.members[0]]
    vol = read_nifti(path)
    negative = int((vol.data < 0).sum())
    data = np.clip(vol.data, 0, None)  # MR magnitude: the few negative voxels are artefacts
    rel = "test/mr/nibabel_anatomical.nii.gz"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    dtype = nib.load(str(path)).get_data_dtype().newbyteorder("=")
    write_nifti(out / rel, data, vol.spacing, dtype)
    scale = mr_scale(data)
    return {
        "shape": list(data.shape),
        "spacing_mm": [float(s) for s in vol.spacing],
        "dtype": str(dtype),
        "range": [float(vol.data.min()), float(vol.data.max())],
        "intensity": _mr_intensity(scale, "the volume")
        | {"note": f"{negative} negative voxel(s) (min {float(vol.data.min()):g}) set to 0"},
        "orientation": "(z, y, x) as models.data.read_nifti reads it; a crop inside the head "
        "(no background), 2 mm voxels",
        "outputs": [{"path": rel, "split": "test", "scale": round(scale, 4)}],
    }


SOURCES: tuple[Source, ...] = (
    Source(
        "cranium",
        "ct",
        "invesalius-examples",
        ("usr/share/doc/invesalius-examples/examples/Cranium.inv3",),
        "GPL-2 (debian/copyright 'Files: *': (c) 2008-2021 Centro de Tecnologia da Informacao "
        "Renato Archer (CTI) and the InVesalius authors)",
        "InVesalius example project 'ProMED CT 0051': a head CT (skull base to vertex)",
        _convert_cranium,
    ),
    Source(
        "colin27",
        "mr",
        "mricron-data",
        ("usr/share/mricron/templates/ch2.nii.gz",),
        "BSD-3-clause (debian/copyright 'Files: *': Copyright 2006-2010 Chris Rorden); the "
        "image is the MNI's Colin27 single-subject average (Holmes et al., 1998)",
        "Colin27 T1 (27 scans of one subject averaged), 1 mm, with skull and scalp. "
        "(ch2better.nii.gz in the same package is skull-stripped with CSF masked out, so it "
        "is not used.)",
        _convert_colin27,
    ),
    Source(
        "itk-mr",
        "mr",
        "insighttoolkit4-examples",
        tuple(ITK_SLICES),
        ITK_LICENCE,
        "ITK example MR slices: BrainT1Slice and BrainProtonDensitySlice are BrainWeb "
        "images of the Colin27 anatomy (simulated contrast), FatMRISlice an abdominal MR",
        _convert_itk_mr,
    ),
    Source(
        "itk-complex",
        "complex",
        "insighttoolkit4-examples",
        (ITK_DATA + "itkBrainSliceComplex.mha",),
        ITK_LICENCE,
        "ITK example complex brain slice (MetaImage, 2 float channels)",
        _convert_itk_complex,
    ),
    Source(
        "nibabel-anatomical",
        "mr",
        "python3-nibabel",
        ("usr/lib/python3/dist-packages/nibabel/tests/data/anatomical.nii",),
        "MIT (nibabel's COPYING; Debian: Expat)",
        "nibabel test data: a small anatomical MR volume (2 mm)",
        _convert_nibabel,
        python_dist="nibabel",
    ),
)


# --------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)


def _tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln and not ln.startswith("W: Download")]
    return " / ".join(lines[-n:]) or "(no message)"


@dataclass
class _Apt:
    """Downloads and unpacks Debian packages into ``work``, one package once."""

    work: Path
    updated: bool = False
    unpacked: dict[str, tuple[Path, str]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def get(self, package: str) -> tuple[Path, str]:
        """(unpacked root, version) of ``package``."""
        if package in self.unpacked:
            return self.unpacked[package]
        if package in self.failures:
            raise FetchError(self.failures[package])
        try:
            self.unpacked[package] = self._get(package)
        except FetchError as exc:
            self.failures[package] = str(exc)
            raise
        return self.unpacked[package]

    def _get(self, package: str) -> tuple[Path, str]:
        missing = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
        if missing:
            raise FetchError(
                f"{' and '.join(missing)} not found: the package can only be had with Debian's "
                "tools (fetch on Debian or Ubuntu, or copy a fetched folder here)"
            )
        cwd = self.work / "debs"
        cwd.mkdir(exist_ok=True)
        r = _run(["apt-get", "download", package], cwd)
        if r.returncode != 0 and not self.updated:
            # The usual cause: no package lists yet (a fresh container). `apt-get update`
            # needs root; try it once, and say so when it cannot be done.
            self.updated = True
            if hasattr(os, "geteuid") and os.geteuid() != 0:
                raise FetchError(
                    f"`apt-get download {package}` failed ({_tail(r.stderr)}); if the package "
                    "lists are missing, `apt-get update` needs root: run `sudo apt-get update` "
                    "and fetch again"
                )
            u = _run(["apt-get", "update", "-qq"])
            if u.returncode != 0:
                raise FetchError(
                    f"`apt-get download {package}` failed ({_tail(r.stderr)}) and "
                    f"`apt-get update` failed too ({_tail(u.stderr)})"
                )
            r = _run(["apt-get", "download", package], cwd)
        if r.returncode != 0:
            raise FetchError(f"`apt-get download {package}` failed: {_tail(r.stderr)}")
        debs = sorted(cwd.glob(f"{package}_*.deb"))
        if not debs:
            raise FetchError(f"`apt-get download {package}` left no .deb in {cwd}")
        version = _run(["dpkg-deb", "-f", str(debs[-1]), "Version"]).stdout.strip()
        target = self.work / "x" / package
        target.mkdir(parents=True, exist_ok=True)
        x = _run(["dpkg-deb", "-x", str(debs[-1]), str(target)])
        if x.returncode != 0:
            raise FetchError(f"`dpkg-deb -x` of {debs[-1].name} failed: {_tail(x.stderr)}")
        return target, version


def _installed_files(src: Source) -> tuple[dict[str, Path], str, str, Path | None] | None:
    """The source's files from an installed Python distribution, if it ships them:
    (files, distribution name, version, licence file)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(src.python_dist)
    except metadata.PackageNotFoundError:
        return None
    files = {}
    for member in src.members:
        rel = member.split("dist-packages/", 1)[-1]
        path = Path(str(dist.locate_file(rel)))
        if not path.is_file():
            return None
        files[member] = path
    licence = next(
        (Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == "COPYING"), None
    )
    return files, src.python_dist, dist.version, licence


@dataclass
class FetchResult:
    dest: Path
    fetched: list[dict]
    failed: list[dict]

    def summary(self) -> str:
        lines = [f"real data in {self.dest}: {len(self.fetched)} source(s) fetched"]
        for e in self.fetched:
            splits = sorted({o["split"] for o in e["outputs"]})
            lines.append(
                f"  ok     {e['name']:20s} {e['package']} {e['version']}: shape {e['shape']}, "
                f"{len(e['outputs'])} file(s) ({', '.join(splits)}); licence {e['licence_short']}"
            )
        for f in self.failed:
            lines.append(f"  FAILED {f['name']:20s} needs {f['needs']}: {f['reason']}")
        return "\n".join(lines)


def _short(licence: str) -> str:
    return licence.split(" (", 1)[0]


def fetch(
    dest: str | Path | None = None,
    only: Sequence[str] | None = None,
    say: Callable[[str], None] = lambda s: None,
) -> FetchResult:
    """Download, unpack and convert the sources (``only`` these names) into ``dest``.

    A source that cannot be had is recorded with what it needed and why; the others go on.
    Sources fetched before and not fetched now keep their files and ``sources.json`` entry.
    """
    dest = data_dir(dest)
    names = [s.name for s in SOURCES]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(f"--only: unknown source(s) {unknown}; known: {', '.join(names)}")
    chosen = [s for s in SOURCES if not only or s.name in only]
    dest.mkdir(parents=True, exist_ok=True)
    fetched, failed = [], []
    with tempfile.TemporaryDirectory(prefix="scorerecon-realdata-") as tmp:
        work = Path(tmp)
        apt = _Apt(work)
        for src in chosen:
            stage = work / "stage" / src.name
            stage.mkdir(parents=True)
            try:
                entry = _fetch_one(src, apt, stage, say)
            except Exception as exc:  # noqa: BLE001 - one source failing must not stop the rest
                reason = str(exc) if isinstance(exc, FetchError) else f"{type(exc).__name__}: {exc}"
                failed.append({"name": src.name, "needs": _needs(src), "reason": reason})
                say(f"{src.name}: FAILED ({reason})")
                continue
            fetched.append((entry, stage))
        return _install(dest, fetched, failed)


def _needs(src: Source) -> str:
    files = ", ".join(src.members)
    also = f" (or the installed {src.python_dist}'s copy)" if src.python_dist else ""
    return f"Debian package '{src.package}'{also}: {files}"


def _fetch_one(src: Source, apt: _Apt, stage: Path, say: Callable[[str], None]) -> dict:
    local = _installed_files(src) if src.python_dist else None
    if local is not None:
        files, package, version, licence_file = local
        via = "the installed Python distribution (PyPI)"
    else:
        via = "apt-get download + dpkg-deb -x (Debian)"
        say(f"{src.name}: apt-get download {src.package}")
        root, version = apt.get(src.package)
        package = src.package
        files = {m: root / m for m in src.members}
        absent = [m for m in src.members if not files[m].is_file()]
        if absent:
            raise FetchError(f"{src.package} {version} does not contain {', '.join(absent)}")
        licence_file = root / "usr/share/doc" / src.package / "copyright"
    say(f"{src.name}: converting")
    details = src.convert(src, files, stage)
    entry = {
        "name": src.name,
        "modality": src.modality,
        "package": package,
        "version": version,
        "via": via,
        "file": list(src.members) if len(src.members) > 1 else src.members[0],
        "licence": src.licence,
        "licence_short": _short(src.licence),
        "origin": src.origin,
        "split": "test only" if src.name in TEST_ONLY else _split_of(src.name),
        **details,
    }
    if licence_file is not None and licence_file.is_file():
        rel = f"licences/{src.name}.copyright"
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(licence_file, stage / rel)
        entry["licence_file"] = rel
    return entry


def _split_of(name: str) -> dict:
    return {k: [list(s) for s in v] for k, v in SPLITS[name].items() if k != "n"}


def _files_of(entry: dict) -> list[str]:
    return [o["path"] for o in entry.get("outputs", ())] + (
        [entry["licence_file"]] if entry.get("licence_file") else []
    )


def _install(dest: Path, fetched: list[tuple[dict, Path]], failed: list[dict]) -> FetchResult:
    """Move the staged sources into ``dest`` (replacing their earlier files) and rewrite
    ``sources.json``; sources that failed now but were fetched before are kept."""
    old: dict[str, dict] = {}
    path = dest / MANIFEST
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}
        stale = previous.get("split") != split_record()
        for entry in previous.get("sources", ()):
            if stale or entry["name"] in {e["name"] for e, _ in fetched}:
                for rel in _files_of(entry):
                    (dest / rel).unlink(missing_ok=True)
            else:
                old[entry["name"]] = entry
    for entry, stage in fetched:
        for rel in _files_of(entry):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(stage / rel), dest / rel)
        old[entry["name"]] = entry
    for f in failed:
        if f["name"] in old:
            f["reason"] += " (the earlier fetch of it is kept)"
    if old:
        manifest = {
            "format": FORMAT,
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "split": split_record(),
            "sources": [old[s.name] for s in SOURCES if s.name in old],
            "failed": failed,
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(path)
    return FetchResult(dest, [e for e, _ in fetched], failed)


# --------------------------------------------------------------------------------------
# Reading: model-ready slices
# --------------------------------------------------------------------------------------


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """Pad a 2-D image with zeros (air) to a square, then resize it to ``size``² with
    anti-aliasing from its native grid (no anatomy is cropped)."""
    from skimage.transform import resize

    h, w = image.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = np.zeros((side, side), image.dtype)
    padded[top : top + h, left : left + w] = image
    if side != size:
        padded = resize(padded, (size, size), anti_aliasing=True)
    return padded


def _stack(folder: Path, rel: str) -> np.ndarray:
    """A fetched file as (Z, H, W) float32 (a PNG is one slice)."""
    path = folder / rel
    if rel.endswith((".nii", ".nii.gz")):
        return read_nifti(path).data
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), np.float32)[None]


def _check(modality: str, split: str, modalities: Sequence[str]) -> None:
    if modality not in modalities:
        raise ValueError(f"modality must be one of {', '.join(modalities)}, got '{modality}'")
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got '{split}'")


def real_slices(
    modality: str,
    split: str,
    size: int = 128,
    root: str | Path | None = None,
    sources: Sequence[str] | None = None,
) -> np.ndarray:
    """The fetched real axial slices of ``modality`` ("ct" or "mr") in ``split`` ("train",
    "val" or "test") as float32 ``(N, size, size)`` in [0, 1].

    CT: HU through :class:`models.io.HUMapping` (x = clip((HU + 1000) / 4000, 0, 1)). MR:
    magnitude divided by the source's recorded scale (the 99.5th percentile of its
    foreground), clipped. Slices with fewer than ``MIN_FOREGROUND`` of their pixels above
    ``FOREGROUND_LEVEL`` (air above the head, below the chin) are skipped; the others are
    padded to a square and resized with anti-aliasing. The order is fixed (sources as in
    :data:`SOURCES`, slabs and slices in order); ``sources`` keeps only those names.
    """
    _check(modality, split, ("ct", "mr"))
    folder = data_dir(root)
    manifest = load_manifest(folder)
    out = []
    for entry in manifest["sources"]:
        if entry["modality"] != modality or (sources and entry["name"] not in sources):
            continue
        for item in entry["outputs"]:
            if item["split"] != split:
                continue
            raw = _stack(folder, item["path"])
            if modality == "ct":
                unit = HU.to_unit(raw)
            else:
                unit = np.clip(raw / max(float(item["scale"]), 1e-12), 0, 1)
            for sl in unit:
                if float((sl > FOREGROUND_LEVEL).mean()) < MIN_FOREGROUND:
                    continue
                out.append(np.clip(_square(sl.astype(np.float64), size), 0, 1))
    if not out:
        return np.zeros((0, size, size), np.float32)
    return np.stack(out).astype(np.float32)


def real_complex_slices(
    split: str = "test", size: int = 128, root: str | Path | None = None
) -> np.ndarray:
    """The fetched complex MR slices of ``split`` as complex64 ``(N, size, size)``: divided by
    the recorded magnitude scale, magnitude clipped to 1 with the phase kept. The real and
    imaginary parts are resized (anti-aliased) separately, which is linear and so does not
    wrap the phase. Only the ITK slice, in "test" (its phase is synthetic, see
    ``sources.json``); "train" and "val" are empty."""
    _check("complex", split, ("complex",))
    folder = data_dir(root)
    manifest = load_manifest(folder)
    out = []
    for entry in manifest["sources"]:
        if entry["modality"] != "complex":
            continue
        for item in entry["outputs"]:
            if item["split"] != split:
                continue
            z = np.load(folder / item["path"], allow_pickle=False) / float(item["scale"])
            for sl in z.reshape(-1, *z.shape[-2:]):
                re = _square(sl.real.astype(np.float64), size)
                im = _square(sl.imag.astype(np.float64), size)
                c = re + 1j * im
                mag = np.abs(c)
                out.append(np.where(mag > 1, c / np.maximum(mag, 1e-12), c))
    if not out:
        return np.zeros((0, size, size), np.complex64)
    return np.stack(out).astype(np.complex64)


def training_sources(split: str = "train", modality: str | None = None, root=None) -> list[dict]:
    """What a model card records about the real data it was trained on: one entry per source
    (package, version, file, licence, the files of ``split``)."""
    manifest = load_manifest(root)
    return [
        {
            "source": f"{e['name']}: {e['origin']} ({e['package']} {e['version']}, "
            f"via {e['via']}; models/realdata.py)",
            "files": ", ".join(o["path"] for o in e["outputs"] if o["split"] == split),
            "split": e["split"],
            "licence": e["licence"],
        }
        for e in manifest["sources"]
        if (modality is None or e["modality"] == modality)
        and any(o["split"] == split for o in e["outputs"])
    ]


def training_report(split: str = "train", modality: str | None = None, root=None) -> str:
    """One line for a person starting training: the real sources of ``modality`` it uses,
    and those that could not be fetched, with why (so a missing package is never silent)."""
    manifest = load_manifest(root)
    used = [
        e["name"]
        for e in manifest["sources"]
        if (modality is None or e["modality"] == modality)
        and any(o["split"] == split for o in e["outputs"])
    ]
    missing = [
        f"{f['name']} ({f.get('reason', 'not fetched')})"
        for f in manifest.get("failed", [])
        if f["name"] not in used
    ]
    line = f"real {modality or 'any'} data ({split}): {', '.join(used) or 'none'}"
    if missing:
        line += "; not available, training goes on without: " + "; ".join(missing)
    return line
