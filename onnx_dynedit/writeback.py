"""Write edited weights back into the ORIGINAL ONNX model, changing nothing else.

The new tensor of each edited weight is made by onnx-graphsurgeon (``gs.Constant`` ->
its exporter's TensorProto) and spliced into a copy of the original ModelProto at the
same place: initializer list position, Constant-node attribute, or (for a weight made by
a ConstantOfShape placeholder) a new initializer of the same name that replaces that
node. We do not round-trip the whole graph through ``gs.export_onnx``: it drops
metadata_props, doc_string, model_version and unused initializers and reorders
initializers; splicing keeps every other byte of the model as it was.

Provenance (tool version, original hash, changed tensors) and everything needed to undo
the edit bit for bit (the rank-one factors plus a compressed XOR correction for float
rounding) are stored in metadata_props under ``dynedit.*`` keys; ``revert`` uses them.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from . import __version__
from .errors import EditError, InputError
from .io import LoadedModel, model_sha256
from .layers import Layer, build_layer_map, constant_sources, constant_value

PROVENANCE_KEY = "dynedit.provenance"
EDITS_KEY = "dynedit.edits"
METADATA_PREFIX = "dynedit."


@dataclass(frozen=True)
class LayerUpdate:
    """The accumulated edit of one layer: W' = W + sum_i u_i d_i^T (canonical space)."""

    layer: Layer
    factors: tuple[tuple[np.ndarray, np.ndarray], ...]  # (u [out], d [in]) float64

    def delta(self) -> np.ndarray:
        out = np.zeros((self.layer.out_features, self.layer.in_features), dtype=np.float64)
        for u, d in self.factors:
            out += np.outer(np.asarray(u, np.float64), np.asarray(d, np.float64))
        return out


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=np.float64).tobytes()).decode()


def _unb64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float64).copy()


def _bits(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}"))


def _apply_delta(layer: Layer, weight: np.ndarray, delta: np.ndarray, sign: float) -> np.ndarray:
    new = weight.astype(np.float64) + sign * layer.from_canonical(delta)
    return new.astype(weight.dtype)


def _tensor_proto(name: str, values: np.ndarray, like: onnx.TensorProto | None) -> onnx.TensorProto:
    """A TensorProto for ``values``, made by graph-surgeon, stored like ``like`` (same
    name, doc_string, and the same storage field when ``like`` did not use raw_data)."""
    values = np.ascontiguousarray(values)
    if like is None or like.HasField("raw_data") or like.data_location == onnx.TensorProto.EXTERNAL:
        proto = OnnxExporter.export_tensor_proto(gs.Constant(name or "w", values=values))
    else:  # typed fields (float_data, int32_data for fp16, ...), as the original had
        proto = onnx.helper.make_tensor(name, like.data_type, list(values.shape),
                                        values.reshape(-1).tolist(), raw=False)
    if like is not None:  # proto2: copy presence too, not just the value
        for fname in ("name", "doc_string"):
            if like.HasField(fname):
                setattr(proto, fname, getattr(like, fname))
            else:
                proto.ClearField(fname)
    return proto


