"""The Router-R1 protocol (arXiv 2506.09033) as plain code: parsing, the multi-round loop, the ledger.

The released checkpoints were trained on this token stream, so the loop reproduces it:

* one user message (the router prompt holding the question) through the tokenizer's chat template
  with the generation prompt; the whole trajectory is then ONE assistant turn of raw continuation;
* each generation stops at ``</search>`` or ``</answer>`` (stop string kept), at most
  ``max_new_tokens`` tokens, greedy by default;
* the action is the first ``<(search|answer)>(.*?)</\\1>`` of that generation; a search is
  ``Model-Name:sub-query``, split on the FIRST colon (upstream keeps only the text between the
  first and the second colon, which cuts sub-queries such as "ratio 3:2"; we do not copy that bug);
* after a search the loop appends exactly ``"\\n\\n<information>" + reply.strip() +
  "</information>\\n\\n"``; a failed call or an unknown model gives the reply ``None``, rendered
  as the text "None" as upstream does; an invalid action (no tag, placeholder text, no colon, empty
  sub-query) appends nothing and the loop goes on;
* every generation is a turn, whatever its action: at most ``max_turns`` (4) generations that may
  route, then one final generation whose searches are not executed (5 generations at most); the
  answer is the LAST ``<answer>…</answer>`` of the generated part.

Beyond upstream: a hard per-request budget (a call whose worst-case cost would pass it is not
made; the router is told so inside ``<information>`` and its next generation is the last), a
fallback candidate for failed calls, a cap on executed calls below the turns (``max_route_calls``;
a request may lower it, 0: the router answers alone), a trace of every round, and bounds on the whole request: a generation cut by the token
cap inside an open ``<answer>`` ends the loop with that text (``stopped="answer_truncated"``), the
request's ``max_tokens`` caps the router's tokens over all its generations, and a deadline
(``LoopSettings.deadline_s``) cancels whatever is running and reports what was spent. The loop is engine-agnostic: it takes a ``generate``
coroutine for the router and a ``call`` coroutine per candidate (Serve handles in deployment,
plain engines in tests and the CLI).
"""

from __future__ import annotations

import asyncio
import re
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Literal, Mapping, Protocol, Sequence

SEARCH_STOP = "</search>"
ANSWER_STOP = "</answer>"
STOPS = (SEARCH_STOP, ANSWER_STOP)
ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# text a router copies from a prompt instead of filling it in (any case): an invalid action, not a
# call. Upstream's rule (a search containing "llm-name" or "your-query"), and a model name that is
# a prompt's placeholder (ours says "Model-Name:sub-question").
PLACEHOLDER_MARKS = ("llm-name", "your-query")
PLACEHOLDER_MODELS = {"model-name", "model name", "llm-name", "llm name", "model", "name", "..."}
# no tag pair in it: the answer is read from the router's own text, but a literal "<answer> and
# </answer>" here once became the answer ("and") of a router that did not answer
BUDGET_EXHAUSTED = "Budget exhausted: no further model calls can be made. Give your final answer now."
# what a candidate gets for a sub-query (str.format, {query}); a candidate may have its own
# (llm.candidates.*.instruction_file), e.g. the agent instruction upstream's candidates got
CANDIDATE_INSTRUCTION = (
    "{query}\n\nAnswer concisely, in a few words. If you cannot answer, say which other model should be asked."
)


# routerserve's own router prompt (the upstream text is not ours to copy): same tags, same rules.
# A deployment may load another template from a file (e.g. the text the released checkpoints were
# trained on). Two syntaxes (``PromptSyntax``): "template" — string.Template, placeholders
# $question and $candidates, braces literal (this one); "format" — Python str.format with
# {question} (and optionally {candidates}), braces doubled for literals: how upstream's
# data_process/prompt_pool.py defines its prompts, rendered as upstream does (format_map), so a
# checkpoint's own template gives it a byte-identical prompt.
DEFAULT_ROUTER_PROMPT = """You answer a question by consulting other language models, all inside this one reply.
Rules:
- Reason step by step inside <think> and </think> whenever you need to.
- To consult a model, write <search>Model-Name:sub-question</search> with one model name from the list below. Its reply comes back between <information> and </information>.
- You may consult models up to 4 times. Pick the model whose strengths fit the sub-question; prefer a cheaper model when it is good enough.
- When you know the answer, give it inside <answer> and </answer>, in a few words and without explanation.

Models you can consult:
$candidates

Question: $question"""

