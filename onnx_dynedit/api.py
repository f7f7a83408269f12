"""The pipeline behind `dynedit locate`, `dynedit edit` and `dynedit revert`.

  load -> twin (parity required) -> check data against the model -> key statistics ->
  locate / rectify -> write back into the original initializers -> ORT parity of the
  written model against the twin with the same edits -> atomic save -> report

Each function takes paths or loaded objects, returns a frozen result, and writes
nothing unless asked to (``out``); every user error is a DynEditError.
"""

from __future__ import annotations

import io as _io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import Pairs, Samples, check_against_input, check_labels, load_pairs, load_samples
from .errors import CheckFailed, DataError, EditError, InputError, OutputError
from .report import to_json
from .io import LoadedModel, atomic_write_bytes, check_output_path, load_model, save_model

log = logging.getLogger(__name__)


def _twin(loaded: LoadedModel, device):
    from .twin import Twin, check_parity, require_parity

    twin = Twin(loaded, device)
    if len(twin.inputs) != 1:
        raise DataError(
            f"{loaded.label} has {len(twin.inputs)} inputs ({', '.join(s.name for s in twin.inputs)}); "
            "editing supports single-input models",
            hint="several inputs would be given as arrays keyed '<key>:<input name>' in the npz; not supported yet",
        )
    check_finite_weights(loaded, twin)
    parity = check_parity(twin)
    require_parity(parity, loaded.label)
    return twin, parity


def check_finite_weights(loaded: LoadedModel, twin) -> None:
    """A model whose layer weights hold NaN/Inf is unusable input: say so instead of
    reporting a NaN parity or propagating NaN into the edit."""
    from .layers import constant_value

    graph = loaded.model.graph
    for layer in twin.layer_map.layers:
        for kind, name in (("weight", layer.initializer), ("bias", layer.bias)):
            if not name:
                continue
            value = constant_value(graph, name)
            if value is None or not np.issubdtype(value.dtype, np.floating):
                continue
            bad = int(np.count_nonzero(~np.isfinite(value.astype(np.float32, copy=False))))
            if bad:
                raise DataError(f"{loaded.label}: {kind} {name!r} of layer {layer.node!r} holds {bad} NaN/Inf "
                                "value(s)", hint="the model is broken; re-export it from a healthy checkpoint")


def _refuse_data_overwrite(outputs, data_inputs) -> None:
    """An output must never replace one of the .npz inputs (no --in-place for those)."""
    data = {Path(p).resolve(): p for p in data_inputs if p is not None}
    for out in outputs:
        if out is not None and Path(out).resolve() in data:
            raise OutputError(f"refusing to overwrite the input {data[Path(out).resolve()]} with an output",
                              hint="write the output to another path")


