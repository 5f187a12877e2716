#!/usr/bin/env python
"""Recipe: deface one subject with the Nipype workflow (and its other contrasts, if given).

    python workflows/deface_one.py T1w.nii.gz OUT_DIR [--other T2w.nii.gz ...] [--plugin MultiProc]

The same graph the ``mideface`` command runs, driven from Python: name the outputs with
``odir_outputs`` (``mideface --odir``'s names), build the graph with ``init_mideface_wf``, run it
with any Nipype plugin; its last node publishes the outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mideface_nipype.engine.exclusion import DEFAULT_XMASK_SOURCE
from mideface_nipype.utils.io import split_suffix
from mideface_nipype.workflows.base import init_mideface_wf
from mideface_nipype.workflows.outputs import DEFACED_FILE, odir_outputs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("in_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--other", nargs="*", default=[], type=Path, help="other contrasts")
    parser.add_argument("--plugin", default="Linear", help="Linear, MultiProc, SLURM, ...")
    parser.add_argument("--nprocs", type=int, default=2)
    args = parser.parse_args()

    suffix = split_suffix(args.in_file)[1]
    outputs = odir_outputs(
        args.in_file,
        out_file=args.out_dir / DEFACED_FILE.format(s=suffix),
        odir=args.out_dir,
        suffix=suffix,
        other_files=args.other,
        segmentation=DEFAULT_XMASK_SOURCE == "segment",
        reads=[args.in_file, *args.other],
    )
    wf = init_mideface_wf(
        name="deface_one",
        in_file=args.in_file.resolve(),
        other_contrasts=[str(p.resolve()) for p in args.other],
        outputs=outputs,
    )
    wf.base_dir = str((args.out_dir / "work").resolve())
    plugin_args = {"n_procs": args.nprocs} if args.plugin == "MultiProc" else {}
    wf.run(plugin=args.plugin, plugin_args=plugin_args)
    print(f"defaced: {args.out_dir}")


if __name__ == "__main__":
    main()
