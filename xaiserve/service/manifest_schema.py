"""JSON Schema of a model store's manifest entries, and the checks the registry runs at load.

`entry_problems(d)` returns what is wrong with one entry (empty when it is fine): JSON Schema
violations (jsonschema, draft 2020-12) with the path of the offending field, then checks a schema
cannot express (one mean/std per channel, a masking network names the model it explains, the IO
map names the kind's own tensors). docs/MODEL_STORE.md documents every field; `xaiserve models
schema` prints the schema.
"""

from __future__ import annotations

import logging
from typing import Any

from jsonschema import Draft202012Validator

from xaiserve.methods import KINDS, METHODS
from xaiserve.service.images import RESIZE_MODES

log = logging.getLogger("xaiserve.registry")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MODEL_FILES = ("onnx", "state_dict", "torchscript", "exported_program")
KNOWN_FIELDS = (
    "name",
    "version",
    "kind",
    "description",
    "files",
    "input",
    "io",
    "labels",
    "output_dim",
    "explains",
    "arch",
    "metrics",
    "training",
    "particles",
    "code_version",
    "added",
    "torch_form",
    "default_method",
)
# what manifest default_method may name: the methods Explain serves (the methods table)
EXPLAIN_METHODS = tuple(n for n, m in METHODS.items() if m.rpc == "Explain")

_rel_path = {
    "type": "string",
    "minLength": 1,
    "pattern": r"^(?!/)(?!.*(^|/)\.\.(/|$)).+$",
    "description": "a path relative to the store (no leading '/', no '..')",
}

ENTRY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "xaiserve model store entry",
    "type": "object",
    "required": ["name", "version", "kind", "files", "input"],
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "version": {"type": ["string", "integer"], "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"},
        "kind": {"enum": list(KINDS)},
        "description": {"type": "string"},
        "files": {
            "type": "object",
            "properties": {k: _rel_path for k in (*MODEL_FILES, "card")},
            "additionalProperties": _rel_path,
            "anyOf": [{"required": [k]} for k in MODEL_FILES],
        },
        "input": {
            "type": "object",
            "required": ["height", "width"],
            "properties": {
                "height": {"type": "integer", "minimum": 1, "maximum": 4096},
                "width": {"type": "integer", "minimum": 1, "maximum": 4096},
                "channels": {"type": "integer", "enum": [1, 3]},
                "mean": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                "std": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 1},
                "resize": {"enum": list(RESIZE_MODES)},
                # greyscale DICOM -> channels (xaiserve.clinical.windowing.parse_dicom_defaults checks the rest)
                "dicom": {
                    "type": "object",
                    "properties": {
                        "grey_to_channels": {"enum": ["replicate", "window_stack"]},
                        "windows": {"type": "array"},
                    },
                },
            },
        },
        "io": {
            "type": "object",
            "description": "the kind's tensor names (image, target, output, mask, label, particles, denoised) -> the "
            "ONNX graph's input/output names",
            "additionalProperties": {"type": "string", "minLength": 1},
        },
        "labels": {"type": "array", "items": {"type": "string"}},
        "output_dim": {"type": "integer", "minimum": 0},
        "explains": {"type": "string", "pattern": NAME_PATTERN[:-1] + r"(:[A-Za-z0-9][A-Za-z0-9._-]{0,31})?$"},
        # the Explain method of a request that names none; must apply to the kind (entry_problems)
        # and to the store's model forms (Registry.check_method at load)
        "default_method": {"enum": list(EXPLAIN_METHODS)},
        "arch": {"type": "object"},
        "metrics": {"type": "object"},
        "training": {"type": "object"},
        "particles": {"type": "object"},
        "code_version": {"type": "string"},
        # provenance of a torch form converted from the ONNX graph (handlers/nets/onnx_torch.py); with
        # from "onnx" and no torchscript / exported_program file, the graph is converted at load
        "torch_form": {
            "type": "object",
            "properties": {
                "from": {"enum": ["onnx"]},
                "converter": {"type": "string"},
                "max_abs_diff": {"type": "number"},
                "rtol": {"type": "number"},
                "stored": {"type": "string"},
            },
        },
    },
}

_VALIDATOR = Draft202012Validator(ENTRY_SCHEMA)


def _where(err) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "(entry)"


def entry_problems(d: Any) -> list[str]:
    """Everything wrong with one manifest entry, as readable sentences (empty list: valid)."""
    if not isinstance(d, dict):
        return [f"an entry must be a JSON object, got {type(d).__name__}"]
    out = []
    for err in sorted(_VALIDATOR.iter_errors(d), key=lambda e: list(map(str, e.absolute_path))):
        if err.validator == "anyOf" and list(err.absolute_path) == ["files"]:
            out.append(f"files: names no model file; give one of {', '.join(MODEL_FILES)}")
        elif err.validator == "pattern" and "description" in err.schema:
            out.append(f"{_where(err)}: {str(err.instance)[:200]!r} must be {err.schema['description']}")
        else:
            out.append(f"{_where(err)}: {err.message[:200]}")
    if out:
        return out
    inp = d["input"]
    c = int(inp.get("channels", 1))
    for key in ("mean", "std"):
        if key in inp and len(inp[key]) != c:
            out.append(f"input.{key} has {len(inp[key])} values for {c} channel(s)")
    kind = KINDS[d["kind"]]
    if kind.masking and not d.get("explains"):
        out.append(f'a {d["kind"]} masking network must say which model it explains (explains: "name:version")')
    dm = d.get("default_method")
    if dm:
        # a masking network's methods run on the model it explains (methods table: spec.kinds)
        kinds = {d["kind"], *kind.explains}
        if not kinds & set(METHODS[dm].kinds):
            fits = [n for n in EXPLAIN_METHODS if kinds & set(METHODS[n].kinds)]
            out.append(f"default_method: {dm!r} does not apply to a {d['kind']}; use one of {', '.join(fits)}")
    allowed = set(kind.inputs) | set(kind.outputs)
    for k in d.get("io", {}):
        if k not in allowed:
            out.append(f"io.{k}: a {d['kind']} has no tensor {k!r}; map {', '.join(sorted(allowed))}")
    return out


def unknown_fields(d: dict[str, Any]) -> list[str]:
    """Top-level keys the registry does not read (typos are logged, not fatal)."""
    return sorted(k for k in d if k not in KNOWN_FIELDS)
