"""AtlasExclusionMask: brain and eyes from the atlas priors (the fallback without segmentation)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from mideface_nipype import exclusion
from mideface_nipype.atlas import load_atlas
from mideface_nipype.interfaces._base import load_matrix, out_path, step, write_json


class _AtlasExclusionInputSpec(BaseInterfaceInputSpec):
    head_mask = File(exists=True, mandatory=True, desc="subject head mask (defines the grid)")
    transform = File(exists=True, mandatory=True, desc="4x4 RAS subject->atlas matrix")
    atlas_dir = Directory(exists=True, desc="atlas folder (default: the installed atlas)")
    dilate_vox = traits.Int(exclusion.XMASK_DILATE_VOX, usedefault=True, desc="dilations")


class _ExclusionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="exclusion mask (uint8 0/1): never modified")
    out_stats = File(exists=True, desc="JSON: protected voxels, seconds")


class AtlasExclusionMask(SimpleInterface):
    """Exclusion mask = atlas brain + eyes pulled through the registration, dilated, in the head."""

    input_spec = _AtlasExclusionInputSpec
    output_spec = _ExclusionOutputSpec

    def _run_interface(self, runtime):
        record: dict = {"method": "atlas"}
        with step("exclusion mask (atlas)", record):
            head_img = nib.load(self.inputs.head_mask)
            head = np.asarray(head_img.dataobj) > 0
            mask = exclusion.atlas_exclusion_mask(
                load_atlas(self.inputs.atlas_dir or None),
                load_matrix(self.inputs.transform),
                head,
                head_img.affine,
                self.inputs.dilate_vox,
            )
        record["xmask_voxels"] = int(mask.sum())
        self._results["out_file"] = out_path(runtime, "exclusion_mask.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), head_img.affine), self._results["out_file"])
        self._results["out_stats"] = write_json(record, out_path(runtime, "exclusion.json"))
        return runtime
