"""Where xaiserve finds things outside the package: the model store, a source checkout, its version.

Nothing here looks at the location of the installed code: an installed wheel lives in
site-packages, where there is neither a model store nor a git history. The model store comes from
the configuration (setting `model_store`, env XAISERVE_MODEL_STORE, flag --model-store), else
./model_store in the working directory (the repository root holds the default models); a source
checkout is the working directory or a folder above it, else the folder an editable install
(`pip install -e .`) was made from, as pip records it (PEP 610 direct_url.json).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

STORE_ENV = "XAISERVE_MODEL_STORE"
DEFAULT_STORE = Path("model_store")  # relative: read from the working directory


def default_model_store(env: Mapping[str, str] | None = None) -> Path:
    """XAISERVE_MODEL_STORE when set, else ./model_store (relative to the working directory)."""
    env = os.environ if env is None else env
    value = env.get(STORE_ENV, "").strip()
    return Path(value).expanduser() if value else DEFAULT_STORE


def _is_checkout(folder: Path) -> bool:
    pyproject = folder / "pyproject.toml"
    if not (pyproject.is_file() and (folder / "xaiserve").is_dir()):
        return False
    try:
        return 'name = "xaiserve"' in pyproject.read_text()
    except OSError:
        return False


def editable_source() -> Path | None:
    """The folder an editable install of xaiserve points at, or None (a wheel, or not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        text = distribution("xaiserve").read_text("direct_url.json")
    except (ImportError, PackageNotFoundError):
        return None
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    url = urlparse(info.get("url", ""))
    if not info.get("dir_info", {}).get("editable") or url.scheme != "file":
        return None
    folder = Path(unquote(url.path))
    return folder if _is_checkout(folder) else None


def find_checkout(start: Path | None = None) -> Path | None:
    """The xaiserve source checkout holding `start` (default: the working directory), else the
    source of an editable install, else None (an installed wheel outside any checkout)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if _is_checkout(folder):
            return folder
    return editable_source()


def code_version(where: Path | None = None) -> str:
    """The code that runs: `git rev-parse HEAD` of the checkout (with "+dirty" for local changes),
    else "xaiserve==VERSION" of the installed package, else "unknown".

    `where` defaults to the checkout found by `find_checkout`, so a wheel run from inside some other
    git repository does not report that repository's revision.
    """
    root = where if where is not None else find_checkout()
    if root is not None:
        try:
            rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
            if rev.returncode == 0 and rev.stdout.strip():
                dirty = subprocess.run(
                    ["git", "status", "--porcelain", "--untracked-files=no"],
                    cwd=root,
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        return f"xaiserve=={version('xaiserve')}"
    except (ImportError, PackageNotFoundError):
        return "unknown"


def checkout_root() -> Path:
    """`find_checkout()`, or exit with what to do: for the scripts of a checkout (bench/)."""
    root = find_checkout()
    if root is None:
        raise SystemExit(
            "this script belongs to a source checkout of xaiserve: run it from inside the "
            "repository (clone it and `pip install -e .`); an installed wheel has no bench/ or model_store/"
        )
    return root
