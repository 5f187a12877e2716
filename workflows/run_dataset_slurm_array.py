#!/usr/bin/env python
"""Recipe: deface a BIDS dataset on SLURM, one participant per array task (as fMRIPrep does).

    python workflows/run_dataset_slurm_array.py BIDS_DIR OUTPUT_DIR --work-dir /shared/scratch/work
        [--cpus-per-task 1] [--sbatch-args "--partition=short --mem=4G"] [--wait]
        [-- MIDEFACE-BIDS OPTIONS, e.g. --samseg --seed 7]

Run it on the login node. It lists the participants to deface, writes the derivative dataset's
description once, then submits ONE ``sbatch --array=0-(N-1)`` job. Each task runs
``mideface-bids BIDS_DIR OUTPUT_DIR participant`` without ``--participant-label``: mideface-bids
reads ``SLURM_ARRAY_TASK_ID`` and defaces the participant at that index of the sorted list (the
list printed here), running that participant's graph inside the task (Linear with one CPU,
MultiProc with more), so Python and ANTs start once per participant instead of once per node.
The tasks write into the same OUTPUT_DIR side by side (each locks only its ``sub-<label>``) and
keep their Nipype work folders apart (WORK_DIR/task-<index>), so a failed task is simply
resubmitted (``sbatch --array=<index> WORK_DIR/mideface_array.sbatch``) and resumes.

``--work-dir`` and OUTPUT_DIR must be on a file system the compute nodes share, and the nodes
must see the same Python (the batch script calls this one). Each task's log
(WORK_DIR/logs/array_<job>_<index>.out) ends with the CPU time it used (bash ``times``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from mideface_nipype.cli.mideface_bids import array_participants
from mideface_nipype.utils import bids

SCRIPT_NAME = "mideface_array.sbatch"


def batch_script(
    bids_dir: Path, output_dir: Path, work_dir: Path, n_tasks: int, cpus: int, options: list[str]
) -> str:
    """The sbatch script of the array: task i defaces the i-th participant."""
    plugin = (
        ["--plugin", "Linear"] if cpus == 1 else ["--plugin", "MultiProc", "--nprocs", str(cpus)]
    )
    command = [
        sys.executable,
        "-m",
        "mideface_nipype.cli.mideface_bids",
        str(bids_dir),
        str(output_dir),
    ]
    command += ["participant", *plugin, *options]
    return "\n".join(
        [
            "#!/bin/bash",
            "#SBATCH --job-name=mideface",
            f"#SBATCH --array=0-{n_tasks - 1}",
            f"#SBATCH --cpus-per-task={cpus}",
            f"#SBATCH --output={work_dir}/logs/array_%A_%a.out",
            "# the CPU seconds (user, system) of this task's processes, at the end of its log",
            "trap 'echo \"cpu seconds of this task (user sys):\"; times' EXIT",
            f'{shlex.join(command)} --work-dir "{work_dir}/task-$SLURM_ARRAY_TASK_ID"',
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--work-dir", type=Path, required=True, help="on a shared file system")
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--sbatch-args", default="", help="extra sbatch options for the array")
    parser.add_argument("--wait", action="store_true", help="return when every task has ended")
    parser.add_argument("--bids-filter-file", type=Path, help="as mideface-bids (passed on)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, options = parser.parse_args(argv[:split]), argv[split + 1 :]  # after --: mideface-bids

    bids_dir, output_dir = args.bids_dir.resolve(), args.output_dir.resolve()
    work_dir = args.work_dir.resolve()
    participants = array_participants(bids_dir, args.bids_filter_file)
    if args.bids_filter_file:  # the tasks must count the same participants
        options += ["--bids-filter-file", str(args.bids_filter_file.resolve())]
    for index, label in enumerate(participants):
        print(f"task {index}: sub-{label}")
    # written once here: the tasks then find it in place instead of writing it side by side
    bids.write_dataset_description(bids_dir, output_dir)
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    script = work_dir / SCRIPT_NAME
    script.write_text(
        batch_script(bids_dir, output_dir, work_dir, len(participants), args.cpus_per_task, options)
    )
    sbatch = ["sbatch", "--parsable", *shlex.split(args.sbatch_args)]
    if args.wait:
        sbatch.append("--wait")
    proc = subprocess.run([*sbatch, str(script)], capture_output=True, text=True)
    job = proc.stdout.strip().split(";")[0]
    print(f"array job {job or '?'}: {len(participants)} task(s), logs in {work_dir / 'logs'}")
    if proc.returncode != 0:
        sys.exit(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")


if __name__ == "__main__":
    main()
