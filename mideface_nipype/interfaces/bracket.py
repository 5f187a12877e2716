"""Bracket: per-label inward/outward distances and the four-compartment face mask."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nipype.interfaces.base import File, TraitedSpec, traits

from mideface_nipype.engine import bracket
from mideface_nipype.engine.atlas import load_atlas
from mideface_nipype.interfaces._base import (
    StepInterface,
    SubjectGridInputSpec,
    load_mask,
    out_path,
    save_mask,
    step,
    write_json,
)
from mideface_nipype.utils import io


class _BracketInputSpec(SubjectGridInputSpec):
    surface = File(exists=True, mandatory=True, desc="atlas surface in subject mm (GIfTI)")
    xmask = File(exists=True, desc="exclusion mask on the same grid (voxels > 0.5 never change)")
    ears = traits.Bool(True, usedefault=True, desc="deface the ears")
    forehead = traits.Bool(False, usedefault=True, desc="deface the forehead (risks brain)")
    back_of_head = traits.Bool(False, usedefault=True, desc="deface the back of the head")
    ripple = traits.Bool(False, usedefault=True, desc="add a radial ripple to the template")
    ripple_amp_mm = traits.Float(bracket.RIPPLE_AMP_MM, usedefault=True, desc="ripple amplitude")
    ripple_period_mm = traits.Float(bracket.RIPPLE_PERIOD_MM, usedefault=True, desc="period")
    watermark_mm = traits.Float(bracket.WATERMARK_MM, usedefault=True, desc="emboss height")


class _BracketOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="face mask (uint8, 0 untouched, compartments 1-4)")
    out_distances = File(
        exists=True,
        desc="JSON: per-label DistIn/DistOut and per-vertex searches; 'blended': per-vertex "
        "bounds after blending across labels, and their largest step",
    )
    out_stats = File(exists=True, desc="JSON: per-label DistIn/DistOut, protected voxels, seconds")


class Bracket(StepInterface):
    """Bracket the true face between inward and outward projections of the atlas face."""

    input_spec = _BracketInputSpec
    output_spec = _BracketOutputSpec

    def _run_interface(self, runtime):
        record: dict = {}
        with step("bracketing", record):
            head, affine = load_mask(self.inputs.head_mask)
            atlas = load_atlas(self.inputs.atlas_dir or None)
            surf = nib.load(self.inputs.surface)
            xmask = None
            if self.inputs.xmask:
                xmask, _ = load_mask(self.inputs.xmask)
            ripple_spec = None
            if self.inputs.ripple:
                ripple_spec = bracket.subject_ripple(
                    atlas.meta["ripple"]["center_mm"],
                    io.load_matrix(self.inputs.transform),
                    self.inputs.ripple_amp_mm,
                    self.inputs.ripple_period_mm,
                )
            face_mask, brackets, n_protected, blend = bracket.bracket_face(
                head,
                affine,
                surf.darrays[0].data,
                surf.darrays[1].data,
                atlas.labels,
                label_specs=bracket.select_labels(
                    ears=self.inputs.ears,
                    forehead=self.inputs.forehead,
                    back_of_head=self.inputs.back_of_head,
                ),
                watermark=atlas.watermark,
                watermark_mm=self.inputs.watermark_mm,
                ripple_spec=ripple_spec,
                xmask=xmask,
            )
        record["labels"] = {
            b.name: {
                "n_vertices": b.n_vertices,
                "dist_in_mm": b.dist_in_mm,
                "dist_out_mm": b.dist_out_mm,
            }
            for b in brackets
        }
        # the per-label bounds blended across label borders, and their largest step between
        # neighbouring template vertices (mm): the seams FreeSurfer's per-label bounds leave
        record["blended_bounds"] = blend.summary()
        record["voxels_protected"] = n_protected
        record["compartment_voxels"] = {
            str(k): int(np.count_nonzero(face_mask == k)) for k in range(1, 5)
        }
        self._results["out_file"] = save_mask(face_mask, affine, runtime, "face_mask.nii.gz")
        self._results["out_distances"] = write_json(
            {**{b.name: b.to_dict() for b in brackets}, "blended": blend.to_dict()},
            out_path(runtime, "distances.json"),
        )
        self._results["out_stats"] = write_json(record, out_path(runtime, "bracket.json"))
        return runtime
