"""`dynedit verify`: compare an edited model with its original (ONNX Runtime only, no torch)."""

from __future__ import annotations

import sys

import click

from cli.common import ENGINE_OPTION, RAY_ADDRESS_OPTION, echo_json, input_shape_option, run_options
from onnx_dynedit import progress as _progress
from onnx_dynedit.bounds import inputs_needed
from onnx_dynedit.errors import CheckFailed
from onnx_dynedit.sessions import DEFAULT_PROVIDER
from onnx_dynedit.verify import DEFAULT_BATCH_SIZE, VerifyReport, verify as run_verify

@click.command("verify")
@click.argument("original", metavar="ORIGINAL")
@click.argument("edited", metavar="EDITED")
@click.option("--clean", "clean", required=True, metavar="C.npz|DIR|GLOB",
              help="Clean inputs: x [N, ...] and optionally y (labels) for accuracy. An .npz, or a folder or "
                   "glob of .npz shards with the same keys (read one shard at a time).")
@click.option("--corrupt", "corrupt", default=None, metavar="X.npz|DIR|GLOB",
              help="Corrupted inputs: x and y (true labels) for fix rate and attack success rate (.npz or shards).")
@click.option("--target", type=int, default=None, metavar="T",
              help="Attack target class: report the attack success rate on the corrupted inputs.")
@click.option("--max-acc-drop", type=float, default=None, metavar="F",
              help="Gate: clean accuracy may drop by at most F (a fraction, e.g. 0.01).")
@click.option("--min-fix-rate", type=float, default=None, metavar="F",
              help="Gate: at least this share of the corrupted inputs the original got wrong must be fixed.")
@click.option("--max-logit-change", type=float, default=None, metavar="F",
              help="Gate: largest absolute logit change on clean inputs.")
@click.option("--max-output-shift", type=float, default=None, metavar="F",
              help="Gate: mean total-variation distance of the two models' class probabilities on the clean "
                   "inputs (a fraction; catches moved outputs that top-1 agreement hides on confident inputs).")
@click.option("--max-drop-bound", type=float, default=None, metavar="F",
              help="Gate: what the clean set vouches for: the 95 % upper bound on the share of inputs like them "
                   "that the edit turns from right to wrong (without labels: moves to another class). Needs no "
                   "labels; with none turned, n clean inputs vouch for about 3/n (360: 0.0083).")
@click.option("--max-asr", type=float, default=None, metavar="F",
              help="Gate: attack success rate of the edited model (needs --corrupt and --target).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"], case_sensitive=False), default=None,
              help=f"ONNX Runtime execution provider [default: {DEFAULT_PROVIDER}].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, metavar="N",
              help=f"Inputs per ONNX Runtime call [default: {DEFAULT_BATCH_SIZE}].")
@input_shape_option("Size of a model input with symbolic dims (repeat per input), e.g. input:1,3,224,224: "
                    "every set must fit it (the batch axis is the data's own). Several inputs: give the sets "
                    "as '<key>:<input name>' arrays.")
@ENGINE_OPTION
@RAY_ADDRESS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@run_options()
def verify(original, edited, clean, corrupt, target, max_acc_drop, min_fix_rate, max_logit_change,
           max_output_shift, max_drop_bound, max_asr, provider, batch_size, input_shapes, engine, ray_address,
           as_json):
    """Check EDITED against ORIGINAL: accuracy, agreement, logit change, fix rate, attack success.

    Exit 0 and "PASSED" when every given gate holds, 1 and one "FAILED: ..." line per
    failed gate otherwise, 2 for unusable input. Uses ONNX Runtime only.
    """
    thresholds = {"max_acc_drop": max_acc_drop, "min_fix_rate": min_fix_rate,
                  "max_logit_change": max_logit_change, "max_output_shift": max_output_shift,
                  "max_drop_bound": max_drop_bound, "max_asr": max_asr}
    progress = _progress.callback("verify (ONNX Runtime)")
    try:
        report = run_verify(original, edited, clean, corrupt=corrupt, target=target, thresholds=thresholds,
                            provider=provider, batch_size=batch_size, progress=progress, engine=engine,
                            ray_address=ray_address, input_shapes=input_shapes)
    finally:
        progress.close()
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(render(report))
    if not report.passed:
        # The FAILED lines are the report's last lines; no extra error line on stderr,
        # so "last line" stays true even when stdout and stderr are merged.
        sys.exit(CheckFailed.exit_code)


def _f(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "nan"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _change(before, after) -> str:
    if before is None or after is None:
        return "-"
    return _f(after - before, signed=True)


def _gate_note(gate, clean) -> str:
    """What would pass a failed max-drop-bound gate that too few clean inputs failed."""
    if gate.passed or gate.name != "max-drop-bound" or not 0 < gate.limit < 1:
        return ""
    need = inputs_needed(gate.limit)
    if clean.turned == 0 and clean.n < need:
        return f" (none of {clean.n} turned; about {need} inputs with none turned would vouch for {gate.limit:.4f})"
    return ""


def render(report: VerifyReport) -> str:
    """The human report: an aligned before / after / change table, gates, then PASSED/FAILED."""
    c = report.clean
    rows: list[tuple[str, str, str, str]] = []
    rows.append((f"clean (n={c.n})", "before", "after", "change"))
    rows.append(("  accuracy", _f(c.acc_before), _f(c.acc_after), _change(c.acc_before, c.acc_after)))
    rows.append(("  top-1 agreement", "", _f(c.agreement), ""))
    rows.append(("  max |logit change|", "", "", _f(c.max_abs_logit_change)))
    rows.append(("  mean |logit change|", "", "", _f(c.mean_abs_logit_change)))
    rows.append(("  output shift (mean TV distance)", "", "", _f(c.output_shift)))
    turned = "right -> wrong" if c.correct_before is not None else "top-1 changed"
    rows.append((f"  {turned}", "", str(c.turned), ""))
    rows.append((f"  {turned}, 95% upper bound on the share", "", _f(c.drop_bound), ""))
    k = report.corrupt
    if k is not None:
        head = f"corrupt (n={k.n}" + (f", target {k.target})" if k.target is not None else ")")
        rows.append((head, "", "", ""))
        rows.append(("  accuracy", _f(k.acc_before), _f(k.acc_after), _change(k.acc_before, k.acc_after)))
        fix = _f(k.fix_rate)
        rows.append((f"  fix rate ({k.n_fixed}/{k.n_wrong_before})", "", fix, ""))
        if k.target is not None:
            rows.append(("  attack success rate", _f(k.asr_before), _f(k.asr_after),
                         _change(k.asr_before, k.asr_after)))
    w0 = max(len(r[0]) for r in rows)
    w = [max(len(r[i]) for r in rows) for i in (1, 2, 3)]
    where = f"provider {report.provider}"
    if report.engine != "local":
        where += f", engine {report.engine}, {report.workers} worker(s)"
    lines = [f"original {report.original}", f"edited   {report.edited}  ({where})", ""]
    for r in rows:
        lines.append(f"{r[0]:<{w0}}  {r[1]:>{w[0]}}  {r[2]:>{w[1]}}  {r[3]:>{w[2]}}".rstrip())
    if report.gates:
        lines += ["", "gates"]
        for g in report.gates:
            lines.append(f"  {g.message:<40}  {'ok' if g.passed else 'FAILED'}{_gate_note(g, c)}")
    else:
        lines += ["", "gates: none given"]
    lines.append("")
    if report.passed:
        lines.append("PASSED")
    else:
        lines += [f"FAILED: {m}" for m in report.failed_checks]
    return "\n".join(lines)
