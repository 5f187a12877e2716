#!/usr/bin/env python
"""Wall time and peak memory of ``mideface`` per head, each run as a whole process.

    python workflows/benchmark.py [--heads DIR] [--repeat N] [--out results.md]

Runs ``mideface --i HEAD --odir TMP`` for every head in ``../shared/data/heads`` (and, for the
1 mm 176x256x256 size class, the pydeface average head from ``../shared/data/atlas-sources``),
reports the median wall time over ``--repeat`` runs, the peak resident memory of the process and
the per-step seconds from ``stats.json``. Machines are noisy: compare medians, not single runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
STEPS = ("head_mask", "registration", "exclusion", "bracket", "fill")


def run_once(head: Path, extra: list[str]) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS in GB, stats.json) of one whole ``mideface`` process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mideface_nipype.cli", "--i", str(head), "--odir", tmp, *extra]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if status != 0:
            raise RuntimeError(f"mideface failed on {head} (status {status})")
        stats = json.loads((Path(tmp) / "stats.json").read_text())
    return wall, usage.ru_maxrss / 1024**2, stats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--heads", type=Path, default=SHARED / "heads")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("extra", nargs="*", help="extra mideface options (after --)")
    args = parser.parse_args()
    heads = sorted(args.heads.glob("*.nii*"))
    average = SHARED / "atlas-sources" / "pydeface_mean_reg2mean.nii.gz"
    if average.exists():
        heads.append(average)
    rows = [
        "| head | grid | wall s (median) | peak GB | " + " | ".join(STEPS) + " |",
        "|---|---|---|---|" + "---|" * len(STEPS),
    ]
    import nibabel as nib

    for head in heads:
        runs = [run_once(head, args.extra) for _ in range(args.repeat)]
        wall = statistics.median(r[0] for r in runs)
        peak = max(r[1] for r in runs)
        stats = runs[-1][2]
        steps = " | ".join(f"{stats.get(s, {}).get('seconds', float('nan')):.1f}" for s in STEPS)
        img = nib.load(head)
        zooms = "x".join(f"{z:.2g}" for z in img.header.get_zooms()[:3])
        grid = "x".join(str(n) for n in img.shape[:3]) + f" @ {zooms} mm"
        rows.append(f"| {head.name} | {grid} | {wall:.1f} | {peak:.2f} | {steps} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
