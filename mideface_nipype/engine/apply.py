"""A face mask made on one contrast, carried onto another volume and filled there.

MiDeFace's ``--apply``: the mask (labels 0-4) is resampled with nearest neighbour into the other
volume's grid through a transform, the fill statistics are recomputed on that volume (its own
tissue mean/SD and background mode), and the face compartments are filled. Unlike FreeSurfer we
also carry the exclusion mask across, conservatively: any target voxel that touches it, and one
more voxel around those (for the registration error between the contrasts), is kept.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from mideface_nipype.engine import fill
from mideface_nipype.utils.geometry import resample

#: Extra voxels of protection around the carried exclusion mask (registration error).
XMASK_MARGIN_VOX = 1


def resample_labels(
    labels: np.ndarray,
    labels_affine: np.ndarray,
    shape: tuple[int, ...],
    affine: np.ndarray,
    target_to_labels: np.ndarray | None = None,
) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume onto a target grid (uint8)."""
    out = resample(
        labels.astype(np.float32),
        labels_affine,
        shape,
        affine,
        target_to_source=target_to_labels,
        order=0,
    )
    return np.rint(out).astype(np.uint8)


def resample_protection(
    xmask: np.ndarray,
    xmask_affine: np.ndarray,
    shape: tuple[int, ...],
    affine: np.ndarray,
    target_to_xmask: np.ndarray | None = None,
) -> np.ndarray:
    """Target voxels that overlap the exclusion mask at all (linear weight > 0)."""

    weight = resample(
        np.asarray(xmask, dtype=np.float32) > 0.5,
        xmask_affine,
        shape,
        affine,
        target_to_source=target_to_xmask,
        order=1,
    )
    return weight > 1e-3


def apply_face_mask(
    data: np.ndarray,
    affine: np.ndarray,
    face_mask: np.ndarray,
    mask_affine: np.ndarray,
    *,
    target_to_mask: np.ndarray | None = None,
    xmask: np.ndarray | None = None,
    head: np.ndarray | None = None,
    seed: int = fill.DEFAULT_SEED,
    fill_const: tuple[float, float] | None = None,
    stat_frame: int = fill.STAT_FRAME,
) -> tuple[np.ndarray, np.ndarray, fill.FillStats]:
    """Deface ``data`` (raw stored values, 3-D or 4-D) with a face mask from another grid.

    ``target_to_mask`` maps this volume's world mm to the mask's world mm (None: the same
    scanner space). A shareable face mask (no air compartments) is split at ``head``, this
    volume's own head mask. Returns the defaced data (with the provenance code), the resampled
    face mask and the fill statistics.
    """
    shape = data.shape[:3]
    mask = resample_labels(face_mask, mask_affine, shape, affine, target_to_mask)
    if head is not None:
        mask = fill.split_tissue_air(mask, head)
    if xmask is not None:
        protect = resample_protection(xmask, mask_affine, shape, affine, target_to_mask)
        protect = ndi.binary_dilation(
            protect, ndi.generate_binary_structure(3, 3), XMASK_MARGIN_VOX
        )
        mask[protect] = 0
    out, stats = fill.deface(data, mask, seed=seed, fill_const=fill_const, stat_frame=stat_frame)
    return out, mask, stats
