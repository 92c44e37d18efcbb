"""`likerank report`: the static HTML report renders every section, or says why a piece is missing.

The world comes from tests/fixtures/report.py (every table, a labels run, its validation and a
model with seeded random weights, which the map and best-crops sections run). The last test
opens the page in headless Chromium (skipped where none is installed).
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from likerank.report.build import build_report
from likerank.report.charts import history_panels, roc_points
from likerank.report.sections import SECTION_IDS, group_exposure_spans
from pipeline.core.storage import LocalStorage, Storage
from pipeline.core.tables import read_table
from tests.fixtures.report import FACE_BOX, REPORT_MODEL, REPORT_RUN, make_report_dataset


class _Page(HTMLParser):
    """Element ids, section classes and every <img src> / <a href> of a page."""

    def __init__(self, html: str):
        super().__init__()
        self.ids: set[str] = set()
        self.sections: dict[str, str] = {}
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "section":
            self.sections[a["id"]] = a.get("class", "")
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "a":
            self.links.append(a.get("href", ""))


def _page(index: Path) -> tuple[_Page, str]:
    html = index.read_text()
    return _Page(html), html


def test_full_world_renders_every_section(cfg, report_world: LocalStorage):
    index = build_report(cfg, report_world)
    assert index == report_world.path / "reports" / REPORT_RUN / "index.html"  # the default folder
    page, html = _page(index)
    assert page.sections == {sid: "ok" for sid in SECTION_IDS}
    for sub in ("funnel-table", "drop-reasons", "data-docs", "failed-expectations", "metrics-table",
                "roc", "calibration", "continuum", "top", "bottom"):
        assert sub in page.ids, sub
    for name in ("funnel.png", "distributions.png", "likes_vs_followers.png", "label_balance.png",
                 "roc.png", "calibration.png", "history.png", "map_label.png", "map_prob.png", "best_crops.png",
                 "group_exposure.png"):
        assert name in page.imgs and (index.parent / name).stat().st_size > 2000, name
    thumbs = [s for s in page.imgs if s.startswith("thumbs/")]
    assert len(thumbs) >= 14 and all((index.parent / s).is_file() for s in page.imgs)
    # the funnel's numbers, the labeler's summary rendered generically, the failed expectation
    assert "http_error: <span class=\"num\">2</span>" in html
    assert "too_young" in html and "trailing_partial_group" in html
    assert "expect_column_values_to_be_between" in html and "validation failed" in html
    # Data Docs linked relatively, and the link resolves
    docs = [h for h in page.links if h.endswith("index.html")]
    assert docs and not docs[0].startswith("/") and (index.parent / docs[0]).resolve().is_file()
    assert "predicted probability" in html


def _grid(html: str, gid: str) -> list[tuple[int, str, float]]:
    """(rank, post, value) of each tile of the contact sheets' grid ``top`` or ``bottom``."""
    part = html.split(f'<div id="{gid}">', 1)[1].split("<div id=", 1)[0].split("</section>", 1)[0]
    return [(int(r), post, float(v)) for r, post, v in re.findall(r'<figure title="#(\d+) post (\S+) · [ps] ([\d.]+)', part)]


def test_top_grid_holds_the_hundred_best_photos(cfg, local_storage: LocalStorage):
    from PIL import Image

    from likerank.report.charts import THUMB_PX
    from likerank.report.sections import CONTINUUM_N, EDGE_N

    made = make_report_dataset(local_storage, groups=33, checkpoint=False)  # 330 labeled, 110 of them test
    assert made["test_rows"] == 110 and EDGE_N == 100
    index = build_report(cfg, local_storage)
    html = index.read_text()
    top, bottom = _grid(html, "top"), _grid(html, "bottom")
    assert [r for r, _, _ in top] == list(range(1, 101))  # the 100 best, in order
    probs = [p for _, _, p in top]
    assert probs == sorted(probs, reverse=True)
    assert [r for r, _, _ in bottom] == list(range(101, 111))  # the rest: no photo in both grids
    assert not {p for _, p, _ in top} & {p for _, p, _ in bottom}
    assert "Top 100 of 110" in html and "Bottom 10" in html
    # the size budget: one small JPEG per photo, shared by the continuum and the grids, loaded lazily
    thumbs = sorted((index.parent / "thumbs").iterdir())
    assert len(thumbs) == 110 <= CONTINUUM_N + 2 * EDGE_N
    for t in thumbs:
        with Image.open(t) as im:
            assert im.format == "JPEG" and im.size == (THUMB_PX, THUMB_PX)
    assert sum(t.stat().st_size for t in thumbs) < 110 * 8_000
    tiles = re.findall(r"<img src=\"thumbs/[^>]*>", html)
    assert tiles and all('loading="lazy"' in t and f'width="{THUMB_PX}"' in t for t in tiles)


