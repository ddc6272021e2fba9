"""Where the service's time goes: its own per-request timings at concurrency 1, its histograms at concurrency 16.

    python -m bench.breakdown [SERVICE FLAGS...]     # e.g. --decode-threads 1

Starts ``python -m service`` on 127.0.0.1:8000 with the given flags. Concurrency 1: median of the response's
``timings_ms`` (queue, preprocess, inference, postprocess, total) over 50 requests of the real photos. Concurrency
16 for 20 s: from the server's ``/metrics`` deltas, preprocess time per image, inference time per batch and per
image, mean batch size, the share of wall time the inference worker was busy, and decode thread-seconds per
second. Prints them and writes ``bench/results/breakdown.json``.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import statistics
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import write_results
from bench.load import closed_loop, real_payloads, serving

URL = "http://127.0.0.1:8000"
HISTOGRAMS = ("detector_preprocess_duration_seconds", "detector_inference_duration_seconds", "detector_batch_size")


def histogram_totals(url: str) -> dict[str, float]:
    """``{name_sum: ..., name_count: ...}`` of the histograms above (summed over served models), from one scrape."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if family.name in HISTOGRAMS:
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def main(argv: list[str] | None = None) -> None:
    flags = sys.argv[1:] if argv is None else argv
    payloads = real_payloads()
    command = f"{shlex.quote(sys.executable)} -m service --port 8000 {shlex.join(flags)}"
    with serving(command, URL), httpx.Client(base_url=URL, timeout=60) as client:
        timings = []
        for index in range(60):
            body, headers = payloads[index % len(payloads)].encoded
            response = client.post("/detect", content=body, headers=headers)
            if index >= 10:  # the first ones warm up allocators and caches
                timings.append(response.json()["timings_ms"])
        before = histogram_totals(URL)
        result = asyncio.run(closed_loop(URL + "/detect", payloads, 16, 20))
        after = histogram_totals(URL)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    images = delta["detector_preprocess_duration_seconds_count"]
    batches = delta["detector_inference_duration_seconds_count"]
    inference_s = delta["detector_inference_duration_seconds_sum"]
    report = {
        "flags": flags,
        "c1_median_timings_ms": {key: round(statistics.median(t[key] for t in timings), 2) for key in timings[0]},
        "c16_requests_per_s": result.summary()["throughput_rps"],
        "c16_preprocess_ms_per_image": round(delta["detector_preprocess_duration_seconds_sum"] / images * 1000, 1),
        "c16_inference_ms_per_batch": round(inference_s / batches * 1000, 1),
        "c16_inference_ms_per_image": round(inference_s / delta["detector_batch_size_sum"] * 1000, 1),
        "c16_mean_batch": round(delta["detector_batch_size_sum"] / batches, 2),
        "c16_inference_busy_share": round(inference_s / result.elapsed_s, 2),
        "c16_decode_thread_seconds_per_s": round(
            delta["detector_preprocess_duration_seconds_sum"] / result.elapsed_s, 2
        ),
    }
    print(json.dumps(report, indent=2))
    print(write_results("breakdown", [report]))


if __name__ == "__main__":
    main()
