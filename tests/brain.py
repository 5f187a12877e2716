"""The evaluation's independent brain mask (not the one the engine uses), made once per image and
session (``runcache``)."""

from __future__ import annotations

from functools import lru_cache

import nibabel as nib
import numpy as np
import runcache
from conftest import ATLAS_SOURCES_DIR

from mideface_nipype.evaluation import metrics

#: ``metrics.independent_brain_mask(img, sources)``, shared by the session (keyed by the image's
#: values and affine and the sources' files).
shared_brain_mask = runcache.memoized("independent_brain_mask", metrics.independent_brain_mask)


@lru_cache(maxsize=16)
def independent_brain_mask(path: str) -> np.ndarray:
    """Boolean brain mask (ICBM brain, SyN-registered from the SSW template) on ``path``'s grid."""
    return shared_brain_mask(nib.load(path), ATLAS_SOURCES_DIR)