def test_top_grid_shows_every_photo_when_there_are_fewer(cfg, report_world: LocalStorage):
    html = build_report(cfg, report_world).read_text()
    top = _grid(html, "top")
    assert [r for r, _, _ in top] == list(range(1, 15)) and len({p for _, p, _ in top}) == 14  # all 14 test photos
    assert _grid(html, "bottom") == [] and "Every photo is in the top grid above" in html


def test_rerun_replaces_its_own_files_only(cfg, report_world: LocalStorage, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    build_report(cfg, report_world, out=out)
    (out / "thumbs" / "stale.jpg").write_bytes(b"x")
    index = build_report(cfg, report_world, out=out)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "thumbs" / "stale.jpg").exists()
    assert not list(out.glob(".tmp-*")) and index.is_file()


def test_missing_pieces_say_not_available(cfg, local_storage: LocalStorage):
    make_report_dataset(local_storage, posts=False, validation=False, model=False)
    page, html = _page(build_report(cfg, local_storage))
    assert page.sections["validation"] == "na" and page.sections["model"] == "na"
    assert "not available: nothing under" in html and "models/latest.json does not exist" in html
    for sid in ("funnel", "distributions", "likes-vs-followers", "label-balance", "contact-sheets"):
        assert page.sections[sid] == "ok", sid
    assert "ordered by label score" in html


def test_empty_storage_renders_without_crashing(cfg, local_storage: LocalStorage, tmp_path: Path):
    page, html = _page(build_report(cfg, local_storage, out=tmp_path / "r"))
    assert "section-error" not in set(page.sections.values())
    assert page.sections["funnel"] == "ok"
    assert all(page.sections[s] == "na" for s in SECTION_IDS if s != "funnel")
    assert "no labels run found" in html


@pytest.mark.parametrize("predictions", ["file", None])
def test_predictions_from_a_file_or_none(cfg, local_storage: LocalStorage, predictions):
    make_report_dataset(local_storage, predictions=predictions, checkpoint=False)
    index = build_report(cfg, local_storage)
    page, html = _page(index)
    assert page.sections["model"] == "ok" and "metrics-table" in page.ids
    if predictions == "file":
        assert "roc" in page.ids and (index.parent / "roc.png").is_file()
        assert f"models/{REPORT_MODEL}/predictions.parquet" in html
    else:
        assert "no-predictions" in page.ids and "no predictions file" in html
        assert "ordered by label score" in html


def test_unbalanced_group_is_flagged(cfg, local_storage: LocalStorage):
    make_report_dataset(local_storage, unbalanced=True, checkpoint=False)
    _, html = _page(build_report(cfg, local_storage))
    assert "1 group(s) are not 50 % positive" in html


def test_each_groups_exposure_span_is_measured_and_wide_groups_listed(cfg, report_world: LocalStorage):
    lab = pd.DataFrame({"group_id": [0, 0, 1, 1, 2, 2, -1], "source": ["bluesky"] * 2 + ["mastodon"] * 5,
                        "exposure": [5000.0, 100.0, 300.0, 200.0, 90.0, 60.0, 1.0]})
    spans = group_exposure_spans(lab)  # a dropped row (group -1) is in no group
    assert spans["source"].tolist() == ["bluesky", "mastodon", "mastodon"]
    assert spans["span"].tolist() == pytest.approx([50.0, 1.5, 1.5])
    # the report: every group's span charted, the wide ones (none in this world) said
    index = build_report(cfg, report_world)
    html = index.read_text()
    labels = read_table(report_world, "labels", [REPORT_RUN]).to_pandas()
    wide = int((group_exposure_spans(labels)["span"] > 10).sum())
    assert "Exposure span per group" in html and (index.parent / "group_exposure.png").is_file()
    assert (f"{wide} group(s) span more than 10x" if wide else "no group spans more than 10x") in html


