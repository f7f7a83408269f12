"""ONNX Runtime sessions: the one factory, for a model file or a model in memory.

Numpy and onnxruntime only (plus ``errors`` and ``threads``): ``dynedit verify`` uses it
where torch is not installed. A session runs on the configured CPU threads
(``onnx_dynedit.threads``), logs fatal errors only (failures surface as our own one-line
errors), and on the provider asked for or not at all (``"cuda"`` never falls back to the
CPU silently).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from . import threads as _threads
from .errors import InputError, ModelLoadError, option, short

logger = logging.getLogger(__name__)

DEFAULT_PROVIDER = "cpu"

PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}


# A ModelProto larger than this reaches ONNX Runtime through a temporary file: a session
# made from bytes holds them for its lifetime (onnxruntime's InferenceSession keeps
# ``_model_bytes``), a second copy of every weight (VGG-19's parity after the edit: 548 MB).
SESSION_VIA_FILE = 64 * 2**20


def ort_session(source: str | os.PathLike | onnx.ModelProto, provider: str | None = DEFAULT_PROVIDER, *,
                what: str = "model", threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session on ``source``: a file, or a ``ModelProto`` (serialised as
    it is, through a temporary file above SESSION_VIA_FILE; external data must already be
    loaded into it).

    ``provider`` is ``"cpu"`` or ``"cuda"`` (``None`` = ``"cpu"``). ``"cuda"`` needs the
    CUDAExecutionProvider in this onnxruntime build and fails loudly (``InputError``)
    rather than silently falling back to the CPU. A model that ONNX Runtime cannot load
    (missing, not ONNX, truncated, external data missing) is a ``ModelLoadError``
    naming the file (``what``). ``threads``: ONNX Runtime's intra-op threads (``None`` =
    the process setting, ``onnx_dynedit.threads``).
    """
    providers = provider_list(DEFAULT_PROVIDER if provider is None else provider)
    if isinstance(source, onnx.ModelProto) and source.ByteSize() > SESSION_VIA_FILE:
        with tempfile.TemporaryDirectory(prefix="dynedit-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(source, str(path))
            return _session(str(path), what, providers, threads)
    if isinstance(source, onnx.ModelProto):
        model, label = source.SerializeToString(), what
    else:
        path = Path(source)
        if not path.exists():
            raise ModelLoadError(f"{what} file {path} does not exist", hint="check the path")
        if not path.is_file():
            raise ModelLoadError(f"{what} path {path} is not a file", hint="give the path of an .onnx file")
        model, label = str(path), f"{what} {path}"
    return _session(model, label, providers, threads)


def _session(model: str | bytes, label: str, providers, threads: int | None) -> ort.InferenceSession:
    options = _threads.session_options(ort.SessionOptions())
    options.log_severity_level = 4  # fatal only: keep stderr to our own one-liners
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(model, options, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind classes
        raise ModelLoadError(f"cannot load {label} with ONNX Runtime: {short(exc, 300)}",
                             hint="is it a complete .onnx file (and its external data next to it)?") from None
    if providers[0] not in session.get_providers():
        raise InputError(f"{providers[0]} could not be initialised for {label} "
                         f"(session runs on {', '.join(session.get_providers())})",
                         hint=f"check the CUDA/cuDNN installation or use {option('provider', 'cpu')}")
    logger.info("loaded %s on %s", label, ", ".join(session.get_providers()))
    return session


def provider_list(provider: str) -> tuple[str, ...]:
    """ORT provider names for ``"cpu"`` / ``"cuda"``; an unavailable one is an ``InputError``."""
    key = str(provider).lower()
    if key not in PROVIDERS:
        raise InputError(f"unknown provider {provider!r}", hint="use cpu or cuda")
    available = ort.get_available_providers()
    wanted = PROVIDERS[key][0]
    if wanted not in available:
        if key == "cuda":
            raise InputError(f"CUDA execution provider not available in this onnxruntime ({', '.join(available)})",
                             hint=f"install onnxruntime-gpu or use {option('provider', 'cpu')}")
        raise InputError(f"{wanted} not available in this onnxruntime ({', '.join(available)})")
    return PROVIDERS[key]
