"""Ultralytics' own predict on a seed-recipe checkpoint, in a process of its own (the recipe's AKConv module then
exists only there), for the service's equality test.

    python -m tests.service.ultralytics_predict MODEL.pt OUT.json --imgsz 320 PHOTO...

writes, per photo, ultralytics' detections as ``[x1, y1, x2, y2, score, class]`` rows in the photo's pixels.
"""

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("photos", nargs="+")
    parser.add_argument("--imgsz", type=int, required=True)
    parser.add_argument("--conf", type=float, required=True)
    args = parser.parse_args()
    import model  # noqa: F401  (ultralytics offline)
    from tests.model.seed_recipe import seed_module

    seed_module()
    from ultralytics import YOLO

    yolo = YOLO(str(args.model), task="detect")
    rows = {}
    for photo in args.photos:
        # ultralytics' defaults (rect letterbox, its own decoding), with the one-to-one head the service answers from
        [result] = yolo.predict(photo, imgsz=args.imgsz, conf=args.conf, nms=False, device="cpu", verbose=False)
        boxes = result.boxes
        rows[photo] = [
            [*box, score, class_id]
            for box, score, class_id in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True)
        ]
    args.out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
