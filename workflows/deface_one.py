#!/usr/bin/env python
"""Recipe: deface one subject with the Nipype workflow (and its other contrasts, if given).

    python workflows/deface_one.py T1w.nii.gz OUT_DIR [--other T2w.nii.gz ...] [--plugin MultiProc]

The same graph the ``mideface`` command runs, driven from Python: build it with
``init_mideface_wf``, set ``inputnode``, run with any Nipype plugin, read ``outputnode``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mideface_nipype.workflows.base import init_mideface_wf, workflow_outputs


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

    wf = init_mideface_wf(name="deface_one", other_contrasts=[str(p.resolve()) for p in args.other])
    wf.inputs.inputnode.in_file = str(args.in_file.resolve())
    wf.base_dir = str((args.out_dir / "work").resolve())
    plugin_args = {"n_procs": args.nprocs} if args.plugin == "MultiProc" else {}
    outputs = workflow_outputs(wf, wf.run(plugin=args.plugin, plugin_args=plugin_args))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for key in ("out_file", "face_mask", "exclusion_mask", "stats"):
        shutil.copy(outputs[key], args.out_dir / Path(outputs[key]).name)
    for path in outputs.get("other_out_files") or []:
        shutil.copy(path, args.out_dir / Path(path).name)
    print(f"defaced: {args.out_dir}")


if __name__ == "__main__":
    main()