def write_back(loaded: LoadedModel, updates: list[LayerUpdate], *, extra_provenance: dict | None = None) -> onnx.ModelProto:
    """A new ModelProto equal to the original except for the updated weights and the
    ``dynedit.*`` metadata entries."""
    original = loaded.model
    model = onnx.ModelProto()
    model.CopyFrom(original)
    graph = model.graph
    sources = constant_sources(graph)
    init_index = {init.name: i for i, init in enumerate(graph.initializer)}
    records = []
    removed_nodes = []
    for upd in updates:
        layer = upd.layer
        name = layer.initializer
        weight = constant_value(graph, name)
        if weight is None:
            raise InputError(f"weight {name!r} of layer {layer.node!r} is not a constant in {loaded.label}")
        delta = upd.delta()
        new = _apply_delta(layer, weight, delta, +1.0)
        if not np.isfinite(new).all():
            raise EditError(f"the edit of layer {layer.node!r} would make non-finite weights in {name!r}",
                            hint="the edit is refused; try --max-edits 1 or another layer")
        restored = _apply_delta(layer, new, delta, -1.0)
        xor = np.bitwise_xor(_bits(restored), _bits(weight))
        record = {
            "initializer": name, "node": layer.node, "op": layer.op, "dtype": str(weight.dtype),
            "shape": list(weight.shape), "source": layer.source,
            "factors": [[_b64(u), _b64(d)] for u, d in upd.factors],
            "xor_zlib": base64.b64encode(zlib.compress(xor.tobytes(), 9)).decode(),
        }
        if name in init_index:
            i = init_index[name]
            graph.initializer[i].CopyFrom(_tensor_proto(name, new, original.graph.initializer[i]))
        else:
            kind, node_idx = sources[name]
            node = graph.node[node_idx]
            if kind == "constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        attr.t.CopyFrom(_tensor_proto(name, new, attr.t))
                        break
                else:  # value_floats etc.: becomes a tensor attribute
                    raise EditError(f"Constant node for {name!r} stores a list attribute; not editable")
            else:  # ConstantOfShape placeholder -> initializer of the same name
                record["node_proto"] = base64.b64encode(node.SerializeToString(deterministic=True)).decode()
                record["node_index"] = node_idx
                removed_nodes.append(node_idx)
                graph.initializer.append(_tensor_proto(name, new, None))
        records.append(record)
    for idx in sorted(removed_nodes, reverse=True):
        del graph.node[idx]

    previous = {p.key: p.value for p in original.metadata_props if p.key.startswith(METADATA_PREFIX)}
    provenance = {
        "tool": "onnx-dynedit", "version": __version__, "original_sha256": loaded.sha256,
        "changed": [r["initializer"] for r in records],
    }
    if extra_provenance:
        provenance.update(extra_provenance)
    edits = {"format": 1, "original_sha256": loaded.sha256, "tensors": records, "previous_metadata": previous}
    _set_metadata(model, PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))
    _set_metadata(model, EDITS_KEY, json.dumps(edits, sort_keys=True))
    return model


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def edit_record(model: onnx.ModelProto) -> dict | None:
    for prop in model.metadata_props:
        if prop.key == EDITS_KEY:
            return json.loads(prop.value)
    return None


