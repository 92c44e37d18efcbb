"""Scoring on an exported ONNX model needs no torch: a scoring fleet runs onnxruntime only.

The child process makes ``torch`` and ``torchvision`` unimportable (``None`` in ``sys.modules``:
any ``import torch`` raises), then imports every module of the ONNX path and scores real face
photos through ``likerank score --onnx``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.core.storage import LocalStorage
from scoring.torch_model import export_onnx, load_registry_model
from tests.fixtures.scoring import FACE_PHOTOS, NO_FACE_PHOTO

REPO = Path(__file__).resolve().parents[2]

#: Runs in the child: torch blocked, the ONNX path imported, then the CLI as ``likerank``.
CHILD = """
import runpy, sys
sys.modules.update(torch=None, torchvision=None)
import scoring.best_crop, scoring.model, scoring.score, scoring.serve
sys.argv = ["likerank", *sys.argv[1:]]
runpy.run_module("likerank.cli.main", run_name="__main__")
"""


def test_onnx_scoring_runs_with_torch_unimportable(model_root, tmp_path):
    onnx = export_onnx(load_registry_model(LocalStorage(model_root)), tmp_path / "model.onnx")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIKERANK_")}
    env["LIKERANK_STORAGE__ROOT"] = str(tmp_path / "no-registry")  # nothing to fall back on
    res = subprocess.run([sys.executable, "-c", CHILD, "score", "--onnx", str(onnx), FACE_PHOTOS[0], NO_FACE_PHOTO],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "halted; None in sys.modules" not in res.stderr, res.stderr  # nothing tried to import torch
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [row["status"] for row in rows] == ["ok", "no_face"], res.stderr
    assert 0.0 < rows[0]["prob"] < 1.0
    assert res.returncode == 1  # the documented code when an input has no face


def test_the_child_really_cannot_import_torch():
    """The blocker itself works: otherwise the test above would prove nothing."""
    res = subprocess.run([sys.executable, "-c", "import sys; sys.modules.update(torch=None); import torch"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "halted; None in sys.modules" in res.stderr
