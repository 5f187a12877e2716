#!/usr/bin/env python
"""Recipe: deface a BIDS dataset on a SLURM cluster, one batch job per node.

    python workflows/run_dataset_slurm.py BIDS_DIR OUTPUT_DIR --work-dir /shared/scratch/work
        [--graph] [--sbatch-args "--partition=short --mem=4G"] [--participant-label 01 ...]

Run it on the login node. ``--work-dir`` must be on a file system the compute nodes share, and
they must see the same Python (Nipype writes batch scripts that call ``sys.executable``).

* ``SLURM`` (default): this process stays alive, submits each node when its inputs are ready
  and watches the queue (``squeue``); failed nodes are reported at the end.
* ``--graph`` (``SLURMGraph``): the whole graph is submitted at once with ``--dependency``
  chains and Nipype's ``run()`` returns right after submitting; this recipe then waits for the
  jobs (tagged with a ``--comment``) to leave the queue. Finished nodes are not resubmitted on a
  rerun (``dont_resubmit_completed_jobs``).

A single-node test cluster: ``bash ../shared/tools/slurm/start_slurm.sh`` (as root).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mideface_nipype.cli.mideface_bids import plugin_settings, wait_for_slurm_jobs
from mideface_nipype.utils import bids
from mideface_nipype.workflows.bids import init_bids_wf


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--work-dir", type=Path, required=True, help="on a shared file system")
    parser.add_argument("--participant-label", nargs="+")
    parser.add_argument("--graph", action="store_true", help="submit the whole graph at once")
    parser.add_argument("--sbatch-args", default="", help="extra sbatch options for every job")
    args = parser.parse_args()

    plugin = "SLURMGraph" if args.graph else "SLURM"
    # sets LOGNAME (Nipype's SLURM plugin needs it) and, for SLURMGraph, tags the jobs
    plugin_args, tag = plugin_settings(
        plugin, json.dumps({"sbatch_args": args.sbatch_args}), nprocs=1
    )
    sessions = bids.discover(args.bids_dir, args.participant_label)
    bids.write_dataset_description(args.bids_dir, args.output_dir)
    workflow = init_bids_wf(sessions, bids_dir=args.bids_dir, output_dir=args.output_dir)
    workflow.base_dir = str(args.work_dir.resolve())
    workflow.run(plugin=plugin, plugin_args=plugin_args)
    if tag:
        wait_for_slurm_jobs(tag)
    missing = [
        str(path)
        for session in sessions
        for path in bids.expected_outputs(session, args.bids_dir, args.output_dir, in_place=False)
        if not path.exists()
    ]
    print(f"{len(sessions)} session(s); missing outputs: {missing or 'none'}")


if __name__ == "__main__":
    main()
