"""``akconv-detect PATH... [--url URL] [--conf C] [--save-annotated DIR] [--json]``: detect from a terminal.

Sends each image (``-`` reads one from standard input) to a running detector (through
:class:`service.client.AsyncDetectorClient`, a few at a time), shows a progress bar for several images, and prints a
table (or JSON lines with ``--json``). A folder stands for the image files in it (``-r``: and in its subfolders),
found by extension, in name order; every other entry is skipped with one line on stderr. The API key comes from
``DETECTOR_API_KEY`` (or ``--api-key``, which ``ps`` shows to every user of the machine).

``--save-annotated DIR`` mirrors the inputs' folders under ``DIR`` (``photos/a/bus.jpg`` ->
``DIR/photos/a/bus.annotated.jpg``; see :func:`annotated_path` for inputs outside the working directory) and never
overwrites a file: a name that exists, or that an earlier input of the same run takes, gets ``-1``, ``-2``... added.

Exit status: 0 all answered, 1 some image failed, 2 the server could not be reached (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from service.client import AsyncDetectorClient, DetectorError
from service.schemas import DetectResponse

CONCURRENCY = 4
STDIN = Path("-")
UNREACHABLE = 2
# The file extensions of the formats the service decodes (service.core.images.SUPPORTED_FORMATS, as Pillow names them;
# not imported from there, which would import torch). Only folders are filtered by them: a file named on the
# command line is sent whatever its name, and the server says whether it is an image.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)
ERROR_CHARS = 200  # of an error message in the table (--json has it whole): a line stays a line on a terminal
HEADER = ("image", "class", "conf", "x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class Input:
    """One image to send.

    Attributes:
        path: as named on the command line, or its folder argument joined with its path inside that folder.
        folder: the folder argument it was found in; None for a file named on the command line, or ``-``.
    """

    path: Path
    folder: Path | None = None


def find_images(arguments: list[Path], recursive: bool, skip_dir: Path | None = None) -> list[Input]:
    """The images that the command line names, in its order: a file (or ``-``) as it is, a folder as its image files.

    Args:
        arguments: files, folders, or ``-``.
        recursive: walk the subfolders of a folder too; without it they are skipped.
        skip_dir: a folder never walked into (the ``--save-annotated`` one: a second run would send the first one's
            drawings); None for none.
    """
    skip = skip_dir.resolve() if skip_dir is not None else None
    inputs = []
    for argument in arguments:
        if argument != STDIN and argument.is_dir():
            inputs.extend(Input(path, argument) for path in _walk(argument, recursive, skip))
        else:
            inputs.append(Input(argument))
    return inputs


def _walk(folder: Path, recursive: bool, skip_dir: Path | None) -> Iterator[Path]:
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)  # a stable order, whatever the filesystem's
    except OSError as error:
        _skipped(folder, error.strerror or str(error))
        return
    for entry in entries:
        path = folder / entry.name
        if entry.name.startswith("."):  # .git, .DS_Store, macOS's ._bus.jpg (metadata, not an image)
            _skipped(path, "hidden")
        elif entry.is_dir():
            if not recursive:
                _skipped(path, "a folder (-r walks subfolders)")
            elif entry.is_symlink():  # a link can lead back up the tree
                _skipped(path, "a link to a folder, not followed")
            elif skip_dir is not None and path.resolve() == skip_dir:
                _skipped(path, "the --save-annotated folder")
            else:
                yield from _walk(path, recursive, skip_dir)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            yield path
        else:
            _skipped(path, "not an image file (by its extension)")


def _skipped(path: Path, why: str) -> None:
    print(f"akconv-detect: skipped {path}: {why}", file=sys.stderr)


def annotated_path(image: Input, out_dir: Path) -> Path:
    """Where the drawn copy of ``image`` goes: its folders mirrored under ``out_dir``, ``.annotated.jpg`` added.

    Mirrored from the working directory when the image is in it (``photos/a/bus.jpg``, or the same path absolute,
    -> ``photos/a/bus.annotated.jpg``); else from its folder argument, that folder's name kept (``/data/photos/a/
    bus.jpg`` found in ``/data/photos`` -> ``photos/a/bus.annotated.jpg``); else by its name alone. Never from a
    filesystem root. Paths are taken as written (``..`` folded, links not followed).
    """
    if image.path == STDIN:
        return out_dir / "stdin.annotated.jpg"
    absolute = Path(os.path.abspath(image.path))
    cwd = Path.cwd()
    if absolute.is_relative_to(cwd):
        relative = absolute.relative_to(cwd)
    elif image.folder is not None:
        folder = Path(os.path.abspath(image.folder))
        relative = Path(folder.name, absolute.relative_to(folder))
    else:
        relative = Path(absolute.name)
    return out_dir / relative.parent / f"{relative.stem}.annotated.jpg"


def planned_paths(images: list[Input], out_dir: Path) -> list[Path]:
    """:func:`annotated_path` of each image, the second image with the same one getting ``-1`` added, the third
    ``-2``...: in the command line's order, so which input a file belongs to does not depend on which answer came
    first (``bus.jpg`` and ``bus.png``, or two folders' ``img.png`` outside the working directory)."""
    claimed: Counter[Path] = Counter()
    planned = []
    for image in images:
        path = annotated_path(image, out_dir)
        earlier = claimed[path]
        claimed[path] += 1
        planned.append(path.with_stem(f"{path.stem}-{earlier}") if earlier else path)
    return planned


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
    client: AsyncDetectorClient, images: list[Input], query: dict, annotated: list[Path] | None
) -> list[DetectResponse | DetectorError | OSError]:
    gate = asyncio.Semaphore(CONCURRENCY)
    progress = tqdm(total=len(images), unit="image", file=sys.stderr, disable=len(images) < 2)
    stdin = sys.stdin.buffer.read() if any(image.path == STDIN for image in images) else b""

    async def one(index: int) -> DetectResponse | DetectorError | OSError:
        path = images[index].path
        async with gate:
            try:
                image = stdin if path == STDIN else path
                result = await client.detect(image, **query)
                if annotated is not None:
                    drawn = await client.annotated(image, **query)
                    await asyncio.to_thread(write_new, annotated[index], drawn)
                return result
            except (DetectorError, OSError) as error:
                return error
            finally:
                progress.update()

    try:
        return await asyncio.gather(*(one(index) for index in range(len(images))))
    finally:
        progress.close()


