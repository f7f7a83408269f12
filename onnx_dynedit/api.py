"""The pipeline behind `dynedit locate`, `dynedit edit` and `dynedit revert`.

  load -> twin (parity required) -> check data against the model -> key statistics ->
  locate / rectify -> write back into the original initializers -> ORT parity of the
  written model against the twin with the same edits -> atomic save -> report

Each function takes paths or loaded objects, returns a frozen result, and writes
nothing unless asked to (``out``); every user error is a DynEditError.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import memory, progress, threads
from .data import Pairs, Samples, check_against_input, check_labels, load_pairs, load_samples
from .errors import CheckFailed, DataError, EditError, InputError, OutputError, option
from .options import check_choice, check_config, check_known, check_range
from .report import to_json
from .io import LoadedModel, atomic_write_bytes, check_output_path, load_model, save_model, stage_model

log = logging.getLogger(__name__)


def _twin(loaded: LoadedModel, device, input_shapes, raw: Inputs, *, release: bool = False):
    """(the twin, ``raw`` checked against it (``fit_inputs``), its parity on random inputs,
    its parity on the given pairs), parity required on both. Random inputs take their sizes
    from ``input_shapes`` (given by the caller), else the graph, else (symbolic non-batch
    dims) the rows of the pairs. The pairs (both sides) are the inputs the written model's
    parity is measured on: real inputs reach what random ones may not (an int8 model whose
    integer kernels saturate in ONNX Runtime on real activations: parity.QUANT_HINT), so a
    twin that is off on them is refused here, before the edit, not after it.
    ``release``: the model was loaded by the caller itself, so once the twin passes, the ONNX
    graph's copy of the weights is dropped (``LoadedModel.release_weights``; the twin holds
    its own) until a write reads it again (``_reload``)."""
    from .layers import check_finite_weights
    from .parity import check_parity, parity_session, require_parity
    from .twin import Twin

    twin = Twin(loaded, device, input_shapes=_with_data_shapes(loaded, input_shapes, raw.pairs.corrupt))
    check_finite_weights(loaded.model, twin.layer_map, loaded.label)
    with progress.phase("parity (ONNX Runtime vs twin)"):
        session = parity_session(twin)
        parity = check_parity(twin, session=session)
        require_parity(parity, loaded.label, quantised=twin.quantised)
        inputs = fit_inputs(twin, raw)
        on_pairs = _parity_on(twin, _pair_rows(inputs.pairs), session, ())
        require_parity(on_pairs, f"{loaded.label} (on the given pairs)", quantised=twin.quantised)
    del session
    if release:
        loaded.release_weights()
    return twin, inputs, parity, on_pairs


def _pair_rows(pairs: Pairs) -> np.ndarray:
    """Both sides of the pairs as one batch: the inputs of the parity checks."""
    return np.concatenate([pairs.corrupt, pairs.clean])


def _with_data_shapes(loaded: LoadedModel, given, data):
    from .shapes import input_specs

    given = dict(given or {})
    if data is None:
        return given
    for spec in input_specs(loaded.model):
        if spec.name in given or all(isinstance(d, int) and d > 0 for d in spec.shape[1:]):
            continue
        arr = data[spec.name] if data.dtype.names and spec.name in data.dtype.names else (
            None if data.dtype.names else data)
        if arr is not None and arr.ndim == len(spec.shape):
            first = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else min(len(arr), 2)
            given[spec.name] = (first,) + tuple(int(d) for d in arr.shape[1:])
    return given


def _refuse_data_overwrite(outputs, data_inputs) -> None:
    """An output must never replace one of the .npz inputs (no --in-place for those)."""
    data = {Path(p).resolve(): p for p in data_inputs if p is not None}
    for out in outputs:
        if out is not None and Path(out).resolve() in data:
            raise OutputError(f"refusing to overwrite the input {data[Path(out).resolve()]} with an output",
                              hint="write the output to another path")


def _parity_on(twin, feeds_x: np.ndarray, session, edits):
    """ORT (``session``: on the model as shipped, or on the written one) vs the twin with
    ``edits``, on ``feeds_x``; a model with a fixed batch size is fed that many rows at a time (the
    worst chunk counts)."""
    from .parity import check_parity

    spec = twin.inputs[0]

    def feeds(x):
        return {s.name: x[s.name] for s in twin.inputs} if x.dtype.names else {spec.name: x}

    batch = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    if batch is None:
        return check_parity(twin, feeds(feeds_x), session=session, edits=edits)
    if len(feeds_x) < batch:
        reps = -(-batch // len(feeds_x))
        feeds_x = np.concatenate([feeds_x] * reps)
    worst = None
    for start in range(0, min(len(feeds_x), max(batch, 64)) - batch + 1, batch):
        parity = check_parity(twin, feeds(feeds_x[start:start + batch]), session=session, edits=edits)
        if worst is None or not (parity.max_rel_diff <= worst.max_rel_diff):
            worst = parity
    return worst


def fit_input(twin, arr: np.ndarray, name: str) -> np.ndarray:
    """Check ``arr`` against the model's input(s). Several inputs: a packed array with a
    field per input (``<key>:<input name>`` in the npz), checked field by field."""
    from .data import pack_inputs

    names = [s.name for s in twin.inputs]
    if len(twin.inputs) == 1 and not arr.dtype.names:
        spec = twin.inputs[0]
        return check_against_input(arr, name=name, input_name=spec.name, shape=list(spec.shape), dtype=spec.dtype)
    if not arr.dtype.names:
        raise DataError(f"{name}: the model has {len(names)} inputs ({', '.join(names)}); give one array per input",
                        hint="key them '<key>:<input name>' in the npz, e.g. " + ", ".join(
                            f"corrupt:{n}" for n in names))
    extra = [k for k in arr.dtype.names if k not in names]
    missing = [n for n in names if n not in arr.dtype.names]
    if missing or extra:
        raise DataError(f"{name}: arrays for inputs {', '.join(arr.dtype.names)} but the model's inputs are "
                        f"{', '.join(names)}", hint="key them '<key>:<input name>' with the model's input names")
    return pack_inputs({s.name: check_against_input(arr[s.name], name=f"{name}[{s.name!r}]", input_name=s.name,
                                                    shape=[None] + list(s.shape[1:]) if s.shape else [],
                                                    dtype=s.dtype) for s in twin.inputs}, name=name)


def _num_classes(twin) -> int | None:
    shape = twin.outputs[0].shape if twin.outputs else ()
    last = shape[-1] if shape else None
    return last if isinstance(last, int) and last > 0 else None


@dataclass(frozen=True)
class Inputs:
    pairs: Pairs
    stats: Samples | None
    val: Samples | None
    # A stats set given as shards (or with the ray engine): the key statistics stream over
    # every shard (keystats.ShardedKeys); ``stats`` then holds its first shard only, for
    # the uses that need inputs in memory (augmentation, locality, held-out checks).
    stats_shards: object = None
    val_in_stats: int | None = None  # val inputs also in stats (None: no val, no stats, or streamed stats)


def read_inputs(pairs_path, stats_path=None, val_path=None, *, engine: str | None = None) -> Inputs:
    """Read and check the .npz inputs on their own (before any model work: fail fast).
    ``stats_path`` / ``val_path`` may name a folder or glob of shards (datasets.py): a
    sharded stats set streams (see ``Inputs``); a sharded val set is read into memory,
    since the loop evaluates it after every candidate edit."""
    from .datasets import open_dataset

    pairs = load_pairs(pairs_path)
    stats = shards = None
    if stats_path is not None:
        ds = open_dataset(stats_path, what="stats", labels="ignored")
        if ds.sharded or _engine(engine) == "ray":
            shards = ds
            stats = ds.load(0)
        else:
            stats = load_samples(stats_path, what="stats", labels="ignored")
    val = None
    if val_path is not None:
        ds = open_dataset(val_path, what="val")
        val = ds.load_all() if ds.sharded else load_samples(val_path, what="val")
    return Inputs(pairs=pairs, stats=stats, val=val, stats_shards=shards)


def _engine(engine: str | None, ray_address: str | None = None) -> str:
    engine = "local" if engine is None else str(engine).lower()
    if engine not in ("local", "ray"):
        raise InputError(f"unknown engine {engine!r}", hint="use local or ray")
    if ray_address is not None and engine != "ray":
        raise InputError("a Ray address needs the ray engine",
                         hint=f"add {option('engine', 'ray')} or drop {option('ray_address')}")
    return engine


def _engine_info(keys) -> dict:
    """Where the key statistics ran (a stats set in memory: here, whatever was asked)."""
    return {"engine": "local", "workers": 1} if keys is None else {"engine": keys.engine, "workers": keys.workers}


def _sharded_keys(twin, raw: Inputs, model, engine, ray_address):
    """The key-statistics source for a sharded stats set (None: the stats are in memory)."""
    if raw.stats_shards is None:
        return None
    from .keystats import ShardedKeys, check_shards

    check_shards(twin, raw.stats_shards)
    return ShardedKeys(raw.stats_shards, engine=engine, ray_address=ray_address, model_path=Path(model).resolve())


def fit_inputs(twin, raw: Inputs) -> Inputs:
    """Check the inputs against the model's input (shape, dtype) and output (labels)."""
    p = raw.pairs
    pairs = Pairs(corrupt=fit_input(twin, p.corrupt, f"pairs {p.source}: 'corrupt'"),
                  clean=fit_input(twin, p.clean, f"pairs {p.source}: 'clean'"), source=p.source)
    stats = None
    if raw.stats is not None:
        s = raw.stats
        stats = Samples(x=fit_input(twin, s.x, f"stats {s.source}: 'x'"), y=None, source=s.source)
    val = None
    if raw.val is not None:
        v = raw.val
        x = fit_input(twin, v.x, f"val {v.source}: 'x'")
        if v.y is not None:
            n = _num_classes(twin) or int(twin.run(x[:1]).shape[-1])
            check_labels(v.y, n, name=f"val {v.source}: 'y'")
        val = Samples(x=x, y=v.y, source=v.source)
    overlap = val_in_stats(val, stats) if raw.stats_shards is None else None
    return Inputs(pairs=pairs, stats=stats, val=val, stats_shards=raw.stats_shards, val_in_stats=overlap)