PromptSyntax = Literal["template", "format"]
PROMPT_FIELDS = ("question", "candidates")


def render_candidates(pool: Sequence[tuple[str, str, "Price"]]) -> str:
    lines = []
    for name, description, price in pool:
        lines.append(
            f"- {name}: {description.strip()} (price per 1M tokens: {price.prompt_per_1m:g} prompt, "
            f"{price.completion_per_1m:g} completion {price.currency})"
        )
    return "\n".join(lines)


def _format_fields(template: str) -> list[str]:
    """Every field a str.format template names, those nested in format specs too."""
    fields = []
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            fields.append(name)
        if spec and "{" in spec:
            fields += _format_fields(spec)
    return fields


def check_router_prompt(template: str, syntax: PromptSyntax = "template") -> None:
    """Raise ValueError (saying what is wrong and how to write it) unless ``template`` renders in
    ``syntax`` with a question placeholder and no other placeholder than the candidates."""
    if syntax == "format":
        try:
            fields = _format_fields(template)
        except ValueError as exc:
            raise ValueError(f"{exc} (str.format syntax: placeholders {{question}} and {{candidates}}; "
                             "write {{ and }} for literal braces)") from None
        unknown = sorted({f for f in fields if f not in PROMPT_FIELDS})
        if unknown or "question" not in fields:
            raise ValueError(f"str.format placeholders must be {{question}} (required) and {{candidates}}; found "
                             f"{sorted(set(fields))} (write {{{{ and }}}} for literal braces)")
        return
    parsed = string.Template(template)
    fields = parsed.get_identifiers()
    unknown = sorted(set(fields) - set(PROMPT_FIELDS))
    if unknown or not parsed.is_valid():
        raise ValueError(f"{'unknown placeholders ' + str(unknown) if unknown else 'a $ that starts no placeholder'}: "
                         "placeholders are $question and $candidates; write $$ for $")
    if "question" not in fields:
        raise ValueError("no $question placeholder (string.Template syntax; prompt_syntax: format takes {question})")


def read_router_prompt(path: str | Path, syntax: PromptSyntax = "template") -> str:
    """A router prompt file's text, checked (check_router_prompt)."""
    text = Path(path).read_text(encoding="utf-8")
    check_router_prompt(text, syntax)
    return text


def render_router_prompt(template: str, question: str, pool: Sequence[tuple[str, str, "Price"]],
                         syntax: PromptSyntax = "template") -> str:
    """The user message of the router: the template with the (normalised) question and the pool."""
    values = {"question": normalize_question(question), "candidates": render_candidates(pool)}
    if syntax == "format":
        return template.format_map(values)  # as upstream: str.format_map, nothing else touched
    try:
        return string.Template(template).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"router prompt template: {exc!r} (placeholders are $question and $candidates; write $$ for $)") from None


def router_action_regex(candidate_names: Sequence[str], may_route: bool = True, think: bool = False) -> str:
    """A regex for one router generation that starts an action (vLLM structured outputs), so a
    router always emits a parseable one: a search naming a configured candidate, or an answer;
    spaces around the name allowed. ``think=False`` (a small router): the action at once, no
    <think>, tag contents on one line — a 135M router otherwise rambles until its token limit
    (measured: 96-token thinks, answers cut at the cap). ``think=True``: the trained format — a
    <think>…</think> first, newlines inside every tag. Never applied to a continuation of a
    generation cut by its token cap (it may be inside any tag). No counted repeats: ``{0,200}``-
    style bounds made xgrammar's compilation time out (vLLM gives up after 5 s) on a busy 2-core
    host, while these compile in milliseconds; the generation's token limit bounds the length."""
    text = r"[^<]" if think else r"[^<\n]"
    prefix = rf"\s*(<think>{text}*</think>\s*)?" if think else ""
    answer = rf"<answer>{text}+</answer>"
    if not may_route or not candidate_names:
        return prefix + answer
    names = "|".join(re.escape(n) for n in candidate_names)
    return prefix + rf"(<search>[ \t]*({names})[ \t]*:{text}+</search>|{answer})"


