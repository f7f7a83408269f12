"""The rank-one update on hand-set weights, where the right answer is known on paper.

Every model here is a single weight layer built with onnx.helper (output = the layer's
output), loaded with ``io.load_model`` and turned into the real onnx2torch twin. Weights
and keys are small integers / dyadic numbers, so the float32 forward passes are exact
and the float64 algebra can be checked to 1e-9.

For a dense layer with key statistics C (regularised C_l = C + lam*mean(diag C)*I) and
one pair whose clean key is 0 (so delta = k~ = k*):

  d  = C_l^-1 k* / (k*^T C_l^-1 k*)          (d . delta = 1)
  u  = (v* - W k*) / (d . k*) = -W k*        (v* = W 0 = 0 without bias)
  W' = W + u d^T maps k* to v*; any key with d . k = 0 keeps its output.

The written ONNX model (write_back) is then run by plain onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from onnx_dynedit.errors import EditError
from onnx_dynedit.io import load_model
from onnx_dynedit import rank_one
from onnx_dynedit.rank_one import (DEFAULT_LAMBDA, RankOneEdit, closed_form_u, edit_direction, key_statistics,
                                   pair_key_groups, pair_keys)
from onnx_dynedit.keys import layer_keys
from onnx_dynedit.twin import Twin
from onnx_dynedit.writeback import LayerUpdate, write_back

F32 = TensorProto.FLOAT


# --------------------------------------------------------------------------- models


def _save(tmp_path, nodes, inputs, outputs, inits, name) -> str:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test_rank_one")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return str(path)


def dense_model(tmp_path, op: str, weight: np.ndarray, bias: np.ndarray | None, *, trans_b: int = 1,
                alpha: float = 1.0) -> str:
    """x [N, in] -> one Gemm (transB, alpha, beta=1, bias) or MatMul (x @ B) -> y."""
    inits = [numpy_helper.from_array(weight.astype(np.float32), "W")]
    if op == "Gemm":
        n_in = weight.shape[1] if trans_b else weight.shape[0]
        n_out = weight.shape[0] if trans_b else weight.shape[1]
        ins = ["x", "W"]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
            ins.append("b")
        node = helper.make_node("Gemm", ins, ["y"], name="fc", transB=trans_b, alpha=alpha)
    else:
        n_in, n_out = weight.shape
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
    return _save(tmp_path, [node], [helper.make_tensor_value_info("x", F32, ["N", n_in])],
                 [helper.make_tensor_value_info("y", F32, ["N", n_out])], inits, f"{op}_{trans_b}_{alpha:g}")


def conv_model(tmp_path, weight: np.ndarray, bias: np.ndarray) -> str:
    """x [N, 2, 5, 5] -> Conv(3x3, pads 1) -> y [N, 3, 5, 5]."""
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    inits = [numpy_helper.from_array(weight.astype(np.float32), "W"),
             numpy_helper.from_array(bias.astype(np.float32), "b")]
    return _save(tmp_path, [node], [helper.make_tensor_value_info("x", F32, ["N", 2, 5, 5])],
                 [helper.make_tensor_value_info("y", F32, ["N", 3, 5, 5])], inits, "conv")


def ort_run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0].astype(np.float64)


def only_layer(twin: Twin):
    layers = twin.layer_map.editable()
    assert len(layers) == 1
    return layers[0]


def chol_np(stats) -> np.ndarray:
    return stats.chol.cpu().numpy()


# ------------------------------------------------------------------------ dense cases

# Square 4x4 weights (a wrong transpose cannot go unnoticed), small integers.
W_SQ = np.array([[1, -2, 0, 3], [2, 1, -1, 0], [0, 3, 1, -2], [-1, 0, 2, 1]], dtype=np.float64)
BIAS = np.array([0.5, -1.0, 0.25, 2.0])
K_STAR = np.array([1.0, 2.0, -1.0, 0.0])  # |k*|^2 = 6


def _canonical(op, weight, trans_b, alpha):
    """W [out, in] with y = W x (+ bias), written independently of layers.py."""
    if op == "MatMul":
        return weight.T
    return alpha * (weight if trans_b else weight.T)


DENSE_CASES = [
    # (op, onnx weight, bias, transB, alpha)
    pytest.param("Gemm", W_SQ, BIAS, 1, 1.0, id="gemm-transB1"),
    pytest.param("Gemm", W_SQ, BIAS, 0, 2.0, id="gemm-transB0-alpha2"),
    pytest.param("Gemm", np.array([[1, 0, -1, 2], [2, 1, 0, -1], [0, -2, 1, 1]], float), BIAS[:3], 1, 1.0,
                 id="gemm-transB1-3x4"),  # transB=1: B is [out=3, in=4]
    pytest.param("MatMul", W_SQ, None, 1, 1.0, id="matmul-square"),
]


@pytest.mark.parametrize("op, weight, bias, trans_b, alpha", DENSE_CASES)
def test_dense_closed_form_identity_stats(tmp_path, op, weight, bias, trans_b, alpha):
    path = dense_model(tmp_path, op, weight, bias, trans_b=trans_b, alpha=alpha)
    loaded = load_model(path)
    twin = Twin(loaded, "cpu")
    layer = only_layer(twin)
    W = _canonical(op, weight, trans_b, alpha)
    n_out, n_in = W.shape
    assert (layer.out_features, layer.in_features) == (n_out, n_in)
    np.testing.assert_array_equal(layer.to_canonical(weight), W)
    np.testing.assert_array_equal(layer.from_canonical(W), weight)

    # stats: sqrt(n) * standard basis vectors -> C = E[k k^T] = I exactly
    stats_x = (np.sqrt(n_in) * np.eye(n_in)).astype(np.float32)
    stats = key_statistics(twin, [layer], stats_x)[layer.node]
    ridge = DEFAULT_LAMBDA * 1.0
    assert stats.n_keys == n_in
    assert stats.lam == pytest.approx(ridge, rel=1e-12)
    R = chol_np(stats)
    np.testing.assert_allclose(R @ R.T, (1 + ridge) * np.eye(n_in), rtol=0, atol=1e-12)

    k_star = K_STAR[:n_in]
    corrupt = k_star[None].astype(np.float32)
    clean = np.zeros_like(corrupt)
    keys = pair_keys(twin, [layer], corrupt, clean)[layer.node]
    np.testing.assert_array_equal(keys.pair(0)[0].numpy().reshape(-1), k_star)
    np.testing.assert_array_equal(keys.pair(0)[1].numpy().reshape(-1), 0.0)

    direction = edit_direction(stats, keys)
    d = direction.d.numpy()
    c_l = (1 + ridge) * np.eye(n_in)
    expected_d = np.linalg.solve(c_l, k_star)
    expected_d = expected_d / (expected_d @ k_star)  # scaled so that d . delta = 1
    np.testing.assert_allclose(d, expected_d, rtol=0, atol=1e-12)
    assert d @ k_star == pytest.approx(1.0, abs=1e-12)
    assert direction.affected == 1.0
    # specificity: Mahalanobis norm of k* under C_l
    assert direction.specificity == pytest.approx(np.sqrt(k_star @ np.linalg.solve(c_l, k_star)), rel=1e-12)

    u = closed_form_u(keys, direction.d).numpy()
    v_star = np.zeros(n_out)  # W @ clean key (bias excluded)
    u_by_hand = (v_star - W @ k_star) / (d @ k_star)
    np.testing.assert_allclose(u, u_by_hand, rtol=0, atol=1e-9)
    W_new = W + np.outer(u, d)
    np.testing.assert_allclose(W_new @ k_star, v_star, rtol=0, atol=1e-9)

    # write back into the ONNX initializer, run plain onnxruntime
    edit = RankOneEdit(layer=layer, u=u, d=d)
    new_model = write_back(loaded, [LayerUpdate(layer=layer, factors=((u, d),))])
    new_w = numpy_helper.to_array(next(i for i in new_model.graph.initializer if i.name == "W"))
    expected_w = (weight + layer.from_canonical(np.outer(u, d))).astype(np.float32)
    np.testing.assert_array_equal(new_w, expected_w)
    if op == "Gemm" and not trans_b:  # layout by hand: B' = B + (u d^T)^T / alpha
        np.testing.assert_allclose(new_w, weight + np.outer(d, u) / alpha, rtol=0, atol=1e-6)
    b = bias if bias is not None else np.zeros(n_out)
    y_star = ort_run(new_model, corrupt)[0]
    np.testing.assert_allclose(y_star, v_star + b, rtol=0, atol=1e-5)
    # the original still maps k* to W k* + b
    np.testing.assert_allclose(ort_run(path, corrupt)[0], W @ k_star + b, rtol=0, atol=1e-5)

    # keys orthogonal to d keep their output
    rng = np.random.default_rng(0)
    others = rng.standard_normal((5, n_in))
    others -= np.outer(others @ d, d) / (d @ d)
    np.testing.assert_allclose(others @ d, 0.0, atol=1e-12)
    x_orth = others.astype(np.float32)
    np.testing.assert_allclose(ort_run(new_model, x_orth), ort_run(path, x_orth), rtol=0, atol=1e-5)
    # ... and a generic key moves by exactly u (d . k)
    x_gen = rng.standard_normal((4, n_in)).astype(np.float32)
    shift = np.outer(x_gen.astype(np.float64) @ d, u)
    np.testing.assert_allclose(ort_run(new_model, x_gen), ort_run(path, x_gen) + shift, rtol=0, atol=1e-5)
    # the twin with the edit applied as a hook agrees with the written model
    with twin.applied([edit]):
        np.testing.assert_allclose(twin.run(x_gen), ort_run(new_model, x_gen), rtol=0, atol=1e-5)
    np.testing.assert_allclose(twin.run(x_gen), ort_run(path, x_gen), rtol=0, atol=1e-5)  # hook removed


def test_dense_direction_follows_key_statistics(tmp_path):
    """With a non-identity C the direction is C_l^-1 k*, not k*: the edit moves the
    corrupted key and spares the key directions the layer normally sees."""
    path = dense_model(tmp_path, "Gemm", W_SQ, BIAS, trans_b=0, alpha=2.0)
    loaded = load_model(path)
    twin = Twin(loaded, "cpu")
    layer = only_layer(twin)
    scales = np.array([4.0, 1.0, 0.5, 2.0])
    stats_x = (2.0 * np.diag(scales)).astype(np.float32)  # C = diag(scales^2)
    stats = key_statistics(twin, [layer], stats_x)[layer.node]
    C = np.diag(scales ** 2)
    ridge = DEFAULT_LAMBDA * float(np.mean(scales ** 2))
    c_l = C + ridge * np.eye(4)
    assert stats.lam == pytest.approx(ridge, rel=1e-12)
    R = chol_np(stats)
    np.testing.assert_allclose(R @ R.T, c_l, rtol=1e-12, atol=1e-12)

    corrupt = K_STAR[None].astype(np.float32)
    keys = pair_keys(twin, [layer], corrupt, np.zeros_like(corrupt))[layer.node]
    d = edit_direction(stats, keys).d.numpy()
    expected = np.linalg.solve(c_l, K_STAR)
    expected /= expected @ K_STAR
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-12)
    assert not np.allclose(d / np.linalg.norm(d), K_STAR / np.linalg.norm(K_STAR), atol=1e-3)

    u = closed_form_u(keys, torch.as_tensor(d)).numpy()
    W = 2.0 * W_SQ.T
    np.testing.assert_allclose(u, -W @ K_STAR / (d @ K_STAR), rtol=0, atol=1e-9)
    new_model = write_back(loaded, [LayerUpdate(layer=layer, factors=((u, d),))])
    np.testing.assert_allclose(ort_run(new_model, corrupt)[0], BIAS, rtol=0, atol=1e-5)


def test_dense_multi_pair_direction_and_u(tmp_path):
    """Two pairs whose key changes are the same direction (different lengths): d is
    C_l^-1 delta normalised to mean(d . delta) = 1, u is the least-squares fit."""
    path = dense_model(tmp_path, "Gemm", W_SQ, BIAS, trans_b=1)
    loaded = load_model(path)
    twin = Twin(loaded, "cpu")
    layer = only_layer(twin)
    stats = key_statistics(twin, [layer], (2.0 * np.eye(4)).astype(np.float32))[layer.node]
    clean = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=np.float32)
    corrupt = clean + np.array([1.0, 2.0], dtype=np.float32)[:, None] * K_STAR[None].astype(np.float32)
    keys = pair_keys(twin, [layer], corrupt, clean)[layer.node]
    d = edit_direction(stats, keys).d.numpy()
    expected = K_STAR / (K_STAR @ K_STAR) / 1.5  # mean over the pairs of d . delta = 1
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-12)
    u = closed_form_u(keys, torch.as_tensor(d)).numpy()
    s = corrupt.astype(np.float64) @ d
    r = (clean.astype(np.float64) - corrupt.astype(np.float64)) @ W_SQ.T
    np.testing.assert_allclose(u, (s[:, None] * r).sum(0) / (s @ s), rtol=0, atol=1e-9)


def test_dense_opposite_key_changes_are_editable(tmp_path):
    """Two pairs whose keys move in opposite directions (+k*, -k*) from clean keys with
    d . k = 0: the signed mean of d . delta is exactly 0, yet d ∝ k* separates them
    perfectly and one rank-one edit repairs both (u = -W k*). Regression: this was
    refused with "the edit direction does not separate corrupted from clean keys"."""
    path = dense_model(tmp_path, "Gemm", W_SQ, BIAS, trans_b=1)
    loaded = load_model(path)
    twin = Twin(loaded, "cpu")
    layer = only_layer(twin)
    stats = key_statistics(twin, [layer], (2.0 * np.eye(4)).astype(np.float32))[layer.node]
    clean = np.array([[2, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float32)  # both orthogonal to k*
    assert np.all(clean.astype(np.float64) @ K_STAR == 0)
    corrupt = clean + np.array([[1.0], [-1.0]], dtype=np.float32) * K_STAR[None].astype(np.float32)
    keys = pair_keys(twin, [layer], corrupt, clean)[layer.node]
    direction = edit_direction(stats, keys)
    d = direction.d.numpy()
    np.testing.assert_allclose(np.abs(d), np.abs(K_STAR) / 6.0, rtol=0, atol=1e-12)  # d = ±k*/|k*|^2
    proj = (corrupt - clean).astype(np.float64) @ d
    assert np.mean(np.abs(proj)) == pytest.approx(1.0, abs=1e-12)
    u = closed_form_u(keys, direction.d).numpy()
    W_new = W_SQ + np.outer(u, d)
    np.testing.assert_allclose(W_new @ corrupt.T.astype(np.float64), W_SQ @ clean.T.astype(np.float64),
                               rtol=0, atol=1e-9)
    new_model = write_back(loaded, [LayerUpdate(layer=layer, factors=((u, d),))])
    np.testing.assert_allclose(ort_run(new_model, corrupt), ort_run(path, clean), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ conv


def numpy_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int = 1) -> np.ndarray:
    """Plain float64 2-D convolution (cross-correlation), stride 1, symmetric zero pads."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, w.shape[2:], axis=(2, 3))  # [N, C, H, W, kh, kw]
    return np.einsum("nchwij,ocij->nohw", win, w.astype(np.float64)) + b.reshape(1, -1, 1, 1)


