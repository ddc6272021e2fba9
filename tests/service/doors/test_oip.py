"""The OIP codec against tritonclient's own serialisation: requests built by tritonclient parse, responses parse back
with tritonclient's ``InferResult``; and malformed or hostile bodies are refused with the service's typed errors."""

import base64
import importlib.util
import json
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from service.core.errors import BadRequest, UnsupportedMediaType
from service.doors.oip import (
    MAX_JSON_STRUCTURE,
    RequestedOutput,
    check_content_encoding,
    error_body,
    infer_response,
    model_metadata,
    model_ready,
    parse_header_length,
    parse_infer_request,
    server_live,
    server_metadata,
    server_ready,
)
from service.process.settings import Settings
from service.schemas import Detection
from tests.image_files import encode

BUS = Path(importlib.util.find_spec("ultralytics").origin).parent / "assets" / "bus.jpg"
OUTPUT_NAMES = ["num_dets", "det_boxes", "det_scores", "det_classes"]
MAX_IMAGES = 16  # max_batch_files' default


def parse(body: bytes, header_length: int | None):
    return parse_infer_request(body, header_length, max_images=MAX_IMAGES)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """A real JPEG and a PNG: two files of different formats and sizes."""
    gradient = np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], (32, 1, 3))
    return [BUS.read_bytes(), encode(gradient, "PNG")]


def triton_body(files, binary=True, outputs=None, **options) -> tuple[bytes, int | None]:
    """A request body as tritonclient builds it (no server needed), and its Inference-Header-Content-Length.

    JSON form: tritonclient sends a BYTES element as its UTF-8 string, so the caller gives base64 (the codec's rule).
    """
    elements = files if binary else [base64.b64encode(data) for data in files]
    image = triton.InferInput("IMAGE", [len(files)], "BYTES")
    image.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return triton.InferenceServerClient.generate_request_body([image], outputs=outputs, **options)


def header_only(document: dict) -> bytes:
    return json.dumps(document).encode()