def val_in_stats(val: Samples | None, stats: Samples | None) -> int | None:
    """How many val inputs are also stats inputs; a warning when val has no labels, since
    unlabeled val is read as inputs the model was not trained on (degradation.Degradation)."""
    if val is None or stats is None:
        return None
    overlap = shared_rows(val.x, stats.x)
    if overlap and val.y is None:
        from .degradation import FRESH_SHIFT_WEIGHT, SHIFT_WEIGHT

        log.warning("val %s: %d of its %d inputs are also stats inputs; unlabeled val is read as inputs the model "
                    "was not trained on (their output shift weighs %g, a memorised input's %g): give val other "
                    "inputs, labels, or none and a share of the stats is held out", val.source, overlap,
                    len(val.x), FRESH_SHIFT_WEIGHT, SHIFT_WEIGHT)
    return overlap


def shared_rows(x: np.ndarray, pool: np.ndarray) -> int:
    """How many rows of ``x`` equal a row of ``pool`` bit for bit."""
    seen = {hashlib.sha1(np.ascontiguousarray(row).tobytes()).digest() for row in pool}
    return sum(hashlib.sha1(np.ascontiguousarray(row).tobytes()).digest() in seen for row in x)


# --------------------------------------------------------------------------- locate


@dataclass(frozen=True)
class LocateOutcome:
    model: str
    localisation: object = field(repr=False)
    stats_source: str = ""
    device: str = "cpu"
    engine: str = "local"       # where the key statistics ran: "local" or "ray"
    workers: int = 1
    attributed_output: str = ""

    def to_dict(self) -> dict:
        out = self.localisation.to_dict()
        out.update({"model": self.model, "stats_source": self.stats_source, "device": self.device,
                    "engine": self.engine, "workers": self.workers,
                    "attributed_output": self.attributed_output})
        return out


