"""ChatService: the logic behind /v1/chat/completions and /v1/models (plain class, no Ray).

``model: router-r1`` runs the Router-R1 loop (actors.router_r1) with the configured router engine
over the candidate pool; ``model: <candidate>`` calls that candidate directly. Engines are reached
through ``EngineClient`` objects: in Serve, handles to the LLM engine deployments
(serve.app.deployments); in tests and benchmarks, engines in this process. Tokenizers (chat template,
worst-case cost of a call before it is made) run here, next to the loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict
from typing import AsyncIterator, Callable, Mapping, Protocol, Sequence

from actors.router_r1 import (
    CANDIDATE_INSTRUCTION,
    DEFAULT_ROUTER_PROMPT,
    Candidate,
    Completion,
    LoopSettings,
    NameResolver,
    Price,
    RouterFailed,
    RouterR1Loop,
    RouterR1Result,
    RouterTokens,
    Round,
    candidate_messages,
    conservative_prompt_tokens,
    read_candidate_instruction,
    read_router_prompt,
    render_router_prompt,
    router_action_regex,
)

from serve.config import CandidateConfig, LLMConfig

from ..errors import EngineUnavailable, RequestError, error_body
from ..metrics import record_chat
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ModelCard,
    ModelList,
    ResponseMessage,
    RoutingInfo,
    Usage,
    has_user_text,
)


LENGTH_STOPS = ("answer_truncated", "max_tokens", "context")  # a token cap cut the output: finish_reason "length"


class EngineClient(Protocol):
    async def complete(self, prompt: str, *, max_tokens: int, temperature: float = 0.0,
                       stop: Sequence[str] = (), regex: str | None = None) -> Completion: ...
    async def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
                   seed: int | None = None) -> Completion: ...
    async def check_health(self) -> None: ...


def load_prompt_template(path, syntax: str = "template") -> str:
    """The router prompt template: routerserve's own, or ``path`` checked for ``syntax``."""
    if path is None:
        return DEFAULT_ROUTER_PROMPT
    try:
        return read_router_prompt(path, syntax)
    except ValueError as exc:
        raise ValueError(f"llm.router.prompt_file: {path}: {exc}") from None


def load_candidate_instruction(c: CandidateConfig) -> str:
    """What the candidate wraps a sub-query in: routerserve's own, or its instruction_file checked."""
    if c.instruction_file is None:
        return CANDIDATE_INSTRUCTION
    try:
        return read_candidate_instruction(c.instruction_file)
    except ValueError as exc:
        raise ValueError(f"llm.candidates ({c.name}).instruction_file: {c.instruction_file}: {exc}") from None


