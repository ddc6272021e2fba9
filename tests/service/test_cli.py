"""``akconv-detect`` in-process against a mock transport: folders, ``-r``, skipped entries, where annotated files go,
the table, ``--help`` and the API key. The CLI against a real server: tests/service/test_client.py."""

import io
import json
import re
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service import cli
from service.client import AsyncDetectorClient
from service.core.images import SUPPORTED_FORMATS

LONG_MESSAGE = "the image could not be decoded:\n" + "broken data " * 100


class FakeDetector:
    """Answers as the detector does. An upload is a few bytes standing for an image: ``IMG:<label>`` gets one
    ``star`` (and, drawn, its own bytes back, so a test can tell which input an annotated file belongs to);
    ``BAD...`` gets a 415 with a long, multi-line message."""

    def __init__(self) -> None:
        self.uploads: list[str] = []
        self.api_keys: list[str | None] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = re.search(rb"(IMG|BAD)[^\r\n]*", request.content)
        upload = body.group().decode() if body else ""
        self.api_keys.append(request.headers.get("x-api-key"))
        if upload.startswith("BAD"):
            error = {"code": "unsupported_media_type", "message": LONG_MESSAGE}
            return httpx.Response(415, json={"error": error})
        if request.url.path == "/detect/annotated":
            return httpx.Response(200, content=upload.encode(), headers={"content-type": "image/jpeg"})
        self.uploads.append(upload)
        detection = {"class_id": 1, "class_name": "star", "confidence": 0.9, "box": box(1, 2, 3, 4)}
        return httpx.Response(200, json={**ANSWER, "detections": [detection]})

    def client(self, url: str, **options: object) -> AsyncDetectorClient:
        client = AsyncDetectorClient(url, **options)
        client._http = httpx.AsyncClient(
            base_url=client.url, headers=client.headers, transport=httpx.MockTransport(self.handler)
        )
        return client


def box(x1: float, y1: float, x2: float, y2: float) -> dict:
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2}


ANSWER = {
    "request_id": "r", "model": {"name": "m", "version": "1"}, "image": {"width": 8, "height": 8},
    "detections": [], "batch_size": 1,
    "timings_ms": {"queue": 0, "preprocess": 0, "inference": 0, "postprocess": 0, "total": 0},
}  # fmt: skip


@pytest.fixture
def detector(monkeypatch) -> FakeDetector:
    fake = FakeDetector()
    monkeypatch.setattr(cli, "AsyncDetectorClient", fake.client)
    monkeypatch.delenv("DETECTOR_API_KEY", raising=False)
    return fake


