"""The evaluation's independent brain mask (not the one the engine uses), cached per file."""

from __future__ import annotations

from functools import lru_cache

import nibabel as nib
import numpy as np
from conftest import ATLAS_SOURCES_DIR

from mideface_nipype.evaluate import independent_brain_mask as _independent_brain_mask


@lru_cache(maxsize=16)
def independent_brain_mask(path: str) -> np.ndarray:
    """Boolean brain mask (ICBM brain, SyN-registered from the SSW template) on ``path``'s grid."""
    return _independent_brain_mask(nib.load(path), ATLAS_SOURCES_DIR)
