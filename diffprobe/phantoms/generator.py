"""Synthetic CT cases: per-case sampling, voxelisation, imaging degradations and dataset writing.

A case is a random draw of (body pose and size, scan geometry, anatomy, deformation, noise) from
``np.random.default_rng(SeedSequence([seed, case_index]))``, so any case can be regenerated alone
and bit-identically.  The scan covers a random cranio-caudal window of the body and the body sits
at a random offset/rotation in the field of view, so organ positions differ in array index space
from case to case and must be inferred from anatomy, as in real CT.

World coordinates are LPS mm (+x patient left, +y posterior, +z superior) on an identity-direction
grid, so array axes (z, y, x) map to world (z, y, x) by ``origin + index * spacing``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from diffprobe.phantoms.anatomy import BODY_SEMI_AXES, LABELS, BodyFrame, render_anatomy, sample_anatomy
from diffprobe.utils import atomic_path, write_json

_REFERENCE_FOV_MM = 110.0  # the FOV the reference anatomy (40 x 28 mm torso) is sized for
_WINDOW_CENTRE_W = (-90.0, 0.0)  # scan-window centres (reference w): always hits liver or kidneys
_TEST_INDEX_OFFSET = 100  # test cases are phantom_100, phantom_101, ...


@dataclass
class PhantomConfig:
    """Dataset size, seed and the ranges per-case parameters are drawn from (lengths in world mm)."""

    num_train_labelled: int = 8
    num_train_unlabelled: int = 4
    num_test: int = 4
    seed: int = 0
    fov_mm: float = 110.0  # in-plane field of view (square); the anatomy scales with it
    spacing_inplane: tuple[float, float] = (0.6, 1.0)
    spacing_slice: tuple[float, float] = (1.5, 5.0)
    scan_length_mm: tuple[float, float] = (70.0, 130.0)
    noise_hu: tuple[float, float] = (5.0, 20.0)
    body_scale: tuple[float, float] = (0.85, 1.15)
    offset_mm: float = 8.0  # max body offset in the FOV at the reference FOV (scales with fov_mm)
    rotation_deg: float = 10.0  # max rotation about z
    vertebra_height_mm: tuple[float, float] = (20.0, 25.0)  # at the reference FOV
    blur_sigma_vox: tuple[float, float] = (0.5, 0.7)  # in-plane partial-volume blur
    deformation_mm: float = 2.0  # std of the coarse smooth displacement (reference mm)
    phase: str = "native"  # "native" (non-contrast) or "portal_venous" (BTCV-like contrast phase)


@dataclass(eq=False)
class PhantomCase:
    """One generated scan; arrays in SimpleITK's (z, y, x) order, geometry in its (x, y, z) order."""

    image: np.ndarray  # int16 HU
    label: np.ndarray  # uint8, values in LABELS
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    meta: dict = field(default_factory=dict)  # sampled case parameters, for inspection/tests

    def to_sitk(self) -> tuple[sitk.Image, sitk.Image]:
        images = []
        for arr in (self.image, self.label):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(self.spacing)
            img.SetOrigin(self.origin)
            img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
            images.append(img)
        return images[0], images[1]


def _bspline3(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1.0, (4.0 - 6.0 * t**2 + 3.0 * t**3) / 6.0, np.where(t < 2.0, (2.0 - t) ** 3 / 6.0, 0.0))


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing_zyx: tuple[float, ...],
                 corr_mm_zyx: tuple[float, ...], n: int = 1) -> np.ndarray:
    """``n`` smooth unit-variance random fields, shape (n, *shape), float32.

    Gaussian coefficients on a randomly shifted lattice with ``corr_mm`` spacing are interpolated with
    cubic B-splines, which is separable: three small matrix products instead of a 3D filter, and the
    smoothness is defined in mm so it does not depend on the sampled voxel spacing.  Rows of the
    interpolation matrices are normalised so the field has unit variance everywhere.  The products
    run in float64 and are rounded to float32 at the end, so BLAS threading/summation order cannot
    change the result at float32 precision (cases must be byte-reproducible).
    """
    mats = []
    for size, sp, corr in zip(shape, spacing_zyx, corr_mm_zyx, strict=True):
        t = np.arange(size) * (sp / corr) + rng.uniform(0.0, 1.0)
        knots = np.arange(-2, int(math.ceil(t[-1])) + 3)
        m = _bspline3(t[:, None] - knots[None, :])
        mats.append(m / np.linalg.norm(m, axis=1, keepdims=True))
    wz, wy, wx = mats
    coef = rng.standard_normal((n, wz.shape[1], wy.shape[1], wx.shape[1]))
    out = coef @ wx.T  # (n, cz, cy, x)
    out = np.matmul(wy, out)  # (n, cz, y, x)
    return np.einsum("zc,ncyx->nzyx", wz, out, optimize=True).astype(np.float32)


