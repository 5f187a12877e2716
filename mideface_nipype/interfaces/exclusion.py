"""AtlasExclusionMask: brain and eyes from the atlas priors (the fallback without segmentation)."""

from __future__ import annotations

from nipype.interfaces.base import File, TraitedSpec, traits

from mideface_nipype.engine import exclusion
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


class _AtlasExclusionInputSpec(SubjectGridInputSpec):
    dilate_vox = traits.Int(exclusion.XMASK_DILATE_VOX, usedefault=True, desc="dilations")


class _ExclusionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="exclusion mask (uint8 0/1): never modified")
    out_stats = File(exists=True, desc="JSON: protected voxels, seconds")


class AtlasExclusionMask(StepInterface):
    """Exclusion mask = atlas brain + eyes pulled through the registration, dilated, in the head."""

    input_spec = _AtlasExclusionInputSpec
    output_spec = _ExclusionOutputSpec

    def _run_interface(self, runtime):
        record: dict = {"method": "atlas"}
        with step("exclusion mask (atlas)", record):
            head, affine = load_mask(self.inputs.head_mask)
            mask = exclusion.atlas_exclusion_mask(
                load_atlas(self.inputs.atlas_dir or None),
                io.load_matrix(self.inputs.transform),
                head,
                affine,
                self.inputs.dilate_vox,
            )
        record["xmask_voxels"] = int(mask.sum())
        self._results["out_file"] = save_mask(mask, affine, runtime, "exclusion_mask.nii.gz")
        self._results["out_stats"] = write_json(record, out_path(runtime, "exclusion.json"))
        return runtime
