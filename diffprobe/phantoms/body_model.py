"""The phantom's body model: reference frame, labels, tissue HU tables and shape primitives.

Everything here lives in a *body reference frame* (mm): ``u`` = patient left, ``v`` = posterior,
``w`` = superior, with the torso always the ellipse ``(u/40)^2 + (v/28)^2 = 1`` and ``w = 0`` at
the apex of the diaphragm.  The generator maps voxel centres into this frame (per-case scale,
rotation, offset and a smooth random deformation), so the anatomy is written once, in
body-normalised coordinates, and stays anatomically consistent for every case.  The cranio-caudal
axis is deliberately stretched relative to the in-plane axes (a vertebra is ~22 mm tall while the
torso is 80 mm wide) so that a short CPU-sized scan still spans several vertebrae and organs.

Why its own module: these are the fixed vocabulary (what a structure, a tissue value and a case's
anatomy *are*); ``anatomy.py`` draws one case from it and paints it, and the generator only
needs the frame and the labels from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "kidney_right": 3,
    "kidney_left": 4,
    "aorta": 5,
    "adrenal_right": 6,
}

# Painting order: a later structure overwrites an earlier one where shapes overlap, so priority
# rises along the tuple (adrenal > kidneys > aorta > spleen > liver).  "ivc" is an unlabelled
# vessel of soft-tissue density next to the aorta: a same-intensity distractor.
PAINT_ORDER: tuple[str, ...] = ("liver", "ivc", "spleen", "aorta", "kidney_right", "kidney_left",
                                "adrenal_right")

BODY_SEMI_AXES: tuple[float, float] = (40.0, 28.0)  # reference torso semi-axes (LR, AP), mm

# Nominal tissue HU and the per-case standard deviation of the tissue's mean value.
TISSUE_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "lung": (-850.0, 20.0),
    "fat": (-100.0, 6.0),
    "visceral_fat": (-90.0, 6.0),
    "soft_tissue": (40.0, 4.0),
    "muscle_wall": (48.0, 4.0),
    "disc": (80.0, 6.0),
    "csf": (15.0, 4.0),
    "cancellous": (320.0, 30.0),
    "cortical": (850.0, 60.0),
    "posterior_elements": (600.0, 50.0),
    "rib": (600.0, 50.0),
    "liver": (55.0, 3.0),
    "ivc": (40.0, 3.0),
    "spleen": (48.0, 3.0),
    "kidney": (35.0, 2.5),
    "aorta": (42.0, 3.0),
    "adrenal_right": (30.0, 2.5),
}
# Portal-venous contrast phase (BTCV-like): enhanced parenchyma and vessels; unenhanced tissue
# keeps its native values. Kidneys and aorta overlap (150-190 HU), as do spleen, liver and IVC.
PORTAL_VENOUS_HU: dict[str, tuple[float, float]] = {
    "liver": (105.0, 8.0),
    "spleen": (120.0, 8.0),
    "ivc": (125.0, 10.0),
    "kidney": (170.0, 10.0),
    "aorta": (165.0, 12.0),
    "adrenal_right": (70.0, 6.0),
    "soft_tissue": (45.0, 4.0),
    "muscle_wall": (55.0, 4.0),
}
PHASES: tuple[str, ...] = ("native", "portal_venous")


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid rotated by ``yaw_deg`` about w, then tilted by ``tilt_deg`` in its local x-w plane."""

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    yaw_deg: float = 0.0
    tilt_deg: float = 0.0

    def level(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Implicit function: < 1 inside, 1 on the surface."""
        cy, sy = math.cos(math.radians(self.yaw_deg)), math.sin(math.radians(self.yaw_deg))
        ct, st = math.cos(math.radians(self.tilt_deg)), math.sin(math.radians(self.tilt_deg))
        du, dv, dw = u - self.centre[0], v - self.centre[1], w - self.centre[2]
        x1 = cy * du + sy * dv
        y1 = (-sy) * du + cy * dv
        x2 = ct * x1 + st * dw
        z2 = (-st) * x1 + ct * dw
        a, b, c = self.semi
        return (x2 / a) ** 2 + (y1 / b) ** 2 + (z2 / c) ** 2

    def grown(self, mm: float) -> Ellipsoid:
        return replace(self, semi=tuple(s + mm for s in self.semi))

    def axis(self, which: str) -> np.ndarray:
        """Unit vector (u, v, w) of the local ``"x"`` or ``"z"`` axis, e.g. to place a kidney's poles."""
        cy, sy = math.cos(math.radians(self.yaw_deg)), math.sin(math.radians(self.yaw_deg))
        ct, st = math.cos(math.radians(self.tilt_deg)), math.sin(math.radians(self.tilt_deg))
        if which == "x":
            return np.array([ct * cy, ct * sy, st])
        return np.array([-st * cy, -st * sy, ct])

    @property
    def w_range(self) -> tuple[float, float]:
        r = max(self.semi)
        return self.centre[2] - r, self.centre[2] + r


@dataclass(frozen=True)
class Tube:
    """Vertical vessel of circular section between ``w_bottom`` and ``w_top`` (aorta, IVC)."""

    centre_uv: tuple[float, float]
    radius: float
    w_bottom: float
    w_top: float = math.inf

    def level(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        q = ((u - self.centre_uv[0]) ** 2 + (v - self.centre_uv[1]) ** 2) / self.radius**2
        return np.where((w >= self.w_bottom) & (w <= self.w_top), q, np.float32(np.inf))

    def grown(self, mm: float) -> Tube:
        return replace(self, radius=self.radius + mm, w_bottom=self.w_bottom - mm, w_top=self.w_top + mm)

    @property
    def w_range(self) -> tuple[float, float]:
        return self.w_bottom, self.w_top


Shape = Ellipsoid | Tube


@dataclass(frozen=True)
class OrganModel:
    """One painted structure: the union of ``parts`` plus an optional fat capsule.

    Every organ gets a soft-tissue rind ``halo_gap_mm`` thick (fascia, vessel wall) in place of any
    background fat, and organs with ``halo_mm`` a fat capsule out to that distance beyond it: the
    organ stays visible against fat, but the in-plane partial-volume blur does not drag its
    boundary voxels towards fat HU, which with only 5-15 voxels across a kidney would bias its
    whole intensity distribution.  Rind and capsule only replace background, never other organs.
    """

    name: str
    parts: tuple[Shape, ...]
    hu: float
    halo_mm: float = 0.0
    halo_gap_mm: float = 1.2
    below_diaphragm: bool = True

    @property
    def label(self) -> int:
        return LABELS.get(self.name, 0)

    @property
    def w_range(self) -> tuple[float, float]:
        lo = min(p.w_range[0] for p in self.parts)
        hi = max(p.w_range[1] for p in self.parts)
        return lo - self.halo_mm, hi + self.halo_mm


@dataclass(frozen=True)
class Anatomy:
    """Per-case anatomy in the reference frame (all lengths in reference mm)."""

    organs: dict[str, OrganModel]
    hu: dict[str, float]
    fat_mm: float
    wall_mm: float
    dome_right: float
    dome_left: float
    vert_period: float
    vert_phase: float
    disc_frac: float
    rib_drop: float
    visceral_fat_threshold: float


@dataclass
class BodyFrame:
    """Voxel centres mapped into the reference frame (float32 arrays, shape (z, y, x)).

    ``w_slice`` is each slice's undeformed w and ``w_margin`` bounds the deformation along w, so a
    structure confined to a w-interval only needs evaluating on a slab of slices (a large saving:
    most organs span a fraction of the scan).
    """

    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    w_slice: np.ndarray
    w_margin: float

    def slab(self, lo: float, hi: float) -> slice:
        idx = np.nonzero((self.w_slice >= lo - self.w_margin) & (self.w_slice <= hi + self.w_margin))[0]
        return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)
