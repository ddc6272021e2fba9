"""The Open Inference Protocol (KServe v2, Triton's HTTP API) over REST, beside the service's own API.

Errors are the protocol's ``{"error": message}`` (``service.app`` answers every ``/v2`` path that way).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request

from service.dependencies import ModelsDep, require_api_key
from service.errors import BadRequest

oip_router = APIRouter(prefix="/v2", tags=["open inference protocol"])

MAX_LOAD_BODY = 64 * 1024  # a load request's body: its parameters, which this server refuses anyway


@oip_router.post(
    "/repository/models/{name}/load", dependencies=[Depends(require_api_key)], summary="Swap in a new version"
)
async def load_model(name: str, request: Request, models: ModelsDep) -> dict[str, str]:
    """Read the model's configured file again and make it live without downtime: verified and warmed up while the
    live version serves, then switched; requests in flight finish on the version they started on. A version that
    fails to load or verify is refused with 400 and the live version keeps serving. Only the configured path is
    read: a body's ``config`` or ``files`` parameters are refused."""
    slot = models.get(name)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOAD_BODY:
            raise BadRequest(f"a load request's body is at most {MAX_LOAD_BODY} bytes")
    if body.strip():
        try:
            parameters = json.loads(body).get("parameters")
        except (ValueError, RecursionError, AttributeError):
            raise BadRequest("a load request's body must be a JSON object") from None
        if parameters:
            raise BadRequest(
                "this server loads a model only from its configured path; config and files parameters are refused"
            )
    live = await slot.reload()
    return {"model_name": slot.name, "model_version": live.version}


@oip_router.post("/repository/index", dependencies=[Depends(require_api_key)], summary="The served models")
async def repository_index(models: ModelsDep) -> list[dict[str, str]]:
    return [{"name": slot.name, "version": slot.live.version, "state": "READY"} for slot in models.slots]
