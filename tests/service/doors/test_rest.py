"""Every route and every status code, in-process: the app on a fake engine through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from tests.image_files import encode
from tests.service.fakes import FakeEngine, app_client, fake_settings

PNG = encode(np.full((48, 64, 3), 90, dtype=np.uint8))
NOISE = encode(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))  # 400 px, no compression


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def error_code(response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]["code"]


def test_detect_answers_the_engine_rows_in_the_image_pixels():
    async def scenario():
        async with app_client() as (client, _):
            return await client.post("/detect", files={"file": ("a.png", PNG)}, params={"conf": 0.5})

    body = run(scenario()).json()
    assert body["image"] == {"width": 64, "height": 48}
    # the fake's box is the centre half of the 64x64 input; the 64x48 image sits in it with 8 px padding on top
    assert body["detections"] == [
        {"class_id": 1, "class_name": "star", "confidence": 0.9, "box": {"x1": 16.0, "y1": 8.0, "x2": 48.0, "y2": 40.0}}
    ]
    assert body["model"] == {"name": "fake", "version": "0"} and body["batch_size"] == 1


def test_raw_body_batch_and_annotated():
    async def scenario():
        async with app_client() as (client, _):
            raw = await client.post("/detect", content=PNG, headers={"content-type": "image/png"})
            batch = await client.post("/detect/batch", files=[("files", ("a.png", PNG)), ("files", ("b", b"text"))])
            drawn = await client.post("/detect/annotated", files={"file": ("a.png", PNG)})
            return raw, batch, drawn

    raw, batch, drawn = run(scenario())
    assert raw.status_code == 200 and raw.json()["file"] is None
    first, second = batch.json()["results"]
    assert first["image"]["width"] == 64 and second["status"] == 415
    assert (first["file"], second["file"]) == ("a.png", "b"), "each result names its file"
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/jpeg"
    assert drawn.headers["x-detections"] == "1"


def test_info_and_health_routes():
    async def scenario():
        async with app_client() as (client, _):
            return [await client.get(path) for path in ("/healthz", "/readyz", "/v1/model", "/v1/config", "/")]

    healthz, readyz, model, config, page = run(scenario())
    assert healthz.json() == {"status": "ok"} and readyz.json() == {"status": "ready"}
    assert model.json()["classes"] == ["triangle", "star"] and model.json()["dtype"] == "float32"
    assert config.json()["api_key"] is None
    assert config.json()["model_path"].endswith("yolov10n-akconv"), "the model in use, not null"
    assert model.json()["description"] == "Finds 2 classes: triangle, star."
    assert page.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    "request_args,status,code",
    [
        ({"params": {"conf": "2"}}, 400, "bad_request"),
        ({"params": {"classes": "unicorn"}}, 400, "bad_request"),
        ({"params": {"dedupe": "0"}}, 400, "bad_request"),
        ({"files": {"image": ("a.png", PNG)}}, 400, "bad_request"),
        ({"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400,
         "bad_request"),
        ({"content": b"x" * 2048, "headers": {"content-type": "image/png"}}, 415, "unsupported_media_type"),
        ({"content": PNG, "headers": {"content-type": "application/json"}}, 415, "unsupported_media_type"),
        ({"files": {"file": ("a.png", NOISE[: len(NOISE) // 2])}}, 422, "undecodable_image"),
        ({"files": {"file": ("a.png", encode(np.zeros((40, 40, 3), np.uint8)))}}, 422, "too_many_pixels"),
        ({"content": b"\0" * 5000, "headers": {"content-type": "image/png"}}, 413, "payload_too_large"),
        ({"files": {"file": ("a.png", PNG)}, "headers": {"x-big": "a" * 5000}}, 431, "headers_too_large"),
    ],
    ids=["conf", "class", "dedupe", "field", "multipart", "not-an-image", "content-type", "truncated", "pixels", "body",
         "headers"],
)  # fmt: skip
def test_client_errors(request_args, status, code):
    settings = fake_settings(max_upload_bytes=4096, max_image_pixels=1000, max_header_bytes=4096)

    async def scenario():
        async with app_client(settings) as (client, _):
            return await client.post("/detect", **request_args)

    response = run(scenario())
    assert response.status_code == status, response.text
    assert error_code(response) == code


def test_routing_errors_and_api_key():
    async def scenario():
        async with app_client(fake_settings(api_key="k")) as (client, _):
            return (
                await client.get("/nothing"),
                await client.get("/detect"),
                await client.post("/detect", files={"file": ("a.png", PNG)}),
                await client.post("/detect", files={"file": ("a.png", PNG)}, headers={"x-api-key": "k"}),
            )

    missing, wrong_method, no_key, with_key = run(scenario())
    assert (missing.status_code, error_code(missing)) == (404, "not_found")
    assert (wrong_method.status_code, error_code(wrong_method)) == (405, "method_not_allowed")
    assert (no_key.status_code, error_code(no_key)) == (401, "unauthorized")
    assert with_key.status_code == 200


def test_stalled_body_is_answered_408():
    async def stalled():
        yield PNG[:100]
        await asyncio.sleep(30)

    async def scenario():
        async with app_client(fake_settings(request_timeout_s=0.2)) as (client, _):
            return await client.post("/detect", content=stalled(), headers={"content-type": "image/png"})

    response = run(scenario())
    assert (response.status_code, error_code(response)) == (408, "request_timeout")


def test_inference_failure_is_500_and_the_next_request_succeeds():
    engine = FakeEngine()

    async def scenario():
        async with app_client(engine=engine) as (client, _):
            engine.fail = True
            failed = await client.post("/detect", files={"file": ("a.png", PNG)})
            engine.fail = False
            return failed, await client.post("/detect", files={"file": ("a.png", PNG)})

    failed, after = run(scenario())
    assert (failed.status_code, failed.json()["error"]) == (
        500,
        {"code": "inference_failed", "message": "inference failed: RuntimeError"},
    )
    assert after.status_code == 200


def test_full_queue_is_503_with_retry_after_and_the_deadline_504():
    engine = FakeEngine()
    settings = fake_settings(max_batch_size=1, max_queue=1, request_timeout_s=1)

    async def scenario():
        async with app_client(settings, engine) as (client, app):
            engine.gate.clear()
            batcher = app.state.service.models.get(None)
            running = asyncio.ensure_future(client.post("/detect", files={"file": ("a.png", PNG)}))
            await engine.batch_started()
            queued = asyncio.ensure_future(client.post("/detect", files={"file": ("b.png", PNG)}))
            while not batcher.depth:
                await asyncio.sleep(0.01)
            refused = await client.post("/detect", files={"file": ("c.png", PNG)})
            late = await queued  # waits in the queue past its 1 s deadline while the gate holds the worker
            engine.gate.set()
            return await running, refused, late

    first, refused, late = run(scenario())
    assert first.status_code == 200
    assert (refused.status_code, error_code(refused)) == (503, "queue_full")
    assert int(refused.headers["retry-after"]) >= 1
    assert (late.status_code, error_code(late)) == (504, "deadline_exceeded")


def test_not_ready_is_503_while_draining():
    async def scenario():
        async with app_client() as (client, app):
            app.state.service.draining = True
            return await client.post("/detect", files={"file": ("a.png", PNG)}), await client.get("/readyz")

    detect, ready = run(scenario())
    assert (detect.status_code, error_code(detect)) == (503, "not_ready")
    assert ready.status_code == 503 and detect.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    "classes",
    ["²", "١", "\x00", ",,,,", "", " , ", "1" * 5000, "star,unicorn"],
    ids=["superscript-two", "arabic-indic-one", "nul", "commas", "empty", "blank", "5000-digits", "one-unknown"],
)
def test_class_ids_are_ascii_digits_and_an_empty_list_is_refused(classes):
    async def scenario():
        async with app_client() as (client, _):
            return await client.post("/detect", files={"file": ("a.png", PNG)}, params={"classes": classes})

    response = run(scenario())
    assert (response.status_code, error_code(response)) == (400, "bad_request"), response.text


@pytest.mark.parametrize("classes,expected", [("1", 1), ("star", 1), (" 0 , star ", 1), ("triangle", 0)])
def test_classes_by_id_or_name(classes, expected):
    async def scenario():
        async with app_client() as (client, _):
            return await client.post("/detect", files={"file": ("a.png", PNG)}, params={"classes": classes})

    assert len(run(scenario()).json()["detections"]) == expected


@pytest.mark.parametrize(
    "width,height,fmt,accept",
    [(1, 100_000, "PNG", "image/jpeg"), (100_000, 1, "PNG", "image/png"), (65_500, 1, "JPEG", "image/jpeg"),
     (3000, 2000, "JPEG", "image/png"), (64, 48, "PNG", "image/jpeg")],
    ids=["1x100000-as-jpeg", "100000x1-as-png", "65500x1-jpeg", "3000x2000", "small"],
)  # fmt: skip
def test_annotated_answers_any_image_detect_accepts(width, height, fmt, accept):
    """The issue's thin images (JPEG sides over 65,535, font sizes over FreeType's limit) and a large one: drawn on
    a copy at most 2,048 pixels a side; a small image keeps its size."""
    data = encode(np.full((height, width, 3), 90, dtype=np.uint8), fmt)

    async def scenario():
        async with app_client() as (client, _):
            files = {"file": ("a", data)}
            return await client.post("/detect/annotated", files=files, headers={"accept": accept})

    response = run(scenario())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == accept and response.headers["x-detections"] == "1"
    drawn = Image.open(io.BytesIO(response.content))
    scale = min(1, 2048 / max(width, height))
    assert drawn.size == (max(1, round(width * scale)), max(1, round(height * scale)))


HUGE = "n" * 20_000


@pytest.mark.parametrize(
    ("path", "params"),
    [("/detect", {"classes": HUGE}), ("/detect", {"classes": f"star,{HUGE}"}), ("/v1/model", {"model": HUGE})],
    ids=["class", "second-class", "model"],
)
def test_a_huge_name_is_quoted_short_in_the_error(path, params):
    async def scenario():
        async with app_client() as (client, _):
            if path == "/v1/model":
                return await client.get(path, params=params)
            return await client.post(path, files={"file": ("a.png", PNG)}, params=params)

    response = run(scenario())
    message = response.json()["error"]["message"]
    assert response.status_code in (400, 404) and len(message) < 300 and "nnn..." in message, message[:300]


def test_a_file_name_is_echoed_at_most_255_characters():
    """No file system keeps a longer name; multipart lets a client send 4 KB of one, echoed in every result."""
    name = "n" * 4000 + ".png"

    async def scenario():
        async with app_client() as (client, _):
            files = [("files", (name, PNG)), ("files", (name, b"text"))]
            return await client.post("/detect/batch", files=files)

    found, refused = run(scenario()).json()["results"]
    assert found["file"] == refused["file"] == "n" * 252 + "..."
    assert refused["status"] == 415
