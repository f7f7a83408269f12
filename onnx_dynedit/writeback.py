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

Precision: the edit is computed in float64 and added to the weight in float64; the sum is
rounded to the weight's own type (float32, float16). A weight dequantised from integers
(``Layer.quant``, quant.py) is edited as floats and requantised: the integers change, and
the scale / zero point of that tensor only where the edited values no longer fit. Each
tensor's record carries ``rounding``: how far the written change is from the float edit
(``quant.rounding_stats``); a quantised tensor's undo is an XOR of its integers (and of
any scale / zero point / bias tensor that changed, listed under ``aux``) against the
written ones.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from . import __version__
from .errors import EditError, InputError, option
from .io import LoadedModel, model_sha256
from .layers import Layer, build_layer_map, constant_sources, constant_value
from .metadata import EDITS_KEY, PROVENANCE_KEY, edit_record, ours, replace_ours, set_metadata
from .quant import dequantize, requantize, rounding_stats

log = logging.getLogger(__name__)

XOR_LEVEL = 6  # zlib level of the bits that restore the original (revert): zlib's default; level 9 took 24.4 s
               # on a 4096 x 4096 layer's bits against 1.9 s, for a 13 % smaller record (this 2-core CPU)


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
    values = np.ascontiguousarray(values).reshape(np.shape(values))  # a scalar stays 0-D
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
        weight = constant_value(graph, layer.initializer)
        if weight is None:
            raise InputError(f"weight {layer.initializer!r} of layer {layer.node!r} is not a constant in {loaded.label}")
        if layer.quant is not None:
            records.append(_write_quantised(loaded, model, layer, upd, weight, upd.delta()))
            continue
        record = _write_float(original, model, upd, weight, sources, init_index)
        if "node_index" in record:
            removed_nodes.append(record["node_index"])
        records.append(record)
    for idx in sorted(removed_nodes, reverse=True):
        del graph.node[idx]
    provenance = {
        "tool": "onnx-dynedit", "version": __version__, "original_sha256": loaded.sha256,
        "changed": [r["initializer"] for r in records],
    }
    if extra_provenance:
        provenance.update(extra_provenance)
    edits = {"format": 1, "original_sha256": loaded.sha256, "tensors": records, "previous_metadata": ours(original)}
    set_metadata(model, PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))
    set_metadata(model, EDITS_KEY, json.dumps(edits, sort_keys=True))
    return model


def _write_float(original: onnx.ModelProto, model: onnx.ModelProto, upd: LayerUpdate, weight: np.ndarray,
                 sources: dict, init_index: dict[str, int]) -> dict:
    """Write the edited float weight of ``upd.layer`` into ``model`` (in place) where the
    weight lives (initializer, Constant node, or a ConstantOfShape placeholder that
    becomes an initializer: its node is recorded for the caller to remove); the record."""
    layer, graph, name = upd.layer, model.graph, upd.layer.initializer
    delta = upd.delta()
    new = _apply_delta(layer, weight, delta, +1.0)
    if not np.isfinite(new).all():
        raise EditError(f"the edit of layer {layer.node!r} would make non-finite weights in {name!r}",
                        hint=f"the edit is refused; try {option('max_edits', 1)} or another layer")
    restored = _apply_delta(layer, new, delta, -1.0)
    record = {
        "initializer": name, "node": layer.node, "op": layer.op, "dtype": str(weight.dtype),
        "shape": list(weight.shape), "source": layer.source,
        "factors": [[_b64(u), _b64(d)] for u, d in upd.factors],
        "xor_zlib": _xor_b64(weight, restored),
        "rounding": _rounding(upd, delta, new.astype(np.float64) - weight.astype(np.float64)),
    }
    if name in init_index:
        i = init_index[name]
        graph.initializer[i].CopyFrom(_tensor_proto(name, new, original.graph.initializer[i]))
        return record
    kind, node_idx = sources[name]
    node = graph.node[node_idx]
    if kind == "constant":
        for attr in node.attribute:
            if attr.name == "value":
                attr.t.CopyFrom(_tensor_proto(name, new, attr.t))
                return record
        raise EditError(f"Constant node for {name!r} stores a list attribute; not editable")  # value_floats etc.
    # ConstantOfShape placeholder -> initializer of the same name
    record["node_proto"] = base64.b64encode(node.SerializeToString(deterministic=True)).decode()
    record["node_index"] = node_idx
    graph.initializer.append(_tensor_proto(name, new, None))
    return record


