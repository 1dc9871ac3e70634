"""FusionPass: the post-grad custom pass that applies every enabled fusion family.

    p = FusionPass()                                          # all families, all schemes
    fn = torch.compile(fn, options={"post_grad_custom_post_pass": p})

Patterns are registered once per pass object, under fake tensors (no kernel runs). Each family
gets its own ``PatternMatcherPass``; matches are labelled ``<family>/<variant>/<dtype>`` from the
fused nodes they create, and accounted per pass object (never globally).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch._inductor.pattern_matcher as pm
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._subclasses.fake_tensor import FakeTensorMode

import fusion_ops
import patterns
from patterns import (
    FAMILIES,
    GraphPatternSpec,
    PatternSpec,
    plain_norms,
    quant_variants,
    vllm_sources,
)
from patterns.base import HOPS, val

from .accounting import GraphRecord, count_fusion_ops
from .dumps import Dumper, readable, resolve_dump_dir, trace_graph
from .inductor_launch import lower_fused_norm_quant

ALL_SCHEMES = tuple(fusion_ops.SCHEMES)
ALL_FUSIONS = tuple(FAMILIES)
NUMERICS = ("exact", "tolerant")


def tolerant_label(label: str) -> str:
    """A match that took a plain-PyTorch norm: ``<family>/<variant>+tolerant/<dtype>``."""
    family, variant, dtype = label.split("/")
    return f"{family}/{variant}+tolerant/{dtype}"


def _source_files() -> tuple[str, ...]:
    """Every file whose code can change the rewrite: patterns, the pass, the op schemas, and what
    inductor_launch=True writes into the compiled graph (the launch policy, the calling
    conventions, the Triton kernels' source)."""
    ops_dir = Path(fusion_ops.__file__).parent
    triton_dir = ops_dir / "triton_backend"
    dirs = [Path(patterns.__file__).parent, Path(__file__).parent, ops_dir / "library"]
    dirs.append(triton_dir / "kernels")
    files = sorted(str(p) for d in dirs for p in d.glob("*.py"))
    single = ("schemes.py", "formats.py", "launch_policy.py", "triton_backend/calls.py")
    return (*files, *(str(ops_dir / f) for f in single))


class ServedFromCache(UserWarning):
    """A compile that asked for a FusionPass got graphs from a cache: the pass did not run on
    them, so they are not in its counts (the compiled code itself is the one the pass made)."""


def _cache_hits() -> tuple[int, int]:
    """Lookups served so far by Inductor's FX graph cache and by AOTAutograd's cache (a graph
    AOTAutograd's cache serves is usually counted by both)."""
    counters = torch._dynamo.utils.counters
    return counters["inductor"]["fxgraph_cache_hit"], counters["aot_autograd"]["autograd_cache_hit"]


class _CacheWatch:
    """Tells each pass whose ``uuid()`` a Dynamo compile asked for (Inductor asks before it looks
    a graph up in its caches) whether a cache served graphs of that compile: the cache-hit
    counters at the first ask against those at the end of the compile (Dynamo's end-of-compile
    callback, installed again after each ``torch._dynamo.reset()``, which clears callbacks)."""

    def __init__(self) -> None:
        self.asked: weakref.WeakKeyDictionary[FusionPass, tuple[int, int]] = (
            weakref.WeakKeyDictionary()
        )

    def ask(self, fusion_pass: FusionPass) -> None:
        handler = getattr(getattr(torch._dynamo, "callback", None), "callback_handler", None)
        if handler is None:  # a torch without compile callbacks: nothing to watch with
            return
        if self.end not in handler.end_callbacks:
            handler.register_end_callback(self.end)
        self.asked.setdefault(fusion_pass, _cache_hits())

    def end(self, *_: Any) -> None:
        hits = _cache_hits()
        for fusion_pass, at_ask in list(self.asked.items()):
            served = max(now - then for now, then in zip(hits, at_ask, strict=True))
            if served > 0:
                fusion_pass._served_from_cache(served)
        self.asked.clear()


_WATCH = _CacheWatch()


class FusionPass(CustomGraphPass):
    """Rewrites standalone op sequences into fused ``fusion_ops`` ops.

    Args:
        fusions: families to apply (default all): ``rms_quant``, ``add_rms_quant``,
            ``rope_cache``, ``qnorm_rope_cache`` (per-head q norm + both ropes + cache write),
            ``norm_rope_cache`` (kv-only norm → rope → write), ``dequant_fp8``, ``q_kv_norm``
            (two norms of one split projection), ``ar_add_rms_quant`` (tensor parallel).
        schemes: quant schemes the norm+quant families fuse (default all):
            ``mxfp4``, ``mxfp8``, ``fp8_per_token``, ``fp8_group``.
        dump_dir: write graph dumps there (default: ``$FUSION_PASSES_DUMP_DIR``, else none).
        keep_graphs: keep each graph's readable code before/after in ``graphs`` (tests).
        inductor_launch: on NVIDIA (static or dynamic-but-≥2 token counts), hand each fused
            norm+quant op's Triton kernel to Inductor (it launches it like its own kernels,
            without the op call's host cost; :mod:`fusion_passes.inductor_launch`). Accounting
            counts them as the fused ops.
        numerics: ``"exact"`` (default): every rewrite is bit-equal to the compile without
            the pass. ``"tolerant"``: also fuse RMSNorms written in plain PyTorch
            (transformers' classes, ``torch.nn.RMSNorm``, ``F.rms_norm``, weightless; after a
            plain ``x + r`` or not; :mod:`patterns.plain_norms`), which no fused kernel can
            reproduce bit for bit (Inductor reduces the squares in its own order): the normed
            value may differ in its last bit, quant codes only where it does, residual sums
            never (the bound and its tests: ``docs/numerics.md``). Matches that took such a
            norm are labelled ``+tolerant``.
    """

    def __init__(
        self,
        fusions: Sequence[str] | None = None,
        schemes: Sequence[str] | None = None,
        dump_dir: str | os.PathLike[str] | None = None,
        keep_graphs: bool = False,
        inductor_launch: bool = False,
        numerics: str = "exact",
    ) -> None:
        self.fusions = _validated("fusions", fusions, ALL_FUSIONS)
        self.schemes = _validated("schemes", schemes, ALL_SCHEMES)
        self.dump_dir = resolve_dump_dir(dump_dir)
        self.keep_graphs = keep_graphs
        self.inductor_launch = bool(inductor_launch)
        if numerics not in NUMERICS:
            raise ValueError(
                f"FusionPass: numerics={numerics!r}; expected one of {NUMERICS} "
                '("exact": bit-equal to the compile without the pass; "tolerant": also fuse '
                "plain-PyTorch norms within a tested bound)"
            )
        self.numerics = numerics
        self.match_table: dict[str, int] = {}
        self.graphs: list[GraphRecord] = []
        #: graphs that compiles asking for this pass got from a cache (the pass did not run)
        self.cache_hits = 0
        self._matchers: dict[str, pm.PatternMatcherPass] = {}
        self._pattern_text: list[str] = []
        start = time.perf_counter()
        with FakeTensorMode():
            for family in self.fusions:
                self._register_family(family)
        self.registration_s = time.perf_counter() - start
        self._dumper = Dumper(self.dump_dir) if self.dump_dir is not None else None
        if self._dumper is not None:
            self._dumper.write_patterns(self.patterns_text())
            self._dumper.write_summary(self.summary())

    # --- registration -------------------------------------------------------------------------
    def _register_family(self, family: str) -> None:
        matcher = pm.PatternMatcherPass(pass_name=f"fusion_passes.{family}")
        specs = FAMILIES[family].pattern_specs(self.schemes)
        for spec in specs:
            if isinstance(spec, GraphPatternSpec):
                pm.register_graph_pattern(spec.pattern, extra_check=spec.check, pass_dict=matcher)(
                    spec.handler
                )
                text = pm.PatternPrettyPrinter.run(spec.pattern)
                self._pattern_text.append(f"# {spec.name}\n{text}\n")
                continue
            known = {id(e) for entries in matcher.patterns.values() for e in entries}
            pm.register_replacement(
                spec.search,
                spec.replace,
                spec.example_inputs(),
                pm.fwd_only,
                matcher,
                extra_check=_fused_op_accepts(spec),
                scalar_workaround=spec.scalar_workaround,
            )
            for entries in matcher.patterns.values():
                for entry in entries:
                    if id(entry) not in known:
                        text = pm.PatternPrettyPrinter.run(entry.pattern)
                        self._pattern_text.append(f"# {spec.name}\n{text}\n")
        self._matchers[family] = matcher

    @property
    def pattern_count(self) -> int:
        return len(self._pattern_text)

    def patterns_text(self) -> str:
        """Every registered pattern as readable Python (what patterns.py holds)."""
        header = (
            f"# fusion_passes: {self.pattern_count} patterns, fusions={list(self.fusions)}, "
            f"schemes={list(self.schemes)}\n# wildcards: eps, group_size, rope_dim\n\n"
        )
        return header + "\n".join(self._pattern_text)

    # --- CustomGraphPass ----------------------------------------------------------------------
    def __call__(self, graph: torch.fx.Graph) -> None:
        index = len(self.graphs)
        capture = self.keep_graphs or self._dumper is not None
        code_before = readable(graph) if capture else None
        start = time.perf_counter()  # the rewrite and its accounting; rendering dumps excluded
        ops_before = count_fusion_ops(graph)
        existing = set(graph.nodes)
        # vLLM's native FP8 group quant becomes our quant op (exact); tolerant: plain-PyTorch
        # norms become ops of the same definition; both before matching, put back if unfused
        tolerant_mode = self.numerics == "tolerant"
        quants, inexact_quants = vllm_sources.canonicalize(graph, tolerant_mode)
        plain = [*inexact_quants, *(plain_norms.canonicalize(graph) if tolerant_mode else [])]
        for family in self.fusions:
            FAMILIES[family].prepare(graph, self.schemes)
        for matcher in self._matchers.values():
            matcher.apply(graph)
            # a multi-output replacement is inserted at its first output, possibly before an
            # input of it; the next family's matcher expects def-before-use
            pm.stable_topological_sort(graph)
        for family in self.fusions:  # graph rewrites (horizontal fusions) after every matcher
            FAMILIES[family].rewrite(graph, self.schemes)
        # which fused nodes took a tolerant canonical op: before restore erases the others
        tolerant = plain_norms.fused_from(plain, [n for n in graph.nodes if n not in existing])
        plain_norms.restore(graph, [*plain, *quants])  # what no pattern took, as it was
        new_nodes = [n for n in graph.nodes if n not in existing]
        _rebuild_eager_input_vals(new_nodes)
        _inherit_stack_traces(new_nodes)
        # multi-output replacements are inserted at their first output; restore def-before-use
        # (Inductor sorts again after custom passes) so DCE's lint passes
        pm.stable_topological_sort(graph)
        graph.eliminate_dead_code()

        matches: Counter[str] = Counter()
        for node in new_nodes:
            if node._erased:  # erased by DCE
                continue
            for family in self.fusions:
                label = FAMILIES[family].label(node)
                if label is not None:
                    matches[tolerant_label(label) if node in tolerant else label] += 1
        near_misses = [
            miss for f in self.fusions for miss in FAMILIES[f].near_misses(graph, self.schemes)
        ]
        ops_after = count_fusion_ops(graph)
        launched = 0
        if self.inductor_launch:
            launched = lower_fused_norm_quant(graph)
            graph.eliminate_dead_code()
        ms = (time.perf_counter() - start) * 1e3
        code_after = readable(graph) if capture else None
        record = GraphRecord(
            index=index,
            matches=dict(sorted(matches.items())),
            ops_before=ops_before,
            ops_after=ops_after,
            near_misses=near_misses,
            ms=ms,
            inductor_launched=launched,
            code_before=code_before if self.keep_graphs else None,
            code_after=code_after if self.keep_graphs else None,
        )
        self.graphs.append(record)
        for label, n in matches.items():
            self.match_table[label] = self.match_table.get(label, 0) + n
        self._emit(record, code_before, code_after)

    def _emit(self, record: GraphRecord, before: str | None, after: str | None) -> None:
        if torch._logging._internal.trace_log.handlers:  # TORCH_TRACE is on
            trace_graph(f"fusion_passes_graph_{record.index}_before", before or "")
            trace_graph(f"fusion_passes_graph_{record.index}_after", after or "")
        if self._dumper is not None:
            self._dumper.write_graph(record.index, "before", before or "")
            self._dumper.write_graph(record.index, "after", after or "")
            self._dumper.write_summary(self.summary())

    def _served_from_cache(self, hits: int) -> None:
        self.cache_hits += hits
        warnings.warn(
            f"FusionPass: {hits} graph(s) of this compile came from Inductor's FX graph cache or "
            "AOTAutograd's cache, so the pass did not run on them and match_table does not count "
            "them (their compiled code is the one the pass made when it was cached). Compile "
            "under fusion_passes.testing.fresh_inductor(), or with "
            "torch._inductor.config.fx_graph_cache=False and "
            "torch._functorch.config.enable_autograd_cache=False, to count them",
            ServedFromCache,
            stacklevel=2,
        )
        if self._dumper is not None:
            self._dumper.write_summary(self.summary())

    def uuid(self) -> str:
        """Changes with the configuration, the source of the rewrite and the torch version.
        Inductor asks for it on every graph it compiles or looks up with this pass."""
        _WATCH.ask(self)
        digest = hashlib.sha256()
        digest.update(json.dumps(self.config_dict(), sort_keys=True).encode())
        digest.update(f"torch={torch.__version__}".encode())
        if self.inductor_launch:  # the backend forced at compile time decides what is lowered
            digest.update(f"forced={fusion_ops.backends.forced_backend()}".encode())
        # read the files on every call (torch's get_hash_for_files caches per process, so an
        # edited pattern would keep serving the old rewrite from the FX graph cache)
        for path in _source_files():
            digest.update(path.encode())
            digest.update(Path(path).read_bytes())
        return digest.hexdigest()

    # --- accounting ---------------------------------------------------------------------------
    @property
    def matched_count(self) -> int:
        return sum(self.match_table.values())

    def family_counts(self) -> dict[str, int]:
        """Matches so far per family."""
        out: Counter[str] = Counter()
        for label, n in self.match_table.items():
            out[label.split("/", 1)[0]] += n
        return {f: out.get(f, 0) for f in self.fusions}

    def reset(self) -> None:
        """Forget the accounting (registered patterns stay)."""
        self.match_table.clear()
        self.graphs.clear()
        self.cache_hits = 0

    def config_dict(self) -> dict[str, Any]:
        return {
            "fusions": list(self.fusions),
            "schemes": list(self.schemes),
            "dump_dir": str(self.dump_dir) if self.dump_dir is not None else None,
            "inductor_launch": self.inductor_launch,
            "numerics": self.numerics,
            "norm_sources": list(quant_variants.sources()),
        }

    def summary(self) -> dict[str, Any]:
        """What summary.json holds."""
        return {
            "config": self.config_dict(),
            "uuid": self.uuid(),
            "torch": torch.__version__,
            "patterns_registered": self.pattern_count,
            "registration_s": round(self.registration_s, 3),
            "matched_count": self.matched_count,
            "match_table": dict(sorted(self.match_table.items())),
            "graphs_from_cache": self.cache_hits,
            "graphs": [g.as_dict() for g in self.graphs],
        }

    def __repr__(self) -> str:
        return (
            f"FusionPass(fusions={list(self.fusions)}, schemes={list(self.schemes)}, "
            f"numerics={self.numerics!r}, matched_count={self.matched_count})"
        )


def _validated(what: str, chosen: Sequence[str] | None, allowed: tuple[str, ...]) -> tuple:
    if chosen is None:
        return allowed
    if isinstance(chosen, str):
        raise TypeError(f"FusionPass: '{what}' must be a list of names, got the string {chosen!r}")
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise ValueError(f"FusionPass: unknown {what} {unknown}; expected names from {allowed}")
    return tuple(a for a in allowed if a in chosen)  # registry order, no duplicates


def _fused_op_accepts(spec: PatternSpec) -> Callable[[pm.Match], bool]:
    """extra_check: fire only on a proper match the fused op accepts.

    * every pattern output is a distinct node: a multi-output pattern may otherwise bind two of
      its outputs to one graph node (e.g. the q rope and the kv rope both to the kv rope, when
      the real q rope differs), a degenerate match that rewrites the wrong thing;
    * the fused op's fake accepts the matched inputs (same validation as at run time).
    """
    names = list(inspect.signature(spec.search).parameters)

    def check(match: pm.Match) -> bool:
        outputs = [n for n in match.output_nodes() if n is not None]
        if len(set(outputs)) != len(outputs):
            return False
        if spec.check is not None and not spec.check(match):
            return False
        if any(n not in match.kwargs for n in names):
            # torch 2.11 leaves scalar_workaround names (eps) out of match.kwargs: the fused
            # op's fake then validates when the replacement is traced
            return True
        args = [val(match.kwargs[n]) for n in names]
        mode = torch._guards.detect_fake_mode(args)
        if mode is None:
            return True
        try:
            with mode:
                spec.replace(*args)
        except Exception:  # noqa: BLE001 - any rejection means: do not fire
            return False
        return True

    return check


def _rebuild_eager_input_vals(nodes: list[torch.fx.Node]) -> None:
    """Replacement nodes record the example strides/offsets the matcher traced them with
    (storage offset 0); Inductor would then feed views at the wrong offset into the fused op
    (pitfall P1). Rebuild the record from the real inputs, as make_fx does."""

    def value(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, torch.fx.Node) else None

    for node in nodes:
        if "eager_input_vals" in node.meta or node.target in HOPS:
            node.meta["eager_input_vals"] = torch.fx.node.map_aggregate(
                (node.args, node.kwargs), value
            )


def _inherit_stack_traces(nodes: list[torch.fx.Node]) -> None:
    """A replacement's outputs get the stack trace of the nodes they replace (the pattern
    matcher copies it), the fused op itself none: give it its outputs' (the model code of the
    replaced quant call), so dumps and Inductor's generated code point back to the model."""
    for node in nodes:
        if node.meta.get("stack_trace") or node.op != "call_function":
            continue
        traces = [u.meta["stack_trace"] for u in node.users if u.meta.get("stack_trace")]
        if traces:
            node.meta["stack_trace"] = traces[0]
