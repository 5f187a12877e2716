"""Exclusion masks: voxels defacing must never modify (brain, eyes; with segmentation, skull).

``atlas_exclusion_mask`` is the fallback without segmentation (``--no-samseg``): the atlas priors
pulled through the registration. ``finish_exclusion_mask`` is shared by every source of a mask: it
dilates and keeps only voxels inside the head mask, so that stray labels outside the head protect
nothing (the FreeSurfer 7.4.1 nasion fix).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from mideface_nipype.engine.atlas import Atlas
from mideface_nipype.utils.geometry import resample

#: Where the exclusion mask comes from: the SAMSEG-style segmentation (brain, skull, eyes), the
#: atlas priors alone (brain and eyes; ``--no-samseg``), or a file the user gives.
XMASK_SOURCES = ("segment", "atlas", "user")
DEFAULT_XMASK_SOURCE = "segment"
#: Dilations (26-neighbourhood, in voxels of the subject grid) applied to the protected labels.
XMASK_DILATE_VOX = 1
#: Atlas classes protected by the fallback mask, and the probability above which a voxel counts.
ATLAS_PROTECTED = ("csf", "gm", "wm", "eyes")
ATLAS_PROTECT_PROB = 0.5


def warp_priors(
    atlas: Atlas,
    subject_to_atlas: np.ndarray,
    shape: tuple[int, ...],
    affine: np.ndarray,
    classes: tuple[str, ...] | None = None,
) -> np.ndarray:
    """Atlas priors on a subject grid (shape + (n_classes,)); outside the atlas box is air."""
    names = classes if classes is not None else tuple(atlas.priors)
    out = np.empty(tuple(shape[:3]) + (len(names),), dtype=np.float32)
    for i, name in enumerate(names):
        img = atlas.priors[name]
        out[..., i] = resample(
            np.asarray(img.dataobj),
            img.affine,
            shape,
            affine,
            target_to_source=subject_to_atlas,
            cval=1.0 if name == "air" else 0.0,
        )
    return out


def finish_exclusion_mask(
    protected: np.ndarray, head: np.ndarray, dilate_vox: int = XMASK_DILATE_VOX
) -> np.ndarray:
    """Dilate protected voxels by ``dilate_vox`` (26-neighbourhood) and keep those in the head."""
    mask = np.asarray(protected, dtype=bool)
    if dilate_vox > 0:
        mask = ndi.binary_dilation(mask, ndi.generate_binary_structure(3, 3), dilate_vox)
    return mask & (np.asarray(head) > 0)


def atlas_exclusion_mask(
    atlas: Atlas,
    subject_to_atlas: np.ndarray,
    head: np.ndarray,
    affine: np.ndarray,
    dilate_vox: int = XMASK_DILATE_VOX,
) -> np.ndarray:
    """Brain and eyes from the atlas priors, through the registration, dilated, within the head."""
    priors = warp_priors(atlas, subject_to_atlas, head.shape, affine, ATLAS_PROTECTED)
    return finish_exclusion_mask(priors.sum(-1) > ATLAS_PROTECT_PROB, head, dilate_vox)