def _rounding(upd: LayerUpdate, delta: np.ndarray, written: np.ndarray) -> dict:
    """The rounding of one written tensor (see ``quant.rounding_stats``) plus the rank of
    the float edit before rounding (what ``diff`` calls ``float_delta_rank``)."""
    out = rounding_stats(upd.layer.from_canonical(delta), written)
    out["float_delta_rank"] = factors_rank(upd.factors, delta.shape)
    return out


def factors_rank(factors, shape: tuple[int, int]) -> int:
    """The rank of sum_i u_i d_i^T ([out, in] = ``shape``) from its factors: U D^T =
    Q_U (R_U R_D^T) Q_D^T has the singular values of the small core R_U R_D^T, so the
    whole matrix needs no SVD (``np.linalg.matrix_rank`` of a 4096 x 4096 layer's: 17 s
    on this 2-core CPU). Singular values count above matrix_rank's tolerance taken at
    sum_i |u_i| |d_i| (>= the largest one): the rounding level of the sum, so that factors
    which cancel give 0, as the summed matrix does."""
    if not factors or 0 in shape:
        return 0
    u = np.stack([np.asarray(f[0], np.float64) for f in factors], axis=1)
    d = np.stack([np.asarray(f[1], np.float64) for f in factors], axis=1)
    sv = np.linalg.svd(np.linalg.qr(u, mode="r") @ np.linalg.qr(d, mode="r").T, compute_uv=False)
    level = float((np.linalg.norm(u, axis=0) * np.linalg.norm(d, axis=0)).sum())
    return int((sv > level * max(shape) * np.finfo(np.float64).eps).sum())


def _xor_b64(new: np.ndarray, old: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.bitwise_xor(_bits(new), _bits(old)).tobytes(), XOR_LEVEL)).decode()


def _replace_tensor(graph: onnx.GraphProto, name: str, values: np.ndarray) -> None:
    """Put ``values`` into the initializer or Constant node named ``name`` (same storage)."""
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[i].CopyFrom(_tensor_proto(name, values, init))
            return
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(_tensor_proto(name, values, attr.t))
                    return
    raise EditError(f"tensor {name!r} is neither an initializer nor a Constant tensor; cannot write it")


def _write_quantised(loaded: LoadedModel, model: onnx.ModelProto, layer: Layer, upd: LayerUpdate,
                     q: np.ndarray, delta: np.ndarray) -> dict:
    """Requantise the edited weight of ``layer`` into ``model`` (in place); the record."""
    graph = model.graph
    wq = layer.quant
    scale = constant_value(graph, wq.scale)
    zp = constant_value(graph, wq.zero_point) if wq.zero_point else None
    w = dequantize(q, scale, zp, wq).astype(np.float64)
    w_new = w + layer.from_canonical(delta)
    if not np.isfinite(w_new).all():
        raise EditError(f"the edit of layer {layer.node!r} would make non-finite weights in {layer.initializer!r}",
                        hint=f"the edit is refused; try {option('max_edits', 1)} or another layer")
    rq = requantize(w_new, q, scale, zp, wq)
    if rq.clipped:
        log.warning("%s: %d value(s) of %r clipped to the integer range (scale %r is shared)", loaded.label,
                    rq.clipped, layer.initializer, wq.scale)
    written = dequantize(rq.q, rq.scale, rq.zero_point, wq).astype(np.float64) - w
    changes = [(wq.scale, scale, rq.scale), (wq.zero_point, zp, rq.zero_point)]
    bias_change = 0.0
    if not rq.scale_kept:
        bias = _requantised_bias(graph, layer, scale, rq.scale)
        changes += bias[:2]
        bias_change = bias[2] if bias else 0.0
    aux = []
    for tname, old, new in changes:
        if tname and new is not None and new.tobytes() != old.tobytes():
            aux.append({"initializer": tname, "xor_zlib": _xor_b64(new, old)})
            _replace_tensor(graph, tname, new)
    _replace_tensor(graph, layer.initializer, rq.q)
    rounding = _rounding(upd, delta, written)
    rounding.update({"scale_kept": rq.scale_kept, "groups": rq.groups, "rescaled_groups": rq.rescaled,
                     "clipped": rq.clipped, "bias_requantised": bool(bias_change or len(changes) > 2),
                     "bias_max_abs_change": bias_change})
    return {
        "initializer": layer.initializer, "node": layer.node, "op": layer.op, "dtype": str(q.dtype),
        "shape": list(q.shape), "source": layer.source,
        "factors": [[_b64(u), _b64(d)] for u, d in upd.factors],
        "xor_zlib": _xor_b64(rq.q, q), "quant": wq.to_dict(), "aux": aux, "rounding": rounding,
    }


