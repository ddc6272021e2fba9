"""Peak memory and time of decoding one large image the way the service does (``service.core.images``).

    python -m bench.decode_memory [--side 6000] [--format PNG] [--fit 384]

Writes a ``side`` × ``side`` image (a tiled random 1000 × 1000 patch, so it does not compress to nothing) to a
temp file, then decodes and letterboxes it in a fresh process and reports the peak resident memory added (bytes
per pixel) and the seconds it took. ``--fit 0`` decodes at full resolution (what drawing needed before issue 17).
The admission arithmetic in ``service/process/settings.py`` uses the PNG figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def decode_once(path: str, fit: int) -> dict:
    from service.core.images import decode, letterbox

    data = Path(path).read_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    started = time.monotonic()
    image = decode(data, 10**9, fit=fit or None)
    letterbox(image, 384)
    seconds = time.monotonic() - started
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    pixels = image.width * image.height
    return {"pixels": pixels, "file_bytes": len(data), "seconds": round(seconds, 2),
            "peak_added_mib": round(added / 2**20), "bytes_per_pixel": round(added / pixels, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_memory", description=__doc__)
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--format", default="PNG")
    parser.add_argument("--fit", type=int, default=384, help="the model input side; 0: full resolution")
    parser.add_argument("--decode", help=argparse.SUPPRESS)  # the child process: decode this file
    args = parser.parse_args()
    if args.decode:
        print(json.dumps(decode_once(args.decode, args.fit)))
        return
    patch = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    tiles = -(-args.side // 1000)
    pixels = np.tile(patch, (tiles, tiles, 1))[: args.side, : args.side]
    with tempfile.NamedTemporaryFile(suffix=f".{args.format.lower()}") as file:
        Image.fromarray(pixels).save(
            file.name, format=args.format, **({"compress_level": 1} if args.format == "PNG" else {})
        )
        del pixels
        child = [sys.executable, "-m", "bench.decode_memory", "--decode", file.name, "--fit", str(args.fit)]
        result = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
    print(json.dumps({"side": args.side, "format": args.format, "fit": args.fit, **result}))


if __name__ == "__main__":
    main()
