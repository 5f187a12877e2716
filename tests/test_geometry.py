"""utils.geometry on the real heads: nibabel's point maps are bit-identical to the arithmetic they
replaced, and the grids and resamplers keep the head where it is in the world."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import FACE_HEADS, HEADS_DIR

from mideface_nipype.engine import headmask
from mideface_nipype.engine.atlas import load_atlas
from mideface_nipype.utils import geometry, io

HEADS = sorted(HEADS_DIR.glob("*.nii.gz"))
#: A subject -> atlas matrix like a registration's (rotation, scale, shear, shift).
SUBJECT_TO_ATLAS = np.array(
    [
        [1.05, 0.08, -0.03, 2.5],
        [-0.06, 0.97, 0.11, -17.25],
        [0.02, -0.09, 1.02, 31.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _by_hand(matrix: np.ndarray, points) -> np.ndarray:
    """The point map this package computed before it used nibabel's."""
    points = np.asarray(points, dtype=float)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


@pytest.mark.parametrize("path", HEADS, ids=lambda p: p.name.split(".")[0])
def test_nibabel_point_maps_are_bit_identical_on_real_heads(path):
    """Every head voxel to the world and back, and the atlas surface into each head: the same
    bits as before (outputs stay byte-identical), for integer, float32 and float64 points."""
    img = nib.load(path)
    voxels = np.argwhere(io.first_frame(img) > 0)
    world = geometry.apply_affine(img.affine, voxels)
    assert np.array_equal(world, _by_hand(img.affine, voxels))
    back = np.linalg.inv(img.affine)
    assert np.array_equal(geometry.apply_affine(back, world), _by_hand(back, world))
    as_float32 = voxels.astype(np.float32)
    assert np.array_equal(
        geometry.apply_affine(img.affine, as_float32), _by_hand(img.affine, as_float32)
    )
    atlas_to_subject = np.linalg.inv(SUBJECT_TO_ATLAS) @ np.linalg.inv(img.affine)
    vertices = load_atlas().surface.vertices
    assert np.array_equal(
        geometry.apply_affine(atlas_to_subject, vertices), _by_hand(atlas_to_subject, vertices)
    )
    for affine in (img.affine, back, SUBJECT_TO_ATLAS):
        by_hand = np.linalg.norm(affine[:3, :3], axis=0)
        assert np.array_equal(geometry.voxel_sizes(affine), by_hand)


@pytest.mark.parametrize("name", FACE_HEADS[:2])
def test_iso_grid_and_resample_keep_the_head_in_place(name):
    """On a 1 mm grid of any head, the head mask resampled there has the same centre (mm) and
    volume (mL), and ``smooth_downsample`` covers the whole field of view."""
    img = nib.load(HEADS_DIR / name)
    head = np.asarray(headmask.head_mask(img).dataobj) > 0
    shape, grid = geometry.iso_grid(img.shape, img.affine, 1.0)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in img.shape[:3]], indexing="ij"))
    world = geometry.apply_affine(img.affine, corners.reshape(3, -1).T)
    assert np.allclose(world.min(0), grid[:3, 3])
    assert np.all(world.max(0) <= geometry.apply_affine(grid, np.array(shape) - 1) + 1e-6)
    moved = geometry.resample(head.astype(np.float32), img.affine, shape, grid) > 0.5
    shift_mm = geometry.centroid_mm(moved, grid) - geometry.centroid_mm(head, img.affine)
    assert np.linalg.norm(shift_mm) < 0.25
    voxel_ml = np.prod(geometry.voxel_sizes(img.affine)) / 1000
    # the grid spans the voxel centres: where the field of view cuts the head (the neck), half a
    # source voxel lies beyond it
    assert moved.sum() / 1000 == pytest.approx(head.sum() * voxel_ml, rel=0.02)
    low, low_affine = geometry.smooth_downsample(io.first_frame(img), img.affine, 3.0)
    assert np.allclose(low_affine[:3, 3], grid[:3, 3]) and np.allclose(
        geometry.voxel_sizes(low_affine), 3.0
    )
    assert low.dtype == np.float32 and low.max() > 0


def test_resample_through_a_transform_undoes_it():
    """Sampling a head moved by a world transform, through that transform, gives the head back
    (order 0: the same voxel values wherever the moved image covers them)."""
    img = nib.load(HEADS_DIR / FACE_HEADS[0])
    data = io.first_frame(img)
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(geometry.voxel_sizes(img.affine)) * [3, -2, 5]
    moved_affine = shift @ img.affine  # the same voxels, moved in the world
    out = geometry.resample(
        data, moved_affine, data.shape, img.affine, target_to_source=shift, order=0
    )
    assert np.array_equal(out, data.astype(np.float32))


def test_sample_at_head_voxels_equals_resample_there():
    """``sample_at`` the head voxels of a target grid gives what ``resample`` gives there, through
    a registration-like transform, and 0 outside the source grid (the pose search relies on it)."""
    img = nib.load(HEADS_DIR / FACE_HEADS[0])
    data = io.first_frame(img)
    head = np.asarray(headmask.head_mask(img).dataobj) > 0
    shape, grid = geometry.iso_grid(img.shape, img.affine, 3.0)
    target_head = geometry.resample(head.astype(np.float32), img.affine, shape, grid) > 0.5
    full = geometry.resample(data, img.affine, shape, grid, target_to_source=SUBJECT_TO_ATLAS)
    points = geometry.apply_affine(
        SUBJECT_TO_ATLAS, geometry.apply_affine(grid, np.argwhere(target_head))
    )
    got = geometry.sample_at(data, img.affine, points)
    assert np.allclose(got, full[target_head], rtol=1e-5, atol=1e-3)
    far = geometry.apply_affine(img.affine, np.array(img.shape[:3]) + 10.0)[None]
    assert geometry.sample_at(data, img.affine, far)[0] == 0.0


def test_mask_box_is_the_bounding_box_with_its_margin_inside_the_volume():
    mask = np.zeros((9, 10, 11), dtype=bool)
    mask[1, 4, 7] = mask[3, 6, 10] = True
    assert geometry.mask_box(mask, 0) == (slice(1, 4), slice(4, 7), slice(7, 11))
    # the margin widens each side, but stops at the volume's faces
    assert geometry.mask_box(mask, 2) == (slice(0, 6), slice(2, 9), slice(5, 11))