@pytest.fixture(scope="module")
def conv_case(tmp_path_factory):
    rng = np.random.default_rng(3)
    weight = rng.integers(-3, 4, size=(3, 2, 3, 3)).astype(np.float64) / 4
    bias = np.array([0.5, -0.25, 1.0])
    path = conv_model(tmp_path_factory.mktemp("conv"), weight, bias)
    loaded = load_model(path)
    return path, loaded, Twin(loaded, "cpu"), weight, bias


def test_conv_keys_are_unfolded_patches(conv_case):
    _, _, twin, _, _ = conv_case
    layer = only_layer(twin)
    assert layer.op == "Conv" and layer.in_features == 18 and layer.out_features == 3
    x = np.random.default_rng(1).standard_normal((2, 2, 5, 5)).astype(np.float32)
    keys = layer_keys(layer, torch.as_tensor(x)).numpy()
    assert keys.shape == (2, 25, 18)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i, j in [(0, 0), (2, 3), (4, 4)]:
        patch = xp[:, :, i:i + 3, j:j + 3].reshape(2, -1)  # channel-major, then kernel taps
        np.testing.assert_array_equal(keys[:, i * 5 + j, :], patch)
    # the keys times the canonical weight are the conv (bias excluded)
    W = layer.to_canonical(conv_case[3])
    out = np.einsum("npi,oi->nop", keys.astype(np.float64), W).reshape(2, 3, 5, 5)
    np.testing.assert_allclose(out, numpy_conv(x, conv_case[3], np.zeros(3)), atol=1e-5)



