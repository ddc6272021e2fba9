"""End-to-end: a real uvicorn process on loopback, real HTTP, the bundled model."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from bench.service_accuracy import rows as detection_rows
from model.build import fuse_for_inference
from model.checkpoint import DEFAULT_BUNDLE, load
from model.evaluate import MatchCounts, detect_synthetic
from model.synthetic import SPLITS, render
from tests.image_files import encode
from tests.service.server import metric_value, running_server

# The bundled model is served under its own name: its per-model series carry that label.
BATCHES = 'detector_batch_size_count{model="yolov10n-akconv"}'
SINGLES = 'detector_batch_size_bucket{le="1.0",model="yolov10n-akconv"}'

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BUS = Path(__import__("ultralytics").__file__).parent / "assets" / "bus.jpg"
METRIC_NAMES = [
    "detector_requests_total",
    "detector_request_duration_seconds_bucket",
    "detector_queue_wait_seconds_bucket",
    "detector_preprocess_duration_seconds_bucket",
    "detector_inference_duration_seconds_bucket",
    "detector_batch_size_bucket",
    "detector_queue_depth",
    "detector_queue_capacity",
    "detector_inflight_requests",
    "detector_ready",
    "detector_rejected_total",
    "detector_detections_total",
    "detector_model_info",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server"), "--max-batch-size", "8", "--max-batch-wait-ms", "20") as s:
        yield s


def post_image(url: str, data: bytes, filename="image.png", params=None, **kwargs) -> httpx.Response:
    return httpx.post(url + "/detect", files={"file": (filename, data)}, params=params, timeout=60, **kwargs)


@pytest.mark.parametrize("scale", [(1.0, 1.0), (1.5, 1.25), (0.8, 1.1)], ids=["as-trained", "larger", "non-square"])
def test_detections_on_synthetic_samples_match_the_truth(server, scale):
    """Boxes come back in the original image's pixels, whatever its size (letterbox undone)."""
    counts = MatchCounts()
    for seed in range(SPLITS["test"], SPLITS["test"] + 6):
        pixels, truth = render(seed, 320)
        width, height = round(320 * scale[0]), round(320 * scale[1])
        resized = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
        truth = truth * np.array([1, scale[0], scale[1], scale[0], scale[1]], dtype=np.float32)
        response = post_image(server.url, encode(resized))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["image"] == {"width": width, "height": height}
        counts.add(detection_rows(body), truth)
    # Floors of the bundled model, one box below what it measured (recall 12/14 at each size; precision 12/16,
    # 12/16, 12/17); a wrong box mapping scores near zero.
    assert counts.recall >= 0.78, f"recall {counts.hits}/{counts.truths}"
    assert counts.precision >= 0.65, f"precision {counts.hits}/{counts.detections}"


def test_service_answers_what_the_model_computes(server):
    """Same image, same model: the service's boxes are the model package's own, mapped to the same pixels."""
    loaded = load()
    detector = fuse_for_inference(loaded.model)
    seed = SPLITS["test"] + 4
    [(rows, _)] = detect_synthetic(detector, range(seed, seed + 1), 320, loaded.metadata.input_size)
    pixels, _ = render(seed, 320)
    rows = rows[rows[:, 4] >= 0.25]
    rows[:, :4] = rows[:, :4].clip(0, 320)  # the service clips boxes to the image; the raw head need not
    body = post_image(server.url, encode(pixels)).json()
    served = detection_rows(body)
    assert len(served) == len(rows) > 0
    np.testing.assert_allclose(served[:, :4], rows[:, :4], atol=0.1)
    np.testing.assert_allclose(served[:, 4], rows[:, 4], atol=1e-3)
    assert served[:, 5].tolist() == rows[:, 5].tolist()


def test_real_photo_answers_with_the_documented_shape(server):
    response = post_image(server.url, BUS.read_bytes(), "bus.jpg")
    assert response.status_code == 200
    body = response.json()
    assert body["image"] == {"width": 810, "height": 1080}
    assert set(body) == {"request_id", "file", "model", "image", "detections", "timings_ms", "batch_size"}
    assert set(body["timings_ms"]) == {"queue", "preprocess", "inference", "postprocess", "total"}
    assert body["request_id"] == response.headers["x-request-id"]
    for detection in body["detections"]:
        box = detection["box"]
        assert 0 <= box["x1"] <= box["x2"] <= 810 and 0 <= box["y1"] <= box["y2"] <= 1080


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_each_supported_format(server, fmt):
    pixels, _ = render(SPLITS["test"], 160)
    response = post_image(server.url, encode(pixels, fmt), f"image.{fmt.lower()}")
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": 160, "height": 160}