def locate_model(model, pairs, *, stats=None, device=None, steps=None, target=None, key=None,
                 plot=None, engine=None, ray_address=None, input_shapes=None) -> LocateOutcome:
    """``stats`` may be an .npz or a folder / glob of shards; ``engine`` (local or ray)
    says where the key statistics over a sharded stats set run (engine_ray). ``steps``,
    ``target`` and ``key`` left as None take ``RectifyConfig``'s ``ig_steps``,
    ``ig_target`` and ``key``; a bad value is an ``InputError`` naming the option."""
    import torch

    from .attribution import locate
    from .factors import FactorStore
    from .rank_one import key_statistics, too_wide
    from .rectify import RectifyConfig

    defaults = RectifyConfig()
    steps = defaults.ig_steps if steps is None else steps
    target = defaults.ig_target if target is None else target
    key = defaults.key if key is None else key
    check_range("steps", steps)
    check_choice("target", target)
    check_choice("key", key)
    loaded = load_model(model)
    if plot is not None:
        _refuse_data_overwrite([plot], [pairs, stats])
        check_output_path(plot, loaded.protected_paths())
    engine = _engine(engine, ray_address)
    raw = read_inputs(pairs, stats, engine=engine)
    twin, inputs, _, _ = _twin(loaded, device, input_shapes, raw, release=not isinstance(model, LoadedModel))
    editable = twin.layer_map.editable()
    elsewhere = twin.rows_elsewhere(editable, inputs.pairs.corrupt)
    layers = [layer for layer in editable if not too_wide(layer) and layer.node not in elsewhere]
    if not layers:
        raise EditError(f"{loaded.label} has no editable layer")
    keys = _sharded_keys(twin, raw, model, engine, ray_address)
    with keys if keys is not None else contextlib.nullcontext():
        if keys is not None:
            key_x, source = keys, keys.source
        else:
            key_x = inputs.stats.x if inputs.stats is not None else inputs.pairs.clean
            source = f"stats ({len(key_x)} inputs)" if inputs.stats is not None else "clean twins of the pairs (no stats given)"
        torch.manual_seed(0)
        stats_ = FactorStore()  # large factors wait on disk, read one layer at a time
        with progress.phase(f"key statistics ({len(layers)} layers)"):
            stats_.update(key_statistics(twin, layers, key_x, source=source))
    try:
        with progress.phase(f"localisation (IG, {steps} steps)"):
            loc = locate(twin, layers, inputs.pairs.corrupt, inputs.pairs.clean, stats_, steps=steps, target=target,
                         key=key)
    finally:
        stats_.close()
    if plot is not None:
        from .plot import write_locate_plot

        with progress.phase("plot"):
            write_locate_plot(Path(plot), loc, twin.layer_map, model_label=loaded.label)
    return LocateOutcome(model=loaded.label, localisation=loc, stats_source=source, device=str(twin.device),
                         attributed_output=twin.attributed_output, **_engine_info(keys))


