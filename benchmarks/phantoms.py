"""How fast the phantom generator is, and what its slices look like.

Writes docs/benchmarks/phantoms.md and phantoms.png (CT slices in soft-tissue, lung and
brain windows; MRI slices T1- and T2-weighted). Run: ``python benchmarks/phantoms.py``.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from models.figures import grid
from models.io import save_png
from models.phantoms import ct_phantoms, mri_phantoms

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
WINDOWS = {
    "soft tissue (W400 L40)": (40, 400),
    "lung (W1500 L-600)": (-600, 1500),
    "brain (W80 L40)": (40, 80),
}


def main() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ct_phantoms(10_000, 128, seed=0)
    ct_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mri_phantoms(10_000, 128, seed=0)
    mri_s = time.perf_counter() - t0
    hu = ct_phantoms(8, 128, seed=1, hu=True)
    rows = [((hu - (level - width / 2)) / width).clamp(0, 1) for level, width in WINDOWS.values()]
    t1 = mri_phantoms(8, 128, seed=1, contrast="t1")
    t2 = mri_phantoms(8, 128, seed=1, contrast="t2")
    save_png(DOCS / "phantoms.png", grid(torch.cat([*rows, t1, t2]), cols=8))
    lines = [
        "# Phantoms",
        "",
        f"Measured by `python benchmarks/phantoms.py` on {platform.machine()}, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| what | slices | size | seconds | slices / s |",
        "|---|---|---|---|---|",
        f"| CT (thorax, abdomen, head) | 10 000 | 128² | {ct_s:.1f} | {10_000 / ct_s:.0f} |",
        f"| MRI brain (T1/T2) | 10 000 | 128² | {mri_s:.1f} | {10_000 / mri_s:.0f} |",
        "",
        "Rows: held-out CT slices (seed 1) in the "
        + ", ".join(WINDOWS)
        + " windows; MRI slices T1-weighted, then T2-weighted.",
        "",
        "![phantoms](phantoms.png)",
        "",
    ]
    (DOCS / "phantoms.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