def image_input(**fields) -> dict:
    return {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="], **fields}


def detection(class_id, confidence, box) -> Detection:
    return Detection(class_id, f"class{class_id}", confidence, box)


PER_IMAGE = [
    [detection(1, 0.9, (10.5, 20.0, 110.25, 220.0)), detection(0, 0.4, (0.0, 1.0, 2.0, 3.0))],
    [],
    [detection(1, 0.75, (5.0, 6.0, 7.0, 8.0))],
]


class TestParseFromTritonClient:
    def test_binary_images_arrive_byte_for_byte(self, photos):
        body, header_length = triton_body(photos, request_id="req-7")
        request = parse(body, header_length)
        assert header_length is not None and header_length < len(body)
        assert request.images == photos
        assert request.id == "req-7"
        assert (request.conf, request.max_det, request.classes) == (None, None, None)

    def test_json_base64_images_arrive_byte_for_byte(self, photos):
        body, header_length = triton_body(photos, binary=False)
        assert header_length is None
        assert parse(body, None).images == photos

    def test_no_outputs_listed_means_all_four_binary(self, photos):
        """tritonclient sends ``binary_data_output: true`` when no outputs are listed."""
        request = parse(*triton_body(photos[:1]))
        assert request.outputs == tuple(RequestedOutput(name, True) for name in OUTPUT_NAMES)

    def test_listed_outputs_keep_their_order_and_binary_flags(self, photos):
        outputs = [
            triton.InferRequestedOutput("det_scores", binary_data=False),
            triton.InferRequestedOutput("num_dets", binary_data=True),
        ]
        request = parse(*triton_body(photos[:1], outputs=outputs))
        assert request.outputs == (RequestedOutput("det_scores", False), RequestedOutput("num_dets", True))

    @pytest.mark.parametrize(
        ("classes", "tokens"),
        [("star", ("star",)), (" star, 0 ,", ("star", "0")), (["triangle", 1], ("triangle", "1")), (1, ("1",))],
    )
    def test_parameters(self, photos, classes, tokens):
        parameters = {"conf": 0.3, "max_det": 7, "classes": classes, "note": "ignored"}
        request = parse(*triton_body(photos[:1], parameters=parameters, priority=1, timeout=1000))
        assert (request.conf, request.max_det, request.classes) == (0.3, 7, tokens)

    def test_integer_conf_is_a_float(self, photos):
        assert parse(*triton_body(photos[:1], parameters={"conf": 1})).conf == 1.0


class TestParseHandWritten:
    def test_json_outputs_by_default_and_binary_data_output_as_default_flag(self):
        listed = {"inputs": [image_input()], "outputs": [{"name": "det_boxes"}]}
        assert parse(header_only(listed), None).outputs == (RequestedOutput("det_boxes", False),)
        listed["parameters"] = {"binary_data_output": True}
        assert parse(header_only(listed), None).outputs == (RequestedOutput("det_boxes", True),)
        listed["outputs"] = [{"name": "det_boxes", "parameters": {"binary_data": False}}]
        assert parse(header_only(listed), None).outputs == (RequestedOutput("det_boxes", False),)
        unlisted = {"inputs": [image_input()]}
        assert all(not output.binary for output in parse(header_only(unlisted), None).outputs)

    def test_base64_may_be_wrapped_in_lines(self, photos):
        wrapped = base64.encodebytes(photos[1]).decode()  # 76-column lines, as the base64 tool writes
        assert "\n" in wrapped
        body = header_only({"inputs": [image_input(data=[wrapped])]})
        assert parse(body, None).images == [photos[1]]

    def test_identity_encoding_and_an_empty_element_are_accepted(self):
        body = header_only({"inputs": [image_input(data=[""])]})
        check_content_encoding("identity")
        check_content_encoding(None)
        assert parse(body, None).images == [b""]

    def test_header_length_equal_to_the_body(self):
        body = header_only({"inputs": [image_input()]})
        assert parse(body, len(body)).images == [b"hello"]


def binary_body(elements: bytes, size: int | None = None, shape=(1,), **fields) -> tuple[bytes, int]:
    header = header_only(
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "datatype": "BYTES",
                    "shape": list(shape),
                    "parameters": {"binary_data_size": len(elements) if size is None else size},
                    **fields,
                }
            ]
        }
    )
    return header + elements, len(header)


def prefixed(*files: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(data)) + data for data in files)


def with_input(**fields) -> bytes:
    return header_only({"inputs": [image_input(**fields)]})


