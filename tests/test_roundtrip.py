"""The surgery round trip on real ONNX files: real ONNX Runtime sessions, the real
onnx2torch twin, real files on disk (no mocks).

1. `dynedit inspect --json` on every model: exit 0, parity ok, the documented keys.
2. The layer map: exact layouts, checked against ONNX Runtime's own intermediate outputs.
3. Write-back with no change: the saved model equals the original field by field.
4. Write-back of a known rank-one change to each editable layer: ONNX Runtime on the
   written file == the twin with the same hook; `dynedit diff` sees exactly that rank-1
   change; the weights match a numpy computation; revert restores the original exactly.
5. Unusable input: exit 2, one line on stderr naming the file, no traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

import graphs
from cli.main import main as cli_main
from onnx_dynedit.diff import diff_models
from onnx_dynedit.io import load_model, model_sha256, save_model
from onnx_dynedit.layers import Layer, build_layer_map, constant_value
from onnx_dynedit.keys import layer_keys
from onnx_dynedit.parity import check_parity
from onnx_dynedit.shapes import input_specs, random_inputs
from onnx_dynedit.twin import Twin
from onnx_dynedit.writeback import LayerUpdate, factors_rank, revert, write_back

REPO = Path(__file__).resolve().parents[1]
HAND = sorted(graphs.BUILDERS) + ["gemm_external"]
TORCH = ["torch_legacy13", "torch_legacy17", "torch_dynamo18"]
ALL = HAND + TORCH


# ----------------------------------------------------------------------------- helpers


def run_cli(args, capsys) -> tuple[int, str, str]:
    """`dynedit ARGS` in-process (cli.main.main, the console entry point)."""
    capsys.readouterr()
    try:
        cli_main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run_cli_subprocess(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(code: int, err: str, path: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("dynedit: error: "), err
    assert str(path) in lines[0], err
    assert "Traceback" not in err


@dataclass(frozen=True)
class Edit:
    layer: Layer
    u: np.ndarray
    d: np.ndarray


def seeded_edit(layer: Layer, weight: np.ndarray, seed: int, rel: float = 0.5) -> Edit:
    """A rank-one change u d^T with Frobenius norm ``rel`` x that of the canonical W."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(layer.out_features)
    d = rng.standard_normal(layer.in_features)
    canon = np.linalg.norm(layer.to_canonical(weight))
    scale = rel * canon / (np.linalg.norm(u) * np.linalg.norm(d))
    return Edit(layer, u * np.sqrt(scale), d * np.sqrt(scale))


_TWINS: dict[str, tuple] = {}


def loaded_and_twin(path: Path):
    key = str(path)
    if key not in _TWINS:
        loaded = load_model(path)
        _TWINS[key] = (loaded, Twin(loaded, "cpu", input_shapes=graphs.INPUT_SHAPES.get(Path(path).stem)))
    return _TWINS[key]


def tol_for(loaded) -> float:
    fp16 = any(i.data_type == onnx.TensorProto.FLOAT16 for i in loaded.model.graph.initializer)
    return 2e-2 if fp16 else 1e-5


def assert_same_except_dynedit_metadata(orig: onnx.ModelProto, new: onnx.ModelProto) -> None:
    """Field by field: everything equal; metadata_props = the original's, in order,
    followed only by dynedit.* entries."""
    assert new.ir_version == orig.ir_version
    assert [(o.domain, o.version) for o in new.opset_import] == [(o.domain, o.version) for o in orig.opset_import]
    for fname in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        assert getattr(new, fname) == getattr(orig, fname), fname
        assert new.HasField(fname) == orig.HasField(fname), fname
    meta_o = [(p.key, p.value) for p in orig.metadata_props]
    meta_n = [(p.key, p.value) for p in new.metadata_props]
    assert meta_n[:len(meta_o)] == meta_o
    added = [k for k, _ in meta_n[len(meta_o):]]
    assert added and all(k.startswith("dynedit.") for k in added), added
    go, gn = orig.graph, new.graph
    assert (gn.name, gn.doc_string) == (go.name, go.doc_string)
    for fname in ("input", "output", "value_info"):
        assert list(getattr(gn, fname)) == list(getattr(go, fname)), fname
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in gn.node] == \
        [(n.op_type, n.name, list(n.input), list(n.output)) for n in go.node]
    assert list(gn.node) == list(go.node)
    assert [(i.name, i.data_type, list(i.dims)) for i in gn.initializer] == \
        [(i.name, i.data_type, list(i.dims)) for i in go.initializer]
    for a, b in zip(go.initializer, gn.initializer):
        assert a == b, a.name
        assert numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()
    assert gn == go
    assert list(new.functions) == list(orig.functions)


