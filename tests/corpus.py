"""A coverage corpus of real-world graph styles, built offline by code (nothing downloads).

One builder per model, each returning an ``onnx.ModelProto`` (``build(name)``); ``CORPUS``
lists them with what the tests need to know (``Entry``). Families:

- ``zoo_*``     the ONNX model zoo's old graphs (IR 3, opset 9, every initializer also a
                graph input, weights made at run time by ConstantOfShape) as the onnx
                package ships them for its backend tests (onnx/backend/test/data/light/).
                Their weights are placeholders (a constant); ``materialise`` replaces each
                ConstantOfShape weight with seeded random values (He-scaled, positive for
                1-D tensors so BatchNormalization variances stay valid), keeping the IR-3
                convention (initializers listed as inputs). ``zoo_*_placeholder`` keeps
                the ConstantOfShape nodes as shipped.
- ``paddle_style``  what paddle2onnx writes (PaddlePaddle cannot be installed here): every
                weight in a Constant node, dynamic batch AND width (``-1`` dims become
                ``dim_param``), BatchNormalization, MaxPool, MatMul [in, out] + Add bias,
                Softmax at the end.
- ``tf2onnx_style`` what tf2onnx writes for a Keras classifier: an NHWC input with
                ``unk__`` batch dim, a Transpose to NCHW, Conv with HWIO-turned-OIHW
                initializers, int64 shape arithmetic (Shape -> Gather -> Concat -> Reshape),
                MatMul + Add, Softmax.
- ``tv_*``      torchvision architectures with random weights, exported by the legacy
                (TorchScript) and the dynamo exporter at a few opsets.
- ``vit_tiny`` / ``bert_tiny``  small transformer classifiers (random weights).
- ``fp16_*``, ``qdq_*``, ``int8cm_*``, ``int8dyn_*``  half-precision and int8 copies of some of the above
                (tests/quantised.py): every float tensor in float16; onnxruntime's
                quantize_static in QDQ format (int8 weights and activations, per-channel
                ``_pc`` or per-tensor ``_pt``, calibrated on 16 seeded random inputs); int8
                weights dequantised by Cast + Mul (per-channel), as int8 transformer
                exports (MiniLM) write them; ``int8dyn_*``: onnxruntime's quantize_dynamic
                (ConvInteger / MatMulInteger on int8 weights, DynamicQuantizeLinear on
                activations).

Builders are plain functions so derived copies (fp16, int8) are one wrapper away.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
       "squeezenet", "vgg19", "zfnet512")


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    build: object = field(repr=False)
    input_shapes: dict = field(default_factory=dict)   # --input-shape for symbolic non-batch dims
    classifier: bool = True     # takes a forced edit (first output [N, C])
    heavy: bool = False         # > ~50 MB of weights or slow: benchmark only, not CI
    token_inputs: bool = False  # integer token ids (embedding-level attribution)


# ------------------------------------------------------------------ zoo (light) graphs


def zoo_placeholder(name: str) -> onnx.ModelProto:
    """The light zoo graph as onnx ships it (ConstantOfShape placeholder weights)."""
    return onnx.load(str(LIGHT_DIR / f"light_{name}.onnx"))


def materialise(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace every ConstantOfShape-made tensor by a seeded random initializer of the
    same name, listed as a graph input too (IR 3 convention); the shape initializers
    that fed them go away."""
    rng = np.random.default_rng(seed)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    keep, new, used_shapes = [], [], set()
    bn_var = {n.input[4] for n in graph.node if n.op_type == "BatchNormalization" and len(n.input) > 4}
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        used_shapes.add(node.input[0])
        out = node.output[0]
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif out in bn_var:
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.uniform(0.5, 1.5, shape) if "scale" in out or "_s_" in out else rng.normal(0.0, 0.1, shape)
        new.append(numpy_helper.from_array(value.astype(np.float32), out))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    del g.node[:]
    g.node.extend(keep)
    others = [i for i in g.initializer if i.name not in used_shapes]
    del g.initializer[:]
    g.initializer.extend(others + new)
    inputs = [vi for vi in g.input if vi.name not in used_shapes]
    del g.input[:]
    g.input.extend(inputs)
    g.input.extend(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in new)
    return copy


