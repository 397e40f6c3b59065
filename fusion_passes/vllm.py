"""vLLM integration: :class:`VllmFusionPass` and the ``vllm.general_plugins`` hook.

Two routes, both documented in ``docs/vllm.md``:

* **config** (no plugin, nothing global)::

      from fusion_passes.vllm import VllmFusionPass
      LLM(..., compilation_config={"inductor_compile_config": {
          "post_grad_custom_post_pass": VllmFusionPass()}})

  vLLM appends the pass AFTER its own fusions (``PostGradPassManager.add``).

* **plugin**: ``FUSION_PASSES_VLLM=1`` in the environment of every vLLM process. The
  ``vllm.general_plugins`` entry point :func:`register` then inserts the pass right after
  vLLM's ``NoOpEliminationPass``, before vLLM's norm+quant and all-reduce fusions, so it
  sees the all-reduce -> norm -> quant chains intact.

The pass wraps :class:`fusion_passes.FusionPass` (no logic of its own). It is picklable
(vLLM deep-copies and hashes its compilation config), holds no process-group state, and
resolves tensor-parallel groups lazily, inside ``__call__``, through vLLM's
``parallel_state`` (see :mod:`fusion_passes.groups`).
"""

from __future__ import annotations

import logging
import os

from vllm.compilation.passes.inductor_pass import InductorPass

from fusion_passes import compile_range
from fusion_passes.fusion_pass import FusionPass
from fusion_passes.options import FusionOptions

log = logging.getLogger("fusion_passes")

ENV = "FUSION_PASSES_VLLM"
"""The ONE switch of the plugin route: ``1`` / ``true`` / ``on`` enables it."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
_warned: set[str] = set()


class VllmFusionPass(InductorPass):
    """:class:`fusion_passes.FusionPass` as a vLLM ``InductorPass``.

    ``options`` are :class:`fusion_passes.FusionOptions` fields. ``max_tokens``: skip
    compile ranges that start above this many tokens (``None``: every range; the backend
    selector still decides per call at run time). After each graph, :attr:`report` holds
    the :class:`~fusion_passes.FusionReport` of that graph and :attr:`reports` all of them
    (per process; not pickled).
    """

    def __init__(self, max_tokens: int | None = None, **options):
        FusionOptions(**options)  # validate now: a bad option fails at config time
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"fusion_passes: max_tokens must be a positive int or None, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.options = dict(options)
        self._fusion: FusionPass | None = None

    @property
    def fusion(self) -> FusionPass:
        """The wrapped pass, created on first use (in the compiling process)."""
        if self._fusion is None:
            self._fusion = FusionPass(**self.options)
        return self._fusion

    @property
    def report(self):
        """The report of the last graph this pass rewrote."""
        return self.fusion.report

    @property
    def reports(self):
        """Every report since this object was created (or unpickled)."""
        return self.fusion.reports

    def __call__(self, graph) -> None:
        lo, hi = _compile_range()
        with compile_range.serving(lo, hi):  # the selector sees the range (Call.token_range)
            self.fusion(graph)

    def uuid(self) -> str:
        """Library sources + options + token limit: Inductor's FX-graph cache key part."""
        return InductorPass.hash_dict({"fusion": self.fusion.uuid(), "max_tokens": self.max_tokens})

    def is_applicable_for_range(self, compile_range) -> bool:
        """False for vLLM compile ranges that start above :attr:`max_tokens`."""
        if self.max_tokens is None:
            return True
        start = getattr(compile_range, "start", None)
        return start is None or start <= self.max_tokens

    def __getstate__(self):
        return {"max_tokens": self.max_tokens, "options": self.options, "_fusion": None}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
        return f"VllmFusionPass(max_tokens={self.max_tokens!r}{', ' if opts else ''}{opts})"


def _compile_range() -> tuple[int | None, int | None]:
    """vLLM's compile range of the graph being compiled (``PassContext.compile_range``,
    inclusive), or ``(None, None)`` outside vLLM's pass manager."""
    from vllm.compilation.passes import inductor_pass

    if getattr(inductor_pass, "_pass_context", None) is None:
        return None, None
    r = inductor_pass.get_pass_context().compile_range
    start, end = getattr(r, "start", None), getattr(r, "end", None)
    if not isinstance(start, int) or not isinstance(end, int):
        return None, None
    return start, end


def enabled_by_env(environ=os.environ) -> bool:
    """Whether :data:`ENV` switches the plugin route on. A value that is neither on nor off
    (``enable``, a typo) leaves it off with one warning naming the accepted values."""
    value = environ.get(ENV, "").strip().lower()
    if value not in _TRUE + _FALSE and value not in _warned:
        _warned.add(value)
        log.warning("fusion_passes: %s=%r is not understood, so the plugin stays off; on: %s; off: %s",
                    ENV, environ.get(ENV), ", ".join(_TRUE), ", ".join(repr(v) for v in _FALSE))
    return value in _TRUE


def insert_after_noop_elimination(passes: list, fusion: InductorPass) -> int:
    """Insert *fusion* into a pass-manager list right after ``NoOpEliminationPass`` (at the
    front when there is none: vLLM runs it first when enabled). Returns the index used.
    Idempotent: a list that already holds a :class:`VllmFusionPass` is left as it is."""
    from vllm.compilation.passes.utility.noop_elimination import NoOpEliminationPass

    for i, p in enumerate(passes):
        if isinstance(p, VllmFusionPass):
            return i
    at = next((i + 1 for i, p in enumerate(passes) if isinstance(p, NoOpEliminationPass)), 0)
    passes.insert(at, fusion)
    return at


_PATCHED = "_fusion_passes_configure"


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Does nothing unless :data:`ENV` is set.

    When set, wraps ``PostGradPassManager.configure`` so every pass manager vLLM builds
    (one per compiled model, in every worker) gets a :class:`VllmFusionPass` right after
    its ``NoOpEliminationPass``. Safe to call many times (vLLM loads plugins per process).
    """
    if not enabled_by_env():
        return
    from vllm.compilation.passes.pass_manager import PostGradPassManager

    if getattr(PostGradPassManager.configure, _PATCHED, False):
        return
    original = PostGradPassManager.configure

    def configure(self, config) -> None:
        original(self, config)
        at = insert_after_noop_elimination(self.passes, VllmFusionPass())
        log.info("fusion_passes: VllmFusionPass inserted at position %d of vLLM's post-grad passes", at)

    setattr(configure, _PATCHED, True)
    configure.__doc__ = original.__doc__
    PostGradPassManager.configure = configure
    log.info("fusion_passes: vLLM plugin enabled by %s", ENV)


__all__ = ["ENV", "VllmFusionPass", "enabled_by_env", "insert_after_noop_elimination", "register"]
