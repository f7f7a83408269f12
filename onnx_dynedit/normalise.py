"""The copy of an ONNX graph that onnx2torch converts (the original is kept untouched
for write-back):
  - every node gets a unique name (empty / repeated names become ``<op>_<index>``), so
    the twin's module names are known from the layer map;
  - weights made by Constant / ConstantOfShape nodes become initializers of the same
    name (onnx2torch wants Conv/Gemm weights as initializers); dequantised constants
    are folded (quant.py), ConvInteger / MatMulInteger run as float ops on the dequantised
    activation and weight (quant.py), and Identity aliases and Transposes of initializers
    become initializers;
  - graphs that list initializers as graph inputs (IR 3) lose those inputs, and an IR-3
    copy is marked IR 4 (else shape inference ignores the initializers and onnx2torch
    sees every shape as unknown: "spatial rank == -2");
  - in a graph whose inputs have a fixed batch of 1, a Reshape to a constant shape that
    starts with 1 (a hard-coded batch, e.g. the zoo's Inception v1 and ShuffleNet) gets 0
    there ("copy the input's dim"): the same at batch 1, and the twin can run batches;
  - the logits before a final Softmax become an extra output (the attributed scalar);
  - float16 models get a float32 copy (the twin computes in fp32; parity tolerance is
    looser for them);
  - converters are registered for op versions onnx2torch lacks (converters.py); if
    some are still missing, the copy is down/up-converted with onnx.version_converter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ConversionError
from .layers import constant_value, unique_node_names


@dataclass(frozen=True)
class Normalised:
    model: onnx.ModelProto | None = field(repr=False)  # None once handed on (twin._normalised_module)
    fp16: bool
    notes: tuple[str, ...]
    logits: str | None = None        # tensor appended as an extra output: the Softmax input
    softmax_node: str | None = None  # the Softmax / LogSoftmax node that ends the graph
    quantised: bool = False  # QuantizeLinear left in the graph (quantised activations)
    logits_index: int = 0    # the attributed output's position among the graph outputs


SOFTMAX_OPS = ("Softmax", "LogSoftmax")
LIGHT_BYTES = 1 << 16  # initializers above this are left out of the copy shape inference reads
# Ops that may sit between the final Softmax and the graph output without changing
# which class scores are attributed (shape-only ops).
_SHAPE_ONLY = ("Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze")


def final_softmax(graph) -> tuple[str, str] | None:
    """(Softmax node name, its input tensor) when the graph's first output is a Softmax /
    LogSoftmax of some tensor (possibly through shape-only ops); else None."""
    if not graph.output:
        return None
    producer = {o: n for n in graph.node for o in n.output}
    name = graph.output[0].name
    for _ in range(8):
        node = producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in SOFTMAX_OPS:
            return node.name, node.input[0]
        if node.op_type not in _SHAPE_ONLY:
            return None
        name = node.input[0]
    return None


def normalise(model: onnx.ModelProto) -> Normalised:
    """The copy of ``model`` that onnx2torch converts (module doc); ``model`` is untouched."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for node, name in zip(graph.node, unique_node_names(graph)):
        node.name = name
    notes = [note for note in (_constants_to_initializers(graph), _fold_dequantised(copy), _float_integer_ops(copy),
                               _transposed_weights(graph), _aliases_to_initializers(graph)) if note]
    notes += _drop_initializer_inputs(copy)
    notes += [note for note in (_batch_free_reshapes(copy),) if note]
    logits = softmax_node = None
    found = final_softmax(graph)
    if found is not None:
        softmax_node, logits = found
        if logits not in {o.name for o in graph.output}:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(logits))
        notes.append(f"attributed output: the logits {logits!r} before {op_of(graph, softmax_node)} node "
                     f"{softmax_node!r} (probabilities saturate)")
    fp16 = _has_fp16(graph)
    if fp16:
        _fp16_to_fp32(graph)
        notes.append("float16 tensors converted to float32 for the twin")
    copy = _with_converters(copy, notes)
    index = [o.name for o in copy.graph.output].index(logits) if logits is not None else 0
    return Normalised(model=copy, fp16=fp16, notes=tuple(notes), quantised=_has_quantize(copy), logits=logits,
                      softmax_node=softmax_node, logits_index=index)