def zoo(name: str) -> onnx.ModelProto:
    return materialise(zoo_placeholder(name), seed=sum(map(ord, name)))


# ------------------------------------------------------------------ paddle2onnx style


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=numpy_helper.from_array(np.asarray(value), name))


def paddle_style(seed: int = 1) -> onnx.ModelProto:
    """x [-1, 3, 16, -1] (batch and width dynamic) -> conv3x3(Constant w) -> BN -> ReLU ->
    MaxPool 3/2 -> conv3x3 -> ReLU -> GlobalAveragePool -> Flatten -> MatMul + Add ->
    Softmax; every weight a Constant node, opset 11, names like paddle2onnx's."""
    rng = np.random.default_rng(seed)
    c1, c2, classes = 8, 16, 5
    w = {
        "conv2d_0.w_0": rng.standard_normal((c1, 3, 3, 3)) * np.sqrt(2 / 27),
        "batch_norm_0.w_0": rng.uniform(0.5, 1.5, c1), "batch_norm_0.b_0": rng.normal(0, 0.1, c1),
        "batch_norm_0.w_1": rng.normal(0, 0.1, c1), "batch_norm_0.w_2": rng.uniform(0.5, 1.5, c1),
        "conv2d_1.w_0": rng.standard_normal((c2, c1, 3, 3)) * np.sqrt(2 / (9 * c1)),
        "conv2d_1.b_0": rng.normal(0, 0.1, c2),
        "linear_0.w_0": rng.standard_normal((c2, classes)) * np.sqrt(1 / c2),
        "linear_0.b_0": rng.normal(0, 0.1, classes),
    }
    nodes = [_const(k, v.astype(np.float32)) for k, v in w.items()]
    nodes += [
        helper.make_node("Conv", ["x", "conv2d_0.w_0"], ["conv2d_0.tmp_0"], name="conv2d_0", pads=[1, 1, 1, 1],
                         strides=[1, 1], dilations=[1, 1], group=1),
        helper.make_node("BatchNormalization", ["conv2d_0.tmp_0", "batch_norm_0.w_0", "batch_norm_0.b_0",
                                                "batch_norm_0.w_1", "batch_norm_0.w_2"], ["batch_norm_0.tmp_2"],
                         name="batch_norm_0", epsilon=1e-5, momentum=0.9),
        helper.make_node("Relu", ["batch_norm_0.tmp_2"], ["relu_0.tmp_0"], name="relu_0"),
        helper.make_node("MaxPool", ["relu_0.tmp_0"], ["pool2d_0.tmp_0"], name="pool2d_0", kernel_shape=[3, 3],
                         strides=[2, 2], pads=[0, 0, 0, 0]),
        helper.make_node("Conv", ["pool2d_0.tmp_0", "conv2d_1.w_0", "conv2d_1.b_0"], ["conv2d_1.tmp_0"],
                         name="conv2d_1", pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv2d_1.tmp_0"], ["relu_1.tmp_0"], name="relu_1"),
        helper.make_node("GlobalAveragePool", ["relu_1.tmp_0"], ["pool2d_1.tmp_0"], name="pool2d_1"),
        helper.make_node("Flatten", ["pool2d_1.tmp_0"], ["flatten_0.tmp_0"], name="flatten_0", axis=1),
        helper.make_node("MatMul", ["flatten_0.tmp_0", "linear_0.w_0"], ["linear_0.tmp_0"], name="linear_0"),
        helper.make_node("Add", ["linear_0.tmp_0", "linear_0.b_0"], ["linear_0.tmp_1"], name="linear_0_add"),
        helper.make_node("Softmax", ["linear_0.tmp_1"], ["softmax_0.tmp_0"], name="softmax_0", axis=1),
    ]
    graph = helper.make_graph(nodes, "paddle_style",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["p2o.DynamicDimension.0", 3,
                                                                                      16, "p2o.DynamicDimension.1"])],
                              [helper.make_tensor_value_info("softmax_0.tmp_0", TensorProto.FLOAT,
                                                             ["p2o.DynamicDimension.2", classes])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="PaddlePaddle",
                              producer_version="2.6")
    model.ir_version = 6
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------ tf2onnx style


