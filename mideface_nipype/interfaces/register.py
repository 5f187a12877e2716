"""RegisterAtlas (ANTs affine, atlas -> subject) and ProjectSurface (atlas surface in subject)."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import File, TraitedSpec, traits

from mideface_nipype.engine import register
from mideface_nipype.engine.atlas import LABEL_FILE, SURFACE_FILE, load_atlas, save_surface
from mideface_nipype.interfaces._base import (
    AtlasInputSpec,
    StepInterface,
    load_mask,
    out_path,
    save_grid,
    save_matrix,
    step,
    write_json,
)
from mideface_nipype.utils import io
from mideface_nipype.utils.geometry import GridImage


class _RegisterAtlasInputSpec(AtlasInputSpec):
    in_file = File(exists=True, mandatory=True, desc="head MRI (frame 0 is used)")
    head_mask = File(exists=True, mandatory=True, desc="head mask of in_file")
    registration_mm = traits.Float(register.REGISTRATION_MM, usedefault=True, desc="grid (mm)")
    init_transform = File(exists=True, desc="4x4 RAS subject->atlas matrix to start from (text)")
    search_grid = traits.Bool(
        True, usedefault=True, desc="write search_grid (other contrasts are searched against it)"
    )


class _RegisterAtlasOutputSpec(TraitedSpec):
    transform = File(exists=True, desc="4x4 RAS matrix mapping subject mm to atlas (MNI) mm")
    itk_transform = File(exists=True, desc="the same as an ITK/ANTs affine (.mat)")
    out_stats = File(exists=True, desc="JSON: head-mask Dice after registration, seconds")
    registration_grid = File(exists=True, desc="the masked head and its mask on the 3 mm grid")
    search_grid = File(exists=True, desc="the same on the pose search's grid (if asked)")


class RegisterAtlas(StepInterface):
    """Affine registration of the atlas head to the subject (ANTs, robust rotation search)."""

    input_spec = _RegisterAtlasInputSpec
    output_spec = _RegisterAtlasOutputSpec

    def _run_interface(self, runtime):
        record: dict = {}
        with step("atlas registration", record):
            img = io.load_volume(self.inputs.in_file)
            head, _ = load_mask(self.inputs.head_mask)
            atlas = load_atlas(self.inputs.atlas_dir or None)
            init = (
                io.load_matrix(self.inputs.init_transform) if self.inputs.init_transform else None
            )
            subject = GridImage(io.first_frame(img), img.affine, head)
            # the search grid also after --init-reg when other contrasts are searched against it
            grids = register.head_grids(
                subject,
                self.inputs.registration_mm,
                search=init is None or self.inputs.search_grid,
            )
            matrix, dice = register.register_atlas(
                subject,
                atlas,
                registration_mm=self.inputs.registration_mm,
                initial=init,
                fixed_grids=grids,
            )
        record["head_dice"] = dice
        self._results["registration_grid"] = save_grid(
            grids.registration, runtime, "registration_grid.nii"
        )
        if self.inputs.search_grid:
            self._results["search_grid"] = save_grid(grids.search, runtime, "search_grid.nii")
        self._results["transform"] = save_matrix(matrix, out_path(runtime, "subject_to_atlas.txt"))
        self._results["itk_transform"] = str(
            register.ras_to_ants_transform(matrix, out_path(runtime, "subject_to_atlas.mat"))
        )
        self._results["out_stats"] = write_json(record, out_path(runtime, "registration.json"))
        return runtime


class _ProjectSurfaceInputSpec(AtlasInputSpec):
    transform = File(exists=True, mandatory=True, desc="4x4 RAS subject->atlas matrix")


class _ProjectSurfaceOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="atlas head surface in subject world mm (GIfTI)")
    label_file = File(exists=True, desc="its vertex labels and watermark (GIfTI, atlas order)")


class ProjectSurface(StepInterface):
    """Map the atlas head surface into the subject's world coordinates (mm)."""

    input_spec = _ProjectSurfaceInputSpec
    output_spec = _ProjectSurfaceOutputSpec

    def _run_interface(self, runtime):
        atlas = load_atlas(self.inputs.atlas_dir or None)
        vertices, faces, regions = register.project_surface(
            atlas, io.load_matrix(self.inputs.transform)
        )
        save_surface(Path(runtime.cwd), vertices, faces, regions, atlas.watermark)
        self._results["out_file"] = out_path(runtime, SURFACE_FILE)
        self._results["label_file"] = out_path(runtime, LABEL_FILE)
        return runtime