def information_block(reply: str | None) -> str:
    """What the loop appends after a search: the reply, or "None" for a failed call."""
    return "\n\n<information>" + str(reply).strip() + "</information>\n\n"


class RouterTokens(Protocol):
    """The router model's tokens, for the observation cut and the context window."""

    def count(self, text: str) -> int: ...

    def head(self, text: str, n: int) -> str:
        """The first ``n`` tokens of ``text``, as text."""
        ...


class WordTokens:
    """Whitespace-separated words as tokens (the scripted engines' unit; tests)."""

    def count(self, text: str) -> int:
        return len(text.split())

    def head(self, text: str, n: int) -> str:
        """``text`` up to the end of its n-th word."""
        m = re.match(r"(\s*\S+){%d}" % n, text) if n > 0 else None
        return m.group(0) if m else (text if n > 0 else "")


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """``text`` up to and including the earliest stop string, and which one it was."""
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return text, None
    return text[: best[0] + len(best[1])], best[1]


def normalize_question(question: str) -> str:
    """Upstream's question preprocessing: strip, and end with a question mark."""
    q = question.strip()
    return q if q.endswith("?") else q + "?"


@dataclass
class Action:
    kind: Literal["search", "answer", "invalid"]
    content: str = ""
    model: str | None = None  # search: the name as the router wrote it
    query: str | None = None  # search: the sub-query (everything after the first colon)
    reason: str | None = None  # invalid: why


def parse_action(text: str) -> Action:
    """The first search/answer tag of one generation (Router-R1's rule), validated."""
    m = ACTION_RE.search(text)
    if m is None:
        return Action("invalid", reason="no <search> or <answer> tag")
    kind, content = m.group(1), m.group(2).strip()
    if kind == "answer":
        return Action("answer", content)
    if not content or content == "..." or any(mark in content.lower() for mark in PLACEHOLDER_MARKS):
        return Action("invalid", content, reason="placeholder or empty search")
    if ":" not in content:
        return Action("invalid", content, reason="search without 'Model-Name:' prefix")
    model, query = (part.strip() for part in content.split(":", 1))
    if model.lower() in PLACEHOLDER_MODELS:
        return Action("invalid", content, model=model, reason="placeholder model name")
    if not model:
        return Action("invalid", content, reason="empty model name")
    if not query:
        return Action("invalid", content, model=model, reason="empty sub-query")
    return Action("search", content, model=model, query=query)


NameRule = tuple[tuple[str, ...], "str | None"]
"""(substrings, target): a written name that contains every substring (lowercase) goes to target
(a candidate's name or alias), or to no candidate when target is None."""

# Upstream's route_service.py resolves the names its checkpoints write with ordered substring
# rules onto these model ids (first match wins; a "llama" name matching none of its sizes is no
# model). As a preset, a rule reaches the candidate that has the target id as its name or alias;
# a target that no candidate has is an unknown model, as upstream's "LLM Name Error".
UPSTREAM_NAME_RULES: tuple[NameRule, ...] = (
    (("qwen",), "qwen/qwen2.5-7b-instruct"),
    (("palmyra",), "writer/palmyra-creative-122b"),
    (("creative",), "writer/palmyra-creative-122b"),
    (("llama", "70b"), "meta/llama-3.1-70b-instruct"),
    (("llama", "51b"), "nvidia/llama-3.1-nemotron-51b-instruct"),
    (("llama", "49b"), "nvidia/llama-3.3-nemotron-super-49b-v1"),
    (("llama", "8b", "chatqa"), "nvidia/llama3-chatqa-1.5-8b"),
    (("llama", "8b"), "meta/llama-3.1-8b-instruct"),
    (("llama",), None),
    (("mistral",), "mistralai/mistral-7b-instruct-v0.3"),
    (("mixtral",), "mistralai/mixtral-8x22b-instruct-v0.1"),
    (("granite",), "ibm/granite-3.0-8b-instruct"),
    (("gemma",), "google/gemma-2-27b-it"),
)