def tf2onnx_style(seed: int = 2) -> onnx.ModelProto:
    """A Keras classifier as tf2onnx writes it: input [unk__6, 12, 12, 3] NHWC ->
    Transpose(0,3,1,2) -> Conv(SAME_UPPER, stride 2) + bias -> Relu -> Conv 3x3 valid ->
    Relu -> Transpose back to NHWC -> Shape/Gather/Unsqueeze/Concat -> Reshape [N, -1]
    (int64 shape arithmetic) -> MatMul [in, out] + Add -> Softmax; opset 13."""
    rng = np.random.default_rng(seed)
    c1, c2, classes = 6, 8, 4
    inits = {
        "sequential/conv2d/Conv2D/ReadVariableOp:0": rng.standard_normal((c1, 3, 3, 3)) * np.sqrt(2 / 27),
        "sequential/conv2d/BiasAdd/ReadVariableOp:0": rng.normal(0, 0.1, c1),
        "sequential/conv2d_1/Conv2D/ReadVariableOp:0": rng.standard_normal((c2, c1, 3, 3)) * np.sqrt(2 / (9 * c1)),
        "sequential/conv2d_1/BiasAdd/ReadVariableOp:0": rng.normal(0, 0.1, c2),
        "sequential/dense/MatMul/ReadVariableOp:0": rng.standard_normal((4 * 4 * c2, classes)) * np.sqrt(1 / 128),
        "sequential/dense/BiasAdd/ReadVariableOp:0": rng.normal(0, 0.1, classes),
    }
    tensors = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
    tensors += [numpy_helper.from_array(np.array([0], np.int64), "const_zero"),
                numpy_helper.from_array(np.array([-1], np.int64), "const_minus_one")]
    n = "sequential/"
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["input_1_nchw"], name="Transpose__6", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["input_1_nchw", n + "conv2d/Conv2D/ReadVariableOp:0",
                                  n + "conv2d/BiasAdd/ReadVariableOp:0"], [n + "conv2d/BiasAdd:0"],
                         name=n + "conv2d/BiasAdd", auto_pad="SAME_UPPER", strides=[2, 2], kernel_shape=[3, 3],
                         dilations=[1, 1], group=1),
        helper.make_node("Relu", [n + "conv2d/BiasAdd:0"], [n + "conv2d/Relu:0"], name=n + "conv2d/Relu"),
        helper.make_node("Conv", [n + "conv2d/Relu:0", n + "conv2d_1/Conv2D/ReadVariableOp:0",
                                  n + "conv2d_1/BiasAdd/ReadVariableOp:0"], [n + "conv2d_1/BiasAdd:0"],
                         name=n + "conv2d_1/BiasAdd", kernel_shape=[3, 3], strides=[1, 1], dilations=[1, 1],
                         group=1, pads=[0, 0, 0, 0]),
        helper.make_node("Relu", [n + "conv2d_1/BiasAdd:0"], [n + "conv2d_1/Relu:0"], name=n + "conv2d_1/Relu"),
        helper.make_node("Transpose", [n + "conv2d_1/Relu:0"], [n + "conv2d_1/Relu__12:0"], name="Transpose__12",
                         perm=[0, 2, 3, 1]),
        helper.make_node("Shape", [n + "conv2d_1/Relu__12:0"], [n + "flatten/Shape:0"], name=n + "flatten/Shape"),
        helper.make_node("Gather", [n + "flatten/Shape:0", "const_zero"], [n + "flatten/strided_slice:0"],
                         name=n + "flatten/strided_slice", axis=0),
        helper.make_node("Concat", [n + "flatten/strided_slice:0", "const_minus_one"],
                         [n + "flatten/Reshape/shape:0"], name=n + "flatten/Reshape/shape", axis=0),
        helper.make_node("Reshape", [n + "conv2d_1/Relu__12:0", n + "flatten/Reshape/shape:0"],
                         [n + "flatten/Reshape:0"], name=n + "flatten/Reshape"),
        helper.make_node("MatMul", [n + "flatten/Reshape:0", n + "dense/MatMul/ReadVariableOp:0"],
                         [n + "dense/MatMul:0"], name=n + "dense/MatMul"),
        helper.make_node("Add", [n + "dense/MatMul:0", n + "dense/BiasAdd/ReadVariableOp:0"],
                         [n + "dense/BiasAdd:0"], name=n + "dense/BiasAdd"),
        helper.make_node("Softmax", [n + "dense/BiasAdd:0"], ["dense"], name=n + "dense/Softmax", axis=-1),
    ]
    graph = helper.make_graph(nodes, "tf2onnx", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT,
                                                                               ["unk__18", 12, 12, 3])],
                              [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["unk__19", classes])],
                              initializer=tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx",
                              producer_version="1.16.1 15c810")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------ torch-exported models


