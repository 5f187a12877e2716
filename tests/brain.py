"""An independent brain mask for checking defaced outputs (not the one the engine uses).

The engine registers the pydeface average head with an affine and protects atlas priors; this mask
comes from a different template (MNI152 2009 SSW, whole head), N4 bias correction, a deformable
ANTs SyN registration and the ICBM 2009a brain mask, so a shared mistake is unlikely.
"""

from __future__ import annotations

from functools import lru_cache

import nibabel as nib
import numpy as np
from conftest import ATLAS_SOURCES_DIR
from scipy import ndimage as ndi

from mideface_nipype import io, register

#: Grid of the SyN registration; 3 mm costs a few seconds.
BRAIN_REG_MM = 3.0


@lru_cache(maxsize=16)
def independent_brain_mask(path: str) -> np.ndarray:
    """Boolean brain mask (ICBM brain, SyN-registered from the SSW template) on ``path``'s grid."""
    ants = register._import_ants()
    img = nib.load(path)
    data = io.first_frame(img)
    fixed, fixed_aff = register.smooth_downsample(data, img.affine, BRAIN_REG_MM)
    ssw = nib.load(ATLAS_SOURCES_DIR / "niivue-deface_MNI152_2009_SSW.nii.gz")
    moving, moving_aff = register.smooth_downsample(
        np.asarray(ssw.dataobj, np.float32), ssw.affine, BRAIN_REG_MM
    )
    brain_src = nib.load(ATLAS_SOURCES_DIR / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    brain = ndi.binary_fill_holes(np.asarray(brain_src.dataobj) > 0).astype(np.float32)
    # N4 first: a strong bias field (dcmqa) otherwise lets SyN stretch the brain to the scalp
    fixed_img = ants.n4_bias_field_correction(register.to_ants(fixed, fixed_aff), shrink_factor=2)
    reg = ants.registration(
        fixed_img,
        register.to_ants(moving, moving_aff),
        type_of_transform="SyN",
    )
    # the brain mask lives on its own grid: put it on the SSW 3 mm grid first
    brain3 = register.resample(brain, brain_src.affine, moving.shape, moving_aff)
    warped = ants.apply_transforms(
        fixed_img,
        register.to_ants(brain3, moving_aff),
        reg["fwdtransforms"],
        interpolator="linear",
    ).numpy()
    return register.resample(warped, fixed_aff, data.shape, img.affine) > 0.5