class ChatService:
    def __init__(
        self,
        llm: LLMConfig,
        engines: Mapping[str, EngineClient],
        chat_prompt: Callable[[list[dict]], str],
        count_prompt: Mapping[str, Callable[[list[dict]], int]] | None = None,
        prompt_template: str | None = None,
        router_tokens: RouterTokens | None = None,
    ) -> None:
        """``chat_prompt``: the router model's chat template (messages → text with the generation
        prompt); ``count_prompt``: per engine name, the exact prompt-token count of a message list
        (its tokenizer and chat template), used to bound a call's cost before it is made; engines
        without one get ``conservative_prompt_tokens``; ``router_tokens``: the router's tokenizer
        (the observation cut and the context window; None: neither)."""
        self.cfg = llm
        self.engines = dict(engines)
        self.chat_prompt = chat_prompt
        self.count_prompt = dict(count_prompt or {})
        self.syntax = llm.router.prompt_syntax if llm.router else "template"
        self.template = prompt_template or load_prompt_template(llm.router.prompt_file if llm.router else None, self.syntax)
        self.created = int(time.time())
        self.metrics = None  # serve.app.metrics.Metrics inside a replica; None: not recorded
        # a candidate by any of its names (its aliases too), case-insensitive: direct calls, the fallback
        self.by_lower = {n.strip().lower(): c for c in llm.candidates for n in (c.name, *c.aliases)}
        self.pool = [(c.name, c.description, self._price(c)) for c in llm.candidates]
        self.written_names = [n for c in llm.candidates for n in (c.name, *c.aliases)]  # what a search may name
        self.loop = None
        if llm.router is not None:
            r = llm.router
            self.loop = RouterR1Loop(
                self._router_generate,
                {c.name: self._candidate(c) for c in llm.candidates},
                LoopSettings(
                    max_route_calls=r.max_route_calls,
                    max_new_tokens=r.max_new_tokens,
                    temperature=r.temperature,
                    max_turns=r.max_turns,
                    budget=r.budget,
                    fallback=self.by_lower[r.fallback.lower()].name if r.fallback else None,
                    deadline_s=r.request_timeout_s,
                    # each candidate's own timeout_s is on its Candidate
                    max_observation_tokens=r.max_observation_tokens,
                    context_window=llm.router_context_window(),
                ),
                resolve=NameResolver({c.name: c.aliases for c in llm.candidates}, llm.name_rules()),
                tokens=router_tokens,
            )

    # -- building blocks ---------------------------------------------------------------------

    @staticmethod
    def _price(c: CandidateConfig) -> Price:
        return Price(c.price.prompt_per_1m, c.price.completion_per_1m, c.price.currency)

    def _candidate(self, c: CandidateConfig) -> Candidate:
        engine = self.engines[c.engine]
        instruction = load_candidate_instruction(c)

        async def call(query: str) -> Completion:
            return await engine.chat(candidate_messages(query, instruction), max_tokens=c.max_tokens,
                                     temperature=c.temperature, seed=c.seed)

        return Candidate(c.name, self._price(c), call, c.max_tokens, self._counter(c.engine), c.timeout_s, instruction)

    def _counter(self, engine: str) -> Callable[[list[dict]], int]:
        return self.count_prompt.get(engine) or conservative_prompt_tokens

    async def _router_generate(self, prompt, stop, max_new_tokens, temperature, may_route, continuation=False) -> Completion:
        r = self.cfg.router
        regex = None  # a continuation of a cut generation may be inside any tag: never constrained
        if r.structured_output and not continuation:
            regex = router_action_regex(self.written_names, may_route, r.structured_think)
        async with asyncio.timeout(r.timeout_s):  # not wait_for: on 3.11 it can swallow a cancellation
            return await self.engines[r.engine].complete(
                prompt, max_tokens=max_new_tokens, temperature=temperature, stop=stop, regex=regex)

    def router_prompt(self, question: str) -> str:
        user = render_router_prompt(self.template, question, self.pool, self.syntax)
        return self.chat_prompt([{"role": "user", "content": user}])

    # -- endpoints ---------------------------------------------------------------------------

    def models(self) -> ModelList:
        cards = []
        if self.cfg.router is not None:
            cards.append(ModelCard(id=self.cfg.router.served_name, created=self.created, kind="router",
                                   description="Router-R1: multi-round routing over the candidates", engine=self.cfg.router.engine))
        for c in self.cfg.candidates:
            cards.append(ModelCard(id=c.name, created=self.created, kind="candidate", description=c.description,
                                   price=c.price.model_dump(), engine=c.engine))
        return ModelList(data=cards)

    def _target(self, req: ChatCompletionRequest) -> CandidateConfig | None:
        """None = the router; else the candidate called directly."""
        if self.cfg.router is not None and req.model.lower() == self.cfg.router.served_name.lower():
            return None
        cand = self.by_lower.get(req.model.lower())
        if cand is None:
            names = ([self.cfg.router.served_name] if self.cfg.router else []) + [c.name for c in self.cfg.candidates]
            raise RequestError(f"model {req.model!r} not found; available: {names}", "model", 404)
        return cand

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        cand = self._target(req)
        if cand is None:
            return self._router_response(req, await self._run_router(req))
        return await self._direct(req, cand)

    async def stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        """Server-sent events: one chunk per router round (choices empty, ``routing_event`` set),
        then the answer chunk, the usage chunk when asked, and ``[DONE]``."""
        cand = self._target(req)  # 404 before the stream opens
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if cand is not None:
            response = await self._direct(req, cand)
        else:
            queue: asyncio.Queue = asyncio.Queue()
            task = asyncio.ensure_future(self._run_router(req, on_round=queue.put))
            try:  # a client that goes away (the generator is closed) stops the loop: no more paid calls
                async for chunk in self._stream_rounds(req, rid, queue, task):
                    yield chunk
            finally:
                if not task.done():
                    task.cancel()
            try:
                response = self._router_response(req, task.result())
            except RequestError as exc:
                yield _sse(error_body(exc.status, exc.message, exc.param, extra=exc.extra))
                yield "data: [DONE]\n\n"
                return
        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": response.created, "model": req.model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": response.choices[0].message.content},
                                 "finish_reason": response.choices[0].finish_reason}],
                    "routing": response.routing.model_dump()})
        if req.stream_options is not None and req.stream_options.include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": response.created, "model": req.model,
                        "choices": [], "usage": response.usage.model_dump()})
        yield "data: [DONE]\n\n"

    @staticmethod
    async def _stream_rounds(req, rid: str, queue: asyncio.Queue, task: asyncio.Future) -> AsyncIterator[str]:
        """One SSE chunk per round as the loop reports it, until the loop ends."""

        def round_chunk(rnd: Round) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": req.model, "choices": [], "routing_event": asdict(rnd)})

        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield round_chunk(getter.result())
                continue
            getter.cancel()
            while not queue.empty():  # rounds that landed together with the end of the loop
                yield round_chunk(queue.get_nowait())
            return

    async def _run_router(self, req: ChatCompletionRequest, on_round=None) -> RouterR1Result:
        question = next(m.text() for m in reversed(req.messages) if m.role == "user" and has_user_text(m))
        prompt = self.router_prompt(question)
        try:
            return await self.loop.run(prompt, on_round=on_round, budget=req.budget, max_route_calls=req.max_route_calls,
                                       max_tokens=req.token_limit())
        except RouterFailed as exc:  # a 503/504 that still says what the request spent before it failed
            spent = self._routing(exc.result)
            if self.metrics is not None:
                record_chat(self.metrics, self.cfg.router.served_name, spent.model_dump())
            if exc.result.stopped == "deadline":
                raise EngineUnavailable(f"no answer within {self.cfg.router.request_timeout_s:g} s "
                                        "(llm.router.request_timeout_s)", None, 504,
                                        extra={"routing": spent.model_dump()}) from exc
            kind = "timed out" if isinstance(exc.cause, TimeoutError) else f"failed ({type(exc.cause).__name__})"
            raise EngineUnavailable(f"router engine {self.cfg.router.engine!r} {kind}",
                                    extra={"routing": spent.model_dump()}) from exc

    def _routing(self, result: RouterR1Result) -> RoutingInfo:
        led = result.ledger
        return RoutingInfo(
            router=self.cfg.router.served_name,
            rounds=[asdict(r) for r in result.rounds],
            route_calls=result.route_calls,
            calls=dict(led.calls),
            cost=led.cost,
            upstream_cost=led.upstream_cost,
            currency=led.currency,
            budget=result.budget,
            budget_left=result.budget_left,
            stopped=result.stopped,
            candidate_tokens={"prompt": led.prompt_tokens, "completion": led.completion_tokens},
            router_tokens={"prompt": led.router_prompt_tokens, "completion": led.router_completion_tokens},
            latency_s=result.latency_s,
        )

    def _router_response(self, req: ChatCompletionRequest, result: RouterR1Result) -> ChatCompletionResponse:
        led = result.ledger
        prompt_tokens = led.router_prompt_tokens + led.prompt_tokens
        completion_tokens = led.router_completion_tokens + led.completion_tokens
        return self._recorded(ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.cfg.router.served_name,
            choices=[Choice(message=ResponseMessage(content=result.answer or ""),
                            finish_reason="length" if result.stopped in LENGTH_STOPS else "stop")],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
            routing=self._routing(result),
        ))

    def _recorded(self, response: ChatCompletionResponse) -> ChatCompletionResponse:
        if self.metrics is not None:
            record_chat(self.metrics, response.model, response.routing.model_dump())
        return response

    async def _direct(self, req: ChatCompletionRequest, cand: CandidateConfig) -> ChatCompletionResponse:
        limit = min(req.token_limit() or cand.max_tokens, cand.max_tokens)
        temperature = cand.temperature if req.temperature is None else req.temperature
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        price = self._price(cand)
        if req.budget is not None:
            worst = price.cost(self._counter(cand.engine)(messages), limit)
            if worst > req.budget:
                raise RequestError(f"budget {req.budget} is below this call's worst-case cost {worst:.6f}", "budget", 422)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(cand.timeout_s):
                out = await self.engines[cand.engine].chat(messages, max_tokens=limit, temperature=temperature, seed=cand.seed)
        except Exception as exc:  # noqa: BLE001 - our message: the engine's type and status, never its body
            if self.metrics is not None:
                self.metrics.inc("routerserve_route_calls", candidate=cand.name, outcome="failed")
            if isinstance(exc, TimeoutError):
                raise EngineUnavailable(f"candidate {cand.name!r} timed out after {cand.timeout_s:g} s", status=504) from exc
            raise EngineUnavailable(f"candidate {cand.name!r} failed: {type(exc).__name__}: {exc}"[:300]) from exc
        cost = price.cost(out.prompt_tokens, out.completion_tokens)
        return self._recorded(ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=cand.name,
            choices=[Choice(message=ResponseMessage(content=out.text), finish_reason=out.finish_reason)],
            usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                        total_tokens=out.prompt_tokens + out.completion_tokens),
            routing=RoutingInfo(
                calls={cand.name: 1}, cost=cost, upstream_cost=price.upstream_cost(out.completion_tokens),
                currency=price.currency, budget=req.budget,
                budget_left=None if req.budget is None else max(0.0, req.budget - cost),
                candidate_tokens={"prompt": out.prompt_tokens, "completion": out.completion_tokens},
                latency_s=time.perf_counter() - t0,
            ),
        ))

    async def health(self) -> tuple[bool, dict]:
        """Healthy when the router's engine is; a candidate's engine being down is reported (its
        calls fail over to the fallback or reach the router as None) but does not fail the check."""
        status = {}
        for name, engine in self.engines.items():
            try:
                await engine.check_health()
                status[name] = "ok"
            except Exception as exc:  # noqa: BLE001
                status[name] = f"{type(exc).__name__}: {exc}"[:200]
        router = self.cfg.router.engine if self.cfg.router is not None else None
        ok = status.get(router, "ok") == "ok"
        return ok, {"llm_engines": status}


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, default=str) + "\n\n"


class LocalChatClient:
    """serve.app.chat.router.ChatClient over an in-process ChatService (tests, benchmarks)."""

    def __init__(self, service: ChatService):
        self.service = service
        self.model_names = [card.id for card in service.models().data]

    async def chat(self, req: ChatCompletionRequest) -> dict:
        return (await self.service.chat(req)).model_dump()

    def stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        return self.service.stream(req)

    async def models(self) -> dict:
        return self.service.models().model_dump()

    async def health(self) -> tuple[bool, dict]:
        return await self.service.health()
