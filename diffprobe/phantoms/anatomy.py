"""One case's anatomy: drawn at random from the body model, then painted onto voxels.

``sample_anatomy`` draws a case's organ shapes, positions and tissue HU means (the body model
and its reference frame are in ``body_model.py``); ``render_anatomy`` paints tissue HU and organ
labels at the voxel centres the generator mapped into that frame: skin, fat, muscle wall,
diaphragm, lungs, spine and ribs, then the organs with their soft-tissue rinds and fat capsules.

Intensities (``phase="native"``, the default) are non-contrast CT: organ HU ranges overlap each
other and the surrounding muscle on purpose (kidneys, adrenal, aorta and muscle all sit within
30-50 HU; the two kidneys are identical), so a segmenter has to use shape and position, not
intensity thresholds. ``phase="portal_venous"`` paints the contrast-enhanced values of a
portal-venous abdominal scan (the phase of BTCV, the paper's benchmark): enhanced organs stand
out from fat and muscle, while the two kidneys, aorta and IVC still share intensities.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import binary_dilation

from diffprobe.phantoms.body_model import (
    BODY_SEMI_AXES,
    LABELS,
    PAINT_ORDER,
    PHASES,
    PORTAL_VENOUS_HU,
    TISSUE_HU,
    Anatomy,
    BodyFrame,
    Ellipsoid,
    OrganModel,
    Tube,
)

# Hard limits for the sampled per-case means (keeps e.g. liver within 55 +- 8 HU).
_HU_CLIP: dict[str, tuple[float, float]] = {
    "soft_tissue": (30.0, 55.0), "cortical": (700.0, 1000.0), "cancellous": (250.0, 400.0),
    "liver": (47.0, 63.0), "kidney": (30.0, 40.0), "adrenal_right": (25.0, 35.0),
}

_VB_CENTRE_V, _VB_SEMI = 11.0, (6.2, 5.2)  # vertebral body (u semi, v semi)
_CANAL_V, _CANAL_R, _ARCH_R = 19.2, 2.6, 4.4  # spinal canal and posterior arch
_LUNG_U, _LUNG_V, _LUNG_SEMI = 21.0, 3.0, (14.0, 19.0)  # lobe centres at u = +-21
_RIB_LOWEST_W = -75.0  # lowest ribs (rib cage covers liver and spleen)


def _jitter(rng: np.random.Generator, sd: float, lim: float) -> float:
    return float(np.clip(rng.normal(0.0, sd), -lim, lim))


def _organ_shape(rng: np.random.Generator, centre: tuple[float, float, float], semi: tuple[float, float, float],
                 yaw: float = 0.0, tilt: float = 0.0, scale: float | None = None, w_jitter: float = 2.5) -> Ellipsoid:
    """Nominal ellipsoid with per-case size scaling (+-15 %), position (few mm) and angle jitter."""
    f = rng.uniform(0.85, 1.15) if scale is None else scale
    semi = tuple(float(s * f * rng.uniform(0.95, 1.05)) for s in semi)
    centre = (centre[0] + _jitter(rng, 1.5, 3.5), centre[1] + _jitter(rng, 1.5, 3.5),
              centre[2] + _jitter(rng, w_jitter, 2.0 * w_jitter))
    return Ellipsoid(centre, semi, yaw + _jitter(rng, 4.0, 8.0), tilt + _jitter(rng, 3.0, 6.0))


def sample_anatomy(rng: np.random.Generator, vert_period: float = 22.0, phase: str = "native") -> Anatomy:
    """Draw one case's anatomy: organ shapes/positions and tissue HU means.

    ``vert_period`` is given by the caller in reference mm so that the world-space vertebra height
    stays in the anatomical 20-25 mm band whatever the body scale. ``phase`` picks the tissue
    values (:data:`PHASES`); the random draws are the same in both, so a case differs between
    phases only in intensity.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    table = {**TISSUE_HU, **PORTAL_VENOUS_HU} if phase == "portal_venous" else TISSUE_HU
    hu = {}
    for name, (mean, sd) in table.items():
        default = (mean - 3 * sd, mean + 3 * sd)
        lo, hi = _HU_CLIP.get(name, default) if phase == "native" else default
        hu[name] = float(np.clip(rng.normal(mean, sd), lo, hi))

    liver_f = rng.uniform(0.85, 1.15)
    liver = OrganModel("liver", (
        _organ_shape(rng, (-16.0, -3.0, -36.0), (18.0, 18.0, 42.0), scale=liver_f),   # right lobe
        _organ_shape(rng, (6.0, -12.0, -22.0), (16.0, 9.0, 22.0), scale=liver_f),     # left lobe
    ), hu["liver"])
    spleen = OrganModel("spleen", (_organ_shape(rng, (20.0, 8.0, -24.0), (6.0, 12.0, 18.0), yaw=42.0),),
                        hu["spleen"])
    aorta_r = 3.6 * rng.uniform(0.9, 1.1)
    aorta = OrganModel("aorta", (Tube((4.5 + _jitter(rng, 0.7, 1.5), 1.5 + _jitter(rng, 0.7, 1.5)), aorta_r,
                                      -120.0 + _jitter(rng, 5.0, 10.0)),),
                       hu["aorta"], halo_mm=2.2, below_diaphragm=False)
    ivc = OrganModel("ivc", (Tube((-5.0 + _jitter(rng, 0.5, 1.0), 0.0 + _jitter(rng, 0.5, 1.0)),
                                  3.3 * rng.uniform(0.9, 1.1), -125.0, 10.0),),
                     hu["ivc"], below_diaphragm=False)

    # Kidneys: mirror images, long in-plane axis from posterolateral to anteromedial, upper pole
    # tilted medially; the left kidney sits 5-12 mm higher than the right, as in real anatomy (the
    # height jitter is mostly shared so that the order never flips).
    kidney_w = -68.0 + _jitter(rng, 3.0, 6.0)
    kidneys = {}
    for name, side, w0 in (("kidney_right", -1.0, kidney_w), ("kidney_left", 1.0, kidney_w + rng.uniform(5, 12))):
        shape = _organ_shape(rng, (14.5 * side, 9.0, w0), (7.5, 5.2, 25.0), yaw=35.0 * side, tilt=10.0 * side,
                             w_jitter=1.0)
        kidneys[name] = OrganModel(name, (shape,), hu["kidney"], halo_mm=3.5)

    # Right adrenal: a thin plate just above and medial of the right kidney's upper pole.
    kr = kidneys["kidney_right"].parts[0]
    pole = np.array(kr.centre) + kr.semi[2] * kr.axis("z")
    adrenal = OrganModel("adrenal_right", (_organ_shape(
        rng, (pole[0] + 1.5, pole[1] - 2.5, pole[2] + 4.5), (2.2, 5.0, 7.5), yaw=-20.0),), hu["adrenal_right"],
        halo_mm=2.5, halo_gap_mm=1.0)

    organs = {"liver": liver, "ivc": ivc, "spleen": spleen, "aorta": aorta, **kidneys, "adrenal_right": adrenal}
    return Anatomy(
        organs=organs, hu=hu,
        fat_mm=rng.uniform(3.0, 6.0), wall_mm=rng.uniform(3.0, 4.0),
        dome_right=4.0 + _jitter(rng, 1.5, 3.0), dome_left=0.0 + _jitter(rng, 1.5, 3.0),
        vert_period=vert_period, vert_phase=rng.uniform(0.0, vert_period), disc_frac=rng.uniform(0.18, 0.24),
        rib_drop=rng.uniform(10.0, 16.0), visceral_fat_threshold=rng.uniform(0.8, 1.3),
    )


