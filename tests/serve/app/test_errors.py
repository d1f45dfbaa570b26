"""serve.app.errors: RequestError crosses a Ray hop as itself, and every error answer is one JSON shape."""

import pickle

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError

from serve.app.errors import EngineUnavailable, RequestError, error_body, install_error_handlers


@pytest.mark.parametrize("exc", [RequestError("top_k too big", "top_k", 422), EngineUnavailable("router engine down")])
def test_request_error_pickles_with_every_field(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert (back.message, back.param, back.status, str(back)) == (exc.message, exc.param, exc.status, str(exc))


def _app(exc: Exception) -> TestClient:
    app = FastAPI()
    seen = []
    install_error_handlers(app, lambda request, status, reason: seen.append((status, reason)))

    @app.get("/boom")
    async def boom():
        raise exc

    client = TestClient(app, raise_server_exceptions=False)
    client.seen = seen
    return client


def test_an_error_raised_in_a_replica_answers_as_itself():
    """What a handle call raises when the controller replica raised EngineUnavailable: Ray's
    RayTaskError made an instance of the cause's class around the unpickled cause."""
    cause = pickle.loads(pickle.dumps(EngineUnavailable("router engine 'e' failed")))
    raised = RayTaskError("chat", "Traceback ...", cause).as_instanceof_cause()
    assert isinstance(raised, RequestError) and raised.status == 503
    client = _app(raised)
    r = client.get("/boom")
    assert r.status_code == 503
    assert r.json() == error_body(503, "router engine 'e' failed", "model", "server_error")
    assert client.seen == [(503, "model")]


def test_unexpected_errors_and_routing_errors_are_json():
    client = _app(ZeroDivisionError("secret detail"))
    r = client.get("/boom")
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error (ZeroDivisionError)"
    r = client.post("/boom")
    assert r.status_code == 405 and r.headers["allow"] == "GET" and r.json()["error"]["code"] == 405
    assert client.get("/nowhere").json()["error"]["code"] == 404
    assert [s for s, _ in client.seen] == [500, 405, 404]


def test_a_full_deployment_behind_the_ingress_is_a_503_with_retry_after():
    """A handle call to a deployment past its max_queued_requests raises Serve's BackPressureError:
    answered 503 + Retry-After, not 500."""
    from ray.serve.exceptions import BackPressureError

    client = _app(BackPressureError(num_queued_requests=128, max_queued_requests=128, retry_after_s=2.5))
    r = client.get("/boom")
    assert r.status_code == 503 and r.headers["retry-after"] == "3" and "capacity" in r.json()["error"]["message"]
    assert client.seen == [(503, "backpressure")]
    client = _app(RequestError("busy", None, 503, headers={"Retry-After": "4"}))
    r = client.get("/boom")
    assert r.status_code == 503 and r.headers["retry-after"] == "4"
