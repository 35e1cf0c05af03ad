"""Physical geometry of images: comparison, reorientation, canonical orientation.

Conventions. ``Geometry`` stores SimpleITK's values: ``spacing`` and ``origin`` in
(x, y, z) order, ``direction`` as a row-major 3x3 whose *columns* are the world
directions of the index axes. Numpy arrays from SimpleITK are indexed (z, y, x),
so numpy axis ``a`` is SimpleITK index axis ``2 - a``.

Two grids are compared through the index map between them: label index ``u`` ->
world -> image index ``v = A u + b``. If ``A`` is a signed permutation and ``b`` is
integral, both grids hold the same voxel centres in another axis order or with
flips; the label can then be reoriented exactly (no interpolation). Anything else
is a real geometry mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# |A - P| tolerance (dimensionless: relative spacing error) and |b - round(b)| in voxels.
MATRIX_TOL = 1e-3
OFFSET_TOL_VOXELS = 0.05


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in world (LPS, mm) space, SimpleITK conventions."""

    shape_xyz: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def index_to_world(self) -> np.ndarray:
        """3x3 matrix M with world = origin + M @ index (index in x, y, z order)."""
        return self.direction_matrix @ np.diag(self.spacing)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(reversed(self.shape_xyz))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {
            "shape_xyz": list(self.shape_xyz),
            "spacing_xyz": list(self.spacing),
            "origin_xyz": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            tuple(int(v) for v in d["shape_xyz"]),  # type: ignore[arg-type]
            tuple(float(v) for v in d["spacing_xyz"]),  # type: ignore[arg-type]
            tuple(float(v) for v in d["origin_xyz"]),  # type: ignore[arg-type]
            tuple(float(v) for v in d["direction"]),
        )


@dataclass(frozen=True)
class AxisMap:
    """Target index axis r takes source axis ``perm[r]``, flipped where ``flip[r]``."""

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def apply(self, array_zyx: np.ndarray) -> np.ndarray:
        """Rearrange a (z, y, x) array (optionally with leading channel axes)."""
        lead = array_zyx.ndim - 3
        # numpy axis of target sitk axis r is 2 - r; its source numpy axis is 2 - perm[r]
        axes = [2 - self.perm[2 - a] for a in range(3)]
        out = np.transpose(array_zyx, list(range(lead)) + [lead + a for a in axes])
        flip_axes = [lead + (2 - r) for r in range(3) if self.flip[r]]
        if flip_axes:
            out = np.flip(out, axis=flip_axes)
        return np.ascontiguousarray(out)

    def inverse(self) -> AxisMap:
        perm = [0, 0, 0]
        flip = [False, False, False]
        for r in range(3):
            perm[self.perm[r]] = r
            flip[self.perm[r]] = self.flip[r]
        return AxisMap(tuple(perm), tuple(flip))  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return {"perm_xyz": list(self.perm), "flip_xyz": list(self.flip)}

    @classmethod
    def from_dict(cls, d: dict) -> AxisMap:
        return cls(tuple(d["perm_xyz"]), tuple(bool(f) for f in d["flip_xyz"]))  # type: ignore[arg-type]


@dataclass
class GridRelation:
    """How a source grid relates to a target grid."""

    kind: str  # "same", "reoriented" or "mismatch"
    axis_map: AxisMap | None
    details: str


def relate_grids(source: Geometry, target: Geometry) -> GridRelation:
    """Decide whether ``source`` holds the same voxel centres as ``target``."""
    m_src, m_tgt = source.index_to_world, target.index_to_world
    inv_tgt = np.linalg.inv(m_tgt)
    a = inv_tgt @ m_src
    b = inv_tgt @ (np.asarray(source.origin) - np.asarray(target.origin))
    perm_src = np.argmax(np.abs(a), axis=1)  # target axis r <- source axis perm_src[r]
    p = np.zeros((3, 3))
    for r in range(3):
        p[r, perm_src[r]] = np.sign(a[r, perm_src[r]])
    is_perm = len(set(perm_src.tolist())) == 3 and np.allclose(a, p, atol=MATRIX_TOL)
    if is_perm:
        flips = tuple(bool(p[r, perm_src[r]] < 0) for r in range(3))
        shapes_ok = all(source.shape_xyz[perm_src[r]] == target.shape_xyz[r] for r in range(3))
        expected_b = np.array([target.shape_xyz[r] - 1 if flips[r] else 0 for r in range(3)], dtype=float)
        if shapes_ok and np.allclose(b, expected_b, atol=OFFSET_TOL_VOXELS):
            amap = AxisMap(tuple(int(v) for v in perm_src), flips)  # type: ignore[arg-type]
            kind = "same" if amap.is_identity else "reoriented"
            return GridRelation(kind, amap, describe_axis_map(amap) if kind == "reoriented" else "")
    return GridRelation("mismatch", None, describe_mismatch(source, target))


