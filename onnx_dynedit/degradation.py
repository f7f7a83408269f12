"""What an edit costs on inputs it was not fitted on: the degradation budget's measure.

``Reference``: the inputs the budget is checked on, with labels or without, and where they
come from (val, a held-out share of the stats, the stats in-sample, or the clean twins);
``rectify.make_plan`` picks them. ``Degradation``: the measure on them, of one set of edits
or of many trials at once (``recorded_logits``: each trial recomputes only what follows
its layer, from one recording of the values upstream).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import memory
from .bounds import CONFIDENCE, inputs_needed, upper_bound
from .layers import Layer
from .rank_one import ACTIVATION_BUDGET, TorchEdit
from .twin import DownstreamRunner, Twin
from .verify import output_shifts

SCREEN_CACHE_BUDGET = ACTIVATION_BUDGET  # bytes of upstream values a recording of many trials may keep
SHIFT_WEIGHT = 2.0      # unlabeled degradation on stats: at least this x the mean output shift (Degradation)
FRESH_SHIFT_WEIGHT = 0.5  # the same on unlabeled val, inputs the model did not learn (Degradation)


@dataclass(frozen=True)
class Reference:
    """The inputs the degradation budget is checked on."""

    x: np.ndarray
    y: np.ndarray | None
    source: str   # "val", "held-out stats", "stats" or "clean twins"
    kind: str     # what the number means, for the report
    shift_weight: float = SHIFT_WEIGHT  # unlabeled: the degradation is at least this x the mean output shift

    @property
    def count(self) -> int:
        return len(self.x)


class Degradation:
    """Degradation of a set of edits against the shipped model on the reference inputs:
    with labels, the accuracy drop; without, the share of inputs whose top-1 class changed,
    or the reference's ``shift_weight`` x their mean output shift where that is larger (the
    total-variation distance between the shipped and the edited class probabilities:
    ``verify.output_shifts``). Stats are often the model's own training images, predicted
    too confidently for a top-1 change to show, and their outputs move less than fresh
    inputs' (3.6-11x less on the rebuilt samples): on deep_blend and resnet_blend rebuilt
    with seeds 0 and 4, edits that cost 2.2 points of held-out accuracy changed none of 50
    held-out stats inputs' top-1 classes and shifted their outputs by 0.89 and 0.66 %,
    where every edit that cost at most 1.4 points shifted them by at most 0.25 %: on stats
    the weight is SHIFT_WEIGHT (2). Unlabeled val is fresh inputs, whose outputs move that
    much more: FRESH_SHIFT_WEIGHT (0.5; at 2, 171 of 260 pinned edits that cost at most 0.5
    point were refused on val: bench_degradation.py). docs/results.md, "The degradation check on
    memorised stats" and "... on unlabeled val"."""

    def __init__(self, twin: Twin, ref: Reference):
        self.twin, self.ref = twin, ref
        self.base_logits = twin.run(ref.x)
        self.base_pred = self.base_logits.argmax(1)
        self.base_acc = float((self.base_pred == ref.y).mean()) if ref.y is not None else None
        self._measured: dict[tuple, dict] = {}  # the parts of every set of edits measured, by their factors

    def __call__(self, edits) -> float:
        return self._measure(edits, self.logits(edits))

    def _measure(self, edits, logits: np.ndarray) -> float:
        parts = self._measured[_fingerprint(edits)] = self.parts(logits)
        return self.of_parts(parts)

    def measured_parts(self, edits) -> dict:
        """``parts`` of ``edits`` as measured when they were tried, else from a run now."""
        parts = self._measured.get(_fingerprint(edits))
        return parts if parts is not None else self.parts(self.logits(edits))

    def logits(self, edits) -> np.ndarray:
        with self.twin.applied(edits):
            return self.twin.run(self.ref.x)

    def many(self, prev, trials) -> list[float]:
        """``self(prev + [t])`` of every trial ``t``, each recomputing only what follows
        its layer (``recorded_logits``)."""
        logits = recorded_logits(self.twin, prev, trials, self.ref.x)
        if logits is None:
            return [self(prev + [t]) for t in trials]
        return [self._measure(prev + [t], a) for a, t in zip(logits, trials)]

    def parts(self, logits: np.ndarray) -> dict:
        """What the degradation of edits with these reference ``logits`` is made of, and
        how many inputs changed class (``changed``) or, with labels, went from right to
        wrong (``lost``)."""
        pred = logits.argmax(1)
        shift = float(output_shifts(self.base_logits, logits).mean()) if len(logits) else 0.0
        changed = pred != self.base_pred
        out = {"changed_predictions": float(changed.mean()), "output_shift": shift, "changed": int(changed.sum())}
        if self.ref.y is not None:
            out["accuracy_drop"] = self.base_acc - float((pred == self.ref.y).mean())
            out["lost"] = int((changed & (self.base_pred == self.ref.y)).sum())
        return out

    def turned(self, parts: dict) -> int:
        """How many reference inputs edits with these ``parts`` turn from right to wrong
        (with labels) or move to another class (without)."""
        return parts.get("lost" if self.ref.y is not None else "changed", 0)

    def of(self, logits: np.ndarray) -> float:
        return self.of_parts(self.parts(logits))

    def of_parts(self, parts: dict) -> float:
        if self.ref.y is not None:
            return parts["accuracy_drop"]
        return max(parts["changed_predictions"], self.ref.shift_weight * parts["output_shift"])


