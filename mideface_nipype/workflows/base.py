"""Nipype graphs of MiDeFace: ``init_mideface_wf`` defaces one head."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.utility import IdentityInterface, Merge
from nipype.pipeline import engine as pe

from mideface_nipype.engine.bracket import RIPPLE_AMP_MM, RIPPLE_PERIOD_MM
from mideface_nipype.engine.exclusion import DEFAULT_XMASK_SOURCE, XMASK_SOURCES
from mideface_nipype.engine.fill import DEFAULT_SEED, STAT_FRAME
from mideface_nipype.interfaces import (
    ApplyFaceMask,
    AtlasExclusionMask,
    Bracket,
    CollectStats,
    Coregister,
    Deface,
    HeadMask,
    Pics,
    ProjectSurface,
    RegisterAtlas,
    Report,
    Segment,
)

OUTPUT_FIELDS = [
    "out_file",
    "face_mask",
    "head_mask",
    "exclusion_mask",
    "transform",
    "itk_transform",
    "surface",
    "distances",
    "stats",
    "other_out_files",
    "other_face_masks",
    "other_transforms",
    "segmentation",
    "segmentation_report",
    "report",
    "pictures",
    "head_surface",
    "defaced_surface",
    "dist_to_face",
]


def init_mideface_wf(
    *,
    name: str = "mideface_wf",
    xmask_source: str = DEFAULT_XMASK_SOURCE,
    ears: bool = True,
    forehead: bool = False,
    back_of_head: bool = False,
    ripple: bool = False,
    ripple_amp_mm: float = RIPPLE_AMP_MM,
    ripple_period_mm: float = RIPPLE_PERIOD_MM,
    seed: int = DEFAULT_SEED,
    fill_const: tuple[float, float] | None = None,
    stat_frame: int = STAT_FRAME,
    atlas_dir: str | None = None,
    other_contrasts: list[str] | bool = False,
    regheader: bool = False,
    pics: bool = False,
    omp_nthreads: int = 1,
    report_options: dict | None = None,
) -> pe.Workflow:
    """Deface one head MRI, and with ``other_contrasts`` its other contrasts with the same mask.

    ::

        inputnode(in_file, xmask, init_transform)
          -> head_mask ----------------------------+
          -> register (atlas -> subject, affine) --+--> project (atlas surface in subject mm)
          -> exclusion (segmentation | atlas priors | user xmask)
          -> bracket (surface, head mask, exclusion mask) -> face mask 0-4, distances
          -> deface (in_file, face mask, seed) -> out_file
          -> [pics] skin renders before/after in the atlas pose, dist-to-face (with pics)
          -> stats (all step records) -> stats.json
          -> report (stats, face mask, pictures) -> report.html
          -> [MapNode over other_files] coregister (other -> in_file, rigid)
                -> apply_mask (face mask + exclusion mask resampled, statistics recomputed)
        outputnode(out_file, face_mask, head_mask, exclusion_mask, transform, itk_transform,
                   surface, distances, stats, other_out_files, other_face_masks,
                   other_transforms)

    Inputs
    ------
    in_file
        the head MRI to deface (NIfTI or MGZ, 3-D or 4-D, any orientation)
    xmask
        exclusion mask on the input grid (only with ``xmask_source="user"``)
    init_transform
        optional 4x4 RAS subject->atlas matrix (text) replacing the rotation search
    other_files
        other contrasts of the same head (with ``other_contrasts``; a list given there is set
        here); each is rigidly registered to ``in_file`` (or taken as is with ``regheader``)
        and defaced with ``in_file``'s face mask, in parallel (MapNodes)

    ``report_options`` are the caller's settings as the report lists them (default: the
    arguments here). ``omp_nthreads`` is the number of BLAS/OpenMP threads of the numpy-heavy
    steps (segment, bracket, deface, pics): their nodes declare it as ``n_procs``, so MultiProc
    and SLURM schedule them with that many cores. ANTs steps stay at one thread (reproducible
    registration).

    Outputs
    -------
    out_file, face_mask, head_mask, exclusion_mask, transform (RAS text), itk_transform (ANTs),
    surface (the atlas surface in subject mm, GIfTI), distances (JSON), stats (JSON);
    segmentation, segmentation_report (labels and a PNG, with ``xmask_source="segment"``);
    other_out_files, other_face_masks, other_transforms (lists, one per other contrast);
    report (report.html: warnings, statistics, options, versions, timings; always);
    with ``pics``: pictures (PNGs and a GIF, see ``report.PICTURES``), head_surface,
    defaced_surface (skin surfaces, GIfTI) and dist_to_face (per-vertex distance, GIfTI)
    """
    if xmask_source not in XMASK_SOURCES:
        raise ValueError(f"xmask_source must be one of {XMASK_SOURCES}, not {xmask_source!r}")
    atlas = {"atlas_dir": atlas_dir} if atlas_dir else {}
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=["in_file", "xmask", "init_transform", "other_files"]),
        name="inputnode",
    )
    outputnode = pe.Node(IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

    head_mask = pe.Node(HeadMask(), name="head_mask", mem_gb=0.5, n_procs=1)
    register = pe.Node(RegisterAtlas(**atlas), name="register", mem_gb=1.0, n_procs=1)
    project = pe.Node(ProjectSurface(**atlas), name="project", mem_gb=0.3, n_procs=1)
    bracket = pe.Node(
        Bracket(
            ears=ears,
            forehead=forehead,
            back_of_head=back_of_head,
            ripple=ripple,
            ripple_amp_mm=ripple_amp_mm,
            ripple_period_mm=ripple_period_mm,
            **atlas,
        ),
        name="bracket",
        mem_gb=1.0,
        n_procs=omp_nthreads,
    )
    deface = pe.Node(
        Deface(seed=seed, stat_frame=stat_frame), name="deface", mem_gb=0.5, n_procs=omp_nthreads
    )
    if fill_const is not None:
        deface.inputs.fill_const = tuple(fill_const)
    records = pe.Node(Merge(8, ravel_inputs=True), name="records", run_without_submitting=True)
    stats = pe.Node(CollectStats(), name="stats", run_without_submitting=True)
    options = report_options or {
        "xmask_source": xmask_source,
        "ears": ears,
        "forehead": forehead,
        "back_of_head": back_of_head,
        "ripple": ripple,
        "seed": seed,
        "fill_const": fill_const,
        "regheader": regheader,
        "pics": pics,
    }
    html = pe.Node(
        Report(options=options), name="report", mem_gb=0.3, n_procs=1, run_without_submitting=True
    )

    connections = [
        (inputnode, head_mask, [("in_file", "in_file")]),
        (inputnode, register, [("in_file", "in_file")]),
        (head_mask, register, [("out_file", "head_mask")]),
        (register, project, [("transform", "transform")]),
        (head_mask, bracket, [("out_file", "head_mask")]),
        (project, bracket, [("out_file", "surface")]),
        (register, bracket, [("transform", "transform")]),
        (inputnode, deface, [("in_file", "in_file")]),
        (bracket, deface, [("out_file", "face_mask")]),
        (head_mask, records, [("out_stats", "in1")]),
        (register, records, [("out_stats", "in2")]),
        (bracket, records, [("out_stats", "in4")]),
        (deface, records, [("out_stats", "in5")]),
        (records, stats, [("out", "in_files")]),
        (deface, outputnode, [("out_file", "out_file")]),
        (bracket, outputnode, [("out_file", "face_mask"), ("out_distances", "distances")]),
        (head_mask, outputnode, [("out_file", "head_mask")]),
        (register, outputnode, [("transform", "transform"), ("itk_transform", "itk_transform")]),
        (project, outputnode, [("out_file", "surface")]),
        (stats, outputnode, [("out_file", "stats")]),
        (inputnode, html, [("in_file", "in_file")]),
        (stats, html, [("out_file", "stats")]),
        (bracket, html, [("out_file", "face_mask")]),
        (html, outputnode, [("out_file", "report")]),
    ]
    if xmask_source == "segment":
        seg = pe.Node(Segment(**atlas), name="segment", mem_gb=1.5, n_procs=omp_nthreads)
        connections += [
            (inputnode, seg, [("in_file", "in_file")]),
            (head_mask, seg, [("out_file", "head_mask")]),
            (register, seg, [("transform", "transform")]),
            (seg, records, [("out_stats", "in3")]),
            (
                seg,
                outputnode,
                [("out_labels", "segmentation"), ("out_report", "segmentation_report")],
            ),
        ]
        xmask_out = (seg, "out_file")
    elif xmask_source == "atlas":
        exclusion = pe.Node(AtlasExclusionMask(**atlas), name="exclusion", mem_gb=0.5, n_procs=1)
        connections += [
            (head_mask, exclusion, [("out_file", "head_mask")]),
            (register, exclusion, [("transform", "transform")]),
            (exclusion, records, [("out_stats", "in3")]),
        ]
        xmask_out = (exclusion, "out_file")
    else:
        xmask_out = (inputnode, "xmask")
    connections += [
        (xmask_out[0], bracket, [(xmask_out[1], "xmask")]),
        (xmask_out[0], outputnode, [(xmask_out[1], "exclusion_mask")]),
    ]
    if pics:
        qa = pe.Node(Pics(), name="pics", mem_gb=1.5, n_procs=omp_nthreads)
        connections += [
            (inputnode, qa, [("in_file", "in_file")]),
            (register, qa, [("transform", "transform")]),
            (deface, qa, [("out_file", "defaced_file")]),
            (bracket, qa, [("out_file", "face_mask")]),
            (xmask_out[0], qa, [(xmask_out[1], "xmask")]),
            (qa, records, [("out_stats", "in8")]),
            (qa, html, [("pictures", "pictures")]),
            (
                qa,
                outputnode,
                [
                    ("pictures", "pictures"),
                    ("head_surface", "head_surface"),
                    ("defaced_surface", "defaced_surface"),
                    ("dist_to_face", "dist_to_face"),
                ],
            ),
        ]
    if other_contrasts:
        if not isinstance(other_contrasts, bool):
            inputnode.inputs.other_files = [str(f) for f in other_contrasts]
        coregister = pe.MapNode(
            Coregister(regheader=regheader),
            iterfield=["in_file"],
            name="coregister",
            mem_gb=1.0,
            n_procs=1,
        )
        apply_mask = pe.MapNode(
            ApplyFaceMask(seed=seed),
            iterfield=["in_file", "transform"],
            name="apply_mask",
            mem_gb=0.5,
            n_procs=1,
        )
        if fill_const is not None:
            apply_mask.inputs.fill_const = tuple(fill_const)
        connections += [
            (inputnode, coregister, [("other_files", "in_file"), ("in_file", "reference")]),
            (head_mask, coregister, [("out_file", "reference_mask")]),
            (inputnode, apply_mask, [("other_files", "in_file")]),
            (coregister, apply_mask, [("transform", "transform")]),
            (bracket, apply_mask, [("out_file", "face_mask")]),
            (xmask_out[0], apply_mask, [(xmask_out[1], "xmask")]),
            (coregister, records, [("out_stats", "in6")]),
            (apply_mask, records, [("out_stats", "in7")]),
            (
                apply_mask,
                outputnode,
                [("out_file", "other_out_files"), ("face_mask", "other_face_masks")],
            ),
            (coregister, outputnode, [("transform", "other_transforms")]),
        ]
    connections.append((inputnode, register, [("init_transform", "init_transform")]))
    workflow.connect(connections)
    return workflow


def run_mideface_wf(
    in_file: str | Path,
    work_dir: str | Path,
    *,
    xmask: str | Path | None = None,
    init_transform: str | Path | None = None,
    n_procs: int = 1,
    **options,
) -> dict:
    """Deface ``in_file`` with ``init_mideface_wf(**options)`` run in ``work_dir``; its outputs.

    The one way the ``mideface`` command and ``mideface_nipype.deface`` run the graph, so that
    both give the same bytes. ``n_procs`` > 1 runs it on MultiProc.
    """
    from nipype import config

    work_dir = Path(work_dir).resolve()
    workflow = init_mideface_wf(**options)
    workflow.inputs.inputnode.in_file = str(Path(in_file).resolve())
    if xmask is not None:
        workflow.inputs.inputnode.xmask = str(Path(xmask).resolve())
    if init_transform is not None:
        workflow.inputs.inputnode.init_transform = str(Path(init_transform).resolve())
    workflow.base_dir = str(work_dir)
    config.set("execution", "crashdump_dir", str(work_dir))
    if n_procs > 1:
        graph = workflow.run(plugin="MultiProc", plugin_args={"n_procs": n_procs})
    else:
        graph = workflow.run(plugin="Linear")
    return workflow_outputs(workflow, graph)


def workflow_outputs(workflow: pe.Workflow, graph) -> dict:
    """Values that reached ``outputnode`` in a finished run (Nipype prunes identity nodes)."""
    results = {node.name: node.result.outputs for node in graph.nodes()}
    outputnode = workflow.get_node("outputnode")
    values = {}
    for src, _, data in workflow._graph.in_edges(outputnode, data=True):
        for src_field, dst_field in data["connect"]:
            if src.name == "inputnode":
                values[dst_field] = getattr(workflow.inputs.inputnode, src_field)
            else:
                values[dst_field] = getattr(results[src.name], src_field)
    return values