def generate_case(config: PhantomConfig, case_index: int) -> PhantomCase:
    """Generate one case, reproducibly from ``(config.seed, case_index)`` alone."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, case_index]))
    fov_scale = config.fov_mm / _REFERENCE_FOV_MM

    # Body pose and size: world mm per reference mm along each body axis.
    scale = fov_scale * rng.uniform(*config.body_scale)
    su, sv, sw = scale * rng.uniform(0.95, 1.05), scale * rng.uniform(0.95, 1.05), scale * rng.uniform(0.92, 1.08)
    theta = math.radians(rng.uniform(-config.rotation_deg, config.rotation_deg))

    # Scan geometry: isotropic in-plane spacing, square FOV centred on 0, random z window.
    sp_xy = rng.uniform(*config.spacing_inplane)
    sp_z = rng.uniform(*config.spacing_slice)
    n_xy = max(8, int(round(config.fov_mm / sp_xy)))
    length = rng.uniform(*config.scan_length_mm)
    n_z = max(4, int(round(length / sp_z)))
    a, b = BODY_SEMI_AXES[0] * su, BODY_SEMI_AXES[1] * sv
    half_fov = 0.5 * (n_xy - 1) * sp_xy
    offsets = []
    for ext in (math.hypot(a * math.cos(theta), b * math.sin(theta)),
                math.hypot(a * math.sin(theta), b * math.cos(theta))):
        room = max(0.0, half_fov - ext - 3.0 * scale)  # keep the (deformed) body inside the FOV
        lim = min(config.offset_mm * fov_scale, room)
        offsets.append(rng.uniform(-lim, lim))
    cx, cy = offsets
    dome_z = rng.uniform(-20.0, 20.0) * fov_scale  # world z of the diaphragm apex
    centre_w = rng.uniform(*_WINDOW_CENTRE_W)
    z0 = dome_z + centre_w * sw - 0.5 * (n_z - 1) * sp_z
    origin = (-half_fov, -half_fov, z0)
    spacing = (sp_xy, sp_xy, sp_z)

    vert_height = rng.uniform(*config.vertebra_height_mm) * fov_scale
    anat = sample_anatomy(rng, vert_period=vert_height / sw, phase=config.phase)

    # Map voxel centres into the body reference frame, then add a smooth random deformation
    # (coarse "posture" + finer "shape" component) so no two organs have identical outlines.
    x = (origin[0] + np.arange(n_xy) * sp_xy - cx).astype(np.float32)
    y = (origin[1] + np.arange(n_xy) * sp_xy - cy).astype(np.float32)
    c, s = math.cos(theta), math.sin(theta)
    u0 = (c * x[None, :] + s * y[:, None]) / su
    v0 = (-s * x[None, :] + c * y[:, None]) / sv
    w_slice = ((z0 + np.arange(n_z) * sp_z - dome_z) / sw).astype(np.float32)
    shape = (n_z, n_xy, n_xy)
    sp_zyx = (sp_z, sp_xy, sp_xy)
    disp = smooth_field(rng, shape, sp_zyx, (40.0 * scale, 24.0 * scale, 24.0 * scale), 3)
    disp *= config.deformation_mm
    disp += smooth_field(rng, shape, sp_zyx, (15.0 * scale, 9.0 * scale, 9.0 * scale), 3) * (
        0.4 * config.deformation_mm)
    frame = BodyFrame(u=disp[0] + u0, v=disp[1] + v0, w=disp[2] + w_slice[:, None, None],
                      w_slice=w_slice, w_margin=float(np.abs(disp[2]).max()) + 1e-3)
    del disp
    fat_field = smooth_field(rng, shape, sp_zyx, (12.0 * scale, 7.0 * scale, 7.0 * scale))[0]
    texture = smooth_field(rng, shape, sp_zyx, (6.0 * scale, 3.0 * scale, 3.0 * scale))[0]
    hu, label = render_anatomy(anat, frame, fat_field, texture, voxel_ref_mm=sp_xy / min(su, sv))

    # Imaging: in-plane partial-volume blur, then Gaussian noise; round to int16 HU.
    blur = rng.uniform(*config.blur_sigma_vox)
    noise = rng.uniform(*config.noise_hu)
    hu = gaussian_filter(hu, sigma=(0.0, blur, blur), mode="nearest")
    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    meta = {"case_index": case_index, "body_scale": scale, "rotation_deg": math.degrees(theta),
            "offset_mm": (cx, cy), "dome_z_mm": dome_z, "window_centre_w": centre_w,
            "noise_hu": noise, "blur_sigma_vox": blur, "organ_hu": {k: o.hu for k, o in anat.organs.items()}}
    return PhantomCase(image=image, label=label, spacing=spacing, origin=origin, meta=meta)


def _write(img: sitk.Image, path: Path) -> None:
    with atomic_path(path, ".nii.gz") as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def make_phantom_dataset(dataset_dir: Path, config: PhantomConfig | None = None) -> Path:
    """Write an nnU-Net v2 raw dataset (imagesTr/labelsTr/imagesTs/labelsTs + dataset.json).

    Training cases are phantom_000.. (labelled first, then unlabelled ones, which get no label
    file); test cases are phantom_100.. with labels in labelsTs for evaluation.  dataset.json is
    written last, so its presence marks a complete dataset.
    """
    config = PhantomConfig() if config is None else config
    dataset_dir = Path(dataset_dir)
    n_train = config.num_train_labelled + config.num_train_unlabelled
    if n_train > _TEST_INDEX_OFFSET or config.num_test > 900:
        raise ValueError(f"too many cases for the phantom_NNN naming scheme: {n_train} train, {config.num_test} test")
    jobs = [(i, "Tr", i < config.num_train_labelled) for i in range(n_train)]
    jobs += [(_TEST_INDEX_OFFSET + j, "Ts", True) for j in range(config.num_test)]
    for index, split, labelled in jobs:
        case = generate_case(config, index)
        image, label = case.to_sitk()
        name = f"phantom_{index:03d}"
        _write(image, dataset_dir / f"images{split}" / f"{name}_0000.nii.gz")
        if labelled:
            _write(label, dataset_dir / f"labels{split}" / f"{name}.nii.gz")
    write_json(dataset_dir / "dataset.json", {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": dataset_dir.name,
        "description": "Synthetic abdominal CT phantoms (diffprobe.phantoms); unlabelled training cases "
                       "have no file in labelsTr.",
        "phantom_config": asdict(config),
    })
    return dataset_dir