def test_raw_image_body(server):
    response = httpx.post(
        server.url + "/detect", content=BUS.read_bytes(), headers={"content-type": "image/jpeg"}, timeout=60
    )
    assert response.status_code == 200 and response.json()["image"]["width"] == 810


def test_query_filters(server):
    data = encode(render(SPLITS["test"] + 1, 320)[0])
    everything = post_image(server.url, data, params={"conf": 0.01, "max_det": 300}).json()["detections"]
    assert len(post_image(server.url, data, params={"conf": 0.01, "max_det": 2}).json()["detections"]) == 2
    stars = post_image(server.url, data, params={"conf": 0.01, "classes": "star"}).json()["detections"]
    assert stars and {d["class_name"] for d in stars} == {"star"}
    assert len(stars) == sum(d["class_name"] == "star" for d in everything)
    by_id = post_image(server.url, data, params={"conf": 0.01, "classes": "1"}).json()["detections"]
    assert by_id == stars


def test_batch_endpoint_answers_in_order(server):
    images = [encode(render(SPLITS["test"] + i, 96 + 32 * i)[0]) for i in range(3)]
    response = httpx.post(
        server.url + "/detect/batch", files=[("files", (f"{i}.png", d)) for i, d in enumerate(images)], timeout=60
    )
    assert response.status_code == 200
    assert [r["image"]["width"] for r in response.json()["results"]] == [96, 128, 160]


def test_batch_answers_a_bad_file_in_its_own_slot(server):
    good = encode(render(SPLITS["test"], 128)[0])
    files = [good, good[: len(good) // 2], b"plain text", good]
    before = httpx.get(server.url + "/metrics").text
    response = httpx.post(server.url + "/detect/batch", files=[("files", ("x.png", d)) for d in files], timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["image"]["width"] for r in (results[0], results[3])] == [128, 128]
    assert results[1]["status"] == 422 and results[1]["error"]["code"] == "undecodable_image"
    assert results[2]["status"] == 415 and results[2]["error"]["code"] == "unsupported_media_type"
    after = httpx.get(server.url + "/metrics").text
    rejected = 'detector_rejected_total{reason="bad_input"}'
    assert metric_value(after, rejected) - metric_value(before, rejected) == 2


def test_64_concurrent_requests_are_batched(server):
    before = httpx.get(server.url + "/metrics").text
    data = encode(render(SPLITS["test"] + 2, 320)[0])

    async def flood():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(client.post(server.url + "/detect", files={"file": ("x.png", data)}) for _ in range(64))
            )

    responses = asyncio.run(flood())
    assert [r.status_code for r in responses] == [200] * 64
    assert max(r.json()["batch_size"] for r in responses) > 1
    after = httpx.get(server.url + "/metrics").text
    batches = metric_value(after, BATCHES) - metric_value(before, BATCHES)
    singles = metric_value(after, SINGLES) - metric_value(before, SINGLES)
    assert singles < batches, "the histogram shows batches of more than one image"


@pytest.mark.parametrize(
    "params,status,code",
    [
        ({"conf": "abc"}, 400, "bad_request"),
        ({"conf": "2"}, 400, "bad_request"),
        ({"max_det": "0"}, 400, "bad_request"),
        ({"classes": "dog"}, 400, "bad_request"),
    ],
)
def test_bad_parameters(server, params, status, code):
    response = post_image(server.url, BUS.read_bytes(), params=params)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    "content,content_type,status,code",
    [
        (b"hello", "text/plain", 415, "unsupported_media_type"),
        (b"hello", "image/png", 415, "unsupported_media_type"),
        (BUS.read_bytes()[:4000], "image/jpeg", 422, "undecodable_image"),
        (b"", "image/png", 422, "undecodable_image"),
    ],
    ids=["text", "text-as-image", "truncated-jpeg", "empty"],
)
def test_bad_bodies(server, content, content_type, status, code):
    response = httpx.post(server.url + "/detect", content=content, headers={"content-type": content_type}, timeout=30)
    assert response.status_code == status, response.text
    assert response.json() == {"error": {"code": code, "message": response.json()["error"]["message"]}}
    assert "Traceback" not in response.text


def test_detect_and_annotated_find_the_same_boxes_in_a_large_jpeg(server):
    """One decode path for the model: the annotated route used to decode large JPEGs at full size (10 vs 8 boxes on
    bus.jpg with the earlier bundle; the current one finds nothing there, so large synthetic JPEGs with objects)."""
    for aspect in (1.0, 16 / 9):
        data = encode(render(SPLITS["test"] + 5, 1280, aspect)[0], "JPEG", quality=90)
        found = post_image(server.url, data, filename="large.jpg", params={"conf": 0.05}).json()
        drawn = httpx.post(
            server.url + "/detect/annotated", files={"file": ("large.jpg", data)}, params={"conf": 0.05}, timeout=60
        )
        assert drawn.status_code == 200 and int(drawn.headers["x-detections"]) == len(found["detections"]) > 0


