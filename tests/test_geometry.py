import itertools

import numpy as np
import pytest

from diffprobe.io.geometry import Geometry, canonical_orientation, relate_grids


def geom(shape_xyz, spacing, origin, direction):
    return Geometry(tuple(shape_xyz), tuple(map(float, spacing)), tuple(map(float, origin)),
                    tuple(float(v) for v in np.asarray(direction).reshape(-1)))


def world_of_voxels(array_zyx, g: Geometry):
    """Dict world-position -> value, to compare grids physically."""
    k, j, i = np.indices(array_zyx.shape)
    idx = np.stack([i.ravel(), j.ravel(), k.ravel()])
    w = np.asarray(g.origin)[:, None] + g.index_to_world @ idx
    return {tuple(np.round(p, 3)): v for p, v in zip(w.T, array_zyx.ravel())}


def signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            d = np.zeros((3, 3))
            for r, (p, s) in enumerate(zip(perm, signs)):
                d[p, r] = s
            yield d


@pytest.mark.parametrize("direction", list(signed_permutations())[::5])
def test_reorient_any_signed_permutation(direction):
    rng = np.random.default_rng(0)
    img_g = geom((5, 4, 3), (0.8, 0.9, 2.5), (10, -20, 30), np.eye(3))
    arr = rng.integers(0, 9, size=img_g.shape_zyx).astype(np.uint8)
    # express the same voxels through another direction: derive label geometry + array
    amap, canon = canonical_orientation(geom((5, 4, 3), (0.8, 0.9, 2.5), (0, 0, 0), direction))
    # build label grid: index axis r follows world axis of direction[:, r]
    world_axis = np.argmax(np.abs(direction), axis=0)
    sign = direction[world_axis, range(3)]
    lab_shape = [img_g.shape_xyz[w] for w in world_axis]
    lab_spacing = [img_g.spacing[w] for w in world_axis]
    origin_idx = np.array([0 if sign[world_axis.tolist().index(w)] > 0 else img_g.shape_xyz[w] - 1
                           for w in range(3)])
    lab_origin = np.asarray(img_g.origin) + img_g.index_to_world @ origin_idx
    lab_g = geom(lab_shape, lab_spacing, lab_origin, direction)
    # fill label array so each voxel's world position carries the image's value there
    lookup = world_of_voxels(arr, img_g)
    k, j, i = np.indices(lab_g.shape_zyx)
    idx = np.stack([i.ravel(), j.ravel(), k.ravel()])
    w = np.asarray(lab_g.origin)[:, None] + lab_g.index_to_world @ idx
    lab = np.array([lookup[tuple(np.round(p, 3))] for p in w.T], dtype=np.uint8).reshape(lab_g.shape_zyx)
    rel = relate_grids(lab_g, img_g)
    assert rel.kind in ("same", "reoriented")
    out = rel.axis_map.apply(lab)
    np.testing.assert_array_equal(out, arr)


def test_mismatch_detected():
    a = geom((10, 10, 5), (1, 1, 2), (0, 0, 0), np.eye(3))
    assert relate_grids(a, a).kind == "same"
    assert relate_grids(geom((10, 10, 5), (1, 1, 2.5), (0, 0, 0), np.eye(3)), a).kind == "mismatch"
    assert relate_grids(geom((10, 10, 5), (1, 1, 2), (3.0, 0, 0), np.eye(3)), a).kind == "mismatch"
    assert relate_grids(geom((10, 10, 6), (1, 1, 2), (0, 0, 0), np.eye(3)), a).kind == "mismatch"
    # sub-tolerance origin jitter is accepted
    assert relate_grids(geom((10, 10, 5), (1, 1, 2), (0.01, 0, 0), np.eye(3)), a).kind == "same"
    rel = relate_grids(geom((10, 10, 5), (1, 1, 2.5), (0, 0, 0), np.eye(3)), a)
    assert "spacing" in rel.details and "extent" in rel.details


def test_canonical_orientation_roundtrip():
    rng = np.random.default_rng(1)
    for direction in list(signed_permutations())[::7]:
        g = geom((6, 5, 4), (0.7, 0.8, 3.0), (5, 6, 7), direction)
        arr = rng.normal(size=g.shape_zyx)
        amap, canon = canonical_orientation(g)
        np.testing.assert_allclose(canon.direction_matrix, np.eye(3), atol=1e-9)
        out = amap.apply(arr)
        assert out.shape == canon.shape_zyx
        # same world positions carry the same values
        before = world_of_voxels(arr, g)
        after = world_of_voxels(out, canon)
        assert before.keys() == after.keys()
        assert all(np.isclose(before[k], after[k]) for k in before)
        np.testing.assert_array_equal(amap.inverse().apply(out), arr)
