"""``mideface-bids`` on a real (single-node) SLURM cluster: same bytes as MultiProc.

Start one with ``bash ../shared/tools/slurm/start_slurm.sh`` (as root; ``.ci/run`` does).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from bids_data import RUN_OPTIONS, SUBJECTS, reference_run, run_cli, tree


def _slurm_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "UP" not in ping.stdout:
        return f"slurmctld does not answer ({(ping.stdout + ping.stderr).strip()})"
    return None


PROBLEM = _slurm_problem()
if PROBLEM:
    pytest.skip(
        f"SLURM tests need a running cluster: {PROBLEM}; start one with "
        "`bash ../shared/tools/slurm/start_slurm.sh`",
        allow_module_level=True,
    )

#: The reference run's options without its plugin.
DEFACE_OPTIONS = RUN_OPTIONS[: RUN_OPTIONS.index("--plugin")]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.getbasetemp() / "bids_reference")


@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_slurm_run_matches_multiproc(plugin, reference, tmp_path):
    bids_dir, multiproc = reference
    out = tmp_path / "out"
    labels = ["--participant-label", *(subject for subject, _, _ in SUBJECTS)]
    run_cli(
        bids_dir,
        out,
        "participant",
        *labels,
        *DEFACE_OPTIONS,
        "--plugin",
        plugin,
        "-w",
        tmp_path / "w",
    )
    got, expected = tree(out), tree(multiproc)
    assert got.keys() == expected.keys()
    assert [name for name in got if got[name] != expected[name]] == []
    # the jobs really ran under SLURM, each in its own batch job
    logs = list((tmp_path / "w").rglob("slurm-*.out" if plugin == "SLURM" else "*.sh.o"))
    assert len(logs) >= 2 * 6
    if plugin == "SLURMGraph":  # run() returned after submitting: nothing may be left queued
        queue = subprocess.run(["squeue", "-h", "-o", "%k"], capture_output=True, text=True)
        assert "mideface-" not in queue.stdout
