"""HeadMask: the ``mri_seghead`` scan-line head mask."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    File,
    TraitedSpec,
    traits,
)

from mideface_nipype.engine import headmask
from mideface_nipype.interfaces._base import (
    StepInputSpec,
    StepInterface,
    out_path,
    step,
    write_json,
)
from mideface_nipype.utils import io


class _HeadMaskInputSpec(StepInputSpec):
    in_file = File(exists=True, mandatory=True, desc="head MRI (3-D or 4-D; frame 0 is used)")


class _HeadMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="head mask (uint8 0/1) on the input grid")
    out_stats = File(exists=True, desc="JSON: head volume (mL), seconds")
    head_ml = traits.Float(desc="head volume in mL")


class HeadMask(StepInterface):
    """Segment the head from the background with the ``mri_seghead`` scan-line algorithm."""

    input_spec = _HeadMaskInputSpec
    output_spec = _HeadMaskOutputSpec

    def _run_interface(self, runtime):
        record: dict = {}
        with step("head mask", record):
            img = io.load_volume(self.inputs.in_file)
            mask = headmask.head_mask(img)
        record["head_ml"] = headmask.head_volume_ml(np.asarray(mask.dataobj), img.affine)
        self._results["out_file"] = out_path(runtime, "head_mask.nii.gz")
        nib.save(mask, self._results["out_file"])
        self._results["head_ml"] = record["head_ml"]
        self._results["out_stats"] = write_json(record, out_path(runtime, "head_mask.json"))
        return runtime
