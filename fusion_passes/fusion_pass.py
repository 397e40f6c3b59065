"""FusionPass: the Inductor post-grad custom pass (recognize -> hoist -> match -> rewrite -> report)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import time
import dataclasses
from typing import Callable

from torch.fx import Graph

from fusion_passes import _compat, compile_range, dedup, inductor_store, ops  # noqa: F401  (ops registers the fused ops)
from fusion_passes.backends import calibrate
from fusion_passes.match import Declined, find_site
from fusion_passes.options import FusionOptions
from fusion_passes.recognize.fx import source_of
from fusion_passes.recognize import AllReduce, Miss, all_reduce
from fusion_passes.report import FusionReport, SiteReport
from fusion_passes.recognize.fx import FakeVals
from fusion_passes.rewrite import Unfused, rewrite

log = logging.getLogger("fusion_passes")


_ROOT = pathlib.Path(__file__).resolve().parent
NOT_IN_KEY = frozenset({"cli"})
"""Folders at the top of the package whose sources cannot change a graph: the command
line (``cli/``, which the pass never imports). Everything else is in the key: the
engine, ``backends/`` and the catalogue ``patterns/``."""


@functools.lru_cache(maxsize=None)
def source_hash(root: pathlib.Path | None = None) -> str:
    """sha256 of the sources that can change a compiled graph: every ``.py`` of the package
    at *root* (default: this one) but those under :data:`NOT_IN_KEY`, and its ``.json`` data
    (the shipped per-GPU tables, fusion_passes/backends/tables)."""
    root = _ROOT if root is None else root
    h = hashlib.sha256()
    files = []
    for top, dirs, names in os.walk(root):
        at_top = pathlib.Path(top) == root
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not (at_top and d in NOT_IN_KEY))
        files += [pathlib.Path(top, n) for n in sorted(names) if n.endswith((".py", ".json"))]
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


class FusionPass(_compat.CustomGraphPass):
    """Fuse every tensor-parallel all-reduce that feeds a residual add + RMSNorm.

    Use as ``torch._inductor.config.post_grad_custom_post_pass`` (or through
    :func:`fusion_passes.install`). After each call :attr:`report` holds the
    :class:`~fusion_passes.report.FusionReport` of the graph just processed and
    :attr:`reports` every report since construction. Never raises: an internal error
    leaves the graph as it was, logs one warning and is recorded in the report.
    """

    def __init__(self, **options):
        self.options = FusionOptions(**options)
        self.report = FusionReport()
        self.reports: list[FusionReport] = []
        self.after_hoist: Callable[[Graph], None] | None = None
        """Optional ``callable(graph)`` run between hoisting and matching (a debugging hook:
        ``fusion-passes dump`` records the hoisted graph with it). Not part of :meth:`uuid`."""

    def uuid(self) -> str:
        """The FX-graph cache key: changes with the sources that can change a graph (the
        engine, the backends, the catalogue; not the command line: :data:`NOT_IN_KEY`), with
        the options and with the measured-table file (a graph compiled under another table
        is not reused)."""
        from fusion_passes.backends import measured

        opts = json.dumps(dataclasses.asdict(self.options), sort_keys=True)
        return hashlib.sha256(f"{source_hash(_ROOT)}|{opts}|{measured.file_digest()}".encode()).hexdigest()

    def __call__(self, graph: Graph) -> None:
        start = time.perf_counter()
        report = FusionReport()
        if any(all_reduce(n) is not None for n in graph.nodes):
            backup = _compat.snapshot_graph(graph)
            try:
                with calibrate.enabled(calibrate.requested(self.options.calibrate)):
                    self._run(graph, report, backup)
                graph.lint()
            except Exception as e:  # noqa: BLE001 - a pass must never break compilation
                _compat.restore_graph(graph, backup)
                msg = f"fusion_passes: internal error, graph left unchanged: {type(e).__name__}: {e}"
                log.warning(msg)
                report.errors.append(msg)
                for s in report.sites:
                    s.fused, s.variant, s.backend, s.reason = False, None, None, "pass failed: graph unchanged"
                    s.rule = None
        report.seconds = time.perf_counter() - start
        self.report = report
        self.reports.append(report)
        log.info("fusion_passes: %s in %.1f ms", report.summary(), report.seconds * 1e3)

    def _run(self, graph: Graph, report: FusionReport, backup: list) -> None:
        from fusion_passes import hoist

        frozen: frozenset = frozenset()
        first: dict = {}
        while True:  # each round freezes more all-reduces, so this ends
            hoisted = self._hoist_and_fuse(graph, report, frozen)
            undo = hoist.wasted(hoisted, report) - frozen
            if not undo:
                break
            # moves that led to no fused site: put the graph back and run without them
            first.update({s.all_reduce: s for s in report.sites if s.all_reduce in undo})
            _compat.restore_graph(graph, backup)
            report.sites.clear()
            frozen |= undo
        for entry in report.sites:
            if entry.all_reduce in first and not entry.fused:
                before = first[entry.all_reduce]
                entry.reason = f"not fused, graph unchanged at this site: {before.reason}"
                entry.blocker, entry.source, entry.rule = before.blocker, before.source, before.rule
        hoist.report_merged(hoisted, report)  # all-reduces merged into a partner keep an entry

    def _hoist_and_fuse(self, graph: Graph, report: FusionReport, frozen: frozenset):
        """Hoist (all-reduces in *frozen* stay put), then match and rewrite every site."""
        from fusion_passes import hoist
        from fusion_passes.recognize import meaning

        meaning.forget(graph)
        opts = self.options
        hoisted = hoist.run(graph, opts, frozen) if opts.hoist else hoist.HoistResult()
        # what the compile without the pass would store (and round), read before any rewrite
        stores = inductor_store.analyse(graph)
        # one chain for identical quants of one value (HF FP8: q/k/v each quantize the norm output)
        report.merged_duplicates = dedup.merge_identical(
            graph, [a.value for n in graph.nodes if isinstance(a := all_reduce(n), AllReduce)])
        if self.after_hoist is not None:  # `fusion-passes dump` records this stage
            self.after_hoist(graph)
        fake_vals = FakeVals(graph)
        # Match each site on the graph as the previous rewrites left it: a site's residual
        # is often the previous site's sum, which that rewrite has just replaced.
        with inductor_store.reading(stores):
            self._match_and_rewrite(graph, report, hoisted, fake_vals, stores)
        return hoisted

    def _match_and_rewrite(self, graph: Graph, report: FusionReport, hoisted, fake_vals: FakeVals, stores) -> None:
        from fusion_passes.recognize import meaning

        opts = self.options
        for node in [n for n in graph.nodes if all_reduce(n) is not None]:
            entry = SiteReport(node.name, hoisted_over=list(hoisted.hoisted_over.get(node.name, [])),
                               token_range=compile_range.current())
            entry.source = _source_line(node)
            report.sites.append(entry)
            found = all_reduce(node)
            site = found if isinstance(found, Miss) else find_site(found, opts.backend)
            if isinstance(site, Miss) and not isinstance(site, (meaning.DeepMiss, Declined)):
                site = hoisted.stopped.get(node.name, site)  # names the op that stopped hoisting
            if isinstance(site, Miss):
                entry.reason, entry.blocker = site.reason, getattr(site.node, "name", None)
                entry.rule = getattr(site, "rule", None)  # a Declined site: the selector's rule
                entry.source = _source_line(site.node) or entry.source
                continue
            try:
                fused = rewrite(graph, site, fake_vals, opts.backend)
            except Unfused as e:  # an output would change dtype or shape: the site stays
                entry.reason, entry.blocker = str(e), site.norm.out.name
                continue
            entry.fused, entry.variant, entry.backend, entry.reason = True, site.family.name, site.backend, site.note
            entry.table, entry.rule = _table_of(site), site.rule
            if site.add is not None:
                stores.same_as(fused, site.add)  # the next site's residual: stored or not, as the sum was


def _table_of(site) -> str | None:
    """Which crossover table admitted *site* (its backend's ``table_source``), if it has one."""
    from fusion_passes import backends
    from fusion_passes.match import compile_time_call

    return backends.table_source(site.backend, compile_time_call(site.family.variant, site.ar, site.norm, site.quant))


def _source_line(node) -> str | None:
    """The last ``File ..., line N`` of the node's stack trace: the model source it came from."""
    return source_of(node.meta.get("stack_trace") if node is not None else None)[0]