class NameResolver:
    """The configured candidate a written model name reaches: its name or one of its aliases
    (case-insensitive, surrounding space ignored) first, then the ordered substring ``rules``
    (first match wins); None: an unknown model."""

    def __init__(self, names: Mapping[str, Sequence[str]], rules: Sequence[NameRule] = ()):
        """``names``: candidate name → its aliases."""
        self._exact = {}
        for name, aliases in names.items():
            for written in (name, *aliases):
                self._exact.setdefault(written.strip().lower(), name)
        self._rules = [(tuple(part.lower() for part in parts), target) for parts, target in rules]

    def __call__(self, written: str) -> str | None:
        low = written.strip().lower()
        if low in self._exact:
            return self._exact[low]
        for parts, target in self._rules:
            if all(part in low for part in parts):
                return None if target is None else self._exact.get(target.strip().lower())
        return None


def truncated_answer(text: str, finish_reason: str) -> str | None:
    """The text after an ``<answer>`` that a generation opened and never closed because it hit
    its token cap; None otherwise (a closed answer, or a generation that stopped on its own)."""
    if finish_reason != "length" or "<answer>" not in text or ACTION_RE.search(text):
        return None
    return text.rsplit("<answer>", 1)[1].strip()


def extract_answer(generated: str) -> str | None:
    """The LAST <answer>…</answer> of ``generated`` (the router's own text: never the prompt,
    never an observation, where a candidate's reply could plant one), stripped."""
    found = ANSWER_RE.findall(generated)
    return found[-1].strip() if found else None


# --- engines' results and the ledger ----------------------------------------------------------


