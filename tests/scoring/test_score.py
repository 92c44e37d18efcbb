"""``likerank score`` and ``likerank model export``: real face photos, a broken file, a photo
without a face and a URL on loopback, through a registered model and its ONNX export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.storage import LocalStorage
from scoring.model import ONNX_OUTPUTS, ONNX_SCORE_OUTPUT, OnnxModel, crop_batch
from scoring.score import score_inputs
from scoring.torch_model import export_onnx, load_registry_model
from tests.fixtures.scoring import FACE_PHOTOS, MODEL_RUN, NO_FACE_PHOTO

REPO = Path(__file__).resolve().parents[2]
FACES, NO_FACE, RUN = FACE_PHOTOS, NO_FACE_PHOTO, MODEL_RUN


@pytest.fixture(scope="module")
def cfg(model_root):
    return load_config(env={}, overrides=[f"storage.root={model_root}", "scrape.allow_hosts=127.0.0.1"])


@pytest.fixture(scope="module")
def model(model_root):
    return load_registry_model(LocalStorage(model_root))


def test_every_input_gets_a_row_with_a_status(cfg, model, image_server, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    inputs = [*FACES, NO_FACE, str(broken), str(tmp_path / "missing.png"),
              f"{image_server}/astronaut.png", f"{image_server}/truncated.png", f"{image_server}/gone.png"]
    rows = [r.record() for r in score_inputs(cfg, inputs, model, batch_size=2)]
    assert [r["input"] for r in rows] == inputs
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "no_face", "decode_error", "unreadable", "ok",
                                           "decode_error", "download_error"]
    for r in rows:
        assert r["model_run_id"] == RUN and len(r["detector_id"]) == 64
        if r["status"] == "ok":
            assert 0 < r["prob"] < 1 and r["error"] is None and r["face_score"] >= cfg.faces.min_score
            x1, y1, x2, y2 = r["face_box"]
            assert 0 <= x1 < x2 and 0 <= y1 < y2
        else:
            assert r["prob"] is None and r["input"].rsplit("/", 1)[-1] in r["error"]
    assert rows[6]["prob"] == rows[2]["prob"]  # the same photo by URL and by path


def test_batches_do_not_change_scores(cfg, model):
    one = [r.prob for r in score_inputs(cfg, FACES, model, batch_size=1)]
    many = [r.prob for r in score_inputs(cfg, FACES, model, batch_size=32)]
    assert np.allclose(one, many, atol=1e-5) and len(set(one)) == 3


def test_onnx_export_agrees_with_torch_on_real_photos(cfg, model, tmp_path):
    path = export_onnx(model, tmp_path / "model.onnx")
    onnx_model = OnnxModel(path)
    assert onnx_model.spec == model.spec
    torch_rows = list(score_inputs(cfg, FACES, model))
    onnx_rows = list(score_inputs(cfg, FACES, onnx_model))
    assert [r.face_box for r in onnx_rows] == [r.face_box for r in torch_rows]
    assert np.allclose([r.prob for r in onnx_rows], [r.prob for r in torch_rows], atol=1e-4, rtol=0)
    batch = crop_batch([np.asarray(Image.open(FACES[2]).convert("RGB"))],
                       [np.array(torch_rows[2].face_box, dtype=np.float32)], model.spec)
    (t_logit, t_feat), (o_logit, o_feat) = model.run(batch), onnx_model.run(batch)
    assert np.allclose(t_logit, o_logit, atol=1e-4) and np.allclose(t_feat, o_feat, atol=1e-4)
    # The score head travels too, as model.json's score_head says.
    assert model.spec.score_head
    outputs = [o.name for o in onnx_model.session.get_outputs()]
    assert outputs == [*ONNX_OUTPUTS, ONNX_SCORE_OUTPUT]
    (o_score,) = onnx_model.session.run([ONNX_SCORE_OUTPUT], {onnx_model.input_name: batch})
    with torch.inference_mode():
        t_score = model.net.score_head(model.net.backbone(torch.from_numpy(batch).to(model.device))).squeeze(1)
    assert np.allclose(t_score.cpu().numpy(), o_score, atol=1e-4)


def _cli(*args: str, env_root: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKERANK_")}
    env["LIKERANK_STORAGE__ROOT"] = str(env_root)
    return subprocess.run([sys.executable, "-m", "likerank.cli.main", "score", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_json_lines_writes_parquet_and_exits_by_the_documented_code(model_root, tmp_path):
    out = tmp_path / "scores.parquet"
    good = _cli(*FACES[:2], "--output", str(out), env_root=model_root)
    assert good.returncode == 0, good.stderr
    lines = [json.loads(line) for line in good.stdout.splitlines()]
    assert [line["status"] for line in lines] == ["ok", "ok"]
    assert pq.read_table(out).column("prob").to_pylist() == [line["prob"] for line in lines]
    bad = _cli(FACES[0], NO_FACE, env_root=model_root)
    assert bad.returncode == 1 and [json.loads(x)["status"] for x in bad.stdout.splitlines()] == ["ok", "no_face"]


def test_cli_without_a_model_says_what_to_do(tmp_path):
    res = _cli(FACES[0], env_root=tmp_path / "empty")
    assert res.returncode == 2 and "no model yet" in res.stderr and "make retrain" in res.stderr


def test_best_crop_searches_crops_around_the_face_and_reports_the_best_beside_the_original(cfg, model):
    from scoring.best_crop import candidate_boxes

    rows = list(score_inputs(cfg, FACES, model, best_crop=True))
    for r in rows:
        found = r.best_crop
        assert found["candidates"] >= 1 and abs(found["original_prob"] - r.prob) < 1e-5
        best = found["best"]
        assert best["prob"] >= 0 and best["aspect"] in ("1:1", "4:5")
        left, top, right, bottom = best["box"]
        x1, y1, x2, y2 = r.face_box
        w, h = Image.open(r.input).size
        assert 0 <= left <= x1 + 1 and 0 <= top <= y1 + 1 and x2 - 1 <= right <= w + 1 and y2 - 1 <= bottom <= h + 1
    assert rows[2].best_crop["candidates"] > 20  # the astronaut: a small face in a large photo
    boxes = candidate_boxes(np.array([100, 100, 150, 160]), 400, 500)
    assert {a for _, a in boxes} == {"1:1", "4:5"} and all(b[2] <= 400 and b[3] <= 500 for b, _ in boxes)
    four_five = [b for b, a in boxes if a == "4:5"]
    assert all(abs((b[3] - b[1]) / (b[2] - b[0]) - 1.25) < 0.05 for b in four_five)


def test_a_portrait_crop_can_win_scored_on_its_own_pixels(model):
    """A 4:5 crop is scored as the mean of its two inscribed squares, never padded with black:
    a photo whose best content runs tall lets a 4:5 crop win."""
    from scoring.best_crop import best_crop, inscribed_squares
    from scoring.model import ModelSpec

    assert inscribed_squares((0, 0, 100, 125)) == [(0, 0, 100, 100), (0, 25, 100, 125)]
    assert inscribed_squares((5, 5, 50, 50)) == [(5, 5, 50, 50)]

    class Brightness:  # a model whose preference is known: the brighter the input, the likelier
        spec = ModelSpec(run_id="b", backbone="none", norm="none", score_head=False, image_size=32,
                         face_margin=0.6, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

        def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return (batch.mean(axis=(1, 2, 3)) - 0.5) * 20, batch.mean(axis=(2, 3))

    # Brighter towards the bottom, the face near the top: the squares that hold the face cannot
    # reach the bright rows the whole-width portrait crop takes in.
    rgb = np.repeat((np.arange(500) / 500 * 255).astype(np.uint8)[:, None, None], 400, axis=1).repeat(3, axis=2)
    found = best_crop(Brightness(), rgb, np.array([170, 150, 230, 210], dtype=np.float32))
    assert found["best"]["aspect"] == "4:5", found
    assert found["best"]["box"] == [0, 0, 400, 500]


def test_save_crop_writes_the_best_crop_as_an_image(model_root, tmp_path):
    out = tmp_path / "crops"
    res = _cli(str(FACES[2]), "--save-crop", str(out), env_root=model_root)
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout.splitlines()[0])
    saved = Path(row["best_crop"]["saved"])
    assert saved == out / f"{Path(FACES[2]).stem}.best.jpg"
    crop = Image.open(saved)
    assert crop.format == "JPEG" and min(crop.size) > 16
