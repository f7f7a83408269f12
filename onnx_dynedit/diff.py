"""Compare two ONNX models: which weights changed (relative Frobenius change, numerical
rank of the difference) and every difference that is not a weight value.

Needs onnx + numpy only. "Weights" are initializers and Constant-node tensors; the
``dynedit.*`` metadata entries (provenance, undo record) are not reported as
differences.

Integer tensors that a model dequantises (DequantizeLinear, Cast [+ Sub] + Mul, or the
weight of a ConvInteger / MatMulInteger whose output is scaled; quant.py)
are compared as the float values they stand for: (q_b - z_b) s_b - (q_a - z_a) s_a, each
model with its own scale and zero point. Their ``rank`` is the numerical rank at the
tensor's quantisation step: the change is divided elementwise by b's scale (the step of
each value) and singular values below (sqrt(m) + sqrt(n)) / 2 are ignored, the size of
a matrix of rounding errors of up to half a step (uniform rounding noise measures about
0.29 (sqrt(m) + sqrt(n))). A requantised rank-one edit therefore shows rank 1 when it is
larger than its rounding, and rank 0 when every value rounded back to what it was. When
b carries an edit record, ``float_delta_rank`` (the rank of the float edit before
rounding) and ``rounding_residual`` (||written - float edit|| / ||float edit||) come from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .io import LoadedModel
from .metadata import edit_record, replace_ours
from .quant import dequantize, integer_op_weights, weight_dequantisations


@dataclass(frozen=True)
class TensorChange:
    initializer: str
    rel_change: float
    rank: int
    max_abs_change: float
    shape: tuple[int, ...]
    dtype: str = "float32"
    dequantised: bool = False             # compared as dequantised floats (module doc)
    float_delta_rank: int | None = None   # from b's edit record, when it has one
    rounding_residual: float | None = None

    def to_dict(self) -> dict:
        return {"initializer": self.initializer, "rel_change": self.rel_change, "rank": self.rank,
                "max_abs_change": self.max_abs_change, "shape": list(self.shape), "dtype": self.dtype,
                "dequantised": self.dequantised, "float_delta_rank": self.float_delta_rank,
                "rounding_residual": self.rounding_residual}


@dataclass(frozen=True)
class ModelDiff:
    changed: tuple[TensorChange, ...]
    other_differences: tuple[str, ...]
    a: str = field(default="")
    b: str = field(default="")

    @property
    def identical(self) -> bool:
        return not self.changed and not self.other_differences

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "changed": [c.to_dict() for c in self.changed],
                "other_differences": list(self.other_differences), "identical": self.identical}


def numerical_rank(delta: np.ndarray, reference: np.ndarray, step: np.ndarray | None = None) -> int:
    """Rank of ``delta`` reshaped [shape[0], -1], ignoring singular values at the level of
    float rounding of ``reference`` and of ``reference + delta`` (the dtype's eps x the
    larger max |value| x (sqrt(m) + sqrt(n)): an edit larger than the weight is rounded at
    its own scale),
    or, given the quantisation ``step`` of each value (broadcastable), at the level of
    rounding to that step (module doc)."""
    if delta.size == 0:
        return 0
    if step is not None:
        scaled = np.asarray(delta, np.float64) / np.broadcast_to(np.asarray(step, np.float64), delta.shape)
        mat = scaled.reshape(scaled.shape[0], -1) if scaled.ndim > 1 else scaled.reshape(1, -1)
        sv = np.linalg.svd(mat, compute_uv=False)
        if sv.size == 0 or sv[0] == 0:
            return 0
        m, n = mat.shape
        return int((sv > max(0.5 * (np.sqrt(m) + np.sqrt(n)), sv[0] * max(m, n) * np.finfo(np.float64).eps)).sum())
    mat = delta.reshape(delta.shape[0], -1) if delta.ndim > 1 else delta.reshape(1, -1)
    mat = mat.astype(np.float64)
    m, n = mat.shape
    eps = float(np.finfo(reference.dtype).eps) if np.issubdtype(reference.dtype, np.floating) else 0.0
    scale = max(float(np.abs(reference).max()), float(np.abs(reference + delta).max())) if reference.size else 0.0
    sv = np.linalg.svd(mat, compute_uv=False)
    if sv.size == 0 or sv[0] == 0:
        return 0
    tol = max(eps * scale * (np.sqrt(m) + np.sqrt(n)), sv[0] * max(m, n) * np.finfo(np.float64).eps)
    return int((sv > tol).sum())


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {}
    for init in model.graph.initializer:
        out[init.name] = numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _strip(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without weight values and without our metadata: what must stay equal."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        _clear_data(init)
    for node in copy.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    _clear_data(attr.t)
    replace_ours(copy)
    return copy


def _clear_data(t: onnx.TensorProto) -> None:
    for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(f)
    t.ClearField("external_data")
    t.data_location = onnx.TensorProto.DEFAULT


def _describe(proto) -> str:
    text = str(proto).strip().replace("\n", " ")
    return text[:160] + ("..." if len(text) > 160 else "")


def structural_differences(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    a, b = _strip(a), _strip(b)
    diffs = []
    for fname in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        va, vb = getattr(a, fname), getattr(b, fname)
        if va != vb:
            diffs.append(f"{fname}: {va!r} -> {vb!r}")
    oa = [(o.domain, o.version) for o in a.opset_import]
    ob = [(o.domain, o.version) for o in b.opset_import]
    if oa != ob:
        diffs.append(f"opset_import: {oa} -> {ob}")
    ma = [(p.key, p.value) for p in a.metadata_props]
    mb = [(p.key, p.value) for p in b.metadata_props]
    if ma != mb:
        da, db = dict(ma), dict(mb)
        for k in sorted(set(da) | set(db)):
            if da.get(k) != db.get(k):
                diffs.append(f"metadata_props[{k!r}]: {da.get(k)!r} -> {db.get(k)!r}")
        if da == db:
            diffs.append("metadata_props: order changed")
    ga, gb = a.graph, b.graph
    for fname in ("name", "doc_string"):
        if getattr(ga, fname) != getattr(gb, fname):
            diffs.append(f"graph.{fname}: {getattr(ga, fname)!r} -> {getattr(gb, fname)!r}")
    for fname in ("input", "output", "value_info", "node", "initializer", "sparse_initializer"):
        la, lb = list(getattr(ga, fname)), list(getattr(gb, fname))
        sa = [x.SerializeToString(deterministic=True) for x in la]
        sb = [x.SerializeToString(deterministic=True) for x in lb]
        if sa == sb:
            continue
        if len(la) != len(lb):
            names_a = [getattr(x, "name", "") for x in la]
            names_b = [getattr(x, "name", "") for x in lb]
            gone = [n for n in names_a if n not in names_b]
            new = [n for n in names_b if n not in names_a]
            diffs.append(f"graph.{fname}: {len(la)} -> {len(lb)} entries"
                         + (f"; removed {gone[:5]}" if gone else "") + (f"; added {new[:5]}" if new else ""))
            continue
        for i, (x, y) in enumerate(zip(sa, sb)):
            if x != y:
                name = getattr(la[i], "name", "")
                if fname == "node":
                    name = name or la[i].op_type
                diffs.append(f"graph.{fname}[{i}] ({name}): {_describe(la[i])} -> {_describe(lb[i])}")

    def functions(m):
        return [f.SerializeToString(deterministic=True) for f in m.functions]

    if functions(a) != functions(b):
        diffs.append("functions differ")
    return diffs


def _by_quantized(model: onnx.ModelProto, weights: dict) -> dict:
    found = list(weight_dequantisations(model.graph, weights.get).values())
    found += integer_op_weights(model.graph, weights.get).values()
    return {wq.quantized: wq for wq in found}


def _edit_records(model: onnx.ModelProto) -> dict:
    """initializer -> its tensor entry of the edit record; {} when the record is missing
    or unreadable (diff reports what it can without it)."""
    try:
        record = edit_record(model) or {}
        return {t["initializer"]: t for t in record.get("tensors", []) if isinstance(t, dict)}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def _dequantised_change(name, wq_a, wq_b, wa, wb, records) -> TensorChange | None:
    try:
        fa = dequantize(wa[name], wa[wq_a.scale], wa.get(wq_a.zero_point) if wq_a.zero_point else None, wq_a)
        sb = wb[wq_b.scale]
        fb = dequantize(wb[name], sb, wb.get(wq_b.zero_point) if wq_b.zero_point else None, wq_b)
    except (KeyError, ValueError, TypeError):
        return None
    if fa.shape != fb.shape:
        return None
    d = fb.astype(np.float64) - fa.astype(np.float64)
    step = np.abs(sb.astype(np.float64).reshape(wq_b.scale_shape) if sb.size > 1 else sb.astype(np.float64))
    step = np.where(step > 0, step, 1.0)
    norm = float(np.linalg.norm(fa.astype(np.float64)))
    rec = records.get(name, {})
    rounding = rec.get("rounding") if isinstance(rec.get("rounding"), dict) else {}
    return TensorChange(
        initializer=name, rel_change=float(np.linalg.norm(d)) / norm if norm > 0 else float("inf"),
        rank=numerical_rank(d, fa, step=step), max_abs_change=float(np.abs(d).max()), shape=tuple(fa.shape),
        dtype=str(wa[name].dtype), dequantised=True, float_delta_rank=rounding.get("float_delta_rank"),
        rounding_residual=rounding.get("rounding_residual"))


def diff_models(a: LoadedModel, b: LoadedModel) -> ModelDiff:
    wa, wb = _weights(a.model), _weights(b.model)
    qa, qb = _by_quantized(a.model, wa), _by_quantized(b.model, wb)
    zero_points = {wq.zero_point for wq in list(qa.values()) + list(qb.values()) if wq.zero_point}
    record = _edit_records(b.model)
    changed = []
    other = []
    for name in wa:
        if name not in wb:
            continue
        x, y = wa[name], wb[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            other.append(f"tensor {name!r}: {x.dtype}{list(x.shape)} -> {y.dtype}{list(y.shape)}")
            continue
        if x.tobytes() == y.tobytes():
            continue
        if name in qa and name in qb:
            change = _dequantised_change(name, qa[name], qb[name], wa, wb, record)
            if change is not None:
                changed.append(change)
                continue
        if not np.issubdtype(x.dtype, np.floating) and name not in zero_points:  # a zero point is a number
            other.append(f"tensor {name!r} ({x.dtype}) values differ")
            continue
        d = y.astype(np.float64) - x.astype(np.float64)
        norm = float(np.linalg.norm(x.astype(np.float64)))
        rounding = record.get(name, {}).get("rounding") if isinstance(record.get(name, {}).get("rounding"), dict) else {}
        changed.append(TensorChange(
            initializer=name, rel_change=float(np.linalg.norm(d)) / norm if norm > 0 else float("inf"),
            rank=numerical_rank(d, x), max_abs_change=float(np.abs(d).max()), shape=tuple(x.shape),
            dtype=str(x.dtype), float_delta_rank=rounding.get("float_delta_rank"),
            rounding_residual=rounding.get("rounding_residual")))
    for name in wb:
        if name not in wa:
            other.append(f"tensor {name!r} added")
    for name in wa:
        if name not in wb:
            other.append(f"tensor {name!r} removed")
    other.extend(structural_differences(a.model, b.model))
    return ModelDiff(changed=tuple(changed), other_differences=tuple(other), a=a.label, b=b.label)