def describe_axis_map(amap: AxisMap) -> str:
    names = "xyz"
    parts = []
    for r in range(3):
        src = names[amap.perm[r]]
        parts.append(f"{names[r]}<-{'-' if amap.flip[r] else ''}{src}")
    return "axes " + ", ".join(parts)


def _world_extent(g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in g.shape_xyz], indexing="ij")).reshape(3, -1)
    world = np.asarray(g.origin)[:, None] + g.index_to_world @ corners
    return world.min(axis=1), world.max(axis=1)


def describe_mismatch(source: Geometry, target: Geometry) -> str:
    """Human-readable differences, in physical terms (world axes, mm)."""

    def world_spacing(g: Geometry) -> np.ndarray:
        return np.abs(g.index_to_world).max(axis=1)

    s_src, s_tgt = world_spacing(source), world_spacing(target)
    lo_s, hi_s = _world_extent(source)
    lo_t, hi_t = _world_extent(target)
    fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
    return (
        f"spacing along world x,y,z {fmt(s_src)} vs image {fmt(s_tgt)} mm; "
        f"extent {fmt(lo_s)}..{fmt(hi_s)} vs image {fmt(lo_t)}..{fmt(hi_t)} mm"
    )


def reorient_onto(array_zyx: np.ndarray, source: Geometry, target: Geometry) -> tuple[np.ndarray, GridRelation]:
    """Bring ``array_zyx`` (on grid ``source``) onto grid ``target`` without interpolation.

    Returns the rearranged array and the relation; for a mismatch the array is returned
    unchanged and the caller must refuse it.
    """
    rel = relate_grids(source, target)
    if rel.kind == "reoriented":
        assert rel.axis_map is not None
        return rel.axis_map.apply(array_zyx), rel
    return array_zyx, rel


def canonical_orientation(geometry: Geometry) -> tuple[AxisMap, Geometry]:
    """Axis map and geometry that make the direction closest to identity (LPS+).

    Canonical arrays have numpy axes (z, y, x) = (inferior->superior, anterior->posterior,
    right->left), whatever the scanner wrote, so that patches from every dataset share
    one orientation. Residual oblique rotation is kept in the geometry.
    """
    d = geometry.direction_matrix
    world_axis_of = np.argmax(np.abs(d), axis=0)  # for each source axis r: the world axis it follows
    if len(set(world_axis_of.tolist())) != 3:  # degenerate (45° oblique): keep as is
        return AxisMap((0, 1, 2), (False, False, False)), geometry
    perm = [0, 0, 0]
    flip = [False, False, False]
    for r in range(3):
        w = int(world_axis_of[r])
        perm[w] = r
        flip[w] = bool(d[w, r] < 0)
    amap = AxisMap(tuple(perm), tuple(flip))  # type: ignore[arg-type]
    n = geometry.shape_xyz
    new_dir = np.zeros((3, 3))
    new_spacing, new_shape = [0.0] * 3, [0] * 3
    origin_index = np.zeros(3)
    for t in range(3):
        r = perm[t]
        sign = -1.0 if flip[t] else 1.0
        new_dir[:, t] = sign * d[:, r]
        new_spacing[t] = geometry.spacing[r]
        new_shape[t] = n[r]
        origin_index[r] = n[r] - 1 if flip[t] else 0
    new_origin = np.asarray(geometry.origin) + geometry.index_to_world @ origin_index
    canon = Geometry(
        tuple(new_shape),  # type: ignore[arg-type]
        tuple(float(s) for s in new_spacing),  # type: ignore[arg-type]
        tuple(float(o) for o in new_origin),  # type: ignore[arg-type]
        tuple(float(v) for v in new_dir.reshape(-1)),
    )
    return amap, canon


def undo_canonical(array_zyx: np.ndarray, amap: AxisMap) -> np.ndarray:
    """Inverse of ``amap.apply``: back to the original array layout."""
    return amap.inverse().apply(array_zyx)