@pytest.mark.parametrize("geometry", [
    dict(kernel=(3, 3), strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1)),
    dict(kernel=(3, 2), strides=(2, 3), dilations=(1, 2), pads=(0, 1, 2, 0)),
    dict(kernel=(3, 3), strides=(2, 2), dilations=(1, 1), pads=(), auto_pad="SAME_UPPER"),
    dict(kernel=(1, 1), strides=(1, 1), dilations=(1, 1), pads=()),
])
@pytest.mark.parametrize("cap", [1, 7, 40, 10_000])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_sampled_conv_keys_are_every_kth_unfolded_key(conv_case, geometry, cap, layout):
    """The keys read from the padded input's windows (``conv_windows``) are torch's
    unfold, and the key statistics' subsample (at most ``cap`` keys: every k-th in
    (input, position) order) is the unfolded keys' subsample, bit for bit, whatever the
    stride, dilation, padding and memory format (the twin's CPU inputs are channels_last)."""
    from dataclasses import replace

    from onnx_dynedit.keys import pad_input, sampled_keys

    layer = replace(only_layer(conv_case[2]), **geometry)
    x = torch.as_tensor(np.random.default_rng(2).standard_normal((3, 2, 9, 11)).astype(np.float32))
    unfolded = torch.nn.functional.unfold(pad_input(layer, x), tuple(layer.kernel), dilation=tuple(layer.dilations),
                                          stride=tuple(layer.strides)).transpose(1, 2)
    x = x.contiguous(memory_format=layout)
    torch.testing.assert_close(layer_keys(layer, x), unfolded, rtol=0, atol=0)
    every = layer_keys(layer, x).reshape(-1, layer_keys(layer, x).shape[-1])
    got = sampled_keys(layer, x, cap)
    step = -(-every.shape[0] // cap)
    assert len(got) <= cap
    torch.testing.assert_close(got, every[::step], rtol=0, atol=0)

def test_conv_key_statistics_match_numpy(conv_case):
    _, _, twin, _, _ = conv_case
    layer = only_layer(twin)
    x = np.random.default_rng(2).standard_normal((6, 2, 5, 5)).astype(np.float32)
    stats = key_statistics(twin, [layer], x, batch_size=4)[layer.node]  # two batches
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = sliding_window_view(xp, (3, 3), axis=(2, 3))  # [N, C, 5, 5, 3, 3]
    keys = win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 18)
    C = keys.T @ keys / len(keys)
    assert stats.n_keys == 6 * 25
    ridge = DEFAULT_LAMBDA * np.mean(np.diag(C))
    assert stats.lam == pytest.approx(ridge, rel=1e-6)
    R = chol_np(stats)
    # keys are float32 in the twin: C is float32-accurate (relative to its scale)
    np.testing.assert_allclose(R @ R.T, C + ridge * np.eye(18), rtol=1e-5, atol=1e-6 * np.abs(C).max())


