"""Reference DeepSeek-V4 module built from fusion_ops standalone ops (see dsv4_model.model)."""

from .cache import PagedCaches, Step
from .config import PRESETS, DSV4Config, flash, pro, tiny
from .driver import RunResult, build, run, token_ids
from .layers import TensorParallel
from .model import DSV4Model

__all__ = [
    "PRESETS",
    "DSV4Config",
    "DSV4Model",
    "PagedCaches",
    "RunResult",
    "Step",
    "TensorParallel",
    "build",
    "flash",
    "pro",
    "run",
    "tiny",
    "token_ids",
]
