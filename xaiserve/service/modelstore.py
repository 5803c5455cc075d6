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

__all__ = ["DEFAULT_STORE", "add_entry", "default_model_store", "store_problem"]

POINT_AT_A_STORE = ("point the server at a store with --model-store DIR, XAISERVE_MODEL_STORE=DIR or model_store in the "
                    "config file (a checkout's model_store/ holds the default models; see docs/MODEL_STORE.md)")


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
    """Insert `entry` into store/manifest.json, replacing the same name:version; validates it first.

    A lock file serialises concurrent exports; the manifest is replaced atomically (rename).
    """
    ModelEntry.from_dict(entry)  # raises ValueError on a malformed entry
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    path = store / "manifest.json"
    with open(store / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"format": 1, "models": []}
        models = [m for m in data["models"] if not (m["name"] == entry["name"] and str(m["version"]) == str(entry["version"]))]
        models.append(entry)
        models.sort(key=lambda m: (m["name"], str(m["version"])))
        data["models"] = models
        fd, tmp = tempfile.mkstemp(dir=store, prefix=".manifest.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
