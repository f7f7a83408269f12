"""Transformers and several inputs (issue 9): a small BERT-style text classifier
(input_ids + attention_mask, int64) and a small ViT, exported by torch with random
weights (tests/corpus.py). Real ONNX Runtime and onnx2torch; forced one-edit repairs
whose diff is one rank-1 initializer change and that revert bit for bit.
"""

from __future__ import annotations

import json
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
