"""``deface(img)``: nibabel images in, nibabel images out, for notebooks and other libraries.

It runs the same graph as the ``mideface`` command (``workflows.base.init_mideface_wf``, its
sink publishing into a private temporary folder) and hands back every result in memory, so
the same input and seed give the same bytes as ``mideface --i IN --o OUT``. Nothing is written
anywhere else unless ``save`` is called on the result.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from mideface_nipype.engine.fill import DEFAULT_SEED
from mideface_nipype.utils import io

#: A spatial image as nibabel loads it (NIfTI-1/2, MGH/MGZ).
Image = nib.spatialimages.SpatialImage


@dataclass(frozen=True)
class DefaceResult:
    """What ``deface`` returns; every image is in memory, on its input's grid."""

    defaced: Image
    """The defaced image: the input's class, grid, dtype, header and scaling."""
    face_mask: nib.Nifti1Image
    """0 untouched; 1-4 the compartments (tissue/air under the template face, tissue/air
    beyond it)."""
    exclusion_mask: nib.Nifti1Image
    """Voxels that were never modified (brain, skull, eyes)."""
    transform: np.ndarray
    """4x4 RAS matrix, subject mm -> atlas (MNI) mm."""
    stats: dict
    """The run's ``stats.json`` record (per step)."""
    other: tuple[Image, ...] = field(default=())
    """The ``other`` contrasts, defaced with the same face mask, in the order given."""

    def save(self, out_dir: str | Path, *, force: bool = False) -> dict[str, Path]:
        """Write the results into ``out_dir`` (the ``mideface --odir`` names); their paths."""
        from mideface_nipype.workflows.outputs import DEFACED_FILE, ODIR_FILES, defaced_name

        out_dir = Path(out_dir)
        suffix = ".mgz" if isinstance(self.defaced, nib.MGHImage) else ".nii.gz"
        names = {output: name.format(s=".nii.gz") for name, output in ODIR_FILES.items()}
        volumes = {
            "defaced": (self.defaced, DEFACED_FILE.format(s=suffix)),
            "face_mask": (self.face_mask, names["face_mask"]),
            "exclusion_mask": (self.exclusion_mask, names["exclusion_mask"]),
        } | {
            f"other{k}": (img, defaced_name(f"other{k}{suffix}"))
            for k, img in enumerate(self.other)
        }
        publisher = io.Publisher([], force=force)
        publisher.check_all([out_dir / name for _, name in volumes.values()])
        try:
            written = {
                key: publisher.save_volume(img, out_dir / name)
                for key, (img, name) in volumes.items()
            }
            stats = json.dumps(self.stats, indent=2) + "\n"
            written["stats"] = publisher.write_text(stats, out_dir / names["stats"])
        except BaseException:
            publisher.rollback()
            raise
        return written


def _in_memory(path: str | Path) -> Image:
    """The image at ``path`` held in memory, so the file can go; it behaves as ``nib.load``'s
    (scaling in ``dataobj``) and ``nib.save`` writes the same stored voxels back."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return type(nib.load(path)).from_bytes(raw)


def _as_file(img: Image, folder: Path, name: str) -> Path:
    """A file holding ``img``: its own file when it was loaded from one, else a copy."""
    source = img.get_filename()
    if source and Path(source).is_file():
        return Path(source)
    path = folder / (name + (".mgz" if isinstance(img, nib.MGHImage) else ".nii"))
    nib.save(img, path)
    return path


def _checked(img: Image, folder: Path, name: str) -> Path:
    """``img`` as a file that passed the engine's input checks; errors name the image."""
    path = _as_file(img, folder, name)
    try:
        io.load_volume(path)
    except io.InputError as err:
        if path.parent == folder:  # our copy: the user knows the image, not the copy's name
            raise io.InputError(str(err).replace(str(path), f"the {name} image")) from err
        raise
    return path


def deface(
    img: Image,
    *,
    other: Sequence[Image] = (),
    seed: int = DEFAULT_SEED,
    samseg: bool = True,
    xmask: Image | None = None,
    ears: bool = True,
    forehead: bool = False,
    back_of_head: bool = False,
    ripple: bool = False,
    fill_const: tuple[float, float] | None = None,
    regheader: bool = False,
    n_procs: int = 1,
) -> DefaceResult:
    """Deface a head MRI in memory; ``other`` contrasts of the same head get its face mask.

    The options mean what the ``mideface`` options of the same names mean (``samseg=False`` is
    ``--no-samseg``; ``xmask`` is your own exclusion mask on ``img``'s grid). Raises
    ``io.InputError`` for an image that cannot be defaced, before any work.

    >>> import nibabel as nib
    >>> from mideface_nipype import deface
    >>> result = deface(nib.load("sub-01_T1w.nii.gz"), seed=7)  # doctest: +SKIP
    >>> nib.save(result.defaced, "sub-01_T1w_defaced.nii.gz")  # doctest: +SKIP
    """
    from mideface_nipype.workflows.base import init_mideface_wf, run_workflow
    from mideface_nipype.workflows.outputs import DEFACED_FILE, ODIR_FILES, Outputs, defaced_name

    with tempfile.TemporaryDirectory(prefix="mideface-api-") as tmp:
        folder = Path(tmp)
        in_file = _checked(img, folder, "input")
        others = [_checked(o, folder, f"other{k}") for k, o in enumerate(other)]
        xmask_file = _checked(xmask, folder, "xmask") if xmask is not None else None
        out = folder / "out"
        names = {output: name.format(s=".nii.gz") for name, output in ODIR_FILES.items()}
        files = {"out_file": out / DEFACED_FILE.format(s=io.derived_name_parts(in_file)[1])}
        files |= {key: out / names[key] for key in ("face_mask", "exclusion_mask", "transform")}
        files["stats"] = out / names["stats"]
        destinations = {key: [str(path)] for key, path in files.items()}
        if others:  # each in its own folder: two inputs may have the same name
            destinations["other_out_files"] = [
                str(out / f"other{k}" / defaced_name(o)) for k, o in enumerate(others)
            ]
        workflow = init_mideface_wf(
            in_file=in_file,
            xmask=xmask_file,
            xmask_source="user" if xmask is not None else ("segment" if samseg else "atlas"),
            ears=ears,
            forehead=forehead,
            back_of_head=back_of_head,
            ripple=ripple,
            seed=seed,
            fill_const=tuple(fill_const) if fill_const else None,
            other_contrasts=[str(o) for o in others],
            regheader=regheader,
            outputs=Outputs(destinations=destinations, reads=(str(in_file),)),
        )
        run_workflow(workflow, folder / "work", n_procs=n_procs)
        return DefaceResult(
            defaced=_in_memory(files["out_file"]),
            face_mask=_in_memory(files["face_mask"]),
            exclusion_mask=_in_memory(files["exclusion_mask"]),
            transform=io.load_matrix(files["transform"]),
            stats=json.loads(files["stats"].read_text()),
            other=tuple(_in_memory(p) for p in destinations.get("other_out_files", ())),
        )
