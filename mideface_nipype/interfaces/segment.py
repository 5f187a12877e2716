"""Segment: SAMSEG-style whole-head segmentation and the exclusion mask it gives."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nipype.interfaces.base import File, TraitedSpec, traits

from mideface_nipype.engine import exclusion, segment
from mideface_nipype.engine.atlas import CLASSES, load_atlas
from mideface_nipype.interfaces._base import (
    StepInputSpec,
    StepInterface,
    SubjectGridInputSpec,
    load_mask,
    out_path,
    save_mask,
    step,
    write_json,
)
from mideface_nipype.reports.slices import label_slices, save_png
from mideface_nipype.utils import io

#: QA pictures are enlarged to at least this height (pixels).
QA_MIN_HEIGHT_PX = 360


class _SegmentInputSpec(SubjectGridInputSpec):
    in_file = File(exists=True, mandatory=True, desc="head MRI, any contrast (frame 0 is used)")
    dilate_vox = traits.Int(exclusion.XMASK_DILATE_VOX, usedefault=True, desc="dilations")


class _SegmentOutputSpec(TraitedSpec):
    out_labels = File(exists=True, desc="labels (0 air, 1 soft, 2 bone, 3 csf, 4 gm, 5 wm, 6 eyes)")
    out_file = File(exists=True, desc="exclusion mask: brain + bone + eyes, dilated, in the head")
    out_stats = File(exists=True, desc="JSON: intracranial volume, class intensities, seconds")


class Segment(StepInterface):
    """Contrast-adaptive segmentation (atlas priors + Gaussian mixtures by EM + bias field)."""

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec

    def _run_interface(self, runtime):
        record: dict = {"method": "segment"}
        with step("segmentation", record):
            img = io.load_volume(self.inputs.in_file)
            head, _ = load_mask(self.inputs.head_mask)
            data = io.first_frame(img)
            seg = segment.segment(
                data,
                img.affine,
                head,
                load_atlas(self.inputs.atlas_dir or None),
                io.load_matrix(self.inputs.transform),
            )
            xmask = segment.exclusion_mask(seg, head, self.inputs.dilate_vox)
        record.update(
            icv_ml=seg.icv_ml,
            xmask_voxels=int(xmask.sum()),
            class_means=seg.class_means,
            class_stds=seg.class_stds,
            iterations=seg.iterations,
            label_voxels={c: int((seg.labels == segment.SEG_LABELS[c]).sum()) for c in CLASSES},
        )
        self._results["out_labels"] = save_mask(seg.labels, img.affine, runtime, "labels.nii.gz")
        self._results["out_file"] = save_mask(xmask, img.affine, runtime, "exclusion_mask.nii.gz")
        self._results["out_stats"] = write_json(record, out_path(runtime, "exclusion.json"))
        return runtime


class _SegmentationPictureInputSpec(StepInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the defaced image (frame 0 is shown)")
    labels = File(exists=True, mandatory=True, desc="Segment's labels, on the same grid")
    face_mask = File(exists=True, mandatory=True, desc="the face mask (voxels > 0 replaced)")


class _SegmentationPictureOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="PNG: three orthogonal slices with the label borders")


class SegmentationPicture(StepInterface):
    """The segmentation's QA picture, drawn on the defaced image with no label inside the face
    mask: on the original slices, or with the soft-tissue border through the face, it showed
    the profile the defacing removed (the picture is published beside the defaced images)."""

    input_spec = _SegmentationPictureInputSpec
    output_spec = _SegmentationPictureOutputSpec

    def _run_interface(self, runtime):
        img = io.load_volume(self.inputs.in_file)
        labels = np.asarray(nib.load(self.inputs.labels).dataobj).copy()
        face, _ = load_mask(self.inputs.face_mask)
        labels[face] = 0
        picture = label_slices(io.first_frame(img), labels, img.affine)
        zoom = max(1, int(np.ceil(QA_MIN_HEIGHT_PX / picture.shape[0])))
        picture = np.repeat(np.repeat(picture, zoom, axis=0), zoom, axis=1)
        self._results["out_report"] = str(save_png(picture, out_path(runtime, "segmentation.png")))
        return runtime