def _requantised_bias(graph: onnx.GraphProto, layer: Layer, w_scale: np.ndarray, w_scale_new: np.ndarray) -> list:
    """QDQ Conv/Gemm biases are int32 with scale = input scale x weight scale (ONNX
    Runtime fuses DQ-Conv-Q into QLinearConv only then, reading the integers with that
    product). When the weight scale changes, give the bias the new product and requantise
    it, so that the layer stays an integer kernel. Returns [(scale name, old, new),
    (integers name, old, new), max |bias change|], or [] when the bias is not of that form
    (or its tensors are shared)."""
    node = graph.node[layer.node_index]
    if layer.quant.scheme != "qdq" or layer.op not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return []
    producer = {out: n for n in graph.node for out in n.output}
    b_dq, x_dq = producer.get(node.input[2]), producer.get(node.input[0])
    if b_dq is None or x_dq is None or b_dq.op_type != "DequantizeLinear" or x_dq.op_type != "DequantizeLinear":
        return []
    if len(b_dq.input) < 2 or len(x_dq.input) < 2:
        return []
    bq, bs, xs = (constant_value(graph, n) for n in (b_dq.input[0], b_dq.input[1], x_dq.input[1]))
    bz = constant_value(graph, b_dq.input[2]) if len(b_dq.input) > 2 and b_dq.input[2] else None
    if bq is None or bs is None or xs is None or bq.dtype != np.int32 or xs.size != 1 or (bz is not None and bz.any()):
        return []
    uses = sum(1 for n in graph.node for i in n.input if i in (b_dq.input[0], b_dq.input[1]))
    if uses != 2:
        return []
    old = (xs.astype(np.float32).reshape(()) * w_scale.astype(np.float32)).reshape(-1)
    if bs.size != old.size or not np.allclose(bs.reshape(-1).astype(np.float64), old, rtol=1e-6, atol=0):
        return []
    new_bs = (xs.astype(np.float32).reshape(()) * w_scale_new.astype(np.float32)).reshape(bs.shape).astype(bs.dtype)
    b_float = bq.astype(np.float64) * np.broadcast_to(bs.astype(np.float64).reshape(-1) if bs.size > 1 else bs, bq.shape)
    per = np.broadcast_to(new_bs.astype(np.float64).reshape(-1) if new_bs.size > 1 else new_bs, bq.shape)
    lo, hi = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    new_bq = np.clip(np.rint(b_float / per), lo, hi).astype(np.int32)
    change = float(np.abs(new_bq.astype(np.float64) * per - b_float).max()) if bq.size else 0.0
    return [(b_dq.input[1], bs, new_bs), (b_dq.input[0], bq, new_bq), change]


@dataclass(frozen=True)
class FactorEdit:
    """One rank-one term (u, d) on a layer, in the form ``Twin.applied`` takes."""

    layer: Layer
    u: np.ndarray
    d: np.ndarray


def written_edits(original: onnx.ModelProto, written: onnx.ModelProto, updates: list[LayerUpdate]) -> list[FactorEdit]:
    """The edits as written: a quantised layer's requantised change (dequantised, written
    minus original) is not rank one; it is returned as the rank-one terms of its SVD, so
    that the twin can reproduce exactly what ONNX Runtime runs. Other layers: the factors."""
    out = []
    for upd in updates:
        layer = upd.layer
        if layer.quant is None:
            out.extend(FactorEdit(layer, np.asarray(u, np.float64), np.asarray(d, np.float64)) for u, d in upd.factors)
            continue
        wq = layer.quant
        vals = []
        for model in (original, written):
            g = model.graph
            zp = constant_value(g, wq.zero_point) if wq.zero_point else None
            vals.append(dequantize(constant_value(g, wq.quantized), constant_value(g, wq.scale), zp, wq)
                        .astype(np.float64))
        canon = layer.to_canonical(vals[1] - vals[0])
        if not canon.any():
            continue
        u_, s_, vt = np.linalg.svd(canon, full_matrices=False)
        keep = s_ > s_[0] * 1e-12
        out.extend(FactorEdit(layer, u_[:, i] * s_[i], vt[i]) for i in np.flatnonzero(keep))
    return out


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
        if "quant" in rec:  # integers (and aux tensors): XOR against the written ones
            for entry in [rec] + list(rec.get("aux", [])):
                current = constant_value(graph, entry["initializer"])
                _replace_tensor(graph, entry["initializer"], _unxor(current, entry["xor_zlib"]))
            continue
        factors = tuple((_unb64(u), _unb64(d)) for u, d in rec["factors"])
        restored = _apply_delta(layer, weight, LayerUpdate(layer=layer, factors=factors).delta(), -1.0)
        original = _unxor(restored, rec["xor_zlib"]).view(weight.dtype)
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
    _reinsert_nodes(graph, reinsert)
    replace_ours(model, record.get("previous_metadata", {}))  # ours dropped, the input's restored
    if model_sha256(model) != record["original_sha256"]:
        raise InputError(f"{loaded.label}: reverting did not reproduce the original model (hash mismatch)",
                         hint="the file was changed after editing; revert needs the file `dynedit edit` wrote")
    return model