# ----------------------------------------------------------------------------- edit


@dataclass(frozen=True)
class EditOutcome:
    model: str
    output: str | None
    result: object = field(repr=False)
    parity_before: dict = field(default_factory=dict)  # on random inputs
    parity_after: dict = field(default_factory=dict)   # of the written model, on the given pairs
    parity_before_pairs: dict = field(default_factory=dict)  # on the given pairs, before the edit
    changed: tuple[str, ...] = ()
    device: str = "cpu"
    inputs: dict = field(default_factory=dict)
    engine: str = "local"       # where the key statistics ran: "local" or "ray"
    workers: int = 1
    output_unchanged: bool = False  # nothing needed an edit: the model was written as it came
    timings: dict = field(default_factory=dict)  # seconds per phase, the whole run ("total")
    plot: str | None = None
    rounding: tuple[dict, ...] = ()      # per written tensor: float edit vs what was written
    rounding_effect: dict = field(default_factory=dict)  # ORT on the written model vs the float edit
    attributed_output: str = ""  # what localisation and the output criterion saw

    @property
    def success(self) -> bool:
        return self.result.success

    def to_dict(self) -> dict:
        out = {"model": self.model, "output": self.output, "output_unchanged": self.output_unchanged,
               "success": self.success, "device": self.device, "threads": threads.current(),
               "engine": self.engine, "workers": self.workers,
               "inputs": self.inputs, "changed_initializers": list(self.changed),
               "parity_before": self.parity_before, "parity_before_pairs": self.parity_before_pairs,
               "parity_after": self.parity_after, "plot": self.plot,
               "rounding": list(self.rounding), "rounding_effect": self.rounding_effect,
               "attributed_output": self.attributed_output,
               **self.result.to_dict()}
        out["timings"] = {**out.get("timings", {}), **self.timings}
        return out


