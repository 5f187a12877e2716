"""Registration helpers that must stay equal to the slower forms they replace."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from conftest import HEADS_DIR

from mideface_nipype.engine import register
from mideface_nipype.engine.headmask import head_mask
from mideface_nipype.utils import io
from mideface_nipype.utils.geometry import GridImage

HEAD = "IXI012-HH-1211-T1_ds.nii.gz"


def _histogram_mi(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    hist, _, _ = np.histogram2d(a, b, bins=bins)
    joint = hist / hist.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def _head() -> GridImage:
    img = nib.load(HEADS_DIR / HEAD)
    return GridImage(io.first_frame(img), img.affine, np.asarray(head_mask(img).dataobj) > 0)


def test_mutual_information_is_numpys_joint_histogram():
    """Bins as np.histogram makes them (extremes included, a constant widened), same MI."""
    head = _head()
    a = head.data[head.mask].astype(np.float32)
    b = np.roll(head.data, 3, axis=1)[head.mask].astype(np.float32)
    for x, y in ((a, b), (a, a), (a, np.full_like(a, 7.0)), (b[:1000], a[:1000] ** 2)):
        np.testing.assert_allclose(
            register.mutual_information(x, y), _histogram_mi(x, y), rtol=1e-6, atol=1e-9
        )
    for x in (a, np.full(5, 3.0), np.array([0.0, 1.0, 2.0, 3.0])):
        counts = np.bincount(register._bin_index(x, 32), minlength=32)
        np.testing.assert_array_equal(counts, np.histogram(x, bins=32)[0])


def test_head_grids_keep_the_smoothed_head_they_were_made_from():
    """The refinement reuses the registration grid's smoothing: the same array, and the grids
    made from it are those made from scratch."""
    head = _head()
    grids = register.head_grids(head)
    again = register.anti_aliased_head(head, register.REGISTRATION_MM)
    np.testing.assert_array_equal(grids.smoothed, again)
    fresh = register.masked_grid(head, register.REGISTRATION_MM)
    np.testing.assert_array_equal(grids.registration.data, fresh.data)
    np.testing.assert_array_equal(grids.registration.mask, fresh.mask)
    np.testing.assert_array_equal(grids.registration.affine, fresh.affine)