def test_dedupe_keeps_one_box_where_boxes_overlap(server):
    def overlapping(detections: list[dict]) -> set[bool]:
        """Whether each pair overlapping above IoU 0.5 is of one class."""
        classes = [d["class_id"] for d in detections]
        boxes = torch.tensor([list(d["box"].values()) for d in detections]).reshape(-1, 4)
        pairs = torch.triu(box_iou(boxes, boxes) > 0.5, diagonal=1).nonzero().tolist()
        return {classes[a] == classes[b] for a, b in pairs}

    data = encode(render(SPLITS["test"] + 24, 640)[0])  # one object answered twice as a star, once as a triangle
    everything = post_image(server.url, data, params={"conf": 0.05}).json()["detections"]
    kept = post_image(server.url, data, params={"conf": 0.05, "dedupe": 0.5}).json()["detections"]
    assert overlapping(everything) == {True, False}
    assert 0 < len(kept) < len(everything) and overlapping(kept) == set()


def test_missing_file_field(server):
    response = httpx.post(server.url + "/detect", files={"image": ("x.png", BUS.read_bytes())}, timeout=30)
    assert response.status_code == 400 and "'file'" in response.json()["error"]["message"]


def test_info_endpoints(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    info = httpx.get(server.url + "/v1/model").json()
    assert info["classes"] == ["triangle", "star"] and info["akconv_layers"] == 2 and info["device"] == "cpu"
    assert (info["name"], info["checksum"], len(info["weights_sha256"])) == ("yolov10n-akconv", "verified", 64)
    assert info["provenance"]["val_metrics"]["mAP50"] > 0.9 and info["provenance"]["project_version"]
    assert info["runtime"]["requested"] == "eager" and set(info["runtime"]["shapes"].values()) == {"eager"}
    config = httpx.get(server.url + "/v1/config").json()
    assert config["max_batch_size"] == 8 and config["api_key"] is None
    assert info["workers"] == min(2, config["threads"]["intra_op_threads"]) and config["inference_workers"] is None
    assert httpx.get(server.url + "/nothing").json()["error"]["code"] == "not_found"
    assert "/detect" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_metrics_names_and_labels(server):
    post_image(server.url, BUS.read_bytes(), params={"conf": 0.0})
    text = httpx.get(server.url + "/metrics").text
    for name in METRIC_NAMES:
        assert re.search(rf"^{name}[{{ ]", text, re.MULTILINE), f"{name} missing"
    assert 'detector_requests_total{endpoint="/detect",status="200"}' in text
    assert 'detector_rejected_total{reason="queue_full"}' in text
    assert "detector_ready 1.0" in text
    version = json.loads((DEFAULT_BUNDLE / "model.json").read_text())["version"]
    assert re.search(rf'detector_model_info\{{.*device="cpu".*name="yolov10n-akconv".*version="{version}"\}} 1.0', text)
    assert 'detector_batch_size_bucket{le="64.0",model="yolov10n-akconv"}' in text


@pytest.fixture(scope="module")
def constrained(tmp_path_factory):
    flags = (
        "--max-batch-size", "1", "--max-batch-wait-ms", "0", "--max-queue", "2", "--api-key", "let-me-in",
        "--max-upload-bytes", "200000", "--max-image-pixels", "1000000", "--metrics-require-key",
        "--cors-origins", '["https://app.example"]',
    )  # fmt: skip
    with running_server(tmp_path_factory.mktemp("constrained"), *flags) as s:
        yield s


KEY = {"x-api-key": "let-me-in"}


def test_api_key_is_required_when_set(constrained):
    data = encode(render(0, 96)[0])
    assert post_image(constrained.url, data).status_code == 401
    assert post_image(constrained.url, data, headers={"x-api-key": "wrong"}).status_code == 401
    assert post_image(constrained.url, data, headers=KEY).status_code == 200
    assert post_image(constrained.url, data, headers={"authorization": "Bearer let-me-in"}).status_code == 200
    assert httpx.get(constrained.url + "/v1/config", headers=KEY).json()["api_key"] == "********"
    assert httpx.get(constrained.url + "/healthz").status_code == 200, "probes need no key"


def test_metrics_can_be_put_behind_the_key(constrained):
    assert httpx.get(constrained.url + "/metrics").status_code == 401
    assert httpx.get(constrained.url + "/metrics", headers={"authorization": "Bearer let-me-in"}).status_code == 200
    assert httpx.get(constrained.url + "/readyz").status_code == 200


def test_cors_allows_only_the_configured_origins(constrained):
    def preflight(origin: str) -> httpx.Response:
        headers = {
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-api-key",
        }
        return httpx.options(constrained.url + "/detect", headers=headers)

    allowed = preflight("https://app.example")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    refused = preflight("https://evil.example")
    assert "access-control-allow-origin" not in refused.headers


def test_body_over_the_limit_is_refused(constrained):
    response = post_image(constrained.url, b"\x00" * 300_000, headers=KEY)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_too_many_pixels(constrained):
    data = encode(np.zeros((1000, 1200, 3), np.uint8), "PNG")
    response = post_image(constrained.url, data, headers=KEY)
    assert response.status_code == 422 and response.json()["error"]["code"] == "too_many_pixels"


def test_full_queue_refuses_with_retry_after_and_answers_everything_accepted(constrained):
    data = encode(render(SPLITS["test"], 320)[0])

    async def flood():
        async with httpx.AsyncClient(timeout=120, headers=KEY) as client:
            return await asyncio.gather(
                *(client.post(constrained.url + "/detect", files={"file": ("x.png", data)}) for _ in range(24))
            )

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "queue_full"
            assert int(response.headers["retry-after"]) >= 1
    text = httpx.get(constrained.url + "/metrics", headers=KEY).text
    assert metric_value(text, 'detector_rejected_total{reason="queue_full"}') >= statuses.count(503)
    assert metric_value(text, 'detector_queue_depth{model="yolov10n-akconv"}') == 0
    capacity = metric_value(text, 'detector_queue_capacity{model="yolov10n-akconv"}')
    assert capacity == 2  # what the queue alert divides by


def test_batch_beyond_the_queue_bound_fails_as_a_whole(constrained):
    """The images still queued when the queue refuses one are cancelled, not computed for nobody."""

    def metrics() -> str:
        return httpx.get(constrained.url + "/metrics", headers=KEY).text

    computed_before = metric_value(metrics(), 'detector_batch_size_sum{model="yolov10n-akconv"}')
    data = encode(render(SPLITS["test"], 96)[0])
    files = [("files", ("x.png", data)) for _ in range(8)]  # the queue holds 2, batches hold 1
    response = httpx.post(constrained.url + "/detect/batch", files=files, headers=KEY, timeout=60)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "queue_full"
    for _ in range(100):  # the worker drops the cancelled images when its current batch is done
        if metric_value(text := metrics(), 'detector_queue_depth{model="yolov10n-akconv"}') == 0:
            break
        time.sleep(0.05)
    # The image in flight when the queue overflowed finishes (at most one more if a batch closed meanwhile);
    # the two queued ones do not run.
    assert metric_value(text, 'detector_queue_depth{model="yolov10n-akconv"}') == 0
    assert metric_value(text, 'detector_batch_size_sum{model="yolov10n-akconv"}') - computed_before <= 2


def test_deadlines_give_504(tmp_path):
    flags = ("--max-batch-size", "1", "--max-batch-wait-ms", "0", "--request-timeout-s", "0.3")
    with running_server(tmp_path, *flags) as server:
        data = encode(render(SPLITS["test"], 320)[0])

        async def flood():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(
                    *(client.post(server.url + "/detect", files={"file": ("x.png", data)}) for _ in range(24))
                )

        responses = asyncio.run(flood())
        statuses = [r.status_code for r in responses]
        # 408: with a 0.3 s deadline, some of the 24 concurrent uploads are still being read when it passes.
        assert 504 in statuses and set(statuses) <= {200, 408, 504}, statuses
        assert all(r.json()["error"]["code"] == "deadline_exceeded" for r in responses if r.status_code == 504)
        text = httpx.get(server.url + "/metrics").text
        assert metric_value(text, 'detector_rejected_total{reason="deadline"}') == statuses.count(504)


def test_sigterm_answers_everything_in_flight(tmp_path):
    with running_server(tmp_path, "--max-batch-size", "2") as server:
        data = encode(render(SPLITS["test"], 320)[0])

        async def flood_then_stop():
            async with httpx.AsyncClient(timeout=120) as client:
                requests = [
                    asyncio.ensure_future(client.post(server.url + "/detect", files={"file": ("x.png", data)}))
                    for _ in range(12)
                ]
                await asyncio.sleep(0.5)
                server.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*requests, return_exceptions=True)

        responses = asyncio.run(flood_then_stop())
        assert [getattr(r, "status_code", r) for r in responses] == [200] * 12
        # uvicorn re-raises the stop signal once drained, so the exit status is SIGTERM's
        assert server.process.wait(60) in (0, -signal.SIGTERM)
        assert '"message": "stopped"' in server.log()
