"""The FusionReport: one entry per all-reduce, fused or not, and why.

``report.to_dict()`` is a public shape (the CLI's ``--json`` prints it)::

    {"sites": [{"all_reduce": str, "fused": bool, "variant": str | None,
                "backend": str | None, "hoisted_over": [str], "reason": str | None,
                "table": str | None, "token_range": [int, int | None] | None,
                "rule": str | None}, ...]}

``table``: which crossover table admitted a fused site (``"shipped table"`` or
``"measured table FILE"``; None for a backend without one); ``token_range``: the range
of token counts the graph was compiled for (vLLM's compile range), None outside one;
``rule``: the selector's rule that chose the backend of a fused site, or declined a
recognized one (``fusion_passes.backends.selector``: e.g. ``"option"``, ``"gpu: shipped
table"``, ``"gpu: no fused kernel"``), None where no backend was asked.

plus ``"errors"`` (internal errors the pass recovered from; empty when all went well).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class SiteReport:
    """What happened to one all-reduce."""

    all_reduce: str
    fused: bool = False
    variant: str | None = None
    backend: str | None = None
    hoisted_over: list[str] = dataclasses.field(default_factory=list)
    reason: str | None = None
    table: str | None = None
    token_range: tuple[int, int | None] | None = None
    rule: str | None = None
    # not part of the public dict: where the blocker sits, for `explain`
    blocker: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "all_reduce": self.all_reduce,
            "fused": self.fused,
            "variant": self.variant,
            "backend": self.backend,
            "hoisted_over": list(self.hoisted_over),
            "reason": self.reason,
            "table": self.table,
            "token_range": None if self.token_range is None else list(self.token_range),
            "rule": self.rule,
        }


@dataclasses.dataclass
class FusionReport:
    """Every all-reduce site of one graph, in graph order, and any recovered errors."""

    sites: list[SiteReport] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    merged_duplicates: int = 0
    """Nodes removed as identical copies of another before matching (fusion_passes.dedup)."""

    @property
    def fused(self) -> list[SiteReport]:
        return [s for s in self.sites if s.fused]

    @property
    def unfused(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.fused]

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [s.to_dict() for s in self.sites], "errors": list(self.errors)}

    def summary(self) -> str:
        """One line: ``3/4 all-reduces fused (...)``."""
        kinds: dict[str, int] = {}
        for s in self.fused:
            kinds[s.variant or "?"] = kinds.get(s.variant or "?", 0) + 1
        detail = ", ".join(f"{v} x{n}" for v, n in sorted(kinds.items()))
        text = f"{len(self.fused)}/{len(self.sites)} all-reduces fused"
        return text + (f" ({detail})" if detail else "")

    def table(self) -> str:
        """A plain-text table, one row per site."""
        rows = [("all_reduce", "fused", "variant / reason", "backend", "hoisted over")]
        for s in self.sites:
            rows.append((
                s.all_reduce,
                "yes" if s.fused else "no",
                ((s.variant or "") + (f" ({s.reason})" if s.reason else "")) if s.fused else (s.reason or ""),
                s.backend or "",
                ", ".join(s.hoisted_over),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        return "\n".join(line.rstrip() for line in lines)

    def merge(self, other: "FusionReport") -> None:
        """Append another graph's report (a model compiled as several graphs)."""
        self.sites.extend(other.sites)
        self.errors.extend(other.errors)
        self.seconds += other.seconds
