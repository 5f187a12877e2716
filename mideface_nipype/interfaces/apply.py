"""Coregister (another contrast -> the reference, rigid) and ApplyFaceMask (deface it)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    File,
    TraitedSpec,
    traits,
)

from mideface_nipype.engine import apply, fill, headmask, register
from mideface_nipype.interfaces._base import (
    StepInputSpec,
    StepInterface,
    load_grid,
    out_path,
    save_mask,
    save_matrix,
    step,
    write_json,
)
from mideface_nipype.utils import io
from mideface_nipype.utils.errors import RegistrationError


class _CoregisterInputSpec(StepInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the other contrast (frame 0 is used)")
    reference_grid = File(
        exists=True, mandatory=True, desc="the reference's registration grid (RegisterAtlas)"
    )
    reference_search_grid = File(
        exists=True, mandatory=True, desc="the reference's pose-search grid (RegisterAtlas)"
    )
    regheader = traits.Bool(
        False, usedefault=True, desc="the two share a scanner space: use the headers, no search"
    )


class _CoregisterOutputSpec(TraitedSpec):
    transform = File(exists=True, desc="4x4 RAS matrix mapping in_file mm to reference mm")
    itk_transform = File(exists=True, desc="the same as an ITK/ANTs affine (.mat)")
    out_stats = File(exists=True, desc="JSON: head-mask Dice, seconds")


class Coregister(StepInterface):
    """Rigid registration (ANTs, mutual information, pose search) of a contrast to the reference."""

    input_spec = _CoregisterInputSpec
    output_spec = _CoregisterOutputSpec

    def _run_interface(self, runtime):
        record: dict = {"in_file": self.inputs.in_file, "regheader": self.inputs.regheader}
        with step(f"coregister {Path(self.inputs.in_file).name}", record):
            if self.inputs.regheader:
                matrix = np.eye(4)
            else:
                img = io.load_volume(self.inputs.in_file)
                reference = register.HeadGrids(
                    load_grid(self.inputs.reference_grid),
                    load_grid(self.inputs.reference_search_grid),
                )
                try:  # name this contrast: the run's error line would name the reference
                    matrix, record["head_dice"] = register.coregister(img, reference)
                except RegistrationError as err:
                    raise RegistrationError(err.problem, path=self.inputs.in_file) from err
        self._results["transform"] = save_matrix(matrix, out_path(runtime, "to_reference.txt"))
        self._results["itk_transform"] = str(
            register.ras_to_ants_transform(matrix, out_path(runtime, "to_reference.mat"))
        )
        self._results["out_stats"] = write_json(record, out_path(runtime, "coregister.json"))
        return runtime


class _ApplyFaceMaskInputSpec(StepInputSpec):
    in_file = File(exists=True, mandatory=True, desc="volume to deface (3-D or 4-D)")
    face_mask = File(exists=True, mandatory=True, desc="face mask (0-4) made on the reference")
    xmask = File(exists=True, desc="exclusion mask on the face mask's grid")
    transform = File(exists=True, desc="4x4 RAS in_file mm -> face-mask mm (default: identity)")
    seed = traits.Int(fill.DEFAULT_SEED, usedefault=True, desc="random seed of the noise fill")
    fill_const = traits.Tuple(traits.Float, traits.Float, desc="constant fill (real units)")
    stat_frame = traits.Int(fill.STAT_FRAME, usedefault=True, desc="frame used for statistics")


class _ApplyFaceMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="defaced volume: the input's grid, dtype, header, scaling")
    face_mask = File(exists=True, desc="the face mask resampled onto in_file's grid")
    out_stats = File(exists=True, desc="JSON: this volume's compartment statistics, seconds")


class ApplyFaceMask(StepInterface):
    """Deface a volume with a face mask made on another contrast (statistics recomputed here)."""

    input_spec = _ApplyFaceMaskInputSpec
    output_spec = _ApplyFaceMaskOutputSpec

    def _run_interface(self, runtime):
        record: dict = {"in_file": self.inputs.in_file}
        with step(f"apply face mask to {Path(self.inputs.in_file).name}", record):
            img = io.load_volume(self.inputs.in_file)
            mask_img = nib.load(self.inputs.face_mask)
            face_mask = np.asarray(mask_img.dataobj)
            xmask = None
            if self.inputs.xmask:
                xmask = np.asarray(nib.load(self.inputs.xmask).dataobj)
            head = None
            if fill.is_shareable(face_mask):  # a published mask: split at this image's head
                head = np.asarray(headmask.head_mask(img).dataobj) > 0
            out, mask, stats = apply.apply_face_mask(
                io.stored_data(img),
                img.affine,
                face_mask,
                mask_img.affine,
                target_to_mask=io.load_matrix(self.inputs.transform)
                if self.inputs.transform
                else None,
                xmask=xmask,
                head=head,
                seed=self.inputs.seed,
                fill_const=io.to_stored(img, self.inputs.fill_const)
                if self.inputs.fill_const
                else None,
                stat_frame=self.inputs.stat_frame,
            )
        record.update(stats.to_dict())
        stem, suffix = io.derived_name_parts(Path(self.inputs.in_file).name)
        self._results["out_file"] = out_path(runtime, f"{stem}_defaced{suffix}")
        io.save_atomic(io.like(img, out, descrip=io.defaced_descrip()), self._results["out_file"])
        self._results["face_mask"] = save_mask(mask, img.affine, runtime, f"{stem}_facemask.nii.gz")
        self._results["out_stats"] = write_json(record, out_path(runtime, "apply.json"))
        return runtime
