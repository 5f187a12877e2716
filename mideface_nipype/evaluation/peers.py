"""Peer defacers run in the evaluation harness: quickshear and the pydeface method.

* **quickshear** (PyPI ``quickshear``): cuts everything in front of a plane tangent to the brain
  mask's lower convex hull (10 voxels in front of it). It needs a brain mask; it gets the
  evaluation's independent one (``evaluate.independent_brain_mask``), computed once by the
  harness, so its measured cost leaves out the mask (N4 + SyN at 3 mm, about 10 s of CPU).
* **pydeface method, registered with ANTs** (PyPI ``pydeface`` supplies its template and face
  mask): pydeface registers its template to the subject with FSL ``flirt`` and multiplies the
  image by the face mask resampled through that affine. FSL is not available here, so the
  registration is the engine's ANTs affine instead of ``flirt``, without the engine's refusal of
  doubtful poses (pydeface has none): the method and its files are pydeface's, the optimiser
  is not.

Run as a whole process by the harness::

    python -m mideface_nipype.evaluation.peers {quickshear,pydeface-ants} IN OUT [--brain-mask MASK]
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

import nibabel as nib
import numpy as np

from mideface_nipype.engine import headmask, register
from mideface_nipype.utils import io
from mideface_nipype.utils.geometry import GridImage, resample

PEERS = ("quickshear", "pydeface-ants")
#: quickshear's default distance (voxels) between the shearing plane and the brain.
QUICKSHEAR_BUFFER_VOX = 10
#: Resampled face-mask values this close to 1 are 1 (linear interpolation of ones in float32).
KEEP_ROUNDOFF = 1e-4


def quickshear_deface(
    img: nib.spatialimages.SpatialImage, brain_mask: np.ndarray
) -> nib.spatialimages.SpatialImage:
    """quickshear's own function on ``img`` with ``brain_mask`` (boolean, on ``img``'s grid)."""
    from quickshear import quickshear

    mask_img = nib.Nifti1Image(brain_mask.astype(np.uint8), img.affine)
    return quickshear(img, mask_img, buff=QUICKSHEAR_BUFFER_VOX)


def pydeface_ants(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """pydeface's template and face mask, the template registered to ``img`` by an ANTs affine.

    As in pydeface, the image is multiplied by the linearly resampled face mask (1 keeps, 0 erases)
    and written as float32, so voxels under a mask value of exactly 1 are unchanged.
    """
    data_dir = files("pydeface") / "data"
    template = nib.load(str(data_dir / "mean_reg2mean.nii.gz"))
    facemask = nib.load(str(data_dir / "facemask.nii.gz"))
    data = io.first_frame(img)
    # pydeface defaces whatever flirt returns: the engine's registration without its refusals
    subject_to_template, _ = register.register_heads(
        GridImage(data, img.affine, np.asarray(headmask.head_mask(img).dataobj) > 0),
        register.head_grids(
            GridImage(
                io.first_frame(template),
                template.affine,
                np.asarray(headmask.head_mask(template).dataobj) > 0,
            )
        ),
        min_head_dice=0.0,
        min_pose_ratio=0.0,
    )
    keep = resample(
        np.asarray(facemask.dataobj, dtype=np.float32),
        facemask.affine,
        data.shape,
        img.affine,
        target_to_source=subject_to_template,
        cval=1.0,  # beyond the template's box there is no face to erase
    )
    keep[np.abs(keep - 1.0) < KEEP_ROUNDOFF] = 1.0  # float round-off of interpolating ones
    out = nib.Nifti1Image((data * keep).astype(np.float32), img.affine, img.header.copy())
    out.header.set_data_dtype(np.float32)
    out.header.set_slope_inter(1.0, 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a peer defacer on one head.")
    parser.add_argument("method", choices=PEERS)
    parser.add_argument("in_file", type=Path)
    parser.add_argument("out_file", type=Path)
    parser.add_argument("--brain-mask", type=Path, help="brain mask on IN's grid (quickshear)")
    args = parser.parse_args(argv)
    try:
        img = io.load_volume(args.in_file)
        if args.method == "quickshear":
            if args.brain_mask is None:
                raise ValueError("quickshear needs --brain-mask")
            brain = np.asarray(io.load_volume(args.brain_mask).dataobj) > 0
            out = quickshear_deface(img, brain)
        else:
            out = pydeface_ants(img)
        io.save_atomic(out, args.out_file)
    except Exception as err:  # noqa: BLE001 - one clear line for any failure
        print(f"{args.method}: error: {args.in_file}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