class _Clock:
    """Seconds per phase, in the order the phases ran."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def phase(self, name: str, t0: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> dict:
        return {**{k: round(v, 4) for k, v in self.seconds.items()},
                "total": round(time.perf_counter() - self.start, 4)}


def edit_model(model, pairs, out=None, *, stats=None, val=None, layers=None, max_edits=None,
               max_degradation=None, target_gap=None, objective=None, augment=None, seed=None,
               device=None, in_place=False, report=None, plot=None, engine=None, ray_address=None,
               input_shapes=None, **config) -> EditOutcome:
    """Rectify ``model`` from ``pairs`` and (when ``out`` is given) save the edited model.

    When the pairs already behave (success without any edit), ``out`` gets the model
    unchanged (``output_unchanged``), so that a pipeline always finds its output after a
    success. ``plot``: a PNG of the first given pairs and their input attribution before
    and after, and the layer scores of each round. Keyword arguments left as None take
    the defaults of ``RectifyConfig``; a bad value is an ``InputError`` naming the option,
    raised before any work. ``stats`` / ``val`` may be an .npz or a folder / glob of
    shards (``read_inputs``); ``engine`` (local or ray) says where the key statistics
    over a sharded stats set run.
    """
    cfg = edit_config(layers=tuple(layers) if layers else None, max_edits=max_edits,
                      max_degradation=max_degradation, target_gap=target_gap, objective=objective,
                      augment=augment, seed=seed, **config)
    clock = _Clock()
    t0 = time.perf_counter()
    with progress.phase("load and check the model"):
        loaded = load_model(model)
    protected = loaded.protected_paths()
    _check_edit_outputs(out, report, plot, protected, in_place=in_place, data=[pairs, stats, val])
    engine = _engine(engine, ray_address)
    raw = read_inputs(pairs, stats, val, engine=engine)
    clock.phase("load", t0)
    t0 = time.perf_counter()
    twin, inputs, parity0, parity0_pairs = _twin(loaded, device, input_shapes, raw,
                                                 release=not isinstance(model, LoadedModel))
    if twin.token_inputs or len(twin.inputs) > 1:
        cfg = _output_criterion_only(cfg, loaded.label, augment_given=augment is not None,
                                     check_given=config.get("check_pairs") is not None)
    clock.phase("twin_and_parity", t0)
    keys = _sharded_keys(twin, raw, model, engine, ray_address)
    for name in cfg.layers or ():
        twin.layer_map.get(name)  # unknown names fail early with close matches
    t0 = time.perf_counter()
    result = _rectify(twin, inputs, cfg, keys)
    clock.phase("rectify", t0)
    info, raw, inputs = _inputs_info(raw, inputs), None, replace(inputs, stats=None, val=None)  # arrays go before the write
    edits = [e.to_torch(twin.device) for e in result.edits]
    written = _Written()
    if result.edits:
        written = _write_edits(twin, loaded, inputs, result, edits, out, protected, in_place, clock)
    elif out is not None and result.success:
        written = _save_unchanged(loaded, out, protected, in_place, clock)
    if plot is not None:
        _write_edit_plot(Path(plot), twin, loaded, inputs, result, edits, clock)
    outcome = EditOutcome(model=loaded.label, output=written.path, result=result, parity_before=parity0.to_dict(),
                          parity_before_pairs=parity0_pairs.to_dict(),
                          parity_after=written.parity_after, changed=written.changed, device=str(twin.device),
                          inputs=info, output_unchanged=written.unchanged, timings=clock.total(),
                          plot=None if plot is None else str(plot), rounding=written.rounding,
                          rounding_effect=written.rounding_effect,
                          attributed_output=twin.attributed_output, **_engine_info(keys))
    if report is not None:
        atomic_write_bytes(Path(report), (to_json(outcome.to_dict()) + "\n").encode())
    return outcome


def edit_config(**options):
    """The ``RectifyConfig`` of ``edit_model``'s keyword options (None: the default),
    every value checked (options.py): an unknown option or a bad value is an
    ``InputError`` naming it."""
    from .rectify import RectifyConfig

    check_known(RectifyConfig, options)
    cfg = RectifyConfig().replace(**options)
    check_config(cfg)
    return cfg


def _rectify(twin, inputs: Inputs, cfg, keys):
    """The loop on the fitted inputs (key statistics from ``keys`` when sharded)."""
    import torch

    from .rectify import rectify

    torch.use_deterministic_algorithms(True, warn_only=True)
    with keys if keys is not None else contextlib.nullcontext():
        try:
            return rectify(twin, inputs.pairs.corrupt, inputs.pairs.clean,
                           stats_x=inputs.stats.x if inputs.stats else None,
                           val_x=inputs.val.x if inputs.val else None,
                           val_y=inputs.val.y if inputs.val else None, config=cfg, key_source=keys)
        finally:
            progress.end()


def _inputs_info(raw: Inputs, inputs: Inputs) -> dict:
    """The report's ``inputs``: where the pairs, stats and val came from, and how many val
    inputs are also stats inputs."""
    return {"pairs": inputs.pairs.source, "n_pairs": inputs.pairs.n,
            "stats": (raw.stats_shards.source if raw.stats_shards is not None
                      else inputs.stats.source if inputs.stats else None),
            "val": inputs.val.source if inputs.val else None, "val_in_stats": inputs.val_in_stats}


def _check_edit_outputs(out, report, plot, protected, *, in_place: bool, data) -> None:
    """Every output path can be written, replaces no input, and is not another output."""
    _refuse_data_overwrite([out, report, plot], data)
    if out is not None:
        check_output_path(out, protected, in_place=in_place)
    named = [(n, p) for n, p in (("out", out), ("report", report), ("plot", plot)) if p is not None]
    for i, (name, path) in enumerate(named):
        if name != "out":
            check_output_path(path, protected)
        for other, other_path in named[:i]:
            if Path(path).resolve() == Path(other_path).resolve():
                raise OutputError(f"{option(name)} {path} is the same file as {option(other)} {other_path}",
                                  hint="give each output its own name")


def _output_criterion_only(cfg, label: str, *, augment_given: bool, check_given: bool = False):
    """A model with integer or several inputs: the output criterion, and no synthetic
    pairs (nor check pairs) unless asked for (transplanting x~ - x onto stats inputs means
    nothing for token ids)."""
    if cfg.criterion == "attribution":
        raise InputError(f"{label}: {option('criterion', 'attribution')} needs one float input "
                         "(input-level attribution); this model has integer or several inputs",
                         hint=f"use {option('criterion', 'output')}")
    return replace(cfg, criterion="output", augment=cfg.augment if augment_given else 0,
                   check_pairs=cfg.check_pairs if check_given else 0)


@dataclass(frozen=True)
class _Written:
    """What ``edit_model`` wrote (nothing, by default)."""

    path: str | None = None
    unchanged: bool = False
    changed: tuple[str, ...] = ()
    parity_after: dict = field(default_factory=dict)
    rounding: tuple[dict, ...] = ()
    rounding_effect: dict = field(default_factory=dict)


def _write_edits(twin, loaded: LoadedModel, inputs: Inputs, result, edits, out, protected, in_place,
                 clock: _Clock) -> _Written:
    """Write the accepted edits back into the ONNX initializers, check the written file
    against the edited twin with ONNX Runtime, and put it at ``out`` (when given) only
    once it passes. The edited proto is dropped once written, before ORT loads the file:
    the loaded model, the twin and ORT's session are then the only copies of the weights."""
    from .parity import require_parity
    from .sessions import ort_session

    gc.collect()  # what the loop left behind goes before the weights are read again and copied
    memory.trim()
    _reload(loaded, clock)
    t0 = time.perf_counter()
    with progress.phase("write back into the ONNX initializers"):
        updates = result.updates()
        staged, rounding, checked = _stage_edits(loaded, updates, result, edits, out, protected, in_place)
    clock.phase("write_back", t0)
    feeds_x = _pair_rows(inputs.pairs)
    with staged:
        t0 = time.perf_counter()
        with progress.phase("parity of the written model (ONNX Runtime vs edited twin)"):
            session = ort_session(staged.path, what="edited model")
            # parity of what was written: a requantised layer's change is not the float edit
            parity = _parity_on(twin, feeds_x, session, checked)
        clock.phase("parity_after", t0)
        require_parity(parity, f"{loaded.label} (edited)", quantised=twin.quantised)
        rounding_effect: dict = {}
        if checked is not edits or any(r["dtype"] not in ("float32", "float64") for r in rounding):
            effect = _parity_on(twin, feeds_x, session, edits)
            rounding_effect = {"max_abs_logit_change": effect.max_abs_diff, "max_rel_logit_change": effect.max_rel_diff,
                               "n_inputs": effect.n_inputs,
                               "what": "ONNX Runtime on the written model vs the twin with the float edit"}
        del session
        written = None
        if out is not None:
            t0 = time.perf_counter()
            with progress.phase(f"save {out}"):
                written = str(staged.commit())
            clock.phase("save", t0)
    return _Written(path=written, changed=tuple(u.layer.initializer for u in updates),
                    parity_after=parity.to_dict(), rounding=rounding, rounding_effect=rounding_effect)


