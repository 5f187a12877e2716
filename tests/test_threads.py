"""Numeric libraries use only the threads their node was given (issue: threads obey the node)."""

from __future__ import annotations

import os

from nipype.interfaces.base import TraitedSpec, traits
from nipype.pipeline import engine as pe
from threadpoolctl import threadpool_info

from mideface_nipype.interfaces._base import StepInputSpec, StepInterface
from mideface_nipype.utils.threads import limit_threads
from mideface_nipype.workflows.base import init_mideface_wf


def _pool_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info()}


def test_limit_threads_caps_every_pool_and_restores_it():
    before = _pool_threads()
    with limit_threads(1):
        assert _pool_threads() == {1}
        assert os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"
    assert _pool_threads() == before


class _Out(TraitedSpec):
    threads = traits.List(traits.Int)


class _Probe(StepInterface):
    """Records the BLAS/OpenMP thread counts it runs with."""

    input_spec = StepInputSpec
    output_spec = _Out

    def _run_interface(self, runtime):
        self._results["threads"] = sorted(_pool_threads())
        return runtime


def test_a_node_runs_with_its_n_procs(tmp_path):
    for n_procs in (1, 2):
        node = pe.Node(_Probe(), name=f"probe{n_procs}", n_procs=n_procs, base_dir=str(tmp_path))
        assert node.inputs.num_threads == n_procs
        assert node.run().outputs.threads == [n_procs]


def test_every_node_of_the_graph_limits_its_threads():
    wf = init_mideface_wf(other_contrasts=["x.nii.gz"], pics=True, omp_nthreads=2)
    assert wf.get_node("segment").n_procs == 2
    assert wf.get_node("register").n_procs == 1  # ANTs: one thread, reproducible
    for name in wf.list_node_names():
        node = wf.get_node(name)
        interface = node.interface
        if type(interface).__module__.startswith("nipype."):  # IdentityInterface, Merge
            continue
        assert isinstance(interface, StepInterface), name
        assert interface.inputs.num_threads == node.n_procs, name