class TestMalformed:
    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (b"", "not valid JSON"),
            (b"{", "not valid JSON"),
            (b"\xff\xfe{}", "not valid JSON"),
            (b"[1]", "must be a JSON object"),
            (b'{"inputs": [], "parameters": {"conf": NaN}}', "not valid JSON"),
            (b'{"id": ' + b"1" * 5000 + b"}", "not valid JSON"),
            (with_input()[:-1] + b', "parameters": {"conf": 1e999}}', "parameter 'conf'"),  # inf
            (b"[" * 4000 + b"]" * 4000, "nested too deeply"),  # within MAX_JSON_STRUCTURE, deeper than json's limit
            (b'{"inputs": {"a": ' * 2000 + b"1" + b"}" * 4000, "nested too deeply"),
            (header_only({}), "'inputs' must list one input"),
            (header_only({"inputs": [image_input(), image_input()]}), "must list one input"),
            (header_only({"inputs": ["IMAGE"]}), "must be a JSON object"),
            (with_input(name="images"), "unknown input 'images'"),
            (with_input(datatype="UINT8"), "datatype 'UINT8'"),
            (with_input(shape=[1, 1]), "shape [1, 1]"),
            (with_input(shape=[True]), "shape [True]"),
            (with_input(shape=["1"]), "shape ['1']"),
            (with_input(shape=[0], data=[]), "at least one image"),
            (with_input(shape=[-1]), "at least one image"),
            (with_input(shape=[2]), "'data' holds 1 elements"),
            (with_input(shape=[2]), "'data' holds 1 elements"),
            (with_input(shape=[17]), "17 images in input IMAGE; at most 16 per request"),
            (with_input(shape=[2**40]), "at most 16 per request"),
            (with_input(data=None), "needs 'data'"),
            (with_input(data="aGVsbG8="), "needs 'data'"),
            (with_input(data=[["aGVsbG8="]]), "must be a base64 string"),
            (with_input(data=[104]), "must be a base64 string"),
            (with_input(data=["not base64!"]), "not base64"),
            (with_input(data=["aGVsbG8"]), "not base64"),
            (with_input(data=["aGVsbG8=\u00e9"]), "not base64"),
            (with_input(parameters=[]), "must be a JSON object"),
            (with_input(parameters={"shared_memory_region": "r"}), "shared-memory extension is not supported"),
            (header_only({"id": 7, "inputs": [image_input()]}), "'id' must be a string"),
            (header_only({"inputs": [image_input()], "parameters": "conf=0.3"}), "'parameters' must be"),
            (header_only({"inputs": [image_input()], "outputs": "num_dets"}), "'outputs' must be a list"),
            (header_only({"inputs": [image_input()], "outputs": [{"name": "boxes"}]}), "unknown output 'boxes'"),
            (header_only({"inputs": [image_input()], "outputs": [{"name": ["x"]}]}), "unknown output"),
            (header_only({"inputs": [image_input()], "outputs": [{}]}), "unknown output None"),
            (
                header_only({"inputs": [image_input()], "outputs": [{"name": "num_dets"}, {"name": "num_dets"}]}),
                "requested twice",
            ),
            (
                header_only(
                    {"inputs": [image_input()], "outputs": [{"name": "num_dets", "parameters": {"classification": 3}}]}
                ),
                "classification extension is not supported",
            ),
            (
                header_only(
                    {"inputs": [image_input()], "outputs": [{"name": "num_dets", "parameters": {"binary_data": 1}}]}
                ),
                "'binary_data' must be true or false",
            ),
            (
                header_only({"inputs": [image_input()], "parameters": {"binary_data_output": "yes"}}),
                "'binary_data_output' must be true or false",
            ),
        ],
    )
    def test_json_refused(self, body, message):
        with pytest.raises(BadRequest, match=re.escape(message)):
            parse(body, None)

    @pytest.mark.parametrize(
        "body",
        [
            with_input(shape=[1] * 4000),
            with_input(name="x" * 100_000),
            header_only({"inputs": [image_input()], "parameters": {"conf": "9" * 100_000}}),
        ],
    )
    def test_messages_quote_values_short(self, body):
        with pytest.raises(BadRequest) as raised:
            parse(body, None)
        assert "..." in raised.value.message and len(raised.value.message) < 200

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("conf", 1.5),
            ("conf", -0.1),
            ("conf", "0.3"),
            ("conf", True),
            ("max_det", 0),
            ("max_det", 301),
            ("max_det", 2.5),
            ("max_det", "5"),
            ("max_det", False),
            ("classes", []),
            ("classes", " , "),
            ("classes", [1.5]),
            ("classes", [True]),
            ("classes", [None]),
            ("classes", {"star": 1}),
        ],
    )
    def test_bad_parameters_refused(self, name, value):
        with pytest.raises(BadRequest, match=f"parameter '{name}'"):
            parse(header_only({"inputs": [image_input()], "parameters": {name: value}}), None)

    @pytest.mark.parametrize(
        ("body_and_length", "message"),
        [
            (binary_body(prefixed(b"abc"), size=3), "declares binary_data_size 3, but 7 bytes"),
            (binary_body(prefixed(b"abc"), size=8), "declares binary_data_size 8, but 7 bytes"),
            (binary_body(prefixed(b"abc"), size="7"), "declares binary_data_size '7'"),
            (binary_body(prefixed(b"abc"), size=True), "declares binary_data_size True"),
            (binary_body(prefixed(b"abcd"), shape=(2,)), "shape [2], but its binary data holds 1 elements"),
            (binary_body(prefixed(b"abc"), shape=(2,)), "its 7 bytes of binary data cannot hold 2 elements"),
            (binary_body(b"\0" * 40, shape=(17,)), "17 images in input IMAGE; at most 16 per request"),
            (binary_body(prefixed(b"abc", b"de")), "shape [1], but its binary data holds more elements"),
            (binary_body(b"\x03\x00"), "its 2 bytes of binary data cannot hold 1 elements"),
            (binary_body(prefixed(b"abc") + b"\x01", shape=(2,)), "ends inside the length of element 1"),
            (binary_body(struct.pack("<I", 2**32 - 1) + b"abc"), "declares 4294967295 bytes, but 3 remain"),
            (binary_body(struct.pack("<I", 4) + b"abc"), "declares 4 bytes, but 3 remain"),
            (binary_body(prefixed(b"abc"), data=["YWJj"]), "both 'data' and 'binary_data_size'"),
        ],
    )
    def test_binary_refused(self, body_and_length, message):
        with pytest.raises(BadRequest, match=re.escape(message)):
            parse(*body_and_length)

    def test_header_length_must_lie_within_the_body(self, photos):
        body, header_length = triton_body(photos[:1])
        for length in (len(body) + 1, -1):
            with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
                parse(body, length)
        with pytest.raises(BadRequest, match="not valid JSON"):
            parse(body, 0)
        with pytest.raises(BadRequest, match="not valid JSON"):
            parse(body, header_length - 1)

    def test_binary_data_without_header_length_is_not_json(self, photos):
        body, _ = triton_body(photos[:1])
        with pytest.raises(BadRequest, match="not valid JSON"):
            parse(body, None)

    def test_bytes_after_the_header_need_binary_data_size(self):
        body = with_input()
        with pytest.raises(BadRequest, match="5 bytes follow the JSON header, but no input sets 'binary_data_size'"):
            parse(body + b"extra", len(body))

    @pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP"])
    def test_compressed_bodies_are_unsupported(self, encoding):
        with pytest.raises(UnsupportedMediaType, match="not supported: send the body uncompressed") as raised:
            check_content_encoding(encoding)
        assert raised.value.status == 415

    def test_declared_sizes_allocate_nothing(self):
        """A request that declares 2**40 images and a 4 GiB element, in 150 bytes, is refused without sizing
        anything from what it declares."""
        body, header_length = binary_body(struct.pack("<I", 2**32 - 1) + b"x" * 8, shape=(2**40,))
        tracemalloc.start()
        try:
            with pytest.raises(BadRequest):
                parse(body, header_length)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024


