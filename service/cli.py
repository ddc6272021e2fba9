"""``akconv-detect IMAGE... [--url URL] [--conf C] [--save-annotated DIR] [--json]``: detect from a terminal.

Sends each image (``-`` reads one from standard input) to a running detector (through
:class:`service.client.AsyncDetectorClient`, a few at a time), shows a progress bar for several images, and prints a
table (or JSON lines with ``--json``). The API key comes from ``--api-key`` or ``DETECTOR_API_KEY``.

``--save-annotated DIR`` mirrors the inputs' folders under ``DIR`` (``photos/a/bus.jpg`` ->
``DIR/photos/a/bus.annotated.jpg``) and never overwrites a file: a name that exists gets ``-1``, ``-2``... added.

Exit status: 0 all answered, 1 some image failed, 2 the server could not be reached (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from service.client import AsyncDetectorClient, DetectorError
from service.schemas import DetectResponse

CONCURRENCY = 4
STDIN = Path("-")
UNREACHABLE = 2


def annotated_path(image: Path, out_dir: Path) -> Path:
    """Where the drawn copy of ``image`` goes: its folders mirrored under ``out_dir``, ``.annotated.jpg`` added.

    Relative inputs keep their relative folders; absolute ones (outside the working directory) their whole path.
    """
    if image == STDIN:
        return out_dir / "stdin.annotated.jpg"
    resolved = image.resolve()
    try:
        relative = resolved.relative_to(Path.cwd())
    except ValueError:
        relative = resolved.relative_to(resolved.anchor)
    return out_dir / relative.parent / f"{relative.stem}.annotated.jpg"


def write_new(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path``, or to ``path`` with ``-1``, ``-2``... added when it exists; never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for number in itertools.count():
        candidate = path.with_stem(f"{path.stem}-{number}") if number else path
        try:
            with candidate.open("xb") as out:  # exclusive: fails if the file exists, even if made meanwhile
                out.write(data)
            return candidate
        except FileExistsError:
            continue


async def _detect_all(
    client: AsyncDetectorClient, images: list[Path], query: dict, annotated_dir: Path | None
) -> list[DetectResponse | DetectorError | OSError]:
    gate = asyncio.Semaphore(CONCURRENCY)
    progress = tqdm(total=len(images), unit="image", file=sys.stderr, disable=len(images) < 2)
    stdin = sys.stdin.buffer.read() if STDIN in images else b""

    async def one(path: Path) -> DetectResponse | DetectorError | OSError:
        async with gate:
            try:
                image = stdin if path == STDIN else path
                result = await client.detect(image, **query)
                if annotated_dir is not None:
                    drawn = await client.annotated(image, **query)
                    await asyncio.to_thread(write_new, annotated_path(path, annotated_dir), drawn)
                return result
            except (DetectorError, OSError) as error:
                return error
            finally:
                progress.update()

    try:
        return await asyncio.gather(*(one(path) for path in images))
    finally:
        progress.close()


def _table(images: list[Path], results: list) -> str:
    rows = [("image", "class", "conf", "x1", "y1", "x2", "y2")]
    for path, result in zip(images, results, strict=True):
        if isinstance(result, Exception):
            rows.append((path.name, f"error: {result}", "", "", "", "", ""))
        elif not result.detections:
            rows.append((path.name, "-", "", "", "", "", ""))
        for d in [] if isinstance(result, Exception) else result.detections:
            box = d.box
            rows.append(
                (
                    path.name,
                    d.class_name,
                    f"{d.confidence:.2f}",
                    *(f"{v:.1f}" for v in (box.x1, box.y1, box.x2, box.y2)),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="akconv-detect", description="Detect objects in images with a running detector."
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files; - reads standard input")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="detector address (default: %(default)s)")
    parser.add_argument("--conf", type=float, default=None, help="minimum confidence (server default: 0.25)")
    parser.add_argument("--max-det", type=int, default=None, help="most detections per image")
    parser.add_argument("--classes", default=None, help="comma-separated class ids or names")
    parser.add_argument("--model", default=None, help="which served model (server default: its first)")
    parser.add_argument(
        "--api-key", default=os.environ.get("DETECTOR_API_KEY"), help="API key, when the server requires one "
        "(default: DETECTOR_API_KEY)",
    )  # fmt: skip
    parser.add_argument("--save-annotated", type=Path, default=None, metavar="DIR", help="write annotated JPEGs here")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    args = parser.parse_args(argv)

    query = {
        "conf": args.conf,
        "max_det": args.max_det,
        "classes": args.classes.split(",") if args.classes else None,
        "model": args.model,
    }

    async def run() -> list:
        async with AsyncDetectorClient(args.url, api_key=args.api_key) as client:
            return await _detect_all(client, args.images, query, args.save_annotated)

    results = asyncio.run(run())
    unreachable = next((r for r in results if isinstance(r, DetectorError) and r.status == 0), None)
    if unreachable is not None:
        print(f"akconv-detect: {unreachable.message}; is the detector running there? (--url)", file=sys.stderr)
        sys.exit(UNREACHABLE)
    if args.json:
        for path, result in zip(args.images, results, strict=True):
            if isinstance(result, Exception):
                print(json.dumps({"file": str(path), "error": str(result)}))
            else:
                print(json.dumps({**result.model_dump(), "file": str(path)}))
    else:
        print(_table(args.images, results))
    if any(isinstance(result, Exception) for result in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
