"""Transformers and several inputs (issue 9): a small BERT-style text classifier
(input_ids + attention_mask, int64) and a small ViT, exported by torch with random
weights (tests/corpus.py). Real ONNX Runtime and onnx2torch; forced one-edit repairs
whose diff is one rank-1 initializer change and that revert bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
from onnx_dynedit.io import load_model  # noqa: E402
from onnx_dynedit.twin import Twin  # noqa: E402
from test_roundtrip import run_cli  # noqa: E402

VOCAB = 50
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    path = folder / "bert.onnx"
    onnx.save_model(corpus.bert_tiny(), str(path))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (4, 8))
    mask = np.ones((4, 8), np.int64)
    mask[:, 6:] = 0  # padded tail
    np.savez(folder / "pairs.npz", **{"corrupt:input_ids": ids[:2], "corrupt:attention_mask": mask[:2],
                                      "clean:input_ids": ids[2:], "clean:attention_mask": mask[2:]})
    np.savez(folder / "stats.npz", **{"x:input_ids": rng.integers(0, VOCAB, (6, 8)),
                                      "x:attention_mask": np.ones((6, 8), np.int64)})
    return folder


def test_bert_inspects_with_parity(bert, capsys):
    code, out, err = run_cli(["inspect", bert / "bert.onnx", "--json", "--int-range", "0", str(VOCAB)], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert [i["name"] for i in report["inputs"]] == ["input_ids", "attention_mask"]
    assert report["parity"]["ok"] and report["parity"]["max_rel_diff"] <= 1e-5
    editable = [l for l in report["layers"] if l["editable"]]
    # q, k, v, o, fc1, fc2 per block (MatMul on [B, T, D]) + pooler + head
    assert len(editable) == 14 and {l["op"] for l in editable} >= {"MatMul"}


def test_bert_embedding_path():
    """Token ids have no gradient: IG runs over the token-embedding Gather's output."""
    twin = Twin(load_model(corpus.bert_tiny()), "cpu")
    assert twin.token_inputs and len(twin.embeddings) == 1
    ids = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    emb = twin.embed((ids, mask))[0]
    assert emb.shape == (2, 8, 32)
    with torch.no_grad():
        same = twin.forward_embedded((ids, mask), [emb])
        plain = twin.forward((ids, mask))
    torch.testing.assert_close(same, plain)
    path = twin.interpolate((ids[:1], mask[:1]), (ids[1:], mask[1:]), torch.tensor([0.0, 1.0]))
    with torch.no_grad():
        ends = path.forward(slice(0, 2))
    torch.testing.assert_close(ends[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ends[1], twin.forward((ids[1:], mask[:1]))[0], atol=1e-5, rtol=1e-5)


def test_bert_key_statistics_in_groups(monkeypatch):
    """Two inputs, the mask read deep in the graph: key statistics made group by group
    (each later group replaying the graph's tail from what the first group's passes kept,
    the mask among it) are the sums of one pass, and the outputs handed back are a run's."""
    from onnx_dynedit import rank_one
    from onnx_dynedit.data import pack_inputs

    twin = Twin(load_model(corpus.bert_tiny()), "cpu")
    layers = list(twin.layer_map.editable())
    rng = np.random.default_rng(0)
    mask = np.ones((40, 8), np.int64)
    mask[:, 6:] = 0
    x = pack_inputs({"input_ids": rng.integers(0, VOCAB, (40, 8)), "attention_mask": mask})
    whole = rank_one.key_statistics(twin, layers, x, batch_size=16)
    monkeypatch.setattr(rank_one, "MOMENTS_BUDGET", 1)
    outputs: list = []
    grouped = rank_one.key_statistics(twin, layers, x, batch_size=16, outputs=outputs)
    assert len(rank_one._moment_groups(layers)) == len(layers) > 1
    np.testing.assert_array_equal(np.concatenate(outputs), twin.run(x, batch_size=16))
    for layer in layers:
        torch.testing.assert_close(grouped[layer.node].chol, whole[layer.node].chol, rtol=1e-6, atol=1e-9)


def test_bert_forced_edit_two_inputs(bert, tmp_path, capsys):
    out = tmp_path / "edited.onnx"
    code, stdout, err = run_cli(["edit", bert / "bert.onnx", "--pairs", bert / "pairs.npz", "--stats",
                                 bert / "stats.npz", "-o", out, "--criterion", "output", "--target-gap", "0",
                                 "--max-edits", "1", "--json"], capsys)
    assert code in (0, 1), err
    report = json.loads(stdout)
    assert report["parity_after"]["ok"] and len(report["changed_initializers"]) == 1
    code, stdout, err = run_cli(["diff", bert / "bert.onnx", out, "--json"], capsys)
    diff = json.loads(stdout)
    assert [c["rank"] for c in diff["changed"]] == [1] and not diff["other_differences"], diff
    back = tmp_path / "back.onnx"
    code, _, err = run_cli(["revert", out, "-o", back], capsys)
    assert code == 0, err
    code, stdout, _ = run_cli(["diff", bert / "bert.onnx", back], capsys)
    assert stdout.startswith("identical")


def test_locate_on_tokens(bert, capsys):
    code, stdout, err = run_cli(["locate", bert / "bert.onnx", "--pairs", bert / "pairs.npz", "--stats",
                                 bert / "stats.npz", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["chosen"] and len(report["layers"]) + len(report["skipped"]) == 14


def test_two_input_model_refuses_a_single_array(bert, tmp_path, capsys):
    bad = tmp_path / "pairs.npz"
    np.savez(bad, corrupt=np.zeros((1, 8), np.int64), clean=np.zeros((1, 8), np.int64))
    code, _, err = run_cli(["locate", bert / "bert.onnx", "--pairs", bad], capsys)
    assert code == 2 and "corrupt:input_ids" in err and len(err.strip().splitlines()) == 1, err


def test_vit_loads_and_matmul_on_tokens_is_editable(tmp_path, capsys):
    path = tmp_path / "vit.onnx"
    onnx.save_model(corpus.vit_tiny(), str(path))
    code, out, err = run_cli(["inspect", path, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["parity"]["ok"] and report["parity"]["max_rel_diff"] <= 1e-5
    ops = [l["op"] for l in report["layers"] if l["editable"]]
    assert ops.count("MatMul") >= 4 and "Conv" in ops


@pytest.mark.parametrize("model", ["vit", "bert"])
def test_replays_of_some_rows_on_shape_computed_reshapes(model):
    """The attention's Reshape targets are computed from the input's shape (Shape ->
    Gather -> Concat): a ``DownstreamRunner`` recorded a few rows per pass and replayed
    for some rows (the chunked fits, the screen's scores) recomputes them for those rows,
    and gives the whole forward's rows, from every editable layer. It used to replay the
    first pass's batch size ("shape '[3, ...]' is invalid"), and the ViT's attention
    output projection (a Gemm on [T x B, D], the batch inside the merged axis) took the
    wrong rows."""
    from onnx_dynedit.twin import DownstreamRunner

    if model == "vit":
        twin = Twin(load_model(corpus.vit_tiny()), "cpu")
        x = twin.to_tensor(np.random.default_rng(0).normal(size=(7, 3, 32, 32)).astype(np.float32))
    else:
        twin = Twin(load_model(corpus.bert_tiny()), "cpu")
        rng = np.random.default_rng(0)
        x = (torch.from_numpy(rng.integers(0, VOCAB, (7, 8))), torch.ones(7, 8, dtype=torch.int64))
    layers = list(twin.layer_map.editable())
    assert len([l for l in layers if l.op == "MatMul"]) >= 4
    with torch.no_grad():
        whole = twin.forward(x)
        runner = DownstreamRunner(twin, layers, x, rows=3)  # passes of 3, 3 and 1 rows
        for layer in layers:
            for rows in (slice(0, 3), slice(3, 7), slice(6, 7), None):
                want = whole if rows is None else whole[rows]
                torch.testing.assert_close(runner(rows, layer=layer), want, rtol=1e-4, atol=1e-5)


def _predict(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].argmax(1)


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="the sample data needs scikit-learn")
def test_a_trained_vit_trojan_is_repaired_from_one_pair(tmp_path, capsys):
    """A trained transformer with a Trojan: ``vit_badnets`` (sample_models/build.py: a
    small ViT on the digits, the 3x3 patch trigger in its last token, stats = its own
    training images), built here (about 25 s). ``dynedit edit`` from one pair with its
    stats and val exits 0 (before the replay fix above it stopped with "shape ... is
    invalid"), and on the held-out test set, through ONNX Runtime, the trigger no longer
    works and clean accuracy is kept: docs/results.md, "Transformers with a Trojan"."""
    r = subprocess.run([sys.executable, str(REPO / "sample_models" / "build.py"), "--out", str(tmp_path),
                        "--cases", "vit_badnets"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "vit_badnets"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["attack_success_rate"] >= 0.9 and meta["stats_acc"] == 1.0  # a Trojan; memorised stats
    out = tmp_path / "fixed.onnx"
    code, _, err = run_cli(["edit", d / "model.onnx", "--pairs", d / "pairs.npz", "--stats", d / "stats.npz",
                            "--val", d / "val.npz", "-o", out, "--report", tmp_path / "report.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["check_share"] >= 0.9  # the check pairs: the trigger moved onto stats inputs no fit used
    clean, corrupt = np.load(d / "clean_test.npz"), np.load(d / "corrupt_test.npz")
    y, others = clean["y"], clean["y"] != meta["target"]
    attack = float((_predict(out, corrupt["x"])[others] == meta["target"]).mean())
    drop = float((_predict(d / "model.onnx", clean["x"]) == y).mean() - (_predict(out, clean["x"]) == y).mean())
    assert attack <= 0.05 and drop <= 0.01, (attack, drop)


def test_vit_forced_edit_skips_the_seq_first_attention_layers(tmp_path, capsys):
    """torchvision's ViT (legacy export) runs its attention projections on [T, B, D] and
    [T x B, D]: those layers are not candidates (their rows are not along the first
    axis, where the key statistics, pair keys and integrated gradients read them; it
    stopped with an internal error in ``index_add_``), the others are, and a forced edit
    is one rank-1 change that reverts bit for bit. Pinning such a layer is refused."""
    from onnx_dynedit.twin import Twin as TwinClass

    path = tmp_path / "vit.onnx"
    onnx.save_model(corpus.vit_tiny(), str(path))
    x = np.random.default_rng(0).normal(size=(30, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "pairs.npz", corrupt=x[:1], clean=x[1:2])
    np.savez(tmp_path / "stats.npz", x=x[2:])
    twin = TwinClass(load_model(path), "cpu")
    elsewhere = twin.rows_elsewhere(twin.layer_map.editable(), x[:2])
    assert sorted(elsewhere) == sorted(l.node for l in twin.layer_map.editable() if "self_attention" in l.node)
    assert len(elsewhere) == 4  # the in- and output projections of both blocks
    out = tmp_path / "edited.onnx"
    code, stdout, err = run_cli(["edit", path, "--pairs", tmp_path / "pairs.npz", "--stats", tmp_path / "stats.npz",
                                 "-o", out, "--criterion", "output", "--target-gap", "0", "--max-edits", "1",
                                 "--max-degradation", "1", "--json"], capsys)
    assert code in (0, 1), err
    report = json.loads(stdout)
    assert report["parity_after"]["ok"] and len(report["changed_initializers"]) == 1
    assert not set(elsewhere) & {s["node"] for s in report["steps"]}
    code, stdout, err = run_cli(["diff", path, out, "--json"], capsys)
    assert [c["rank"] for c in json.loads(stdout)["changed"]] == [1]
    back = tmp_path / "back.onnx"
    assert run_cli(["revert", out, "-o", back], capsys)[0] == 0
    assert run_cli(["diff", path, back], capsys)[1].startswith("identical")
    code, _, err = run_cli(["edit", path, "--pairs", tmp_path / "pairs.npz", "--stats", tmp_path / "stats.npz",
                            "-o", tmp_path / "pinned.onnx", "--layer", sorted(elsewhere)[0]], capsys)
    assert code == 2 and "seq-first attention" in err and len(err.strip().splitlines()) == 1, err
