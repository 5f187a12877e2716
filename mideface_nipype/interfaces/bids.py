"""WriteDerivatives: publish one session's defaced images and masks into a BIDS layout."""

from __future__ import annotations

from nipype.interfaces.base import (
    Directory,
    File,
    InputMultiObject,
    OutputMultiObject,
    TraitedSpec,
    traits,
)

from mideface_nipype.engine import fill
from mideface_nipype.interfaces._base import StepInputSpec, StepInterface
from mideface_nipype.utils import bids


class _WriteDerivativesInputSpec(StepInputSpec):
    bids_dir = Directory(exists=True, mandatory=True, desc="the raw BIDS dataset")
    output_dir = traits.Str(mandatory=True, desc="the derivative dataset")
    reference = traits.Str(mandatory=True, desc="the T1w, relative to bids_dir")
    others = traits.List(traits.Str, desc="the other images, relative to bids_dir")
    defaced = File(exists=True, mandatory=True, desc="the defaced T1w")
    face_mask = File(exists=True, mandatory=True, desc="face mask (0-4) of the T1w")
    exclusion_mask = File(exists=True, mandatory=True, desc="exclusion mask of the T1w")
    other_defaced = InputMultiObject(File(exists=True), desc="defaced other images, in order")
    other_face_masks = InputMultiObject(File(exists=True), desc="their face masks, in order")
    transform = File(exists=True, desc="4x4 RAS matrix, T1w mm -> atlas mm (text)")
    report = File(exists=True, desc="the session's report.html")
    pictures = InputMultiObject(File(exists=True), desc="QA pictures (--pics)")
    segmentation_report = File(exists=True, desc="the segmentation picture (PNG)")
    in_place = traits.Bool(False, usedefault=True, desc="overwrite the raw images")
    publish_reference = traits.Bool(
        True, usedefault=True, desc="write the T1w (False: it only gives the others' face mask)"
    )
    seed = traits.Int(fill.DEFAULT_SEED, usedefault=True, desc="seed, recorded in sidecars")


class _WriteDerivativesOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True), desc="every file written")


class WriteDerivatives(StepInterface):
    """Publish a session's results at their BIDS names with JSON sidecars, all or nothing."""

    input_spec = _WriteDerivativesInputSpec
    output_spec = _WriteDerivativesOutputSpec

    def _run_interface(self, runtime):
        self._results["out_files"] = bids.write_session_outputs(
            bids_dir=self.inputs.bids_dir,
            output_dir=self.inputs.output_dir,
            reference=self.inputs.reference,
            others=list(self.inputs.others),
            defaced=self.inputs.defaced,
            face_mask=self.inputs.face_mask,
            exclusion_mask=self.inputs.exclusion_mask,
            other_defaced=list(self.inputs.other_defaced or []),
            other_face_masks=list(self.inputs.other_face_masks or []),
            transform=self.inputs.transform or None,
            report_file=self.inputs.report or None,
            pictures=[
                *(self.inputs.pictures or []),
                *([self.inputs.segmentation_report] if self.inputs.segmentation_report else []),
            ],
            in_place=self.inputs.in_place,
            publish_reference=self.inputs.publish_reference,
            seed=self.inputs.seed,
        )
        return runtime
