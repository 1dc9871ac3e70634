"""Graph dumps: readable before/after graphs, registered patterns, summary.json, TORCH_TRACE."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

ENV_DUMP_DIR = "FUSION_PASSES_DUMP_DIR"


def resolve_dump_dir(dump_dir: str | os.PathLike[str] | None) -> Path | None:
    """The constructor argument, else ``$FUSION_PASSES_DUMP_DIR``, else no dumps."""
    chosen = dump_dir if dump_dir is not None else os.environ.get(ENV_DUMP_DIR) or None
    return Path(chosen) if chosen is not None else None


def readable(graph: torch.fx.Graph) -> str:
    """FX code of the graph with shapes/dtypes in comments (as TORCH_COMPILE_DEBUG writes it)."""
    gm = graph.owning_module
    if isinstance(gm, torch.fx.GraphModule):
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    return graph.python_code("self").src


def trace_graph(name: str, code: str) -> None:
    """Emit ``code`` as a TORCH_TRACE artifact (tlparse shows it as a file named ``name``)."""
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": "string"},
        payload_fn=lambda: code,
    )


class Dumper:
    """Writes into one directory: graph_<n>.{before,after}.py, patterns.py, summary.json."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        # the directory describes one pass object: graphs an earlier one wrote would sit
        # beside a summary.json that does not list them
        for stale in self.directory.glob("graph_*.*.py"):
            stale.unlink()

    def write_graph(self, index: int, stage: str, code: str) -> Path:
        path = self.directory / f"graph_{index}.{stage}.py"
        path.write_text(code)
        return path

    def write_patterns(self, text: str) -> Path:
        path = self.directory / "patterns.py"
        path.write_text(text)
        return path

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.directory / "summary.json"
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return path