def test_conv_rank_one_edit_written_model(conv_case):
    path, loaded, twin, weight, bias = conv_case
    layer = only_layer(twin)
    rng = np.random.default_rng(4)
    stats_x = rng.uniform(0, 1, (16, 2, 5, 5)).astype(np.float32)
    clean = rng.uniform(0, 1, (2, 2, 5, 5)).astype(np.float32)
    corrupt = clean.copy()
    corrupt[:, :, 3:5, 3:5] = 1.0  # a 2x2 patch in the bottom-right corner
    stats = key_statistics(twin, [layer], stats_x)[layer.node]
    keys = pair_keys(twin, [layer], corrupt, clean)[layer.node]
    direction = edit_direction(stats, keys)
    d = direction.d.numpy()
    u = closed_form_u(keys, direction.d).numpy()
    assert 0 < direction.affected < 1  # only positions whose window sees the patch
    diff = np.concatenate([(kc - kk).numpy() for kc, kk in map(keys.pair, range(keys.n))]).reshape(-1, 18)
    affected = np.linalg.norm(diff, axis=1) > 1e-3 * np.linalg.norm(diff, axis=1).max()
    assert np.mean(diff[affected] @ d) == pytest.approx(1.0, abs=1e-9)

    new_model = write_back(loaded, [LayerUpdate(layer=layer, factors=((u, d),))])
    new_w = weight + layer.from_canonical(np.outer(u, d))
    assert new_w.shape == weight.shape
    x = np.concatenate([corrupt, clean, rng.standard_normal((3, 2, 5, 5)).astype(np.float32)])
    got = ort_run(new_model, x)
    np.testing.assert_allclose(got, numpy_conv(x, new_w, bias), rtol=0, atol=1e-4)
    with twin.applied([RankOneEdit(layer=layer, u=u, d=d)]):
        hooked = twin.run(x)
    np.testing.assert_allclose(hooked, got, rtol=0, atol=1e-4)
    # the closed form is the least-squares u at the layer: the corrupted outputs move
    # toward the clean ones
    before = np.linalg.norm(ort_run(path, corrupt) - ort_run(path, clean))
    after = np.linalg.norm(got[:2] - ort_run(path, clean))
    assert after < before


