"""Procedural anatomical phantoms: CT torso and head slices, MRI brain slices.

No CT or MRI training set can be downloaded here, so the bundled CT prior learns from these
(see ``docs/models/ct-default.md``). Every slice is painted, vectorised over a batch, from
one seeded :class:`torch.Generator`: a body outline with a perturbed radius, subcutaneous fat,
muscle, then the organs of its level (thorax: lungs with branching vessels, heart, aorta,
ribs; abdomen: liver, kidneys, bowel gas; head: scalp, skull, grey and white matter,
ventricles, sulci), the spine, random lesions and calcifications, and a smooth texture.

Each tissue carries a property vector (HU, T1-weighted, T2-weighted signal), so one layout
gives a CT slice in Hounsfield units or MR magnitudes of either contrast. Slices are made in
chunks of ``CHUNK`` with per-chunk seeds, so the first ``n`` slices of a seed never depend on
how many are asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from models.io import HUMapping

CHUNK = 32

# Tissue index -> (HU, T1-weighted, T2-weighted). HU values: typical unenhanced CT
# (lung -850, fat -100, water 0, soft tissue 30-60, cancellous 250, cortical bone 1000+).
TISSUES: dict[str, tuple[float, float, float]] = {
    "air": (-1000.0, 0.0, 0.0),
    "lung": (-850.0, 0.02, 0.02),
    "fat": (-100.0, 0.95, 0.75),
    "muscle": (45.0, 0.40, 0.30),
    "blood": (45.0, 0.45, 0.55),
    "liver": (60.0, 0.55, 0.35),
    "kidney": (30.0, 0.45, 0.60),
    "bowel_gas": (-950.0, 0.0, 0.0),
    "cancellous": (250.0, 0.60, 0.45),
    "cortical": (1200.0, 0.03, 0.03),
    "csf": (8.0, 0.12, 1.0),
    "grey": (40.0, 0.50, 0.70),
    "white": (28.0, 0.72, 0.52),
    "lesion": (35.0, 0.35, 0.85),
    "calcification": (600.0, 0.10, 0.10),
    "vessel": (45.0, 0.45, 0.55),
}
NAMES = list(TISSUES)
INDEX = {name: i for i, name in enumerate(NAMES)}
PROPS = torch.tensor([TISSUES[n] for n in NAMES])  # (T, 3)

# Per-tissue HU jitter between slices (standard deviation), for variety in the training set.
HU_JITTER = {
    "lung": 30.0,
    "fat": 10.0,
    "muscle": 5.0,
    "liver": 6.0,
    "kidney": 6.0,
    "blood": 5.0,
    "cancellous": 40.0,
    "cortical": 150.0,
    "grey": 3.0,
    "white": 3.0,
    "lesion": 20.0,
    "calcification": 200.0,
}


class Canvas:
    """A batch of slices being painted: a label map and a soft coverage per layer.

    ``paint(mask, tissue)`` lays a tissue over what is there with a soft (anti-aliased) mask;
    the label map keeps the tissue that covers more than half a pixel.
    """

    def __init__(self, n: int, size: int, gen: torch.Generator):
        self.n, self.size, self.gen = n, size, gen
        c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
        self.y, self.x = (-c)[None, :, None], c[None, None, :]  # y up, x right, in [-1, 1]
        self.pixel = 2.0 / size
        self.value = torch.zeros(n, 3, size, size) + PROPS[INDEX["air"]][None, :, None, None]
        self.labels = torch.zeros(n, size, size, dtype=torch.long)
        jitter = torch.zeros(n, len(NAMES))
        for name, sd in HU_JITTER.items():
            jitter[:, INDEX[name]] = sd * torch.randn(n, generator=gen)
        self.hu_jitter = jitter

    def rand(self, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(self.n, *shape, generator=self.gen)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(self.n, *shape, generator=self.gen)

    def paint(self, mask: torch.Tensor, tissue: str, where: torch.Tensor | None = None) -> None:
        """Cover ``mask`` (B, H, W in [0, 1]) with ``tissue``; ``where`` (B,) bools skips slices."""
        if where is not None:
            mask = mask * where[:, None, None].float()
        i = INDEX[tissue]
        val = PROPS[i][None, :, None, None].expand(self.n, 3, 1, 1).clone()
        val[:, 0, 0, 0] += self.hu_jitter[:, i]
        self.value.lerp_(val.expand_as(self.value), mask[:, None].expand_as(self.value))
        self.labels.masked_fill_(mask > 0.5, i)

    # Shapes: soft masks of shape (B, H, W), parameters as (B,) tensors in [-1, 1] units.
    def ellipse(self, cx, cy, a, b, angle=None, wobble: float = 0.0) -> torch.Tensor:
        """Ellipse centred (cx, cy), semi-axes a, b, rotated by ``angle``; ``wobble`` perturbs
        the radius with random low harmonics for organic outlines."""
        dx = self.x - cx[:, None, None]
        dy = self.y - cy[:, None, None]
        if angle is not None:
            c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        a_, b_ = a[:, None, None], b[:, None, None]
        r = torch.sqrt((dx / a_) ** 2 + (dy / b_) ** 2 + 1e-12)
        if wobble:
            phi = torch.atan2(dy / b_, dx / a_)
            bump = torch.zeros_like(r)
            for k in (2, 3, 4, 5):
                amp = wobble / k * self.randn()[:, None, None]
                bump = bump + amp * torch.cos(k * phi + 2 * math.pi * self.rand()[:, None, None])
            r = r / (1 + bump)
        # Distance to the edge in pixels, roughly: (1 - r) * min semi-axis / pixel size.
        edge = (1 - r) * torch.minimum(a_, b_) / self.pixel
        return torch.sigmoid(2.0 * edge)

    def segment(self, p0: torch.Tensor, p1: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        """Soft capsule around the segment p0→p1 (points (B, 2)) of half-width ``width``."""
        px, py = self.x - p0[:, 0, None, None], self.y - p0[:, 1, None, None]
        d = (p1 - p0)[:, :, None, None]
        t = ((px * d[:, 0] + py * d[:, 1]) / (d[:, 0] ** 2 + d[:, 1] ** 2 + 1e-12)).clamp(0, 1)
        dist = torch.sqrt((px - t * d[:, 0]) ** 2 + (py - t * d[:, 1]) ** 2 + 1e-12)
        return torch.sigmoid(2.0 * (width[:, None, None] - dist) / self.pixel)

    def texture(self, scale_px: float) -> torch.Tensor:
        return smooth_noise(self.n, self.size, scale_px, self.gen)


def smooth_noise(n: int, size: int, scale_px: float, gen: torch.Generator) -> torch.Tensor:
    """Unit-variance Gaussian noise (n, size, size) smoothed to a correlation length of
    ``scale_px`` pixels (a Gaussian filter applied in Fourier space)."""
    noise = torch.randn(n, size, size, generator=gen)
    f = torch.fft.fftfreq(size)
    kernel = torch.exp(-2 * (math.pi * scale_px) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    smooth = torch.fft.ifft2(torch.fft.fft2(noise) * kernel).real
    return smooth / smooth.flatten(1).std(dim=1)[:, None, None].clamp_min(1e-8)


def _spots(
    cv: Canvas,
    inside: torch.Tensor,
    count: int,
    r_lo: float,
    r_hi: float,
    tissue: str,
    prob: float,
    cx,
    cy,
    ax,
    ay,
) -> None:
    """Up to ``count`` small round spots of ``tissue`` inside the ellipse (cx, cy, ax, ay)."""
    for _ in range(count):
        rho, phi = cv.rand().sqrt() * 0.8, cv.rand(hi=2 * math.pi)
        r = cv.rand(lo=r_lo, hi=r_hi)
        m = cv.ellipse(cx + ax * rho * torch.cos(phi), cy + ay * rho * torch.sin(phi), r, r)
        cv.paint(m * inside, tissue, cv.rand() < prob)


def _body(cv: Canvas, ax, ay) -> torch.Tensor:
    """Skin/fat/muscle layers of a torso; returns the soft mask of the inner cavity."""
    zero = torch.zeros(cv.n)
    body = cv.ellipse(zero, cv.rand(lo=-0.05, hi=0.0), ax, ay, wobble=0.04)
    cv.paint(body, "fat")
    fat = cv.rand(lo=0.03, hi=0.12)
    muscle = cv.ellipse(zero, cv.rand(lo=-0.05, hi=0.0), ax - fat, ay - fat, wobble=0.03)
    cv.paint(muscle, "muscle")
    wall = cv.rand(lo=0.05, hi=0.09)
    return cv.ellipse(zero, zero, ax - fat - wall, ay - fat - wall) * muscle


def _spine(cv: Canvas, ay, wall_y) -> None:
    """Vertebral body (cortical rim, cancellous core), canal and spinous process."""
    zero = torch.zeros(cv.n)
    cy = -ay + wall_y
    r = cv.rand(lo=0.09, hi=0.12)
    cv.paint(cv.ellipse(zero, cy + 0.2 * r, r * 1.1, r), "cortical")
    cv.paint(cv.ellipse(zero, cy + 0.2 * r, r * 0.85, r * 0.75), "cancellous")
    canal = cy - 1.25 * r
    cv.paint(
        cv.segment(
            torch.stack([zero, canal], 1), torch.stack([zero, canal - 1.1 * r], 1), 0.25 * r
        ),
        "cortical",
    )
    for side in (-1, 1):
        p0 = torch.stack([side * 0.55 * r, canal + 0.1 * r], 1)
        p1 = torch.stack([side * 0.9 * r, canal - 0.6 * r], 1)
        cv.paint(cv.segment(p0, p1, 0.2 * r), "cortical")
    cv.paint(cv.ellipse(zero, canal, 0.45 * r, 0.4 * r), "csf")


def _thorax(cv: Canvas) -> None:
    ax, ay = cv.rand(lo=0.78, hi=0.92), cv.rand(lo=0.52, hi=0.66)
    cavity = _body(cv, ax, ay)
    zero = torch.zeros(cv.n)
    lungs = torch.zeros(cv.n, cv.size, cv.size)
    hila = []
    for side in (-1, 1):
        lx, ly = side * ax * cv.rand(lo=0.42, hi=0.5), cv.rand(lo=-0.02, hi=0.08)
        la, lb = ax * cv.rand(lo=0.32, hi=0.4), ay * cv.rand(lo=0.62, hi=0.75)
        lung = cv.ellipse(lx, ly, la, lb, cv.rand(lo=-0.2, hi=0.2) * side, wobble=0.05) * cavity
        cv.paint(lung, "lung")
        lungs = torch.maximum(lungs, lung)
        hila.append((lx - side * 0.6 * la, ly, side))
    # Branching vessels: three generations of segments grown outward from each hilum.
    vessels = torch.zeros_like(lungs)
    for hx, hy, side in hila:
        tips = [(torch.stack([hx, hy], 1), side * 0.0 + cv.rand(lo=-0.9, hi=0.9))]
        length, width = 0.22, 0.018
        for _gen in range(3):
            new = []
            for start, ang in tips:
                for k in range(2 if _gen else 3):
                    a = ang + cv.rand(lo=-0.6, hi=0.6) + (k - 0.5) * 0.5
                    direction = torch.stack([side * torch.cos(a), torch.sin(a)], 1)
                    end = start + length * cv.rand(lo=0.6, hi=1.2)[:, None] * direction
                    seg = cv.segment(start, end, width * cv.rand(lo=0.7, hi=1.2))
                    vessels = torch.maximum(vessels, seg)
                    new.append((end, a))
            tips, length, width = new, length * 0.7, width * 0.65
    cv.paint(vessels * lungs, "vessel")
    # Vessels seen end-on.
    _spots(cv, lungs, 10, 0.006, 0.016, "vessel", 0.8, zero, zero, ax * 0.85, ay * 0.8)
    heart = (
        cv.ellipse(
            ax * cv.rand(lo=0.02, hi=0.15),
            ay * cv.rand(lo=0.0, hi=0.25),
            ax * cv.rand(lo=0.25, hi=0.33),
            ay * cv.rand(lo=0.38, hi=0.5),
            cv.rand(lo=-0.6, hi=-0.2),
            wobble=0.03,
        )
        * cavity
    )
    cv.paint(heart, "muscle")
    cv.paint(cv.ellipse(ax * 0.05, ay * 0.1, ax * 0.16, ay * 0.25) * heart, "blood")
    ar = cv.rand(lo=0.045, hi=0.065)
    cv.paint(cv.ellipse(-ar * 1.2, -ay + 0.25 + ar, ar, ar), "blood")
    # Ribs: small cortical ovals just inside the body wall, sparing sternum and spine.
    for i in range(6):
        phi = math.pi * (0.12 + 0.3 * i / 5) + cv.rand(lo=-0.04, hi=0.04)
        for side in (-1, 1):
            for sign in (-1, 1):
                cx = side * ax * 0.84 * torch.cos(phi)
                cy = sign * ay * 0.82 * torch.sin(phi)
                r = cv.rand(lo=0.015, hi=0.022)
                cv.paint(
                    cv.ellipse(cx, cy, r * 1.5, r, -sign * side * phi), "cortical", cv.rand() < 0.8
                )
    _spine(cv, ay, 0.22)
    _lesions(cv, lungs, 3, "muscle")


def _abdomen(cv: Canvas) -> None:
    ax, ay = cv.rand(lo=0.75, hi=0.92), cv.rand(lo=0.55, hi=0.7)
    cavity = _body(cv, ax, ay)
    cv.paint(cavity * cv.texture(6.0).gt(0.3).float(), "fat")  # mesenteric fat
    liver = (
        cv.ellipse(
            -ax * cv.rand(lo=0.35, hi=0.45),
            ay * cv.rand(lo=0.0, hi=0.2),
            ax * cv.rand(lo=0.35, hi=0.48),
            ay * cv.rand(lo=0.45, hi=0.65),
            cv.rand(lo=-0.4, hi=0.1),
            wobble=0.06,
        )
        * cavity
    )
    cv.paint(liver, "liver")
    organs = liver.clone()
    for side in (-1, 1):
        kx, ky = side * ax * cv.rand(lo=0.3, hi=0.38), -ay * cv.rand(lo=0.35, hi=0.45)
        ka, kb = cv.rand(lo=0.07, hi=0.1), cv.rand(lo=0.1, hi=0.14)
        kidney = cv.ellipse(kx, ky, ka, kb, side * cv.rand(lo=0.2, hi=0.5)) * cavity
        cv.paint(kidney, "kidney")
        cv.paint(cv.ellipse(kx + side * 0.3 * ka, ky, 0.35 * ka, 0.4 * kb) * kidney, "fat")
        organs = torch.maximum(organs, kidney)
    # Bowel loops with gas.
    gut = (1 - organs) * cavity
    for _ in range(8):
        r = cv.rand(lo=0.03, hi=0.08)
        m = cv.ellipse(ax * cv.rand(lo=-0.1, hi=0.7), ay * cv.rand(lo=-0.2, hi=0.6), r, r * 0.8)
        cv.paint(m * gut, "muscle", cv.rand() < 0.8)
        cv.paint(
            cv.ellipse(
                ax * cv.rand(lo=-0.1, hi=0.7), ay * cv.rand(lo=-0.2, hi=0.6), 0.6 * r, 0.5 * r
            )
            * gut,
            "bowel_gas",
            cv.rand() < 0.4,
        )
    ar = cv.rand(lo=0.04, hi=0.055)
    cv.paint(cv.ellipse(ar * 1.3, -ay + 0.25 + ar, ar, ar), "blood")
    _spine(cv, ay, 0.2)
    _lesions(cv, liver, 3, "lesion")


def _head(cv: Canvas) -> None:
    zero = torch.zeros(cv.n)
    ax, ay = cv.rand(lo=0.62, hi=0.78), cv.rand(lo=0.78, hi=0.92)
    cy = cv.rand(lo=-0.05, hi=0.05)
    cv.paint(cv.ellipse(zero, cy, ax, ay, wobble=0.015), "muscle")  # scalp
    s = cv.rand(lo=0.025, hi=0.04)
    cv.paint(cv.ellipse(zero, cy, ax - s, ay - s, wobble=0.01), "fat")
    s2 = s + cv.rand(lo=0.015, hi=0.025)
    cv.paint(cv.ellipse(zero, cy, ax - s2, ay - s2, wobble=0.01), "cortical")
    t = s2 + cv.rand(lo=0.04, hi=0.07)
    brain = cv.ellipse(zero, cy, ax - t, ay - t, wobble=0.02)
    cv.paint(brain, "csf")
    cv.paint(cv.ellipse(zero, cy, ax - t - 0.025, ay - t - 0.025, wobble=0.03), "grey")
    wm = cv.ellipse(
        zero,
        cy,
        (ax - t) * cv.rand(lo=0.6, hi=0.75),
        (ay - t) * cv.rand(lo=0.65, hi=0.78),
        wobble=0.12,
    )
    cv.paint(wm, "white")
    # Sulci: thin CSF lines running inward from the brain surface.
    for _ in range(14):
        phi = cv.rand(hi=2 * math.pi)
        depth = cv.rand(lo=0.75, hi=0.9)
        outer = torch.stack([(ax - t) * torch.cos(phi), cy + (ay - t) * torch.sin(phi)], 1)
        cv.paint(
            cv.segment(outer, outer * depth[:, None], cv.rand(lo=0.004, hi=0.01)) * brain, "csf"
        )
    # Lateral ventricles, the falx, and the third ventricle.
    vy = cy + ay * cv.rand(lo=-0.05, hi=0.15)
    for side in (-1, 1):
        cv.paint(
            cv.ellipse(
                side * cv.rand(lo=0.05, hi=0.09),
                vy,
                cv.rand(lo=0.04, hi=0.08),
                cv.rand(lo=0.18, hi=0.3),
                side * cv.rand(lo=0.05, hi=0.25),
            ),
            "csf",
        )
    cv.paint(
        cv.ellipse(zero, vy - 0.25, cv.rand(lo=0.01, hi=0.02), cv.rand(lo=0.04, hi=0.07)),
        "csf",
        cv.rand() < 0.6,
    )
    top = torch.stack([zero, cy + ay - t], 1)
    cv.paint(cv.segment(top, top * torch.tensor([0.0, 0.45]), zero + 0.006) * brain, "csf")
    _lesions(cv, brain, 2, "lesion")
    _spots(cv, brain, 2, 0.008, 0.015, "calcification", 0.3, zero, cy, ax * 0.4, ay * 0.4)


def _lesions(cv: Canvas, inside: torch.Tensor, count: int, tissue: str) -> None:
    """Random round lesions (each present with probability 1/2) and calcifications."""
    zero = torch.zeros(cv.n)
    for _ in range(count):
        r = cv.rand(lo=0.02, hi=0.07)
        m = cv.ellipse(
            cv.rand(lo=-0.7, hi=0.7),
            cv.rand(lo=-0.6, hi=0.6),
            r,
            r * cv.rand(lo=0.7, hi=1.0),
            cv.rand(hi=math.pi),
            wobble=0.08,
        )
        cv.paint(m * (inside > 0.5).float(), tissue, cv.rand() < 0.5)
    _spots(
        cv,
        (inside > 0.5).float(),
        2,
        0.006,
        0.012,
        "calcification",
        0.25,
        zero,
        zero,
        zero + 0.8,
        zero + 0.7,
    )


KINDS: dict[str, Callable[[Canvas], None]] = {"thorax": _thorax, "abdomen": _abdomen, "head": _head}


Finish = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def _chunk(
    seed: int, index: int, n: int, size: int, kinds: tuple[str, ...], finish: Finish
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of slices: finished images (n, 1, H, W) and label maps (n, H, W)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    kind_of = torch.randint(len(kinds), (n,), generator=gen)
    values = torch.empty(n, 3, size, size)
    labels = torch.empty(n, size, size, dtype=torch.long)
    for k, name in enumerate(kinds):
        idx = (kind_of == k).nonzero().flatten()
        cv = Canvas(len(idx), size, gen)
        if len(idx):
            KINDS[name](cv)
        values[idx], labels[idx] = cv.value, cv.labels
    return finish(values, labels, gen), labels


def _generate(
    n: int, size: int, seed: int, kinds: tuple[str, ...], progress: bool, finish: Finish
) -> tuple[torch.Tensor, torch.Tensor]:
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds: unknown {sorted(unknown)}; choose from {sorted(KINDS)}")
    if n < 0 or size < 16:
        raise ValueError("n must be >= 0 and size >= 16")
    images = torch.empty(n, 1, size, size)
    labels = torch.empty(n, size, size, dtype=torch.long)
    for i in tqdm(range(math.ceil(n / CHUNK)), desc="phantoms", unit="chunk", disable=not progress):
        # Every chunk is CHUNK slices from its own seed, so slice j never depends on n.
        img, lab = _chunk(seed, i, CHUNK, size, kinds, finish)
        j = i * CHUNK
        k = min(n, j + CHUNK)
        images[j:k], labels[j:k] = img[: k - j], lab[: k - j]
    return images, labels


def ct_phantoms(
    n: int,
    size: int = 128,
    seed: int = 0,
    kinds: tuple[str, ...] = ("thorax", "abdomen", "head"),
    hu: bool = False,
    return_labels: bool = False,
    progress: bool = False,
):
    """``n`` CT slices (n, 1, size, size): HU if ``hu`` else the model range (HU+1000)/4000.

    Soft-tissue texture (correlation ~3 px, 5 HU) and fine mottle (2 HU) are added inside
    the body so organs are not flat. ``return_labels`` also gives the tissue label maps
    (indices into :data:`NAMES`).
    """

    def finish(values: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        m = len(values)
        body = (labels != INDEX["air"])[:, None].float()
        coarse = smooth_noise(m, size, 3.0, gen)[:, None]
        img = values[:, :1] + body * (
            5.0 * coarse + 2.0 * torch.randn(m, 1, size, size, generator=gen)
        )
        return img if hu else torch.from_numpy(HUMapping().to_unit(img.numpy())).float()

    images, labels = _generate(n, size, seed, kinds, progress, finish)
    return (images, labels) if return_labels else images


def mri_phantoms(
    n: int,
    size: int = 128,
    seed: int = 0,
    contrast: str = "mixed",
    return_labels: bool = False,
    progress: bool = False,
):
    """``n`` brain MR magnitude slices in [0, 1] (T1-, T2-weighted, or a random mix).

    Intensities are the tissue table's relative signals with a smooth bias field (±10 %)
    and Rician-like noise (σ = 0.01); the brightest tissue is near 1.
    """
    if contrast not in ("t1", "t2", "mixed"):
        raise ValueError("contrast must be 't1', 't2' or 'mixed'")
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")

    def finish(values: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        m = len(values)
        t2 = (
            torch.rand(m, generator=gen) < 0.5
            if contrast == "mixed"
            else torch.full((m,), contrast == "t2")
        )
        img = torch.where(t2[:, None, None, None], values[:, 2:3], values[:, 1:2])
        c = torch.randn(m, 3, generator=gen)[:, :, None, None] * 0.1
        bias = 1 + c[:, 0] * xx + c[:, 1] * yy + c[:, 2] * xx * yy
        noise_r = 0.01 * torch.randn(m, 1, size, size, generator=gen)
        noise_i = 0.01 * torch.randn(m, 1, size, size, generator=gen)
        img = torch.sqrt((img * bias[:, None] + noise_r) ** 2 + noise_i**2)
        return img.clamp(0, 1)

    images, labels = _generate(n, size, seed, ("head",), progress, finish)
    return (images, labels) if return_labels else images
