"""What makes a good photo: the attributes are measured from real pixels and real detections, the
statistics are the textbook ones, and on a simulated world the effects the simulator planted are
found with the right sign while the ones it did not plant are not.

The fast tests use real photos shipped by installed packages and the report's fabricated world
(tests/fixtures/report.py); the slow one the simulator world of tests/fixtures/findings.py.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter, ImageOps

from likerank.cli.main import main
from likerank.report import findings as F
from pipeline.core.storage import ImageStore, LocalStorage, Storage
from tests.fixtures.faces import photo_bytes, truncated_jpeg
from tests.fixtures.findings import FindingsWorld
from tests.fixtures.report import REPORT_MODEL, REPORT_RUN


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- statistics


def test_holm_steps_down_and_stays_monotone():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06
    got = F.holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert got[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(got[4])  # untested: not counted in the family
    assert F.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_wilson_interval_matches_the_formula():
    lo, hi = F.wilson(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    lo, hi = F.wilson(0, 20)  # stays inside [0, 1] where the normal interval would not
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.1 < hi < 0.2


def test_quantile_bins_are_readable_and_never_smaller_than_min_bin_n():
    rng = np.random.default_rng(0)
    values = np.r_[rng.uniform(10, 60, 400), [95.0] * 5]  # a handful of outliers: no bin of 5
    attr = next(a for a in F.ATTRIBUTES if a.name == "face_share")
    edges = F.bin_edges(attr, values)
    counts = np.bincount(np.searchsorted(edges, values, side="right"))
    assert len(counts) == len(edges) + 1 >= 3 and counts.min() >= F.MIN_BIN_N
    assert all(e == F.nice(e) for e in edges)  # two significant digits
    labels = F.bin_labels(attr, edges, values)
    assert labels[0].startswith("under ") and labels[-1].endswith("% or more") and "–" in labels[1]
    # a flag with too few on one side is one bin, and the finding says it cannot be tested
    table = pd.DataFrame({"label": [0, 1] * 50, "border": [0.0] * 95 + [1.0] * 5})
    f = F.attribute_finding(next(a for a in F.ATTRIBUTES if a.name == "border"), table, "")
    assert len(f.bins) == 1 and f.p is None and "one bin only" in f.testable


def test_a_planted_difference_is_significant_and_noise_is_not():
    rng = np.random.default_rng(1)
    n = 600
    border = rng.random(n) < 0.3
    label = (rng.random(n) < np.where(border, 0.7, 0.42)).astype(int)
    table = pd.DataFrame({"label": label, "border": border.astype(float),
                          "face_x": rng.uniform(20, 80, n)})
    found = {f.name: f for f in F.compute_findings(table).attributes}
    assert found["border"].significant and found["border"].rank == 1
    with_border = found["border"].bins[1]
    assert with_border.label == "with a uniform border" and with_border.rate > found["border"].overall_rate
    without = found["border"].bins[0]
    assert found["border"].sentence.startswith(
        f"Photos with a uniform border are positive {with_border.rate:.0%} of the time (n = {with_border.n}), "
        f"those without a border {without.rate:.0%} (n = {without.n}); {found['border'].overall_rate:.0%} overall")
    assert not found["face_x"].significant and "not significant at 0.05" in found["face_x"].sentence
    assert found["n_faces"].testable == "not measured on any labeled photo"  # no test, ranked last
    assert found["n_faces"].rank > found["face_x"].rank


# --------------------------------------------------------------------------- measuring


def test_pixel_attributes_of_real_photos(local_storage: Storage):
    astronaut = Image.open(io.BytesIO(photo_bytes("astronaut"))).convert("RGB")
    photos = {
        "plain": astronaut,
        "border": ImageOps.expand(astronaut, border=24, fill=(255, 255, 255)),
        "grey": astronaut.convert("L").convert("RGB"),
        "dark": Image.eval(astronaut, lambda v: int(v * 0.4)),
        "blurred": astronaut.filter(ImageFilter.GaussianBlur(4)),
    }
    store = ImageStore(local_storage)
    shas = {name: store.put(_jpeg(im))[0] for name, im in photos.items()}
    shas["broken"] = store.put(truncated_jpeg())[0]
    got = F.measure_images(local_storage, list(shas.values())).set_index("sha256")
    m = {name: got.loc[sha] for name, sha in shas.items()}
    assert not m["plain"].border and not m["plain"].black_and_white
    assert m["border"].border and not m["border"].black_and_white
    # the border is measured around, not into: the photo inside reads as the plain one
    assert m["border"].brightness == pytest.approx(m["plain"].brightness, abs=6)
    assert m["border"].saturation == pytest.approx(m["plain"].saturation, abs=3)
    assert m["grey"].black_and_white and m["grey"].saturation < 2 < m["plain"].saturation
    assert m["dark"].brightness < 0.5 * m["plain"].brightness
    assert m["blurred"].sharpness < 0.2 * m["plain"].sharpness
    assert m["blurred"].contrast < m["plain"].contrast
    assert isinstance(m["broken"].error, str) and math.isnan(m["broken"].brightness)


def test_face_attributes_from_the_real_detector(face_detector):
    from pipeline.faces.detect_faces import detect_stream, faces_table

    astronaut = Image.open(io.BytesIO(photo_bytes("astronaut"))).convert("RGB")
    tilted = astronaut.rotate(20, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))
    images = {"upright": _jpeg(astronaut), "tilted": _jpeg(tilted)}
    results = list(detect_stream(face_detector, ((k, (lambda d=d: d)) for k, d in images.items()),
                                 decode_workers=1, max_pixels=40_000_000))
    rows = faces_table(results, face_detector.detector_id).to_pandas()
    got = F.face_attributes(rows).set_index("sha256")
    up, tilt = got.loc["upright"], got.loc["tilted"]
    # skimage's astronaut: the face box (SCRFD at 640 px) is ~120 px tall in a 512 px photo
    assert up.n_faces == 1 and up.face_share == pytest.approx(23, abs=4)
    # turned 20° on top of her own few degrees, one way or the other
    assert up.head_tilt < 8 and tilt.head_tilt == pytest.approx(20, abs=up.head_tilt + 3)
    assert 30 < up.face_x < 60 and 10 < up.face_y < 30  # she sits left of centre, high in the frame


def _labeled_world(storage: Storage, face_detector, *, old: bool) -> pd.DataFrame:
    """Real photos detected by the real stage, and 80 labeled posts of them (ten a photo). With
    ``old`` the faces rows are written as a release before the attribute columns wrote them."""
    from pipeline.core.config import load_config
    from pipeline.faces.detect_faces import detect_shard, detect_stream, faces_table
    from tests.fixtures.faces import store_images, write_old_faces

    astronaut = Image.open(io.BytesIO(photo_bytes("astronaut"))).convert("RGB")
    images = {name: photo_bytes(name) for name in ("t1", "astronaut", "camera", "chelsea")}
    images |= {"border": _jpeg(ImageOps.expand(astronaut, border=24, fill=(255, 255, 255))),
               "tilted": _jpeg(astronaut.rotate(20, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))),
               "dark": _jpeg(Image.eval(astronaut, lambda v: int(v * 0.4))),
               "blurred": _jpeg(astronaut.filter(ImageFilter.GaussianBlur(4)))}
    shas = store_images(storage, images)
    if old:
        found = detect_stream(face_detector, [(shas[n], (lambda d=d: d)) for n, d in images.items()], decode_workers=1)
        write_old_faces(storage, "2026-11-23-s0000-old", faces_table(found, face_detector.detector_id))
    else:
        cfg = load_config(overrides=["faces.providers=CPUExecutionProvider"])
        detect_shard(cfg, 0, sorted(shas.values()), "2026-11-23", storage=storage, detector=face_detector)
    rng = np.random.default_rng(7)
    names = [n for n in images for _ in range(10)]
    return pd.DataFrame({"post_id": [f"p{i:03d}" for i in range(len(names))],
                         "image_sha256": [shas[n] for n in names],
                         "label": rng.integers(0, 2, len(names))})


def test_stored_attributes_give_the_findings_measuring_gives(face_detector, tmp_path, monkeypatch):
    decodes: list[str] = []
    measure = F.measure_bytes

    def counted(data: bytes, **kw):
        decodes.append("one")
        return measure(data, **kw)

    monkeypatch.setattr(F, "measure_bytes", counted)
    new_store, old_store = LocalStorage(tmp_path / "new"), LocalStorage(tmp_path / "old")
    labels = _labeled_world(new_store, face_detector, old=False)
    assert _labeled_world(old_store, face_detector, old=True).equals(labels)

    stored = F.measure_labeled_photos(new_store, labels)
    assert decodes == []  # read from the faces table: not one image decoded
    measured = F.measure_labeled_photos(old_store, labels)
    assert len(decodes) == 8  # the old rows lack the columns: each photo measured from its bytes, once

    pd.testing.assert_frame_equal(stored, measured, rtol=1e-6)
    by_post = stored.set_index("post_id")
    assert by_post.loc["p020", "black_and_white"] == 1.0 and by_post.loc["p040", "border"] == 1.0  # camera, border
    assert by_post.loc["p050", "head_tilt"] > by_post.loc["p010", "head_tilt"] + 10  # tilted, upright astronaut
    assert by_post.loc["p030", "n_faces"] == 0 and math.isnan(by_post.loc["p030", "face_share"])  # the cat
    assert stored["error"].isna().all() and stored["brightness"].notna().all()

    new = F.findings_for_labels(new_store, labels, labels_run="r1").to_dict()
    old = F.findings_for_labels(old_store, labels, labels_run="r1").to_dict()
    assert new["tested"] >= 5
    _assert_close(new, old)  # bins, rates, tests and sentences alike


def _assert_close(a, b) -> None:
    """Equal, floats within float tolerance, recursively."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_close(x, y)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6)
    else:
        assert a == b


