"""The SCRFD detector and its decoder on real photos shipped by installed packages."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import load_config
from pipeline.faces import detector as detector_mod
from pipeline.faces.decode import DecodeError, decode_fitted, fit_size
from pipeline.faces.detector import (
    DetectorError,
    FaceDetector,
    cuda_device_present,
    file_sha256,
    resolve_model_path,
    select_providers,
)
from tests.fixtures.faces import photo_bytes, photo_path, truncated_jpeg


def detect(detector: FaceDetector, data: bytes):
    return detector.detect_fitted(decode_fitted(data, detector.det_size))


# ---------------------------------------------------------------- counts on real photos


@pytest.mark.parametrize("name, expected", [
    ("t1", 6),  # insightface's group photo
    ("astronaut", 1),  # scikit-image: Eileen Collins
    ("tom_hanks", 1),  # a 112x112 close-up: found only by the fallback pass
    ("chelsea", 0),  # a cat
    ("coffee", 0),
    ("mask_black", 0), ("mask_blue", 0), ("mask_green", 0), ("mask_white", 0),  # face-mask textures
])
def test_face_counts_on_package_photos(face_detector, name, expected):
    faces = detect(face_detector, photo_bytes(name))
    assert len(faces) == expected, [round(f.score, 3) for f in faces]
    assert all(f.score >= face_detector.det_thresh for f in faces)


def test_tight_close_up_needs_the_fallback_size(faces_model):
    """insightface 2.1's lesson: at 640 alone SCRFD misses Tom_Hanks_54745.png."""
    data = photo_bytes("tom_hanks")
    cfg = load_config(overrides=[f"faces.model={faces_model}", "faces.providers=CPUExecutionProvider",
                                 "faces.fallback_det_size=0"])
    assert detect(FaceDetector(cfg.faces), data) == []
    cfg.faces.fallback_det_size = 320
    with_fallback = FaceDetector(cfg.faces)
    (face,) = detect(with_fallback, data)
    assert with_fallback.stats.second_passes == 1
    # the face fills the crop: box and landmarks inside the 112x112 image
    assert 0 <= face.x1 < 30 and 80 < face.x2 <= 112 and face.y2 - face.y1 > 60
    xs, ys = face.landmarks[0::2], face.landmarks[1::2]
    assert all(0 < v < 112 for v in xs + ys)


def test_boxes_match_insightface_in_original_pixels(face_detector):
    """Same boxes, scores and landmarks as insightface's own SCRFD.detect at 640, within ~1 px."""
    import cv2

    bgr = cv2.imread(str(photo_path("t1")))
    ref_boxes, ref_kps = face_detector.model.detect(bgr, input_size=(640, 640))
    ours = detect(face_detector, photo_bytes("t1"))
    assert len(ours) == len(ref_boxes) == 6
    ref = sorted(zip(ref_boxes.tolist(), ref_kps.reshape(-1, 10).tolist(), strict=True))
    got = sorted(([f.x1, f.y1, f.x2, f.y2, f.score], list(f.landmarks)) for f in ours)
    for (rb, rk), (gb, gk) in zip(ref, got, strict=True):
        np.testing.assert_allclose(gb[:4], rb[:4], atol=1.5)
        assert abs(gb[4] - rb[4]) < 0.01
        np.testing.assert_allclose(gk, rk, atol=1.5)


@pytest.mark.parametrize("height, width, size, canvas", [
    (443, 640, 640, (480, 640)),  # t1 at 640: one 32-px cell below, rounded up
    (480, 640, 640, (512, 640)),
    (640, 512, 640, (640, 544)),
    (640, 640, 640, (640, 640)),  # never beyond det_size
    (630, 640, 640, (640, 640)),
    (160, 320, 320, (192, 320)),  # the fallback pass
    (1, 640, 640, (64, 640)),
])
def test_cpu_canvas_is_the_picture_plus_one_cell(face_detector, height, width, size, canvas):
    assert face_detector.canvas_shape(height, width, size) == canvas
    rgb = np.full((height, width, 3), 255, np.uint8)
    blob = face_detector.blob(rgb, size)
    assert blob.shape == (1, 3, *canvas) and blob.dtype == np.float32
    assert blob[0, :, :height, :width].min() == blob.max() == (255 - 127.5) / 128
    assert blob[0, :, height:, :].size == 0 or blob[0, :, height:, :].max() == -127.5 / 128  # letterbox


