"""How the twin should run quantize_dynamic's integer ops (README "Half-precision and int8
models", the decision): ONNX Runtime on the integer graph against

  twin          the torch twin as built (DequantizeLinear of the DynamicQuantizeLinear
                activation + the float Conv / MatMul on the dequantised weight)
  float layers  the same graph with the activations left unquantised (the integer layer
                replaced by its float equivalent only), run by ONNX Runtime

max |difference| / max(1, max |ORT output|) over one batch, and the largest of the same
over single-row runs. Copies made offline (tests/quantised.py, tests/corpus.py).

    python benchmarks/bench_dynamic_twin.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref - got).max()) / max(1.0, float(np.abs(ref).max()))


def _float_layers(norm: onnx.ModelProto) -> onnx.ModelProto:
    """The twin's copy with every DequantizeLinear of a DynamicQuantizeLinear output made
    the identity of the unquantised activation (and only the first output kept)."""
    out = onnx.ModelProto()
    out.CopyFrom(norm)
    producer = {o: n for n in out.graph.node for o in n.output}
    for node in out.graph.node:
        src = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if src is not None and src.op_type == "DynamicQuantizeLinear":
            node.op_type = "Identity"
            del node.input[:]
            node.input.append(src.input[0])
    del out.graph.output[1:]
    return out


def measure(label: str, model: onnx.ModelProto, x: np.ndarray, single_rows: int) -> list[str]:
    import tempfile

    from onnx_dynedit.io import load_model
    from onnx_dynedit.normalise import normalise
    from onnx_dynedit.parity import check_parity
    from onnx_dynedit.sessions import ort_session
    from onnx_dynedit.twin import Twin

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(model, str(path))
        twin = Twin(load_model(path), "cpu")
        name = twin.inputs[0].name
        twin_batch = check_parity(twin, {name: x}).max_rel_diff
        twin_rows = max(check_parity(twin, {name: x[i:i + 1]}).max_rel_diff for i in range(single_rows))
    ref_sess, alt_sess = ort_session(model), ort_session(_float_layers(normalise(model).model))

    def alt(rows):
        return _rel(ref_sess.run(None, {name: rows})[0], alt_sess.run(None, {name: rows})[0])

    alt_rows = max(alt(x[i:i + 1]) for i in range(single_rows))
    return [label, f"{twin_batch:.2g}", f"{twin_rows:.2g}", f"{alt(x):.2g}", f"{alt_rows:.2g}"]


def main() -> None:
    import corpus
    import quantised

    badnets = onnx.load(str(ROOT / "sample_models" / "badnets" / "model.onnx"))
    test = np.load(ROOT / "sample_models" / "badnets" / "clean_test.npz")
    x = test[test.files[0]][:64].astype(np.float32)
    full = {"reduce_range": False}  # quantize_dynamic's default, as shipped models have it (not the tests')
    rows = [measure("badnets, int8 per-tensor", quantised.to_dynamic(badnets, **full), x, 64),
            measure("badnets, uint8 per-tensor", quantised.to_dynamic(badnets, unsigned=True, **full), x, 64),
            measure("badnets, uint8 per-channel",
                    quantised.to_dynamic(badnets, per_channel=True, unsigned=True, **full), x, 64)]
    xr = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    rows.append(measure("ResNet-18 (random weights), int8", corpus.build("int8dyn_tv_resnet18_legacy13"), xr, 16))
    head = ["copy (quantize_dynamic)", "twin, batch of 64", "twin, single rows (max)", "float layers, batch of 64",
            "float layers, single rows (max)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
