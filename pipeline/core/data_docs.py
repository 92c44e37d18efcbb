"""Data Docs for the labels validation gate: small self-contained HTML pages that open offline.

Why not Great Expectations' own Data Docs site: its index table is drawn by JavaScript loaded
from a CDN, its pages take Bootstrap and Font Awesome from CDNs (offline they are unstyled and
their pass/fail icons blank) and its logo is fetched from a remote URL carrying the context's
id. Vendoring those assets and rewriting the links would follow every GX release. Instead the
pages are rendered here from the validation result likerank already stores
(``validation/run=<id>/result.json``, written by :mod:`labeling.validate`: GX's results per
table, with the data asset and run name). They use inline CSS only, no script, no image, no
font; a Content-Security-Policy forbids anything else, so nothing can be fetched from any host.
Pass and fail are text (✓ passed / ✗ failed), not icon glyphs.

* ``validation/run=<id>/data_docs/index.html`` (:func:`run_page`): one run; per table its data
  asset, suite and statistics, then each expectation with its mark, arguments and observed
  values (a few unexpected values, as GX reports them).
* ``validation/index.html`` (:func:`index_page`): every run under ``validation/run=*/``, newest
  first, each with its verdict, counts and a link to its page; rebuilt from storage whenever a
  run is validated (:func:`write_data_docs`) or a forget removes one (:func:`refresh_index`).

Only the standard library and stored JSON: no GX import (it is slow), so :mod:`pipeline.core.forget`
can refresh the index too.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any
from urllib.parse import quote

from pipeline.core import keys
from pipeline.core.storage import Storage, StorageError

#: ``validation/run=<id>/result.json`` → ``<id>``
_RESULT_KEY = re.compile(r"^validation/run=(?P<run>[^/]+)/result\.json$")

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:72rem;
 padding:0 1rem;color:#1d2329;background:#fff}
h1{font-size:1.5rem;margin:0 0 .3rem}h2{font-size:1.2rem;margin:2rem 0 .4rem}
a{color:#0b5cad}p.meta{color:#56616b;margin:.2rem 0}
table{border-collapse:collapse;width:100%;margin:.6rem 0}
th,td{border-bottom:1px solid #dde2e6;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f5f7;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:13px/1.35 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;overflow-wrap:anywhere}
.mark{font-weight:700;white-space:nowrap}.pass{color:#17813c}.fail{color:#b3261e}
tr.failed td{background:#fdf1f0}
.verdict{display:inline-block;padding:.15rem .6rem;border-radius:.3rem;font-weight:700}
.verdict.pass{background:#e4f5ea}.verdict.fail{background:#fbe3e1}
"""

# Nothing but the inline style may load: no script, image, font, frame or connection, from any host.
_CSP = "default-src 'none'; style-src 'unsafe-inline'"


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _wrap(name: Any) -> str:
    """An identifier that may break after its underscores (``expect_column_values_…``), not mid-word."""
    return "_<wbr>".join(_e(part) for part in str(name).split("_"))


