#!/usr/bin/env python
"""Wall and CPU time and peak memory of ``mideface`` per head, side by side with a peer.

    python workflows/benchmark.py [--heads DIR] [--repeat N] [--cores N] [--out results.md]
                                  [--side-by-side] [-- extra mideface options]

For every head in ``../shared/data/heads`` (and, for the 1 mm 176x256x256 size class, the
pydeface average head from ``../shared/data/atlas-sources``) it runs, as whole processes pinned
to ``--cores`` CPUs (default one), ``mideface --i HEAD --odir TMP`` and the pydeface method
(``python -m mideface_nipype.evaluation.peers pydeface-ants``), alternating, ``--repeat`` times
each. It reports the median wall and CPU seconds, the peak resident memory, the ratio
ours/peer and the per-step seconds from ``stats.json``; then what one more contrast of the
same head costs (``--apply-to``, ``CONTRAST_PAIRS``). Machines are noisy: run it on an idle
machine, and compare ratios and medians, not single runs.

``--side-by-side`` measures instead how runs share the machine: per head, ``mideface --threads 1``
alone, then two of them started together (unpinned); it prints each step's seconds alone and the
slower of the pair's, and their ratio. Nodes that start more threads than they were given show
up here as ratios well above 1.
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


def start_process(cmd: list[str], cores: int | None) -> tuple[subprocess.Popen, float]:
    """Start a whole process, pinned to the first ``cores`` CPUs unless ``cores`` is None."""
    allowed = sorted(os.sched_getaffinity(0))[:cores] if cores else None
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=(lambda: os.sched_setaffinity(0, allowed)) if allowed else None,
    )
    return proc, start


def finish_process(proc: subprocess.Popen, start: float) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS GB) of a process started by ``start_process``."""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(proc.args)} failed: {proc.stderr.read().decode().strip()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024**2


def run_process(cmd: list[str], cores: int) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS GB) of one whole process pinned to the first ``cores`` CPUs."""
    return finish_process(*start_process(cmd, cores))


def ours_cmd(head: Path, out_dir: str, extra: list[str]) -> list[str]:
    cli = [sys.executable, "-m", "mideface_nipype.cli.mideface"]
    return [*cli, "--i", str(head), "--odir", out_dir, *extra]


def ours(head: Path, extra: list[str], cores: int) -> tuple[float, float, float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu, peak = run_process(ours_cmd(head, tmp, extra), cores)
        stats = json.loads((Path(tmp) / "stats.json").read_text())
    return wall, cpu, peak, stats


def step_seconds(out_dir: str, wall: float) -> dict[str, float]:
    """Seconds of each step (from the run's ``stats.json``) and of the whole process."""
    stats = json.loads((Path(out_dir) / "stats.json").read_text())
    return {**{s: stats.get(s, {}).get("seconds", float("nan")) for s in STEPS}, "process": wall}


def side_by_side(heads: list[Path], extra: list[str]) -> list[str]:
    """Each head alone, then two copies at once, each ``--threads 1``: seconds per step."""
    extra = [*extra, "--threads", "1"]
    names = [*STEPS, "process"]
    rows = [
        "| head | " + " | ".join(f"{s} alone / pair" for s in names) + " | worst ratio |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    print("\n".join(rows), flush=True)
    for head in heads:
        with tempfile.TemporaryDirectory() as tmp:
            alone_dir, pair_dirs = f"{tmp}/alone", [f"{tmp}/pair{k}" for k in (0, 1)]
            alone = step_seconds(alone_dir, run_process(ours_cmd(head, alone_dir, extra), 0)[0])
            started = [start_process(ours_cmd(head, d, extra), None) for d in pair_dirs]
            walls = [finish_process(*s)[0] for s in started]
            pairs = [step_seconds(d, w) for d, w in zip(pair_dirs, walls, strict=True)]
        pair = {s: max(p[s] for p in pairs) for s in names}
        worst = max(pair[s] / alone[s] for s in names if alone[s] > 0.5)
        cells = " | ".join(f"{alone[s]:.1f} / {pair[s]:.1f}" for s in names)
        rows.append(f"| {head.name} | {cells} | {worst:.2f} |")
        print(rows[-1], flush=True)
    return rows


#: Pairs (reference, other contrast of the same head) for the extra-contrast cost.
CONTRAST_PAIRS = (("chris_T1w.nii.gz", "chris_PD.nii.gz"),)


def extra_contrast(heads_dir: Path, extra: list[str], cores: int, repeat: int) -> list[str]:
    """What one more contrast costs (``--apply-to``): the whole process against the same run
    without it, and the coregistration and apply steps from ``stats.json``."""
    rows = [
        "",
        "| reference + other contrast | process without / with s | extra s | coregister s | "
        "apply s |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for ref_name, other_name in CONTRAST_PAIRS:
        ref, other = heads_dir / ref_name, heads_dir / other_name
        if not (ref.exists() and other.exists()):
            continue
        alone, both, coreg, apply = [], [], [], []
        for _ in range(repeat):
            alone.append(ours(ref, extra, cores)[0])
            wall, _, _, stats = ours(ref, [*extra, "--apply-to", str(other)], cores)
            both.append(wall)
            coreg.append(stats["coregister"][0]["seconds"])
            apply.append(stats["apply"][0]["seconds"])
        med = [statistics.median(v) for v in (alone, both, coreg, apply)]
        rows.append(
            f"| {ref_name} + {other_name} | {med[0]:.1f} / {med[1]:.1f} | {med[1] - med[0]:.1f} | "
            f"{med[2]:.1f} | {med[3]:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def peer(head: Path, cores: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "defaced.nii.gz")
        cmd = [sys.executable, "-m", "mideface_nipype.evaluation.peers", "pydeface-ants"]
        return run_process([*cmd, str(head), out], cores)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=Path, default=SHARED / "heads", help="folder of heads")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (median reported)")
    parser.add_argument("--cores", type=int, default=1, help="CPUs each process may use")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument(
        "--side-by-side", action="store_true", help="measure two runs at once against one alone"
    )
    parser.add_argument("extra", nargs="*", help="extra mideface options (after --)")
    args = parser.parse_args()
    heads = sorted(args.heads.glob("*.nii*"))
    average = SHARED / "atlas-sources" / "pydeface_mean_reg2mean.nii.gz"
    if average.exists():
        heads.append(average)
    if args.side_by_side:
        rows = side_by_side(heads, args.extra)
        if args.out:
            args.out.write_text("\n".join(rows) + "\n")
        return
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
    rows += extra_contrast(args.heads, args.extra, args.cores, args.repeat)
    if args.out:
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
