import sys

import click

from cli.common import (DEVICE_OPTION, ENGINE_OPTION, INPUT_SHAPE_OPTION, RAY_ADDRESS_OPTION, SEED, FiniteFloat,
                        Numbers, config_option, echo_json, run_options, table)
from onnx_dynedit.api import edit_model
from onnx_dynedit.options import CHOICES


def augment_default() -> str:
    """--augment's default in words: the library picks it from the pairs (read only for --help)."""
    from onnx_dynedit.rectify import AUGMENT, AUGMENT_WIDE

    return (f"{AUGMENT_WIDE} when 2+ pairs change most of each input, as a blend does, and the inputs are small "
            f"(not 224x224), else {AUGMENT}")


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--pairs", required=True, type=click.Path(dir_okay=False),
              help="npz with arrays 'corrupt' and 'clean' [N, ...] (N >= 1).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Edited model to write.")
@click.option("--stats", type=click.Path(), default=None, metavar="S.npz|DIR|GLOB",
              help="npz with 'x': unlabeled clean inputs (key statistics, locality, augmentation); or a folder / "
                   "glob of .npz shards: the key statistics stream over every shard, the rest uses the first.")
@click.option("--val", type=click.Path(), default=None, metavar="V.npz|DIR|GLOB",
              help="npz with 'x' and optional int labels 'y' for the degradation budget (or a folder / glob of shards).")
@click.option("--layer", "layers", multiple=True, help="Pin the layer(s) to edit (node or weight name); skips localisation.")
# The method's options: the values they take and their defaults live in the library
# (RectifyConfig, options.py); a bad value is the library's one-line error (exit 2).
@config_option("--max-edits", field="max_edits", type=int, help="Most rank-one edits to accept (default {default}).")
@config_option("--max-degradation", field="max_degradation", type=FiniteFloat(),
               help="Budget, checked on inputs the fit never used (val, else held-out stats): the accuracy "
                    "drop on labelled val; without labels the share of changed predictions, or a multiple "
                    "of the mean output shift where larger (default {default}).")
@config_option("--criterion", field="criterion", type=click.Choice(CHOICES["criterion"]),
               help="What 'behaves like its clean twin' means: the output gap (output: Trojans, spurious features), "
                    "the share of input attribution on the region where the pair differs (attribution: feature "
                    "leakage), or auto: attribution when the pairs' outputs already agree (default {default}).")
@config_option("--target-gap", field="target_gap", type=FiniteFloat(),
               help="Stop when every pair's top-1 matches its clean twin and the mean TV distance is below this "
                    "(default {default}).")
@config_option("--target-attribution", field="target_attribution", type=FiniteFloat(),
               help="Attribution criterion: stop when the share of attribution on the differing region, in excess "
                    "of the clean twin's, is below this (default {default}).")
@config_option("--objective", field="objective", type=click.Choice(CHOICES["objective"]),
               help="Fit u on the network output (output), closed form at the layer (local), or erase the edit direction "
                    "from the layer's keys, a Conv in its pixel view (erase: u = -W d/|d|^2) (default {default}).")
@config_option("--conv-keys", field="conv_keys", type=click.Choice(CHOICES["conv_keys"]),
               help="Conv edits: rank one over unfolded patches (patch), one channel direction at every kernel tap "
                    "(pixel: carries a colour-like confound; rank up to the taps in the patch view), or both views "
                    "as candidates (default {default}).")
@config_option("--augment", field="augment", type=int, default_of=augment_default,
               help="Synthetic pairs made by transplanting corrupt-clean onto stats inputs (default {default}; 0 = off).")
@config_option("--strengths", field="strengths", type=Numbers(), metavar="A,B,...",
               help="The synthetic and check pairs carry the pairs' corruption at these strengths in turn "
                    "(x + a (x~ - x)), e.g. 1,1.5,0.75,1.25 to also repair a trigger stronger or fainter than "
                    "the one given (default {default}).")
