"""The evaluation's independent brain mask (not the one the engine uses), made once per image and
session (``runcache``)."""

from __future__ import annotations

from functools import lru_cache

import nibabel as nib
import numpy as np
import runcache
from conftest import ATLAS_SOURCES_DIR

from mideface_nipype.evaluation import metrics

_shared = runcache.memoized("independent_brain_mask", metrics.independent_brain_mask)


def shared_brain_mask(
    img: nib.spatialimages.SpatialImage,
    sources_dir,
    subject_to_atlas: np.ndarray | None = None,
    transform: str = metrics.BRAIN_MASK_TRANSFORM,
) -> np.ndarray:
    """``metrics.independent_brain_mask``, shared by the session (keyed by the image's values and
    affine, the sources' files and the start, which is the image's own ``atlas_affine`` unless
    given: the session's registrations make that one cheap, and one key serves both calls) and
    the transform (``metrics.EICV_TRANSFORM`` for the eICV pair)."""
    if subject_to_atlas is None:
        subject_to_atlas = metrics.atlas_affine(img)
    return _shared(img, sources_dir, subject_to_atlas, transform)


@lru_cache(maxsize=16)
def independent_brain_mask(path: str) -> np.ndarray:
    """Boolean brain mask (ICBM brain, SyN-registered from the SSW template) on ``path``'s grid."""
    return shared_brain_mask(nib.load(path), ATLAS_SOURCES_DIR)