def diaphragm_distance(anat: Anatomy, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Signed distance (mm, + above) to the diaphragm surface w = D(u, v).

    D has two domes (the right one higher), dips at the costophrenic recesses and under the heart.
    Using the distance along the surface normal rather than w - D keeps the diaphragm muscle
    equally thick where the dome is steep, so lung never touches liver/spleen within a slice.
    """
    mid = 0.5 * (anat.dome_right + anat.dome_left)
    half = 0.5 * (anat.dome_left - anat.dome_right)
    th = np.tanh(u / 6.0)
    au = np.abs(u) - 18.0
    dome = mid + half * th - 10.0 * (au / 16.0) ** 2 - 8.0 * ((v - 2.0) / 22.0) ** 2
    du = (half / 6.0) * (1.0 - th * th) - (20.0 / 256.0) * au * np.sign(u)
    dv = (-16.0 / 484.0) * (v - 2.0)
    return (w - dome) / np.sqrt(1.0 + du * du + dv * dv)


def _spine_and_ribs(anat: Anatomy, u: np.ndarray, v: np.ndarray, w: np.ndarray,
                    depth: np.ndarray) -> tuple[list[tuple[np.ndarray, float]], np.ndarray]:
    """Bone masks with their HU (painted in list order) and the union that organs must avoid."""
    H, P = anat.hu, anat.vert_period
    phase = np.mod(w - anat.vert_phase, P) * (1.0 / P)
    disc = phase < anat.disc_frac
    endplate_mm = np.minimum(phase - anat.disc_frac, 1.0 - phase) * P
    vb_q = (u / _VB_SEMI[0]) ** 2 + ((v - _VB_CENTRE_V) / _VB_SEMI[1]) ** 2
    vertebra = (vb_q <= 1.0) & ~disc
    cortical = vertebra & (((1.0 - np.sqrt(vb_q)) * _VB_SEMI[1] < 1.2) | (endplate_mm < 1.0))
    disc_mask = disc & (vb_q <= 1.08)

    rc = np.sqrt(u * u + (v - _CANAL_V) ** 2)
    canal = rc < _CANAL_R
    au = np.abs(u)
    posterior = ((rc < _ARCH_R) & ~canal) | ((au < 1.3) & (v > _CANAL_V + 3.5) & (depth > anat.fat_mm + 0.5))
    posterior |= (np.abs(v - 18.5) < 1.3) & (au >= 3.0) & (au < 11.0)
    posterior &= ~disc

    # Ribs: a band just inside the fat layer, sloping down anteriorly, absent at the sternum/spine.
    w_rib = w + anat.rib_drop * (1.0 - v / BODY_SEMI_AXES[1]) * 0.5
    rib = (np.mod(w_rib - anat.vert_phase - 0.5 * P, P) < 0.16 * P) & (w_rib > _RIB_LOWEST_W)
    rib &= (depth >= anat.fat_mm + 0.5) & (depth < anat.fat_mm + 3.0) & (au >= 9.0)

    bones = [(disc_mask, H["disc"]), (vertebra & ~cortical, H["cancellous"]), (cortical, H["cortical"]),
             (posterior, H["posterior_elements"]), (canal, H["csf"]), (rib, H["rib"])]
    occupied = disc_mask | vertebra | posterior | canal | rib
    return bones, occupied


def render_anatomy(anat: Anatomy, frame: BodyFrame, fat_field: np.ndarray, texture: np.ndarray,
                   voxel_ref_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Paint tissue HU (float32, noise-free) and organ labels (uint8) at the frame's voxels.

    ``fat_field`` and ``texture`` are smooth unit-variance random fields on the same grid: the first
    is thresholded into visceral fat patches, the second adds low-frequency parenchymal texture
    (it is modified in place).  Organs are clipped to the body cavity, kept out of bone and, except
    vessels, below the diaphragm, so every labelled voxel is inside the body.

    ``voxel_ref_mm`` is the in-plane voxel size in reference mm: fat capsules' soft-tissue gap and
    fat shell are widened to at least one voxel each, so that at coarse resolution the gap still
    shields organ HU from the blur and the fat stays visible.
    """
    u, v, w = frame.u, frame.v, frame.w
    H = anat.hu
    a, b = BODY_SEMI_AXES
    qa, qb = u / a, v / b
    # First-order distance to the skin (mm, positive inside): -f / |grad f| for f = qa^2 + qb^2 - 1.
    depth = (1.0 - qa * qa - qb * qb) / (2.0 * np.sqrt((qa / a) ** 2 + (qb / b) ** 2) + 1e-3)
    body = depth > 0
    inner = anat.fat_mm + anat.wall_mm
    cavity = depth >= inner
    hu = np.full(u.shape, H["air"], np.float32)
    hu[body] = H["fat"]
    hu[depth >= anat.fat_mm] = H["muscle_wall"]
    hu[cavity] = H["soft_tissue"]
    # Diaphragm muscle (soft tissue) of at least ~1.5 voxels between lung and abdominal organs.
    half_dia = 0.5 * max(3.0, 1.5 * voxel_ref_mm)
    dia = diaphragm_distance(anat, u, v, w)
    below = dia < -half_dia
    hu[cavity & below & (fat_field > anat.visceral_fat_threshold) & (depth >= inner + 1.5)] = H["visceral_fat"]

    lung = np.zeros(u.shape, bool)
    s = frame.slab(-45.0, math.inf)
    lobe = ((np.abs(u[s]) - _LUNG_U) / _LUNG_SEMI[0]) ** 2 + ((v[s] - _LUNG_V) / _LUNG_SEMI[1]) ** 2 <= 1.0
    for organ in anat.organs.values():  # the mediastinum keeps room for the great vessels
        if not organ.below_diaphragm:
            grow = organ.halo_mm + 3.0 * voxel_ref_mm + 1.0
            lobe &= np.minimum.reduce([p.grown(grow).level(u[s], v[s], w[s]) for p in organ.parts]) > 1.0
    lung[s] = lobe & (dia[s] > half_dia) & (depth[s] >= inner + 0.5)
    hu[lung] = H["lung"]

    bones, bone = _spine_and_ribs(anat, u, v, w, depth)
    for mask, value in bones:
        hu[mask] = value
    # Organs keep one voxel of soft tissue from bone (periosteum, psoas), for the same blur reason.
    bone_margin = binary_dilation(bone, structure=np.ones((1, 3, 3), bool))

    label = np.zeros(u.shape, np.uint8)
    rind = np.zeros(u.shape, bool)  # earlier organs' rinds, which later fat capsules must not cover
    for name in PAINT_ORDER:
        organ = anat.organs[name]
        lo, hi = organ.w_range
        s = frame.slab(lo - 3.0 * voxel_ref_mm, hi + 3.0 * voxel_ref_mm)
        if s.stop <= s.start:
            continue
        us, vs, ws, hs, ls = u[s], v[s], w[s], hu[s], label[s]
        allowed = cavity[s] & ~bone[s] & ~lung[s]
        if organ.below_diaphragm:
            allowed &= below[s]

        def level(grow: float, organ=organ, us=us, vs=vs, ws=ws) -> np.ndarray:
            return np.minimum.reduce([(p.grown(grow) if grow else p).level(us, vs, ws) for p in organ.parts])

        mask = (level(0.0) <= 1.0) & allowed & ~bone_margin[s]
        # A soft-tissue rind (fascia, vessel wall) keeps fat - visceral patches or capsules - and the
        # denser liver/spleen from touching the organ, so in-plane blur does not bias its HU
        # distribution; the fat capsule outside it only replaces background.
        free = allowed & ~mask
        gap_mm = max(organ.halo_gap_mm, 1.5 * voxel_ref_mm)
        near = free & (level(gap_mm) <= 1.0) & (ls <= (LABELS["spleen"] if organ.label else 0))
        if organ.halo_mm > 0:
            shell = free & ~near & (ls == 0) & ~rind[s]
            shell &= level(max(organ.halo_mm, gap_mm + 1.2 * voxel_ref_mm)) <= 1.0
            hs[shell] = H["visceral_fat"]
        hs[near] = H["soft_tissue"]
        ls[near] = 0
        rind[s] |= near
        hs[mask] = organ.hu
        ls[mask] = organ.label

    texture *= 4.0
    texture[lung] *= 4.5
    texture[~body] = 0.0
    hu += texture
    return hu, label