def bound_line(turned: int, count: int, source: str, labelled: bool, budget: float) -> str:
    """The report's sentence on what ``count`` degradation inputs from ``source``, of which
    the edits turned ``turned`` (``Degradation.turned``), vouch for: ``upper_bound``; where
    that is more than ``budget``, how many inputs would vouch for it with none turned."""
    bound = upper_bound(turned, count)
    verb = "turned from right to wrong" if labelled else "moved to another class"
    line = (f"degradation inputs: {count} ({source}), {turned} {verb} by the kept edits: at {CONFIDENCE:.0%} "
            f"confidence at most {bound:.2%} of inputs like them are")
    if 0 < budget < 1 and bound > budget:
        need = inputs_needed(budget)
        line += f", more than the {budget:.2%} budget (with none {verb.split()[0]}, about {need} inputs would vouch for it)"
    return line


def _fingerprint(edits) -> tuple:
    """What identifies a set of edits: each one's layer, view and factors, bit for bit."""
    return tuple((e.layer.node, e.view, e.u.detach().cpu().numpy().tobytes(), e.d.detach().cpu().numpy().tobytes())
                 for e in edits)


def recorded_logits(twin: Twin, prev: list[TorchEdit], trials: list[TorchEdit],
                    x: np.ndarray) -> list[np.ndarray] | None:
    """Every trial's logits on ``x`` with ``prev + [t]`` applied: the values upstream of
    every trial's layer are recorded once (``DownstreamRunner``) and each trial recomputes
    only what follows its layer. The recording keeps at most SCREEN_CACHE_BUDGET: when the
    inputs' recording is larger (real-size inputs: ResNet-50 at 224x224 keeps 46 MiB per
    input), they are recorded and scored a chunk of inputs at a time. None where nothing
    can be recorded (a model with several inputs, no trials): run each trial whole."""
    if len(twin.inputs) != 1 or not trials or not len(x):
        return None
    layers = list({t.layer.node: t.layer for t in trials}.values())
    per_input = recording_bytes(twin, prev, layers, x[:1])
    if not per_input:
        return None
    chunk = max(1, SCREEN_CACHE_BUDGET // per_input)
    logits = [[] for _ in trials]
    for lo in range(0, len(x), chunk):
        for out, part in zip(logits, _recorded_chunk(twin, prev, trials, layers, x[lo:lo + chunk])):
            out.append(part)
    return [np.concatenate(parts) for parts in logits]


def _recorded_chunk(twin: Twin, prev: list[TorchEdit], trials: list[TorchEdit], layers: list[Layer],
                    x: np.ndarray) -> list[np.ndarray]:
    """Every trial's logits on ``x``, from one recording of the values upstream of ``layers``."""
    rows = twin.pass_rows(x[:1])
    with torch.no_grad(), twin.applied(prev):
        runner = DownstreamRunner(twin, layers, twin.to_tensor(x), rows=rows)
    logits = []
    for t in trials:
        with torch.no_grad(), twin.applied(prev + [t]):
            logits.append(np.concatenate([runner(slice(i, i + rows), layer=t.layer).double().cpu().numpy()
                                          for i in range(0, runner.n_rows, rows)]))
    del runner
    memory.trim()
    return logits


def recording_bytes(twin: Twin, prev: list[TorchEdit], layers: list[Layer], x1: np.ndarray) -> int:
    """Bytes per input of a recording of the values upstream of ``layers``."""
    with torch.no_grad(), twin.applied(prev):
        return DownstreamRunner.row_bytes(twin, layers, twin.to_tensor(x1))
