"""Resolve `"package.module:attribute"` import paths (injectable engine factories, predictors)."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """The object at `module:attr` (dots after the colon walk attributes); ValueError if absent."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"import path {path!r} must look like 'package.module:attribute'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"import path {path!r}: {part!r} not found") from None
    return obj
