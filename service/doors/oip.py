"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) as a wire format: pure functions, no web
framework, no model. The routes hand this module request bodies and answer the bytes and documents it returns.

Spec: https://github.com/kserve/open-inference-protocol (``inference_rest.md``) and Triton's binary tensor data
extension (``docs/protocol/extension_binary_data.md`` in triton-inference-server/server).

The model, as the protocol sees it:

- one input, ``IMAGE``, datatype ``BYTES``, shape ``[B]``: B encoded image files (JPEG, PNG, ... as ``/detect``
  takes them), not pixel tensors. In the binary tensor data extension (header ``Inference-Header-Content-Length: N``:
  the first N bytes of the body are the JSON header, the rest the data of the inputs whose
  ``parameters.binary_data_size`` is set, in input order) each element is a 4-byte little-endian length followed by
  that many bytes: the file as it is. In the JSON form (``"data": [...]``) each element is the file in **base64**
  (RFC 4648, standard alphabet, padded; ASCII whitespace such as ``base64``'s line breaks is ignored). Why: the
  protocol gives a BYTES element in JSON as a string, and Triton stores that string's own UTF-8 bytes while
  tritonclient refuses bytes that are not UTF-8 (a JPEG never is), so neither can carry a file raw in JSON; base64 is
  what MLServer's ``base64`` content type and TensorFlow Serving's ``{"b64": ...}`` use for the same problem. With
  tritonclient: ``np.array([base64.b64encode(jpeg)], dtype=np.object_)`` and ``binary_data=False``.
- outputs in TensorRT's EfficientNMS convention, as detection models on Triton answer: ``num_dets`` INT32 [B, 1],
  ``det_boxes`` FP32 [B, K, 4] (x1, y1, x2, y2 in the original image's pixels), ``det_scores`` FP32 [B, K],
  ``det_classes`` INT32 [B, K], K = the request's ``max_det``; rows past ``num_dets`` are zeros (EfficientNMS's
  ``keepTopK`` padding).
- request parameters ``conf`` (number 0..1), ``max_det`` (integer 1..300), ``classes`` (a list of class ids and
  names, or one comma-separated string), as ``/detect``'s query takes them. Other parameters (tritonclient's
  ``priority``, ``timeout``, ...) are ignored, as Triton leaves them to a model that does not read them.

Malformed requests raise :class:`service.core.errors.BadRequest` (400); a compressed body (any ``Content-Encoding`` but
``identity``) raises :class:`service.core.errors.UnsupportedMediaType` (415): compression is not supported. Parsing
never allocates more than the body's size: every length a request declares is checked against the bytes it sent before
anything is sized from it. Its work is bounded before it starts: the JSON's commas and brackets are counted before
it is parsed (:data:`MAX_JSON_STRUCTURE`), and the image count is checked against the request's limit and the
bytes sent before any element is read. Errors go back as :func:`error_body`, ``{"error": message}``.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.errors import BadRequest, UnsupportedMediaType, shown
from service.schemas import Detection

SERVER_NAME = "akconv-detector"
EXTENSIONS = ("binary_tensor_data", "model_repository")
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DET = 300  # the upper bound of the max_det parameter, as /detect's query
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix
_DTYPES = {"INT32": np.dtype("<i4"), "FP32": np.dtype("<f4")}  # little-endian, as the binary extension sends them
_WHITESPACE = str.maketrans("", "", " \t\r\n")
# Commas and opening brackets a request's JSON may hold. json.loads is one C call that holds the GIL, so the objects
# it builds are bounded before it runs: each value after the first follows a comma or the bracket that opens its
# container, so a document holds at most one value more than its commas and brackets. 10 MB of "[]," took 1.1 s,
# stalling the event loop even from another thread; a request needs a few dozen (its images, parameters, outputs).
MAX_JSON_STRUCTURE = 4096


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as model metadata declares it; -1 marks a dimension that varies (B, and K = max_det)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


