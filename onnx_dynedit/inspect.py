"""`dynedit inspect`: opset, inputs, outputs, the editable layers and twin parity."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .data import check_against_input, load_npz
from .errors import DataError
from .io import LoadedModel, load_model

if TYPE_CHECKING:  # parity imports torch; inspect_model imports it when it runs
    from .parity import Parity


@dataclass(frozen=True)
class InspectReport:
    path: str
    opset: int
    ir_version: int
    inputs: tuple                # shapes.InputSpec
    outputs: tuple               # shapes.InputSpec
    layers: tuple                # layers.Layer, in graph order
    parity: "Parity"             # parity.Parity: ONNX Runtime vs the twin
    notes: tuple[str, ...] = field(default=())
    device: str = "cpu"
    attributed_output: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.parity.ok)

    def to_dict(self) -> dict:
        return {"path": self.path, "opset": self.opset, "ir_version": self.ir_version,
                "inputs": [_spec_dict(s) for s in self.inputs], "outputs": [_spec_dict(s) for s in self.outputs],
                "layers": [layer.to_dict() for layer in self.layers], "parity": self.parity.to_dict(),
                "notes": list(self.notes), "device": self.device,
                "attributed_output": self.attributed_output}


def _spec_dict(spec) -> dict:
    return {"name": spec.name, "shape": [d if isinstance(d, int) and d > 0 else (d or "?") for d in spec.shape],
            "dtype": str(spec.dtype)}


def load_feeds(path, specs) -> dict[str, np.ndarray]:
    """Parity inputs from an .npz: one array per model input, keyed by input name
    (a single-input model also accepts the key ``x``)."""
    names = [s.name for s in specs]
    keys = tuple(names)
    try:
        arrays = load_npz(path, keys, what="inputs")
    except DataError:
        if len(specs) != 1:
            raise
        arrays = {specs[0].name: load_npz(path, ("x",), what="inputs")["x"]}
    return {s.name: check_against_input(arrays[s.name], name=f"inputs {path}: {s.name!r}", input_name=s.name,
                                        shape=list(s.shape), dtype=s.dtype) for s in specs}


def inspect_model(src, *, inputs_file=None, device=None, seed: int = 0, int_range=(0, 10),
                  input_shapes=None) -> InspectReport:
    from .layers import check_finite_weights
    from .parity import check_parity
    from .twin import Twin

    loaded: LoadedModel = load_model(src)
    twin = Twin(loaded, device, input_shapes=input_shapes)
    # NaN/Inf weights: unusable input (exit 2), not a parity failure
    check_finite_weights(loaded.model, twin.layer_map, loaded.label)
    feeds = load_feeds(inputs_file, twin.inputs) if inputs_file else None
    parity = check_parity(twin, feeds, seed=seed, int_range=int_range)
    opset = next((o.version for o in loaded.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return InspectReport(
        path=loaded.label, opset=opset, ir_version=loaded.model.ir_version,
        inputs=tuple(twin.inputs), outputs=tuple(twin.outputs), layers=tuple(twin.layer_map.layers),
        parity=parity, notes=twin.notes,
        device=str(twin.device), attributed_output=twin.attributed_output,
    )