def test_named_runs_that_do_not_exist(cfg, report_world: Storage, tmp_path: Path):
    page, html = _page(build_report(cfg, report_world, labels_run="nope", model_run="nope", out=tmp_path / "r"))
    assert page.sections["model"] == "na" and "model run &#39;nope&#39;" in html
    assert page.sections["contact-sheets"] == "na" and "labels run &#39;nope&#39; has no partition" in html


def _section(html: str, sid: str) -> str:
    """The HTML of one section."""
    return html.split(f'<section id="{sid}"', 1)[1].split("</section>", 1)[0]


def _probability_of(storage: LocalStorage, post_id: str) -> float:
    """The model's probability for a post's training-style face crop, computed here directly."""
    import pyarrow.compute as pc
    from PIL import Image

    from pipeline.core.storage import ImageStore
    from pipeline.core.tables import read_table
    from scoring.model import crop_batch
    from scoring.torch_model import load_registry_model

    sha = read_table(storage, "labels", [REPORT_RUN], filter=pc.field("post_id") == post_id)["image_sha256"][0].as_py()
    rgb = np.asarray(Image.open(io.BytesIO(ImageStore(storage).get(sha))).convert("RGB"))
    model = load_registry_model(storage, REPORT_MODEL)
    logit, _ = model.run(crop_batch([rgb], [np.array(FACE_BOX, dtype=np.float32)], model.spec))
    return float(1 / (1 + np.exp(-logit[0])))


def test_map_places_the_test_photos_by_the_models_features(cfg, report_world: LocalStorage):
    from PIL import Image

    from likerank.report.charts import MAP_PX

    index = build_report(cfg, report_world)
    page, html = _page(index)
    assert page.sections["map"] == "ok"
    tests = 14  # authors a00, a03, a06, a09 (split by author), every photo with a face box
    assert f"{tests} test photos placed by model run <code>{REPORT_MODEL}</code>" in html
    for name in ("map_label.png", "map_prob.png"):
        with Image.open(index.parent / name) as im:
            assert im.size == (MAP_PX, MAP_PX)
            # thumbnails drawn: far more colours than a blank canvas with a legend
            assert len(im.convert("RGB").getcolors(MAP_PX * MAP_PX)) > 500
        assert name in page.imgs and name in page.links  # shown scaled down, linked full size
    assert "perplexity 4.3333" in _section(html, "map")  # min(30, (14 - 1) / 3)


def test_best_crops_pair_each_photos_original_with_its_best_crop(cfg, report_world: LocalStorage):
    index = build_report(cfg, report_world)
    page, html = _page(index)
    assert page.sections["best-crops"] == "ok" and "best-crops-table" in page.ids
    assert "best_crops.png" in page.imgs and (index.parent / "best_crops.png").stat().st_size > 20_000
    rows = re.findall(r"<tr><td>(p\d+)</td><td>([01])</td><td>([\d.]+)</td>\s*<td>([\d.]+)</td><td>([+-][\d.]+)</td>"
                      r"<td>(1:1|4:5)</td>", _section(html, "best-crops"))
    assert len(rows) == 6 and len({r[0] for r in rows}) == 6
    for _, _, original, best, change, _ in rows:
        assert 0 < float(original) < 1 and 0 < float(best) < 1
        assert float(change) == pytest.approx(float(best) - float(original), abs=2e-4)
    # the "original" is the crop training takes: the same probability as scoring it directly
    assert float(rows[0][2]) == pytest.approx(_probability_of(report_world, rows[0][0]), abs=1e-4)