def _export(net, example: tuple, *, dynamo: bool, opset: int, input_names, dynamic: dict | None = None,
            output_names=("logits",)) -> onnx.ModelProto:
    """Export ``net`` in eval mode to a ModelProto (legacy TorchScript or dynamo exporter)."""
    import torch

    net = net.eval()
    if not dynamo:
        buf = io.BytesIO()
        axes = {n: {0: "batch"} for n in input_names}
        axes.update({n: {0: "batch"} for n in output_names})
        torch.onnx.export(net, example, buf, dynamo=False, opset_version=opset, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes,
                          training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True)
        return onnx.load_from_string(buf.getvalue())
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = tuple({0: batch} for _ in example)
    program = torch.onnx.export(net, example, dynamo=True, opset_version=opset, input_names=list(input_names),
                                output_names=list(output_names), dynamic_shapes=shapes, optimize=True,
                                verbose=False)
    return program.model_proto


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def torchvision_net(arch: str, *, num_classes: int = 10):
    """A torchvision architecture with seeded random weights (no download)."""
    import torchvision

    _seeded(0)
    kwargs = {"weights": None, "num_classes": num_classes}
    if arch == "vit_tiny":
        import torch

        net = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                   hidden_dim=32, mlp_dim=64, num_classes=num_classes)
        torch.nn.init.normal_(net.heads.head.weight, std=0.5)  # torchvision zero-inits the head
        return net
    return getattr(torchvision.models, arch)(**kwargs)


def tv(arch: str, *, dynamo: bool, opset: int, size: int = 32) -> onnx.ModelProto:
    import torch

    net = torchvision_net(arch)
    x = torch.randn(2, 3, size, size)
    return _export(net, (x,), dynamo=dynamo, opset=opset, input_names=("input",))


def bert_net(vocab: int = 50, dim: int = 32, heads: int = 2, layers: int = 2, classes: int = 3, max_len: int = 16):
    """A BERT/MiniLM-style text classifier: token + position embeddings, LayerNorm,
    ``layers`` post-norm blocks (attention with an additive mask, GELU MLP), a tanh
    pooler on the first token and a linear head."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

        def forward(self, h, bias):
            b, t, _ = h.shape
            hd = dim // heads

            def split(z):
                return z.view(b, t, heads, hd).transpose(1, 2)

            q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
            att = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5 + bias, dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(b, t, dim)
            h = self.ln1(h + self.o(ctx))
            return self.ln2(h + self.fc2(torch.nn.functional.gelu(self.fc1(h))))

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, dim)
            self.pos = nn.Embedding(max_len, dim)
            self.ln = nn.LayerNorm(dim)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.pool = nn.Linear(dim, dim)
            self.cls = nn.Linear(dim, classes)

        def forward(self, input_ids, attention_mask):
            t = input_ids.shape[1]
            pos = torch.arange(t, device=input_ids.device).unsqueeze(0)
            h = self.ln(self.tok(input_ids) + self.pos(pos))
            bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
            for block in self.blocks:
                h = block(h, bias)
            return self.cls(torch.tanh(self.pool(h[:, 0])))

    _seeded(1)
    return Bert()


def bert_tiny(*, dynamo: bool = False, opset: int = 17, seq: int = 8) -> onnx.ModelProto:
    """Token ids [batch, 8] int64 + attention mask [batch, 8] int64 -> 3 logits."""
    import torch

    ids = torch.randint(0, 50, (2, seq))
    mask = torch.ones(2, seq, dtype=torch.int64)
    return _export(bert_net(), (ids, mask), dynamo=dynamo, opset=opset, input_names=("input_ids", "attention_mask"))


def newest_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` converted by onnx.version_converter to the newest opset onnx knows (the
    torch exporters stop at 20 (legacy) and 23 (dynamo))."""
    return onnx.version_converter.convert_version(model, onnx.defs.onnx_opset_version())


