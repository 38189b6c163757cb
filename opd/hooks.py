"""User hooks named in params.yaml as ``"module:function"`` (answer extractor, refusal detector, judge)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def load_hook(spec: str, setting: str) -> Callable[..., Any]:
    """The callable ``spec`` names; a clear error naming ``setting`` when it cannot be imported."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{setting} {spec!r}: cannot import ({err}); expected 'module:function'") from None
    if not callable(fn):
        raise ValueError(f"{setting} {spec!r} is not callable")
    return fn
