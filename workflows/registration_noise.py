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
from mideface_nipype.utils import io
from mideface_nipype.utils.errors import OutputError
from mideface_nipype.utils.geometry import GridImage

HEADS = Path(__file__).resolve().parents[2] / "shared" / "data" / "heads"


def load_subject(path: Path) -> GridImage:
    """A head as ``register_atlas`` reads it: its first frame with its head mask."""
    img = nib.load(path)
    return GridImage(io.first_frame(img), img.affine, np.asarray(head_mask(img).dataobj) > 0)


def register_head(subject: GridImage, atlas, seed: int) -> tuple[np.ndarray, float]:
    """The subject->atlas matrix with ANTs seed ``seed``, and the seconds it took."""
    default_seed, register.ANTS_SEED = register.ANTS_SEED, seed
    try:
        start = time.perf_counter()
        matrix, _ = register.register_atlas(subject, atlas)
        return matrix, time.perf_counter() - start
    finally:
        register.ANTS_SEED = default_seed


def face_vertices(atlas, face: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The face labels' vertices (mm) placed in the subject by a subject->atlas matrix."""
    return register.project_surface(atlas, matrix)[0][face]


def distance_cell(placed: np.ndarray, other: np.ndarray) -> str:
    """'largest / mean' distance (mm) between two placements of the same face vertices."""
    dist = np.linalg.norm(placed - other, axis=1)
    return f"{dist.max():.2f} / {dist.mean():.2f}"


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
    if args.save:
        if args.save.suffix != ".npz":
            parser.error(f"{args.save}: name it .npz (numpy would add that suffix)")
        try:  # never onto a file this run reads (a head, or the matrices it compares with)
            io.Publisher([*heads, *filter(None, [args.against])]).refuse_reads(args.save)
        except OutputError as err:
            parser.error(str(err))
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
        subject = load_subject(path)
        matrix, seconds = register_head(subject, atlas, register.ANTS_SEED)
        saved[path.name] = matrix
        others = [register_head(subject, atlas, seed)[0] for seed in args.seeds]
        if other:
            others.append(other.get(path.name))
        placed = face_vertices(atlas, face, matrix)
        cells = [path.name, f"{seconds:.1f}"] + [
            "-" if moved is None else distance_cell(placed, face_vertices(atlas, face, moved))
            for moved in others
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.save:
        with io.atomic_path(args.save, suffix=".npz") as tmp:
            np.savez(tmp, **saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
