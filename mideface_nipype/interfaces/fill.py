"""Deface: fill the face compartments with tissue/background noise, embed the provenance code."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    File,
    TraitedSpec,
    traits,
)

from mideface_nipype.engine import fill
from mideface_nipype.interfaces._base import (
    StepInputSpec,
    StepInterface,
    out_path,
    step,
    write_json,
)
from mideface_nipype.utils import io


class _DefaceInputSpec(StepInputSpec):
    in_file = File(exists=True, mandatory=True, desc="volume to deface (3-D or 4-D)")
    face_mask = File(exists=True, mandatory=True, desc="face mask (0-4) on the same grid")
    seed = traits.Int(fill.DEFAULT_SEED, usedefault=True, desc="random seed of the noise fill")
    fill_const = traits.Tuple(
        traits.Float,
        traits.Float,
        desc="constant fill (inside, outside) in the image's real units instead of noise",
    )
    stat_frame = traits.Int(fill.STAT_FRAME, usedefault=True, desc="frame used for statistics")
    out_name = traits.Str(desc="output file name (default: defaced + the input's suffix)")


class _DefaceOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="defaced volume: input's grid, dtype, header and scaling")
    out_stats = File(exists=True, desc="JSON: compartment statistics, seconds")


class Deface(StepInterface):
    """Replace the face compartments with noise matched to tissue (1-2) and background (3-4)."""

    input_spec = _DefaceInputSpec
    output_spec = _DefaceOutputSpec

    def _run_interface(self, runtime):
        record: dict = {}
        with step("fill", record):
            img = io.load_volume(self.inputs.in_file)
            face_mask = np.asarray(nib.load(self.inputs.face_mask).dataobj)
            data = io.stored_data(img)
            if face_mask.shape != data.shape[:3]:
                raise ValueError(
                    f"face mask grid {face_mask.shape} differs from {self.inputs.in_file} "
                    f"{data.shape[:3]}; resample it first (ApplyFaceMask)"
                )
            out, stats = fill.deface(
                data,
                face_mask,
                seed=self.inputs.seed,
                fill_const=io.to_stored(img, self.inputs.fill_const)
                if self.inputs.fill_const
                else None,
                stat_frame=self.inputs.stat_frame,
            )
        record.update(stats.to_dict())
        record["code_location"] = fill.code_location(out.shape)
        _, suffix = io.derived_name_parts(Path(self.inputs.in_file).name)
        name = self.inputs.out_name or f"defaced{suffix}"
        self._results["out_file"] = out_path(runtime, name)
        io.save_atomic(io.like(img, out, descrip=io.defaced_descrip()), self._results["out_file"])
        self._results["out_stats"] = write_json(record, out_path(runtime, "fill.json"))
        return runtime
