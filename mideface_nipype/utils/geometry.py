"""Generic geometry of volumes in world (RAS mm) terms: points, grids, resampling.

Every step that moves data between grids goes through here, so all of them agree on how a
voxel maps to the world (the 4x4 voxel -> RAS affine, any orientation) and how a volume is
sampled. ``apply_affine`` and ``voxel_sizes`` are nibabel's (bit-identical to what this package
computed by hand before). The resamplers are our own: nibabel.processing's work in float64 with
a spline prefilter and cannot take a world -> world transform, so their results differ.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from nibabel.affines import apply_affine, voxel_sizes
from scipy import ndimage as ndi

__all__ = [
    "GridImage",
    "anti_alias",
    "apply_affine",
    "centroid_mm",
    "iso_grid",
    "resample",
    "sample_at",
    "smooth_downsample",
    "voxel_sizes",
]


class GridImage(NamedTuple):
    """An image on a grid: its voxels, the grid's voxel -> RAS mm affine, and its (head) mask.

    A tuple, so that it unpacks as ``data, affine, mask`` and hashes by value in the test
    cache like the three arrays it replaces.
    """

    data: np.ndarray
    affine: np.ndarray
    mask: np.ndarray


def mask_box(mask: np.ndarray, margin_vox: int) -> tuple[slice, ...]:
    """The slices of a (non-empty) 3-D mask's bounding box, ``margin_vox`` voxels wider on each
    side within the volume (per-axis projections: ``np.argwhere`` of a 1 mm head costs 0.25 s)."""
    box = []
    for axis in range(3):
        used = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        lo = max(int(used[0]) - margin_vox, 0)
        box.append(slice(lo, min(int(used[-1]) + margin_vox + 1, mask.shape[axis])))
    return tuple(box)


def box_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The voxel -> world affine of the sub-volume ``volume[box]`` (slices with steps of 1)."""
    out = np.array(affine, dtype=float)
    out[:3, 3] = affine[:3, :3] @ [s.start or 0 for s in box] + affine[:3, 3]
    return out


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World position (RAS mm) of the centre of a mask's voxels."""
    return apply_affine(affine, np.argwhere(mask).mean(0)[None])[0]


def iso_grid(
    shape: tuple[int, ...], affine: np.ndarray, spacing_mm: float
) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned RAS grid of ``spacing_mm`` covering the field of view of (shape, affine)."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    world = apply_affine(affine, corners.T)
    lo, hi = world.min(0), world.max(0)
    new_shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing_mm).astype(int) + 1)
    new_affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    new_affine[:3, 3] = lo
    return new_shape, new_affine


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, ...],
    target_affine: np.ndarray,
    *,
    target_to_source: np.ndarray | None = None,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Sample ``data`` on a target grid; ``target_to_source`` maps target world mm to source mm."""
    vox = np.linalg.inv(affine) @ (np.eye(4) if target_to_source is None else target_to_source)
    vox = vox @ target_affine
    if order > 1:
        data = ndi.spline_filter(np.asarray(data, dtype=np.float32), order=order)
    return ndi.affine_transform(
        np.asarray(data, dtype=np.float32),
        vox[:3, :3],
        offset=vox[:3, 3],
        output_shape=tuple(shape[:3]),
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
    )


def sample_at(
    data: np.ndarray, affine: np.ndarray, points_mm: np.ndarray, order: int = 1
) -> np.ndarray:
    """``data`` interpolated at world points (N x 3 mm); 0 outside its grid. Cheaper than
    ``resample`` when only some voxels of the target grid are read (a head mask)."""
    vox = apply_affine(np.linalg.inv(affine), points_mm)
    return ndi.map_coordinates(
        np.asarray(data, dtype=np.float32),
        vox.T,
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )


def anti_alias(data: np.ndarray, affine: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The volume smoothed so that sampling it every ``spacing_mm`` does not alias."""
    zooms = voxel_sizes(affine)
    sigma_vox = np.sqrt(np.clip((spacing_mm / zooms) ** 2 - 1.0, 0.0, None)) / 2.355
    return ndi.gaussian_filter(np.asarray(data, dtype=np.float32), sigma_vox)


def smooth_downsample(
    data: np.ndarray, affine: np.ndarray, spacing_mm: float, *, order: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased resampling of a volume onto an axis-aligned RAS grid of ``spacing_mm``."""
    shape, new_affine = iso_grid(data.shape, affine, spacing_mm)
    smoothed = anti_alias(data, affine, spacing_mm)
    return resample(smoothed, affine, shape, new_affine, order=order), new_affine