def vit_tiny(*, dynamo: bool = False, opset: int = 17) -> onnx.ModelProto:
    return tv("vit_tiny", dynamo=dynamo, opset=opset, size=32)


# ------------------------------------------------------------------ the registry

_HEAVY_ZOO = {"bvlc_alexnet", "vgg19", "zfnet512", "resnet50", "densenet121", "inception_v2"}


def _entries() -> list[Entry]:
    out = [Entry(f"zoo_{n}", "zoo (IR 3, opset 9)", lambda n=n: zoo(n), heavy=n in _HEAVY_ZOO) for n in ZOO]
    out.append(Entry("zoo_squeezenet_placeholder", "zoo as shipped (ConstantOfShape weights)",
                     lambda: zoo_placeholder("squeezenet")))
    out.append(Entry("paddle_style", "paddle2onnx style", paddle_style, input_shapes={"x": (2, 3, 16, 20)}))
    out.append(Entry("tf2onnx_style", "tf2onnx (Keras, NHWC)", tf2onnx_style))
    for arch, dynamo, opset, heavy in (
            ("resnet18", False, 13, False), ("resnet18", True, 18, True), ("resnet18", True, 23, True),
            ("mobilenet_v3_small", False, 17, False), ("mobilenet_v3_small", True, 18, True),
            ("squeezenet1_1", False, 9, False), ("efficientnet_b0", False, 17, True),
            ("efficientnet_b0", True, 18, True)):
        tag = f"tv_{arch}_{'dynamo' if dynamo else 'legacy'}{opset}"
        out.append(Entry(tag, f"torchvision, {'dynamo' if dynamo else 'legacy'} exporter",
                         lambda a=arch, d=dynamo, o=opset: tv(a, dynamo=d, opset=o), heavy=heavy))
    out.append(Entry("tv_resnet18_legacy20", "torchvision, legacy exporter (its newest opset)",
                     lambda: tv("resnet18", dynamo=False, opset=20), heavy=True))
    out.append(Entry(f"tv_resnet18_opset{onnx.defs.onnx_opset_version()}", "torchvision, up-converted to onnx's newest opset",
                     lambda: newest_opset(tv("resnet18", dynamo=False, opset=17))))
    out.append(Entry("vit_tiny_legacy17", "ViT (torchvision), legacy exporter", lambda: vit_tiny(dynamo=False, opset=17)))
    out.append(Entry("vit_tiny_dynamo18", "ViT (torchvision), dynamo exporter", lambda: vit_tiny(dynamo=True, opset=18),
                     heavy=True))
    out.append(Entry("bert_tiny_legacy17", "BERT-style, legacy exporter", lambda: bert_tiny(dynamo=False, opset=17),
                     token_inputs=True))
    out.append(Entry("bert_tiny_dynamo18", "BERT-style, dynamo exporter", lambda: bert_tiny(dynamo=True, opset=18),
                     token_inputs=True, heavy=True))
    return out


# ------------------------------------------------------------- fp16 / int8 copies


def fp16_copy(base: str) -> onnx.ModelProto:
    import quantised

    return quantised.to_fp16(build(base))


