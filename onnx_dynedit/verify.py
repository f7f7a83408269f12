"""Verify an edited model against its original with ONNX Runtime only.

``verify`` runs both models on clean inputs (and optionally on corrupted inputs with
their true labels), computes the figures below, and evaluates the gates the caller
asked for. It returns a ``VerifyReport``; it never prints and never exits.

Figures
  clean    acc_before / acc_after (null without labels), agreement (share of inputs
           whose top-1 class is the same for both models), max / mean absolute logit
           change (over every logit of every clean input), output_shift (mean
           total-variation distance of the two models' class probabilities: softmax of
           the outputs, or the outputs themselves where every row already sums to 1), n,
           turned (right -> wrong with labels; top-1 changed without) and drop_bound
           (its exact one-sided 95 % upper limit as a share, ``bounds.upper_bound``).
  corrupt  acc_before / acc_after, fix_rate (share of the inputs the original got
           wrong that the edited model gets right; null when the original got none
           wrong), asr_before / asr_after (with a target class: share of the inputs
           whose true label is not the target that are predicted as the target;
           null without a target), n.

Gates (``Thresholds``; ``None`` = not checked)
  max-acc-drop      clean acc_before - acc_after <= limit   (fractions, 0..1)
  min-fix-rate      corrupt fix_rate >= limit
  max-logit-change  clean max abs logit change <= limit
  max-output-shift  clean output_shift <= limit              (fraction, 0..1)
  max-asr           corrupt asr_after <= limit
  max-drop-bound    clean drop_bound <= limit                (fraction, 0..1; no labels needed:
                    360 inputs with none turned vouch for 0.0083, ``bounds.inputs_needed``)

A gate whose figure cannot be computed (no labels, no corrupted inputs, no target,
nothing to fix) is an ``InputError`` (exit 2), never a silent pass.

Data: each set is one ``.npz`` or a folder / glob of shards (``datasets``); shards are read
one at a time and each gives partial counts and sums (``CleanPartial``,
``CorruptPartial``), reduced in shard order. ``engine="ray"`` runs the shards on Ray
actors that each hold a ``ShardRunner`` (``engine_ray``); the reduction is the same.

This module imports numpy and onnxruntime only (plus ``errors``, ``data`` and
``sessions``, the one ONNX Runtime session factory): it must keep working where torch
is not installed. ``run_batched`` is a general helper meant for reuse (evaluation).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnxruntime as ort

from .bounds import upper_bound
from .data import Samples, check_against_input, check_labels, fields
from .errors import DataError, InputError, option, short
from .io import check_model_file
from .report import jsonable
from .sessions import DEFAULT_PROVIDER, ort_session, provider_list
from .shapes import InputSpec, check_input_shapes

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 256

# ONNX Runtime's type strings -> numpy dtypes (inputs we can feed from an .npz).
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}

ProgressCallback = Callable[[int, int], None]


# --------------------------------------------------------------------------- sessions


def input_dtype(node_arg) -> np.dtype:
    """The numpy dtype of an ORT input (``session.get_inputs()[i]``)."""
    dtype = _ORT_DTYPES.get(node_arg.type)
    if dtype is None:
        raise InputError(f"model input {node_arg.name!r} has type {node_arg.type}, which cannot be fed from an .npz")
    return np.dtype(dtype)


def effective_batch_size(session: ort.InferenceSession, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """The batch size ``run_batched`` really uses: ``batch_size`` for a dynamic batch
    axis, the model's own batch size when its first input axis is fixed (e.g. 1)."""
    if int(batch_size) < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    fixed = _fixed_batch(session)
    return int(batch_size) if fixed is None else fixed


