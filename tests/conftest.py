"""Shared fixtures: real ONNX files on disk, built once per test session.

``model_files``        every hand-built model of ``graphs.BUILDERS`` (IR >= 4 ones carry
                       a doc_string, model_version, metadata_props and unused
                       initializers, see ``graphs.add_provenance``), plus
                       ``gemm_external``: a Gemm model saved with external data.
``torch_model_files``  the small Conv-BN-ReLU CNN exported by torch: legacy exporter at
                       opset 13 and 17 (eval mode, BN folded) and the dynamo exporter at
                       opset 18 saved with external data. Each in its own folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphs  # noqa: E402


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name, build in graphs.BUILDERS.items():
        model = build()
        if model.ir_version >= 4:  # IR 3 wants every initializer listed as a graph input
            model = graphs.add_provenance(model)
        path = folder / f"{name}.onnx"
        onnx.save_model(model, str(path))
        out[name] = path
    ext = tmp_path_factory.mktemp("gemm_external") / "gemm_external.onnx"
    onnx.save_model(graphs.add_provenance(graphs.gemm(trans_b=0, alpha=2.0, beta=0.5)), str(ext),
                    save_as_external_data=True, all_tensors_to_one_file=True,
                    location="gemm_external.onnx.data", size_threshold=0)
    out["gemm_external"] = ext
    return out


@pytest.fixture(scope="session")
def torch_model_files(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, dynamo, opset in (("torch_legacy13", False, 13), ("torch_legacy17", False, 17),
                                ("torch_dynamo18", True, 18)):
        folder = tmp_path_factory.mktemp(name)
        out[name] = graphs.export_torch_cnn(folder / "model.onnx", dynamo=dynamo, opset=opset)
    return out


@pytest.fixture(scope="session")
def all_model_files(model_files, torch_model_files) -> dict[str, Path]:
    return {**model_files, **torch_model_files}
