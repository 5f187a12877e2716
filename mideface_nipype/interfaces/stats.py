"""CollectStats: merge the per-step JSON records into one ``stats.json``."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces.base import (
    File,
    InputMultiObject,
    TraitedSpec,
)

from mideface_nipype import __version__
from mideface_nipype.interfaces._base import StepInputSpec, StepInterface, out_path, write_json


class _CollectStatsInputSpec(StepInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="per-step JSON records")


class _CollectStatsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="stats.json: one section per step")


class CollectStats(StepInterface):
    """Merge step records (``head_mask.json`` -> section ``head_mask``) and total the seconds.

    Per-volume records (those naming an ``in_file``: one per other contrast) become lists.
    """

    input_spec = _CollectStatsInputSpec
    output_spec = _CollectStatsOutputSpec

    def _run_interface(self, runtime):
        merged: dict = {"mideface_nipype_version": __version__}
        total = 0.0
        for path in self.inputs.in_files:
            record = json.loads(Path(path).read_text())
            total += float(record.get("seconds", 0.0))
            key = Path(path).stem
            if "in_file" in record:
                merged.setdefault(key, []).append(record)
            else:
                merged[key] = record
        merged["seconds_total"] = round(total, 3)
        self._results["out_file"] = write_json(merged, out_path(runtime, "stats.json"))
        return runtime
