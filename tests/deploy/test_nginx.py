"""Debian's nginx with the project's own config in front of two real replicas on loopback."""

import asyncio
import contextlib
import re
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from bench.processes import free_port, running_process
from model.synthetic import render
from tests.deploy.tools import DEPLOY, tool
from tests.image_files import encode
from tests.service.server import running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
UPSTREAM = re.compile(r"^(\s*)server detector:8000 (.*);$", re.MULTILINE)
GRPC_UPSTREAM = re.compile(r"^(\s*)server detector:8001 (.*);$", re.MULTILINE)
IMAGE = encode(render(11, 320)[0])


def loopback_config(replica_urls: list[str], port: int, prefix: Path, grpc_addresses: list[str], grpc_port: int) -> str:
    """deploy/nginx/nginx.conf with the replicas' loopback addresses (REST, and gRPC: the REST ones stand in when
    none is given), loopback listeners, in the foreground."""
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    for upstream, addresses in (
        (UPSTREAM, [url.removeprefix("http://") for url in replica_urls]),
        (GRPC_UPSTREAM, grpc_addresses or [url.removeprefix("http://") for url in replica_urls]),
    ):
        indent, params = upstream.search(conf).groups()
        servers = "\n".join(f"{indent}server {address} {params};" for address in addresses)
        conf = upstream.sub(lambda _, servers=servers: servers, conf)
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("listen 8081 http2;", f"listen 127.0.0.1:{grpc_port} http2;")
    conf = conf.replace("access_log /dev/stdout", f"access_log {prefix / 'access.log'}")
    return f"daemon off;\npid {prefix / 'nginx.pid'};\n" + conf


@contextlib.contextmanager
def running_nginx(tmp_path: Path, replica_urls: list[str], grpc_addresses: list[str] = ()):
    """nginx in front of the replicas: yields its REST URL and its gRPC address."""
    port, grpc_port = free_port(), free_port()
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / name).mkdir(exist_ok=True)
    conf = loopback_config(replica_urls, port, tmp_path, list(grpc_addresses), grpc_port)
    temp_paths = "".join(
        f"    {name}_temp_path {tmp_path / name};\n" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temp_paths, 1)
    (tmp_path / "nginx.conf").write_text(conf)
    checked = subprocess.run(
        [tool("nginx"), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    url = f"http://127.0.0.1:{port}"
    command = [tool("nginx"), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"]
    with running_process(command, tmp_path / "nginx.log", url + "/healthz", timeout=30):
        yield url, f"127.0.0.1:{grpc_port}"


@contextlib.contextmanager
def two_replicas_behind_nginx(tmp_path: Path, *grpc_ports: int):
    """Two replicas (with gRPC on ``grpc_ports`` when given) behind nginx: yields (its URL, replica a, replica b),
    and nginx's gRPC address last when gRPC is on."""
    grpc = [("--grpc-port", str(port)) for port in grpc_ports] or [(), ()]
    flags = ("--max-batch-size", "4", "--max-batch-wait-ms", "5")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "nginx").mkdir()
    with (
        running_server(tmp_path / "a", *flags, *grpc[0]) as a,
        running_server(tmp_path / "b", *flags, *grpc[1]) as b,
        running_nginx(tmp_path / "nginx", [a.url, b.url], [f"127.0.0.1:{port}" for port in grpc_ports]) as lb,
    ):
        yield (lb[0], a, b, lb[1]) if grpc_ports else (lb[0], a, b)


def served(replica_url: str, endpoint: str = "/detect") -> float:
    text = httpx.get(replica_url + "/metrics").text
    series = f'detector_requests_total{{endpoint="{endpoint}",status="200"}}'
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def clients(url: str, data: bytes, count: int, concurrency: int, during=None) -> list[int]:
    """``count`` POST /detect through ``url`` from ``concurrency`` clients; ``during`` runs after a quarter."""
    statuses: list[int] = []
    queue = list(range(count))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            queue.pop()
            try:
                response = await http.post(url + "/detect", files={"file": ("x.png", data)})
                statuses.append(response.status_code)
            except httpx.HTTPError as error:
                statuses.append(type(error).__name__)
            if during and len(statuses) == count // 4:
                during()

    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return statuses


def test_requests_spread_over_both_replicas(tmp_path):
    with two_replicas_behind_nginx(tmp_path) as (lb, a, b):
        statuses = asyncio.run(clients(lb, IMAGE, count=24, concurrency=6))
        assert statuses == [200] * 24
        assert served(a.url) > 0 and served(b.url) > 0, "least_conn uses both replicas"
        assert served(a.url) + served(b.url) == 24
        log = (tmp_path / "nginx" / "access.log").read_text()
        assert "upstream_time=" in log and "request_id=" in log


def test_killing_a_replica_mid_run_loses_no_request(tmp_path):
    with two_replicas_behind_nginx(tmp_path) as (lb, a, b):
        statuses = asyncio.run(
            clients(lb, IMAGE, count=40, concurrency=6, during=lambda: a.process.send_signal(signal.SIGKILL))
        )
        assert a.process.wait(10) == -signal.SIGKILL
        assert statuses == [200] * 40, "nginx re-sends what the dead replica did not answer"
        assert served(b.url) > 0


def test_a_draining_replica_loses_no_request(tmp_path):
    """SIGTERM: the replica answers what it accepted and refuses the rest; nginx sends those to the other one."""
    with two_replicas_behind_nginx(tmp_path) as (lb, a, b):
        statuses = asyncio.run(
            clients(lb, IMAGE, count=40, concurrency=6, during=lambda: a.process.send_signal(signal.SIGTERM))
        )
        assert statuses == [200] * 40
        assert a.process.wait(60) in (0, -signal.SIGTERM)


def test_the_service_not_nginx_sets_the_header_limit(tmp_path):
    """A 12 KiB header passes nginx (its default stops at 8 KiB per line, with an HTML 400); headers over the
    service's 16 KiB in all get the service's JSON 431 through nginx."""
    (tmp_path / "replica").mkdir()
    (tmp_path / "nginx").mkdir()
    with running_server(tmp_path / "replica") as replica, running_nginx(tmp_path / "nginx", [replica.url]) as (lb, _):
        assert httpx.get(lb + "/healthz", headers={"X-Trace": "t" * 12 * 1024}).status_code == 200
        response = httpx.get(lb + "/healthz", headers={"X-A": "a" * 10 * 1024, "X-B": "b" * 10 * 1024})
        assert response.status_code == 431
        assert response.json()["error"]["code"] == "headers_too_large"


def test_grpc_calls_go_through_nginx_to_both_replicas(tmp_path):
    """tritonclient.grpc against nginx's gRPC listener (grpc_pass): every call answered, both replicas used."""
    with two_replicas_behind_nginx(tmp_path, free_port(), free_port()) as (lb, a, b, grpc_address):
        client = triton.InferenceServerClient(grpc_address)
        name = client.get_model_repository_index().models[0].name
        image = triton.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([IMAGE], dtype=np.object_))

        def infer(_: int) -> int:
            return int(client.infer(name, [image], client_timeout=60).as_numpy("num_dets")[0, 0])

        with ThreadPoolExecutor(4) as pool:
            counts = list(pool.map(infer, range(16)))
        endpoint = "/inference.GRPCInferenceService/ModelInfer"
        per_replica = [served(replica.url, endpoint) for replica in (a, b)]
    assert len(counts) == 16 and all(counts)
    assert all(per_replica) and sum(per_replica) == 16, per_replica
