"""Nipype graphs of MiDeFace: ``init_mideface_wf`` defaces one head."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.utility import IdentityInterface
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
    SegmentationPicture,
)
from mideface_nipype.reports.methods import methods_text
from mideface_nipype.workflows.multiproc import MultiProcPlugin
from mideface_nipype.workflows.outputs import Outputs, init_outputs_wf

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
    in_file: str | Path | None = None,
    xmask: str | Path | None = None,
    init_transform: str | Path | None = None,
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
    outputs: Outputs | None = None,
) -> pe.Workflow:
    """Deface one head MRI, and with ``other_contrasts`` its other contrasts with the same mask.

    ::

        inputnode(in_file, xmask, init_transform, other_files)
          -> head_mask ----------------------------+
          -> register (atlas -> subject, affine) --+--> project (atlas surface in subject mm)
          -> exclusion (segmentation | atlas priors | user xmask)
          -> bracket (surface, head mask, exclusion mask) -> face mask 0-4, distances
          -> deface (in_file, face mask, seed) -> out_file
          -> [segmentation] segmentation_picture (labels on the defaced image, none in the
                                                  face mask) -> segmentation.png
          -> [pics] skin renders before/after in the atlas pose, dist-to-face (with pics)
          -> stats (one named input per step record) -> stats.json
          -> report (stats, face mask, pictures) -> report.html
          -> [MapNode over other_files] coregister (other -> in_file, rigid, against the
                                                     grids register made of in_file)
                -> apply_mask (face mask + exclusion mask resampled, statistics recomputed)
        outputnode(every output below)
          -> [outputs] outputs_wf.publish (each file at its destinations, all or nothing;
                                           its out_files: every file written)

    Inputs
    ------
    in_file
        the head MRI to deface (NIfTI or MGZ, 3-D or 4-D, any orientation); the argument of
        the same name sets it, or connect it
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
    registration). ``outputs`` (``workflows.outputs.odir_outputs`` for ``mideface``'s names,
    ``workflows.bids.session_outputs`` for BIDS) adds the sink that publishes the outputs it
    names: the last node of the graph.

    Outputs
    -------
    out_file
        the defaced volume: same grid, dtype, header and scaling as ``in_file``
        (``mideface --o``, ``--odir``'s ``defaced.<ext>``)
    face_mask
        0 untouched, 1 tissue under the template face, 2 air under it, 3 tissue beyond it,
        4 air beyond it (``face.mask.<ext>``)
    head_mask
        the head (``head.mask.<ext>``)
    exclusion_mask
        voxels never modified: brain, eyes (and skull, from the segmentation), or ``xmask``
        (``exclusion.mask.<ext>``)
    transform, itk_transform
        subject -> atlas, a 4x4 RAS text matrix and an ANTs affine
        (``subject_to_atlas.txt``, ``.mat``)
    surface
        the atlas face surface in subject mm, GIfTI (``template.surf.gii``)
    distances
        JSON: per face label, its inward and outward bracket distances, and the blended bounds
        (``distances.json``)
    stats
        JSON: one section per step (``report.STATS_SECTIONS``), seconds (``stats.json``)
    report
        report.html: warnings, statistics, options, versions, timings, the methods paragraph
        (also ``workflow.__desc__``); pictures with ``pics``
    segmentation, segmentation_report
        with ``xmask_source="segment"``: its labels and a PNG (``seg.<ext>``,
        ``segmentation.png``, drawn on the defaced image, no label inside the face mask)
    other_out_files, other_face_masks, other_transforms
        with ``other_contrasts``: lists, one per other contrast (``<name>_defaced.<ext>``
        beside ``out_file``)
    pictures, head_surface, defaced_surface, dist_to_face
        with ``pics``: the PNGs and the GIF of ``report.PICTURES``; the skin surfaces before
        and after (GIfTI: ``head.surf.gii``, ``head.defaced.surf.gii``); per vertex of the
        former its distance to the defaced skin (``dist-to-face.func.gii``)
    """
    if xmask_source not in XMASK_SOURCES:
        raise ValueError(f"xmask_source must be one of {XMASK_SOURCES}, not {xmask_source!r}")
    atlas = {"atlas_dir": atlas_dir} if atlas_dir else {}
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=["in_file", "xmask", "init_transform", "other_files"]),
        name="inputnode",
    )
    for field, path in (("in_file", in_file), ("xmask", xmask), ("init_transform", init_transform)):
        if path is not None:
            setattr(inputnode.inputs, field, str(Path(path).absolute()))
    outputnode = pe.Node(IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

    head_mask = pe.Node(HeadMask(), name="head_mask", mem_gb=0.5, n_procs=1)
    register = pe.Node(
        RegisterAtlas(search_grid=bool(other_contrasts), **atlas),
        name="register",
        mem_gb=1.0,
        n_procs=1,
    )
    project = pe.Node(ProjectSurface(**atlas), name="project", mem_gb=0.3, n_procs=1)
    shape = {
        "ears": ears,
        "forehead": forehead,
        "back_of_head": back_of_head,
        "ripple": ripple,
        "ripple_amp_mm": ripple_amp_mm,
        "ripple_period_mm": ripple_period_mm,
    }
    bracket = pe.Node(
        Bracket(**shape, **atlas),
        name="bracket",
        mem_gb=1.0,
        n_procs=omp_nthreads,
    )
    deface = pe.Node(
        Deface(seed=seed, stat_frame=stat_frame), name="deface", mem_gb=0.5, n_procs=omp_nthreads
    )
    if fill_const is not None:
        deface.inputs.fill_const = tuple(fill_const)
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
    workflow.__desc__ = methods_text(
        xmask_source=xmask_source,
        **shape,
        seed=seed,
        fill_const=fill_const,
        stat_frame=stat_frame,
        atlas_dir=atlas_dir,
        init_transform=init_transform is not None,
        other_contrasts=bool(other_contrasts),
        regheader=regheader,
    )
    html = pe.Node(
        Report(options=options, methods=workflow.__desc__),
        name="report",
        mem_gb=0.3,
        n_procs=1,
        run_without_submitting=True,
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
        (head_mask, stats, [("out_stats", "head_mask")]),
        (register, stats, [("out_stats", "registration")]),
        (bracket, stats, [("out_stats", "bracket")]),
        (deface, stats, [("out_stats", "fill")]),
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
        seg_picture = pe.Node(
            SegmentationPicture(), name="segmentation_picture", mem_gb=0.5, n_procs=1
        )
        connections += [
            (inputnode, seg, [("in_file", "in_file")]),
            (head_mask, seg, [("out_file", "head_mask")]),
            (register, seg, [("transform", "transform")]),
            (seg, stats, [("out_stats", "exclusion")]),
            (seg, outputnode, [("out_labels", "segmentation")]),
            (deface, seg_picture, [("out_file", "in_file")]),
            (seg, seg_picture, [("out_labels", "labels")]),
            (bracket, seg_picture, [("out_file", "face_mask")]),
            (seg_picture, outputnode, [("out_report", "segmentation_report")]),
        ]
        xmask_out = (seg, "out_file")
    elif xmask_source == "atlas":
        exclusion = pe.Node(AtlasExclusionMask(**atlas), name="exclusion", mem_gb=0.5, n_procs=1)
        connections += [
            (head_mask, exclusion, [("out_file", "head_mask")]),
            (register, exclusion, [("transform", "transform")]),
            (exclusion, stats, [("out_stats", "exclusion")]),
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
            (qa, stats, [("out_stats", "pics")]),
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
            (inputnode, coregister, [("other_files", "in_file")]),
            (
                register,
                coregister,
                [
                    ("registration_grid", "reference_grid"),
                    ("search_grid", "reference_search_grid"),
                ],
            ),
            (inputnode, apply_mask, [("other_files", "in_file")]),
            (coregister, apply_mask, [("transform", "transform")]),
            (bracket, apply_mask, [("out_file", "face_mask")]),
            (xmask_out[0], apply_mask, [(xmask_out[1], "xmask")]),
            (coregister, stats, [("out_stats", "coregister")]),
            (apply_mask, stats, [("out_stats", "apply")]),
            (
                apply_mask,
                outputnode,
                [("out_file", "other_out_files"), ("face_mask", "other_face_masks")],
            ),
            (coregister, outputnode, [("transform", "other_transforms")]),
        ]
    connections.append((inputnode, register, [("init_transform", "init_transform")]))
    if outputs is not None:
        outputs_wf = init_outputs_wf(outputs)
        connections += [
            (outputnode, outputs_wf, [(f, f"inputnode.{f}") for f in outputs.destinations]),
        ]
    workflow.connect(connections)
    return workflow


def init_apply_wf(
    *,
    in_file: str | Path,
    face_mask: str | Path,
    outputs: Outputs,
    transform: str | Path | None = None,
    xmask: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    fill_const: tuple[float, float] | None = None,
    stat_frame: int = STAT_FRAME,
    name: str = "apply_wf",
) -> pe.Workflow:
    """Deface ``in_file`` with a face mask made before (FreeSurfer's ``--apply``).

    ::

        apply_mask (in_file, face_mask, transform, xmask) -> outputs_wf (Publish)
        outputnode(out_file, face_mask, stats)

    ``transform`` is a 4x4 RAS text matrix, ``in_file`` mm -> ``face_mask`` mm (None: the same
    scanner space); ``xmask`` an exclusion mask on the face mask's grid. ``outputs`` says where
    ``out_file`` (and any sidecar) is published.

    Outputs
    -------
    out_file
        the defaced volume: ``in_file``'s grid, dtype, header and scaling
    face_mask
        the face mask resampled onto ``in_file``'s grid
    stats
        JSON: the compartment statistics of ``in_file``, seconds
    """
    workflow = pe.Workflow(name=name)
    optional = {"transform": transform, "xmask": xmask}
    apply_mask = pe.Node(
        ApplyFaceMask(
            in_file=str(in_file),
            face_mask=str(face_mask),
            seed=seed,
            stat_frame=stat_frame,
            **{field: str(path) for field, path in optional.items() if path is not None},
            **({"fill_const": tuple(fill_const)} if fill_const is not None else {}),
        ),
        name="apply_mask",
        mem_gb=0.5,
        n_procs=1,
    )
    outputnode = pe.Node(
        IdentityInterface(fields=["out_file", "face_mask", "stats"]), name="outputnode"
    )
    sink = init_outputs_wf(outputs)
    workflow.connect(
        [
            (apply_mask, sink, [("out_file", "inputnode.out_file")]),
            (
                apply_mask,
                outputnode,
                [("out_file", "out_file"), ("face_mask", "face_mask"), ("out_stats", "stats")],
            ),
        ]
    )
    return workflow


def run_workflow(workflow: pe.Workflow, work_dir: str | Path, *, n_procs: int = 1):
    """Run ``workflow`` in ``work_dir`` (its crash files too): on MultiProc with ``n_procs`` > 1,
    else Linear. The one way the ``mideface`` command and ``mideface_nipype.deface`` run it."""
    work_dir = Path(work_dir).resolve()
    workflow.base_dir = str(work_dir)
    # the graph copied Nipype's settings (crash folder: the current one) when it was made, and
    # its copy wins over the global settings; its nodes take theirs from it
    workflow.config["execution"]["crashdump_dir"] = str(work_dir)
    if n_procs > 1:
        return workflow.run(plugin=MultiProcPlugin(plugin_args={"n_procs": n_procs}))
    return workflow.run(plugin="Linear")
