"""Parity: ONNX Runtime against the torch twin on the same inputs, measured, never
assumed (max abs / rel error per output and where); ``require_parity`` turns a
failure into a ``ParityError`` naming the file and the output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from .errors import InputError, ParityError, option
from .sessions import ort_session
from .shapes import random_inputs


@dataclass(frozen=True)
class OutputParity:
    name: str
    max_abs_diff: float
    max_rel_diff: float  # max abs diff / output scale (max |ORT output|, at least 1)
    where: tuple[int, ...]


@dataclass(frozen=True)
class Parity:
    outputs: tuple[OutputParity, ...]
    tol: float
    n_inputs: int

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.max_rel_diff for o in self.outputs), default=0.0)

    @property
    def ok(self) -> bool:
        return bool(self.max_rel_diff <= self.tol)

    def to_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff, "ok": self.ok,
            "tol": self.tol, "n_inputs": self.n_inputs,
            "outputs": [{"name": o.name, "max_abs_diff": o.max_abs_diff, "max_rel_diff": o.max_rel_diff,
                         "where": list(o.where)} for o in self.outputs],
        }


def compare_outputs(names, expected: list[np.ndarray], got: list[np.ndarray]) -> list[OutputParity]:
    out = []
    for name, ref, val in zip(names, expected, got):
        ref = np.asarray(ref, dtype=np.float64)
        val = np.asarray(val, dtype=np.float64).reshape(ref.shape)
        diff = np.abs(ref - val)
        scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)) if diff.size else ()
        mad = float(diff.max()) if diff.size else 0.0
        out.append(OutputParity(name=name, max_abs_diff=mad, max_rel_diff=mad / scale, where=idx))
    return out


def parity_session(twin):
    """The ORT session ``check_parity`` compares the twin with by default: the twin's
    original model, with the attributed logits as an extra output when the twin has them."""
    model = twin.loaded.model
    if twin.logits_tensor is not None:
        return _session_with_output(model, twin.logits_tensor)
    return ort_session(model)


def _session_with_output(model: onnx.ModelProto, name: str):
    """An ORT session of ``model`` that also returns tensor ``name`` (the model proto is
    serialised with the extra output and left as it was)."""
    if name in {o.name for o in model.graph.output}:
        return ort_session(model)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        return ort_session(model)
    finally:
        del model.graph.output[-1]


def check_parity(twin, feeds: dict[str, np.ndarray] | None = None, *, seed: int = 0,
                 int_range=(0, 10), model: onnx.ModelProto | None = None, edits=(), session=None) -> Parity:
    """ONNX Runtime on ``model`` (default: the twin's original) vs the twin with ``edits``.
    ``session``: an ORT session of ``model`` to reuse across calls."""
    model = model if model is not None else twin.loaded.model
    if feeds is None:
        feeds = random_inputs(twin.inputs, seed=seed, int_range=int_range, shapes=twin.input_shapes,
                              label=twin.loaded.label)
    sizes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    hint = (f"give sizes that fit with {option('input_shapes', 'NAME:D1,D2,...', python='{NAME: (D1, D2, ...)}')} "
            f"(or {option('inputs_file')}); integer inputs must be valid ids ({option('int_range')})")
    try:
        if session is None:
            session = parity_session(twin) if model is twin.loaded.model else ort_session(model)
        names = [o.name for o in session.get_outputs()]
        expected = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise InputError(f"{twin.loaded.label}: ONNX Runtime cannot run the model on inputs of size {sizes} "
                         f"({lines[0][:300]})", hint=hint) from None
    xs = [twin.to_tensor(feeds[spec.name]) for spec in twin.inputs]
    try:
        with torch.no_grad(), twin.applied(edits):
            got = twin.module(*xs)
    except RuntimeError as exc:  # sizes the graph cannot take (a pooling window larger than the map ...)
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise InputError(f"{twin.loaded.label}: the model cannot run on inputs of size {sizes} "
                         f"({lines[0][:200]})", hint=hint) from None
    if not isinstance(got, (tuple, list)):
        got = [got]
    got = [g.detach().double().cpu().numpy() for g in got]
    first = next(iter(feeds.values()))
    parity = Parity(outputs=tuple(compare_outputs(names, expected, got)), tol=twin.tol,
                    n_inputs=int(first.shape[0]) if first.ndim else 1)
    if not parity.ok and twin.channels_last and not edits:
        # channels_last's rounding, not the conversion, can be what is off: outputs that tie
        # exactly in ORT and torch's default layout (the zoo's placeholder SqueezeNet: every
        # channel alike, logits of 6.8e9 one float32 step, 512, apart in channels_last)
        twin.set_layout(channels_last=False)
        return check_parity(twin, feeds, model=model, session=session)
    return parity


# ONNX Runtime runs a QDQ model's Conv / MatMul with integer kernels; on x86 CPUs without
# VNNI its u8s8 kernels add pairs of products in 16 bits and saturate, where the QDQ
# arithmetic (and the twin) does not. Measured: a per-channel QDQ copy of the real-size
# tv_badnets (ResNet-18 at 224x224) on an AVX2-only EPYC, twin vs ORT on real inputs 0.12
# relative (0.006 with ORT's graph optimisations off, and 0.006 quantised with
# reduce_range=True), on random inputs 0.03 (README, "Half-precision and int8 models").
QUANT_HINT = ("ONNX Runtime's integer kernels can saturate where the int8 arithmetic does not (u8s8 on x86 "
              "CPUs without VNNI): edit the float model and quantise the edited one, or quantise with "
              "reduce_range=True")


def require_parity(parity: Parity, label: str, *, quantised: bool = False) -> None:
    """A ``ParityError`` when ``parity`` is out of tolerance; ``quantised``: the twin's
    model has quantised activations (the hint then names ONNX Runtime's integer kernels)."""
    if not parity.ok:
        worst = max(parity.outputs, key=lambda o: o.max_rel_diff)
        raise ParityError(
            f"{label}: the torch twin differs from ONNX Runtime by {worst.max_abs_diff:.3g} "
            f"(relative {worst.max_rel_diff:.3g} > tol {parity.tol:g}) on output {worst.name!r} at {list(worst.where)}",
            hint=QUANT_HINT if quantised else "the twin is refused; report the model's ops",
        )
