#!/usr/bin/env python
"""Subjects per minute of ``mideface-bids`` on a synthetic dataset: Linear vs MultiProc.

    python workflows/benchmark_dataset.py [--subjects 4] [--nprocs 2] [--repeat 1] [--out FILE]
        [-- extra mideface-bids options, e.g. --no-samseg]

Builds a BIDS dataset from the real heads in ``../shared/data/heads`` (the IXI heads and the
dcm_qa head as T1w; each with a second contrast: the same head with inverted intensities, lying
10 degrees turned in the scanner, so it is registered and defaced with the T1w's mask), then runs
the whole ``mideface-bids`` command once per plugin with a fresh work folder and reports wall
time, subjects per minute and the CPU seconds of the process tree. Machines are noisy: compare
runs made side by side, and repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

from mideface_nipype.engine import headmask
from mideface_nipype.utils import geometry, io

HEADS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "heads"
#: Turn of the second contrast in the scanner (degrees about x), so coregistration has work.
SECOND_TURN_DEG = 10.0


def second_contrast(t1w: Path, out: Path) -> None:
    """Inverted intensities inside the head, the head turned about its centre (same voxels)."""
    img = nib.load(t1w)
    data = io.first_frame(img)
    head = np.asarray(headmask.head_mask(img).dataobj) > 0
    inverted = np.where(head, data[head].max() * 1.1 - data, 0).astype(np.float32)
    centre = geometry.apply_affine(img.affine, np.argwhere(head).mean(0)[None])[0]
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_euler("x", SECOND_TURN_DEG, degrees=True).as_matrix()
    turn[:3, 3] = centre - turn[:3, :3] @ centre
    nib.save(nib.Nifti1Image(inverted, turn @ img.affine), out)


def make_dataset(root: Path, n_subjects: int) -> None:
    heads = sorted(HEADS.glob("IXI*_ds.nii.gz")) + [HEADS / "dcmqa-xa30_T1w_2mm.nii.gz"]
    if n_subjects > len(heads):
        raise SystemExit(f"only {len(heads)} heads with a face in {HEADS}")
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "benchmark", "BIDSVersion": "1.9.0"})
    )
    for i, head in enumerate(heads[:n_subjects], 1):
        anat = root / f"sub-{i:02d}" / "anat"
        anat.mkdir(parents=True)
        shutil.copyfile(head, anat / f"sub-{i:02d}_T1w.nii.gz")
        second_contrast(head, anat / f"sub-{i:02d}_T2w.nii.gz")


def run_once(bids_dir: Path, tmp: Path, plugin: list[str], extra: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the process and its waited-for children) of one fresh run."""
    out, work = tmp / "out", tmp / "work"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-m", "mideface_nipype.cli.mideface_bids", str(bids_dir), str(out)]
    cmd += ["participant", *plugin, "-w", str(work), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("extra", nargs="*", help="extra mideface-bids options (after --)")
    args = parser.parse_args()
    plugins = {
        "Linear": ["--plugin", "Linear"],
        f"MultiProc n_procs={args.nprocs}": ["--plugin", "MultiProc", "--nprocs", str(args.nprocs)],
    }
    rows = [
        "| plugin | subjects | wall s (median) | subjects/min | CPU s |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_dataset(tmp / "bids", args.subjects)
        for label, plugin in plugins.items():
            runs = [run_once(tmp / "bids", tmp, plugin, args.extra) for _ in range(args.repeat)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            rate = args.subjects * 60.0 / wall
            rows.append(f"| {label} | {args.subjects} | {wall:.1f} | {rate:.2f} | {cpu:.1f} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    if args.out:
        io.write_text_atomic(table + "\n", args.out)


if __name__ == "__main__":
    main()
