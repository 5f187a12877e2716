"""``mideface-bids`` on a real (single-node) SLURM cluster: same bytes as MultiProc.

Per node (the SLURM and SLURMGraph plugins) and one participant per array task
(``workflows/run_dataset_slurm_array.py``). Start a cluster with
``bash ../shared/tools/slurm/start_slurm.sh`` (as root; ``.ci/run`` does); without one the
cluster tests skip, saying why, and only the array task's participant choice is tested.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bids_data import RUN_OPTIONS, SUBJECTS, reference_run, run_cli, tree
from conftest import FACE_HEADS, HEADS_DIR, unshared_subprocesses

from mideface_nipype.cli import mideface_bids as bids_cli
from mideface_nipype.utils import io

ARRAY_RECIPE = Path(__file__).resolve().parents[1] / "workflows" / "run_dataset_slurm_array.py"
#: The array test's dataset: one real T1w head per participant (two participants, two tasks).
ARRAY_HEADS = FACE_HEADS[:2]
#: Largest ratio of the array's CPU seconds to MultiProc's for the same participants.
MAX_ARRAY_CPU_RATIO = 1.15


def _slurm_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "UP" not in ping.stdout:
        return f"slurmctld does not answer ({(ping.stdout + ping.stderr).strip()})"
    return None


PROBLEM = _slurm_problem()
needs_slurm = pytest.mark.skipif(
    PROBLEM is not None,
    reason=f"SLURM tests need a running cluster: {PROBLEM}; start one with "
    "`bash ../shared/tools/slurm/start_slurm.sh`",
)

#: The reference run's options without its plugin.
DEFACE_OPTIONS = RUN_OPTIONS[: RUN_OPTIONS.index("--plugin")]


def make_participants(root: Path, heads: list[str]) -> Path:
    """A BIDS dataset with one T1w per participant, ``sub-01`` .. in the order of ``heads``."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "array heads", "BIDSVersion": "1.9.0"})
    )
    for index, head in enumerate(heads, start=1):
        anat = root / f"sub-{index:02d}" / "anat"
        anat.mkdir(parents=True)
        shutil.copyfile(HEADS_DIR / head, anat / f"sub-{index:02d}_T1w.nii.gz")
    return root


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _times_cpu_s(log: str) -> float:
    """CPU seconds of a task's processes from the bash ``times`` lines that end its log."""
    *_, children = re.findall(r"(\d+)m([\d.]+)s (\d+)m([\d.]+)s", log)
    minutes_user, user, minutes_sys, system = (float(v) for v in children)
    return 60 * (minutes_user + minutes_sys) + user + system


# ---------------------------------------------------------------------------- array task choice


def _task_args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"participant_label": None, "bids_filter_file": None, **kwargs})


def test_array_task_picks_its_participant_and_locks_only_it(tmp_path, monkeypatch):
    bids_dir = make_participants(tmp_path / "bids", FACE_HEADS[:3])
    out = tmp_path / "out"
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert bids_cli.slurm_array_task(_task_args(), bids_dir, out) == (None, {out: "output folder"})
    assert bids_cli.array_participants(bids_dir) == ["01", "02", "03"]
    for index, label in enumerate(["01", "02", "03"]):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(index))
        labels, locks = bids_cli.slurm_array_task(_task_args(), bids_dir, out)
        assert labels == [label] and list(locks) == [out / f"sub-{label}"]
    # labels given: kept, each locked on its own (tasks of one array write side by side)
    labels, locks = bids_cli.slurm_array_task(_task_args(participant_label=["03"]), bids_dir, out)
    assert labels == ["03"] and list(locks) == [out / "sub-03"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with pytest.raises(io.InputError, match=r"SLURM_ARRAY_TASK_ID=3 .* 3 participant.*0-2"):
        bids_cli.slurm_array_task(_task_args(), bids_dir, out)


# ---------------------------------------------------------------------------- on the cluster


@pytest.fixture(scope="session")
def reference():
    _, bids_dir, multiproc = reference_run()
    return bids_dir, multiproc


@needs_slurm
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


@pytest.fixture(scope="module")
def array_dataset(tmp_path_factory) -> tuple[Path, Path, float]:
    """(BIDS dir, its MultiProc derivatives, the CPU seconds that run used)."""
    base = tmp_path_factory.mktemp("array")
    bids_dir = make_participants(base / "bids", ARRAY_HEADS)
    before = _children_cpu_s()
    options = [*DEFACE_OPTIONS, "--plugin", "MultiProc", "--nprocs", "2", "-w", base / "w"]
    with unshared_subprocesses():  # its CPU seconds are compared with the array's
        run_cli(bids_dir, base / "multiproc", "participant", *options)
    return bids_dir, base / "multiproc", _children_cpu_s() - before


@needs_slurm
@pytest.mark.slow
def test_slurm_array_one_participant_per_task(array_dataset, tmp_path):
    """The array recipe: same bytes as MultiProc, and no more than 15 % more CPU."""
    bids_dir, multiproc, multiproc_cpu_s = array_dataset
    out, work = tmp_path / "out", tmp_path / "w"
    cmd = [sys.executable, ARRAY_RECIPE, bids_dir, out, "--work-dir", work, "--wait", "--"]
    with unshared_subprocesses():  # every registration of both runs is counted
        proc = subprocess.run(
            [str(c) for c in [*cmd, *DEFACE_OPTIONS]], capture_output=True, text=True
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got, expected = tree(out), tree(multiproc)
    assert got.keys() == expected.keys()
    assert [name for name in got if got[name] != expected[name]] == []
    # one task per participant, each with its own work folder holding only its participant
    logs = sorted((work / "logs").glob("array_*.out"))
    assert len(logs) == len(ARRAY_HEADS)
    for index in range(len(ARRAY_HEADS)):
        nodes = {p.name for p in (work / f"task-{index}").rglob("*") if p.is_dir()}
        subjects = {m for n in nodes for m in re.findall(r"sub_(\d\d)", n)}
        assert subjects == {f"{index + 1:02d}"}, nodes
    array_cpu_s = sum(_times_cpu_s(log.read_text()) for log in logs)
    print(
        f"CPU seconds per participant: MultiProc {multiproc_cpu_s / len(ARRAY_HEADS):.1f}, "
        f"SLURM array {array_cpu_s / len(ARRAY_HEADS):.1f}"
    )
    assert array_cpu_s <= MAX_ARRAY_CPU_RATIO * multiproc_cpu_s