def _mark(success: Any) -> str:
    if success is True:
        return '<span class="mark pass">✓ passed</span>'
    if success is False:
        return '<span class="mark fail">✗ failed</span>'
    return '<span class="mark">? unknown</span>'


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _json(v: Any, limit: int = 300) -> str:
    text = json.dumps(v, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "…"


def _observed(result: dict[str, Any]) -> str:
    """What GX saw: the observed value, or how many rows were unexpected and a few of them."""
    parts = []
    if "observed_value" in result:
        parts.append(f"observed <code>{_e(_json(result['observed_value']))}</code>")
    if result.get("unexpected_count") is not None:
        count = f"{result['unexpected_count']:,} unexpected"
        if result.get("element_count") is not None:
            count += f" of {result['element_count']:,}"
        if result.get("unexpected_percent") is not None:
            count += f" ({result['unexpected_percent']:.3g}%)"
        parts.append(_e(count))
        sample = result.get("partial_unexpected_list")
        if sample:
            parts.append(f"e.g. <code>{_e(_json(sample[:5]))}</code>")
    return "; ".join(parts) or "–"


def _validations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{table: GX validation result (describe_dict form: success, statistics, expectations)}."""
    out = {}
    for table, res in (doc.get("results") or {}).items():
        found = (res or {}).get("validation_results") or []
        if found:
            out[table] = found[0]
    return out


def run_page(doc: dict[str, Any]) -> str:
    """The page of one validation run, from its stored ``result.json``."""
    run_id = doc.get("run_id", "?")
    tables = doc.get("tables") or {}
    body = ['<p><a href="../../index.html">← every validation run</a></p>',
            f"<h1>Labels run {_e(run_id)}: <span class=\"verdict {'pass' if doc.get('success') else 'fail'}\">"
            f"{'✓ passed' if doc.get('success') else '✗ failed'}</span></h1>",
            f'<p class="meta">Run name <code>{_e(run_id)}</code>'
            + (f" · validated {_e(doc['validated_at'])}" if doc.get("validated_at") else "")
            + (f" · labeler {_e(doc['labeler'])}" if doc.get("labeler") else "")
            + (f" · group size {_e(doc['group_size'])}" if doc.get("group_size") else "")
            + f" · {_e(doc.get('failed_expectations', 0))} failed expectation(s)</p>"]
    if doc.get("labels_sha256"):
        body.append(f'<p class="meta">labels file sha256 <code>{_e(doc["labels_sha256"])}</code></p>')
    validations = _validations(doc)
    for table, vr in validations.items():
        info = tables.get(table) or {}
        stats = vr.get("statistics") or info.get("statistics") or {}
        body.append(f'<h2 id="{_e(table)}">Data asset: {_e(info.get("data_asset") or table)} {_mark(vr.get("success"))}</h2>')
        body.append(f'<p class="meta">suite <code>{_e(info.get("suite") or "-")}</code>'
                    f" · run name <code>{_e(info.get('run_name') or run_id)}</code>"
                    + (f" · {info['rows']:,} rows" if isinstance(info.get("rows"), int) else "")
                    + f" · {_e(stats.get('successful_expectations', '?'))} of "
                    f"{_e(stats.get('evaluated_expectations', '?'))} expectations passed</p>")
        rows = []
        for ex in sorted(vr.get("expectations") or [], key=lambda x: x.get("success") is not False):
            kwargs = {k: v for k, v in (ex.get("kwargs") or {}).items() if k not in ("batch_id", "column")}
            column = (ex.get("kwargs") or {}).get("column", "")
            rows.append(f'<tr class="{"failed" if ex.get("success") is False else "ok"}">'
                        f"<td>{_mark(ex.get('success'))}</td><td><code>{_wrap(ex.get('expectation_type', '?'))}</code></td>"
                        f"<td><code>{_e(column)}</code></td><td><code>{_e(_json(kwargs))}</code></td>"
                        f"<td>{_observed(ex.get('result') or {})}</td></tr>")
        body.append("<table><thead><tr><th>result</th><th>expectation</th><th>column</th><th>arguments</th>"
                    f"<th>observed</th></tr></thead><tbody>\n{''.join(rows)}\n</tbody></table>")
    if not validations:
        body.append("<p>This result holds no expectation results.</p>")
    return _page(f"likerank validation: labels run {run_id}", "\n".join(body))


def stored_results(storage: Storage, listed: list[str]) -> list[tuple[str, dict[str, Any] | None]]:
    """(run id, its stored result or None when unreadable) for every run among ``listed`` (the
    keys under ``validation/``)."""
    out = []
    for key in listed:
        m = _RESULT_KEY.match(key)
        if not m:
            continue
        try:
            doc = json.loads(storage.get_text(key))
        except (ValueError, StorageError, OSError):
            doc = None
        out.append((m["run"], doc if isinstance(doc, dict) else None))
    return out


def index_page(results: list[tuple[str, dict[str, Any] | None]], pages: set[str]) -> str:
    """The index of every validation run: ``pages`` are the runs that have a page to link."""
    def order(item: tuple[str, dict[str, Any] | None]) -> tuple[str, str]:
        return ((item[1] or {}).get("validated_at") or "", item[0])

    rows = []
    for run_id, doc in sorted(results, key=order, reverse=True):
        doc = doc or {}
        name = _e(run_id)
        if run_id in pages:
            name = f'<a href="run={_e(quote(run_id))}/data_docs/index.html">{name}</a>'
        tables = doc.get("tables") or {}
        evaluated = sum((t.get("statistics") or {}).get("evaluated_expectations", 0) for t in tables.values())
        label_rows = (tables.get("labels") or {}).get("rows")
        failed_tables = ", ".join(_e(t) for t, r in tables.items() if r.get("success") is False)
        rows.append(f'<tr class="{"failed" if doc.get("success") is False else "ok"}">'
                    f"<td>{_mark(doc.get('success') if doc else None)}</td><td>{name}</td>"
                    f"<td>{_e(doc.get('validated_at') or '')}</td><td>{_e(doc.get('labeler') or '')}</td>"
                    f'<td class="num">{_e(f"{label_rows:,}" if isinstance(label_rows, int) else "")}</td>'
                    f'<td class="num">{_e(doc.get("failed_expectations", "?"))} of {evaluated}</td>'
                    f"<td>{failed_tables or ('–' if doc else 'result unreadable')}</td></tr>")
    passed = sum(1 for _, d in results if d and d.get("success") is True)
    body = ["<h1>likerank: labels validation runs</h1>",
            f'<p class="meta">{len(results)} run(s), {passed} passed, {len(results) - passed} failed or '
            "unreadable. Only a run that passed can be published for training.</p>",
            "<table><thead><tr><th>result</th><th>labels run</th><th>validated</th><th>labeler</th>"
            "<th>label rows</th><th>failed expectations</th><th>failed tables</th></tr></thead><tbody>\n"
            + "\n".join(rows) + "\n</tbody></table>"]
    if not results:
        body.append("<p>No validation results are stored.</p>")
    return _page("likerank validation runs", "\n".join(body))


def refresh_index(storage: Storage) -> str:
    """Rewrite ``validation/index.html`` from every stored result; returns its key."""
    listed = storage.list("validation/")
    results = stored_results(storage, listed)
    present = set(listed)
    pages = {run for run, _ in results if keys.validation_page(run) in present}
    key = keys.validation_index()
    storage.put_text(key, index_page(results, pages))
    return key


def write_data_docs(storage: Storage, doc: dict[str, Any]) -> str:
    """Write the page of the run whose stored result is ``doc``, then the index; returns the page's key."""
    run_id = doc["run_id"]
    key = keys.validation_page(run_id)
    storage.put_text(key, run_page(doc))
    refresh_index(storage)
    return key