# --------------------------------------------------------------------------- report and command


def test_report_section_on_the_fabricated_world(report_world: LocalStorage, tmp_path):
    from likerank.report.build import run_section
    from likerank.report.load import load_context
    from likerank.report.sections import findings_section

    ctx = load_context(report_world, None, None, tmp_path / "out")
    ctx.out.mkdir(parents=True)
    sec = run_section(ctx, "findings", "What makes a good photo", findings_section)
    assert not sec.na and not sec.error, sec.error
    f = sec.body["f"]
    assert [a.rank for a in f.attributes] == list(range(1, len(F.ATTRIBUTES) + 1))
    assert {a.name for a in f.attributes} == set(F.ATTRIBUTE_NAMES) and f.n_labeled == 40
    # the fixture's images all hold one face in the same place: one bin, no test
    assert next(a for a in f.attributes if a.name == "face_share").testable
    # the model's test predictions are averaged per bin
    assert sum(b.n_pred for b in next(a for a in f.attributes if a.name == "brightness").bins) == len(ctx.predictions)
    assert (ctx.out / sec.body["chart"]).stat().st_size > 5000
    assert f.truth == "" and all(a.planted is None for a in f.attributes)  # no truth: no planted effects


def test_the_truth_meets_the_posts_of_every_source(tmp_path):
    # As the simulator writes it: a Bluesky post's own id is not what likerank stores; its source_id
    # is the rkey, and likerank's id is "<rkey>-<author_key[:8]>".
    path = tmp_path / "truth.parquet"
    pd.DataFrame({"post_id": ["111", "222", "333"], "source_id": ["111", "3ljjc3uib6sti", "333"],
                  "quality": [0.1, 0.2, 0.3], "visual_quality": [0.4, 0.5, 0.6]}).to_parquet(path)
    posts = pd.DataFrame({"post_id": ["111", "3ljjc3uib6sti-0123abcd", "444"], "label": [1, 0, 1]})
    joined, matched = F.join_truth(posts, F.load_truth_qualities(path))
    assert matched == 2 and joined["post_id"].tolist() == posts["post_id"].tolist()
    assert joined["visual_quality"].tolist()[:2] == [0.4, 0.5] and math.isnan(joined["visual_quality"].iloc[2])
    with pytest.raises(ValueError, match="missing column"):
        pd.DataFrame({"post_id": ["1"], "visual_quality": [0.1]}).to_parquet(tmp_path / "bad.parquet")
        F.load_truth_qualities(tmp_path / "bad.parquet")


