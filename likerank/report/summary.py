"""The one-screen summary ``make run`` ends with: the funnel, the validation verdict, label
and model quality, where every table lives and a query to try next."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import keys
from pipeline.core.config import Config
from pipeline.core.truth import coverage_line


def _fmt(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v) or "none"


def summary(cfg: Config, truth: Path | None = None) -> str:
    """One screen: the funnel, the verdict, the model, where everything lives, a query to try."""
    from pipeline.core.labels_run import read_labels_run
    from pipeline.core.published import published_run_id
    from pipeline.core.query import run_query
    from pipeline.core.schemas import TABLES
    from pipeline.core.storage import open_storage
    from pipeline.core.tables import get_json

    storage = open_storage(cfg.storage)

    def one(sql: str) -> list[dict]:
        return run_query(storage, sql).to_pylist()

    lines = ["== likerank: the funnel =="]
    seen: dict[str, int] = {}
    skipped: dict[str, dict[str, int]] = {}
    for key in storage.list(keys.scrape_runs()):
        scrape_run = get_json(storage, key)
        source = scrape_run.get("source", "mastodon")
        seen[source] = seen.get(source, 0) + scrape_run["seen"]
        for reason, n in scrape_run["skipped"].items():
            skipped.setdefault(source, {})[reason] = skipped.get(source, {}).get(reason, 0) + n
    posts = {r["source"]: r["n"] for r in one("select source, count(distinct post_id) n from posts group by 1")}
    lines.append(f"  posts read            {sum(seen.values()):>7}")
    for source in sorted(seen):  # each platform on its own line: the funnels differ
        lines.append(f"    {source:<19} {seen[source]:>7}   skipped: {_fmt(skipped.get(source, {}))}")
    lines.append(f"  posts stored          {sum(posts.values()):>7}   ({_fmt(posts)})")
    dl = {r["status"]: r["n"] for r in one("select status, count(*) n from downloads group by 1")}
    lines.append(f"  image downloads       {sum(dl.values()):>7}   ({_fmt(dl)})")
    refused = {r["opt_out_reason"]: r["n"] for r in one(
        "select opt_out_reason, count(*) n from downloads where opt_out_reason is not null group by 1")}
    lines.append(f"    refused by the host {sum(refused.values()):>7}   ({_fmt(refused) if refused else 'none'}: "
                 "X-Robots-Tag noai, robots.txt, TDM reservations)")
    faces = one("""select case when status <> 'ok' then status when n_faces = 0 then 'no face'
                   when n_faces = 1 then 'one face' else 'several faces' end k, count(*) n
                   from (from faces qualify row_number() over (partition by sha256 order by detected_at desc) = 1)
                   group by 1""")  # the latest detection per image: failed ones are retried in new rows
    lines.append(f"  images with faces     {sum(r['n'] for r in faces if r['k'] in ('one face', 'several faces')):>7}"
                 f"   ({_fmt({r['k']: r['n'] for r in faces})})")
    run = published_run_id(storage)
    if run:
        record = read_labels_run(storage, run)
        summ = record.record
        lines.append(f"  labeled posts         {summ['rows_out']:>7}   in {summ['groups']} groups of "
                     f"{record.group_size}; dropped: {_fmt(summ['dropped'])}")
        spans = (summ.get("group_exposure") or {}).get("per_source", {})
        for source, counts in sorted(record.sources.items()):  # groups never mix sources
            span = spans.get(source)
            lines.append(f"    {source or '(no source)':<19} {counts['rows_out']:>7}   in {counts['groups']} groups"
                         + (f"; exposure span (max/min) top group {span['top_group_span']:.1f}x, "
                            f"median {span['median_span']:.1f}x" if span else ""))
        warning = (summ.get("group_exposure") or {}).get("warning")
        if warning:
            lines.append(f"  warning: {warning}")
        docs = [k for k in storage.list(keys.validation_run(run) + "/") if k.endswith("index.html")]
        lines.append("\n== validation (Great Expectations) ==")
        lines.append(f"  passed and published: labels run {run}")
        if docs:
            lines.append(f"  Data Docs: {storage.uri(docs[0])}")
        if truth is not None:
            from labeling.evaluate import evaluate_run
            from pipeline.core.truth import load_truth

            ev = evaluate_run(cfg, run, load_truth(truth), storage)
            lines.append("\n== label quality against the simulator's hidden truth (ROC-AUC, face posts) ==")
            lines.append("  " + ", ".join(f"{name} {r['auc']:.3f}" for name, r in ev["labelers"].items()))
            lines.append(f"  {coverage_line(ev['matched_truth'], ev['labels_rows'])}")
    else:
        lines.append("  labels: none published yet")
    latest = get_json(storage, keys.LATEST_MODEL)
    if latest:
        m = get_json(storage, latest["metrics_key"], {})
        test = m.get("test", {})
        lines.append(f"\n== model {latest['run_id']} ({m.get('model', {}).get('backbone', '?')}, "
                     f"weights: {m.get('model', {}).get('weights', '?')}) ==")
        lines.append("  test: " + ", ".join(f"{k} {test[k]:.3f}" for k in ("accuracy", "roc_auc", "log_loss",
                                                                              "pearson_r", "mae", "rmse")
                                            if isinstance(test.get(k), float)))
        truth_test = (m.get("truth") or {}).get("test") or {}
        if "roc_auc" in truth_test:
            lines.append(f"  ROC-AUC against true quality (held-out authors): {truth_test['roc_auc']:.3f}"
                         + (f" ({coverage_line(truth_test['n'], truth_test['of'], 'test posts')})"
                            if "of" in truth_test else ""))
        lines.append(f"  metrics: {storage.uri(latest['metrics_key'])}")
    lines.append("\n== where the tables live ==")
    for name, table in TABLES.items():
        lines.append(f"  {name:<11} {storage.uri(table.path)}/")
    if run:
        import dataclasses

        from likerank.report.build import build_report

        if truth is not None:  # the report's findings show the planted effects beside the measured
            cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, truth_file=str(truth)))
        lines.append(f"\nreport: {build_report(cfg, storage)}")
    lines.append('\ntry:  .venv/bin/likerank query "select label, count(*) n, avg(likes) likes, '
                 'avg(followers) followers from labels group by label"')
    if run:
        lines.append(f"      .venv/bin/likerank export {run} --format hf   (or webdataset, parquet: the dataset for "
                     "other tools, with croissant.json and DATASHEET.md)")
    return "\n".join(lines)
