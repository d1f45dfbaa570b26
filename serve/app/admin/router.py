"""The admin endpoints (own keys: serve.app.ingress):

    GET  /admin/v1/experts/generations    published generations, the current one, replicas sampled
    POST /admin/v1/experts/activate       {"generation": "gNNNNNN", "wait_s": 10}
    POST /admin/v1/experts/rollback       {"wait_s": 10}
    DELETE /admin/v1/experts/{name}       a new current generation without the expert
    POST /admin/v1/experts                {"name", "adapter", "domain", "replace"}: register an adapter folder (job, 202)
    POST /admin/v1/experts/train          {"domain", "steps"}: train a domain's expert (job, 202)
    GET  /admin/v1/jobs                   the newest jobs
    GET  /admin/v1/jobs/{job_id}          one job: status, stage, steps done, result or error, the end of its log
"""

# no `from __future__ import annotations`: FastAPI reads the body types at run time

from fastapi import APIRouter, Query, Response

from ..errors import error_responses
from .protocol import (
    MAX_WAIT_S,
    ActivateRequest,
    ActivateResponse,
    GenerationsResponse,
    JobResponse,
    JobsResponse,
    RegisterRequest,
    RollbackRequest,
    TrainRequest,
)
from .service import AdminService

ADMIN_PREFIX = "/admin/"


ADMIN_MEANINGS = {
    401: "missing or invalid admin key (the query keys are not admin keys)",
    403: "the admin API is off: no http.admin_keys_env configured (http.admin_open opens it on a loopback host)",
    404: "no such generation, expert or job",
    409: "refused: the generation is damaged, nothing to roll back to, the service pins a generation, the expert "
         "exists, another job is running, or the store is read-only",
    422: "invalid input: a name, an adapter folder (outside experts.register_root, files missing, shapes of another "
         "base model) or a domain",
}


def _errors(*statuses: int) -> dict[int, dict]:
    return error_responses(*statuses, meanings=ADMIN_MEANINGS)


def _accepted(response: Response, answer: JobResponse) -> JobResponse:
    response.headers["Location"] = f"/admin/v1/jobs/{answer.job.id}"
    return answer


def admin_router(admin: AdminService) -> APIRouter:
    router = APIRouter(prefix="/admin/v1", tags=["admin"])

    @router.get("/experts/generations", response_model=GenerationsResponse, responses=_errors(401, 403))
    async def generations() -> GenerationsResponse:
        return await admin.generations()

    @router.post("/experts/activate", response_model=ActivateResponse, responses=_errors(401, 403, 404, 409, 422))
    async def activate(req: ActivateRequest) -> ActivateResponse:
        return await admin.activate(req.generation, req.wait_s)

    @router.post("/experts/rollback", response_model=ActivateResponse, responses=_errors(401, 403, 409, 422))
    async def rollback(req: RollbackRequest) -> ActivateResponse:
        return await admin.rollback(req.wait_s)

    @router.post("/experts/train", status_code=202, response_model=JobResponse, responses=_errors(401, 403, 409, 422))
    async def train(req: TrainRequest, response: Response) -> JobResponse:
        return _accepted(response, await admin.train(req.domain, req.steps))

    @router.post("/experts", status_code=202, response_model=JobResponse, responses=_errors(401, 403, 409, 422))
    async def register(req: RegisterRequest, response: Response) -> JobResponse:
        return _accepted(response, await admin.register(req.name, req.adapter, req.domain, req.replace))

    @router.delete("/experts/{name}", response_model=ActivateResponse, responses=_errors(401, 403, 404, 409, 422))
    async def remove(name: str, wait_s: float = Query(10.0, ge=0, le=MAX_WAIT_S, description="wait up to this long for "
                                                      "the sampled replicas to serve the new generation")) -> ActivateResponse:
        return await admin.remove(name, wait_s)

    @router.get("/jobs", response_model=JobsResponse, responses=_errors(401, 403))
    async def jobs(limit: int = Query(50, ge=1, le=500)) -> JobsResponse:
        return await admin.list_jobs(limit)

    @router.get("/jobs/{job_id}", response_model=JobResponse, responses=_errors(401, 403, 404, 422))
    async def job(job_id: str) -> JobResponse:
        return await admin.job(job_id)

    return router
