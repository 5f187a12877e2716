"""Nipype graphs for a BIDS dataset: one ``init_mideface_wf`` per session, then its derivatives."""

from __future__ import annotations

from pathlib import Path

from nipype.pipeline import engine as pe

from mideface_nipype.engine.exclusion import DEFAULT_XMASK_SOURCE
from mideface_nipype.engine.fill import DEFAULT_SEED
from mideface_nipype.interfaces.bids import WriteDerivatives
from mideface_nipype.utils.bids import Session
from mideface_nipype.workflows.base import init_mideface_wf


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
    """Deface one session's T1w, carry its face mask to the other images, write derivatives.

    ::

        mideface_wf(in_file=T1w, other_files=T2w, FLAIR, ..., xmask, init_transform)
          -> derivatives (defaced images, face masks, exclusion mask, sidecars, transform,
                          report and pictures)

    ``xmask`` (this session's exclusion mask, with ``xmask_source="user"``) and
    ``init_transform`` are per-session inputs; ``mideface_options`` go to ``init_mideface_wf``
    (``xmask_source``, ``ears``, ``pics``, ...).
    """
    workflow = pe.Workflow(name=session.name)
    deface = init_mideface_wf(
        name="mideface_wf", seed=seed, other_contrasts=bool(session.others), **mideface_options
    )
    deface.inputs.inputnode.in_file = str(session.source(session.reference))
    if session.others:
        deface.inputs.inputnode.other_files = [str(session.source(r)) for r in session.others]
    if xmask is not None:
        deface.inputs.inputnode.xmask = str(Path(xmask).resolve())
    if init_transform is not None:
        deface.inputs.inputnode.init_transform = str(Path(init_transform).resolve())
    derivatives = pe.Node(
        WriteDerivatives(
            bids_dir=str(Path(bids_dir).resolve()),
            output_dir=str(Path(output_dir).resolve()),
            reference=session.reference,
            others=list(session.others),
            in_place=in_place,
            publish_reference=session.publish_reference,
            seed=seed,
        ),
        name="derivatives",
        run_without_submitting=True,
        overwrite=True,  # cheap, and a rerun restores outputs deleted since
        mem_gb=0.1,
        n_procs=1,
    )
    fields = [
        ("outputnode.out_file", "defaced"),
        ("outputnode.face_mask", "face_mask"),
        ("outputnode.exclusion_mask", "exclusion_mask"),
        ("outputnode.transform", "transform"),
        ("outputnode.report", "report"),
    ]
    if session.others:
        fields += [
            ("outputnode.other_out_files", "other_defaced"),
            ("outputnode.other_face_masks", "other_face_masks"),
        ]
    if mideface_options.get("pics"):
        fields.append(("outputnode.pictures", "pictures"))
    if mideface_options.get("xmask_source", DEFAULT_XMASK_SOURCE) == "segment":
        fields.append(("outputnode.segmentation_report", "segmentation_report"))
    workflow.connect([(deface, derivatives, fields)])
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
