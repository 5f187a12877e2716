"""Where a run's outputs go: the ``--odir`` naming tables, ``Outputs`` and the sink workflow.

The names are defined here once: ``odir_outputs`` turns ``mideface``'s output options into an
``Outputs`` (workflow output -> destination paths, sidecar texts), which the command checks
before any work and ``init_outputs_wf`` publishes in the graph (``interfaces.outputs.Publish``).
The BIDS names come from ``utils.bids`` (``workflows.bids.session_outputs``), through the same
sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from mideface_nipype.interfaces.outputs import Publish
from mideface_nipype.reports import report
from mideface_nipype.utils import bids
from mideface_nipype.utils.io import derived_name_parts

#: The face mask's name in ``--odir`` ("{s}": the volume suffix), which sidecars point to.
FACE_MASK_FILE = "face.mask{s}"
#: ``--odir`` files: name ("{s}" is the volume suffix) -> workflow output.
ODIR_FILES = {
    FACE_MASK_FILE: "face_mask",
    "head.mask{s}": "head_mask",
    "exclusion.mask{s}": "exclusion_mask",
    "subject_to_atlas.txt": "transform",
    "subject_to_atlas.mat": "itk_transform",
    "template.surf.gii": "surface",
    "distances.json": "distances",
    "stats.json": "stats",
    "report.html": "report",
}
#: More ``--odir`` files with the segmentation exclusion mask.
SEGMENT_FILES = {"seg{s}": "segmentation", "segmentation.png": "segmentation_report"}
#: More ``--odir`` files with ``--pics``; the pictures themselves (``pictures``) keep their
#: names, ``report.PICTURES``.
PICS_FILES = {
    "head.surf.gii": "head_surface",
    "head.defaced.surf.gii": "defaced_surface",
    "dist-to-face.func.gii": "dist_to_face",
}
#: The defaced volume's name in ``--odir`` without ``--o`` ("{s}": the volume suffix).
DEFACED_FILE = "defaced{s}"


@dataclass(frozen=True)
class Outputs:
    """Where a run's outputs go: the inputs of its ``Publish`` sink (see there)."""

    destinations: dict[str, list[str]]
    """Workflow output -> destination paths (a list output: item by item)."""
    texts: dict[str, str] = field(default_factory=dict)
    """Destination path -> text (sidecars, label tables)."""
    reads: tuple[str, ...] = ()
    """Files the run reads, never written onto."""
    force: bool = False
    """Overwrite existing outputs."""
    together: str | None = None
    """A folder whose files appear together."""
    in_mm: tuple[str, ...] = ()
    """NIfTI destinations whose header must say mm."""
    shareable: tuple[str, ...] = ()
    """Face-mask destinations written without the tissue/air split, which holds the face."""
    clear_stale: bool = False
    """Remove temp files a killed earlier run left beside a destination."""

    def __post_init__(self):
        """Every path absolute, now: the sink runs in its node's folder, where a relative path
        would land in the work folder (and vanish with it)."""

        def absolute(path: str) -> str:
            return str(Path(path).absolute())

        fields = {
            "destinations": {k: [absolute(p) for p in v] for k, v in self.destinations.items()},
            "texts": {absolute(p): text for p, text in self.texts.items()},
            "reads": tuple(absolute(p) for p in self.reads),
            "together": absolute(self.together) if self.together is not None else None,
            "in_mm": tuple(absolute(p) for p in self.in_mm),
            "shareable": tuple(absolute(p) for p in self.shareable),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def paths(self) -> list[Path]:
        """Every file the sink writes, in order: to check before any work."""
        files = [Path(p) for dsts in self.destinations.values() for p in dsts]
        return files + [Path(p) for p in self.texts]


def defaced_name(path: str | Path) -> str:
    """``sub-01_T2w.nii.gz`` -> ``sub-01_T2w_defaced.nii.gz`` (the ``--apply-to`` name rule)."""
    stem, suffix = derived_name_parts(Path(path).name)
    return f"{stem}_defaced{suffix}"


def odir_outputs(
    in_file: str | Path,
    *,
    out_file: str | Path,
    odir: str | Path | None,
    suffix: str,
    face_mask: str | Path | None = None,
    other_files: Sequence[str | Path] = (),
    segmentation: bool = False,
    pics: bool = False,
    options: dict | None = None,
    reads: Sequence[str | Path] = (),
    force: bool = False,
) -> Outputs:
    """The outputs of ``mideface --i IN_FILE --o OUT_FILE [--odir ODIR] [--facemask FACE_MASK]
    [--apply-to OTHER_FILES]``: the defaced volume(s), the face mask, in ``odir`` the
    ``ODIR_FILES`` (``suffix`` for its volumes; ``SEGMENT_FILES`` with ``segmentation``,
    ``PICS_FILES`` and the pictures with ``pics``) and a JSON sidecar beside each defaced volume
    whose source has a BIDS name (``options`` recorded in it); ``odir``'s files appear together.
    """
    out_file = Path(out_file)
    destinations: dict[str, list[str]] = {"out_file": [str(out_file)]}
    if face_mask is not None:
        destinations["face_mask"] = [str(face_mask)]
    others = [out_file.parent / defaced_name(o) for o in other_files]
    if others:
        destinations["other_out_files"] = [str(o) for o in others]
    if odir is not None:
        odir = Path(odir)
        names = dict(ODIR_FILES)
        if segmentation:
            names.update(SEGMENT_FILES)
        if pics:
            names.update(PICS_FILES)
        for name, output in names.items():
            destinations.setdefault(output, []).append(str(odir / name.format(s=suffix)))
        if pics:
            destinations["pictures"] = [str(odir / name) for name in report.PICTURES]
    if face_mask is None and odir is not None:
        face_mask = odir / FACE_MASK_FILE.format(s=suffix)
    texts = {}
    for source, defaced in [
        (Path(in_file), out_file),
        *zip(map(Path, other_files), others, strict=True),
    ]:
        if bids.is_bids_name(source):
            texts[str(report.sidecar_path(defaced))] = report.sidecar_text(
                defaced, options=options or {}, face_mask_path=face_mask, source_path=source
            )
    return Outputs(
        destinations=destinations,
        texts=texts,
        reads=tuple(str(p) for p in reads),
        force=force,
        together=str(odir) if odir is not None else None,
    )


def init_outputs_wf(outputs: Outputs, *, name: str = "outputs_wf") -> pe.Workflow:
    """Publish a run's outputs where ``outputs`` says, all or nothing.

    ::

        inputnode(one field per workflow output in outputs.destinations) -> publish

    ``publish`` runs again on every run, also when Nipype has cached it (a rerun restores
    outputs deleted since), in the main process.
    """
    workflow = pe.Workflow(name=name)
    fields = list(outputs.destinations)
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    publish = pe.Node(
        Publish(
            fields=fields,
            destinations=outputs.destinations,
            texts=outputs.texts,
            in_mm=list(outputs.in_mm),
            shareable=list(outputs.shareable),
            reads=list(outputs.reads),
            force=outputs.force,
            clear_stale=outputs.clear_stale,
            **({"together": outputs.together} if outputs.together else {}),
        ),
        name="publish",
        run_without_submitting=True,
        overwrite=True,
        mem_gb=0.1,
        n_procs=1,
    )
    workflow.connect([(inputnode, publish, [(f, f) for f in fields])])
    return workflow
