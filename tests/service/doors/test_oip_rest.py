"""The Open Inference Protocol routes: tritonclient's calls against a real server (the fake engine over a socket, and
the bundled model in a real process, whose detections must equal ``/detect``'s), and the protocol's error shape."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.doors import oip_rest as oip_routes
from service.doors.oip import HEADER_LENGTH, parse_infer_request
from tests.image_files import encode
from tests.service.fakes import INPUT_SIZE, FakeEngine, app_client, fake_settings
from tests.service.server import metric_value, running_server, serving_in_thread

BUS = Path(importlib.util.find_spec("ultralytics").origin).parent / "assets" / "bus.jpg"
PNG = encode(np.full((48, 64, 3), 90, dtype=np.uint8))
OUTPUTS = ["num_dets", "det_boxes", "det_scores", "det_classes"]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 120))


def image_input(files: list[bytes], binary: bool = True) -> triton.InferInput:
    """Input ``IMAGE``: the files as they are (binary extension), or in base64 (JSON)."""
    image = triton.InferInput("IMAGE", [len(files)], "BYTES")
    elements = files if binary else [base64.b64encode(data) for data in files]
    image.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return image


def json_request(files: list[bytes], **fields) -> dict:
    data = [base64.b64encode(data).decode() for data in files]
    return {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [len(files)], "data": data}], **fields}


def test_tritonclient_calls_against_the_fake_engine_over_a_socket():
    """Every call tritonclient makes, the binary and the JSON form, and a swap through the repository API."""
    loaded = FakeEngine(version="1")
    app = create_app(fake_settings(api_key="k"), [FakeEngine()], lambda source: loaded)

    def key() -> dict[str, str]:
        return {"x-api-key": "k"}  # a new dict each call: tritonclient's infer adds its own headers to the one given

    with serving_in_thread(app) as (url, _):
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            assert client.is_server_live() and client.is_server_ready()
            server = client.get_server_metadata()
            model = client.get_model_metadata("fake", headers=key())
            assert client.is_model_ready("fake", headers=key()) and client.is_model_ready("fake", "0", headers=key())
            binary = client.infer("fake", [image_input([PNG, PNG])], headers=key(), parameters={"max_det": 5})
            requested = [triton.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS]
            as_json = client.infer(
                "fake", [image_input([PNG], binary=False)], outputs=requested, headers=key(), request_id="r1"
            )
            with pytest.raises(InferenceServerException) as unauthorized:
                client.infer("fake", [image_input([PNG])])
            with pytest.raises(InferenceServerException) as wrong_version:
                client.infer("fake", [image_input([PNG])], model_version="9", headers=key())
            client.load_model("fake", headers=key())
            after = client.infer("fake", [image_input([PNG])], headers=key())
            index = client.get_model_repository_index(headers=key())
        finally:
            client.close()
    assert server["name"] == "akconv-detector" and "binary_tensor_data" in server["extensions"]
    assert model["name"] == "fake" and model["versions"] == ["0"] and model["platform"] == "pytorch"
    assert model["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert [output["name"] for output in model["outputs"]] == OUTPUTS
    # The fake engine answers one star over the centre half of the model input: in a 64x48 image, letterboxed
    # to 64x64 at scale 1 with 8 px of padding above, that is (16, 8)-(48, 40).
    assert binary.as_numpy("num_dets").tolist() == [[1], [1]]
    assert binary.as_numpy("det_boxes").shape == (2, 5, 4) and binary.as_numpy("det_boxes").dtype == np.float32
    assert binary.as_numpy("det_boxes")[0, 0].tolist() == [16, 8, 48, 40] and INPUT_SIZE == 64
    assert binary.as_numpy("det_scores")[:, 0].tolist() == pytest.approx([0.9, 0.9])
    assert binary.as_numpy("det_classes")[:, :2].tolist() == [[1, 0], [1, 0]]
    assert as_json.get_response()["id"] == "r1" and as_json.get_response()["model_version"] == "0"
    assert as_json.as_numpy("det_boxes").shape == (1, 100, 4), "K = max_det, the default 100"
    assert unauthorized.value.status() == "401"
    assert wrong_version.value.status() == "404" and "live version is '0'" in wrong_version.value.message()
    assert after.get_response()["model_version"] == "1"
    assert index == [{"name": "fake", "version": "1", "state": "READY"}]


@pytest.mark.parametrize(
    "path,body,status,words",
    [
        ("/v2/models/nope/infer", json_request([PNG]), 404, "no model named 'nope'"),
        ("/v2/models/fake/infer", {"inputs": []}, 400, "IMAGE"),
        ("/v2/models/fake/infer", json_request([PNG] * 3), 400, "at most 2 per request"),
        ("/v2/models/fake/infer", json_request([b"not an image"]), 415, "not an image"),
        ("/v2/models/fake/infer", json_request([PNG], parameters={"classes": ["unicorn"]}), 400, "unknown class"),
        ("/v2/models/fake/infer", json_request([PNG], parameters={"conf": 2}), 400, "conf"),
    ],
    ids=["unknown-model", "no-input", "too-many-images", "not-an-image", "unknown-class", "conf"],
)
def test_errors_are_the_protocols_json(path, body, status, words):
    async def scenario():
        async with app_client(fake_settings(max_batch_files=2)) as (client, _):
            return await client.post(path, json=body)

    response = run(scenario())
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and words in response.json()["error"]


def test_classes_by_name_conf_and_the_request_metrics():
    async def scenario():
        async with app_client() as (client, _):
            stars = await client.post("/v2/models/fake/infer", json=json_request([PNG], parameters={"classes": "star"}))
            none = await client.post("/v2/models/fake/infer", json=json_request([PNG], parameters={"conf": 0.95}))
            return stars, none, (await client.get("/metrics")).text

    stars, none, metrics = run(scenario())
    outputs = {output["name"]: output["data"] for output in stars.json()["outputs"]}
    assert outputs["num_dets"] == [1] and outputs["det_classes"][0] == 1
    assert {o["name"]: o["data"] for o in none.json()["outputs"]}["num_dets"] == [0]
    assert metric_value(metrics, 'detector_requests_total{endpoint="/v2/models/{name}/infer",status="200"}') == 2
    assert metric_value(metrics, 'detector_batch_size_count{model="fake"}') == 2


def test_not_ready_is_503_in_the_protocols_shape():
    async def scenario():
        async with app_client() as (client, app):
            app.state.service.draining = True
            return await client.get("/v2/health/ready"), await client.get("/v2/models/fake/ready")

    server, model = run(scenario())
    assert server.status_code == model.status_code == 503 and "not ready" in server.json()["error"]


@pytest.mark.e2e
def test_tritonclient_detections_equal_detect_on_the_bundled_model(tmp_path):
    """A real server on the bundled model: tritonclient's detections (binary and JSON) are ``/detect``'s, image by
    image, for a real photo and a synthetic sample in one request."""
    import httpx

    photos = [BUS.read_bytes(), (Path(__file__).parents[3] / "service" / "static" / "sample.jpg").read_bytes()]
    with running_server(tmp_path) as server:
        expected = [
            httpx.post(server.url + "/detect", params={"conf": 0.1}, content=photo,
                       headers={"content-type": "image/jpeg"}, timeout=120).json()
            for photo in photos
        ]  # fmt: skip
        client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
        try:
            name = client.get_model_repository_index()[0]["name"]
            results = [
                client.infer(name, [image_input(photos, binary)], parameters={"conf": 0.1}) for binary in (True, False)
            ]
        finally:
            client.close()
    assert any(answer["detections"] for answer in expected), "the comparison needs detections"
    for result in results:
        assert result.get_response()["model_version"] == expected[0]["model"]["version"]
        for index, answer in enumerate(expected):
            count = int(result.as_numpy("num_dets")[index, 0])
            assert count == len(answer["detections"])
            boxes = [[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in answer["detections"]]
            np.testing.assert_allclose(result.as_numpy("det_boxes")[index, :count], boxes, atol=0.051)  # /detect rounds
            scores = [d["confidence"] for d in answer["detections"]]
            assert result.as_numpy("det_scores")[index, :count].tolist() == pytest.approx(scores, abs=1e-4)
            classes = [d["class_id"] for d in answer["detections"]]
            assert result.as_numpy("det_classes")[index, :count].tolist() == classes


def test_requests_are_parsed_on_the_parse_thread_not_the_event_loop(monkeypatch):
    """Parsing grows with the body (base64, copies): it runs on the parse thread, as image headers do."""
    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return parse_infer_request(*args, **kwargs)

    monkeypatch.setattr(oip_routes, "parse_infer_request", recording)

    async def scenario():
        async with app_client() as (client, _):
            return await client.post("/v2/models/fake/infer", json=json_request([PNG]))

    assert run(scenario()).status_code == 200
    assert len(threads) == 1 and threads[0].startswith("parse"), threads


def test_a_compressed_body_is_refused_before_it_is_read():
    """415, not the 413 its size would earn once read: the header says enough."""

    async def scenario():
        async with app_client(fake_settings(max_upload_bytes=1024)) as (client, _):
            headers = {"content-encoding": "gzip", "content-type": "application/json"}
            return await client.post("/v2/models/fake/infer", content=b"\0" * 4096, headers=headers)

    response = run(scenario())
    assert response.status_code == 415 and "uncompressed" in response.json()["error"]


HUGE = "n" * 20_000
LONG_HEADER = "n" * 10_000  # within max_header_bytes (16 KiB), or the answer would be a 431 quoting nothing
ONE_IMAGE = json_request([PNG])


@pytest.mark.parametrize(
    ("method", "path", "request_args", "status"),
    [
        ("GET", f"/v2/models/{HUGE}", {}, 404),
        ("POST", f"/v2/models/{HUGE}/infer", {"json": ONE_IMAGE}, 404),
        ("POST", f"/v2/repository/models/{HUGE}/load", {}, 404),
        ("GET", f"/v2/models/fake/versions/{HUGE}", {}, 404),
        ("POST", "/v2/models/fake/infer", {"json": json_request([PNG], parameters={"classes": HUGE})}, 400),
        ("POST", "/v2/models/fake/infer", {"json": json_request([PNG], parameters={"conf": HUGE})}, 400),
        ("POST", "/v2/models/fake/infer", {"json": ONE_IMAGE, "headers": {HEADER_LENGTH: LONG_HEADER}}, 400),
        ("POST", "/v2/models/fake/infer", {"json": ONE_IMAGE, "headers": {"content-encoding": LONG_HEADER}}, 415),
    ],
    ids=["model", "infer-model", "load-model", "version", "class", "parameter", "header-length", "content-encoding"],
)  # fmt: skip
def test_a_huge_value_is_quoted_short_in_the_error(method, path, request_args, status):
    async def scenario():
        async with app_client() as (client, _):
            return await client.request(method, path, **request_args)

    response = run(scenario())
    assert response.status_code == status, response.text[:300]
    message = response.json()["error"]
    assert len(message) < 300 and "nnn..." in message, message[:300]