def _unxor(current: np.ndarray, xor_b64: str) -> np.ndarray:
    """The tensor whose bits XOR ``current``'s give the recorded ``xor_zlib``."""
    bits = _bits(current)
    xor = np.frombuffer(zlib.decompress(base64.b64decode(xor_b64)), dtype=bits.dtype)
    return np.bitwise_xor(bits.reshape(current.shape), xor.reshape(current.shape)).view(current.dtype)


def _reinsert_nodes(graph, reinsert: list[tuple[int, str, int]]) -> None:
    """ConstantOfShape placeholders back (node index, node proto, the initializer that replaced it)."""
    for node_index, node_b64, init_i in sorted(reinsert, key=lambda r: -r[2]):
        del graph.initializer[init_i]
    for node_index, node_b64, _ in sorted(reinsert):
        node = onnx.NodeProto()
        node.ParseFromString(base64.b64decode(node_b64))
        graph.node.insert(node_index, node)


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

    tensors = _check_record_header(record, corrupt)
    layers = build_layer_map(loaded.model).layers
    graph = loaded.model.graph
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
        _check_factors(rec, i, name, layer, corrupt)
        _check_xor(rec.get("xor_zlib"), name, weight.size * weight.dtype.itemsize, "the weight", corrupt)
        aux = rec.get("aux", [])
        if not isinstance(aux, list):
            corrupt(f"aux of {name!r} is not a list")
        for j, entry in enumerate(aux):
            aname = entry.get("initializer") if isinstance(entry, dict) else None
            avalue = constant_value(graph, aname) if isinstance(aname, str) else None
            if avalue is None:
                corrupt(f"aux entry {j} of {name!r} names no constant tensor")
            _check_xor(entry.get("xor_zlib"), aname, avalue.nbytes, "the tensor", corrupt)
        if rec["source"] == "constant_of_shape":
            index = rec.get("node_index")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= len(graph.node):
                corrupt(f"entry {i} ({name!r}) has no valid node_index")
            node_bytes = _b64_field(rec.get("node_proto"), f"node_proto of {name!r}", corrupt)
            try:
                onnx.NodeProto().ParseFromString(node_bytes)
            except Exception:  # noqa: BLE001 - protobuf DecodeError and friends
                corrupt(f"node_proto of {name!r} is not a NodeProto")


def _check_record_header(record, corrupt) -> list:
    """The record's top level: an object with the original's hash, a string map of the
    metadata it replaced, and a non-empty list of tensors (returned)."""
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
    return tensors


def _check_factors(rec: dict, i: int, name: str, layer: Layer, corrupt) -> None:
    """Every recorded (u, d) pair is base64 of float64 vectors that fit the layer."""
    factors = rec.get("factors")
    if not isinstance(factors, list) or not factors:
        corrupt(f"entry {i} ({name!r}) has no factors")
    for j, pair in enumerate(factors):
        if not isinstance(pair, list) or len(pair) != 2:
            corrupt(f"factor {j} of {name!r} is not a (u, d) pair")
        u, d = (_b64_field(v, f"factor {j} of {name!r}", corrupt) for v in pair)
        if len(u) != 8 * layer.out_features or len(d) != 8 * layer.in_features:
            corrupt(f"factor {j} of {name!r} does not fit the layer's {layer.out_features}x{layer.in_features} "
                    "weight")


def _check_xor(text, name: str, need: int, what: str, corrupt) -> None:
    """``text`` is base64 of zlib data that inflates to exactly ``need`` bytes (bounded:
    no zip bomb)."""
    raw = _b64_field(text, f"xor_zlib of {name!r}", corrupt)
    try:
        got = zlib.decompressobj().decompress(raw, need + 1)
    except zlib.error:
        corrupt(f"xor_zlib of {name!r} is not zlib data")
    if len(got) != need:
        corrupt(f"xor_zlib of {name!r} has {len(got)} bytes, {what} needs {need}")


def _b64_field(text, what: str, corrupt) -> bytes:
    if not isinstance(text, str):
        corrupt(f"{what} is not a string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        corrupt(f"{what} is not base64")

