"""The ``mideface`` command line: help, version, --check, --demo, and the wiring of every flag
into the graph, built without running it (bad input and output: see test_nothing_lost.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import HEADS_DIR, default_run

from mideface_nipype import __version__
from mideface_nipype.cli import mideface as cli
from mideface_nipype.reports import report
from mideface_nipype.workflows.multiproc import MultiProcPlugin

SAMPLE = HEADS_DIR / "IXI015-HH-1258-T1_ds.nii.gz"


def _run(args, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_help_explains_the_options():
    proc = subprocess.run(
        [sys.executable, "-m", "mideface_nipype.cli.mideface", "--help"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    for option in (
        "--i",
        "--o",
        "--odir",
        "--xmask",
        "--fill-const",
        "--seed",
        "--demo",
        "--check",
    ):
        assert option in proc.stdout
    assert "exclusion mask" in proc.stdout


def test_help_loads_neither_nipype_nor_ants():
    """``--help`` answers at once: the heavy libraries load only when a run needs them."""
    code = (
        "import sys\n"
        "from mideface_nipype.cli import mideface as cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('nipype', 'ants') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]"), proc.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_input_is_an_error(capsys):
    code, err = _run([], capsys)
    assert code == 1 and "--i" in err


@pytest.mark.slow
def test_demo_defaces_the_bundled_head_and_check_finds_the_code(tmp_path, capsys):
    out = tmp_path / "demo"
    code, _ = _run(["--demo", out], capsys)
    assert code == 0
    assert (out / "defaced.nii.gz").is_file() and (out / "stats.json").is_file()
    code, _ = _run(["--check", out / "defaced.nii.gz", tmp_path / "check.txt"], capsys)
    assert code == 0
    assert (tmp_path / "check.txt").read_text().strip() == "1"
    cli.main(["--check", str(SAMPLE)])
    assert capsys.readouterr().out.strip() == "0"


@pytest.mark.slow
def test_every_module_logs_into_the_odir_log():
    """One logger hierarchy: the engine modules' lines (``mideface_nipype.engine.register``,
    ``.segment``) reach ``--odir``'s log beside the command's own, in the command's format."""
    log = (default_run("dcmqa-xa30_T1w_2mm.nii.gz", "--pics") / "log" / "mideface.log").read_text()
    for line in (
        r"mideface: mideface-nipype \S+: .+ -> .+defaced\.nii\.gz",  # cli/mideface.py
        r"mideface: head mask done",  # interfaces/_base.py
        r"mideface: Affine registration: head Dice 0\.\d+, pose ratio \d",  # engine/register.py
        r"mideface: segmentation EM: \d+ iterations",  # engine/segment.py
        r"mideface: done in",
    ):
        assert re.search(rf"^\d\d:\d\d:\d\d {line}", log, re.M), (line, log)


# ----------------------------------------------------------------------------- wiring of the flags


class _Built(BaseException):
    """Stops ``mideface`` where its graph would start running (not an error it reports)."""


@pytest.fixture
def graph_of(monkeypatch, tmp_path):
    """``mideface --i IN_FILE ARGS`` up to the start of its run: (the workflow as built, the
    plugin, its arguments). Nothing is computed or written."""
    from nipype.pipeline import engine as pe

    def build(*argv, in_file: Path = SAMPLE) -> tuple:
        seen = {}

        def run(workflow, plugin=None, plugin_args=None, updatehash=False):
            seen.update(workflow=workflow, plugin=plugin, plugin_args=plugin_args)
            raise _Built

        monkeypatch.setattr(pe.Workflow, "run", run)
        outputs = [] if "--odir" in argv else ["--o", tmp_path / "out" / "defaced.nii.gz"]
        with pytest.raises(_Built):
            cli.main([str(a) for a in ["--i", in_file, *outputs, *argv]])
        assert not [p for p in tmp_path.rglob("*defaced*") if p.is_file()]  # nothing published
        return seen["workflow"], seen["plugin"], seen["plugin_args"]

    return build


def _feeds(workflow, node: str, field: str) -> list[tuple[str, str]]:
    """(node, output) connected to ``node.field``."""
    target = workflow.get_node(node)
    return [
        (src.name, out)
        for src, _, data in workflow._graph.in_edges(target, data=True)
        for out, dst in data["connect"]
        if dst == field
    ]


def _inputs(workflow, node: str, *fields: str) -> tuple:
    """The values set on ``node``'s inputs (None where unset)."""
    from nipype.interfaces.base import isdefined

    values = [getattr(workflow.get_node(node).inputs, f) for f in fields]
    return tuple(v if isdefined(v) else None for v in values)


def _copy(src: Path, dst: Path, frames: int = 1) -> Path:
    img = nib.load(src)
    data = np.asanyarray(img.dataobj)
    nib.save(
        nib.Nifti1Image(np.stack([data] * frames, -1) if frames > 1 else data, img.affine), dst
    )
    return dst


