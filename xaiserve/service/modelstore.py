"""The model store: where it is (`xaiserve.paths`), whether it serves anything, and adding or
replacing a manifest entry atomically (used by `xaiserve export`)."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from xaiserve.paths import DEFAULT_STORE, default_model_store
from xaiserve.service.registry import ModelEntry

__all__ = ["DEFAULT_STORE", "add_entry", "default_model_store", "remove_entry", "store_problem"]

POINT_AT_A_STORE = (
    "point the server at a store with --model-store DIR, XAISERVE_MODEL_STORE=DIR or model_store in the "
    "config file (a checkout's model_store/ holds the default models; see docs/MODEL_STORE.md)"
)


def store_problem(store: Path, models: int) -> str | None:
    """None when `store` lists models; otherwise what is wrong with it, as a warning to print."""
    if models:
        return None
    if not store.exists():
        return f"model store {store} does not exist: serving no models; {POINT_AT_A_STORE}"
    if not (store / "manifest.json").is_file():
        return f"model store {store} has no manifest.json: serving no models; {POINT_AT_A_STORE}"
    return f"model store {store} lists no models in its manifest.json: serving none; add some with `xaiserve export ...` or {POINT_AT_A_STORE}"


def add_entry(store: Path, entry: dict[str, Any]) -> None:
    """Insert `entry` into store/manifest.json, replacing the same name:version; validates it first
    (the JSON Schema of service.manifest_schema; ValueError listing every problem).

    A lock file serialises concurrent exports; the manifest is replaced atomically (rename), so a
    server watching it (service/reload.py) never reads half a file.
    """
    from xaiserve.service.manifest_schema import entry_problems

    problems = entry_problems(entry)
    if problems:
        raise ValueError(
            f"manifest entry {entry.get('name', '?')}:{entry.get('version', '?')} is invalid: " + "; ".join(problems)
        )
    ModelEntry.from_dict(entry)  # raises ValueError on a malformed entry

    def edit(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = [m for m in models if not (m["name"] == entry["name"] and str(m["version"]) == str(entry["version"]))]
        return [*out, entry]

    _rewrite(Path(store), edit)


def remove_entry(store: Path, name: str, version: str | None = None) -> list[dict[str, Any]]:
    """Remove name:version (every version of `name` when version is None) from the manifest, atomically;
    returns the removed entries (their files stay: the caller deletes them)."""
    removed: list[dict[str, Any]] = []

    def edit(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keep = []
        for m in models:
            hit = m.get("name") == name and (version is None or str(m.get("version")) == str(version))
            (removed if hit else keep).append(m)
        return keep

    _rewrite(Path(store), edit)
    return removed


def _rewrite(store: Path, edit) -> None:
    """Apply `edit` to the manifest's model list under the lock file, then replace the file atomically."""
    store.mkdir(parents=True, exist_ok=True)
    path = store / "manifest.json"
    with open(store / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"format": 1, "models": []}
        models = edit(list(data.get("models", [])))
        models.sort(key=lambda m: (str(m.get("name")), str(m.get("version"))))
        data["models"] = models
        fd, tmp = tempfile.mkstemp(dir=store, prefix=".manifest.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
