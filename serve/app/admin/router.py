"""The admin endpoints (own keys: serve.app.ingress):

    GET  /admin/v1/experts/generations    published generations, the current one, replicas sampled
    POST /admin/v1/experts/activate       {"generation": "gNNNNNN", "wait_s": 10}
    POST /admin/v1/experts/rollback       {"wait_s": 10}
    DELETE /admin/v1/experts/{name}       a new current generation without the expert
"""

# no `from __future__ import annotations`: FastAPI reads the body types at run time

from fastapi import APIRouter, Query

from ..errors import error_responses
from .protocol import MAX_WAIT_S, ActivateRequest, ActivateResponse, GenerationsResponse, RollbackRequest
from .service import AdminService

ADMIN_PREFIX = "/admin/"


ADMIN_MEANINGS = {
    401: "missing or invalid admin key (the query keys are not admin keys)",
    403: "the admin API is off: no http.admin_keys_env configured (http.admin_open opens it on a loopback host)",
    404: "no such generation, or no such expert in the current generation",
    409: "refused: the generation is damaged, nothing to roll back to, or the service pins a generation",
}


def _errors(*statuses: int) -> dict[int, dict]:
    return error_responses(*statuses, meanings=ADMIN_MEANINGS)


def admin_router(admin: AdminService) -> APIRouter:
    router = APIRouter(prefix="/admin/v1/experts", tags=["admin"])

    @router.get("/generations", response_model=GenerationsResponse, responses=_errors(401, 403))
    async def generations() -> GenerationsResponse:
        return await admin.generations()

    @router.post("/activate", response_model=ActivateResponse, responses=_errors(401, 403, 404, 409, 422))
    async def activate(req: ActivateRequest) -> ActivateResponse:
        return await admin.activate(req.generation, req.wait_s)

    @router.post("/rollback", response_model=ActivateResponse, responses=_errors(401, 403, 409, 422))
    async def rollback(req: RollbackRequest) -> ActivateResponse:
        return await admin.rollback(req.wait_s)

    @router.delete("/{name}", response_model=ActivateResponse, responses=_errors(401, 403, 404, 409, 422))
    async def remove(name: str, wait_s: float = Query(10.0, ge=0, le=MAX_WAIT_S, description="wait up to this long for "
                                                      "the sampled replicas to serve the new generation")) -> ActivateResponse:
        return await admin.remove(name, wait_s)

    return router