def _reload(loaded: LoadedModel, clock: _Clock) -> None:
    """The weights released while the loop ran (``_twin``), read from the file again
    before a model is written."""
    if loaded.released:
        t0 = time.perf_counter()
        with progress.phase(f"read the weights of {loaded.label} again"):
            loaded.restore_weights()
        clock.phase("reload", t0)


def _stage_edits(loaded: LoadedModel, updates, result, edits, out, protected, in_place):
    """The edited model written in full to a staged file (``io.stage_model``); returns
    it with the rounding records and the edits its parity is checked against (what was
    written: a requantised layer's change is not the float edit)."""
    from .metadata import edit_record
    from .writeback import write_back, written_edits

    new_model = write_back(loaded, updates, extra_provenance={
        "edits": len(result.edits), "layers": [u.layer.node for u in updates]})
    rounding = tuple({"initializer": r["initializer"], "node": r["node"], "dtype": r["dtype"],
                      **({"quant": r["quant"]} if "quant" in r else {}),
                      "aux_changed": [a["initializer"] for a in r.get("aux", [])], **r["rounding"]}
                     for r in edit_record(new_model)["tensors"])
    quantised = any(u.layer.quant is not None for u in updates)
    checked = written_edits(loaded.model, new_model, updates) if quantised else edits
    staged = stage_model(new_model, out, external_names=_external_names(loaded, new_model),
                         protected=protected, in_place=in_place)
    return staged, rounding, checked


