"""Writing to the model store: add or replace a manifest entry atomically (used by `xaiserve export`)."""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from xaiserve.service.registry import ModelEntry

DEFAULT_STORE = Path(__file__).resolve().parents[2] / "model_store"


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
        data = json.loads(path.read_text()) if path.exists() else {"format": 1, "models": []}
        models = [m for m in data["models"] if not (m["name"] == entry["name"] and str(m["version"]) == str(entry["version"]))]
        models.append(entry)
        models.sort(key=lambda m: (m["name"], str(m["version"])))
        data["models"] = models
        fd, tmp = tempfile.mkstemp(dir=store, prefix=".manifest.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
