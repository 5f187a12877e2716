"""Nipype graphs for a BIDS dataset: one ``init_mideface_wf`` per session, publishing BIDS names."""

from __future__ import annotations

from pathlib import Path

from nipype.pipeline import engine as pe

from mideface_nipype.engine.exclusion import DEFAULT_XMASK_SOURCE
from mideface_nipype.engine.fill import DEFAULT_SEED
from mideface_nipype.interfaces.bids import ReplaceRaw
from mideface_nipype.utils import bids
from mideface_nipype.utils.bids import Session
from mideface_nipype.workflows.base import init_mideface_wf
from mideface_nipype.workflows.outputs import Outputs


def session_outputs(
    session: Session,
    *,
    bids_dir: str | Path,
    output_dir: str | Path,
    in_place: bool = False,
    seed: int = DEFAULT_SEED,
    pics: bool = False,
    segmentation: bool = False,
) -> Outputs:
    """Where the ``Publish`` sink writes one session's results (``bids.session_files``'s
    names): over what a rerun left (``force``; ``plan_derivatives`` refused it before), NIfTI
    in mm, files of the raw dataset never written onto."""
    files, texts = bids.session_files(
        session,
        bids_dir,
        output_dir,
        in_place=in_place,
        seed=seed,
        pics=pics,
        segmentation=segmentation,
    )
    return Outputs(
        destinations=files,
        texts=texts,
        reads=tuple(str(session.source(rel)) for rel in session.published),
        force=True,
        in_mm=tuple(p for key in bids.IN_MM_OUTPUTS for p in files.get(key, [])),
        shareable=tuple(p for key in bids.FACE_MASK_OUTPUTS for p in files.get(key, [])),
        clear_stale=True,
    )


def init_session_wf(
    session: Session,
    *,
    bids_dir: str | Path,
    output_dir: str | Path,
    in_place: bool = False,
    seed: int = DEFAULT_SEED,
    xmask: str | Path | None = None,
    init_transform: str | Path | None = None,
    **mideface_options,
) -> pe.Workflow:
    """Deface one session's T1w, carry its face mask to the other images, publish derivatives.

    ::

        mideface_wf(in_file=T1w, other_files=T2w, FLAIR, ..., xmask, init_transform)
          -> mideface_wf.outputs_wf.publish (defaced images, face masks, exclusion mask,
             sidecars, transform, report and pictures at their BIDS names: session_outputs)
          -> [in place] replace_raw (the defaced images over the raw ones, last)

    ``xmask`` (this session's exclusion mask, with ``xmask_source="user"``) and
    ``init_transform`` are per-session inputs; ``mideface_options`` go to ``init_mideface_wf``
    (``xmask_source``, ``ears``, ``pics``, ...).
    """
    workflow = pe.Workflow(name=session.name)
    outputs = session_outputs(
        session,
        bids_dir=bids_dir,
        output_dir=output_dir,
        in_place=in_place,
        seed=seed,
        pics=mideface_options.get("pics", False),
        segmentation=mideface_options.get("xmask_source", DEFAULT_XMASK_SOURCE) == "segment",
    )
    deface = init_mideface_wf(
        name="mideface_wf",
        in_file=session.source(session.reference),
        xmask=Path(xmask).resolve() if xmask is not None else None,
        init_transform=Path(init_transform).resolve() if init_transform is not None else None,
        other_contrasts=[str(session.source(rel)) for rel in session.others],
        seed=seed,
        outputs=outputs,
        **mideface_options,
    )
    if not in_place:
        workflow.add_nodes([deface])
        return workflow
    replace = pe.Node(
        ReplaceRaw(
            bids_dir=str(Path(bids_dir).resolve()),
            output_dir=str(Path(output_dir).resolve()),
            images=list(session.published),
        ),
        name="replace_raw",
        run_without_submitting=True,
        overwrite=True,  # the manifest decides what is done, not Nipype's cache
        mem_gb=0.1,
        n_procs=1,
    )
    fields = [("outputs_wf.publish.out_files", "published")]
    if session.publish_reference:
        fields.append(("outputnode.out_file", "reference_defaced"))
    if session.others:
        fields.append(("outputnode.other_out_files", "other_defaced"))
    workflow.connect([(deface, replace, fields)])
    return workflow


def init_bids_wf(
    sessions: list[Session],
    *,
    bids_dir: str | Path,
    output_dir: str | Path,
    name: str = "mideface_bids",
    in_place: bool = False,
    seed: int = DEFAULT_SEED,
    xmasks: dict[str, Path] | None = None,
    init_transforms: dict[str, Path] | None = None,
    **mideface_options,
) -> pe.Workflow:
    """Every session side by side in one graph, so a plugin can run them in parallel.

    ``xmasks`` and ``init_transforms`` map a session's label (``sub-01_ses-pre``) to its own
    exclusion mask and initial transform.
    """
    xmasks, init_transforms = xmasks or {}, init_transforms or {}
    workflow = pe.Workflow(name=name)
    workflow.add_nodes(
        [
            init_session_wf(
                session,
                bids_dir=bids_dir,
                output_dir=output_dir,
                in_place=in_place,
                seed=seed,
                xmask=xmasks.get(session.label),
                init_transform=init_transforms.get(session.label),
                **mideface_options,
            )
            for session in sessions
        ]
    )
    return workflow
