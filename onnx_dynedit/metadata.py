"""The ``dynedit.*`` entries of an edited model's metadata_props: the provenance and the
undo record that ``revert`` uses (writeback.py), one reader and one writer of each. Onnx
and the standard library only (``dynedit diff`` reads the record without torch)."""

from __future__ import annotations

import json

import onnx

METADATA_PREFIX = "dynedit."
PROVENANCE_KEY = METADATA_PREFIX + "provenance"
EDITS_KEY = METADATA_PREFIX + "edits"


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set ``key`` in ``model``'s metadata_props (in place; an existing entry keeps its place)."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def ours(model: onnx.ModelProto) -> dict[str, str]:
    """The ``dynedit.*`` entries of ``model``."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


def replace_ours(model: onnx.ModelProto, entries: dict[str, str] | None = None) -> None:
    """Drop every ``dynedit.*`` entry of ``model`` (in place), keep the others in their
    order, and append ``entries`` (sorted by key)."""
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    for key, value in kept + sorted((entries or {}).items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def edit_record(model: onnx.ModelProto) -> dict | None:
    """The undo record (``dynedit.edits``) as written, None when there is none. The
    record is file content, hence untrusted: raises ``json.JSONDecodeError`` when it is
    not JSON; ``writeback.check_edit_record`` checks its structure."""
    for prop in model.metadata_props:
        if prop.key == EDITS_KEY:
            return json.loads(prop.value)
    return None