def test_best_crops_captions_stay_inside_the_picture():
    """Captions are drawn into best_crops.png, where CSS cannot wrap them: each must lie inside
    the picture and clear of its neighbours, for the longest post ids the sources make and more."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    from likerank.report.charts import best_crops_figure

    square, tall = Image.new("RGB", (200, 200), "tan"), Image.new("RGB", (160, 200), "gray")
    ids = ["3lbxyzabcdefg-1a2b3c4d", "113456789012345678901", "https://example.social/@someone/113456789012345678",
           "3lbxyzabcdefg-9f8e7d6c"]
    pairs = [{"post_id": pid, "label": 1, "original_prob": 0.5123, "best_prob": 0.6234 if k != 3 else None,
              "aspect": "4:5" if k == 0 else "1:1", "original": square, "best": (tall if k == 0 else square) if k != 3 else None}
             for k, pid in enumerate(ids)]
    fig = best_crops_figure(pairs)
    canvas = FigureCanvasAgg(fig)  # as savefig draws it
    canvas.draw()
    renderer, frame = canvas.get_renderer(), fig.bbox
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(boxes) == 7  # three pairs with a best crop, one without
    for b in boxes:
        assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and b.y1 <= frame.y1, (b, frame)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


@pytest.mark.parametrize(("checkpoint", "model", "why"), [
    (False, False, "models/latest.json does not exist"),
    (False, True, f"model run &#39;{REPORT_MODEL}&#39;: its checkpoint is missing"),
])
def test_map_and_best_crops_without_a_model_say_why(cfg, local_storage: LocalStorage, checkpoint, model, why):
    make_report_dataset(local_storage, model=model, checkpoint=checkpoint)
    index = build_report(cfg, local_storage)
    page, html = _page(index)
    for sid in ("map", "best-crops"):
        assert page.sections[sid] == "na"
        assert "not available: no model to run: " in _section(html, sid) and why in _section(html, sid)
    assert not (index.parent / "map_label.png").exists() and not (index.parent / "best_crops.png").exists()


def test_map_and_best_crops_without_test_rows_or_with_too_few_photos(cfg, local_storage: LocalStorage, monkeypatch):
    import pyarrow as pa

    from likerank.report import sections
    from pipeline.core.schemas import TABLES
    from pipeline.core.tables import read_table, write_partition

    make_report_dataset(local_storage)
    monkeypatch.setattr(sections, "MAP_MAX", 4)  # four photos: too few for t-SNE
    page, html = _page(build_report(cfg, local_storage))
    assert page.sections["map"] == "na" and "t-SNE needs at least 5 photos; 4 test photo(s)" in html
    assert page.sections["best-crops"] == "ok"

    labels = read_table(local_storage, "labels", [REPORT_RUN]).select(TABLES["labels"].schema.names)
    split = pa.array(["val" if s == "test" else s for s in labels["split"].to_pylist()], pa.string())
    write_partition(local_storage, "labels", REPORT_RUN, labels.set_column(labels.schema.get_field_index("split"),
                                                                           "split", split))
    page, html = _page(build_report(cfg, local_storage))
    for sid in ("map", "best-crops"):
        assert page.sections[sid] == "na" and f"labels run &#39;{REPORT_RUN}&#39; has no test rows" in _section(html, sid)


@pytest.mark.parametrize(("y", "p", "auc"), [
    ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),
    ([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9], 0.0),
    ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),  # ties move together: one diagonal step
    ([0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.9], 4 / 6),
])
def test_roc_points(y, p, auc):
    fpr, tpr = roc_points(np.array(y), np.array(p, dtype=float))
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc)


def test_history_draws_the_validation_curve_beside_the_losses():
    epochs = [{"epoch": 1, "train_loss": 0.7, "train_bce": 0.69, "val_log_loss": 0.68, "val_roc_auc": 0.55,
               "val_accuracy": 0.52},
              {"epoch": 2, "train_loss": 0.6, "train_bce": 0.6, "val_log_loss": 0.64, "val_roc_auc": 0.61,
               "val_accuracy": float("nan")}]
    assert history_panels(epochs) == {"loss": ["train_loss", "train_bce", "val_log_loss"],
                                      "validation": ["val_roc_auc", "val_accuracy"]}
    # A run trained before the validation curve: the loss panel alone.
    old = [{k: v for k, v in e.items() if not k.startswith("val_")} for e in epochs]
    assert history_panels(old) == {"loss": ["train_loss", "train_bce"]}
    assert history_panels([{"epoch": 1}]) == {}


def test_cli_report(report_world: LocalStorage, tmp_path: Path, capsys):
    from likerank.cli.main import main

    out = tmp_path / "cli-report"
    rc = main(["--set", f"storage.root={report_world.root}", "report", "--out", str(out)])
    assert rc == 0 and (out / "index.html").is_file()
    assert str(out / "index.html") in capsys.readouterr().out


CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (CI installs Debian's `chromium`)")
def test_renders_in_headless_chromium(cfg, report_world: LocalStorage, tmp_path: Path):
    index = build_report(cfg, report_world)
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _Page(dom.stdout)
    assert set(SECTION_IDS) <= page.ids and {"roc", "calibration", "continuum"} <= page.ids
    assert page.imgs and all((index.parent / src).is_file() for src in page.imgs)

    shot = tmp_path / "shot.png"
    run = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2400", index.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        colors = im.convert("RGB").resize((64, 120)).getcolors(64 * 120)
    assert shot.stat().st_size > 50_000 and colors and len(colors) > 50  # not a blank page


#: Injected into a test-only copy of a page: opens every <details>, then walks each card (a
#: section of <main>) for elements that stick out of it horizontally, and checks every caption
#: for text wider than its box (clipped, or spilling out), and every badge and one-word number
#: cell for a line break (broken in two they read "signific / ant", "1 / 0"); writes the findings as JSON into
#: <pre id="layout-check">, which --dump-dom hands back. An element inside a box that clips or
#: scrolls sideways is judged by that box, and such a box that has to scroll is listed apart
#: (``scrolls``): the way out for a table too wide for a narrow window, not for a wide one.
LAYOUT_CHECK = """<script>
window.addEventListener("load", () => {
  const tol = 1, out = {width: innerWidth, cards: 0, overflow: [], clipped: [], scrolls: [], wrapped: [], page: null};
  const name = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "")
    + (el.className && typeof el.className === "string" ? "." + el.className.trim().split(/\\s+/).join(".") : "");
  const path = (el, card) => { const p = []; for (let e = el; e && e !== card; e = e.parentElement) p.unshift(name(e));
                               return name(card) + " > " + p.join(" > "); };
  document.querySelectorAll("details").forEach((d) => { d.open = true; });
  for (const card of document.querySelectorAll("main > section")) {
    out.cards += 1;
    const edge = card.getBoundingClientRect(), over = new Set();
    for (const el of card.querySelectorAll("*")) {  // document order: parents first
      const r = el.getBoundingClientRect();
      if (!r.width && !r.height) continue;
      if (getComputedStyle(el).overflowX !== "visible" && el.scrollWidth > el.clientWidth + tol) {
        out.scrolls.push({el: path(el, card), scrollWidth: el.scrollWidth, clientWidth: el.clientWidth});
      }
      let held = false;
      for (let a = el.parentElement; a && a !== card; a = a.parentElement) {
        if (over.has(a) || getComputedStyle(a).overflowX !== "visible") { held = true; break; }
      }
      if (!held && (r.right > edge.right + tol || r.left < edge.left - tol)) {
        over.add(el);  // its children are not listed again
        out.overflow.push({el: path(el, card), left: Math.round(r.left - edge.left), right: Math.round(r.right - edge.right)});
      }
    }
    for (const cap of card.querySelectorAll("figcaption, caption, .caption")) {
      if (cap.scrollWidth > cap.clientWidth + tol) {
        out.clipped.push({el: path(cap, card), text: cap.textContent.trim().slice(0, 80),
                          scrollWidth: cap.scrollWidth, clientWidth: cap.clientWidth});
      }
    }
    for (const b of card.querySelectorAll(".badge")) {  // one line is about 1.4 font sizes high
      const h = b.getBoundingClientRect().height, size = parseFloat(getComputedStyle(b).fontSize);
      if (b.getClientRects().length > 1 || h > 2 * size) {
        out.wrapped.push({el: path(b, card), text: b.textContent.trim(), height: Math.round(h)});
      }
    }
    for (const td of card.querySelectorAll("td.num")) {  // a word's text: one box per line it takes
      const text = td.textContent.trim(), range = document.createRange();
      range.selectNodeContents(td);
      if (text && !/\\s/.test(text) && range.getClientRects().length > 1) {
        out.wrapped.push({el: path(td, card), text: text, lines: range.getClientRects().length});
      }
    }
  }
  const doc = document.documentElement;
  out.page = {scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth};
  const pre = document.createElement("pre");
  pre.id = "layout-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _layout(index: Path, width: int, profile: Path) -> dict:
    """LAYOUT_CHECK's findings for ``index`` in headless Chromium ``width`` px wide (a copy beside
    it carries the script, so the page's relative pictures resolve)."""
    import json

    probe = index.with_name(f".layout-check-{width}.html")
    probe.write_text(index.read_text().replace("</body>", LAYOUT_CHECK + "\n</body>", 1))
    try:
        run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},2000",
                              "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r'<pre id="layout-check">(.*?)</pre>', run.stdout, re.S)
    assert found, "the layout check did not run: " + run.stdout[-500:]
    import html as _html

    return json.loads(_html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (CI installs Debian's `chromium`)")
def test_layout_check_catches_overflow_and_clipped_captions(tmp_path: Path):
    page = tmp_path / "probe.html"
    page.write_text("""<!doctype html><html><body><main style="width: 600px">
      <section id="fits"><table><tr><td>a</td></tr></table><figure><figcaption>short</figcaption></figure>
        <div style="overflow-x: auto"><div id="scrolls" style="width: 3000px">held by its scrolling box</div></div></section>
      <section id="wide"><div id="too-wide" style="width: 3000px">x</div></section>
      <section id="cut"><figure style="width: 80px; margin: 0"><figcaption id="clipped" style="white-space: nowrap;
        overflow: hidden">a caption far too long for its eighty pixels</figcaption></figure>
        <table style="width: 60px"><tr><td><span class="badge" style="display: inline-block; font-size: 12px">ok</span></td><td><span id="broken" class="badge" style="display: inline-block; font-size: 12px">a badge
        broken in two</span></td><td class="num" id="split-number" style="overflow-wrap: anywhere">1234567890</td>
        </tr></table></section>
    </main></body></html>""")
    found = _layout(page, 1280, tmp_path / "profile")
    assert found["cards"] == 3
    assert [o["el"] for o in found["overflow"]] == ["section#wide > div#too-wide"]
    assert [c["el"] for c in found["clipped"]] == ["section#cut > figure > figcaption#clipped"]
    assert [w["el"] for w in found["wrapped"]] == ["section#cut > table > tbody > tr > td > span#broken.badge",
                                                   "section#cut > table > tbody > tr > td#split-number.num"]
    assert [c["el"] for c in found["scrolls"]] == ["section#fits > div", "section#cut > figure > figcaption#clipped"]
    assert found["page"]["scrollWidth"] > found["page"]["clientWidth"]  # the page itself scrolls sideways


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (CI installs Debian's `chromium`)")
@pytest.mark.parametrize("width", [1280, 1920])
def test_cards_hold_their_content_in_chromium(cfg, report_world: LocalStorage, tmp_path: Path, width):
    index = build_report(cfg, report_world)
    found = _layout(index, width, tmp_path / "profile")
    assert found["width"] == width and found["cards"] == len(SECTION_IDS)
    assert found["overflow"] == [], found["overflow"][:10]
    assert found["clipped"] == [], found["clipped"][:10]
    assert found["wrapped"] == [], found["wrapped"][:10]
    assert found["scrolls"] == [], found["scrolls"][:10]  # the metrics table fits, no sideways scrolling
    assert found["page"]["scrollWidth"] <= found["page"]["clientWidth"], found["page"]
