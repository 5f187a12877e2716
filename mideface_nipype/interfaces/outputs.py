"""Publish: the sink node that names and writes a run's outputs (``--odir`` and BIDS alike).

In the spirit of niworkflows' ``DerivativesDataSink``, but one node per run publishes every file
of it, so that they appear all or none: each input field is a workflow output, ``destinations``
says where its file(s) go, ``texts`` are the files written from text (sidecars, label tables).
Every write goes through ``io.Publisher``: never onto a file the run reads, temp name + fsync +
rename, the umask's mode, the files of ``together`` appearing at once, everything this node
wrote removed when any write fails.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
from nipype.interfaces.base import (
    DynamicTraitedSpec,
    OutputMultiObject,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)
from nipype.interfaces.io import add_traits

from mideface_nipype.engine import fill
from mideface_nipype.interfaces._base import StepInputSpec, StepInterface
from mideface_nipype.utils import io


class _PublishInputSpec(DynamicTraitedSpec, StepInputSpec):
    destinations = traits.Dict(
        Str,
        traits.List(Str),
        mandatory=True,
        desc="input field -> destination paths: one file goes to each, a list of files item "
        "by item",
    )
    texts = traits.Dict(Str, Str, desc="destination path -> text to write there")
    in_mm = traits.List(Str, desc="NIfTI destinations whose header must say mm (BIDS)")
    shareable = traits.List(
        Str, desc="face-mask destinations written without the tissue/air split (it holds the face)"
    )
    reads = traits.List(Str, desc="files the run reads: never written onto")
    force = traits.Bool(False, usedefault=True, desc="overwrite existing outputs")
    together = Str(desc="folder whose files appear together, at the end")
    clear_stale = traits.Bool(
        False,
        usedefault=True,
        desc="first remove the temp files a killed earlier run left beside each destination",
    )


class _PublishOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(Str, desc="every file written, in order")


class Publish(StepInterface):
    """Publish the files of the input fields at their ``destinations``, all or nothing."""

    input_spec = _PublishInputSpec
    output_spec = _PublishOutputSpec

    def __init__(self, fields: list[str], **inputs):
        super().__init__(**inputs)
        add_traits(self.inputs, fields)
        self.inputs.trait_set(**{field: inputs[field] for field in fields if field in inputs})

    def _run_interface(self, runtime):
        files = []
        for field, destinations in self.inputs.destinations.items():
            value = getattr(self.inputs, field)
            if not isdefined(value):
                raise ValueError(f"Publish: no file reached the input {field!r}")
            files += pair_files(field, value, destinations)
        self._results["out_files"] = publish(
            files,
            dict(self.inputs.texts) if isdefined(self.inputs.texts) else {},
            reads=self.inputs.reads if isdefined(self.inputs.reads) else [],
            force=self.inputs.force,
            together=self.inputs.together if isdefined(self.inputs.together) else None,
            in_mm=set(self.inputs.in_mm) if isdefined(self.inputs.in_mm) else set(),
            shareable=set(self.inputs.shareable) if isdefined(self.inputs.shareable) else set(),
            clear_stale=self.inputs.clear_stale,
        )
        return runtime


def pair_files(field: str, value: str | list[str], destinations: list[str]) -> list[tuple]:
    """(source, destination) of one field: a file to each destination, a list item by item."""
    if isinstance(value, list | tuple):
        if len(value) != len(destinations):
            raise ValueError(
                f"Publish: {len(value)} files reached {field!r} for {len(destinations)} places"
            )
        return list(zip(value, destinations, strict=True))
    return [(value, dst) for dst in destinations]


def publish(
    files: list[tuple[str, str]],
    texts: dict[str, str],
    *,
    reads: list[str],
    force: bool,
    together: str | None = None,
    in_mm: set[str] = frozenset(),
    shareable: set[str] = frozenset(),
    clear_stale: bool = False,
) -> list[str]:
    """Copy each (source, destination) (converting the format where the suffixes differ; into
    millimetres for ``in_mm``; face masks without their tissue/air split for ``shareable``),
    then write each text; the files under ``together`` appear at once. Any failure removes
    what was written, then raises. Returns the paths written."""
    publisher = io.Publisher(reads, force=force)
    try:
        with publisher.staged(together):
            for src, dst in files:
                if clear_stale:
                    io.remove_stale_temps(dst)
                if dst in shareable:
                    _copy_shareable(publisher, src, dst, in_mm=dst in in_mm)
                elif dst in in_mm:
                    _copy_in_mm(publisher, src, dst)
                else:
                    publisher.copy(src, dst)
            for dst, text in texts.items():
                if clear_stale:
                    io.remove_stale_temps(dst)
                publisher.write_text(text, dst)
    except BaseException:
        publisher.rollback()
        raise
    return [str(p) for p in publisher.written]


def _copy_shareable(
    publisher: io.Publisher, src: str | Path, dst: str | Path, *, in_mm: bool
) -> None:
    """A face mask without its tissue/air split (``fill.shareable_face_mask``), in mm if asked."""
    img = nib.load(src)
    shared = io.like(img, fill.shareable_face_mask(io.stored_data(img)))
    if in_mm:
        shared.header.set_xyzt_units("mm", img.header.get_xyzt_units()[1])
    publisher.save_volume(shared, dst)


def _copy_in_mm(publisher: io.Publisher, src: str | Path, dst: str | Path) -> None:
    """A NIfTI copy whose header says its voxels are in millimetres (BIDS): a header with
    unknown spatial units gets ``mm`` (what NIfTI assumes then), voxels untouched; one that says
    so already is copied byte for byte."""
    img = nib.load(src)
    space_unit, time_unit = img.header.get_xyzt_units()
    if space_unit == "mm":
        publisher.copy(src, dst)
        return
    fixed = io.like(img, io.stored_data(img))
    fixed.header.set_xyzt_units("mm", time_unit)
    publisher.save_volume(fixed, dst)
