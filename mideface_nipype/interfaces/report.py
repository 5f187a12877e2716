"""Pics (before/after pictures, dist-to-face check) and Report (report.html) interfaces."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    File,
    InputMultiObject,
    OutputMultiObject,
    TraitedSpec,
    isdefined,
    traits,
)

from mideface_nipype.interfaces._base import (
    StepInputSpec,
    StepInterface,
    out_path,
    step,
    write_json,
)
from mideface_nipype.reports import report
from mideface_nipype.reports.slices import save_png
from mideface_nipype.utils import io


class _PicsInputSpec(StepInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the original head MRI (frame 0 is used)")
    defaced_file = File(exists=True, mandatory=True, desc="the defaced volume, same grid")
    transform = File(exists=True, mandatory=True, desc="4x4 RAS subject->atlas matrix (text)")
    face_mask = File(exists=True, mandatory=True, desc="face mask (0-4) on the same grid")
    xmask = File(exists=True, desc="exclusion mask on the same grid (outlined in the slices)")


class _PicsOutputSpec(TraitedSpec):
    pictures = OutputMultiObject(File(exists=True), desc="the pictures, in report order")
    head_surface = File(exists=True, desc="skin surface of the original (GIfTI, subject mm)")
    defaced_surface = File(exists=True, desc="skin surface of the defaced volume (GIfTI)")
    dist_to_face = File(
        exists=True,
        desc="per vertex of head_surface: distance (mm) to the defaced skin, NaN outside the "
        "face labels (GIfTI)",
    )
    out_stats = File(exists=True, desc="JSON: dist-to-face areas, seconds")


class Pics(StepInterface):
    """Render the skin before and after defacing in the atlas pose; measure where it coincides.

    Writes ``face-before.png``, ``face-after.png`` (front, left, right, three-quarter),
    ``face-before+after.gif``, ``dist-to-face.png``, ``slices.png`` (compartments and the
    exclusion mask outlined), the two skin surfaces and the per-vertex distance, and the record
    ``pics.json`` (section ``pics`` of stats.json).
    """

    input_spec = _PicsInputSpec
    output_spec = _PicsOutputSpec

    def _run_interface(self, runtime):
        record: dict = {}
        with step("QA pictures", record):
            img = io.load_volume(self.inputs.in_file)
            defaced = io.load_volume(self.inputs.defaced_file)
            xmask = np.asarray(nib.load(self.inputs.xmask).dataobj) if self.inputs.xmask else None
            pics = report.qa_pictures(
                io.first_frame(img),
                io.first_frame(defaced),
                img.affine,
                io.load_matrix(self.inputs.transform),
                np.asarray(nib.load(self.inputs.face_mask).dataobj),
                xmask,
            )
            images = {
                "face-before.png": pics.face_before,
                "face-after.png": pics.face_after,
                "dist-to-face.png": pics.dist_to_face_rgb,
                "slices.png": pics.slices,
            }
            for name, image in images.items():
                save_png(image, out_path(runtime, name))
            report.save_gif(
                [pics.face_before, pics.face_after], out_path(runtime, "face-before+after.gif")
            )
            self._results["pictures"] = [out_path(runtime, name) for name in report.PICTURES]
            for key, name in (("head_surface", "head"), ("defaced_surface", "head.defaced")):
                mesh = getattr(pics, key)
                self._results[key] = str(
                    report.save_mesh(mesh, out_path(runtime, f"{name}.surf.gii"))
                )
            self._results["dist_to_face"] = str(
                report.save_vertex_values(pics.dist_mm, out_path(runtime, "dist-to-face.func.gii"))
            )
        record.update(pics.record)
        self._results["out_stats"] = write_json(record, out_path(runtime, "pics.json"))
        return runtime


class _ReportInputSpec(StepInputSpec):
    stats = File(exists=True, mandatory=True, desc="stats.json of the run")
    face_mask = File(exists=True, mandatory=True, desc="face mask (0-4): field-of-view check")
    in_file = traits.Str(mandatory=True, desc="the input's path (the report's title)")
    pictures = InputMultiObject(File(exists=True), desc="pictures to embed (from Pics)")
    options = traits.Dict(desc="the options of the run, shown in the report")
    methods = traits.Str(desc="the methods paragraph and its references (reports.methods)")


class _ReportOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="report.html: self-contained, opens offline")


class Report(StepInterface):
    """One HTML page per head: warnings, pictures, dist-to-face, timings, options, versions,
    every statistic. Pictures are embedded, so the file can be moved or mailed alone."""

    input_spec = _ReportInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        stats = json.loads(Path(self.inputs.stats).read_text())
        mask_img = nib.load(self.inputs.face_mask)
        warnings = report.qa_warnings(stats, np.asarray(mask_img.dataobj), mask_img.affine)
        self._results["out_file"] = str(
            report.write_report(
                out_path(runtime, "report.html"),
                title=Path(self.inputs.in_file).name,
                stats=stats,
                options=dict(self.inputs.options) if self.inputs.options else {},
                warnings=warnings,
                pictures=list(self.inputs.pictures) if self.inputs.pictures else [],
                methods=self.inputs.methods if isdefined(self.inputs.methods) else "",
            )
        )
        return runtime
