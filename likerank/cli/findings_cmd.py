"""``likerank findings [RUN]``: what makes a good photo, as a ranked table and one sentence per
attribute (the report's "What makes a good photo" section; :mod:`likerank.report.findings`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from pipeline.core.config import Config

if TYPE_CHECKING:
    from likerank.report.findings import Findings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("findings", help="what makes a good photo: each visual attribute (face size, position, tilt, "
                                        "brightness, saturation, border, ...) against the label rate, ranked")
    p.add_argument("run", nargs="?", metavar="RUN", help="labels run (default: the published run)")
    p.add_argument("--model", metavar="RUN", help="model run whose test predictions are shown (default: "
                                                  "models/latest.json; 'none' for none)")
    p.add_argument("--truth", metavar="FILE", help="ground truth (post_id, quality[, visual_quality]; "
                                                   "`likerank sim truth` writes one): show the true effect beside "
                                                   "(default: training.truth_file)")
    p.add_argument("--bins", action="store_true", help="also print every attribute's bins")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(handler=findings)


def findings(args: argparse.Namespace, cfg: Config) -> int:
    from likerank.report.findings import findings_for_labels, load_truth_qualities
    from likerank.report.load import load_predictions
    from pipeline.core import keys
    from pipeline.core.published import published_run_id
    from pipeline.core.storage import open_storage
    from pipeline.core.tables import get_json, list_partitions, read_table

    storage = open_storage(cfg.storage)
    storage.check_root()
    run = args.run or published_run_id(storage)
    runs = list_partitions(storage, "labels")
    if run is None:
        print("likerank findings: no labels run published yet; name one: RUN (runs: "
              f"{', '.join(runs) or 'none'})", file=sys.stderr)
        return 2
    if run not in runs:
        print(f"likerank findings: labels run {run!r} has no partition at "
              f"{storage.uri(keys.labels_run(run) + '/')} (runs: {', '.join(runs) or 'none'})", file=sys.stderr)
        return 2
    labels = read_table(storage, "labels", [run]).to_pandas()
    if labels.empty:
        print(f"likerank findings: labels run {run!r} has no rows", file=sys.stderr)
        return 1

    model = None if args.model == "none" else (args.model or (get_json(storage, keys.LATEST_MODEL) or {}).get("run_id"))
    predictions, predictions_why = (None, "no model run") if model is None else load_predictions(storage, model, labels)
    truth_path = args.truth or cfg.training.truth_file
    truth = None
    if truth_path:
        try:
            truth = load_truth_qualities(truth_path)
        except (OSError, ValueError) as exc:
            print(f"likerank findings: {exc}", file=sys.stderr)
            return 2
    result = findings_for_labels(storage, labels, labels_run=run, predictions=predictions,
                                 model_run=model if predictions is not None else None,
                                 truth=truth, truth_name=str(truth_path or ""))
    if predictions is None and model is not None:
        result.notes.append(f"model run {model}: {predictions_why}")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_findings(result, bins=args.bins))
    return 0


def format_findings(f: Findings, *, bins: bool = False) -> str:
    """The ranked table, then one sentence per attribute (and every bin with ``bins``)."""
    from likerank.report.findings import ASSOCIATION_NOTE

    lines = [f"What makes a good photo: labels run {f.labels_run}, {f.n_labeled:,} labeled photos, "
             f"{f.overall_rate:.0%} positive" + (f"; model run {f.model_run}" if f.model_run else ""),
             f"Chi-square test of bin x label per attribute; p {f.correction}-adjusted over {f.tested} attributes; "
             f"significant below {f.alpha:g}.", ASSOCIATION_NOTE, ""]
    header = f"{'#':>2}  {'attribute':<34}{'n':>7}{'bins':>5}{'spread':>8}{'V':>7}{'p (Holm)':>10}  significant"
    if f.truth:
        header += "  true spread"
    lines.append(header)
    for a in f.attributes:
        v = f"{a.cramers_v:.3f}" if a.cramers_v is not None else "—"
        p = f"{a.p_holm:.2g}" if a.p_holm is not None else "—"
        spread = f"{a.spread:.2f}" if a.spread is not None else "—"
        sig = "yes" if a.significant else ("no" if a.p_holm is not None else "untested")
        row = f"{a.rank:>2}  {a.title:<34}{a.n:>7,}{len(a.bins):>5}{spread:>8}{v:>7}{p:>10}  {sig:<11}"
        if f.truth:
            row += f"  {a.true_spread:.2f}" if a.true_spread is not None else "  —"
        lines.append(row.rstrip())
    lines += ["", "Findings:"]
    for a in f.attributes:
        lines.append(f"{a.rank:>2}. {a.sentence}")
        if a.planted:
            lines.append(f"    simulator: {a.planted}")
    if bins:
        lines += ["", "Bins (label rate and mean predicted p with 95 % intervals"
                  + (f"; mean true {f.truth_column}" if f.truth else "") + "):"]
        for a in f.attributes:
            lines.append(f"  {a.title}")
            for b in a.bins:
                row = (f"    {b.label:<26}n {b.n:>6,}  rate {b.rate:.2f} [{b.rate_low:.2f}, {b.rate_high:.2f}]")
                if b.prob is not None:
                    ci = f" [{b.prob_low:.2f}, {b.prob_high:.2f}]" if b.prob_low is not None else ""
                    row += f"  p {b.prob:.2f}{ci} (n {b.n_pred:,})"
                if b.true_quality is not None:
                    row += f"  true {b.true_quality:+.2f}"
                lines.append(row)
    if f.notes:
        lines += [""] + [f"note: {n}" for n in f.notes]
    return "\n".join(lines)
