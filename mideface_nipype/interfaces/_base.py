"""Helpers shared by the interfaces: output paths under the node's folder, JSON, timing, logs."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, Directory, File, SimpleInterface, traits

from mideface_nipype.utils.geometry import GridImage
from mideface_nipype.utils.threads import limit_threads

LOGGER = logging.getLogger(__name__)


class StepInputSpec(BaseInterfaceInputSpec):
    """Inputs of every step: the threads its numeric libraries may use."""

    # Nipype sets a ``num_threads`` input to the node's ``n_procs``, so MultiProc and SLURM hand
    # each node the cores they scheduled it for; nohash: the result does not depend on it
    num_threads = traits.Int(
        1, usedefault=True, nohash=True, desc="threads for BLAS/OpenMP (the node's n_procs)"
    )


class StepInterface(SimpleInterface):
    """A SimpleInterface whose numeric libraries use no more threads than the node was given."""

    def run(self, cwd=None, ignore_exception=None, **inputs):
        with limit_threads(inputs.get("num_threads", self.inputs.num_threads)):
            return super().run(cwd=cwd, ignore_exception=ignore_exception, **inputs)


class AtlasInputSpec(StepInputSpec):
    """Inputs of every step that reads the atlas."""

    atlas_dir = Directory(exists=True, desc="atlas folder (default: the installed atlas)")


class SubjectGridInputSpec(AtlasInputSpec):
    """Inputs of the steps that work on the subject's grid through the atlas registration."""

    head_mask = File(exists=True, mandatory=True, desc="subject head mask (defines the grid)")
    transform = File(exists=True, mandatory=True, desc="4x4 RAS subject->atlas matrix")


def load_mask(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(boolean mask, affine) of a mask file: voxels > 0.5 are in."""
    img = nib.load(path)
    return np.asarray(img.dataobj) > 0.5, img.affine


def save_mask(mask: np.ndarray, affine: np.ndarray, runtime, name: str) -> str:
    """Write a uint8 mask or label volume into the node's folder; its path."""
    path = out_path(runtime, name)
    nib.save(nib.Nifti1Image(np.asarray(mask).astype(np.uint8), affine), path)
    return path


def save_grid(grid: GridImage, runtime, name: str) -> str:
    """Write a ``GridImage`` into the node's folder as two frames (image, mask); its path.

    NIfTI-2, whose float64 affine reads back exactly: the next step gets the same grid.
    """
    path = out_path(runtime, name)
    frames = np.stack([grid.data, grid.mask], axis=-1).astype(np.float32)
    nib.save(nib.Nifti2Image(frames, grid.affine), path)
    return path


def load_grid(path: str) -> GridImage:
    """A ``GridImage`` written by ``save_grid``."""
    img = nib.load(path)
    frames = np.asarray(img.dataobj, dtype=np.float32)
    return GridImage(frames[..., 0], img.affine, frames[..., 1] > 0.5)


def out_path(runtime, name: str) -> str:
    """An output file name inside the node's working folder."""
    return str(Path(runtime.cwd) / name)


def write_json(data: dict, path: str) -> str:
    Path(path).write_text(json.dumps(data, indent=2, default=_to_builtin) + "\n")
    return path


def _to_builtin(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value)} to JSON")


@contextmanager
def step(name: str, record: dict):
    """Log the start and end of a step and keep its wall time (s) in ``record['seconds']``."""
    LOGGER.info("%s ...", name)
    start = time.perf_counter()
    yield
    record["seconds"] = round(time.perf_counter() - start, 3)
    LOGGER.info("%s done (%.1f s)", name, record["seconds"])


def save_matrix(matrix: np.ndarray, path: str) -> str:
    np.savetxt(path, matrix, fmt="%.10f")
    return path