def test_cut_canvas_finds_the_faces_of_the_square_one(face_detector):
    """The cut canvas (CPU) and insightface's full 640x640 letterbox give the same faces on t1."""
    img = decode_fitted(photo_bytes("t1"), 640)
    h, w = img.rgb.shape[:2]
    square = np.full((1, 3, 640, 640), -127.5 / 128, np.float32)
    square[0, :, :h, :w] = (img.rgb.transpose(2, 0, 1) - 127.5) / 128
    ref = face_detector.faces_from_outputs(face_detector.run(square), 0, (640, 640), img, (w, h))
    cut = face_detector.blob(img.rgb, 640)
    assert cut.shape[2:] == (480, 640)
    got = face_detector.detect_fitted(img, cut)
    assert len(got) == len(ref) == 6
    for a, b in zip(sorted(ref, key=lambda f: f.x1), sorted(got, key=lambda f: f.x1), strict=True):
        np.testing.assert_allclose([b.x1, b.y1, b.x2, b.y2], [a.x1, a.y1, a.x2, a.y2], atol=1.5)
        assert abs(a.score - b.score) < 0.01


def test_exif_orientation_is_applied(face_detector):
    """A phone photo stored sideways with EXIF orientation 6 is detected upright."""
    upright = Image.open(photo_path("astronaut")).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=92, exif=exif)
    img = decode_fitted(buf.getvalue(), 640)
    assert (img.width, img.height) == upright.size
    faces = face_detector.detect_fitted(img)
    assert len(faces) == 1
    assert faces[0].y1 < upright.height / 2  # the astronaut's face is in the upper half


# ---------------------------------------------------------------- decoding


def test_large_jpeg_is_decoded_at_reduced_size():
    big = Image.open(photo_path("t1")).convert("RGB").resize((2560, 1772))
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    img = decode_fitted(buf.getvalue(), 640)
    assert img.rgb.shape == (443, 640, 3) and img.rgb.dtype == np.uint8
    assert (img.width, img.height) == (2560, 1772)
    assert fit_size(2560, 1772, 640) == (640, 443)


