"""The Python client and the CLI against a real server; retry policy without one."""

import asyncio
import io
import json
import os
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from bench.processes import free_port
from model.synthetic import SPLITS, render
from service.client import AsyncDetectorClient, DetectorClient, DetectorError, _Policy
from service.schemas import DetectResponse
from tests.image_files import encode
from tests.service.server import REPO, running_server

SAMPLE = render(SPLITS["test"] + 3, 320)[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("client"), "--max-batch-size", "4", "--api-key", "k") as s:
        yield s


@pytest.mark.e2e
@pytest.mark.slow
class TestAgainstAServer:
    def test_sync_detect_batch_and_annotated(self, server, tmp_path):
        path = tmp_path / "sample.png"
        path.write_bytes(encode(SAMPLE))
        with DetectorClient(server.url, api_key="k") as client:
            result = client.detect(path, conf=0, max_det=5)
            assert isinstance(result, DetectResponse) and len(result.detections) == 5
            assert client.detect(encode(SAMPLE), classes=["star"], conf=0).detections[0].class_name == "star"
            assert [r.image.width for r in client.detect_batch([encode(SAMPLE), encode(SAMPLE[:160])])] == [320, 320]
            answered, refused = client.detect_batch([encode(SAMPLE), b"not an image"])
            assert isinstance(answered, DetectResponse)
            assert isinstance(refused, DetectorError)
            assert (refused.status, refused.code) == (415, "unsupported_media_type")
            drawn = Image.open(io.BytesIO(client.annotated(path, png=True)))
            assert drawn.format == "PNG" and drawn.size == (320, 320)
            assert Image.open(io.BytesIO(client.annotated(path))).format == "JPEG"
            assert client.model_info().classes == ["triangle", "star"]

    def test_errors_carry_the_server_code(self, server):
        with DetectorClient(server.url, api_key="wrong") as client, pytest.raises(DetectorError) as error:
            client.detect(encode(SAMPLE))
        assert (error.value.status, error.value.code) == (401, "unauthorized")
        with DetectorClient(server.url, api_key="k") as client, pytest.raises(DetectorError) as error:
            client.detect(b"not an image")
        assert (error.value.status, error.value.code) == (415, "unsupported_media_type")
        assert error.value.request_id

    def test_async_client(self, server):
        async def scenario():
            async with AsyncDetectorClient(server.url, api_key="k") as client:
                results = await asyncio.gather(*(client.detect(encode(SAMPLE), conf=0) for _ in range(4)))
                drawn = await client.annotated(encode(SAMPLE))
                return results, drawn

        results, drawn = asyncio.run(scenario())
        assert all(r.detections for r in results) and drawn[:2] == b"\xff\xd8"

    def test_cli_table_json_and_annotated_files(self, server, tmp_path):
        for folder, seed in (("a", 0), ("b", 1), ("a", 2)):
            path = tmp_path / folder / ("img.png" if seed < 2 else "other.png")
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(encode(render(SPLITS["test"] + seed, 320)[0]))
        inputs = ["a/img.png", "b/img.png", "a/other.png"]  # the same name in two folders
        command = [sys.executable, "-m", "service.cli", "--url", server.url, "--conf", "0"]
        env = {**os.environ, "DETECTOR_API_KEY": "k"}

        def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([*command, *args], capture_output=True, cwd=tmp_path, env=env, input=stdin)

        table = cli("--max-det", "2", *inputs)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.decode().strip().splitlines()
        assert lines[0].split() == ["image", "class", "conf", "x1", "y1", "x2", "y2"] and len(lines) == 1 + 3 * 2
        for _ in range(2):  # the second run must keep the first run's files and the inputs
            as_json = cli("--json", "--save-annotated", "a", *inputs)
            assert as_json.returncode == 0, as_json.stderr
        records = [json.loads(line) for line in as_json.stdout.splitlines()]
        assert [r["file"] for r in records] == inputs
        written = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*.annotated*.jpg"))
        expected = [f"{at}.annotated{suffix}.jpg" for at in ("a/img", "a/other", "b/img") for suffix in ("", "-1")]
        assert written == sorted(expected)
        assert Image.open(tmp_path / "a" / "img.png").format == "PNG", "the input itself is untouched"
        assert "100%" in as_json.stderr.decode(), "a progress bar for several images"
        piped = cli("--json", "-", stdin=(tmp_path / "a" / "img.png").read_bytes())
        assert piped.returncode == 0 and json.loads(piped.stdout)["detections"], piped.stderr

    def test_cli_reports_failures_with_status_1(self, server, tmp_path):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"nope")
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "--url", server.url, "--api-key", "k", str(bad)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert result.returncode == 1 and "unsupported_media_type" in result.stdout


def test_an_unreachable_server_is_one_line_and_exit_2_in_the_cli_and_a_detector_error_in_the_client(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with DetectorClient(url, retries=1, backoff=0.01) as client, pytest.raises(DetectorError) as error:
        client.detect(b"image")
    assert (error.value.status, error.value.code) == (0, "unreachable")
    image = tmp_path / "x.png"
    image.write_bytes(encode(SAMPLE))
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--url", url, str(image)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and url in result.stderr and "Traceback" not in result.stderr


def response(status: int, retry_after: str | None = None) -> httpx.Response:
    return httpx.Response(status, headers={"retry-after": retry_after} if retry_after else {})


def test_retry_policy_honours_retry_after_and_gives_up():
    policy = _Policy(retries=2, backoff=0.5, max_backoff=10)
    assert policy.delay(0, response(503, "3")) == 3
    assert policy.delay(0, response(503, "300")) == 10, "capped"
    assert policy.delay(1, response(503)) == 1.0, "exponential backoff without Retry-After"
    assert policy.delay(0, None) == 0.5, "connection errors are retried"
    assert policy.delay(2, response(503, "1")) is None, "at most `retries` retries"
    assert policy.delay(0, response(400)) is None and policy.delay(0, response(504)) is None


# A /detect answer without detections.
ANSWER = {
    "request_id": "r", "model": {"name": "m", "version": "1"}, "image": {"width": 1, "height": 1},
    "detections": [], "batch_size": 1,
    "timings_ms": {"queue": 0, "preprocess": 0, "inference": 0, "postprocess": 0, "total": 0},
}  # fmt: skip


def test_sync_client_retries_503_then_succeeds():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(
                503, headers={"retry-after": "0"}, json={"error": {"code": "queue_full", "message": "full"}}
            )
        return httpx.Response(200, json=ANSWER)

    client = DetectorClient("http://detector.invalid", backoff=0.01)
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    assert client.detect(b"img").request_id == "r" and len(calls) == 3

    calls.clear()
    client.policy.retries = 1
    with pytest.raises(DetectorError) as error:
        client.detect(b"img")
    assert error.value.code == "queue_full" and len(calls) == 2


def test_the_client_side_imports_no_torch():
    """The client, the CLI, the annotator and the response types install and import without torch."""
    code = (
        "import sys; import service.client, service.cli, service.core.annotate, service.schemas; "
        "print(sorted(m for m in ('torch', 'ultralytics', 'model') if m in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


def test_the_client_names_the_model_and_the_dedupe_threshold_in_the_query():
    queries = []

    def handler(request: httpx.Request) -> httpx.Response:
        queries.append(dict(request.url.params))
        return httpx.Response(200, json=ANSWER)

    client = DetectorClient("http://detector.invalid")
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    assert client.detect(b"img", model="parts", dedupe=0.7, conf=0.3).request_id == "r"
    assert queries == [{"model": "parts", "dedupe": "0.7", "conf": "0.3"}]
