"""The face atlas in MNI152 (ICBM 2009) space: average head, tissue priors, head surface, labels.

The files are built by ``atlas/build_atlas.py`` and shipped as the package data
``mideface_nipype.atlas_data``; ``load_atlas()`` reads them once per process.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import trimesh

from mideface_nipype.utils.geometry import GridImage

#: Tissue classes of the priors, in the order of the 4th axis of ``priors.nii.gz``.
CLASSES = ("air", "soft", "bone", "csf", "gm", "wm", "eyes")
#: Surface regions; value i + 1 in the label file is LABELS[i], 0 is unlabelled.
LABELS = (
    "lower-face",
    "upper-face",
    "nose",
    "eyes",
    "ear-left",
    "ear-right",
    "forehead",
    "back-of-head",
)
#: Grid spacing of the atlas head and priors.
PRIOR_MM = 2.0

HEAD_FILE = "head.nii.gz"
HEADMASK_FILE = "headmask.nii.gz"
PRIORS_FILE = "priors.nii.gz"
SURFACE_FILE = "head.surf.gii"
LABEL_FILE = "head.label.gii"
META_FILE = "atlas.json"


@dataclass(frozen=True)
class Atlas:
    """Everything the engine needs from the atlas, in MNI mm."""

    path: Path
    head: nib.Nifti1Image
    headmask: nib.Nifti1Image
    priors: dict[str, nib.Nifti1Image]
    surface: trimesh.Trimesh
    labels: dict[str, np.ndarray]
    watermark: np.ndarray
    meta: dict = field(default_factory=dict)

    def head_image(self) -> GridImage:
        """The average head (float32) with its grid and head mask (``register.atlas_head`` is the
        part that registration sees)."""
        return GridImage(
            np.asarray(self.head.dataobj, dtype=np.float32),
            self.head.affine,
            np.asarray(self.headmask.dataobj) > 0,
        )

    def in_labels(self, names: Iterable[str]) -> np.ndarray:
        """Which surface vertices carry one of the labels ``names`` (bool per vertex)."""
        inside = np.zeros(len(self.surface.vertices), dtype=bool)
        for name in names:
            inside[self.labels[name]] = True
        return inside


def atlas_dir() -> Path:
    """Folder of the installed atlas files (package data, also in a non-editable install)."""
    return Path(str(resources.files("mideface_nipype.atlas_data")))


def save_surface(
    out: Path, vertices: np.ndarray, faces: np.ndarray, regions: np.ndarray, watermark: np.ndarray
) -> None:
    """Write the head surface and its labels as GIfTI (viewable in any surface viewer)."""
    surf = nib.gifti.GiftiImage(
        darrays=[
            nib.gifti.GiftiDataArray(
                np.asarray(vertices, np.float32), intent="NIFTI_INTENT_POINTSET"
            ),
            nib.gifti.GiftiDataArray(np.asarray(faces, np.int32), intent="NIFTI_INTENT_TRIANGLE"),
        ]
    )
    nib.save(surf, out / SURFACE_FILE)
    table = nib.gifti.GiftiLabelTable()
    for key, name in enumerate(("none",) + LABELS):
        lab = nib.gifti.GiftiLabel(key=key)
        lab.label = name
        table.labels.append(lab)
    wm = np.zeros(len(vertices), np.int32)
    wm[watermark] = 1
    labels = nib.gifti.GiftiImage(
        labeltable=table,
        darrays=[
            nib.gifti.GiftiDataArray(np.asarray(regions, np.int32), intent="NIFTI_INTENT_LABEL"),
            nib.gifti.GiftiDataArray(wm, intent="NIFTI_INTENT_LABEL"),
        ],
    )
    nib.save(labels, out / LABEL_FILE)


@functools.lru_cache(maxsize=4)
def load_atlas(path: str | Path | None = None) -> Atlas:
    """Load the atlas (cached: one read per process)."""
    folder = Path(path) if path is not None else atlas_dir()
    head = nib.load(folder / HEAD_FILE)
    headmask = nib.load(folder / HEADMASK_FILE)
    prior_img = nib.load(folder / PRIORS_FILE)
    prior_data = np.asarray(prior_img.dataobj, dtype=np.float32)
    priors = {
        name: nib.Nifti1Image(prior_data[..., i], prior_img.affine)
        for i, name in enumerate(CLASSES)
    }
    surf = nib.load(folder / SURFACE_FILE)
    mesh = trimesh.Trimesh(
        surf.darrays[0].data.astype(np.float64), surf.darrays[1].data, process=False
    )
    lab = nib.load(folder / LABEL_FILE)
    regions = lab.darrays[0].data
    labels = {name: np.flatnonzero(regions == i + 1) for i, name in enumerate(LABELS)}
    watermark = np.flatnonzero(lab.darrays[1].data)
    meta = json.loads((folder / META_FILE).read_text())
    return Atlas(folder, head, headmask, priors, mesh, labels, watermark, meta)
