"""Data Docs open offline: real GX validations of two labels runs (one passes, one fails), then
the pages are checked as files and, where Chromium is installed, as a browser with networking
off draws them."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from labeling.validate import ValidationFailed, validate_run
from pipeline.core.config import load_config
from pipeline.core.storage import LocalStorage
from pipeline.core.tables import get_json
from tests.labeling.test_validate_labels import CFG, good_labels, store_run, unbalanced

GOOD, BAD = "2026-06-01T000000-good", "2026-06-02T000000-bad"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> LocalStorage:
    """A store with two validated runs: GOOD passed, BAD failed (one group has too many positives)."""
    storage = LocalStorage(tmp_path_factory.mktemp("datadocs") / "store")
    labels, summary = good_labels(GOOD)
    store_run(storage, GOOD, labels, summary)
    validate_run(CFG, GOOD, storage, inputs=False)
    bad, bad_summary = good_labels(BAD)
    store_run(storage, BAD, unbalanced(bad), bad_summary, raw=True)
    with pytest.raises(ValidationFailed):
        validate_run(CFG, BAD, storage, inputs=False)
    return storage


def pages(storage: LocalStorage) -> list[Path]:
    return sorted((storage.path / "validation").rglob("*.html"))


class _Refs(HTMLParser):
    """Every URL a page references: src/href/srcset/action/poster/data attributes, url() and @import in CSS."""

    def __init__(self, html: str):
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.feed(html)
        self.refs += [("css", u) for u in re.findall(r"url\(\s*['\"]?([^'\")]+)", html)]
        self.refs += [("css", u) for u in re.findall(r"@import\s+['\"]([^'\"]+)", html)]

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "poster", "data", "background") and value:
                self.refs.append((tag, value))

    def handle_data(self, data):
        self.text.append(data)


def test_pages_reference_nothing_remote_and_links_resolve(two_runs):
    found = pages(two_runs)
    assert {p.relative_to(two_runs.path).as_posix() for p in found} == {
        "validation/index.html", f"validation/run={GOOD}/data_docs/index.html",
        f"validation/run={BAD}/data_docs/index.html"}
    for page in found:
        html = page.read_text()
        refs = _Refs(html)
        assert not refs.tags & {"script", "img", "link", "iframe", "object", "embed"}, page
        assert not re.search(r"https?://|//[a-z0-9]", " ".join(u for _, u in refs.refs), re.I), (page, refs.refs)
        assert "Content-Security-Policy" in html and "default-src 'none'" in html
        for tag, url in refs.refs:  # every relative link resolves to a file we wrote
            assert tag == "a" and (page.parent / url).resolve().is_file(), (page, url)


def test_asset_and_run_are_named(two_runs):
    for run in (GOOD, BAD):
        result = get_json(two_runs, f"validation/run={run}/result.json")
        assert result["tables"]["labels"]["data_asset"] == "labels"
        assert result["tables"]["labels"]["run_name"] == run
        text = " ".join("".join(_Refs((two_runs.path / f"validation/run={run}/data_docs/index.html").read_text()).text).split())
        assert "Data asset: labels" in text and f"Run name {run}" in text
        assert "None" not in text and "__none__" not in text


def test_index_lists_every_run_with_its_verdict(two_runs):
    html = (two_runs.path / "validation/index.html").read_text()
    rows = re.findall(r"<tr class=\"(ok|failed)\">(.*?)</tr>", html, re.S)
    assert [(cls, run) for cls, row in rows for run in (GOOD, BAD) if run in row] == [("failed", BAD), ("ok", GOOD)]
    assert "✓ passed" in rows[1][1] and "✗ failed" in rows[0][1]


def test_failed_expectation_is_marked_with_its_observed_values(two_runs):
    html = (two_runs.path / f"validation/run={BAD}/data_docs/index.html").read_text().replace("<wbr>", "")
    row = next(r for r in re.findall(r"<tr class=\"failed\">(.*?)</tr>", html, re.S) if "chk_group_positives" in r)
    assert "✗ failed" in row and "expect_column_values_to_be_between" in row
    assert re.search(r"4 unexpected of 40", row)  # the 4 rows of the group with 3 positives
    good = (two_runs.path / f"validation/run={GOOD}/data_docs/index.html").read_text()
    assert '<tr class="failed">' not in good and good.count("✓ passed") > 20


def test_a_later_validation_keeps_earlier_runs_in_the_index_and_no_docs_means_no_pages(two_runs, local_storage):
    labels, summary = good_labels("one")
    store_run(local_storage, "one", labels, summary)
    validate_run(CFG, "one", local_storage, inputs=False)
    labels, summary = good_labels("two")
    store_run(local_storage, "two", labels, summary)
    validate_run(CFG, "two", local_storage, inputs=False)
    index = local_storage.get_text("validation/index.html")
    assert 'href="run=one/data_docs/index.html"' in index and 'href="run=two/data_docs/index.html"' in index

    validate_run(CFG, "one", local_storage, inputs=False)  # a rerun replaces its page, keeps the other run
    assert "run=two/" in local_storage.get_text("validation/index.html")

    off = load_config(env={}, overrides=["labeling.group_size=4", "labeling.min_followers=0",
                                         "validation.min_rows=8", "validation.data_docs=false"])
    validate_run(off, "one", local_storage, inputs=False)  # no Data Docs: its stale page goes too
    assert not local_storage.list("validation/run=one/data_docs/")
    assert local_storage.exists("validation/run=one/result.json")


CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (CI installs Debian's `chromium`)")
def test_index_and_failed_run_render_in_chromium_without_network(two_runs, tmp_path: Path):
    offline = ["--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               "--host-resolver-rules=MAP * ~NOTFOUND"]  # any remote fetch would fail, not hang
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", *offline,
            f"--user-data-dir={tmp_path / 'profile'}"]

    def dom(page: Path) -> str:
        run = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout

    index = dom(two_runs.path / "validation/index.html")
    rows = dict((run, row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", index, re.S) for run in (GOOD, BAD)
                if run in row)
    assert set(rows) == {GOOD, BAD}
    assert "✓ passed" in rows[GOOD] and "✗ failed" in rows[BAD]

    bad = dom(two_runs.path / f"validation/run={BAD}/data_docs/index.html")
    failed = [r for r in re.findall(r"<tr class=\"failed\">(.*?)</tr>", bad, re.S) if "chk_group_positives" in r]
    assert failed and "✗ failed" in failed[0]
    assert "Data asset: labels" in bad and GOOD not in bad

    shot = tmp_path / "shot.png"  # styled: the verdict and marks are drawn in colour
    run = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,900",
                          (two_runs.path / f"validation/run={BAD}/data_docs/index.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        colors = {c for _, c in im.convert("RGB").getcolors(1200 * 900) or []}
    assert any(r > 150 and g < 90 and b < 90 for r, g, b in colors)  # the red of a failed mark