def image(path: Path, content: str | None = None) -> Path:
    """A stand-in image file at ``path`` (folders made), holding ``IMG:<its path>`` unless told otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if content is not None else f"IMG:{path.as_posix()}")
    return path


def run(*args: str) -> int:
    try:
        cli.main(list(args))
    except SystemExit as exit:
        return exit.code
    return 0


def skipped_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("akconv-detect: skipped")]


def test_a_folder_is_its_image_files_in_name_order_and_everything_else_is_skipped_with_one_line_each(
    detector, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    for name in ("b.png", "a.JPG", "c.webp", ".hidden.jpg", "sub/d.png"):
        image(Path("photos", name))
    Path("photos/notes.txt").write_text("not an image")
    Path("photos/.DS_Store").write_bytes(b"\0")

    assert run("--json", "photos") == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["file"] for line in out.splitlines()] == ["photos/a.JPG", "photos/b.png", "photos/c.webp"]
    assert sorted(skipped_lines(err)) == [
        "akconv-detect: skipped photos/.DS_Store: hidden",
        "akconv-detect: skipped photos/.hidden.jpg: hidden",
        "akconv-detect: skipped photos/notes.txt: not an image file (by its extension)",
        "akconv-detect: skipped photos/sub: a folder (-r walks subfolders)",
    ]


def test_recursive_walks_subfolders_but_not_the_output_folder_nor_links_to_folders(
    detector, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "sub/b.png", "sub/deeper/c.png", "z.png"):
        image(Path("photos", name))
    Path("photos/loop").symlink_to(tmp_path / "photos", target_is_directory=True)

    for _ in range(2):  # the second run must not send the first one's drawings, saved inside the walked folder
        assert run("-r", "--json", "--save-annotated", "photos/out", "photos") == 0
    out, err = capsys.readouterr()
    files = [json.loads(line)["file"] for line in out.splitlines()]
    walked = ["photos/a.png", "photos/sub/b.png", "photos/sub/deeper/c.png", "photos/z.png"]
    assert files == walked * 2
    assert skipped_lines(err)[-2:] == [
        "akconv-detect: skipped photos/loop: a link to a folder, not followed",
        "akconv-detect: skipped photos/out: the --save-annotated folder",
    ]


def test_files_folders_and_stdin_mix_in_command_line_order(detector, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image(Path("z.png"))
    image(Path("photos/b.png"))
    image(Path("photos/a.png"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"IMG:stdin")))

    assert run("--json", "z.png", "photos", "-") == 0
    files = [json.loads(line)["file"] for line in capsys.readouterr().out.splitlines()]
    assert files == ["z.png", "photos/a.png", "photos/b.png", "-"]
    assert sorted(detector.uploads) == ["IMG:photos/a.png", "IMG:photos/b.png", "IMG:stdin", "IMG:z.png"]


def test_a_file_named_on_the_command_line_is_sent_whatever_its_extension(detector, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image(Path("scan.raw"))
    assert run("--json", "scan.raw") == 0
    assert detector.uploads == ["IMG:scan.raw"] and not skipped_lines(capsys.readouterr().err)


def test_a_folder_without_images_is_a_usage_error(detector, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image(Path("photos/sub/a.png"))
    assert run("photos") == 2
    assert "no image files in the folders given (-r walks their subfolders)" in capsys.readouterr().err
    assert detector.uploads == []


def test_save_annotated_mirrors_paths_from_the_working_directory_relative_or_absolute(detector, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image(Path("photos/a/bus.jpg"))
    image(Path("photos/b/cat.png"))
    image(Path("top.png"))

    assert run("--save-annotated", "out", "photos/a/bus.jpg", str(tmp_path / "photos" / "b"), "./top.png") == 0
    assert written(tmp_path / "out") == {
        "photos/a/bus.annotated.jpg": "IMG:photos/a/bus.jpg",
        "photos/b/cat.annotated.jpg": "IMG:photos/b/cat.png",
        "top.annotated.jpg": "IMG:top.png",
    }


def test_save_annotated_outside_the_working_directory_starts_at_the_folder_argument_or_the_name(
    detector, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    image(tmp_path / "data" / "photos" / "a" / "bus.jpg", "IMG:bus")
    image(tmp_path / "elsewhere" / "cat.png", "IMG:cat")
    image(tmp_path / "up" / "dog.png", "IMG:dog")

    folder, file = tmp_path / "data" / "photos", tmp_path / "elsewhere" / "cat.png"
    assert run("-r", "--save-annotated", "out", str(folder), str(file), "../up/dog.png") == 0
    assert written(work / "out") == {
        "photos/a/bus.annotated.jpg": "IMG:bus",
        "cat.annotated.jpg": "IMG:cat",
        "dog.annotated.jpg": "IMG:dog",
    }, "never the absolute path's folders"


def test_no_two_inputs_share_an_annotated_file_and_no_run_overwrites_another(detector, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    image(Path("bus.jpg"), "IMG:bus.jpg")
    image(Path("bus.png"), "IMG:bus.png")
    image(tmp_path / "x" / "img.png", "IMG:x")
    image(tmp_path / "y" / "img.png", "IMG:y")
    inputs = ["bus.jpg", "bus.png", str(tmp_path / "x" / "img.png"), str(tmp_path / "y" / "img.png")]

    assert run("--save-annotated", "out", *inputs) == 0
    first = {
        "bus.annotated.jpg": "IMG:bus.jpg",
        "bus.annotated-1.jpg": "IMG:bus.png",
        "img.annotated.jpg": "IMG:x",
        "img.annotated-1.jpg": "IMG:y",
    }
    assert written(work / "out") == first, "claimed in command-line order"
    assert run("--save-annotated", "out", *inputs) == 0
    again = written(work / "out")
    assert len(again) == 8 and again.items() >= first.items(), "the first run's files are kept as they were"


def written(out_dir: Path) -> dict[str, str]:
    return {path.relative_to(out_dir).as_posix(): path.read_text() for path in out_dir.rglob("*") if path.is_file()}


def test_a_long_error_stays_in_its_row_and_leaves_the_columns_as_they_are(detector, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image(Path("photos/good.png"))
    image(Path("photos/bad.png"), "BAD")

    assert run("photos") == 1
    header, bad, good = capsys.readouterr().out.splitlines()
    assert header.split() == list(cli.HEADER)
    assert good.split() == ["photos/good.png", "star", "0.90", "1.0", "2.0", "3.0", "4.0"]
    assert header.index("conf") == good.index("0.90") == len("photos/good.png  class  "), "as wide as its header"
    assert bad.startswith("photos/bad.png   error: 415 unsupported_media_type: the image could not be decoded: broken")
    assert bad.endswith("...") and len(bad) == len("photos/bad.png   error: ") + cli.ERROR_CHARS

    assert run("--json", "photos") == 1
    assert LONG_MESSAGE in json.loads(capsys.readouterr().out.splitlines()[0])["error"], "--json keeps it whole"


def test_help_says_what_a_folder_takes_how_outputs_are_mirrored_and_where_the_api_key_goes(capsys):
    assert run("--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "PATH [PATH ...]" in text and "-r, --recursive" in text
    assert "folders of images" in text and " ".join(sorted(cli.IMAGE_SUFFIXES)) in text
    assert "skipped with one line on stderr" in text
    assert "photos/a/bus.jpg -> DIR/photos/a/bus.annotated.jpg" in text
    assert "set DETECTOR_API_KEY in the environment" in text and "(ps)" in text


def test_the_api_key_comes_from_the_environment_and_the_flag_wins(detector, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image(Path("a.png"))
    monkeypatch.setenv("DETECTOR_API_KEY", "from-env")
    assert run("a.png") == 0
    assert run("--api-key", "from-flag", "a.png") == 0
    assert detector.api_keys == ["from-env", "from-flag"]


def test_image_suffixes_are_pillows_extensions_of_the_formats_the_service_decodes():
    extensions = Image.registered_extensions()
    assert {suffix for suffix, fmt in extensions.items() if fmt in SUPPORTED_FORMATS} == cli.IMAGE_SUFFIXES
