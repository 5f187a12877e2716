#!/usr/bin/env python
"""Wall and CPU time and peak memory of ``mideface`` per head, side by side with a peer.

    python workflows/benchmark.py [--heads DIR] [--repeat N] [--cores N] [--out results.md]
                                  [-- extra mideface options]

For every head in ``../shared/data/heads`` (and, for the 1 mm 176x256x256 size class, the
pydeface average head from ``../shared/data/atlas-sources``) it runs, as whole processes pinned
to ``--cores`` CPUs (default one), ``mideface --i HEAD --odir TMP`` and the pydeface method
(``python -m mideface_nipype.evaluate_peers pydeface-ants``), alternating, ``--repeat`` times
each. It reports the median wall and CPU seconds, the peak resident memory, the ratio
ours/peer and the per-step seconds from ``stats.json``. Machines are noisy: run it on an idle
machine, and compare ratios and medians, not single runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
STEPS = ("head_mask", "registration", "exclusion", "bracket", "fill")


def run_process(cmd: list[str], cores: int) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS GB) of one whole process pinned to the first ``cores`` CPUs."""
    allowed = sorted(os.sched_getaffinity(0))[:cores]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.sched_setaffinity(0, allowed),
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode().strip()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024**2


def ours(head: Path, extra: list[str], cores: int) -> tuple[float, float, float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mideface_nipype.cli", "--i", str(head), "--odir", tmp]
        wall, cpu, peak = run_process([*cmd, *extra], cores)
        stats = json.loads((Path(tmp) / "stats.json").read_text())
    return wall, cpu, peak, stats


def peer(head: Path, cores: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "defaced.nii.gz")
        cmd = [sys.executable, "-m", "mideface_nipype.evaluate_peers", "pydeface-ants"]
        return run_process([*cmd, str(head), out], cores)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=Path, default=SHARED / "heads", help="folder of heads")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (median reported)")
    parser.add_argument("--cores", type=int, default=1, help="CPUs each process may use")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("extra", nargs="*", help="extra mideface options (after --)")
    args = parser.parse_args()
    heads = sorted(args.heads.glob("*.nii*"))
    average = SHARED / "atlas-sources" / "pydeface_mean_reg2mean.nii.gz"
    if average.exists():
        heads.append(average)
    import nibabel as nib

    rows = [
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.cores} per process, median of {args.repeat}",
        "",
        "| head | grid | ours wall s | ours CPU s | ours GB | peer wall s | peer CPU s | "
        "ratio wall | ratio CPU | " + " | ".join(STEPS) + " |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(STEPS),
    ]
    print("\n".join(rows), flush=True)
    for head in heads:
        mine, theirs = [], []
        for _ in range(args.repeat):  # alternate, so both meet the same machine
            mine.append(ours(head, args.extra, args.cores))
            theirs.append(peer(head, args.cores))
        wall, cpu = (statistics.median(r[k] for r in mine) for k in (0, 1))
        peak = max(r[2] for r in mine)
        p_wall, p_cpu = (statistics.median(r[k] for r in theirs) for k in (0, 1))
        stats = mine[-1][3]
        steps = " | ".join(f"{stats.get(s, {}).get('seconds', float('nan')):.1f}" for s in STEPS)
        img = nib.load(head)
        zooms = "x".join(f"{z:.2g}" for z in img.header.get_zooms()[:3])
        grid = "x".join(str(n) for n in img.shape[:3]) + f" @ {zooms} mm"
        rows.append(
            f"| {head.name} | {grid} | {wall:.1f} | {cpu:.1f} | {peak:.2f} | {p_wall:.1f} | "
            f"{p_cpu:.1f} | {wall / p_wall:.2f} | {cpu / p_cpu:.2f} | {steps} |"
        )
        print(rows[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