def revert(loaded: LoadedModel) -> onnx.ModelProto:
    """Undo the last ``write_back``: original tensors bit for bit, nodes and metadata restored."""
    check_edit_record(loaded)
    try:
        record = edit_record(loaded.model)
    except json.JSONDecodeError:
        record = None
    if record is None:
        raise InputError(f"{loaded.label} carries no onnx-dynedit edit record ({EDITS_KEY})",
                         hint="only models written by `dynedit edit` can be reverted")
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    graph = model.graph
    layer_map = build_layer_map(model)
    init_index = {init.name: i for i, init in enumerate(graph.initializer)}
    sources = constant_sources(graph)
    reinsert = []
    for rec in record["tensors"]:
        name = rec["initializer"]
        layer = next((l for l in layer_map.layers if l.initializer == name), None)
        weight = constant_value(graph, name)
        if layer is None or weight is None:
            raise InputError(f"{loaded.label}: edited tensor {name!r} is no longer a layer weight; cannot revert")
        factors = tuple((_unb64(u), _unb64(d)) for u, d in rec["factors"])
        delta = LayerUpdate(layer=layer, factors=factors).delta()
        restored = _apply_delta(layer, weight, delta, -1.0)
        xor = np.frombuffer(zlib.decompress(base64.b64decode(rec["xor_zlib"])), dtype=_bits(restored).dtype)
        original = np.bitwise_xor(_bits(restored), xor.reshape(restored.shape)).view(weight.dtype)
        if name in init_index:
            i = init_index[name]
            if rec["source"] == "constant_of_shape":
                reinsert.append((rec["node_index"], rec["node_proto"], i))
            else:
                graph.initializer[i].CopyFrom(_tensor_proto(name, original, graph.initializer[i]))
        else:
            kind, node_idx = sources[name]
            for attr in graph.node[node_idx].attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(_tensor_proto(name, original, attr.t))
    for node_index, node_b64, init_i in sorted(reinsert, key=lambda r: -r[2]):
        del graph.initializer[init_i]
    for node_index, node_b64, _ in sorted(reinsert):
        node = onnx.NodeProto()
        node.ParseFromString(base64.b64decode(node_b64))
        graph.node.insert(node_index, node)
    # metadata: drop ours, restore what the input had under dynedit.* keys
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    for key, value in kept + sorted(record.get("previous_metadata", {}).items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if model_sha256(model) != record["original_sha256"]:
        raise InputError(f"{loaded.label}: reverting did not reproduce the original model (hash mismatch)",
                         hint="the file was changed after editing; revert needs the file `dynedit edit` wrote")
    return model


def check_edit_record(loaded: LoadedModel) -> None:
    """The undo record (``dynedit.edits`` metadata) is file content, hence untrusted: check
    its structure, encodings and sizes before ``revert`` relies on them."""
    try:
        record = edit_record(loaded.model)
    except ValueError:  # not JSON: revert says there is no record
        return
    if record is None:
        return

    def corrupt(why: str):
        raise InputError(f"{loaded.label}: the edit record ({EDITS_KEY}) is corrupt: {why}",
                         hint="the file was changed after `dynedit edit`; use the original or its .bak")

    if not isinstance(record, dict):
        corrupt("not a JSON object")
    if not isinstance(record.get("original_sha256"), str):
        corrupt("no original_sha256")
    previous = record.get("previous_metadata", {})
    if not isinstance(previous, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in previous.items()):
        corrupt("previous_metadata is not a string map")
    tensors = record.get("tensors")
    if not isinstance(tensors, list) or not tensors:
        corrupt("no list of edited tensors")
    layers = build_layer_map(loaded.model).layers
    graph = loaded.model.graph

    def b64(text, what) -> bytes:
        if not isinstance(text, str):
            corrupt(f"{what} is not a string")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            corrupt(f"{what} is not base64")

    for i, rec in enumerate(tensors):
        if not isinstance(rec, dict):
            corrupt(f"entry {i} is not an object")
        name = rec.get("initializer")
        if not isinstance(name, str) or not isinstance(rec.get("source"), str):
            corrupt(f"entry {i} has no initializer/source")
        layer = next((l for l in layers if l.initializer == name), None)
        weight = constant_value(graph, name)
        if layer is None or weight is None:
            continue  # revert reports this one itself
        factors = rec.get("factors")
        if not isinstance(factors, list) or not factors:
            corrupt(f"entry {i} ({name!r}) has no factors")
        for j, pair in enumerate(factors):
            if not isinstance(pair, list) or len(pair) != 2:
                corrupt(f"factor {j} of {name!r} is not a (u, d) pair")
            u, d = (b64(v, f"factor {j} of {name!r}") for v in pair)
            if len(u) != 8 * layer.out_features or len(d) != 8 * layer.in_features:
                corrupt(f"factor {j} of {name!r} does not fit the layer's {layer.out_features}x{layer.in_features} "
                        "weight")
        xor = b64(rec.get("xor_zlib"), f"xor_zlib of {name!r}")
        need = weight.size * weight.dtype.itemsize
        try:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(xor, need + 1)  # bounded: no zip bomb
        except zlib.error:
            corrupt(f"xor_zlib of {name!r} is not zlib data")
        if len(raw) != need:
            corrupt(f"xor_zlib of {name!r} has {len(raw)} bytes, the weight needs {need}")
        if rec["source"] == "constant_of_shape":
            index = rec.get("node_index")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= len(graph.node):
                corrupt(f"entry {i} ({name!r}) has no valid node_index")
            node_bytes = b64(rec.get("node_proto"), f"node_proto of {name!r}")
            try:
                onnx.NodeProto().ParseFromString(node_bytes)
            except Exception:  # noqa: BLE001 - protobuf DecodeError and friends
                corrupt(f"node_proto of {name!r} is not a NodeProto")