def _table(images: list[Input], results: list) -> str:
    """One row per detection, ``-`` for none. An error row is two cells, the image and its message on one line (cut
    to :data:`ERROR_CHARS`), which runs on past the class column: it counts only toward the image column's width."""
    rows: list[tuple[str, ...]] = [HEADER]
    for image, result in zip(images, results, strict=True):
        name = str(image.path)  # a folder's images may share names: the path tells them apart, as --json's "file"
        if isinstance(result, Exception):
            rows.append((name, "error: " + _one_line(str(result), ERROR_CHARS)))
        elif not result.detections:
            rows.append((name, "-"))
        for d in [] if isinstance(result, Exception) else result.detections:
            box = d.box
            rows.append(
                (name, d.class_name, f"{d.confidence:.2f}", *(f"{v:.1f}" for v in (box.x1, box.y1, box.x2, box.y2)))
            )
    full = [row for row in rows if len(row) == len(HEADER)]
    widths = [max(len(row[i]) for row in full) for i in range(len(HEADER))]
    widths[0] = max(len(row[0]) for row in rows)
    return "\n".join(
        # strict=False: a short row (an error, no detections) fills its first cells and leaves the rest blank
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
        for row in rows
    )


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())  # a message with line breaks (a proxy's HTML page) would break the table's rows
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="akconv-detect",
        description="Detect objects in images with a running detector.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""\
Folders: a folder stands for the image files in it, in name order; -r walks
its subfolders too. An image file is one with the extension of a format the
detector reads, in any case:
  {" ".join(sorted(IMAGE_SUFFIXES))}
Anything else in a folder (other files, subfolders without -r, hidden entries,
links to folders, the --save-annotated folder) is skipped with one line on
stderr. A file named on the command line is sent whatever its extension.

--save-annotated DIR mirrors the inputs' folders under DIR:
  photos/a/bus.jpg                    -> DIR/photos/a/bus.annotated.jpg
  /data/photos/a/bus.jpg, found in the folder argument /data/photos
                                      -> DIR/photos/a/bus.annotated.jpg
  /tmp/bus.jpg (outside the working directory, named as a file)
                                      -> DIR/bus.annotated.jpg
It never overwrites a file: a name that exists, or that an earlier input of
the same run took, gets -1, -2... added.

API key: set DETECTOR_API_KEY in the environment. --api-key works too, but
a command line is visible to every user of the machine (ps).

Exit status: 0 all answered, 1 some image failed, 2 the server could not be
reached.""",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH",
        help="image files, folders of images, or - to read one image from standard input",
    )  # fmt: skip
    parser.add_argument("-r", "--recursive", action="store_true", help="also walk the subfolders of folders")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="detector address (default: %(default)s)")
    parser.add_argument("--conf", type=float, default=None, help="minimum confidence (server default: 0.25)")
    parser.add_argument("--max-det", type=int, default=None, help="most detections per image")
    parser.add_argument("--classes", default=None, help="comma-separated class ids or names")
    parser.add_argument("--model", default=None, help="which served model (server default: its first)")
    parser.add_argument(
        "--api-key", default=os.environ.get("DETECTOR_API_KEY"),
        help="API key, when the server requires one (default: DETECTOR_API_KEY; prefer it, ps shows this flag)",
    )  # fmt: skip
    parser.add_argument("--save-annotated", type=Path, default=None, metavar="DIR", help="write annotated JPEGs here")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    images = find_images(args.paths, args.recursive, args.save_annotated)
    if not images:
        parser.error("no image files in the folders given (-r walks their subfolders)")
    annotated = planned_paths(images, args.save_annotated) if args.save_annotated is not None else None
    query = {
        "conf": args.conf,
        "max_det": args.max_det,
        "classes": args.classes.split(",") if args.classes else None,
        "model": args.model,
    }

    async def run() -> list:
        async with AsyncDetectorClient(args.url, api_key=args.api_key) as client:
            return await _detect_all(client, images, query, annotated)

    results = asyncio.run(run())
    unreachable = next((r for r in results if isinstance(r, DetectorError) and r.status == 0), None)
    if unreachable is not None:
        print(f"akconv-detect: {unreachable.message}; is the detector running there? (--url)", file=sys.stderr)
        sys.exit(UNREACHABLE)
    if args.json:
        for image, result in zip(images, results, strict=True):
            if isinstance(result, Exception):
                print(json.dumps({"file": str(image.path), "error": str(result)}))
            else:
                print(json.dumps({**result.model_dump(), "file": str(image.path)}))
    else:
        print(_table(images, results))
    if any(isinstance(result, Exception) for result in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
