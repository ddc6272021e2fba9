"""Served models: several in one process, and a new version swapped in without downtime (service/core/models.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from model.checkpoint import DEFAULT_BUNDLE, METADATA_FILE, WEIGHTS_FILE, CorruptModel
from service.core import models
from service.core.engine import ModelCheckFailed
from service.core.models import ModelSource
from service.process.settings import Settings
from tests.image_files import encode
from tests.service.fakes import FakeEngine, app_client, fake_settings
from tests.service.server import metric_value, running_server

PNG = encode(np.full((48, 64, 3), 90, dtype=np.uint8))
TWO_MODELS = {"shapes": "/models/shapes", "parts": "/models/parts/best.pt"}


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 120))


def loader_of(*engines: FakeEngine):
    """A loader answering ``engines`` in turn (one per load), recording the sources it was asked for."""
    queue = list(engines)

    def load(source: ModelSource) -> FakeEngine:
        load.sources.append(source)
        engine = queue.pop(0)
        if isinstance(engine, Exception):
            raise engine
        return engine

    load.sources = []
    return load


def test_several_models_each_with_its_engine_name_and_metric_label():
    shapes, parts = FakeEngine(name="yolov10n-akconv"), FakeEngine(version="7", name="best-yolov10s-akconv")

    async def scenario():
        async with app_client(fake_settings(models=TWO_MODELS), [shapes, parts]) as (client, _):
            default = await client.post("/detect", files={"file": ("a.png", PNG)})
            chosen = await client.post("/detect", params={"model": "parts"}, files={"file": ("a.png", PNG)})
            batch = await client.post("/detect/batch", params={"model": "parts"}, files=[("files", ("a.png", PNG))])
            annotated = await client.post("/detect/annotated", params={"model": "parts"}, content=PNG,
                                          headers={"content-type": "image/png"})  # fmt: skip
            unknown = await client.post("/detect", params={"model": "nope"}, files={"file": ("a.png", PNG)})
            info = await client.get("/v1/model", params={"model": "parts"})
            config = await client.get("/v1/config")
            metrics = await client.get("/metrics")
            return default, chosen, batch, annotated, unknown, info, config, metrics.text

    default, chosen, batch, annotated, unknown, info, config, metrics = run(scenario())
    assert default.json()["model"] == {"name": "shapes", "version": "0"}
    assert chosen.json()["model"] == {"name": "parts", "version": "7"}
    assert batch.json()["results"][0]["model"] == {"name": "parts", "version": "7"}
    assert annotated.headers["x-model-version"] == "7"
    assert shapes.batches == [1] and parts.batches == [1, 1, 1]
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert "shapes, parts" in unknown.json()["error"]["message"]
    assert info.json()["name"] == "parts" and info.json()["version"] == "7"
    assert config.json()["models"] == TWO_MODELS
    assert metric_value(metrics, 'detector_batch_size_count{model="parts"}') == 3
    assert metric_value(metrics, 'detector_batch_size_count{model="shapes"}') == 1
    assert metric_value(metrics, 'detector_detections_total{class_name="star",model="parts"}') == 3
    info = 'detector_model_info{device="cpu",dtype="float32",model="parts",name="best-yolov10s-akconv",version="7"} 1'
    assert info in metrics
    assert metric_value(metrics, 'detector_queue_capacity{model="shapes"}') == 64


def test_the_models_load_in_order_when_not_given_and_a_single_model_keeps_its_own_name():
    loader = loader_of(FakeEngine(name="a-model"), FakeEngine(name="b-model"))

    async def scenario():
        async with app_client(fake_settings(models=TWO_MODELS), [], loader) as (client, _):
            return (await client.post("/detect", files={"file": ("a.png", PNG)})).json()

    assert run(scenario())["model"]["name"] == "shapes"
    assert [source.name for source in loader.sources] == ["shapes", "parts"]
    assert [str(source.path) for source in loader.sources] == list(TWO_MODELS.values())


@pytest.mark.parametrize(
    "values,message",
    [
        ({"models": TWO_MODELS, "model_path": "/models/x"}, "not both"),
        ({"models": {"has space": "/m"}}, "model name 'has space'"),
        ({"models": {"-dash": "/m"}}, "starting with a letter or digit"),
    ],
)
def test_model_settings_are_checked(values, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**values)


def test_models_from_the_environment_as_json(monkeypatch):
    monkeypatch.setenv("DETECTOR_MODELS", '{"shapes": "/models/shapes", "parts": "/models/parts/best.pt"}')
    assert {name: str(path) for name, path in Settings().models.items()} == TWO_MODELS


def test_sixteen_clients_across_a_swap_see_no_failure_and_versions_switch_once():
    """Concurrency 16, a swap in the middle: every request answered 200, readiness 200 throughout; each client sees
    version 0, then version 1, never 0 again; requests sent after the swap returned are all version 1."""
    old, new = FakeEngine(), FakeEngine(version="1")
    swapped_at: list[float] = []

    async def client_loop(client, answers: list, stop: asyncio.Event) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            response = await client.post("/detect", files={"file": ("a.png", PNG)})
            answers.append((sent, response.status_code, response.json().get("model", {}).get("version")))

    async def readiness(client, statuses: list, stop: asyncio.Event) -> None:
        while not stop.is_set():
            statuses.append((await client.get("/readyz")).status_code)
            await asyncio.sleep(0.005)

    async def scenario():
        async with app_client(fake_settings(), old, loader_of(new)) as (client, _):
            stop = asyncio.Event()
            answers = [[] for _ in range(16)]
            statuses: list[int] = []
            tasks = [asyncio.ensure_future(client_loop(client, answers[i], stop)) for i in range(16)]
            tasks.append(asyncio.ensure_future(readiness(client, statuses, stop)))
            while min(len(a) for a in answers) < 3:
                await asyncio.sleep(0.01)
            loaded = await client.post("/v2/repository/models/fake/load")
            swapped_at.append(time.monotonic())
            counts = [len(a) for a in answers]
            while any(len(a) < count + 3 for a, count in zip(answers, counts, strict=True)):
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*tasks)
            metrics = (await client.get("/metrics")).text
            return loaded, answers, statuses, metrics

    loaded, answers, statuses, metrics = run(scenario())
    assert loaded.status_code == 200 and loaded.json() == {"model_name": "fake", "model_version": "1"}
    everything = [answer for client in answers for answer in client]
    assert all(status == 200 for _, status, _ in everything)
    assert statuses and set(statuses) == {200}
    for client in answers:
        versions = [version for _, _, version in client]
        assert versions[0] == "0" and versions[-1] == "1"
        assert versions == sorted(versions), "a client saw the old version after the new one"
    assert all(version == "1" for sent, _, version in everything if sent > swapped_at[0])
    assert metric_value(metrics, 'detector_model_loads_total{model="fake",outcome="loaded"}') == 2
    assert 'version="1"' in metrics and 'version="0"' not in metrics


def test_requests_in_flight_finish_on_the_version_they_leased_and_then_it_stops():
    """The old version holds a batch at its engine and one more image queued while the swap happens: the swap does
    not wait for them, a new request runs on the new version at once, and the held ones are answered by the old
    version before it stops."""
    old, new = FakeEngine(), FakeEngine(version="1")

    async def scenario():
        async with app_client(fake_settings(max_batch_size=1), old, loader_of(new)) as (client, app):
            slot = app.state.service.models.get(None)
            old.gate.clear()
            running = asyncio.ensure_future(client.post("/detect", files={"file": ("a.png", PNG)}))
            await old.batch_started()
            queued = asyncio.ensure_future(client.post("/detect", files={"file": ("b.png", PNG)}))
            while not slot.depth:
                await asyncio.sleep(0.01)
            loaded = await client.post("/v2/repository/models/fake/load")
            fresh = await client.post("/detect", files={"file": ("c.png", PNG)})
            retiring_while_held = len(slot.retiring)
            old.gate.set()
            held = await asyncio.gather(running, queued)
            async with asyncio.timeout(10):
                while slot.retiring:
                    await asyncio.sleep(0.01)
            return loaded, fresh, held, retiring_while_held

    loaded, fresh, held, retiring_while_held = run(scenario())
    assert loaded.status_code == 200
    assert fresh.status_code == 200 and fresh.json()["model"]["version"] == "1"
    assert [response.json()["model"]["version"] for response in held] == ["0", "0"]
    assert retiring_while_held == 1 and old.batches == [1, 1] and new.batches == [1]


class FailsCheck(FakeEngine):
    def verify(self, shape):
        raise ModelCheckFailed("the model answered rows that are not finite (NaN or infinity)")


@pytest.mark.parametrize(
    "replacement,reason",
    [
        (CorruptModel("/models/shapes/model.safetensors does not match its recorded sha256"), "sha256"),
        (FailsCheck(version="1"), "not finite"),
    ],
    ids=["checksum", "forward"],
)
def test_a_failed_load_keeps_the_live_version(replacement, reason, caplog):
    async def scenario():
        async with app_client(fake_settings(), FakeEngine(), loader_of(replacement)) as (client, _):
            failed = await client.post("/v2/repository/models/fake/load")
            after = await client.post("/detect", files={"file": ("a.png", PNG)})
            ready = await client.get("/readyz")
            metrics = (await client.get("/metrics")).text
            return failed, after, ready, metrics

    failed, after, ready, metrics = run(scenario())
    assert failed.status_code == 400 and reason in failed.json()["error"]
    assert "version 0 keeps serving" in failed.json()["error"]
    assert after.status_code == 200 and after.json()["model"]["version"] == "0" and ready.status_code == 200
    assert metric_value(metrics, 'detector_model_loads_total{model="fake",outcome="failed"}') == 1
    assert any("keeps serving" in record.getMessage() and reason in record.getMessage() for record in caplog.records)


def test_the_same_version_again_is_not_swapped():
    async def scenario():
        async with app_client(fake_settings(), FakeEngine(), loader_of(FakeEngine())) as (client, app):
            first = app.state.service.models.get(None).live
            loaded = await client.post("/v2/repository/models/fake/load")
            return loaded, first is app.state.service.models.get(None).live, (await client.get("/metrics")).text

    loaded, same, metrics = run(scenario())
    assert loaded.status_code == 200 and same
    assert metric_value(metrics, 'detector_model_loads_total{model="fake",outcome="unchanged"}') == 1


def test_memory_goes_back_after_the_start_an_unchanged_reload_and_a_retired_version(monkeypatch):
    """The allocator is trimmed once the models are warm; an engine loaded only to be compared, and a retired version
    once it has stopped, are collected and trimmed (``release_memory``; the real figures: test_swap_memory.py)."""
    released: list[str] = []
    monkeypatch.setattr(models, "trim_allocator", lambda: released.append("trim"))
    monkeypatch.setattr(models, "release_memory", lambda: released.append("release"))

    async def scenario():
        loader = loader_of(FakeEngine(), FakeEngine(version="1"))
        async with app_client(fake_settings(), FakeEngine(), loader) as (client, app):
            slot = app.state.service.models.get(None)
            after_start = list(released)
            await client.post("/v2/repository/models/fake/load")  # version 0 again: unchanged
            after_unchanged = list(released)
            await client.post("/v2/repository/models/fake/load")  # version 1: 0 retires and stops
            async with asyncio.timeout(10):
                while slot.retiring or len(released) < 3:
                    await asyncio.sleep(0.01)
            return after_start, after_unchanged, list(released)

    assert run(scenario()) == (["trim"], ["trim", "release"], ["trim", "release", "release"])


def test_load_refuses_other_files_unknown_models_and_callers_without_the_key():
    loader = loader_of()

    async def scenario():
        async with app_client(fake_settings(api_key="k"), FakeEngine(), loader) as (client, _):
            key = {"x-api-key": "k"}
            return (
                await client.post("/v2/repository/models/fake/load"),
                await client.post("/v2/repository/models/other/load", headers=key),
                await client.post(
                    "/v2/repository/models/fake/load", headers=key, json={"parameters": {"config": "{}"}}
                ),
                await client.post("/v2/repository/index", headers=key),
            )

    no_key, unknown, files, index = run(scenario())
    assert no_key.status_code == 401 and "API key" in no_key.json()["error"]
    assert unknown.status_code == 404 and "no model named 'other'" in unknown.json()["error"]
    assert files.status_code == 400 and "configured path" in files.json()["error"]
    assert index.json() == [{"name": "fake", "version": "0", "state": "READY"}]
    assert loader.sources == [], "nothing was loaded"


@pytest.mark.e2e
def test_sighup_swaps_in_the_bundle_at_the_configured_path_and_refuses_a_damaged_one(tmp_path):
    """A real process: a new version written at the model's path goes live on SIGHUP; then a damaged one is
    refused with one log line and the live version keeps serving."""
    bundle = tmp_path / "shapes"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    metadata_file = bundle / METADATA_FILE
    with running_server(tmp_path, "--models", json.dumps({"shapes": str(bundle)})) as server:
        before = httpx.post(server.url + "/detect", files={"file": ("a.png", PNG)}, timeout=60).json()["model"]
        metadata = json.loads(metadata_file.read_text())
        metadata["version"] = "2099-01-01"  # the same weights as a new version: the checksum covers the weights
        metadata_file.write_text(json.dumps(metadata))
        server.process.send_signal(signal.SIGHUP)
        assert wait_for_version(server.url, "2099-01-01")
        after = httpx.post(server.url + "/detect", files={"file": ("a.png", PNG)}, timeout=60).json()["model"]

        weights = bundle / WEIGHTS_FILE
        damaged = bytearray(weights.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        weights.write_bytes(bytes(damaged))
        metadata["version"] = "2099-02-02"
        metadata_file.write_text(json.dumps(metadata))
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while "keeps serving" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        still = httpx.get(server.url + "/v1/model", timeout=10).json()["version"]
        ready = httpx.get(server.url + "/readyz", timeout=10).status_code
        log = server.log()
    assert before == {"name": "shapes", "version": json.loads((DEFAULT_BUNDLE / METADATA_FILE).read_text())["version"]}
    assert after == {"name": "shapes", "version": "2099-01-01"}
    assert "model swapped" in log
    assert "2099-01-01 keeps serving" in log and "sha256" in log
    assert still == "2099-01-01" and ready == 200


def wait_for_version(url: str, version: str, timeout: float = 120) -> bool:
    """Whether ``/v1/model`` names ``version`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/v1/model", timeout=10).json()["version"] == version:
            return True
        time.sleep(0.2)
    return False