def test_default_graph(graph_of):
    from mideface_nipype.engine import exclusion, fill

    wf, plugin, _ = graph_of()
    assert plugin == "Linear"
    names = set(wf.list_node_names())
    assert {"head_mask", "register", "project", "bracket", "deface", "report"} <= names
    assert not names & {"pics", "coregister", "apply_mask", "exclusion"}
    assert exclusion.DEFAULT_XMASK_SOURCE == "segment"
    assert _feeds(wf, "bracket", "xmask") == [("segment", "out_file")]
    assert _inputs(wf, "inputnode", "in_file", "xmask", "init_transform", "other_files") == (
        str(SAMPLE.resolve()),
        None,
        None,
        None,
    )
    assert _inputs(wf, "bracket", "ears", "forehead", "back_of_head", "ripple") == (
        True,
        False,
        False,
        False,
    )
    assert _inputs(wf, "deface", "seed", "stat_frame", "fill_const") == (
        fill.DEFAULT_SEED,
        fill.STAT_FRAME,
        None,
    )
    options = wf.get_node("report").inputs.options
    assert options["i"] == str(SAMPLE) and options["samseg"] is True


def test_exclusion_mask_flags_choose_its_source(graph_of, tmp_path):
    wf, _, _ = graph_of("--no-samseg")
    assert "segment" not in wf.list_node_names()
    assert _feeds(wf, "bracket", "xmask") == [("exclusion", "out_file")]
    assert _feeds(wf, "outputnode", "exclusion_mask") == [("exclusion", "out_file")]
    img = nib.load(SAMPLE)
    xmask = tmp_path / "xmask.nii.gz"
    protect = np.zeros(img.shape[:3], np.uint8)
    protect[20:40, 20:40, 20:40] = 1
    nib.save(nib.Nifti1Image(protect, img.affine), xmask)
    wf, _, _ = graph_of("--xmask", xmask)
    assert not {"segment", "exclusion"} & set(wf.list_node_names())
    assert _feeds(wf, "bracket", "xmask") == [("inputnode", "xmask")]
    assert _inputs(wf, "inputnode", "xmask") == (str(xmask.resolve()),)


def test_what_to_deface_and_ripple_reach_the_bracket(graph_of):
    from mideface_nipype.engine import bracket

    wf, _, _ = graph_of("--forehead", "--back-of-head", "--no-ears", "--ripple")
    assert _inputs(wf, "bracket", "ears", "forehead", "back_of_head", "ripple") == (
        False,
        True,
        True,
        True,
    )
    amp_period = _inputs(wf, "bracket", "ripple_amp_mm", "ripple_period_mm")
    assert amp_period == (bracket.RIPPLE_AMP_MM, bracket.RIPPLE_PERIOD_MM)
    wf, _, _ = graph_of("--ripple", "3", "25")
    assert _inputs(wf, "bracket", "ripple", "ripple_amp_mm", "ripple_period_mm") == (
        True,
        3.0,
        25.0,
    )


def test_fill_flags_reach_the_fill(graph_of, tmp_path):
    wf, _, _ = graph_of("--fill-const", "1000", "0", "--seed", "7")
    assert _inputs(wf, "deface", "fill_const", "seed") == ((1000.0, 0.0), 7)
    wf, _, _ = graph_of("--fill-zero")
    assert _inputs(wf, "deface", "fill_const") == ((0.0, 0.0),)
    series = _copy(SAMPLE, tmp_path / "series.nii.gz", frames=2)
    wf, _, _ = graph_of("--statframe", "1", in_file=series)
    assert _inputs(wf, "deface", "stat_frame") == (1,)


def test_other_contrasts_threads_init_reg_and_pics(graph_of, tmp_path):
    t2 = _copy(SAMPLE, tmp_path / "t2.nii.gz")
    wf, _, _ = graph_of("--apply-to", t2, "--regheader", "--fill-zero", "--seed", "9")
    assert _inputs(wf, "inputnode", "other_files") == ([str(t2.resolve())],)
    assert _inputs(wf, "coregister", "regheader") == (True,)
    assert _inputs(wf, "apply_mask", "seed", "fill_const") == (9, (0.0, 0.0))
    assert _feeds(wf, "apply_mask", "xmask") == [("segment", "out_file")]
    wf, _, _ = graph_of("--apply-to", t2)
    assert _inputs(wf, "coregister", "regheader") == (False,)
    assert _inputs(wf, "register", "search_grid") == (True,)
    assert _feeds(wf, "coregister", "reference_search_grid") == [("register", "search_grid")]
    _, plugin, plugin_args = graph_of("--threads", "2")
    plugin.pool.shutdown()
    assert isinstance(plugin, MultiProcPlugin) and plugin_args is None
    assert (plugin.plugin_args, plugin.processors) == ({"n_procs": 2}, 2)
    matrix = tmp_path / "init.txt"
    np.savetxt(matrix, np.eye(4))
    wf, _, _ = graph_of("--init-reg", matrix)
    assert _inputs(wf, "inputnode", "init_transform") == (str(matrix.resolve()),)
    assert _inputs(wf, "register", "search_grid") == (False,)  # nobody searches against it
    wf, _, _ = graph_of("--odir", tmp_path / "od", "--pics", "--mgz")
    assert _feeds(wf, "report", "pictures") == [("pics", "pictures")]
    assert wf.get_node("report").inputs.options["fmt"] == "mgz"