def _constants_to_initializers(graph) -> str | None:
    """Constant / ConstantOfShape -> initializers of the same names."""
    keep = []
    new_inits = []
    for node in graph.node:
        if node.op_type in ("Constant", "ConstantOfShape") and node.domain in ("", "ai.onnx"):
            value = constant_value(graph, node.output[0])
            if value is not None and not (node.op_type == "Constant" and _is_sparse(node)):
                new_inits.append(numpy_helper.from_array(np.asarray(value), node.output[0]))
                continue
        keep.append(node)
    if not new_inits:
        return None
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    return f"{len(new_inits)} Constant/ConstantOfShape node(s) turned into initializers"


def _batch_free_reshapes(model: onnx.ModelProto) -> str | None:
    """Reshape targets with a hard-coded batch of 1 -> 0 (copy the input's dim 0), where
    the graph's inputs are fixed at batch 1 and shape inference says the reshaped tensor
    has dim 0 = 1: equal at batch 1, and batch-preserving when the twin runs more rows."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    real = [vi for vi in graph.input if vi.name not in inits]
    if not real or any(not vi.type.tensor_type.shape.dim or vi.type.tensor_type.shape.dim[0].dim_value != 1
                       for vi in real):
        return None
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_large_weights(model))
    except Exception:  # noqa: BLE001 - a graph shape inference cannot read keeps its reshapes
        return None
    dim0 = {vi.name: (vi.type.tensor_type.shape.dim[0].dim_value if vi.type.tensor_type.shape.dim else None)
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    by_name = {i.name: i for i in graph.initializer}
    changed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in by_name:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute) or dim0.get(node.input[0]) != 1:
            continue
        shape = numpy_helper.to_array(by_name[node.input[1]])
        if shape.ndim != 1 or not shape.size or shape[0] != 1:
            continue
        name = f"{node.input[1]}__batch_free"
        if name not in by_name:
            new = shape.copy()
            new[0] = 0
            by_name[name] = numpy_helper.from_array(new.astype(shape.dtype), name)
            graph.initializer.append(by_name[name])
        node.input[1] = name
        changed += 1
    return f"{changed} Reshape(s) with a hard-coded batch of 1 made batch-free" if changed else None


def _without_large_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A light copy of ``model`` for shape inference: initializers over LIGHT_BYTES become
    typed graph inputs (their dtype and dims are all that inference reads of them; small
    ones, such as Reshape targets, stay constants). infer_shapes serialises and parses its
    model: on the zoo's 548 MB VGG-19 that took the twin's build from 1.2 to 3.8 GB."""
    light = onnx.ModelProto()
    light.ir_version = max(model.ir_version, 4)  # initializers need not be graph inputs
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, out = model.graph, light.graph
    out.name = graph.name
    out.node.extend(graph.node)
    out.input.extend(graph.input)
    out.output.extend(graph.output)
    out.value_info.extend(graph.value_info)
    declared = {vi.name for vi in graph.input}
    for init in graph.initializer:
        if init.ByteSize() <= LIGHT_BYTES:
            out.initializer.append(init)
        elif init.name not in declared:
            out.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def _fold_dequantised(model: onnx.ModelProto) -> str | None:
    """Dequantised constants folded into float initializers (quant.py); before the
    aliases, as an Identity may alias one."""
    from .quant import fold_dequantisation

    folded = fold_dequantisation(model)
    if not folded:
        return None
    return (f"{folded} dequantised constant(s) (DequantizeLinear / Cast+Mul of integers) folded "
            "into float initializers")


def _float_integer_ops(model: onnx.ModelProto) -> str | None:
    """ConvInteger / MatMulInteger chains (quantize_dynamic) run as DequantizeLinear of the
    activation + the float op on the dequantised weight (quant.float_integer_ops)."""
    from .quant import float_integer_ops

    done = float_integer_ops(model)
    if not done:
        return None
    return (f"{done} integer op(s) (ConvInteger / MatMulInteger) run as float ops on the dequantised "
            "activation and weight")


def _transposed_weights(graph) -> str | None:
    """Transpose of an initializer -> an initializer of the output's name (the layer map
    records the perm; write-back goes through it into the stored tensor)."""
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    folded = {i for i, n in enumerate(graph.node) if n.op_type == "Transpose" and n.domain in ("", "ai.onnx")
              and n.input and n.input[0] in inits and n.output[0] not in outputs}
    if not folded:
        return None
    for i in sorted(folded):
        n = graph.node[i]
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        value = numpy_helper.to_array(inits[n.input[0]])
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(value, perm)), n.output[0]))
    keep = [n for i, n in enumerate(graph.node) if i not in folded]
    del graph.node[:]
    graph.node.extend(keep)
    return f"{len(folded)} Transpose node(s) of initializers turned into initializers"


