#!/usr/bin/env python
"""Recipe: deface a whole BIDS dataset on this machine, several subjects at once (MultiProc).

    python workflows/run_dataset_multiproc.py BIDS_DIR OUTPUT_DIR [--nprocs 2] [--work-dir work]
        [--participant-label 01 02 ...]

What ``mideface-bids BIDS_DIR OUTPUT_DIR participant --plugin MultiProc`` does, in Python:
``bids.discover`` lists the sessions (a T1w and the other anatomicals of each), ``init_bids_wf``
puts one ``init_mideface_wf`` per session side by side, each followed by a ``derivatives`` node
that writes the BIDS-derivative files atomically, and MultiProc runs up to ``n_procs`` nodes at a
time across all subjects. Rerun with the same ``--work-dir`` after a crash: finished nodes are
reused (Nipype's hashes), only the rest runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mideface_nipype.utils import bids
from mideface_nipype.workflows.bids import init_bids_wf


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--participant-label", nargs="+")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("work"))
    args = parser.parse_args()

    sessions = bids.discover(args.bids_dir, args.participant_label)
    bids.write_dataset_description(args.bids_dir, args.output_dir)
    workflow = init_bids_wf(sessions, bids_dir=args.bids_dir, output_dir=args.output_dir)
    workflow.base_dir = str(args.work_dir.resolve())
    workflow.run(plugin="MultiProc", plugin_args={"n_procs": args.nprocs})
    print(f"{len(sessions)} session(s) defaced into {args.output_dir}")


if __name__ == "__main__":
    main()