@pytest.mark.parametrize("key", ["diff", "corrupt"])
def test_pair_keys_read_block_by_block_give_the_same_edit(conv_case, monkeypatch, key):
    """Large layers' pair keys are never held whole: unfolded pair by pair in blocks of a
    few positions, the affected rows pooled into their Gram matrix. With every budget at
    its smallest (one position per block, no rows kept), the direction, the specificity,
    the affected share and the closed-form u are those of the keys held whole."""
    _, _, twin, _, _ = conv_case
    layer = only_layer(twin)
    rng = np.random.default_rng(7)
    stats = key_statistics(twin, [layer], rng.uniform(0, 1, (16, 2, 5, 5)).astype(np.float32))[layer.node]
    clean = rng.uniform(0, 1, (3, 2, 5, 5)).astype(np.float32)
    corrupt = clean.copy()
    corrupt[:, :, 3:5, 3:5] = 1.0
    corrupt[1, :, 0, 0] = -1.0
    whole = edit_direction(stats, pair_keys(twin, [layer], corrupt, clean)[layer.node], key=key, score_pairs=2)
    monkeypatch.setattr(rank_one, "PAIR_KEYS_BUDGET", 0)
    monkeypatch.setattr(rank_one, "KEY_BLOCK", 1)
    monkeypatch.setattr(rank_one, "ROWS_BUDGET", 0)
    keys = pair_keys(twin, [layer], corrupt, clean)[layer.node]
    assert len(list(keys.blocks())) == 3 * 25  # one position of one pair per block
    streamed = edit_direction(stats, keys, key=key, score_pairs=2)
    np.testing.assert_allclose(streamed.d.numpy(), whole.d.numpy(), rtol=1e-9, atol=1e-12)
    assert streamed.specificity == pytest.approx(whole.specificity, rel=1e-12)
    assert streamed.affected == whole.affected
    np.testing.assert_allclose(streamed.u_local.numpy(), whole.u_local.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_layers_over_the_capture_budget_are_recaptured_pair_by_pair(monkeypatch, device):
    """A layer whose captures of every pair exceed ACTIVATION_BUDGET holds none: each
    read runs the pair up to the layer again (the pass stopped there). Directions,
    specificities and closed-form u are those of the captured keys, on every layer of
    a sample model, with an earlier edit applied."""
    d = Path(__file__).resolve().parents[1] / "sample_models" / "badnets"
    twin = Twin(load_model(d / "model.onnx"), device)
    layers = list(twin.layer_map.editable())
    pairs = np.load(d / "pairs.npz")
    rng = np.random.default_rng(0)
    corrupt = np.concatenate([pairs["corrupt"], pairs["corrupt"][:1] + 0.1 * rng.standard_normal(pairs["corrupt"][:1].shape)]).astype(np.float32)
    clean = np.concatenate([pairs["clean"], pairs["clean"][:1]]).astype(np.float32)
    stats = key_statistics(twin, layers, np.load(d / "stats.npz")["x"][:64])
    first = layers[0]
    keys0 = pair_keys(twin, [first], corrupt, clean)[first.node]
    direction = edit_direction(stats[first.node], keys0)
    prev = [RankOneEdit(first, direction.u_local.cpu().numpy(), direction.d.cpu().numpy()).to_torch(twin.device)]

    def run():
        return {layer.node: (keys, edit_direction(stats[layer.node], keys))
                for layer, keys in pair_key_groups(twin, layers, corrupt, clean, edits=prev)}

    held = run()
    monkeypatch.setattr(rank_one, "ACTIVATION_BUDGET", 1)
    again = run()
    for layer in layers:
        (k1, a), (k2, b) = held[layer.node], again[layer.node]
        assert k1.recapture is None and k2.recapture is not None and k2.x_corrupt is None
        # one pair per pass instead of all at once: float32 rounding of the captures moves
        da, db, ua, ub = (t.cpu().numpy() for t in (a.d, b.d, a.u_local, b.u_local))
        np.testing.assert_allclose(db, da, rtol=1e-4, atol=1e-6 * np.abs(da).max())
        assert b.specificity == pytest.approx(a.specificity, rel=1e-5)
        np.testing.assert_allclose(ub, ua, rtol=1e-4, atol=1e-6 * np.abs(ua).max())
    # the pass stops at the layer: nothing after it runs
    calls = []
    last = twin.module_of(layers[-1]).register_forward_hook(lambda *a: calls.append(1))
    try:
        twin.capture_upto(layers[0], corrupt[:1])
    finally:
        last.remove()
    assert calls == []


@pytest.mark.parametrize("tail_budget", [rank_one.TAIL_BUDGET, 0])
def test_key_statistics_in_groups_are_the_same_sums(monkeypatch, tail_budget):
    """Layers whose float64 sums exceed MOMENTS_BUDGET together are accumulated and
    factored group by group in the same batches: the factors are those of one pass
    (badnets, every layer its own group). The first group's passes keep what the later
    groups read, which then recompute only the graph from their layers on: the first
    layer runs in the first group's passes alone. Over TAIL_BUDGET nothing is kept and
    every group makes whole passes, with the same factors."""
    d = Path(__file__).resolve().parents[1] / "sample_models" / "badnets"
    twin = Twin(load_model(d / "model.onnx"), "cpu")
    layers = list(twin.layer_map.editable())
    x = np.load(d / "stats.npz")["x"][:40]
    assert len(rank_one._moment_groups(layers)) == 1
    whole = key_statistics(twin, layers, x, batch_size=16)
    calls = {"first": 0, "last": 0}
    hooks = [twin.module_of(layer).register_forward_pre_hook(
        lambda *a, k=k: calls.__setitem__(k, calls[k] + 1)) for k, layer in (("first", layers[0]), ("last", layers[-1]))]
    monkeypatch.setattr(rank_one, "MOMENTS_BUDGET", 1)
    monkeypatch.setattr(rank_one, "TAIL_BUDGET", tail_budget)
    outputs: list = []
    try:
        grouped = key_statistics(twin, layers, x, batch_size=16, outputs=outputs)
    finally:
        for hook in hooks:
            hook.remove()
    # sizes from one input; 40 inputs in batches of 16: 3 passes per group
    assert calls["last"] == 1 + 3 * len(layers)
    assert calls["first"] == (1 + 3 if tail_budget else 1 + 3 * len(layers))
    np.testing.assert_array_equal(np.concatenate(outputs), twin.run(x, batch_size=16))
    for layer in layers:
        assert grouped[layer.node].n_keys == whole[layer.node].n_keys
        # the same sums in the same batches (bit-identical on this machine; BLAS may round
        # differently with another buffer alignment, so not asserted bit for bit)
        torch.testing.assert_close(grouped[layer.node].chol, whole[layer.node].chol, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("width", [3, 4, 7, 8, 9, 13])
def test_gram_sums_from_the_blocks_on_and_above_the_diagonal(monkeypatch, width):
    """The key sums add only the Gram blocks on and above the diagonal blocks (4 columns a
    block here), the blocks below stay untouched until mirrored: the result is the whole
    sum of k k^T over every batch, symmetric. Small integer keys, so every product and sum
    is exact in float32 and the answer is known exactly."""
    monkeypatch.setattr(rank_one, "GRAM_BLOCK", 4)
    edges = rank_one._gram_edges(width)
    assert edges[0] == 0 and edges[-1] == width and len(edges) - 1 == max(1, width // 4)
    rng = np.random.default_rng(width)
    batches = [rng.integers(-3, 4, size=(n, width)).astype(np.float32) for n in (5, 2)]
    acc = torch.zeros(width, width, dtype=torch.float64)
    buf = torch.empty(width * width)
    for keys in batches:
        rank_one._add_gram(acc, torch.from_numpy(keys), buf)
    for i in range(1, len(edges) - 1):  # below the diagonal blocks: nothing made yet
        assert not acc[edges[i]:, edges[i - 1]:edges[i]].any()
    whole = rank_one._mirrored(acc).numpy()
    expected = sum(k.astype(np.float64).T @ k.astype(np.float64) for k in batches)
    np.testing.assert_array_equal(whole, expected)


# ---------------------------------------------------------------------------- errors


def test_edit_direction_identical_keys_raises(tmp_path):
    path = dense_model(tmp_path, "Gemm", W_SQ, BIAS)
    twin = Twin(load_model(path), "cpu")
    layer = only_layer(twin)
    stats = key_statistics(twin, [layer], (2.0 * np.eye(4)).astype(np.float32))[layer.node]
    x = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    keys = pair_keys(twin, [layer], x, x.copy())[layer.node]
    with pytest.raises(EditError, match="identical keys"):
        edit_direction(stats, keys)


def test_key_statistics_gemm_random_inputs(tmp_path):
    path = dense_model(tmp_path, "Gemm", W_SQ, BIAS, trans_b=0, alpha=2.0)
    twin = Twin(load_model(path), "cpu")
    layer = only_layer(twin)
    x = np.random.default_rng(5).standard_normal((7, 4)).astype(np.float32)
    for lam in (DEFAULT_LAMBDA, 0.5):
        stats = key_statistics(twin, [layer], x, lam=lam, batch_size=3)[layer.node]
        k = x.astype(np.float64)
        C = k.T @ k / len(k)
        R = chol_np(stats)
        assert np.allclose(R, np.tril(R))  # lower triangular
        np.testing.assert_allclose(R @ R.T, C + lam * np.mean(np.diag(C)) * np.eye(4), rtol=1e-6, atol=1e-9)
        assert stats.n_keys == 7


# ----------------------------------------------------------------------------- hooks


def test_hooks_removed_when_body_raises(tmp_path):
    path = dense_model(tmp_path, "Gemm", W_SQ, BIAS)
    twin = Twin(load_model(path), "cpu")
    layer = only_layer(twin)
    module = twin.module_of(layer)
    assert len(module._forward_hooks) == 0
    edit = RankOneEdit(layer=layer, u=np.ones(4), d=np.ones(4))
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(RuntimeError, match="boom"):
        with twin.applied([edit, edit]):
            assert len(module._forward_hooks) == 2
            raise RuntimeError("boom")
    assert len(module._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with twin.capture([layer], outputs=True) as store:
            twin.run(x)
            assert len(store[layer.node]["in"]) == 1
            raise RuntimeError("boom")
    assert len(module._forward_hooks) == 0
    np.testing.assert_allclose(twin.run(x), ort_run(path, x), atol=1e-5)


def test_wide_factors_are_stored_in_float32_and_solved_in_float64(tmp_path, monkeypatch):
    """Layers wider than FACTOR_F32_FEATURES keep R in float32 (half the memory); the
    direction solved with it is the float64 one to float32 rounding, on a C with a
    condition number of 1e4."""
    import onnx_dynedit.rank_one as rank_one

    path = dense_model(tmp_path, "Gemm", W_SQ, BIAS, trans_b=0, alpha=2.0)
    twin = Twin(load_model(path), "cpu")
    layer = only_layer(twin)
    stats_x = (np.diag([100.0, 1.0, 0.5, 20.0]) @ np.random.default_rng(3).standard_normal((4, 64))).T.astype(np.float32)
    corrupt = K_STAR[None].astype(np.float32)
    keys = pair_keys(twin, [layer], corrupt, np.zeros_like(corrupt))[layer.node]
    exact = key_statistics(twin, [layer], stats_x)[layer.node]
    assert exact.chol.dtype == torch.float64
    monkeypatch.setattr(rank_one, "FACTOR_F32_FEATURES", 3)  # this 4-wide layer counts as wide
    stored = key_statistics(twin, [layer], stats_x)[layer.node]
    assert stored.chol.dtype == torch.float32 and stored.factor.dtype == torch.float64
    d_exact, d_stored = edit_direction(exact, keys).d.numpy(), edit_direction(stored, keys).d.numpy()
    np.testing.assert_allclose(d_stored, d_exact, rtol=1e-5, atol=1e-6 * np.abs(d_exact).max())
    np.testing.assert_allclose(stored.whiten(torch.eye(4)).numpy(), exact.whiten(torch.eye(4)).numpy(),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("gap", [1.5, 1.02])
def test_top_eigenvector_known_on_paper(gap):
    """A 600-wide PSD matrix Q diag(l) Q^T with l_1 = gap * l_2: the top eigenvector is Q's
    first column (up to sign). A wide gap converges by subspace iteration, a narrow one
    (too slow to converge) falls back to eigh; both give that column to 1e-7."""
    n = 600
    g = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    lam = torch.linspace(1.0, 0.01, n, dtype=torch.float64)
    lam[0] = gap * lam[1]
    a = (q * lam) @ q.T
    x = rank_one.top_eigenvector(a)
    assert abs(float(x.norm()) - 1) < 1e-12
    assert float(torch.minimum((x - q[:, 0]).norm(), (x + q[:, 0]).norm())) < 1e-7


def test_top_eigenvector_subspace_iteration_used_when_it_converges(monkeypatch):
    """With eigh of the full matrix made unavailable, a matrix with a clear top still gets
    its eigenvector (the small Rayleigh-Ritz problems only use eigh at block width)."""
    n = 400
    a = torch.diag(torch.linspace(1.0, 0.1, n, dtype=torch.float64))
    a[0, 0] = 3.0
    real = torch.linalg.eigh

    def small_only(m):
        assert m.shape[0] <= rank_one.EIG_BLOCK, "a full eigh was called"
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", small_only)
    x = rank_one.top_eigenvector(a)
    assert abs(abs(float(x[0])) - 1) < 1e-9