def _aliases_to_initializers(graph) -> str | None:
    """Identity of an initializer -> an initializer of the output's name (the legacy torch
    exporter deduplicates equal tensors, e.g. zero biases, and re-exposes them so)."""
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    aliased = [n for n in graph.node if n.op_type == "Identity" and n.domain in ("", "ai.onnx")
               and n.input and n.input[0] in inits and n.output[0] not in outputs]
    if not aliased:
        return None
    drop = {n.output[0] for n in aliased}
    for n in aliased:
        t = onnx.TensorProto()
        t.CopyFrom(inits[n.input[0]])
        t.name = n.output[0]
        graph.initializer.append(t)
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in drop)]
    del graph.node[:]
    graph.node.extend(keep)
    return f"{len(aliased)} Identity node(s) of initializers turned into initializers"


def _drop_initializer_inputs(model: onnx.ModelProto) -> list[str]:
    """Initializers listed as graph inputs (IR 3) are no longer inputs; IR < 4 -> IR 4."""
    graph, notes = model.graph, []
    init_names = {i.name for i in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in init_names]
    if len(inputs) != len(graph.input):
        notes.append(f"{len(graph.input) - len(inputs)} initializer(s) removed from graph inputs (IR {model.ir_version})")
        del graph.input[:]
        graph.input.extend(inputs)
    if model.ir_version < 4:
        # IR 3 requires every initializer to be a graph input; shape inference of an IR-3
        # graph ignores initializers that are not, so every shape after the first Conv
        # would be lost (onnx2torch then sees rank -2). The copy is valid IR 4.
        notes.append(f"IR {model.ir_version} copy marked IR 4 (initializers are no longer graph inputs)")
        model.ir_version = 4
    return notes


def _with_converters(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """``model`` with a converter for every op (converters.py), else converted to opset
    13 or 17 (a note added); a ``ConversionError`` when neither works."""
    from .converters import ensure_converters

    missing = ensure_converters(model)
    if not missing:
        return model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and 13 <= opset <= 17:
        # Already in the range onnx2torch knows: converting would not help.
        raise ConversionError(f"the torch twin cannot be built: no converter for {', '.join(missing)} "
                              f"(opset {opset})", hint="neither onnx2torch nor dynedit converts this op; "
                              "report it, or re-export the model without it")
    target = 17 if opset and opset > 17 else 13
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(
            f"the torch twin cannot be built: no converter for {', '.join(missing)} "
            f"and converting opset {opset} -> {target} failed ({str(exc).splitlines()[0][:120]})",
            hint="re-export the model at an opset from 13 to 17",
        ) from None
    still = ensure_converters(converted)
    if still:
        raise ConversionError(f"the torch twin cannot be built: unsupported op(s) {', '.join(still)} "
                              f"(opset {opset} converted to {target})",
                              hint="neither onnx2torch nor dynedit converts them; report the op(s)")
    notes.append(f"opset {opset} converted to {target} for the twin")
    return converted


def _has_quantize(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") for n in model.graph.node)


def op_of(graph, node_name: str) -> str:
    """The op type of node ``node_name`` (Softmax when there is none)."""
    return next((n.op_type for n in graph.node if n.name == node_name), "Softmax")


def _is_sparse(node) -> bool:
    return any(a.name == "sparse_value" for a in node.attribute)


def _has_fp16(graph) -> bool:
    fp16 = onnx.TensorProto.FLOAT16
    if any(i.data_type == fp16 for i in graph.initializer):
        return True
    return any(vi.type.tensor_type.elem_type == fp16 for vi in list(graph.input) + list(graph.output))


def _fp16_to_fp32(graph) -> None:
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for i, init in enumerate(graph.initializer):
        if init.data_type == fp16:
            arr = numpy_helper.to_array(init).astype(np.float32)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.tensor_type.elem_type == fp16:
            vi.type.tensor_type.elem_type = fp32
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == fp16:
                attr.i = fp32
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == fp16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
