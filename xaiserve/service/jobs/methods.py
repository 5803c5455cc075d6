"""Which JobMethod implements which job method name, loaded lazily (they import torch)."""

from __future__ import annotations

import importlib
from typing import Iterable

from xaiserve.methods import JOB_METHODS, METHODS
from xaiserve.service.jobs.contract import JobMethod

# name -> (module, class), from the methods table (xaiserve.methods): "relax", "ablation_path".
KNOWN_METHODS: dict[str, tuple[str, str]] = {
    name: (METHODS[name].impl.partition(":")[0], METHODS[name].impl.partition(":")[2]) for name in JOB_METHODS
}


def _check(obj: object, spec: str) -> JobMethod:
    missing = [a for a in ("name", "validate", "run") if not hasattr(obj, a)]
    if missing:
        raise RuntimeError(f"job method {spec!r} is not a JobMethod: it lacks {', '.join(missing)}")
    return obj  # type: ignore[return-value]


def load_method(spec: str, settings: dict | None = None) -> JobMethod:
    """A known name ("relax", "ablation_path") or "package.module:Attr" (a class or factory, called
    with `settings` as keyword arguments, or an instance). Raises RuntimeError with the reason when
    it cannot be loaded."""
    spec = spec.strip()
    if spec in KNOWN_METHODS:
        module, attr = KNOWN_METHODS[spec]
    elif ":" in spec:
        module, _, attr = spec.partition(":")
    else:
        raise RuntimeError(
            f"unknown job method {spec!r}; known: {', '.join(sorted(KNOWN_METHODS))}, or give module:Class"
        )
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"job method {spec!r} could not be loaded from {module}:{attr}: {e!r}") from e
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "run")):
        obj = obj(**(settings or {}))
    method = _check(obj, spec)
    if spec in KNOWN_METHODS and method.name != spec:
        raise RuntimeError(f"{module}.{attr}.name is {method.name!r}, expected {spec!r}")
    return method


def default_methods(
    names: Iterable[str] | None = None, settings: dict[str, dict] | None = None
) -> dict[str, JobMethod]:
    """Instantiate the job methods (default: all known), each with its `settings[name]` keyword
    arguments. Nothing is skipped silently: an import error is raised with its reason, because a
    server that quietly lacks RELAX is worse than one that says so."""
    out: dict[str, JobMethod] = {}
    for spec in list(KNOWN_METHODS) if names is None else list(names):
        m = load_method(spec, (settings or {}).get(spec))
        if m.name in out:
            raise RuntimeError(f"two job methods are called {m.name!r}")
        out[m.name] = m
    return out
