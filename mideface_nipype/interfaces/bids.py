"""ReplaceRaw: in place, put a session's defaced images over the raw ones (after Publish)."""

from __future__ import annotations

from nipype.interfaces.base import (
    Directory,
    File,
    InputMultiObject,
    OutputMultiObject,
    TraitedSpec,
    isdefined,
    traits,
)

from mideface_nipype.interfaces._base import StepInputSpec, StepInterface
from mideface_nipype.utils import bids


class _ReplaceRawInputSpec(StepInputSpec):
    bids_dir = Directory(exists=True, mandatory=True, desc="the raw BIDS dataset")
    output_dir = traits.Str(mandatory=True, desc="the derivative dataset (keeps the originals)")
    images = traits.List(traits.Str, mandatory=True, desc="the raw images, relative to bids_dir")
    reference_defaced = File(exists=True, desc="the defaced reference (if it is in images)")
    other_defaced = InputMultiObject(File(exists=True), desc="the defaced other images, in order")
    published = traits.List(traits.Str, desc="the session's derivatives (written before)")


class _ReplaceRawOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(traits.Str, desc="the raw images replaced")


class ReplaceRaw(StepInterface):
    """Replace each raw image by its defaced one, its checksum recorded in the manifest first
    (``bids.replace_raw``); runs after the session's ``Publish``, so last."""

    input_spec = _ReplaceRawInputSpec
    output_spec = _ReplaceRawOutputSpec

    def _run_interface(self, runtime):
        defaced = (
            [self.inputs.reference_defaced] if isdefined(self.inputs.reference_defaced) else []
        )
        defaced += list(self.inputs.other_defaced) if isdefined(self.inputs.other_defaced) else []
        self._results["out_files"] = [
            str(bids.replace_raw(self.inputs.bids_dir, self.inputs.output_dir, rel, image))
            for rel, image in zip(self.inputs.images, defaced, strict=True)
        ]
        return runtime