def test_small_image_is_scaled_up_like_scrfd_does():
    img = decode_fitted(photo_bytes("tom_hanks"), 640)
    assert img.rgb.shape == (640, 640, 3) and (img.width, img.height) == (112, 112)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"this is not an image", "cannot decode"),
    (truncated_jpeg(), "truncated"),
    (photo_bytes("t1")[:200], "cannot decode"),
])
def test_undecodable_bytes_raise_decode_error(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_fitted(data, 640)


def test_pixel_limit_guards_against_decompression_bombs():
    buf = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(buf, "PNG")
    with pytest.raises(DecodeError, match="too large"):
        decode_fitted(buf.getvalue(), 640, max_pixels=4_000_000)


def test_grayscale_and_rgba_images_decode_to_rgb():
    for mode in ("L", "RGBA", "P"):
        buf = io.BytesIO()
        Image.new(mode, (50, 40)).save(buf, "PNG")
        assert decode_fitted(buf.getvalue(), 64).rgb.shape == (51, 64, 3)


# ---------------------------------------------------------------- model resolution, providers


def test_empty_model_means_the_shipped_detector():
    cfg = load_config(env={}).faces
    assert cfg.model == ""
    path = resolve_model_path(cfg)
    assert path == detector_mod.SHIPPED_MODEL and path.is_file()
    assert file_sha256(path) == detector_mod.SHIPPED_MODEL_SHA256


def test_a_damaged_shipped_detector_is_refused(tmp_path, monkeypatch):
    damaged = tmp_path / "det_500m.onnx"
    damaged.write_bytes(detector_mod.SHIPPED_MODEL.read_bytes()[:-1])
    monkeypatch.setattr(detector_mod, "SHIPPED_MODEL", damaged)
    with pytest.raises(DetectorError, match="sha256 .* expected 5e4447f5"):
        resolve_model_path(load_config(env={}).faces)


def test_model_path_forms(tmp_path, faces_model):
    cfg = load_config().faces
    cfg.model = str(faces_model)
    assert resolve_model_path(cfg) == faces_model
    pack = tmp_path / "root" / "models" / "mypack"
    pack.mkdir(parents=True)
    (pack / "det_500m.onnx").symlink_to(faces_model)
    for form in (pack, tmp_path / "root"):  # a pack folder, or an insightface root
        cfg.model = str(form)
        assert resolve_model_path(cfg) == pack / "det_500m.onnx"
    cfg.model = str(tmp_path / "nothing.onnx")
    with pytest.raises(DetectorError, match="no such file"):
        resolve_model_path(cfg)


def test_pack_name_offline_says_what_to_set(tmp_path, monkeypatch):
    import insightface.utils.storage as storage

    def offline(*_a, **_k):
        raise ConnectionError("no route to github.com")

    monkeypatch.setattr(storage, "download_file", offline)
    cfg = load_config().faces
    cfg.model = "buffalo_l"
    with pytest.raises(DetectorError, match=r"buffalo_l.*could not be downloaded.*LIKERANK_FACES__MODEL"):
        resolve_model_path(cfg, insightface_root=str(tmp_path))


def test_pack_name_already_downloaded_is_used(tmp_path, faces_model):
    pack = tmp_path / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "det_10g.onnx").symlink_to(faces_model)
    (pack / "w600k_r50.onnx").write_bytes(b"recognition model, not ours")
    cfg = load_config().faces
    cfg.model = "buffalo_l"
    assert resolve_model_path(cfg, insightface_root=str(tmp_path)) == pack / "det_10g.onnx"


def test_providers_are_filtered_to_what_onnxruntime_has():
    have = ["CPUExecutionProvider"]
    assert select_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], have) == ["CPUExecutionProvider"]
    with pytest.raises(DetectorError, match="none is available"):
        select_providers(["CUDAExecutionProvider"], have)


def test_detector_reports_provider_and_id(face_detector, faces_model):
    from pipeline.faces.detector import file_sha256

    assert face_detector.provider == "CPUExecutionProvider"
    assert face_detector.detector_id == file_sha256(faces_model) and len(face_detector.detector_id) == 64


def test_cuda_requested_on_a_cpu_machine_says_so(faces_model, caplog):
    """A warning where the CUDA build is installed and still fell back (a lost GPU); with the
    CPU build, CPU is what there is, and the line is information, not a warning on every call."""
    import onnxruntime

    if cuda_device_present():
        pytest.skip("CUDA is here; the fallback cannot happen")
    cfg = load_config(overrides=[f"faces.model={faces_model}",
                                 "faces.providers=CUDAExecutionProvider,CPUExecutionProvider"])
    with caplog.at_level("INFO"):
        assert FaceDetector(cfg.faces).provider == "CPUExecutionProvider"
    said = [r for r in caplog.records if "CUDAExecutionProvider was requested" in r.getMessage()]
    cuda_build = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert [r.levelname for r in said] == ["WARNING" if cuda_build else "INFO"]


def test_not_a_detector_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "det_bad.onnx"
    bad.write_bytes(b"not onnx")
    cfg = load_config(overrides=[f"faces.model={bad}", "faces.providers=CPUExecutionProvider"])
    with pytest.raises(DetectorError, match="det_bad.onnx"):
        FaceDetector(cfg.faces)


@pytest.mark.gpu
def test_gpu_detection_runs_on_cuda(faces_model):
    if not cuda_device_present():
        pytest.skip("needs onnxruntime's CUDAExecutionProvider and a CUDA device")
    cfg = load_config(overrides=[f"faces.model={faces_model}", "faces.providers=CUDAExecutionProvider"])
    detector = FaceDetector(cfg.faces)
    assert detector.provider == "CUDAExecutionProvider" and detector.on_gpu
    assert len(detect(detector, photo_bytes("t1"))) == 6
    assert len(detect(detector, photo_bytes("tom_hanks"))) == 1