def external_tensors(path: Path) -> dict[str, str]:
    """Tensor name -> external location, read from the file without loading the data."""
    model = onnx.load_model(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            out[t.name] = {e.key: e.value for e in t.external_data}["location"]
    return out


# ------------------------------------------------------------------ 1. inspect --json


@pytest.mark.parametrize("name", ALL)
def test_inspect_json_parity(name, all_model_files, capsys):
    path = all_model_files[name]
    code, out, err = run_cli(["inspect", path, "--json", "--device", "cpu"] + graphs.input_shape_args(name), capsys)
    assert code == 0, err
    report = json.loads(out)
    model = onnx.load_model(str(path), load_external_data=False)
    assert report["opset"] == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    init_names = {i.name for i in model.graph.initializer}
    real_inputs = [vi.name for vi in model.graph.input if vi.name not in init_names]
    assert [i["name"] for i in report["inputs"]] == real_inputs
    assert [o["name"] for o in report["outputs"]] == [vi.name for vi in model.graph.output]
    for spec in report["inputs"] + report["outputs"]:
        assert set(spec) >= {"name", "shape", "dtype"}
    assert report["layers"], "every test model has at least one weight layer"
    for layer in report["layers"]:
        assert set(layer) >= {"node", "op", "initializer", "bias", "shape", "shared"}
    parity = report["parity"]
    assert set(parity) >= {"max_abs_diff", "max_rel_diff", "ok"}
    assert parity["ok"] is True
    assert parity["max_rel_diff"] <= (2e-2 if name == "fp16" else 1e-5)


def test_inspect_subprocess_external_data(torch_model_files):
    """The real console module on the dynamo export with external data."""
    path = torch_model_files["torch_dynamo18"]
    assert external_tensors(path), "the dynamo fixture must use external data"
    proc = run_cli_subprocess(["inspect", path, "--json", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["opset"] >= 18
    assert report["parity"]["ok"] is True
    assert [l["op"] for l in report["layers"]] == ["Conv", "Conv", "Gemm", "Gemm"]
    assert "Traceback" not in proc.stderr


def test_inspect_subprocess_text_output(model_files):
    proc = run_cli_subprocess(["inspect", model_files["shared_weight"], "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout
    assert "shared by several nodes" in proc.stdout


def test_inspect_json_details(model_files, capsys):
    code, out, _ = run_cli(["inspect", model_files["symbolic_dims"], "--json", "--input-shape", "x:2,2,7,9"], capsys)
    report = json.loads(out)
    assert code == 0
    assert report["inputs"] == [{"name": "x", "shape": ["batch", 2, "h", "w"], "dtype": "float32"}]
    assert report["outputs"] == [{"name": "logits", "shape": ["batch", 3], "dtype": "float32"}]
    code, out, _ = run_cli(["inspect", model_files["fp16"], "--json"], capsys)
    report = json.loads(out)
    assert code == 0
    assert report["inputs"][0]["dtype"] == "float16" and report["outputs"][0]["dtype"] == "float16"
    assert {l["dtype"] for l in report["layers"]} == {"float16"}
    code, out, _ = run_cli(["inspect", model_files["shared_weight"], "--json"], capsys)
    layers = {l["node"]: l for l in json.loads(out)["layers"]}
    assert layers["g1"]["shared"] and layers["mm2"]["shared"] and not layers["g3"]["shared"]
    assert not layers["g1"]["editable"] and layers["g3"]["editable"]
    assert layers["g1"]["initializer"] == layers["mm2"]["initializer"] == "W"
    code, out, _ = run_cli(["inspect", model_files["gemm_transB1"], "--json"], capsys)
    layers = json.loads(out)["layers"]
    assert {k: layers[0][k] for k in ("node", "op", "initializer", "bias", "shape", "shared")} == \
        {"node": "fc1", "op": "Gemm", "initializer": "W1", "bias": "b1", "shape": [5, 6], "shared": False}


def test_inspect_inputs_npz(model_files, tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "inputs.npz"
    np.savez(npz, x=rng.standard_normal((7, 6)).astype(np.float32))
    code, out, err = run_cli(["inspect", model_files["gemm_transB1"], "--inputs", npz, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["parity"]["n_inputs"] == 7
    # keyed by input name, integer ids
    npz2 = tmp_path / "ids.npz"
    np.savez(npz2, ids=rng.integers(0, graphs.VOCAB, size=(5, 4)).astype(np.int64))
    code, out, err = run_cli(["inspect", model_files["token_ids"], "--inputs", npz2, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["parity"]["n_inputs"] == 5
    # wrong shape: unusable input, one line naming the npz
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 5), np.float32))
    code, _, err = run_cli(["inspect", model_files["gemm_transB1"], "--inputs", bad], capsys)
    assert_one_line_error(code, err, bad)


def test_int_range_drives_integer_inputs(model_files, capsys):
    path = model_files["token_ids"]
    code, out, err = run_cli(["inspect", path, "--int-range", "0", str(graphs.VOCAB), "--json"], capsys)
    assert code == 0 and json.loads(out)["parity"]["ok"], err
    # ids past the vocabulary: ONNX Runtime refuses them -> exit 2, one line, no traceback
    code, _, err = run_cli(["inspect", path, "--int-range", str(graphs.VOCAB), str(2 * graphs.VOCAB)], capsys)
    assert_one_line_error(code, err, path)
    assert "int-range" in err
    specs = input_specs(load_model(path).model)
    feeds = random_inputs(specs, int_range=(3, 4))
    assert feeds["ids"].dtype == np.int64 and (feeds["ids"] == 3).all()
    floats = random_inputs(input_specs(load_model(model_files["gemm_transB1"]).model), int_range=(3, 4))
    assert floats["x"].dtype == np.float32 and len(np.unique(floats["x"])) > 1


# ------------------------------------------------------------------- 2. the layer map


def _layers(path) -> dict[str, Layer]:
    return {l.node: l for l in build_layer_map(load_model(path).model).layers}


def test_layer_map_layouts(model_files):
    l = _layers(model_files["gemm_transB1"])["fc1"]
    assert (l.op, l.trans_b, l.alpha, l.shape, l.out_features, l.in_features) == ("Gemm", True, 1.0, (5, 6), 5, 6)
    assert l.layout == "W[out,in] = 1 * B" and l.bias == "b1" and l.source == "initializer"
    l = _layers(model_files["gemm_transB0_alpha2_beta"])["fc1"]
    assert (l.trans_b, l.alpha, l.shape, l.out_features, l.in_features) == (False, 2.0, (6, 5), 5, 6)
    assert l.layout == "W[out,in] = 2 * B.T"
    w = np.arange(30, dtype=np.float32).reshape(6, 5)
    np.testing.assert_array_equal(l.to_canonical(w), 2.0 * w.T)
    np.testing.assert_array_equal(l.from_canonical(l.to_canonical(w)), w)
    assert _layers(model_files["gemm_nobias_alpha"])["fc1"].bias is None
    l = _layers(model_files["gemm_square_transB0"])["fc1"]
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(l.to_canonical(w), w.T)
    l = _layers(model_files["gemm_square_transB1"])["fc1"]
    np.testing.assert_array_equal(l.to_canonical(w), w)
    for name in ("matmul", "matmul_square", "matmul_3d"):
        l = _layers(model_files[name])["mm1"]
        assert l.op == "MatMul" and l.layout == "W[out,in] = B.T" and l.bias is None and l.key_input == "x"
        assert (l.in_features, l.out_features) == l.shape
    l = _layers(model_files["opset9"])["fcb"]
    assert (l.trans_b, l.alpha) == (False, 0.5)
    convs = _layers(model_files["conv_padding"])
    assert (convs["conv_asym"].pads, convs["conv_asym"].kernel) == ((0, 1, 2, 0), (3, 2))
    assert (convs["conv_same"].auto_pad, convs["conv_same"].strides) == ("SAME_UPPER", (2, 2))
    assert convs["conv_same"].bias is None and convs["conv_asym"].in_features == 2 * 3 * 2
    assert set(_layers(model_files["unnamed_nodes"])) == {"Gemm_0", "Gemm_2"}
    assert set(_layers(model_files["token_ids"])) == {"fc"}  # the Gather table is not a layer


def test_layer_map_shared_constant_groups(model_files):
    layers = _layers(model_files["shared_weight"])
    for node in ("g1", "mm2"):
        assert layers[node].shared and not layers[node].editable and "shared" in layers[node].reason
        assert layers[node].initializer == "W"
    assert not layers["g3"].shared and layers["g3"].editable
    layers = _layers(model_files["constant_nodes"])
    assert layers["conv"].source == "constant" and layers["fc"].source == "constant"
    assert layers["conv"].shape == (3, 2, 3, 3) and layers["conv"].editable and layers["conv"].bias == "conv_b"
    layers = _layers(model_files["constant_of_shape"])
    assert layers["fc2"].source == "constant_of_shape" and layers["fc2"].shape == (3, 4)
    assert layers["fc2"].editable and layers["mm1"].source == "initializer"
    layers = _layers(model_files["conv_groups"])
    assert layers["gconv"].groups == 2 and not layers["gconv"].editable and "group" in layers["gconv"].reason
    assert layers["pconv"].editable
    for name in ("ir3", "opset7"):  # initializers listed as graph inputs are not "shared"
        layers = _layers(model_files[name])
        assert layers and all(l.editable and not l.shared for l in layers.values()), name
    assert {l.dtype for l in _layers(model_files["fp16"]).values()} == {"float16"}


def _with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in names:
        copy.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


@pytest.mark.parametrize("name", ["gemm_transB1", "gemm_transB0_alpha2_beta", "gemm_nobias_alpha",
                                  "gemm_square_transB0", "gemm_square_transB0_alpha2", "gemm_square_transB1",
                                  "matmul", "matmul_square", "matmul_3d", "opset9", "constant_of_shape",
                                  "conv_padding", "constant_nodes", "symbolic_dims", "torch_legacy13",
                                  "torch_dynamo18"])
def test_canonical_layout_matches_onnxruntime(name, all_model_files):
    """Independent of the twin: ONNX Runtime's own output of each layer node equals
    (canonical W) @ key + bias term, keys from the node's real input."""
    loaded = load_model(all_model_files[name])
    graph = loaded.model.graph
    layers = [l for l in build_layer_map(loaded.model).layers if l.editable]
    node_of = {l.node: graph.node[l.node_index] for l in layers}
    extra = []
    for l in layers:
        extra += [l.key_input, node_of[l.node].output[0]]
    extra = [n for n in dict.fromkeys(extra) if n not in {o.name for o in graph.output}
             and n not in {i.name for i in graph.input}]
    model = _with_outputs(loaded.model, extra)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = random_inputs(input_specs(loaded.model), batch=3, seed=1, shapes={
        k: (3,) + v[1:] for k, v in graphs.INPUT_SHAPES.get(name, {}).items()})
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds)))
    values.update(feeds)
    for l in layers:
        node = node_of[l.node]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = l.to_canonical(constant_value(graph, l.initializer))
        x = values[l.key_input].astype(np.float64)
        y = values[node.output[0]].astype(np.float64)
        if l.op == "Conv":
            keys = layer_keys(l, torch.from_numpy(x)).numpy()  # [B, P, in]
            pred = keys @ w.T  # [B, P, out]
            pred = pred.transpose(0, 2, 1).reshape(y.shape)
            if l.bias:
                pred = pred + constant_value(graph, l.bias).reshape(1, -1, 1, 1)
        else:
            pred = x @ w.T
            if l.op == "Gemm" and l.bias:
                pred = pred + attrs.get("beta", 1.0) * constant_value(graph, l.bias)
        np.testing.assert_allclose(pred, y, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(y).max()),
                                   err_msg=f"{name}:{l.node}")


# ------------------------------------------------------- 3. write-back with no change


@pytest.mark.parametrize("name", ALL)
def test_roundtrip_without_change(name, all_model_files, tmp_path, capsys):
    src = all_model_files[name]
    loaded = load_model(src)
    written = write_back(loaded, [])
    out = tmp_path / "same.onnx"
    save_model(written, out, external_names=loaded.external_names, protected=loaded.protected_paths())
    again = load_model(out)
    assert_same_except_dynedit_metadata(loaded.model, again.model)
    raw = onnx.load_model(str(src), load_external_data=False)
    if raw.ir_version >= 4 and name not in TORCH:  # add_provenance() gave these the extras
        assert again.model.doc_string == "a hand-built test model" and again.model.model_version == 7
        assert [p.key for p in again.model.metadata_props][:3] == ["author", "zz.last", "a.first"]
        inits = {i.name: i for i in again.model.graph.initializer}
        assert inits["unused_ints"].data_type == onnx.TensorProto.INT64
        assert inits["unused_floats"].data_type == onnx.TensorProto.FLOAT
        assert [i.name for i in again.model.graph.initializer][-2:] == ["unused_ints", "unused_floats"]
        assert len(again.model.graph.value_info) > 0
    if name == "fp16":
        assert {i.data_type for i in again.model.graph.initializer if i.name.startswith(("W", "b"))} == \
            {onnx.TensorProto.FLOAT16}
    code, stdout, err = run_cli(["diff", src, out, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["identical"] is True
    if loaded.has_external_data:
        ext = external_tensors(out)
        assert set(ext) == set(loaded.external_names)
        for location in set(ext.values()):
            assert (out.parent / location).is_file()
            assert not Path(location).is_absolute() and "/" not in location
        # ONNX Runtime itself reads the written file with its external data
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        feeds = random_inputs(input_specs(loaded.model))
        ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
        np.testing.assert_array_equal(session.run(None, feeds)[0], ref[0])
    else:
        assert not external_tensors(out)


def test_diff_subprocess_identical(model_files, tmp_path):
    loaded = load_model(model_files["conv_padding"])
    out = save_model(write_back(loaded, []), tmp_path / "same.onnx")
    proc = run_cli_subprocess(["diff", model_files["conv_padding"], out, "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["identical"] is True and result["changed"] == [] and result["other_differences"] == []


# ---------------------------------------------------- 4. write-back of a rank-one edit


EDIT_MODELS = HAND + TORCH


@pytest.mark.parametrize("name", EDIT_MODELS)
def test_rank_one_roundtrip(name, all_model_files, tmp_path, capsys):
    src = all_model_files[name]
    loaded, twin = loaded_and_twin(src)
    tol = tol_for(loaded)
    editable = twin.layer_map.editable()
    assert editable, name
    for i, layer in enumerate(editable):
        weight = constant_value(loaded.model.graph, layer.initializer)
        edit = seeded_edit(layer, weight, seed=100 + i)
        written = write_back(loaded, [LayerUpdate(layer, ((edit.u, edit.d),))])
        out = tmp_path / f"edited_{i}.onnx"
        save_model(written, out, external_names=loaded.external_names, protected=loaded.protected_paths())
        edited = load_model(out)
        where = f"{name}:{layer.node}"

        # ONNX Runtime on the written file == the twin with the same rank-one hook
        parity = check_parity(twin, model=edited.model, edits=[edit], seed=i)
        assert parity.max_rel_diff <= tol, (where, parity.max_rel_diff)
        # ... and the edit is not a no-op: without the hook the twin disagrees
        assert check_parity(twin, model=edited.model, seed=i).max_rel_diff > 5 * tol, where

        # numpy: written weight == from_canonical(to_canonical(W) + u d^T), original layout and dtype
        new_weight = constant_value(edited.model.graph, layer.initializer)
        expected = layer.from_canonical(layer.to_canonical(weight) + np.outer(edit.u, edit.d))
        assert new_weight.dtype == weight.dtype and new_weight.shape == weight.shape, where
        if weight.dtype == np.float16:
            np.testing.assert_allclose(new_weight.astype(np.float64), expected, rtol=2e-3, atol=2e-3, err_msg=where)
        else:
            np.testing.assert_allclose(new_weight, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(),
                                       err_msg=where)

        # diff: exactly this tensor, rank 1, nothing else (ConstantOfShape: node -> initializer)
        diff = diff_models(loaded, edited)
        if layer.source == "constant_of_shape":
            assert diff.changed == (), where
            fill_node = next(n.name for n in loaded.model.graph.node if layer.initializer in n.output)
            others = list(diff.other_differences)
            assert len(others) == 3, others
            assert others[0] == f"tensor {layer.initializer!r} added"
            assert any(o.startswith("graph.node:") and repr(fill_node) in o for o in others), others
            assert any(o.startswith("graph.initializer:") and repr(layer.initializer) in o for o in others), others
        else:
            assert [c.initializer for c in diff.changed] == [layer.initializer], where
            assert diff.changed[0].rank == 1, (where, diff.changed[0])
            assert diff.other_differences == (), (where, diff.other_differences)

        # external data stays external, next to the written file
        if loaded.has_external_data:
            ext = external_tensors(out)
            assert set(ext) == set(loaded.external_names), where
            assert all((out.parent / loc).is_file() for loc in ext.values())

        # revert: the original proto exactly, every initializer bit for bit
        reverted = revert(edited)
        assert reverted == loaded.model, where
        assert model_sha256(reverted) == loaded.sha256
        for a, b in zip(loaded.model.graph.initializer, reverted.graph.initializer):
            assert a.name == b.name and numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()

    # the CLI diff of the last edit, as a user would see it
    code, stdout, err = run_cli(["diff", src, out, "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["identical"] is False
    if layer.source != "constant_of_shape":
        assert [(c["initializer"], c["rank"]) for c in result["changed"]] == [(layer.initializer, 1)]
        assert result["other_differences"] == []


def test_rank_of_an_edit_from_its_factors():
    """The report's float_delta_rank comes from the factors, not an SVD of the whole
    weight: ranks known on paper, and numpy's on the summed matrix where that is exact."""
    u, d = np.array([1.0, 2.0, 0.0, -1.0]), np.array([0.5, 0.0, 3.0])
    e1, e2 = np.eye(4), np.eye(3)
    assert factors_rank([], (4, 3)) == 0
    assert factors_rank([(np.zeros(4), d)], (4, 3)) == 0
    assert factors_rank([(u, d)], (4, 3)) == 1
    assert factors_rank([(u, d), (2 * u, -3 * d)], (4, 3)) == 1          # parallel: one direction
    assert factors_rank([(u, d), (-u, d)], (4, 3)) == 0                  # cancels exactly, as the sum does
    assert factors_rank([(e1[i], e2[i]) for i in range(3)], (4, 3)) == 3  # identity block
    assert factors_rank([(e1[i], e2[i % 3]) for i in range(4)], (4, 3)) == 3  # 4 terms, at most 3 columns
    rng = np.random.default_rng(0)
    for out, inp, r in [(7, 5, 2), (3, 40, 4), (64, 64, 3)]:
        f = [(rng.standard_normal(out), rng.standard_normal(inp)) for _ in range(r)]
        dense = sum(np.outer(a, b) for a, b in f)
        assert factors_rank(f, (out, inp)) == np.linalg.matrix_rank(dense) == min(out, inp, r)


def test_revert_file_roundtrip_external(torch_model_files, tmp_path):
    """Edit -> save with external data -> reload -> revert -> save: the saved revert
    equals the original file's model, and still keeps its weights external."""
    src = torch_model_files["torch_dynamo18"]
    loaded = load_model(src)
    layer = build_layer_map(loaded.model).get("fc1.weight")
    edit = seeded_edit(layer, constant_value(loaded.model.graph, layer.initializer), seed=7)
    edited_path = save_model(write_back(loaded, [LayerUpdate(layer, ((edit.u, edit.d),))]), tmp_path / "e.onnx",
                             external_names=loaded.external_names)
    edited = load_model(edited_path)
    back_path = save_model(revert(edited), tmp_path / "back.onnx", external_names=edited.external_names)
    back = load_model(back_path)
    assert back.model == loaded.model and back.sha256 == loaded.sha256
    assert set(external_tensors(back_path)) == set(loaded.external_names)


# ------------------------------------------------------------------- 5. bad input


def test_bad_input_not_onnx(tmp_path, capsys):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not an ONNX model\n")
    assert_one_line_error(*run_cli(["inspect", path], capsys)[::2], path)


def test_bad_input_truncated_subprocess(torch_model_files, tmp_path):
    data = torch_model_files["torch_legacy13"].read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    proc = run_cli_subprocess(["inspect", path, "--json"])
    assert_one_line_error(proc.returncode, proc.stderr, path)
    assert proc.stdout == ""


def test_bad_input_truncated_in_process(model_files, tmp_path, capsys):
    data = model_files["gemm_transB1"].read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run_cli(["inspect", path, "--json"], capsys)[::2], path)


@pytest.mark.parametrize("name", ["torch_dynamo18", "gemm_external"])
def test_bad_input_missing_external_data(name, all_model_files, tmp_path, capsys):
    path = tmp_path / all_model_files[name].name
    shutil.copy(all_model_files[name], path)  # the .onnx alone, not its data file
    assert external_tensors(path)
    assert_one_line_error(*run_cli(["inspect", path, "--json"], capsys)[::2], path)


@pytest.mark.parametrize("builder", [graphs.unsupported_det, graphs.custom_domain_op])
def test_bad_input_unsupported_op(builder, tmp_path, capsys):
    path = tmp_path / f"{builder.__name__}.onnx"
    onnx.save_model(builder(), str(path))
    code, out, err = run_cli(["inspect", path, "--json"], capsys)
    assert_one_line_error(code, err, path)
    assert out == ""


def test_bad_input_missing_file(tmp_path, capsys):
    path = tmp_path / "nowhere.onnx"
    assert_one_line_error(*run_cli(["inspect", path], capsys)[::2], path)


def test_large_model_twin_built_through_a_file(all_model_files, monkeypatch):
    """A normalised copy larger than TWIN_VIA_FILE reaches onnx2torch through a temporary
    file (memory at VGG size): the same twin, with exact parity, the folder removed."""
    from onnx_dynedit import twin as twin_module

    made = []
    real = twin_module.tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        folder = real(*args, **kwargs)
        made.append(Path(folder.name))
        return folder

    monkeypatch.setattr(twin_module, "TWIN_VIA_FILE", 0)
    monkeypatch.setattr(twin_module.tempfile, "TemporaryDirectory", recording)
    loaded = load_model(all_model_files["torch_legacy13"])
    twin = Twin(loaded, "cpu")
    assert len(made) == 1 and not made[0].exists()
    assert check_parity(twin).ok
    monkeypatch.setattr(twin_module, "TWIN_VIA_FILE", 2**40)
    x = next(iter(random_inputs(twin.inputs, batch=3).values()))
    np.testing.assert_array_equal(twin.run(x), Twin(loaded, "cpu").run(x))
