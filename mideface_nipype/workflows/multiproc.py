"""Nipype's MultiProc plugin, with a failed node that left no result failing its graph.

When a node fails and its result file cannot be written either (its work folder's disk is
full), Nipype's worker raises while reporting the failure: the task's completion is dropped and
MultiProc waits for it forever (measured: ``mideface-bids`` on a 2 MB work folder still waited
after 10 minutes). Here such a task counts as failed, with the worker's error as its traceback,
so the graph ends and the command reports the full work folder.
"""

from __future__ import annotations

import traceback

from nipype.pipeline.plugins.multiproc import MultiProcPlugin as NipypeMultiProcPlugin


class MultiProcPlugin(NipypeMultiProcPlugin):
    """``plugin="MultiProc"`` for ``Workflow.run``, as an instance (``plugin_args`` alike)."""

    def _async_callback(self, args):
        if args.exception() is None:  # a raising worker: _get_result reports it
            super()._async_callback(args)

    def _get_result(self, taskid):
        result = super()._get_result(taskid)
        future = self._task_obj.get(taskid)
        if result is None and future is not None and future.done() and future.exception():
            lines = traceback.format_exception(future.exception())
            return {"result": None, "traceback": lines, "taskid": taskid}
        return result