@dataclass
class Completion:
    """One engine call's result: text (stop string included when it stopped on one) and usage."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"  # "stop" (EOS or a stop string) | "length"
    stop: str | None = None  # the stop string that ended it, if any


@dataclass(frozen=True)
class Price:
    """Price per 1M tokens."""

    prompt_per_1m: float
    completion_per_1m: float
    currency: str = "USD"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_1m + completion_tokens * self.completion_per_1m) / 1e6

    def upstream_cost(self, completion_tokens: int) -> float:
        """Upstream Router-R1's own figure, in its own unit: completion tokens × price per 1M
        tokens, NOT divided by 1e6 and without the prompt (route_service.py; its reward's input).
        Not money: ``cost`` is the bill."""
        return completion_tokens * self.completion_per_1m


def approx_tokens(text: str) -> int:
    """A token count without a tokenizer (≈3 characters per token): an estimate, used where an
    engine reports no usage. Never used to bound a cost: see ``conservative_prompt_tokens``."""
    return max(1, len(text) // 3)


TEMPLATE_OVERHEAD_TOKENS = 64  # a chat template's special tokens and role headers, per prompt
MESSAGE_OVERHEAD_TOKENS = 8  # … and per message


def conservative_prompt_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """An upper bound on a chat prompt's tokens when the engine's tokenizer is not at hand: text
    never tokenises into more tokens than its UTF-8 bytes (byte-level BPE — GPT-2, Llama 3, Qwen —
    and SentencePiece with byte fallback), plus the template's overhead. A template with a long
    built-in system prompt is the case it can miss: give such an engine a local ``tokenizer``,
    whose exact count is used instead."""
    return TEMPLATE_OVERHEAD_TOKENS + sum(MESSAGE_OVERHEAD_TOKENS + len(m["content"].encode("utf-8")) for m in messages)


def check_candidate_instruction(template: str) -> None:
    """Raise ValueError unless ``template`` is a str.format template whose only placeholder is {query}."""
    try:
        fields = set(_format_fields(template))
    except ValueError as exc:
        raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    if fields != {"query"}:
        raise ValueError(f"the only placeholder must be {{query}}; found {sorted(fields)} (write {{{{ and }}}} for braces)")


def read_candidate_instruction(path: str | Path) -> str:
    """A candidate instruction file's text, checked (check_candidate_instruction)."""
    text = Path(path).read_text(encoding="utf-8")
    check_candidate_instruction(text)
    return text


def candidate_messages(query: str, instruction: str = CANDIDATE_INSTRUCTION) -> list[dict[str, str]]:
    """The one user message a candidate gets for a sub-query (no system message, as upstream)."""
    return [{"role": "user", "content": instruction.format_map({"query": query})}]


@dataclass
class Candidate:
    """A routable model as the loop sees it: its price, its call (``candidate_messages(query,
    instruction)`` with at most ``max_tokens`` completion tokens), its deadline, and an upper bound on a call's
    prompt tokens, so that a call's worst-case cost is known before it is made."""

    name: str
    price: Price
    call: Callable[[str], Awaitable[Completion]]  # sub-query → completion (the call wraps it)
    max_tokens: int = 512
    count_prompt: Callable[[list[dict[str, str]]], int] = conservative_prompt_tokens
    timeout_s: float | None = None  # None: LoopSettings.call_timeout_s
    instruction: str = CANDIDATE_INSTRUCTION  # what ``call`` wraps the sub-query in (candidate_messages)

    def worst_case(self, query: str) -> Completion:
        """The most this call can be billed for: its whole prompt and ``max_tokens`` completion tokens."""
        return Completion("", self.count_prompt(candidate_messages(query, self.instruction)), self.max_tokens, "length")

    def worst_case_cost(self, query: str) -> float:
        w = self.worst_case(query)
        return self.price.cost(w.prompt_tokens, w.completion_tokens)


@dataclass
class Round:
    """One generation of the router and what the controller did with it."""

    index: int
    router_text: str
    router_prompt_tokens: int
    router_completion_tokens: int
    router_latency_s: float
    action: str  # search | answer | invalid | none
    finish_reason: str = "stop"  # the router generation's: stop | length
    candidate: str | None = None  # resolved configured name (or the name as written if unknown)
    sub_query: str | None = None
    reply: str | None = None
    status: str | None = None  # ok | fallback | failed | unknown_model | over_budget | not_executed | cancelled
    prompt_tokens: int = 0  # candidate call
    completion_tokens: int = 0
    cost: float = 0.0  # the bill: (prompt + completion tokens) × price / 1M
    upstream_cost: float = 0.0  # Router-R1's figure: completion tokens × price per 1M, unnormalised (not money)
    latency_s: float = 0.0
    controller_s: float = 0.0  # time spent in the controller itself (parsing, bookkeeping)
    observation_cut: bool = False  # the <information> block was cut to max_observation_tokens
    error: str | None = None


@dataclass
class Ledger:
    currency: str = "USD"
    calls: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # the bill, in ``currency``
    upstream_cost: float = 0.0  # Router-R1's figure (Price.upstream_cost): a reward unit, not money
    router_prompt_tokens: int = 0  # the router's own tokens, never in cost
    router_completion_tokens: int = 0

    def charge(self, candidate: str, price: Price, completion: Completion, answered: bool = True) -> tuple[float, float]:
        """Bill one call. ``answered=False``: a call that timed out or was cancelled, charged at its
        worst case; upstream's figure counts nothing for a call that did not answer."""
        full = price.cost(completion.prompt_tokens, completion.completion_tokens)
        upstream = price.upstream_cost(completion.completion_tokens) if answered else 0.0
        self.calls[candidate] = self.calls.get(candidate, 0) + 1
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        self.cost += full
        self.upstream_cost += upstream
        return full, upstream


@dataclass
class RouterR1Result:
    answer: str | None
    generated: str  # the assistant turn: router text plus the inserted <information> blocks
    prompt: str  # the templated prompt the turn continues
    rounds: list[Round]
    ledger: Ledger
    budget: float | None
    route_calls: int
    stopped: str  # answer | answer_truncated | no_answer | budget | max_tokens | context; in RouterFailed.result: router_failed | deadline
    latency_s: float

    @property
    def budget_left(self) -> float | None:
        return None if self.budget is None else max(0.0, self.budget - self.ledger.cost)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budget_left"] = self.budget_left
        return d


class RouterFailed(Exception):
    """The router's own generation failed; ``result`` holds what the request had already spent."""

    def __init__(self, cause: Exception, result: RouterR1Result):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
        self.result = result


@dataclass
class LoopSettings:
    max_turns: int = 4  # generations that may route (each counts, invalid ones too); then one final one
    max_route_calls: int = 4  # executed calls; reaching it makes the next generation the final one
    max_new_tokens: int = 1024
    temperature: float = 0.0
    budget: float | None = None  # per request, in the candidates' currency (full cost)
    fallback: str | None = None  # candidate tried once when a call fails
    call_timeout_s: float = 60.0
    deadline_s: float | None = None  # the whole loop of one request; past it RouterFailed(TimeoutError)
    max_observation_tokens: int | None = 600  # each <information> block cut to its first N router tokens (upstream)
    context_window: int | None = None  # the router's window (prompt + trace + the generation); None: unchecked
    min_generation_tokens: int = 16  # fewer left in the window: stop ("context") instead of overflowing it


def _router_text(rounds: Sequence["Round"]) -> str:
    """What the router itself wrote, without the inserted observations."""
    return "".join(r.router_text for r in rounds)


async def _report(on_round: "RoundEvent | None", rnd: Round) -> None:
    if on_round is not None:
        maybe = on_round(rnd)
        if asyncio.iscoroutine(maybe):
            await maybe


RouterGenerate = Callable[..., Awaitable[Completion]]
"""(prompt so far, stop strings, max new tokens, temperature, may_route, *, continuation) →
completion. ``may_route=False`` on the last generation: an engine with structured outputs may then
restrict the router to an answer. ``continuation=True`` when the previous generation was cut by its
token cap, so this one continues it (possibly inside a tag): it must not be constrained."""

RoundEvent = Callable[[Round], Awaitable[None] | None]


class RouterR1Loop:
    """Runs the Router-R1 loop for one question at a time (one instance serves many concurrent
    requests: it holds no per-request state)."""

    def __init__(
        self,
        generate: RouterGenerate,
        candidates: Mapping[str, Candidate],
        settings: LoopSettings | None = None,
        resolve: Callable[[str], str | None] | None = None,
        tokens: RouterTokens | None = None,
    ) -> None:
        """``resolve``: written model name → candidate name or None (default: the names,
        case-insensitive; a NameResolver adds aliases and substring rules). ``tokens``: the
        router's tokenizer, for the observation cut and the context window (None: neither)."""
        self.tokens = tokens
        self.generate = generate
        self.candidates = dict(candidates)
        self.settings = settings or LoopSettings()
        self.resolve = resolve or NameResolver({name: () for name in self.candidates})
        if self.settings.fallback is not None and self.settings.fallback not in self.candidates:
            raise ValueError(f"fallback candidate {self.settings.fallback!r} is not in the pool {sorted(self.candidates)}")

    async def _call(self, cand: Candidate, query: str) -> Completion:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that arrives
        # as the call completes, and a cancelled request (client gone) would go on making paid calls
        async with asyncio.timeout(self._timeout(cand)):
            return await cand.call(query)

    def _timeout(self, cand: Candidate) -> float:
        return cand.timeout_s or self.settings.call_timeout_s

    async def run(
        self, prompt: str, on_round: RoundEvent | None = None, budget: float | None = None,
        max_route_calls: int | None = None, max_tokens: int | None = None,
    ) -> RouterR1Result:
        """``prompt``: the templated router prompt (chat template applied, generation prompt added).
        ``budget`` / ``max_route_calls`` / ``max_tokens``: this request's own limits (the call cap
        can only lower the configured one; ``max_tokens`` caps the router's completion tokens over
        all its generations). Raises ``RouterFailed`` (with what was spent) when the router's
        generation fails or the loop passes ``settings.deadline_s``."""
        s = self.settings
        state = RouterR1Result(
            None, "", prompt, [], Ledger(currency=next(iter(self.candidates.values())).price.currency if self.candidates else "USD"),
            s.budget if budget is None else budget, 0, "no_answer", 0.0,
        )
        call_cap = s.max_route_calls if max_route_calls is None else min(max_route_calls, s.max_route_calls)
        t_start = time.perf_counter()
        deadline = asyncio.timeout(s.deadline_s)
        try:
            async with deadline:
                await self._rounds(state, on_round, call_cap, max_tokens)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            state.stopped, state.latency_s = "deadline", time.perf_counter() - t_start
            raise RouterFailed(TimeoutError(f"the loop passed its deadline of {s.deadline_s:g} s"), state) from exc
        except RouterFailed as exc:
            exc.result.latency_s = time.perf_counter() - t_start
            raise
        state.latency_s = time.perf_counter() - t_start
        return state

    async def _rounds(self, state: RouterR1Result, on_round: RoundEvent | None, call_cap: int,
                      max_tokens: int | None) -> None:
        """The generations of one request; fills ``state`` as it goes (so a deadline or a router
        failure still reports every round and every charge made so far)."""
        s = self.settings
        prompt, rounds, ledger, budget = state.prompt, state.rounds, state.ledger, state.budget
        may_route, continuation = True, False
        for index in range(s.max_turns + 1):
            # the final generation may not route: after max_turns turns, after max_route_calls calls,
            # after a budget refusal (so a constrained router ends with an answer)
            last = not may_route or state.route_calls >= call_cap or index == s.max_turns
            room = s.max_new_tokens
            if max_tokens is not None:
                room = min(room, max_tokens - ledger.router_completion_tokens)
                if room <= 0:
                    state.stopped = "max_tokens"
                    return
            if self.tokens is not None and s.context_window is not None:
                # the generation fits the window, or the request ends here with what it has:
                # never a prompt the engine would refuse
                room = min(room, s.context_window - self.tokens.count(prompt + state.generated))
                if room < s.min_generation_tokens:
                    state.answer, state.stopped = extract_answer(_router_text(rounds)), "context"
                    return
            t0 = time.perf_counter()
            try:
                out = await self.generate(prompt + state.generated, STOPS, room, s.temperature, not last,
                                          continuation=continuation)
            except Exception as exc:  # noqa: BLE001 - re-raised with what was already spent
                state.stopped = "router_failed"
                raise RouterFailed(exc, state) from exc
            t1 = time.perf_counter()
            text, _ = cut_at_stop(out.text, STOPS)  # an engine that ran past its stop string is cut back
            state.generated += text
            ledger.router_prompt_tokens += out.prompt_tokens
            ledger.router_completion_tokens += out.completion_tokens
            continuation = out.finish_reason == "length"
            action = parse_action(text)
            rnd = Round(index, text, out.prompt_tokens, out.completion_tokens, t1 - t0, action.kind, out.finish_reason)
            rounds.append(rnd)
            cut = truncated_answer(text, out.finish_reason)
            if cut is not None:  # the answer ran into the token cap: end here with what it wrote
                rnd.action, rnd.error = "answer", "answer cut at the token cap"
                state.answer, state.stopped = cut, "answer_truncated"
                await _report(on_round, rnd)
                return
            if action.kind == "answer":
                pass
            elif action.kind == "invalid":
                rnd.error = action.reason
            elif last:
                rnd.candidate, rnd.sub_query, rnd.status = action.model, action.query, "not_executed"
            else:
                t_call = await self._route(action, rnd, ledger, budget)
                if rnd.status != "over_budget":
                    state.route_calls += 1
                else:
                    may_route = False
                state.generated += self._observation(BUDGET_EXHAUSTED if rnd.status == "over_budget" else rnd.reply, rnd)
                rnd.controller_s = (time.perf_counter() - t1) - t_call
            if rnd.controller_s == 0.0:
                rnd.controller_s = time.perf_counter() - t1
            await _report(on_round, rnd)
            if action.kind == "answer" or last:
                break
        state.answer = extract_answer(_router_text(rounds))
        if state.answer is not None:
            state.stopped = "answer"
        elif not may_route:
            state.stopped = "budget"

    def _observation(self, reply: str | None, rnd: Round) -> str:
        """The <information> block, cut to its first max_observation_tokens router tokens as
        upstream's training loop cut it (the whole block: a long one loses its closing tag)."""
        block, n = information_block(reply), self.settings.max_observation_tokens
        if self.tokens is not None and n is not None and self.tokens.count(block) > n:
            block, rnd.observation_cut = self.tokens.head(block, n), True
        return block

    async def _route(self, action: Action, rnd: Round, ledger: Ledger, budget: float | None) -> float:
        """Make (or refuse) one route call; fills ``rnd``; returns seconds spent waiting on calls."""
        name = self.resolve(action.model or "")
        rnd.candidate, rnd.sub_query = name or action.model, action.query
        if name is None:
            rnd.status, rnd.reply, rnd.error = "unknown_model", None, f"unknown model {action.model!r}"
            return 0.0
        cand = self.candidates[name]
        if budget is not None and ledger.cost + cand.worst_case_cost(action.query) > budget:
            rnd.status = "over_budget"
            rnd.error = f"a call to {name} could cost up to {cand.worst_case_cost(action.query):.6f}, over the budget left"
            return 0.0
        waited = 0.0
        fallback = self.settings.fallback
        tried = [name] + ([fallback] if fallback is not None and fallback != name else [])
        for attempt, which in enumerate(tried):
            c = self.candidates[which]
            if attempt and budget is not None and ledger.cost + c.worst_case_cost(action.query) > budget:
                break
            t0 = time.perf_counter()
            try:
                completion = await self._call(c, action.query)
            except asyncio.CancelledError:  # the request's deadline or its client gone, mid-call:
                full, _ = ledger.charge(which, c.price, c.worst_case(action.query), answered=False)  # it may still be billed
                rnd.cost, rnd.status, rnd.latency_s = rnd.cost + full, "cancelled", waited + time.perf_counter() - t0
                rnd.error = f"{which}: cancelled mid-call (charged {full:.6f})"
                raise
            except TimeoutError:  # it may have run (and been billed) to the end: charged at its worst case
                waited += time.perf_counter() - t0
                full, _ = ledger.charge(which, c.price, c.worst_case(action.query), answered=False)
                rnd.cost += full
                rnd.error = f"{which}: timed out after {self._timeout(c):g} s (charged {full:.6f})"
                continue
            except Exception as exc:  # noqa: BLE001 - a failed call is data for the router
                waited += time.perf_counter() - t0
                rnd.error = f"{which}: {type(exc).__name__}: {exc}"[:500]
                continue
            waited += time.perf_counter() - t0
            full, upstream = ledger.charge(which, c.price, completion)
            rnd.reply = completion.text
            rnd.status = "ok" if attempt == 0 else "fallback"
            rnd.candidate = which if attempt else name
            rnd.prompt_tokens, rnd.completion_tokens = completion.prompt_tokens, completion.completion_tokens
            rnd.cost, rnd.upstream_cost = rnd.cost + full, rnd.upstream_cost + upstream
            rnd.latency_s = waited
            return waited
        rnd.status, rnd.reply, rnd.latency_s = "failed", None, waited
        return waited
