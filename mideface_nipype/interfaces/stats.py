"""CollectStats: merge the per-step JSON records into one ``stats.json``."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces.base import File, InputMultiObject, TraitedSpec, isdefined

from mideface_nipype.interfaces._base import StepInputSpec, StepInterface, out_path, write_json
from mideface_nipype.reports.report import PER_IMAGE_SECTIONS, STATS_SECTIONS, collect_stats


class _CollectStatsInputSpec(StepInputSpec):
    """One input per section of ``stats.json`` (``report.STATS_SECTIONS``), added below."""


for _section, _what in STATS_SECTIONS.items():
    _CollectStatsInputSpec.add_class_trait(
        _section,
        InputMultiObject(File(exists=True), desc=f"JSON records of {_what}")
        if _section in PER_IMAGE_SECTIONS
        else File(exists=True, desc=f"JSON record of {_what}"),
    )


class _CollectStatsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="stats.json: one section per step")


class CollectStats(StepInterface):
    """Merge the step records, each given at the input of its section, and total the seconds."""

    input_spec = _CollectStatsInputSpec
    output_spec = _CollectStatsOutputSpec

    def _run_interface(self, runtime):
        records = {}
        for section in STATS_SECTIONS:
            given = getattr(self.inputs, section)
            if isdefined(given):
                if section in PER_IMAGE_SECTIONS:
                    records[section] = [json.loads(Path(p).read_text()) for p in given]
                else:
                    records[section] = json.loads(Path(given).read_text())
        merged = collect_stats(records)
        self._results["out_file"] = write_json(merged, out_path(runtime, "stats.json"))
        return runtime
