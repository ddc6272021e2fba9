"""The app's long-lived state and the dependencies routes declare: state, API key, readiness, query."""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from pydantic import SecretStr

from service.core.errors import BadRequest, HeadersTooLarge, NotReady, Unauthorized, shown
from service.core.models import ModelRegistry, ModelSlot
from service.core.pipeline import DetectQuery, Pipeline
from service.process.metrics import Metrics
from service.process.settings import Settings

# A caller's X-Request-ID (or gRPC x-request-id) is kept when it is this safe to log; else one is made up.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class ServiceState:
    """The long-lived objects of one app, built in its lifespan and kept on ``app.state.service``."""

    settings: Settings
    metrics: Metrics
    pipeline: Pipeline | None = None
    models: ModelRegistry | None = None
    ready: bool = False
    draining: bool = False

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.ready.set(1 if ready and not self.draining else 0)

    def drained(self) -> bool:
        """Whether no detection request is in flight (admitted and not yet answered: the ``requests`` budget of
        :mod:`service.core.admission`); true before the pipeline exists, when nothing can have been admitted."""
        return self.pipeline is None or self.pipeline.admission.requests.in_use == 0


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def limit_headers(request: Request, state: StateDep) -> None:
    """Every route: headers over ``max_header_bytes`` are refused with 431. (uvicorn's h11 limit only bounds
    headers that arrive in pieces; a block that arrives whole is measured here.)"""
    size = sum(len(name) + len(value) + 4 for name, value in request.scope["headers"])  # "name: value\r\n"
    if size > state.settings.max_header_bytes:
        raise HeadersTooLarge(
            f"the request headers are {size} bytes, more than the limit of {state.settings.max_header_bytes}"
        )


def require_api_key(request: Request, state: StateDep) -> None:
    """With an API key configured: ``X-API-Key: KEY`` or ``Authorization: Bearer KEY`` is required."""
    check_api_key(state.settings.api_key, request.headers)


def check_api_key(expected: SecretStr | None, headers: Mapping[str, str]) -> None:
    """Raise :class:`Unauthorized` unless ``headers`` (lower-case names: HTTP headers, or gRPC metadata) carry the
    key ``expected`` as ``x-api-key`` or ``authorization: Bearer KEY``; nothing is required when it is None."""
    if expected is None:
        return
    given = headers.get("x-api-key") or ""
    authorization = headers.get("authorization", "")
    if not given and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("a valid API key is required (X-API-Key header or Authorization: Bearer)")


def ready_pipeline(state: StateDep) -> Pipeline:
    if not state.ready or state.draining or state.pipeline is None:
        raise NotReady("the model is not ready (warming up or draining)", {"Retry-After": "1"})
    return state.pipeline


PipelineDep = Annotated[Pipeline, Depends(ready_pipeline)]


def ready_models(state: StateDep, pipeline: PipelineDep) -> ModelRegistry:
    assert state.models is not None, "ready without models"
    return state.models


ModelsDep = Annotated[ModelRegistry, Depends(ready_models)]


def chosen_model(
    models: ModelsDep,
    model: Annotated[
        str | None, Query(description="served model name (GET /v1/config: models); default: the first")
    ] = None,
) -> ModelSlot:
    return models.get(model)


ModelDep = Annotated[ModelSlot, Depends(chosen_model)]


def class_id(token: str, names: list[str]) -> int:
    """The id of a class given by id (ASCII digits only: ``"²"`` and ``"١"`` are not ids) or by name."""
    token = token.strip()
    # Bounded before int(): Python refuses to parse integers of more than 4,300 digits (a ValueError, a 500).
    if token.isascii() and token.isdigit() and len(token) <= 9 and int(token) < len(names):
        return int(token)
    if token in names:
        return names.index(token)
    raise BadRequest(f"unknown class {shown(token)}; classes are {', '.join(names)} (or ids 0-{len(names) - 1})")


def detect_query(
    state: StateDep,
    model: ModelDep,
    conf: Annotated[float | None, Query(ge=0, le=1, description="minimum confidence; default from settings")] = None,
    max_det: Annotated[int | None, Query(ge=1, le=300, description="most detections per image")] = None,
    classes: Annotated[str | None, Query(description="comma-separated class ids or names", examples=["star"])] = None,
    dedupe: Annotated[
        float | None,
        Query(
            gt=0,
            le=1,
            examples=[0.7],
            description="where boxes (of any class) overlap above this IoU, keep only the most confident one",
        ),
    ] = None,
) -> DetectQuery:
    selected = None
    if classes is not None:
        names = model.live.engine.names
        selected = {class_id(token, names) for token in classes.split(",") if token.strip()}
        if not selected:
            raise BadRequest(f"classes is empty; list class ids or names, e.g. classes={names[0] if names else 0}")
    return DetectQuery(
        conf=state.settings.default_conf if conf is None else conf,
        max_det=state.settings.max_detections if max_det is None else max_det,
        classes=selected,
        dedupe_iou=dedupe,
    )


QueryDep = Annotated[DetectQuery, Depends(detect_query)]
