#!/usr/bin/env python
"""How far the atlas face moves between registrations of the same head.

    python workflows/registration_noise.py [--heads DIR] [--seeds 2 3] [--save FILE]
                                           [--against FILE]

Each T1w head is registered to the atlas (``register.register_atlas``, the engine's defaults)
with ANTs' random seed (``register.ANTS_SEED``) and then with each of ``--seeds``; the face
labels' vertices are projected through each matrix (``register.project_surface``) and the
largest and mean distance (mm) from the default seed's face are printed per head: the noise of
the registration itself (ANTs samples the image at jittered points). ``--save`` keeps the
default seed's matrices; ``--against`` prints, besides, the face's distance from matrices saved
by another version of the code. A change of the registration is the same result when it moves
the face no more than another seed does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from mideface_nipype.engine import register
from mideface_nipype.engine.atlas import load_atlas
from mideface_nipype.engine.bracket import FACE_LABEL_NAMES
from mideface_nipype.engine.headmask import head_mask
from mideface_nipype.utils.geometry import GridImage
from mideface_nipype.utils.io import first_frame

HEADS = Path(__file__).resolve().parents[2] / "shared" / "data" / "heads"


def register_head(path: Path, atlas, seed: int) -> tuple[np.ndarray, float]:
    """The subject->atlas matrix with ANTs seed ``seed``, and the seconds it took."""
    img = nib.load(path)
    head = np.asarray(head_mask(img).dataobj) > 0
    default_seed, register.ANTS_SEED = register.ANTS_SEED, seed
    try:
        start = time.perf_counter()
        matrix, _ = register.register_atlas(GridImage(first_frame(img), img.affine, head), atlas)
        return matrix, time.perf_counter() - start
    finally:
        register.ANTS_SEED = default_seed


def face_distance_mm(atlas, face: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Largest and mean distance (mm) between the face vertices placed by matrices a and b."""
    va, vb = (register.project_surface(atlas, m)[0][face] for m in (a, b))
    dist = np.linalg.norm(va - vb, axis=1)
    return float(dist.max()), float(dist.mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=Path, default=HEADS, help="folder of *T1*.nii.gz heads")
    parser.add_argument("--seeds", type=int, nargs="*", default=[2, 3], help="other ANTs seeds")
    parser.add_argument("--save", type=Path, help="write the default seed's matrices (.npz)")
    parser.add_argument("--against", type=Path, help="matrices saved by another code version")
    args = parser.parse_args(argv)
    heads = sorted(args.heads.glob("*T1*.nii.gz"))
    if not heads:
        parser.error(f"{args.heads}: no *T1*.nii.gz heads")
    if args.against and not args.against.is_file():
        parser.error(f"{args.against}: file not found")
    other = dict(np.load(args.against)) if args.against else {}
    atlas = load_atlas()
    face = atlas.in_labels(FACE_LABEL_NAMES)
    header = ["head", "seconds"] + [f"seed {s}: max / mean mm" for s in args.seeds]
    if other:
        header.append(f"{args.against.name}: max / mean mm")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    saved = {}
    for path in heads:
        matrix, seconds = register_head(path, atlas, register.ANTS_SEED)
        saved[path.name] = matrix
        others = [register_head(path, atlas, seed)[0] for seed in args.seeds]
        if other:
            others.append(other.get(path.name))
        cells = [path.name, f"{seconds:.1f}"]
        for moved in others:
            cells.append(
                "-"
                if moved is None
                else "{:.2f} / {:.2f}".format(*face_distance_mm(atlas, face, matrix, moved))
            )
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.save:
        np.savez(args.save, **saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