def num_batches(session: ort.InferenceSession, n: int, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    b = effective_batch_size(session, batch_size)
    return -(-int(n) // b)


def run_batched(session: ort.InferenceSession, x: np.ndarray | Mapping[str, np.ndarray],
                batch_size: int = DEFAULT_BATCH_SIZE, *, all_outputs: bool = False,
                output_names: Sequence[str] | None = None, name: str = "model",
                on_batch: Callable[[int], None] | None = None) -> np.ndarray | list[np.ndarray]:
    """Run ``session`` on ``x`` in batches along axis 0 and concatenate the results.

    ``x``: one array for a single-input model, or ``{input name: array}`` (all with the
    same first axis). Returns the first output as one array, or, with ``all_outputs``
    or ``output_names``, a list of arrays (session output order / the given order).
    A dynamic batch axis takes ``batch_size`` rows at a time; a fixed batch axis
    (e.g. 1) takes exactly that many, padding the last batch with copies of its last
    row and dropping the padded results. Every requested output must be batched
    along axis 0. ``on_batch(rows_done)`` is called after each batch.
    Runtime failures are ``DataError`` naming ``name``.
    """
    feeds = _as_feeds(session, x)
    n = next(iter(feeds.values())).shape[0]
    step = effective_batch_size(session, batch_size)
    fixed = _fixed_batch(session) is not None
    if output_names is not None:
        names = list(output_names)
    elif all_outputs:
        names = [o.name for o in session.get_outputs()]
    else:
        names = [session.get_outputs()[0].name]
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = stop - start
        batch = {}
        for key, arr in feeds.items():
            part = arr[start:stop]
            if fixed and rows < step:
                pad = np.repeat(part[-1:], step - rows, axis=0)
                part = np.concatenate([part, pad], axis=0)
            batch[key] = np.ascontiguousarray(part)
        try:
            results = session.run(names, batch)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind classes
            raise DataError(f"{name} failed on rows {start}..{stop - 1}: {short(exc, 300)}") from None
        for i, (out_name, res) in enumerate(zip(names, results)):
            res = np.asarray(res)
            if res.ndim == 0 or res.shape[0] != len(next(iter(batch.values()))):
                raise InputError(
                    f"output {out_name!r} of {name} has shape {res.shape} for a batch of "
                    f"{len(next(iter(batch.values())))}; it is not batched along axis 0"
                )
            chunks[i].append(res[:rows])
        if on_batch is not None:
            on_batch(stop)
    outs = [np.concatenate(c, axis=0) for c in chunks]
    if output_names is None and not all_outputs:
        return outs[0]
    return outs


def _fixed_batch(session: ort.InferenceSession) -> int | None:
    dims = {i.shape[0] for i in session.get_inputs()
            if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    if not dims:
        return None
    if len(dims) > 1:
        raise InputError(f"model inputs declare different fixed batch sizes {sorted(dims)}")
    return dims.pop()


def _as_feeds(session: ort.InferenceSession, x) -> dict[str, np.ndarray]:
    inputs = session.get_inputs()
    if isinstance(x, Mapping):
        feeds = {k: np.asarray(v) for k, v in x.items()}
        missing = [i.name for i in inputs if i.name not in feeds]
        if missing:
            raise InputError(f"no data for model input(s) {', '.join(missing)}")
    else:
        if len(inputs) != 1:
            raise InputError(
                f"model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                "give one array per input name"
            )
        feeds = {inputs[0].name: np.asarray(x)}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in feeds.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise DataError(f"inputs must share their first (batch) axis, got {sizes}")
    return feeds


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Thresholds:
    """Gate limits; ``None`` = gate not checked. Fractions are in [0, 1]."""

    max_acc_drop: float | None = None
    min_fix_rate: float | None = None
    max_logit_change: float | None = None
    max_asr: float | None = None
    max_output_shift: float | None = None
    max_drop_bound: float | None = None  # on CleanFigures.drop_bound: what the clean set vouches for

    def __post_init__(self):
        for key in ("max_acc_drop", "min_fix_rate", "max_asr", "max_output_shift", "max_drop_bound"):
            value = getattr(self, key)
            if value is not None and not (0.0 <= float(value) <= 1.0):
                raise InputError(
                    f"{_gate_name(key)} must be a fraction in [0, 1], got {value}",
                    hint="e.g. 0.01 for one percentage point",
                )
        value = self.max_logit_change
        if value is not None and not (math.isfinite(float(value)) and float(value) >= 0):
            raise InputError(f"max-logit-change must be a finite number >= 0, got {value}")

    @classmethod
    def coerce(cls, value: Thresholds | Mapping | None) -> Thresholds:
        if value is None:
            return cls()
        if isinstance(value, Thresholds):
            return value
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {}
        for key, limit in value.items():
            attr = str(key).replace("-", "_")
            if attr not in known:
                raise InputError(f"unknown threshold {key!r}", hint="known: " + ", ".join(_gate_name(k) for k in sorted(known)))
            kwargs[attr] = None if limit is None else float(limit)
        return cls(**kwargs)

    def given(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if getattr(self, k) is not None}

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class CleanFigures:
    n: int
    acc_before: float | None
    acc_after: float | None
    agreement: float
    max_abs_logit_change: float
    mean_abs_logit_change: float
    correct_before: int | None = None
    correct_after: int | None = None
    output_shift: float = 0.0
    turned: int = 0  # inputs right before and wrong after (labelled), or of another class after (not)

    @property
    def drop_bound(self) -> float:
        """What these inputs vouch for: at 95 %, the largest share of inputs like them that
        the edit turns so (``turned``), the exact upper limit of the count seen
        (``bounds.upper_bound``); it bounds the accuracy drop too."""
        return upper_bound(self.turned, self.n)

    @property
    def acc_drop(self) -> float | None:
        if self.correct_before is None or self.correct_after is None:
            return None
        # From the counts, so that 1 input in 100 is exactly 0.01.
        return (self.correct_before - self.correct_after) / self.n

    def to_dict(self) -> dict:
        return {
            "acc_before": _num(self.acc_before),
            "acc_after": _num(self.acc_after),
            "acc_drop": _num(self.acc_drop),
            "agreement": _num(self.agreement),
            "max_abs_logit_change": _num(self.max_abs_logit_change),
            "mean_abs_logit_change": _num(self.mean_abs_logit_change),
            "output_shift": _num(self.output_shift),
            "n": self.n,
            "labeled": self.correct_before is not None,
            "turned": self.turned,
            "drop_bound": _num(self.drop_bound),
        }


@dataclass(frozen=True)
class CorruptFigures:
    n: int
    acc_before: float
    acc_after: float
    fix_rate: float | None
    asr_before: float | None
    asr_after: float | None
    target: int | None
    n_wrong_before: int
    n_fixed: int
    n_broken: int
    n_not_target: int | None

    def to_dict(self) -> dict:
        return {
            "acc_before": _num(self.acc_before),
            "acc_after": _num(self.acc_after),
            "fix_rate": _num(self.fix_rate),
            "asr_before": _num(self.asr_before),
            "asr_after": _num(self.asr_after),
            "target": self.target,
            "n": self.n,
            "n_wrong_before": self.n_wrong_before,
            "n_fixed": self.n_fixed,
            "n_broken": self.n_broken,
            "n_not_target": self.n_not_target,
        }


@dataclass(frozen=True)
class GateResult:
    name: str          # "max-acc-drop", ...
    value: float
    limit: float
    op: str            # "<=" or ">="
    passed: bool

    @property
    def message(self) -> str:
        """``max-acc-drop: 0.0312 > 0.0100`` (the comparison that holds)."""
        a, b = _fmt_pair(self.value, self.limit)
        if self.passed:
            return f"{self.name}: {a} {self.op} {b}"
        bad = {"<=": ">", ">=": "<"}[self.op]
        return f"{self.name}: {a} {bad} {b}"

    def to_dict(self) -> dict:
        return {"name": self.name, "value": _num(self.value), "limit": self.limit, "op": self.op,
                "passed": self.passed}


@dataclass(frozen=True)
class VerifyReport:
    original: str
    edited: str
    clean_source: str
    corrupt_source: str | None
    provider: str
    batch_size: int
    clean: CleanFigures
    corrupt: CorruptFigures | None
    thresholds: Thresholds
    gates: tuple[GateResult, ...] = field(default_factory=tuple)
    engine: str = "local"        # which engine ran the models: "local" or "ray"
    workers: int = 1             # processes that ran them (Ray actors for "ray")
    shards: dict = field(default_factory=dict)   # {"clean": k, "corrupt": m or None}

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed_checks(self) -> list[str]:
        return [g.message for g in self.gates if not g.passed]

    def to_dict(self) -> dict:
        return {
            "original": self.original,
            "edited": self.edited,
            "clean_file": self.clean_source,
            "corrupt_file": self.corrupt_source,
            "provider": self.provider,
            "batch_size": self.batch_size,
            "clean": self.clean.to_dict(),
            "corrupt": None if self.corrupt is None else self.corrupt.to_dict(),
            "thresholds": self.thresholds.to_dict(),
            "gates": [g.to_dict() for g in self.gates],
            "passed": self.passed,
            "failed_checks": self.failed_checks,
            "engine": self.engine,
            "workers": self.workers,
            "shards": dict(self.shards),
        }


def _num(value) -> float | None:
    """JSON-safe float (``report.jsonable``: non-finite values become null)."""
    return None if value is None else jsonable(float(value))


def _fmt_pair(value: float, limit: float) -> tuple[str, str]:
    a, b = f"{value:.4f}", f"{limit:.4f}"
    if a == b:  # the difference is below 4 decimals: show enough digits to see it
        a, b = repr(float(value)), repr(float(limit))
    return a, b


def _gate_name(attr: str) -> str:
    return attr.replace("_", "-")


# --------------------------------------------------------------------------- verify

ENGINES = ("local", "ray")
DEFAULT_ENGINE = "local"


def verify(original: str | os.PathLike, edited: str | os.PathLike, clean, corrupt=None, target: int | None = None,
           thresholds: Thresholds | Mapping | None = None, provider: str | None = DEFAULT_PROVIDER,
           batch_size: int | None = DEFAULT_BATCH_SIZE,
           progress: ProgressCallback | None = None, *, engine: str | None = DEFAULT_ENGINE,
           ray_address: str | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None) -> VerifyReport:
    """Compare ``edited`` with ``original`` on clean (and corrupted) inputs; see module doc.

    ``clean``: npz with ``x`` and optional ``y``; ``corrupt``: npz with ``x`` and ``y``
    (true labels, required). Each may also be a folder or glob of ``.npz`` shards
    (``datasets.open_dataset``), a ``Samples`` or a ``datasets.Dataset``; shards are
    read one at a time. ``engine``: ``"local"`` (this process) or ``"ray"`` (one actor
    per CPU of the Ray cluster at ``ray_address``, or of a local Ray started for the
    call; ``engine_ray``). The figures are reduced from per-shard partial counts and
    sums in shard order, whichever engine ran. ``progress(done_batches, total_batches)``
    is called once before the first batch and after each batch (the Ray engine: after
    each shard). ``None`` for ``provider`` / ``batch_size`` / ``engine`` means the
    default. Several model inputs: the sets hold ``<key>:<input name>`` arrays (packed,
    ``data.pack_inputs``). ``input_shapes`` ({input name: dims}) fixes symbolic dims of
    the inputs, and every shard must fit them (the batch axis is the data's own). Raises
    ``DynEditError`` subclasses for unusable input (exit 2); failed gates
    are reported, not raised. Both model files pass ``load_model``'s safety checks
    (``io.check_model_file``) before ONNX Runtime opens them.
    """
    check_model_file(original, what="original model")
    check_model_file(edited, what="edited model")
    provider = DEFAULT_PROVIDER if provider is None else str(provider).lower()
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    engine = DEFAULT_ENGINE if engine is None else str(engine).lower()
    limits = Thresholds.coerce(thresholds)
    target = None if target is None else int(target)
    _check_request(provider, batch_size, engine, ray_address, limits, target, has_corrupt=corrupt is not None)

    runner = ShardRunner(original, edited, provider, batch_size, input_shapes=input_shapes)
    clean_ds, corrupt_ds = _open_sets(runner, clean, corrupt, limits, target)
    jobs = [ShardJob("clean", clean_ds, i) for i in range(len(clean_ds.shards))]
    if corrupt_ds is not None:
        jobs += [ShardJob("corrupt", corrupt_ds, i, target) for i in range(len(corrupt_ds.shards))]
    partials, workers = _run_jobs(runner, jobs, progress, engine=engine,
                                  ray_args=(original, edited, provider, batch_size, ray_address))
    clean_fig = reduce_partials([p for job, p in zip(jobs, partials) if job.kind == "clean"]).figures()
    corrupt_parts = [p for job, p in zip(jobs, partials) if job.kind == "corrupt"]
    corrupt_fig = reduce_partials(corrupt_parts).figures() if corrupt_parts else None

    gates = _gates(limits, clean_fig, corrupt_fig)
    report = VerifyReport(
        original=str(original), edited=str(edited), clean_source=clean_ds.source,
        corrupt_source=None if corrupt_ds is None else corrupt_ds.source, provider=provider,
        batch_size=batch_size, clean=clean_fig, corrupt=corrupt_fig, thresholds=limits, gates=tuple(gates),
        engine=engine, workers=workers,
        shards={"clean": len(clean_ds.shards), "corrupt": None if corrupt_ds is None else len(corrupt_ds.shards)},
    )
    for g in gates:
        logger.info("gate %s: %s", g.message, "ok" if g.passed else "FAILED")
    return report


def _open_sets(runner: "ShardRunner", clean, corrupt, limits: Thresholds, target):
    """The clean and corrupted sets (``datasets.open_dataset``), their headers checked
    against both models and against the gates asked for."""
    from .datasets import open_dataset

    clean_ds = open_dataset(clean, what="clean", labels="optional")
    runner.check_dataset(clean_ds)
    if limits.max_acc_drop is not None and not clean_ds.has_labels:
        raise InputError(f"gate max-acc-drop needs labels, but clean file {clean_ds.source} has no 'y' array",
                         hint="add y=... to the clean .npz or drop the gate")
    corrupt_ds = None
    if corrupt is not None:
        corrupt_ds = open_dataset(corrupt, what="corrupt", labels="required")
        if not corrupt_ds.has_labels:
            raise DataError(f"corrupt {corrupt_ds.source} has no labels 'y'", hint="the true labels are required")
        runner.check_dataset(corrupt_ds)
    if target is not None and runner.classes is not None:
        _check_classes(runner.classes, None, None, target)
    return clean_ds, corrupt_ds


def _check_request(provider: str, batch_size: int, engine: str, ray_address, limits: Thresholds, target,
                   *, has_corrupt: bool) -> None:
    """The options of ``verify`` fit together, and every gate asked for can be computed
    whatever the data: said before any work."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}", hint="use " + " or ".join(ENGINES))
    if ray_address is not None and engine != "ray":
        raise InputError("a Ray address needs the ray engine",
                         hint=f"add {option('engine', 'ray')} or drop {option('ray_address')}")
    if engine == "ray" and provider != "cpu":
        raise InputError(f"{option('engine', 'ray')} runs ONNX Runtime on CPU workers; provider {provider} is not "
                         "supported there", hint=f"use {option('provider', 'cpu')} with {option('engine', 'ray')}, "
                                                 f"or {option('engine', 'local')}")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if target is not None:
        if target < 0:
            raise InputError(f"target class must be >= 0, got {target}")
        if not has_corrupt:
            raise InputError("a target class needs corrupted inputs",
                             hint="the attack success rate is measured on the corrupt file")
    provider_list(provider)  # fail on an unavailable provider before loading anything
    if limits.min_fix_rate is not None and not has_corrupt:
        raise InputError("gate min-fix-rate needs corrupted inputs with true labels (corrupt file)")
    if limits.max_asr is not None and (not has_corrupt or target is None):
        raise InputError("gate max-asr needs corrupted inputs and a target class")


def _run_jobs(runner: "ShardRunner", jobs: list["ShardJob"], progress, *, engine: str, ray_args) -> tuple[list, int]:
    """Every job's partial figures, in job order, and the number of workers that ran them
    (``ray_args``: original, edited, provider, batch size and Ray address for the ray engine)."""
    weights = [2 * runner.batches(job.dataset.shards[job.index].n) for job in jobs]
    total = sum(weights)
    if progress is not None:
        progress(0, total)
    if engine == "ray":
        from .engine_ray import verify_partials

        original, edited, provider, batch_size, address = ray_args
        return verify_partials(original, edited, provider, batch_size, jobs, weights, address=address,
                               progress=progress, total=total)
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    return [runner.run(job, on_batch=tick) for job in jobs], 1


@dataclass(frozen=True)
class ShardJob:
    """One shard of one set to run both models on (picklable: it travels to Ray workers)."""

    kind: str                 # "clean" or "corrupt"
    dataset: object           # datasets.Dataset
    index: int
    target: int | None = None


class ShardRunner:
    """Both models' ONNX Runtime sessions and the work on one shard: the unit that the
    local engine runs in this process and that each Ray worker holds (one per worker)."""

    def __init__(self, original, edited, provider: str | None = DEFAULT_PROVIDER,
                 batch_size: int = DEFAULT_BATCH_SIZE, *, threads: int | None = None,
                 input_shapes: Mapping[str, Sequence[int]] | None = None):
        self.s_orig = ort_session(original, provider, what="original model", threads=threads)
        self.s_edit = ort_session(edited, provider, what="edited model", threads=threads)
        _same_signature(self.s_orig, self.s_edit, original, edited)
        self.inputs = _input_specs(self.s_orig, original, input_shapes)
        self.batch_size = int(batch_size)
        self.classes = _declared_classes(self.s_orig) or _declared_classes(self.s_edit)

    def batches(self, n: int) -> int:
        return num_batches(self.s_orig, n, self.batch_size)

    def check_dataset(self, dataset) -> None:
        """Every shard's declared shape and dtype against both models' inputs (headers only)."""
        for shard, name in dataset.layouts():
            # the declared shape (a view of one zero per input: nothing allocated), then the dtype on one row
            layout = fields(np.zeros(0, dtype=shard.x_dtype))
            shapes = {k: (shard.x_shape[0],) + v.shape[1:] if k else tuple(shard.x_shape) for k, v in layout.items()}
            self._fit_fields({k: np.broadcast_to(np.zeros((), dtype=self._dtype(k)), shapes[k]) for k in layout}, name)
            self._fit(np.zeros((1,) + tuple(shard.x_shape[1:]), dtype=shard.x_dtype), name)

    def _dtype(self, key: str) -> np.dtype:
        spec = self.inputs.get(key) or next(iter(self.inputs.values()))
        return spec.dtype

    def _fit(self, x: np.ndarray, name: str) -> np.ndarray | dict[str, np.ndarray]:
        """``x`` checked against (and cast to) the models' inputs: one array for a
        single-input model, {input name: array} for a packed ``<key>:<input name>`` set."""
        return self._fit_fields(fields(x), name)

    def _fit_fields(self, parts: dict[str, np.ndarray], name: str):
        if "" in parts:  # a plain array
            if len(self.inputs) != 1:
                raise DataError(f"{name}: the model has {len(self.inputs)} inputs ({', '.join(self.inputs)}) but the "
                                "data is one array", hint="save one array per input as '<key>:<input name>' "
                                                          "(e.g. x:" + next(iter(self.inputs)) + "=...)")
            parts = {next(iter(self.inputs)): parts[""]}
        missing = [k for k in self.inputs if k not in parts]
        extra = [k for k in parts if k not in self.inputs]
        if missing or extra:
            raise DataError(f"{name}: arrays for inputs {', '.join(parts)} but the model's inputs are "
                            f"{', '.join(self.inputs)}", hint="name each array '<key>:<input name>'")
        edit = {i.name: i for i in self.s_edit.get_inputs()}
        out = {}
        for key, arr in parts.items():
            spec, label = self.inputs[key], name if len(self.inputs) == 1 else f"{name} (input {key!r})"
            arr = check_against_input(arr, name=label, input_name=key, shape=list(spec.shape), dtype=spec.dtype)
            e = edit[key]
            out[key] = check_against_input(arr, name=label, input_name=key, shape=list(e.shape or []),
                                           dtype=input_dtype(e))
        return next(iter(out.values())) if len(out) == 1 else out

    def run(self, job: ShardJob, on_batch: Callable[[], None] | None = None):
        """Read one shard (safe loader), run both models on it, return its partial figures."""
        samples = job.dataset.load(job.index)
        what = job.dataset.what
        x = self._fit(samples.x, f"{what} {samples.source}: 'x'")
        n = len(samples.x)
        if samples.y is not None and self.classes is not None:
            check_labels(samples.y, self.classes, name=f"{what} {samples.source}: 'y'")

        def run(session, label):
            tick = None if on_batch is None else (lambda rows: on_batch())
            logger.info("running %s on %d %s inputs of %s (batch %d)", label, n, what, samples.source,
                        effective_batch_size(session, self.batch_size))
            logits = run_batched(session, x, self.batch_size, name=label, on_batch=tick)
            if logits.ndim != 2:
                raise InputError(f"the first output of the {label} has shape {logits.shape}; verify expects logits [N, C]")
            return logits

        lo = run(self.s_orig, "original model")
        le = run(self.s_edit, "edited model")
        if lo.shape != le.shape:
            raise InputError(f"the original model outputs {lo.shape[1]} classes but the edited model {le.shape[1]}")
        if samples.y is not None:
            check_labels(samples.y, lo.shape[1], name=f"{what} {samples.source}: 'y'")
        if job.target is not None:
            _check_classes(lo.shape[1], None, None, job.target)
        if job.kind == "clean":
            return CleanPartial.of(lo, le, samples.y)
        return CorruptPartial.of(lo, le, samples.y, job.target)


def reduce_partials(parts: Sequence):
    """Merge per-shard partial figures in the order given (shard order: the same sums
    whichever engine computed the parts)."""
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out


@dataclass(frozen=True)
class CleanPartial:
    """Counts and sums over some clean inputs; ``merge`` adds two, ``figures`` divides."""

    n: int
    n_logits: int
    agree: int
    max_abs: float
    sum_abs: float
    correct_before: int | None
    correct_after: int | None
    sum_shift: float = 0.0
    lost: int | None = None

    @classmethod
    def of(cls, lo: np.ndarray, le: np.ndarray, y: np.ndarray | None) -> CleanPartial:
        po, pe = lo.argmax(axis=1), le.argmax(axis=1)
        diff = np.abs(lo.astype(np.float64) - le.astype(np.float64))
        if not (np.isfinite(lo).all() and np.isfinite(le).all()):
            logger.warning("non-finite logits on clean inputs; logit-change figures are not finite")
        cb = ca = lost = None
        if y is not None:
            cb, ca, lost = int((po == y).sum()), int((pe == y).sum()), int(((po == y) & (pe != y)).sum())
        return cls(n=int(lo.shape[0]), n_logits=int(diff.size), agree=int((po == pe).sum()),
                   max_abs=float(diff.max()) if diff.size else 0.0, sum_abs=float(diff.sum()),
                   correct_before=cb, correct_after=ca, sum_shift=float(output_shifts(lo, le).sum()), lost=lost)

    def merge(self, other: CleanPartial) -> CleanPartial:
        labelled = self.correct_before is not None and other.correct_before is not None
        return CleanPartial(
            n=self.n + other.n, n_logits=self.n_logits + other.n_logits, agree=self.agree + other.agree,
            max_abs=float(np.maximum(self.max_abs, other.max_abs)),  # NaN propagates, as in one array
            sum_abs=self.sum_abs + other.sum_abs,
            correct_before=self.correct_before + other.correct_before if labelled else None,
            correct_after=self.correct_after + other.correct_after if labelled else None,
            sum_shift=self.sum_shift + other.sum_shift, lost=self.lost + other.lost if labelled else None)

    def figures(self) -> CleanFigures:
        n, cb, ca = self.n, self.correct_before, self.correct_after
        return CleanFigures(
            n=n, acc_before=None if cb is None else cb / n, acc_after=None if ca is None else ca / n,
            agreement=self.agree / n, max_abs_logit_change=self.max_abs,
            mean_abs_logit_change=self.sum_abs / self.n_logits if self.n_logits else 0.0,
            correct_before=cb, correct_after=ca, output_shift=self.sum_shift / n if n else 0.0,
            turned=n - self.agree if self.lost is None else self.lost)


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """[N, K] class probabilities (float64) of a classifier's outputs: the outputs
    themselves where every row is already a distribution (a graph ending in Softmax),
    else their softmax."""
    z = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    if z.size and (z >= 0).all() and np.allclose(z.sum(1), 1.0, atol=1e-4):
        return z
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def output_shifts(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per input, the total-variation distance between the class probabilities of two
    models' outputs: the share of predictions that differ when each model's is drawn from
    its probabilities (at least, for the best coupling); 0 for the same outputs, 1 for
    confident and different ones."""
    return 0.5 * np.abs(class_probabilities(before) - class_probabilities(after)).sum(1)


@dataclass(frozen=True)
class CorruptPartial:
    n: int
    right_before: int
    right_after: int
    wrong_before: int
    fixed: int
    broken: int
    target: int | None
    not_target: int | None
    hits_before: int | None     # inputs not labelled target but predicted as target
    hits_after: int | None

    @classmethod
    def of(cls, lo: np.ndarray, le: np.ndarray, y: np.ndarray, target: int | None) -> CorruptPartial:
        po, pe = lo.argmax(axis=1), le.argmax(axis=1)
        right_b, right_a = po == y, pe == y
        wrong_b = ~right_b
        nt = hb = ha = None
        if target is not None:
            mask = y != target
            nt = int(mask.sum())
            hb, ha = int((po[mask] == target).sum()), int((pe[mask] == target).sum())
        return cls(n=int(lo.shape[0]), right_before=int(right_b.sum()), right_after=int(right_a.sum()),
                   wrong_before=int(wrong_b.sum()), fixed=int((wrong_b & right_a).sum()),
                   broken=int((right_b & ~right_a).sum()), target=target, not_target=nt, hits_before=hb,
                   hits_after=ha)

    def merge(self, other: CorruptPartial) -> CorruptPartial:
        def add(a, b):
            return None if a is None or b is None else a + b

        return CorruptPartial(
            n=self.n + other.n, right_before=self.right_before + other.right_before,
            right_after=self.right_after + other.right_after, wrong_before=self.wrong_before + other.wrong_before,
            fixed=self.fixed + other.fixed, broken=self.broken + other.broken, target=self.target,
            not_target=add(self.not_target, other.not_target), hits_before=add(self.hits_before, other.hits_before),
            hits_after=add(self.hits_after, other.hits_after))

    def figures(self) -> CorruptFigures:
        asr_b = asr_a = None
        if self.target is not None and self.not_target:
            asr_b, asr_a = self.hits_before / self.not_target, self.hits_after / self.not_target
        return CorruptFigures(
            n=self.n, acc_before=self.right_before / self.n, acc_after=self.right_after / self.n,
            fix_rate=(self.fixed / self.wrong_before) if self.wrong_before else None,
            asr_before=asr_b, asr_after=asr_a, target=self.target, n_wrong_before=self.wrong_before,
            n_fixed=self.fixed, n_broken=self.broken, n_not_target=self.not_target)


def _input_specs(session, path, input_shapes=None) -> dict[str, InputSpec]:
    """The model's inputs as ONNX Runtime reads them, with the sizes ``input_shapes`` gives
    for symbolic dims (the batch axis stays the data's own)."""
    specs = [InputSpec(i.name, tuple(i.shape or ()), input_dtype(i)) for i in session.get_inputs()]
    given = dict(input_shapes or {})
    check_input_shapes(specs, given, str(path))
    return {s.name: replace(s, shape=(s.shape[:1] + tuple(given[s.name][1:])) if s.name in given else s.shape)
            for s in specs}


def _same_signature(s_orig, s_edit, original, edited):
    a, b = s_orig.get_inputs(), s_edit.get_inputs()
    if len(b) != len(a):
        raise InputError(f"edited model {edited} has {len(b)} inputs but original {original} has {len(a)}")
    for x, y in zip(a, b):
        if x.name != y.name or x.type != y.type:
            raise InputError(f"edited model {edited} takes {y.name!r} ({y.type}) but original {original} takes "
                             f"{x.name!r} ({x.type})")
    ca, cb = _declared_classes(s_orig), _declared_classes(s_edit)
    if ca is not None and cb is not None and ca != cb:
        raise InputError(f"original model {original} outputs {ca} classes but edited model {edited} outputs {cb}")


def _declared_classes(session) -> int | None:
    shape = session.get_outputs()[0].shape
    if shape and len(shape) == 2 and isinstance(shape[-1], int) and shape[-1] > 0:
        return int(shape[-1])
    return None


def _check_classes(num_classes: int, clean_s: Samples | None, corrupt_s: Samples | None, target: int | None) -> None:
    if clean_s is not None and clean_s.y is not None:
        check_labels(clean_s.y, num_classes, name=f"clean {clean_s.source}: 'y'")
    if corrupt_s is not None and corrupt_s.y is not None:
        check_labels(corrupt_s.y, num_classes, name=f"corrupt {corrupt_s.source}: 'y'")
    if target is not None and not (0 <= target < num_classes):
        raise InputError(f"target class {target} is out of range for this model's {num_classes} outputs",
                         hint=f"use 0..{num_classes - 1}")



def _gates(limits: Thresholds, clean: CleanFigures, corrupt: CorruptFigures | None) -> list[GateResult]:
    gates = []

    def check(name, value, limit, op):
        value = float(value)
        ok = (value <= limit) if op == "<=" else (value >= limit)  # NaN fails both
        gates.append(GateResult(name=name, value=value, limit=float(limit), op=op, passed=bool(ok)))

    if limits.max_acc_drop is not None:
        check("max-acc-drop", clean.acc_drop, limits.max_acc_drop, "<=")
    if limits.min_fix_rate is not None:
        if corrupt.fix_rate is None:
            raise InputError("gate min-fix-rate cannot be computed: the original model gets every corrupted "
                             "input right, so there is nothing to fix",
                             hint="give corrupted inputs the original misclassifies, or drop the gate")
        check("min-fix-rate", corrupt.fix_rate, limits.min_fix_rate, ">=")
    if limits.max_logit_change is not None:
        check("max-logit-change", clean.max_abs_logit_change, limits.max_logit_change, "<=")
    if limits.max_output_shift is not None:
        check("max-output-shift", clean.output_shift, limits.max_output_shift, "<=")
    if limits.max_drop_bound is not None:
        check("max-drop-bound", clean.drop_bound, limits.max_drop_bound, "<=")
    if limits.max_asr is not None:
        if corrupt.asr_after is None:
            raise InputError(f"gate max-asr cannot be computed: every corrupted input is labelled with the "
                             f"target class {corrupt.target}", hint="give inputs of other classes, or drop the gate")
        check("max-asr", corrupt.asr_after, limits.max_asr, "<=")
    return gates