INPUT = TensorSpec("IMAGE", "BYTES", (-1,))
OUTPUTS = (
    TensorSpec("num_dets", "INT32", (-1, 1)),
    TensorSpec("det_boxes", "FP32", (-1, -1, 4)),
    TensorSpec("det_scores", "FP32", (-1, -1)),
    TensorSpec("det_classes", "INT32", (-1, -1)),
)
_OUTPUT_SPECS = {spec.name: spec for spec in OUTPUTS}
_EXPECTED_INPUT = f"the model takes one input, {INPUT.name} ({INPUT.datatype}, shape [B]: B encoded image files)"


@dataclass(frozen=True)
class RequestedOutput:
    """An output to answer: its name and whether its data goes as binary after the JSON header (else JSON)."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """What an inference request asks for, checked but not resolved against a model.

    Attributes:
        id: the request's ``id``, to echo in the response; None when it gave none.
        images: the B encoded image files, in order (B >= 1; an element may be empty: decoding refuses it).
        conf: the ``conf`` parameter (0..1), None when absent.
        max_det: the ``max_det`` parameter (1..300), None when absent.
        classes: the ``classes`` parameter as tokens (ids as digit strings, or names) for
            :func:`service.doors.dependencies.class_id`; None when absent, never empty.
        outputs: the outputs to answer, in order: those listed, or all four when none are.
    """

    id: str | None
    images: list[bytes]
    conf: float | None
    max_det: int | None
    classes: tuple[str, ...] | None
    outputs: tuple[RequestedOutput, ...]


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an integer, None when absent. Only ASCII digits are taken
    (``int()`` alone would also take ``+12``, ``1_000`` and ``١٢``)."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise BadRequest(f"{HEADER_LENGTH} must be a byte count, not {shown(value)}")
    return int(value)


def check_content_encoding(value: str | None) -> None:
    """The ``Content-Encoding`` header: only none or ``identity`` is accepted; checked before the body is read.

    Raises:
        UnsupportedMediaType: the body is compressed.
    """
    if value is not None and value.strip().lower() not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {shown(value)} is not supported: send the body uncompressed")


def parse_infer_request(body: bytes, header_length: int | None, *, max_images: int) -> InferRequest:
    """The request in ``body``, a ``POST .../infer`` body. Its work grows with the body (base64, copies), so the
    routes run it off the event loop; what it may build is bounded first (see the module's docstring).

    Args:
        body: the whole request body.
        header_length: the ``Inference-Header-Content-Length`` header (:func:`parse_header_length`): how many bytes
            at the start of ``body`` are the JSON header; None when absent (the whole body is JSON).
        max_images: the most images a request may send (``max_batch_files``); a larger shape is refused before any
            element is read.

    Raises:
        BadRequest: what the request gets wrong, with a message that says what.
    """
    if header_length is None:
        header_length = len(body)
    elif not 0 <= header_length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes")
    header = _load_header(body[:header_length])
    binary = memoryview(body)[header_length:]
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    parameters = _object(header.get("parameters", {}), "'parameters'")
    images = _images(header.get("inputs"), binary, max_images)
    return infer_request(request_id, images, parameters, header.get("outputs"), _flag(parameters, "binary_data_output"))


def infer_request(
    request_id: str | None, images: list[bytes], parameters: dict[str, Any], outputs: Any, binary_default: bool
) -> InferRequest:
    """The request, from its parts as a transport decoded them (JSON over REST, protobuf over gRPC).

    Args:
        request_id: the request's ``id``, None when it gave none.
        images: the input's files (:func:`check_image_input` has checked their count).
        parameters: the request's parameters by name, as JSON values (``conf``, ``max_det``, ``classes`` are read).
        outputs: the requested outputs as JSON (a list of ``{"name", "parameters"}`` objects), None for all four.
        binary_default: whether an output that does not say is binary.

    Raises:
        BadRequest: a parameter or output the request gets wrong.
    """
    return InferRequest(
        id=request_id,
        images=images,
        conf=_conf(parameters.get("conf")),
        max_det=_max_det(parameters.get("max_det")),
        classes=_classes(parameters.get("classes")),
        outputs=_requested_outputs(outputs, binary_default),
    )


def infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    per_image: Sequence[Sequence[Detection]],
    max_det: int,
    requested: Sequence[RequestedOutput],
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an inference response.

    Args:
        model_name, model_version: the model that answered.
        request_id: echoed as ``id``; omitted when None (as Triton does for a request without one).
        per_image: each image's detections, in request order, most confident first; at most ``max_det`` are kept.
        max_det: K, the detection slots per image (the request's ``max_det``, or the service's default).
        requested: the outputs to answer (:attr:`InferRequest.outputs`), in order.

    Returns:
        ``(body, headers)``: a JSON body (``Content-Type: application/json``); or, when some output is binary, the
        JSON header followed by the binary outputs' little-endian data in output order
        (``Content-Type: application/octet-stream`` and ``Inference-Header-Content-Length``).
    """
    outputs, chunks = [], []
    for output, datatype, array in output_tensors(per_image, max_det, requested):
        tensor = {"name": output.name, "datatype": datatype, "shape": list(array.shape)}
        if output.binary:
            chunks.append(array.tobytes())
            tensor["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            tensor["data"] = array.ravel().tolist()
        outputs.append(tensor)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return b"".join([header, *chunks]), headers


def output_tensors(
    per_image: Sequence[Sequence[Detection]], max_det: int, requested: Sequence[RequestedOutput]
) -> list[tuple[RequestedOutput, str, np.ndarray]]:
    """The requested outputs, in order, each with its datatype and its little-endian array (shapes in the module's
    docstring), for B = ``len(per_image)`` images and K = ``max_det`` slots."""
    tensors = _detection_tensors(per_image, max_det)
    return [(output, _OUTPUT_SPECS[output.name].datatype, tensors[output.name]) for output in requested]


def server_metadata(version: str) -> dict[str, Any]:
    """``GET /v2``: the server's name, version and protocol extensions."""
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, versions: Sequence[str], platform: str) -> dict[str, Any]:
    """``GET /v2/models/{name}[/versions/{v}]``: the model's name, versions, platform (its framework, e.g.
    ``pytorch``), and its input and outputs (:data:`INPUT`, :data:`OUTPUTS`)."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [INPUT.metadata()],
        "outputs": [spec.metadata() for spec in OUTPUTS],
    }


def server_live(live: bool) -> dict[str, bool]:
    """``GET /v2/health/live``. Triton's clients read only the status (200 or not); KServe's read this body."""
    return {"live": live}


def server_ready(ready: bool) -> dict[str, bool]:
    """``GET /v2/health/ready``; as :func:`server_live`, the status says it too."""
    return {"ready": ready}


def model_ready(name: str, ready: bool) -> dict[str, Any]:
    """``GET /v2/models/{name}[/versions/{v}]/ready``; as :func:`server_live`, the status says it too."""
    return {"name": name, "ready": ready}


def error_body(message: str) -> dict[str, str]:
    """The protocol's error document, sent with the error's HTTP status."""
    return {"error": message}


def _load_header(header: bytes) -> dict[str, Any]:
    """The JSON header as an object; non-JSON, ``NaN``, nesting too deep for the parser and more values than a
    request needs (:data:`MAX_JSON_STRUCTURE`) are refused."""
    structure = header.count(b",") + header.count(b"[") + header.count(b"{")  # 7 ms a pass for 10 MB, no copy
    if structure > MAX_JSON_STRUCTURE:
        raise BadRequest(
            f"the inference request's JSON holds {structure} commas and brackets, more than the "
            f"{MAX_JSON_STRUCTURE} a request needs: send one input of a few images, as base64 strings or binary data"
        )
    try:
        document = json.loads(header.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise BadRequest("the inference request's JSON is nested too deeply") from None
    except json.JSONDecodeError as error:
        raise BadRequest(f"the inference request is not valid JSON: {error}") from None
    except ValueError:  # not UTF-8, NaN or Infinity, an integer of more than 4,300 digits
        raise BadRequest(
            "the inference request is not valid JSON (UTF-8; no NaN, no Infinity, no huge integers)"
        ) from None
    return _object(document, "the inference request")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _flag(parameters: dict[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {name!r} must be true or false")
    return value


def _images(inputs: Any, binary: memoryview, max_images: int) -> list[bytes]:
    """The files of the one ``IMAGE`` input, from its JSON ``data`` (base64) or from ``binary`` (length-prefixed);
    its shape is checked against ``max_images`` and the bytes sent before any element is read."""
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise BadRequest(f"'inputs' must list one input: {_EXPECTED_INPUT}")
    tensor = _object(inputs[0], "an input")
    count = check_image_input(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), max_images)
    parameters = _object(tensor.get("parameters", {}), f"the parameters of input {INPUT.name}")
    if "shared_memory_region" in parameters:
        raise BadRequest("the shared-memory extension is not supported: send the data in the request")
    size = parameters.get("binary_data_size")
    if size is None:
        if len(binary):
            raise BadRequest(f"{len(binary)} bytes follow the JSON header, but no input sets 'binary_data_size'")
        return _base64_elements(tensor.get("data"), count)
    if "data" in tensor:
        raise BadRequest(f"input {INPUT.name} has both 'data' and 'binary_data_size': send one")
    if type(size) is not int or size != len(binary):
        raise BadRequest(
            f"input {INPUT.name} declares binary_data_size {shown(size)}, "
            f"but {len(binary)} bytes follow the JSON header"
        )
    if count * _LENGTH.size > len(binary):
        raise BadRequest(
            f"input {INPUT.name} has shape [{count}], but its {len(binary)} bytes of binary data cannot hold "
            f"{count} elements ({_LENGTH.size} bytes of length each, at least)"
        )
    return bytes_elements(binary, count)


def check_image_input(name: Any, datatype: Any, shape: Any, max_images: int) -> int:
    """The number of images B in input ``IMAGE`` (``BYTES``, shape ``[B]``), 1 <= B <= ``max_images``; checked
    before any element is read.

    Raises:
        BadRequest: another input, datatype or shape.
    """
    if name != INPUT.name:
        raise BadRequest(f"unknown input {shown(name)}: {_EXPECTED_INPUT}")
    if datatype != INPUT.datatype:
        raise BadRequest(f"input {INPUT.name} has datatype {shown(datatype)}: {_EXPECTED_INPUT}")
    if not (isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int):
        raise BadRequest(f"input {INPUT.name} has shape {shown(shape)}: {_EXPECTED_INPUT}")
    count = shape[0]
    if count < 1:
        raise BadRequest(f"input {INPUT.name} has shape [{count}]: send at least one image")
    if count > max_images:
        raise BadRequest(f"{count} images in input {INPUT.name}; at most {max_images} per request")
    return count


def bytes_elements(data: memoryview, count: int) -> list[bytes]:
    """``count`` BYTES elements (each a 4-byte little-endian length, then that many bytes) that fill ``data``."""
    elements, offset = [], 0
    while offset < len(data):
        if len(elements) == count:
            raise BadRequest(f"input {INPUT.name} has shape [{count}], but its binary data holds more elements")
        if offset + _LENGTH.size > len(data):
            raise BadRequest(f"input {INPUT.name}'s binary data ends inside the length of element {len(elements)}")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if length > len(data) - offset:
            raise BadRequest(
                f"element {len(elements)} of input {INPUT.name} declares {length} bytes, "
                f"but {len(data) - offset} remain"
            )
        elements.append(bytes(data[offset : offset + length]))
        offset += length
    if len(elements) != count:
        raise BadRequest(f"input {INPUT.name} has shape [{count}], but its binary data holds {len(elements)} elements")
    return elements


def _base64_elements(data: Any, count: int) -> list[bytes]:
    """``count`` files from JSON ``data``: a flat list of base64 strings."""
    if not isinstance(data, list):
        raise BadRequest(f"input {INPUT.name} needs 'data' (a list of base64 strings) or 'binary_data_size'")
    if len(data) != count:
        raise BadRequest(f"input {INPUT.name} has shape [{count}], but 'data' holds {len(data)} elements")
    elements = []
    for index, element in enumerate(data):
        if not isinstance(element, str):
            raise BadRequest(f"element {index} of input {INPUT.name} must be a base64 string (the encoded file)")
        try:
            elements.append(base64.b64decode(element.translate(_WHITESPACE), validate=True))
        except ValueError:  # binascii.Error, or a character outside ASCII
            raise BadRequest(
                f"element {index} of input {INPUT.name} is not base64: in JSON each image is its file in base64 "
                "(standard alphabet, padded); or send it binary (the binary tensor data extension)"
            ) from None
    return elements


def _conf(value: Any) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 <= value <= 1:
        raise BadRequest(f"parameter 'conf' must be a number from 0 to 1, not {shown(value)}")
    return float(value)


def _max_det(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= MAX_DET:
        raise BadRequest(f"parameter 'max_det' must be an integer from 1 to {MAX_DET}, not {shown(value)}")
    return value


def _classes(value: Any) -> tuple[str, ...] | None:
    """Class tokens from a comma-separated string, one id, or a list of ids and names; blanks dropped."""
    if value is None:
        return None
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list):
        items = value
    else:
        items = [value]
    tokens = []
    for item in items:
        if type(item) is int:
            tokens.append(str(item))
        elif isinstance(item, str):
            if item.strip():
                tokens.append(item.strip())
        else:
            raise BadRequest(f"parameter 'classes' takes class ids and names, not {shown(item)}")
    if not tokens:
        raise BadRequest("parameter 'classes' is empty: name at least one class, or leave it out for all")
    return tuple(tokens)


def _requested_outputs(outputs: Any, binary_default: bool) -> tuple[RequestedOutput, ...]:
    """The listed outputs, each binary per its ``binary_data`` or else the request's ``binary_data_output``; all four
    when none are listed (tritonclient then sends ``binary_data_output: true``)."""
    if outputs is None:
        return tuple(RequestedOutput(name, binary_default) for name in _OUTPUT_SPECS)
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list")
    requested = []
    for output in outputs:
        output = _object(output, "a requested output")
        name = output.get("name")
        if not isinstance(name, str) or name not in _OUTPUT_SPECS:
            raise BadRequest(f"unknown output {shown(name)}; the outputs are {', '.join(_OUTPUT_SPECS)}")
        if any(seen.name == name for seen in requested):
            raise BadRequest(f"output {name!r} is requested twice")
        parameters = _object(output.get("parameters", {}), f"the parameters of output {name!r}")
        if "classification" in parameters:
            raise BadRequest("the classification extension is not supported: detections come as the four outputs")
        if "shared_memory_region" in parameters:
            raise BadRequest("the shared-memory extension is not supported: outputs come in the response")
        binary = _flag(parameters, "binary_data") if "binary_data" in parameters else binary_default
        requested.append(RequestedOutput(name, binary))
    return tuple(requested)


def _detection_tensors(per_image: Sequence[Sequence[Detection]], max_det: int) -> dict[str, np.ndarray]:
    """The four outputs for B images and K = ``max_det`` slots, zero past each image's ``num_dets``."""
    batch = len(per_image)
    num_dets = np.zeros((batch, 1), _DTYPES["INT32"])  # (B, 1)
    boxes = np.zeros((batch, max_det, 4), _DTYPES["FP32"])  # (B, K, 4) x1, y1, x2, y2, original-image pixels
    scores = np.zeros((batch, max_det), _DTYPES["FP32"])  # (B, K)
    classes = np.zeros((batch, max_det), _DTYPES["INT32"])  # (B, K)
    for index, detections in enumerate(per_image):
        kept = detections[:max_det]
        num_dets[index, 0] = len(kept)
        for slot, detection in enumerate(kept):
            boxes[index, slot] = detection.box
            scores[index, slot] = detection.confidence
            classes[index, slot] = detection.class_id
    return {"num_dets": num_dets, "det_boxes": boxes, "det_scores": scores, "det_classes": classes}