@config_option("--check-pairs", field="check_pairs", type=int,
               help="Synthetic pairs held out from the fit that pick which candidate edit each round keeps "
                    "(default {default}; 0 = keep the first candidate that passes).")
@config_option("--check-candidates", field="check_candidates", type=int,
               help="Layers fitted per round when check pairs decide, best localised first "
                    "(default {default} = every editable layer; smaller is faster on deep models).")
@config_option("--check-target", field="check_target", type=FiniteFloat(),
               help="Past the target, go on editing while the check pairs' mean TV distance exceeds this, keeping "
                    "an edit only when it cuts that distance by 30 % (default {default}; 1 = stop at the target).")
@config_option("--seed", field="seed", type=SEED, help="Seed (default {default}).")
@DEVICE_OPTION
@INPUT_SHAPE_OPTION
@ENGINE_OPTION
@RAY_ADDRESS_OPTION
@click.option("--in-place", is_flag=True, help="Allow -o to be the input model (a .bak copy is kept).")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write the full report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: the first given pairs, their input attribution before and after, the layer scores "
                   "of each round.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON only.")
@click.option("--all-steps", is_flag=True,
              help="List every trial, the layers a round's screen left out too (by default one row per screen).")
@run_options()
def edit(model, pairs, out, stats, val, layers, max_edits, max_degradation, criterion, target_gap, target_attribution,
         objective, conv_keys, augment, strengths, check_pairs, check_candidates, check_target, seed, device,
         input_shapes, engine, ray_address, in_place, report, plot, as_json, all_steps):
    """Repair MODEL so that each corrupted input behaves like its clean twin; write OUT.

    Exit 0 when every pair is fixed within budget (OUT is always written then: the model
    unchanged when no edit was needed), 1 when the target was not reached (the best
    accepted edits are still written if there are any), 2 for unusable input.
    """
    outcome = edit_model(model, pairs, out, stats=stats, val=val, layers=layers or None, max_edits=max_edits,
                         max_degradation=max_degradation, target_gap=target_gap, objective=objective,
                         conv_keys=conv_keys, augment=augment, strengths=strengths, check_pairs=check_pairs,
                         check_candidates=check_candidates, check_target=check_target, criterion=criterion,
                         target_attribution=target_attribution, seed=seed,
                         device=device, in_place=in_place, report=report, plot=plot, engine=engine,
                         ray_address=ray_address, input_shapes=input_shapes)
    if outcome.output_unchanged:
        click.echo(f"dynedit: nothing to change (every given pair already behaves like its clean twin); "
                   f"{outcome.output} is the model unchanged", err=True)
    if as_json:
        echo_json(outcome.to_dict())
    else:
        _print_report(outcome, all_steps)
    sys.exit(0 if outcome.success else 1)


