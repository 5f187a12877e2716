#!/usr/bin/env python
"""Recipe: MiDeFace inside a larger preprocessing graph (N4 before, brain extraction after).

    python workflows/compose_preproc.py T1w.nii.gz OUT_DIR [--plugin MultiProc]

``init_mideface_wf`` is an ordinary Nipype workflow: connect anything to
``mideface_wf.inputnode`` (``in_file``, ``other_files``, ...) and take anything from
``mideface_wf.outputnode`` (``out_file``, ``face_mask``, ``exclusion_mask``, ``transform``, ...)::

    inputnode(t1w) -> n4 (ANTs N4 bias correction)
      -> mideface_wf.inputnode.in_file
      -> mideface_wf.outputnode.out_file + .transform (subject -> atlas mm)
      -> brain (atlas brain priors through that transform, applied to the defaced image)
      -> outputnode(defaced, face_mask, brain, brain_mask)

The two user steps are Nipype ``Function`` nodes here (any interface works the same way); their
functions import what they need, since each node may run in its own process or batch job.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nipype.interfaces.utility import Function, IdentityInterface
from nipype.pipeline import engine as pe

from mideface_nipype.workflows.base import init_mideface_wf

#: What the recipe keeps, from ``outputnode``.
OUTPUTS = ("defaced", "face_mask", "brain", "brain_mask")
#: Shrink factor of N4 (4: a 2 mm head in a second or two; 1 mm heads take minutes at 1).
N4_SHRINK = 4


def n4_correct(in_file: str, shrink_factor: int) -> str:
    """ANTs N4 bias-field correction; the corrected image keeps the input's grid."""
    import os

    import ants

    corrected = ants.n4_bias_field_correction(ants.image_read(in_file), shrink_factor=shrink_factor)
    out_file = os.path.abspath("n4.nii.gz")
    ants.image_write(corrected, out_file)
    return out_file


def extract_brain(in_file: str, subject_to_atlas: str) -> tuple[str, str]:
    """in_file within the atlas brain (CSF+GM+WM priors > 0.5) mapped by MiDeFace's transform."""
    import os

    import nibabel as nib
    import numpy as np

    from mideface_nipype.engine import atlas, exclusion, segment
    from mideface_nipype.utils import io

    img = nib.load(in_file)
    priors = exclusion.warp_priors(
        atlas.load_atlas(),
        np.loadtxt(subject_to_atlas).reshape(4, 4),
        img.shape[:3],
        img.affine,
        segment.BRAIN_CLASSES,
    )
    brain = priors.sum(-1) > 0.5
    data = io.stored_data(img)
    masked = np.where(brain.reshape(brain.shape + (1,) * (data.ndim - 3)), data, 0)
    brain_file, mask_file = os.path.abspath("brain.nii.gz"), os.path.abspath("brain_mask.nii.gz")
    io.save_atomic(io.like(img, masked.astype(data.dtype)), brain_file)
    io.save_atomic(io.mask_image(brain, img), mask_file)
    return brain_file, mask_file


def init_preproc_wf(*, name: str = "preproc_wf") -> pe.Workflow:
    """N4 -> MiDeFace -> brain extraction, with inputnode(t1w) and outputnode."""
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(
        IdentityInterface(fields=["defaced", "face_mask", "brain", "brain_mask"]),
        name="outputnode",
    )
    n4 = pe.Node(
        Function(
            input_names=["in_file", "shrink_factor"],
            output_names=["out_file"],
            function=n4_correct,
        ),
        name="n4",
        mem_gb=1.0,
        n_procs=1,
    )
    n4.inputs.shrink_factor = N4_SHRINK
    deface = init_mideface_wf(name="mideface_wf")
    brain = pe.Node(
        Function(
            input_names=["in_file", "subject_to_atlas"],
            output_names=["brain", "brain_mask"],
            function=extract_brain,
        ),
        name="brain",
        mem_gb=0.5,
        n_procs=1,
    )
    workflow.connect(
        [
            (inputnode, n4, [("t1w", "in_file")]),
            (n4, deface, [("out_file", "inputnode.in_file")]),
            (
                deface,
                brain,
                [("outputnode.out_file", "in_file"), ("outputnode.transform", "subject_to_atlas")],
            ),
            (
                deface,
                outputnode,
                [("outputnode.out_file", "defaced"), ("outputnode.face_mask", "face_mask")],
            ),
            (brain, outputnode, [("brain", "brain"), ("brain_mask", "brain_mask")]),
        ]
    )
    return workflow


def publish(out_dir: str, defaced: str, face_mask: str, brain: str, brain_mask: str) -> list:
    """Copy the results to ``out_dir`` (each file complete or absent: temp + rename)."""
    from mideface_nipype.utils.io import copy_atomic

    files = {"defaced": defaced, "face_mask": face_mask, "brain": brain, "brain_mask": brain_mask}
    return [str(copy_atomic(path, f"{out_dir}/{key}.nii.gz")) for key, path in files.items()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("t1w", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--plugin", default="Linear", help="Linear, MultiProc, SLURM, ...")
    args = parser.parse_args()

    preproc = init_preproc_wf()
    preproc.inputs.inputnode.t1w = str(args.t1w.resolve())
    sink = pe.Node(
        Function(input_names=["out_dir", *OUTPUTS], output_names=["out_files"], function=publish),
        name="publish",
        run_without_submitting=True,
    )
    sink.inputs.out_dir = str(args.out_dir.resolve())
    workflow = pe.Workflow(name="compose")
    workflow.connect([(preproc, sink, [(f"outputnode.{key}", key) for key in OUTPUTS])])
    workflow.base_dir = str((args.out_dir / "work").resolve())
    workflow.run(plugin=args.plugin)
    print("\n".join(f"{key}: {args.out_dir / key}.nii.gz" for key in OUTPUTS))


if __name__ == "__main__":
    main()