def _parity_after(twin, feeds_x: np.ndarray, new_model, edits):
    """ORT on the written model vs the twin with the same edits, on ``feeds_x``; a model
    with a fixed batch size is fed that many rows at a time (the worst chunk counts)."""
    from .twin import check_parity, ort_session_for

    spec = twin.inputs[0]
    batch = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    if batch is None:
        return check_parity(twin, {spec.name: feeds_x}, model=new_model, edits=edits)
    if len(feeds_x) < batch:
        reps = -(-batch // len(feeds_x))
        feeds_x = np.concatenate([feeds_x] * reps)
    worst = None
    session = ort_session_for(new_model)  # one session for every chunk
    for start in range(0, min(len(feeds_x), max(batch, 64)) - batch + 1, batch):
        parity = check_parity(twin, {spec.name: feeds_x[start:start + batch]}, model=new_model, edits=edits,
                              session=session)
        if worst is None or not (parity.max_rel_diff <= worst.max_rel_diff):
            worst = parity
    return worst


def _fit_input(twin, arr: np.ndarray, name: str) -> np.ndarray:
    spec = twin.inputs[0]
    return check_against_input(arr, name=name, input_name=spec.name, shape=list(spec.shape), dtype=spec.dtype)


def _num_classes(twin) -> int | None:
    shape = twin.outputs[0].shape if twin.outputs else ()
    last = shape[-1] if shape else None
    return last if isinstance(last, int) and last > 0 else None


@dataclass(frozen=True)
class Inputs:
    pairs: Pairs
    stats: Samples | None
    val: Samples | None


def read_inputs(pairs_path, stats_path=None, val_path=None) -> Inputs:
    """Read and check the .npz inputs on their own (before any model work: fail fast)."""
    pairs = load_pairs(pairs_path)
    stats = load_samples(stats_path, what="stats", labels="ignored") if stats_path is not None else None
    val = load_samples(val_path, what="val") if val_path is not None else None
    return Inputs(pairs=pairs, stats=stats, val=val)


def fit_inputs(twin, raw: Inputs) -> Inputs:
    """Check the inputs against the model's input (shape, dtype) and output (labels)."""
    p = raw.pairs
    pairs = Pairs(corrupt=_fit_input(twin, p.corrupt, f"pairs {p.source}: 'corrupt'"),
                  clean=_fit_input(twin, p.clean, f"pairs {p.source}: 'clean'"), source=p.source)
    stats = None
    if raw.stats is not None:
        s = raw.stats
        stats = Samples(x=_fit_input(twin, s.x, f"stats {s.source}: 'x'"), y=None, source=s.source)
    val = None
    if raw.val is not None:
        v = raw.val
        x = _fit_input(twin, v.x, f"val {v.source}: 'x'")
        if v.y is not None:
            n = _num_classes(twin) or int(twin.run(x[:1]).shape[-1])
            check_labels(v.y, n, name=f"val {v.source}: 'y'")
        val = Samples(x=x, y=v.y, source=v.source)
    return Inputs(pairs=pairs, stats=stats, val=val)


def load_inputs(twin, pairs_path, stats_path=None, val_path=None) -> Inputs:
    return fit_inputs(twin, read_inputs(pairs_path, stats_path, val_path))


# --------------------------------------------------------------------------- locate


@dataclass(frozen=True)
class LocateOutcome:
    model: str
    localisation: object = field(repr=False)
    stats_source: str = ""
    device: str = "cpu"

    def to_dict(self) -> dict:
        out = self.localisation.to_dict()
        out.update({"model": self.model, "stats_source": self.stats_source, "device": self.device})
        return out


def locate_model(model, pairs, *, stats=None, device=None, steps=None, target=None, key=None,
                 plot=None) -> LocateOutcome:
    import torch

    from .attribution import DEFAULT_STEPS, locate
    from .rank_one import key_statistics, too_wide

    loaded = load_model(model)
    if plot is not None:
        _refuse_data_overwrite([plot], [pairs, stats])
        check_output_path(plot, loaded.protected_paths())
    raw = read_inputs(pairs, stats)
    twin, _ = _twin(loaded, device)
    inputs = fit_inputs(twin, raw)
    layers = [layer for layer in twin.layer_map.editable() if not too_wide(layer)]
    if not layers:
        raise EditError(f"{loaded.label} has no editable layer")
    key_x = inputs.stats.x if inputs.stats is not None else inputs.pairs.clean
    source = f"stats ({len(key_x)} inputs)" if inputs.stats is not None else "clean twins of the pairs (no --stats)"
    torch.manual_seed(0)
    stats_ = key_statistics(twin, layers, key_x, source=source)
    loc = locate(twin, layers, inputs.pairs.corrupt, inputs.pairs.clean, stats_,
                 steps=steps or DEFAULT_STEPS, target=target or "corrupt_logit", key=key or "diff")
    if plot is not None:
        write_plot(loc, Path(plot), title=f"editability: {Path(loaded.label).name}")
    return LocateOutcome(model=loaded.label, localisation=loc, stats_source=source, device=str(twin.device))


def write_plot(loc, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = loc.in_graph_order
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(items) + 1.5), 3.2), dpi=120)
    names = [a.layer.node for a in items]
    scores = [a.score for a in items]
    chosen = loc.chosen.layer.node if loc.chosen else None
    colors = ["#d62728" if n == chosen else "#1f77b4" for n in names]
    ax.bar(range(len(items)), scores, color=colors)
    ax.set_xticks(range(len(items)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("editability score G")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- edit


@dataclass(frozen=True)
class EditOutcome:
    model: str
    output: str | None
    result: object = field(repr=False)
    parity_before: dict = field(default_factory=dict)
    parity_after: dict = field(default_factory=dict)
    changed: tuple[str, ...] = ()
    device: str = "cpu"
    inputs: dict = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return self.result.success

    def to_dict(self) -> dict:
        return {"model": self.model, "output": self.output, "success": self.success, "device": self.device,
                "inputs": self.inputs, "changed_initializers": list(self.changed),
                "parity_before": self.parity_before, "parity_after": self.parity_after,
                **self.result.to_dict()}


def edit_model(model, pairs, out=None, *, stats=None, val=None, layers=None, max_edits=None,
               max_degradation=None, target_gap=None, objective=None, augment=None, seed=None,
               device=None, in_place=False, report=None, **config) -> EditOutcome:
    """Rectify ``model`` from ``pairs`` and (when ``out`` is given) save the edited model.

    Keyword arguments left as None take the defaults of ``RectifyConfig``.
    """
    import torch

    from .rectify import RectifyConfig, rectify
    from .twin import require_parity
    from .writeback import write_back

    loaded = load_model(model)
    protected = loaded.protected_paths()
    _refuse_data_overwrite([out, report], [pairs, stats, val])
    if out is not None:
        check_output_path(out, protected, in_place=in_place)
    if report is not None:
        check_output_path(report, protected)
        if out is not None and Path(report).resolve() == Path(out).resolve():
            raise OutputError(f"--report {report} is the same file as -o {out}", hint="give the report its own name")
    raw = read_inputs(pairs, stats, val)
    twin, parity0 = _twin(loaded, device)
    inputs = fit_inputs(twin, raw)
    cfg = RectifyConfig().replace(layers=tuple(layers) if layers else None, max_edits=max_edits,
                                  max_degradation=max_degradation, target_gap=target_gap, objective=objective,
                                  augment=augment, seed=seed, **config)
    if cfg.layers:
        for name in cfg.layers:
            twin.layer_map.get(name)  # unknown names fail early with close matches
    torch.use_deterministic_algorithms(True, warn_only=True)
    result = rectify(twin, inputs.pairs.corrupt, inputs.pairs.clean,
                     stats_x=inputs.stats.x if inputs.stats else None,
                     val_x=inputs.val.x if inputs.val else None,
                     val_y=inputs.val.y if inputs.val else None, config=cfg)
    info = {"pairs": inputs.pairs.source, "n_pairs": inputs.pairs.n,
            "stats": inputs.stats.source if inputs.stats else None, "val": inputs.val.source if inputs.val else None}
    parity_after = {}
    changed: tuple[str, ...] = ()
    written = None
    if result.edits:
        updates = result.updates()
        new_model = write_back(loaded, updates, extra_provenance={
            "edits": len(result.edits), "layers": [u.layer.node for u in updates]})
        edits = [e.to_torch(twin.device) for e in result.edits]
        parity = _parity_after(twin, np.concatenate([inputs.pairs.corrupt, inputs.pairs.clean]), new_model, edits)
        require_parity(parity, f"{loaded.label} (edited)")
        parity_after = parity.to_dict()
        changed = tuple(u.layer.initializer for u in updates)
        if out is not None:
            written = str(save_model(new_model, out, external_names=_external_names(loaded, new_model),
                                     protected=protected, in_place=in_place))
    outcome = EditOutcome(model=loaded.label, output=written, result=result, parity_before=parity0.to_dict(),
                          parity_after=parity_after, changed=changed, device=str(twin.device), inputs=info)
    if report is not None:
        atomic_write_bytes(Path(report), (to_json(outcome.to_dict()) + "\n").encode())
    return outcome


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


def revert_model(edited, out, *, in_place: bool = False) -> str:
    from .writeback import revert

    loaded = load_model(edited)
    check_output_path(out, loaded.protected_paths(), in_place=in_place)
    original = revert(loaded)
    return str(save_model(original, out, external_names=loaded.external_names if loaded.has_external_data else None,
                          protected=loaded.protected_paths(), in_place=in_place))


__all__ = ["edit_model", "locate_model", "revert_model", "EditOutcome", "LocateOutcome", "CheckFailed"]