class TestBoundedBeforeBuilding:
    """What a body may make the parser build is checked before anything is built. The issue's bodies, at the
    default ``max_upload_bytes`` (10 MiB): 2.6 M empty binary elements took 1.2-1.8 s to refuse, 3.5 M empty base64
    strings 0.7-0.8 s, both on the event loop."""

    SIZE = Settings.model_fields["max_upload_bytes"].default

    def refused_building_nothing(self, body: bytes, header_length: int | None, message: str) -> None:
        """Refused with ``message``, having allocated less than 64 KiB: no element, no copy of the JSON."""
        tracemalloc.start()
        try:
            with pytest.raises(BadRequest, match=re.escape(message)):
                parse(body, header_length)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024

    def test_a_binary_shape_beyond_max_images_reads_no_element(self):
        count = (self.SIZE - 200) // 4
        self.refused_building_nothing(
            *binary_body(b"\0" * (4 * count), shape=(count,)), f"{count} images in input IMAGE; at most 16 per request"
        )

    def test_a_binary_shape_beyond_the_bytes_sent_reads_no_element(self):
        self.refused_building_nothing(*binary_body(b"\0" * 60, shape=(16,)), "60 bytes of binary data cannot hold 16")

    @pytest.mark.parametrize("element", [b'""', b"[]", b"0", b"{}"], ids=["strings", "lists", "numbers", "objects"])
    def test_json_of_millions_of_values_is_refused_before_it_is_parsed(self, element):
        """``json.loads`` is one C call holding the GIL: 10 MB of ``[],`` took 1.1 s, from any thread."""
        count = (self.SIZE - 100) // (len(element) + 1)
        head = b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [%d], "data": [' % count
        body = head + element + (b"," + element) * (count - 1) + b"]}]}"
        self.refused_building_nothing(body, None, f"commas and brackets, more than the {MAX_JSON_STRUCTURE}")

    def test_the_binary_forms_json_header_is_bounded_too(self):
        header = b'{"inputs": [' + b"[]," * 5000 + b"]}"
        self.refused_building_nothing(header + b"\0" * 4, len(header), "commas and brackets")

    def test_the_most_images_with_every_parameter_fit_the_bound(self, photos):
        body, header_length = triton_body(
            [photos[1]] * MAX_IMAGES,
            binary=False,
            outputs=[triton.InferRequestedOutput(name, binary_data=False) for name in OUTPUT_NAMES],
            parameters={"classes": ",".join(f"class{i}" for i in range(80)), "conf": 0.5, "max_det": 300},
            request_id="a,b,[c]",
        )
        assert len(parse(body, header_length).images) == MAX_IMAGES


def triton_result(body: bytes, headers: dict[str, str]):
    length = headers.get("Inference-Header-Content-Length")
    return triton.InferResult.from_response_body(body, header_length=None if length is None else int(length))


class TestResponse:
    @pytest.mark.parametrize("binary", [True, False])
    def test_tritonclient_reads_all_four_outputs(self, binary):
        requested = [RequestedOutput(name, binary) for name in OUTPUT_NAMES]
        body, headers = infer_response("shapes", "2026-11-29", "req-7", PER_IMAGE, 4, requested)
        assert headers["Content-Type"] == ("application/octet-stream" if binary else "application/json")
        assert ("Inference-Header-Content-Length" in headers) == binary
        result = triton_result(body, headers)
        document = result.get_response()
        assert (document["model_name"], document["model_version"], document["id"]) == ("shapes", "2026-11-29", "req-7")
        assert [output["name"] for output in document["outputs"]] == OUTPUT_NAMES

        num_dets = result.as_numpy("num_dets")
        boxes, scores, classes = (result.as_numpy(name) for name in ("det_boxes", "det_scores", "det_classes"))
        assert (num_dets.dtype, boxes.dtype, scores.dtype, classes.dtype) == (
            np.int32,
            np.float32,
            np.float32,
            np.int32,
        )
        assert (num_dets.shape, boxes.shape, scores.shape, classes.shape) == ((3, 1), (3, 4, 4), (3, 4), (3, 4))
        assert num_dets[:, 0].tolist() == [2, 0, 1]
        np.testing.assert_array_equal(boxes[0, :2], [[10.5, 20.0, 110.25, 220.0], [0.0, 1.0, 2.0, 3.0]])
        np.testing.assert_array_equal(boxes[2, 0], [5.0, 6.0, 7.0, 8.0])
        np.testing.assert_allclose(scores[[0, 0, 2], [0, 1, 0]], [0.9, 0.4, 0.75], rtol=1e-6)
        assert classes[[0, 0, 2], [0, 1, 0]].tolist() == [1, 0, 1]
        # EfficientNMS padding: every slot past num_dets is zero.
        for image, count in enumerate(num_dets[:, 0]):
            assert not boxes[image, count:].any() and not scores[image, count:].any()
            assert not classes[image, count:].any()

    def test_only_requested_outputs_in_their_order_mixed_binary_and_json(self):
        requested = [RequestedOutput("det_classes", False), RequestedOutput("num_dets", True)]
        body, headers = infer_response("shapes", "1", None, PER_IMAGE, 2, requested)
        result = triton_result(body, headers)
        outputs = result.get_response()["outputs"]
        assert [output["name"] for output in outputs] == ["det_classes", "num_dets"]
        assert outputs[0]["data"] == [1, 0, 0, 0, 1, 0]
        assert outputs[1]["parameters"] == {"binary_data_size": 12}
        assert result.as_numpy("num_dets")[:, 0].tolist() == [2, 0, 1]
        assert result.as_numpy("det_boxes") is None
        assert "id" not in result.get_response()
        assert len(body) == int(headers["Inference-Header-Content-Length"]) + 12

    def test_binary_data_is_little_endian(self):
        body, headers = infer_response(
            "m", "1", None, [[detection(258, 1.0, (1, 2, 3, 4))]], 1, [RequestedOutput("det_classes", True)]
        )
        assert body[int(headers["Inference-Header-Content-Length"]) :] == struct.pack("<i", 258)

    def test_more_detections_than_max_det_keep_the_first(self):
        many = [[detection(index, 1 - index / 10, (index, 0, index + 1, 1)) for index in range(5)]]
        body, headers = infer_response("m", "1", None, many, 3, [RequestedOutput(n, True) for n in OUTPUT_NAMES])
        result = triton_result(body, headers)
        assert result.as_numpy("num_dets").tolist() == [[3]]
        assert result.as_numpy("det_classes").tolist() == [[0, 1, 2]]

    def test_parse_then_answer_round_trip(self, photos):
        """A tritonclient request, parsed, answered for what it asked, read back by tritonclient."""
        outputs = [triton.InferRequestedOutput("det_scores", binary_data=False)]
        request = parse(*triton_body(photos, outputs=outputs, request_id="abc", parameters={"max_det": 3}))
        per_image = PER_IMAGE[: len(request.images)]
        result = triton_result(*infer_response("m", "1", request.id, per_image, request.max_det, request.outputs))
        assert result.get_response()["id"] == "abc"
        assert result.as_numpy("det_scores").shape == (2, 3)


def test_model_metadata_declares_dynamic_dimensions():
    document = model_metadata("shapes", ["2026-11-29"], "pytorch")
    assert document["name"] == "shapes" and document["versions"] == ["2026-11-29"] and document["platform"] == "pytorch"
    assert document["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert document["outputs"] == [
        {"name": "num_dets", "datatype": "INT32", "shape": [-1, 1]},
        {"name": "det_boxes", "datatype": "FP32", "shape": [-1, -1, 4]},
        {"name": "det_scores", "datatype": "FP32", "shape": [-1, -1]},
        {"name": "det_classes", "datatype": "INT32", "shape": [-1, -1]},
    ]
    json.dumps(document)


@pytest.mark.parametrize(("value", "length"), [(None, None), ("0", 0), (" 191 ", 191), ("007", 7)])
def test_header_length(value, length):
    assert parse_header_length(value) == length


@pytest.mark.parametrize(
    "value", ["", "-1", "+12", "1_000", "1e3", "0x10", "\u0661\u0662", "12 34", "9" * 19, "9" * 5000]
)
def test_header_length_refused(value):
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length must be a byte count"):
        parse_header_length(value)


def test_health_documents():
    assert server_live(True) == {"live": True}
    assert server_ready(False) == {"ready": False}
    assert model_ready("shapes", True) == {"name": "shapes", "ready": True}


def test_server_metadata_and_error_body():
    assert server_metadata("0.1.0") == {
        "name": "akconv-detector",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "model_repository"],
    }
    assert error_body("unknown output 'boxes'") == {"error": "unknown output 'boxes'"}