def test_findings_command_prints_the_ranked_table(report_world: LocalStorage, capsys):
    common = ["--set", f"storage.root={report_world.path}"]
    assert main([*common, "findings"]) == 0  # the published run, the latest model
    out = capsys.readouterr().out
    assert out.startswith(f"What makes a good photo: labels run {REPORT_RUN}, 40 labeled photos")
    assert f"model run {REPORT_MODEL}" in out and "Findings:" in out
    assert all(a.title in out for a in F.ATTRIBUTES)
    assert main([*common, "findings", REPORT_RUN, "--json", "--model", "none"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["labels_run"] == REPORT_RUN and data["model_run"] is None
    assert len(data["attributes"]) == len(F.ATTRIBUTES) and all(a["bins"] for a in data["attributes"])
    assert main([*common, "findings", "r-nope"]) == 2
    err = capsys.readouterr().err
    assert "'r-nope'" in err and REPORT_RUN in err
    assert main([*common, "findings", "--truth", str(report_world.path / "no-such.parquet")]) == 2
    assert "no-such.parquet: does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- the simulated world


@pytest.mark.slow
def test_planted_effects_are_recovered_from_the_simulators_pixels(findings_world: FindingsWorld, capsys, tmp_path):
    w = findings_world
    common = ["--set", f"storage.root={w.storage.root}"]
    assert main([*common, "findings", w.run, "--json", "--truth", str(w.truth_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    found = {a["name"]: a for a in data["attributes"]}
    assert data["n_labeled"] == len(w.labels) >= 800 and data["truth_column"] == "visual_quality"

    def rates(name: str) -> list[float]:
        return [b["rate"] for b in found[name]["bins"]]

    planted = ("face_share", "brightness", "saturation", "black_and_white", "border")
    for name in planted:
        assert found[name]["significant"], found[name]["sentence"]
        assert found[name]["planted"] != "not planted"
    assert rates("brightness")[0] < rates("brightness")[-1]  # dark is bad
    assert rates("saturation")[0] > rates("saturation")[-1]  # washed out / black and white is good
    assert rates("black_and_white")[1] > rates("black_and_white")[0]
    assert rates("border")[1] > rates("border")[0]
    share = found["face_share"]["bins"]  # best near a third of the frame height, worse either side
    best = next(i for i, b in enumerate(share) if (b["low"] or 0) <= 100 / 3 < (b["high"] or 1e9))
    assert 0 < best < len(share) - 1 and share[best]["rate"] > max(share[0]["rate"], share[-1]["rate"])
    # the truth agrees: the photos in a planted attribute's bins differ in true quality
    assert found["face_share"]["true_spread"] > 0.3

    for name in ("face_x", "head_tilt"):  # not planted: not found
        assert not found[name]["significant"], found[name]["sentence"]
        assert found[name]["planted"] == "not planted"
        assert "not significant at 0.05" in found[name]["sentence"]
    assert found["face_share"]["rank"] < found["face_x"]["rank"]

    # the report shows the same findings, with the planted effects beside them
    import dataclasses

    from likerank.report.build import build_report

    cfg = dataclasses.replace(w.cfg, training=dataclasses.replace(w.cfg.training, truth_file=str(w.truth_file)))
    index = build_report(cfg, w.storage, labels_run=w.run, out=tmp_path / "report")
    html = index.read_text()
    assert '<section id="findings" class="ok">' in html and "findings.png" in html
    assert "white border +0.35" in html and "not planted" in html
    assert found["face_share"]["sentence"].split(" (n =")[0] in html