def _print_report(outcome, all_steps: bool = False) -> None:
    """The text report: one row per trial (``step_rows``), then the summary lines and PASSED / FAILED."""
    res = outcome.result
    rows = step_rows(res, all_steps)
    if rows:
        click.echo(table(rows, ["step", "layer", "score", "gap before", "gap after", "fixed", "degradation", "decision"]))
    gap_name = ("attribution share on the differing region" if res.criterion == "attribution"
                else "output TV distance")
    click.echo(f"criterion: {res.criterion} (gap = {gap_name})")
    click.echo(f"pairs: {res.n_real_pairs} given + {res.n_pairs - res.n_real_pairs} synthetic; "
               f"key statistics from {res.stats_source}; degradation = {res.degradation_kind}")
    click.echo(f"gap {res.gap_before:.4f} -> {res.gap_after:.4f}; fixed {res.fixed_before} -> {res.fixed_after} of "
               f"{res.n_pairs}; degradation {res.degradation:.4f} (changed predictions {res.changed_predictions:.4f}, "
               f"output shift {res.output_shift:.4f}); {len(res.edits)} edit(s); stopped: {res.stopped_because}")
    if res.bound_line:
        click.echo(res.bound_line)
    if res.check_line:
        click.echo(res.check_line)
    click.echo(f"given pairs: {res.real_fixed_after}/{res.n_real_pairs} classified like their clean twin"
               f"{res.unfixed_rows}; gap {res.real_gap_before:.4f} -> {res.real_gap_after:.4f} (target {res.target})")
    if outcome.parity_after:
        click.echo(f"written-model parity (ONNX Runtime vs edited twin): max rel {outcome.parity_after['max_rel_diff']:.3g}")
    for r in outcome.rounding:
        if r["dtype"] in ("float32", "float64"):
            continue
        extra = ""
        if "quant" in r:
            kept = "kept" if r["scale_kept"] else f"recomputed for {r['rescaled_groups']}/{r['groups']} group(s)"
            extra = f"; scale {kept}"
            if r["clipped"]:
                extra += f"; {r['clipped']} value(s) clipped (shared scale)"
            if r["aux_changed"]:
                extra += f"; also changed: {', '.join(r['aux_changed'])}"
        click.echo(f"written as {r['dtype']}: {r['initializer']}: max rounding {r['max_abs_rounding_error']:.3g} "
                   f"({r['rel_rounding_error']:.2%} of max |edit|){extra}")
    if outcome.rounding_effect:
        click.echo(f"rounding effect (ONNX Runtime on the written model vs the float edit on the twin): "
                   f"max |logit change| {outcome.rounding_effect['max_abs_logit_change']:.3g}")
    if outcome.output_unchanged:
        click.echo(f"wrote {outcome.output} (unchanged: no edit needed)")
    else:
        click.echo(f"wrote {outcome.output}" if outcome.output else "nothing written (no edit accepted)")
    if outcome.plot:
        click.echo(f"plot written to {outcome.plot}")
    click.echo("PASSED" if outcome.success else
               f"FAILED: target not reached within the edit and degradation budgets ({res.failure})")
    if res.suggests_more_edits:
        click.echo(f"hint: every given pair is classified like its clean twin; only their gap is above the target "
                   f"after the {res.config.max_edits} edit(s) --max-edits allows: a larger one (e.g. "
                   f"{res.config.max_edits + 2}) may reach it")
    if res.suggests_erase:
        click.echo("hint: the pairs look like a re-colouring (each channel of the clean input scaled): a feature to "
                   "remove rather than an output to match; try --objective erase")


def _runs(steps, all_steps: bool) -> list[list]:
    """The steps in order, cut into runs: each trial alone, except consecutive trials a
    round's screen left out (one run each round), unless ``all_steps``."""
    runs: list[list] = []
    for s in steps:
        if not all_steps and s.screened and runs and runs[-1][-1].screened:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def step_rows(res, all_steps: bool = False) -> list[list]:
    """One row per trial; the trials a round's screen left out in one row per round,
    unless ``all_steps``."""
    rows = []
    for run in _runs(res.steps, all_steps):
        s = run[0]
        if len(run) == 1:
            rows.append([s.step, s.node, "-" if s.score is None else f"{s.score:.4g}", f"{s.gap_before:.4f}",
                         f"{s.gap_after:.4f}", f"{s.fixed_after}/{res.n_pairs}", f"{s.degradation:.4f}", s.reason])
            continue
        over = sum(1 for t in run if t.degradation > res.config.max_degradation)  # NaN: not measured
        rows.append([f"{s.step}-{run[-1].step}", f"{len(run)} layers (--all-steps lists them)", "-",
                     f"{s.gap_before:.4f}", f"{min(t.gap_after for t in run):.4f}",
                     f"{max(t.fixed_after for t in run)}/{res.n_pairs}", "-",
                     f"{s.reason.split(' (')[0]}: {over} over the degradation budget, {len(run) - over} ranked "
                     "behind the kept ones on the check pairs"])
    return rows