def _save_unchanged(loaded: LoadedModel, out, protected, in_place, clock: _Clock) -> _Written:
    """Nothing needed changing: a pipeline step still finds its output."""
    t0 = time.perf_counter()
    if in_place and Path(out).resolve() == (protected[0] if protected else None):
        written = str(Path(out))  # the input is already the unchanged model: leave it alone
    else:
        _reload(loaded, clock)
        t0 = time.perf_counter()
        with progress.phase(f"save {out} (unchanged)"):
            written = str(save_model(loaded.model, out, external_names=_external_names(loaded, loaded.model),
                                     protected=protected, in_place=in_place))
    clock.phase("save", t0)
    log.info("nothing to change: every given pair already behaves like its clean twin; "
             "%s is the model unchanged", written)
    return _Written(path=written, unchanged=True)


def _write_edit_plot(path: Path, twin, loaded: LoadedModel, inputs: Inputs, result, edits, clock: _Clock) -> None:
    """Gather what the edit's plot shows (input attribution on the first given pairs
    before and after the edits, the layer scores of each round) and draw it (plot.py)."""
    from .figures import draw_edit_figure

    t0 = time.perf_counter()
    with progress.phase(f"plot {path}"):
        draw_edit_figure(path, twin, loaded.label, inputs.pairs.corrupt, inputs.pairs.clean, result, edits)
    clock.phase("plot", t0)


def _external_names(loaded: LoadedModel, new_model) -> set[str]:
    """Keep external what was external; a new initializer (from ConstantOfShape) joins
    them when the model used external data and it is large."""
    if not loaded.has_external_data:
        return set()
    names = set(loaded.external_names)
    old = {i.name for i in loaded.model.graph.initializer}
    for init in new_model.graph.initializer:
        if init.name not in old and init.ByteSize() >= 1024:
            names.add(init.name)
    return names


# --------------------------------------------------------------------------- revert


@dataclass(frozen=True)
class RevertOutcome:
    """What ``revert_model`` wrote: the restored model and the weights it restored."""

    path: str
    restored: tuple[str, ...]  # initializers given back their original values, as the edit record lists them

    def to_dict(self) -> dict:
        return {"path": self.path, "restored": list(self.restored)}


def revert_model(edited, out, *, in_place: bool = False) -> RevertOutcome:
    from .metadata import edit_record
    from .writeback import revert

    loaded = load_model(edited)
    check_output_path(out, loaded.protected_paths(), in_place=in_place)
    original = revert(loaded)
    restored = tuple(rec["initializer"] for rec in edit_record(loaded.model)["tensors"])
    path = save_model(original, out, external_names=loaded.external_names if loaded.has_external_data else None,
                      protected=loaded.protected_paths(), in_place=in_place)
    return RevertOutcome(path=str(path), restored=restored)


__all__ = ["edit_model", "locate_model", "revert_model", "EditOutcome", "LocateOutcome", "RevertOutcome",
           "CheckFailed"]