def test_every_output_is_named_and_published_by_the_graphs_sink(graph_of, tmp_path):
    """The command only checks, builds and runs: its graph's last node, ``outputs_wf.publish``,
    gets every output, where it goes (``workflows.outputs``'s names) and the sidecar text."""
    head = tmp_path / "in" / "sub-01_T1w.nii.gz"
    head.parent.mkdir()
    head.write_bytes(SAMPLE.read_bytes())
    t2 = _copy(SAMPLE, tmp_path / "in" / "sub-01_T2w.nii.gz")
    od, face = tmp_path / "od", tmp_path / "fm.nii.gz"
    argv = ["--odir", od, "--mgz", "--pics", "--facemask", face, "--apply-to", t2]
    wf, _, _ = graph_of(*argv, in_file=head)
    sink = wf.get_node("outputs_wf.publish").inputs
    assert sink.destinations["out_file"] == [str(od / "defaced.mgz")]
    assert sink.destinations["face_mask"] == [str(face), str(od / "face.mask.mgz")]
    assert sink.destinations["other_out_files"] == [str(od / "sub-01_T2w_defaced.nii.gz")]
    assert sink.destinations["pictures"] == [str(od / name) for name in report.PICTURES]
    names = {Path(p).name for paths in sink.destinations.values() for p in paths}
    assert {"seg.mgz", "segmentation.png", "stats.json", "head.defaced.surf.gii"} <= names
    assert sink.together == str(od) and sink.force is False
    assert str(head) in sink.reads and str(head.with_suffix("").with_suffix(".json")) in sink.reads
    sidecars = {Path(p).name: json.loads(text) for p, text in sink.texts.items()}
    assert list(sidecars) == ["defaced.json", "sub-01_T2w_defaced.json"]
    record = sidecars["defaced.json"]["Defacing"]
    assert record["FaceMask"] == str(face.resolve()) and record["Options"]["fmt"] == "mgz"
    # every field the sink publishes reaches it from the engine
    assert _feeds(wf, "outputnode", "other_out_files") == [("apply_mask", "out_file")]
    fed = {
        dst
        for _, _, data in wf._graph.out_edges(wf.get_node("outputnode"), data=True)
        for _, dst in data["connect"]
    }
    assert fed == {f"inputnode.{field}" for field in sink.destinations}


def test_mgz_and_o_without_suffix_name_the_outputs():
    parser = cli.build_parser()
    for argv, expected in (
        (["--odir", "od", "--mgz"], ("od/defaced.mgz", "od", ".mgz")),
        (["--odir", "od", "--nii"], ("od/defaced.nii", "od", ".nii")),
        (["--odir", "od"], ("od/defaced.nii.gz", "od", ".nii.gz")),
        (["--o", "out", "--mgz"], ("out/defaced.mgz", "out", ".mgz")),
        (["--o", "x.mgz"], ("x.mgz", None, ".nii.gz")),
    ):
        out, odir, suffix = cli._resolve_outputs(parser.parse_args(argv), SAMPLE)
        assert (str(out), odir and str(odir), suffix) == expected, argv


def test_relative_output_paths_are_published_where_the_user_is(tmp_path, monkeypatch):
    """The sink runs in its node's folder: relative --o/--odir/--apply paths must still land
    in the user's working folder, not in the work folder that is removed after the run."""
    from mideface_nipype.workflows.outputs import odir_outputs

    monkeypatch.chdir(tmp_path)
    outputs = odir_outputs(
        "in.nii.gz", out_file="o/defaced.nii.gz", odir="o", suffix=".nii.gz", reads=["in.nii.gz"]
    )
    assert all(path.is_absolute() and path.is_relative_to(tmp_path) for path in outputs.paths)
    assert Path(outputs.together) == tmp_path / "o" and Path(outputs.reads[0]).is_absolute()

    mask = default_run("dcmqa-xa30_T1w_2mm.nii.gz", "--pics") / "face.mask.nii.gz"
    head = HEADS_DIR / "dcmqa-xa30_T1w_2mm.nii.gz"
    assert cli.main(["--apply", str(head), str(mask), "regheader", "applied.nii.gz"]) == 0
    assert (tmp_path / "applied.nii.gz").is_file()