def qdq_copy(base: str, *, per_channel: bool) -> onnx.ModelProto:
    import quantised

    model = build(base)
    feeds = quantised.calibration_feeds(model, 16, seed=5)
    for name, shape in CORPUS[base].input_shapes.items():  # symbolic sizes the graph needs
        feeds[name] = np.random.default_rng(5).standard_normal((16,) + tuple(shape[1:])).astype(np.float32)
    return quantised.qdq_model(model, per_channel=per_channel, feeds=feeds)


def int8_cast_mul_copy(base: str) -> onnx.ModelProto:
    import quantised

    return quantised.to_cast_mul(build(base))


def int8_dynamic_copy(base: str) -> onnx.ModelProto:
    import quantised

    return quantised.to_dynamic(build(base))


def _quant_entries(bases: dict[str, Entry]) -> list[Entry]:
    """fp16 / int8 copies of light graphs (QDQ needs opset >= 13 for per-channel axes)."""
    out = []
    for base, kinds in (("tv_resnet18_legacy13", ("fp16", "qdq_pc", "qdq_pt", "int8cm", "int8dyn")),
                        ("tv_mobilenet_v3_small_legacy17", ("fp16", "qdq_pc")),
                        ("tf2onnx_style", ("fp16", "qdq_pc", "int8cm", "int8dyn")),
                        ("paddle_style", ("fp16", "int8cm")),
                        ("bert_tiny_legacy17", ("fp16", "qdq_pc", "int8cm", "int8dyn")),
                        ("vit_tiny_legacy17", ("fp16", "int8cm"))):
        e = bases[base]
        for kind in kinds:
            build_fn, family = {
                "fp16": (lambda b=base: fp16_copy(b), "fp16 copy"),
                "qdq_pc": (lambda b=base: qdq_copy(b, per_channel=True), "int8 QDQ copy (quantize_static)"),
                "qdq_pt": (lambda b=base: qdq_copy(b, per_channel=False), "int8 QDQ copy (quantize_static)"),
                "int8cm": (lambda b=base: int8_cast_mul_copy(b), "int8 Cast+Mul copy"),
                "int8dyn": (lambda b=base: int8_dynamic_copy(b), "int8 dynamic copy (quantize_dynamic)"),
            }[kind]
            prefix, _, suffix = kind.partition("_")
            name = f"{prefix}_{base}" + (f"_{suffix}" if suffix else "")
            out.append(Entry(name, f"{family} of {base}", build_fn, input_shapes=e.input_shapes,
                             classifier=e.classifier, heavy=e.heavy, token_inputs=e.token_inputs))
    return out


CORPUS: dict[str, Entry] = {e.name: e for e in _entries()}
CORPUS.update({e.name: e for e in _quant_entries(CORPUS)})


def build(name: str) -> onnx.ModelProto:
    return CORPUS[name].build()


def sample_inputs(twin, entry: Entry, n: int, seed: int):
    """``n`` seeded rows fitting the model's inputs (token ids in [0, 50)), as one array
    or, for several inputs, a packed array (``data.pack_inputs``)."""
    from onnx_dynedit.data import pack_inputs
    from onnx_dynedit.shapes import random_inputs, resolve_input_shapes

    shapes = resolve_input_shapes(twin.inputs, entry.input_shapes or None, batch=n)
    feeds = random_inputs(twin.inputs, seed=seed, int_range=(0, 50),
                          shapes={k: (n,) + tuple(v[1:]) for k, v in shapes.items()})  # n rows, fixed batch too
    for spec in twin.inputs:
        if not np.issubdtype(spec.dtype, np.floating) and "mask" in spec.name:
            feeds[spec.name] = np.ones_like(feeds[spec.name])
    if len(feeds) == 1:
        return next(iter(feeds.values()))
    return pack_inputs(feeds)


def synthetic_pair(twin, entry: Entry, n_stats: int, seed: int = 3):
    """(corrupt, clean, stats) for a forced edit: seeded rows, the clean twin being the
    first candidate the model assigns another class than the corrupted row."""
    x = sample_inputs(twin, entry, 8 + n_stats, seed=seed)
    pred = twin.run(x[:8], batch_size=1).argmax(1)
    other = next((i for i in range(1, 8) if pred[i] != pred[0]), 1)
    return x[:1], x[other:other + 1], x[8:]
