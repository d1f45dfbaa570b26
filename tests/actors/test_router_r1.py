"""Router-R1 protocol conformance: insertion format, stops, limits, extraction, invalid actions,
unknown models, failed calls, fallback, budget, ledger, concurrency — against scripted engines."""

import asyncio

import pytest

from actors.llm_engines import ScriptedEngine
from actors.router_r1 import BUDGET_EXHAUSTED, CANDIDATE_INSTRUCTION, DEFAULT_ROUTER_PROMPT, STOPS
from actors.router_r1 import Candidate, Completion, LoopSettings, Price, RouterFailed, RouterR1Loop
from actors.router_r1 import extract_answer, information_block, parse_action, render_router_prompt, router_action_regex

PROMPT = "<|user|>\nQuestion: q?\n<|assistant|>\n"


def router(script, **kw):
    """A scripted router: ``generate`` over a ScriptedEngine, recording what it was asked."""
    engine = ScriptedEngine(script, **kw)
    asked = []

    async def generate(prompt, stop, max_new_tokens, temperature, may_route, continuation=False):
        asked.append({"prompt": prompt, "stop": tuple(stop), "max": max_new_tokens, "temp": temperature, "may_route": may_route,
                      "continuation": continuation})
        return await engine.complete(prompt, max_tokens=max_new_tokens, temperature=temperature, stop=stop)

    return generate, asked


def candidate(name, reply="reply", latency=0.0, price=(1.0, 2.0), fail=None, max_tokens=512):
    engine = ScriptedEngine(lambda q: reply if not callable(reply) else reply(q), latency_s=latency, model_id=name, fail_with=fail)

    async def call(query):
        return await engine.chat([{"role": "user", "content": query}], max_tokens=max_tokens)

    return Candidate(name, Price(*price), call, max_tokens=max_tokens), engine


def run(loop, prompt=PROMPT, **kw):
    return asyncio.run(loop.run(prompt, **kw))


def test_search_reply_is_inserted_exactly_and_the_turn_continues():
    gen, asked = router(["<think>who?</think>\n<search>Alpha:capital of France</search> junk", "<answer>Paris</answer>"])
    alpha, engine = candidate("Alpha", reply="  Paris is the capital.  ")
    result = run(RouterR1Loop(gen, {"Alpha": alpha}))
    assert result.answer == "Paris" and result.stopped == "answer" and result.route_calls == 1
    first = "<think>who?</think>\n<search>Alpha:capital of France</search>"
    assert result.generated == first + "\n\n<information>Paris is the capital.</information>\n\n<answer>Paris</answer>"
    assert information_block("  x ") == "\n\n<information>x</information>\n\n"
    # one assistant turn of raw continuation: the second generation continues prompt + turn so far
    assert asked[1]["prompt"] == PROMPT + first + "\n\n<information>Paris is the capital.</information>\n\n"
    assert all(a["stop"] == STOPS and a["max"] == 1024 and a["temp"] == 0.0 for a in asked)
    assert engine.calls == ["capital of France"]


def test_generation_is_cut_at_the_first_stop_string_and_keeps_it():
    async def gen(prompt, stop, n, t, may_route, continuation=False):  # an engine that ran past its stop string
        return Completion("<answer>A</answer> trailing <answer>B</answer>", 5, 9)

    result = run(RouterR1Loop(gen, {}))
    assert result.generated == "<answer>A</answer>" and result.answer == "A"


def test_at_most_four_route_calls_then_one_last_generation_that_cannot_route():
    gen, asked = router(lambda p: "<search>Alpha:again</search>")
    alpha, engine = candidate("Alpha")
    result = run(RouterR1Loop(gen, {"Alpha": alpha}))
    assert len(engine.calls) == 4 and result.route_calls == 4
    assert len(result.rounds) == 5 and result.rounds[-1].status == "not_executed"
    assert [a["may_route"] for a in asked] == [True] * 4 + [False]
    assert result.answer is None and result.stopped == "no_answer"
    assert result.generated.count("<information>") == 4


def test_answer_is_the_last_answer_of_the_generated_part_only():
    prompt = PROMPT.replace("q?", "format: <answer>example</answer>")
    gen, _ = router(["<search>Alpha:x</search>", "<answer> final </answer>"])
    alpha, _ = candidate("Alpha", reply="<answer>from the candidate</answer>")
    result = run(RouterR1Loop(gen, {"Alpha": alpha}), prompt=prompt)
    assert result.answer == "final"
    gen, _ = router(["<answer>first</answer>"])
    assert run(RouterR1Loop(gen, {}), prompt=prompt).answer == "first"  # never the prompt's example
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>a</answer> x <answer>b\nc</answer>") == "b\nc"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("I think the answer is Paris.", "no <search>"),
        ("<search>Model-Name:sub-query</search>", "placeholder"),
        ("<search>LLM-Name:Your-Query</search>", "placeholder"),  # upstream's placeholder, any case
        ("<search>llm-name:who wrote Hamlet?</search>", "placeholder"),
        ("<search>Alpha:YOUR-QUERY</search>", "placeholder"),
        ("<search> model name : who?</search>", "placeholder model name"),
        ("<search>no colon here</search>", "without 'Model-Name:'"),
        ("<search>Alpha:   </search>", "empty sub-query"),
        ("<search>:question</search>", "empty model name"),
    ],
)
def test_invalid_actions_append_nothing_and_the_loop_goes_on(text, reason):
    gen, asked = router([text, "<answer>ok</answer>"])
    alpha, engine = candidate("Alpha")
    result = run(RouterR1Loop(gen, {"Alpha": alpha}))
    assert result.rounds[0].action == "invalid" and reason in result.rounds[0].error
    assert engine.calls == [] and result.route_calls == 0
    assert asked[1]["prompt"] == PROMPT + result.rounds[0].router_text  # nothing inserted
    assert result.answer == "ok"


def test_parse_action_takes_the_first_tag_and_splits_on_the_first_colon():
    a = parse_action("<search>gpt-X: ratio 3:2 in degrees?</search><answer>no</answer>")
    assert (a.kind, a.model, a.query) == ("search", "gpt-X", "ratio 3:2 in degrees?")
    assert parse_action("<answer>\n 42 \n</answer>").content == "42"


def test_a_real_query_mentioning_sub_queries_is_a_call():
    a = parse_action("<search>Alpha:what is a sub-query in SQL?</search>")
    assert (a.kind, a.model, a.query) == ("search", "Alpha", "what is a sub-query in SQL?")


def test_names_resolve_by_name_alias_then_ordered_substring_rules():
    from actors.router_r1 import UPSTREAM_NAME_RULES, NameResolver

    resolve = NameResolver({"Qwen2.5-7B-Instruct": ["qwen/qwen2.5-7b-instruct"],
                            "LLaMA-3.1-70B-Instruct": ["meta/llama-3.1-70b-instruct", "big-llama"],
                            "Llama-3.1-8B": ["meta/llama-3.1-8b-instruct"]}, UPSTREAM_NAME_RULES)
    assert resolve(" big-LLAMA ") == "LLaMA-3.1-70B-Instruct"  # an alias, any case
    assert resolve("Qwen2.5-7B") == "Qwen2.5-7B-Instruct"  # rule: qwen
    assert resolve("LLaMA-3.1-70B") == "LLaMA-3.1-70B-Instruct"  # rule: llama + 70b
    assert resolve("LLaMA-3.1-8B-Instruct") == "Llama-3.1-8B"  # rule: llama + 8b
    assert resolve("Llama3-ChatQA-1.5-8B") is None  # its rule comes first; its target is not in the pool
    assert resolve("LLaMA-2-13B") is None  # a llama of no listed size: no model, never another rule
    assert resolve("Mistral-7B-Instruct") is None and resolve("GPT-4o") is None
    own = NameResolver({"Alpha": []}, [(("gpt",), "Alpha"), (("gpt", "mini"), None)])
    assert own("GPT-4o-mini") == "Alpha"  # first match wins


def test_an_aliased_name_reaches_its_candidate_and_an_unmatched_one_stays_unknown():
    from actors.router_r1 import NameResolver

    gen, asked = router(["<search>LLaMA-3.1-70B:q1</search>", "<search>Gemma-2-27B:q2</search>", "<answer>x</answer>"])
    big, engine = candidate("Big", reply="r1")
    resolve = NameResolver({"Big": ["meta/llama-3.1-70b-instruct"]}, [(("llama", "70b"), "meta/llama-3.1-70b-instruct")])
    result = run(RouterR1Loop(gen, {"Big": big}, resolve=resolve))
    assert result.rounds[0].candidate == "Big" and result.rounds[0].status == "ok" and engine.calls == ["q1"]
    assert result.rounds[1].status == "unknown_model" and "Gemma-2-27B" in result.rounds[1].error
    assert "<information>r1</information>" in asked[1]["prompt"] and "<information>None</information>" in asked[2]["prompt"]


def test_unknown_model_gets_none_and_names_match_case_insensitively():
    gen, asked = router(["<search>nobody:q1</search>", "<search>ALPHA:q2</search>", "<answer>x</answer>"])
    alpha, engine = candidate("Alpha", reply="r2")
    result = run(RouterR1Loop(gen, {"Alpha": alpha}))
    assert result.rounds[0].status == "unknown_model" and "nobody" in result.rounds[0].error
    assert "<information>None</information>" in asked[1]["prompt"]
    assert result.rounds[1].candidate == "Alpha" and result.rounds[1].status == "ok" and engine.calls == ["q2"]
    assert result.ledger.calls == {"Alpha": 1}


def test_failed_call_gives_none_and_the_fallback_is_tried():
    gen, asked = router(["<search>Broken:q</search>", "<answer>x</answer>"])
    broken, _ = candidate("Broken", fail=RuntimeError("engine down"))
    result = run(RouterR1Loop(gen, {"Broken": broken}))
    assert result.rounds[0].status == "failed" and "engine down" in result.rounds[0].error
    assert "<information>None</information>" in asked[1]["prompt"] and result.ledger.cost == 0.0

    gen, asked = router(["<search>Broken:q</search>", "<answer>x</answer>"])
    backup, engine = candidate("Backup", reply="from backup")
    result = run(RouterR1Loop(gen, {"Broken": broken, "Backup": backup}, LoopSettings(fallback="Backup")))
    assert result.rounds[0].status == "fallback" and result.rounds[0].candidate == "Backup"
    assert "<information>from backup</information>" in asked[1]["prompt"] and result.ledger.calls == {"Backup": 1}
    with pytest.raises(ValueError, match="fallback"):
        RouterR1Loop(gen, {"Broken": broken}, LoopSettings(fallback="Ghost"))


def test_a_call_past_its_timeout_fails_is_cancelled_and_is_charged_at_its_worst_case():
    gen, asked = router(["<search>Stuck:q</search>", "<answer>x</answer>"])
    events = []

    async def stuck(query):  # never answers
        events.append("called")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    cand = Candidate("Stuck", Price(1.0, 2.0), stuck, timeout_s=0.05)  # its own deadline, not the loop's
    result = run(RouterR1Loop(gen, {"Stuck": cand}, LoopSettings(call_timeout_s=3600)))
    assert events == ["called", "cancelled"]  # the loop gave up on the call and did not leave it running
    assert result.rounds[0].status == "failed" and "timed out after 0.05 s" in result.rounds[0].error
    # it may have run to the end upstream: the ledger holds its worst case, so budgets stay safe
    assert result.ledger.cost == pytest.approx(cand.worst_case_cost("q")) == pytest.approx(result.rounds[0].cost)
    assert result.ledger.upstream_cost == 0 == result.rounds[0].upstream_cost  # upstream counts no unanswered call
    assert "<information>None</information>" in asked[1]["prompt"] and result.answer == "x"


def test_ledger_counts_prompt_and_completion_tokens_and_both_costs():
    gen, _ = router(["<search>Alpha:one two three</search>", "<search>Beta:four</search>", "<answer>x</answer>"])
    alpha, _ = candidate("Alpha", reply="a b c d", price=(1_000_000.0, 2_000_000.0))  # 1 and 2 per token
    beta, _ = candidate("Beta", reply="e", price=(0.0, 10_000_000.0))
    result = run(RouterR1Loop(gen, {"Alpha": alpha, "Beta": beta}))
    ledger = result.ledger
    # scripted token counts: prompt = words of the sub-query, completion = words of the reply
    assert (ledger.prompt_tokens, ledger.completion_tokens) == (3 + 1, 4 + 1)
    assert ledger.cost == pytest.approx(3 * 1 + 4 * 2 + 1 * 10)
    # Router-R1's own figure: completion tokens × price per 1M, not divided by 1e6, prompt ignored
    assert ledger.upstream_cost == pytest.approx(4 * 2_000_000 + 1 * 10_000_000)
    assert [r.cost for r in result.rounds[:2]] == pytest.approx([11.0, 10.0])
    assert [r.upstream_cost for r in result.rounds[:2]] == pytest.approx([8_000_000, 10_000_000])
    assert ledger.router_completion_tokens == sum(r.router_completion_tokens for r in result.rounds)


def test_budget_refuses_a_call_that_could_exceed_it_and_tells_the_router():
    gen, asked = router(["<search>Pricey:q</search>", "<answer>guess</answer>"])
    pricey, engine = candidate("Pricey", price=(0.0, 1000.0), max_tokens=100)  # worst case 0.1 per call
    result = run(RouterR1Loop(gen, {"Pricey": pricey}, LoopSettings(budget=0.05)))
    assert engine.calls == [] and result.rounds[0].status == "over_budget"
    assert information_block(BUDGET_EXHAUSTED) in asked[1]["prompt"]
    assert asked[1]["may_route"] is False and result.answer == "guess" and result.ledger.cost == 0.0
    assert result.budget_left == pytest.approx(0.05)
    # a per-request budget overrides the default; a big one lets the call through
    gen, _ = router(["<search>Pricey:q</search>", "<answer>x</answer>"])
    result = asyncio.run(RouterR1Loop(gen, {"Pricey": pricey}, LoopSettings(budget=0.05)).run(PROMPT, budget=1.0))
    assert result.rounds[0].status == "ok" and 0 < result.ledger.cost <= 1.0


def test_every_generation_is_a_turn_invalid_ones_included():
    """Router-R1's loop: max_turns (4) generations that may route, then one final generation; a
    generation that acts on nothing still uses its turn. Before: invalid generations were free up
    to a cap of 10 (the truncated-answer request ran 10 generations)."""
    gen, asked = router(lambda p: "rambling without tags")
    result = run(RouterR1Loop(gen, {}))
    assert len(asked) == 5 and result.stopped == "no_answer" and result.answer is None
    assert [a["may_route"] for a in asked] == [True, True, True, True, False]  # the final one may not route
    gen, asked = router(["no tag", "<search>Alpha:q1</search>", "still no tag", "<search>Alpha:q2</search>",
                         "<search>Alpha:q3</search>"])  # two invalid turns, two calls, a search in the final turn
    alpha, engine = candidate("Alpha")
    result = run(RouterR1Loop(gen, {"Alpha": alpha}))
    assert engine.calls == ["q1", "q2"] and result.route_calls == 2 and len(asked) == 5
    assert [r.action for r in result.rounds] == ["invalid", "search", "invalid", "search", "search"]
    assert result.rounds[-1].status == "not_executed"
    gen, asked = router(lambda p: "<search>Alpha:q</search>")  # fewer turns configured
    alpha, engine = candidate("Alpha")
    result = run(RouterR1Loop(gen, {"Alpha": alpha}, LoopSettings(max_turns=1)))
    assert len(engine.calls) == 1 and len(asked) == 2 and result.rounds[-1].status == "not_executed"


def test_concurrent_requests_do_not_serialize():
    """16 requests' route calls are all in flight at once: each call waits until the 16th arrives
    (serialized requests would never get there; the wait is bounded so a failure cannot hang)."""
    gen, _ = router(lambda p: "<answer>x</answer>" if "<information>" in p else "<search>Alpha:q</search>")
    in_flight, peak = [0], [0]

    async def main():
        everyone_in = asyncio.Event()

        async def call(query):
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            if in_flight[0] == 16:
                everyone_in.set()
            await asyncio.wait_for(everyone_in.wait(), 10)
            in_flight[0] -= 1
            return Completion("reply", 1, 1)

        loop = RouterR1Loop(gen, {"Alpha": Candidate("Alpha", Price(1.0, 2.0), call)}, LoopSettings(call_timeout_s=30))
        return await asyncio.gather(*(loop.run(PROMPT) for _ in range(16)))

    results = asyncio.run(main())
    assert peak[0] == 16
    assert all(r.answer == "x" and r.route_calls == 1 and r.rounds[0].status == "ok" for r in results)


def test_round_events_arrive_in_order():
    gen, _ = router(["<search>Alpha:q</search>", "<answer>x</answer>"])
    alpha, _ = candidate("Alpha")
    seen = []

    async def on_round(rnd):
        seen.append((rnd.index, rnd.action))

    run(RouterR1Loop(gen, {"Alpha": alpha}), on_round=on_round)
    assert seen == [(0, "search"), (1, "answer")]


def test_router_prompt_renders_the_pool_and_question():
    text = render_router_prompt(DEFAULT_ROUTER_PROMPT, "  who wrote Hamlet ", [("Alpha", "general model", Price(0.1, 0.2, "EUR"))])
    assert text.endswith("Question: who wrote Hamlet?")
    assert "- Alpha: general model (price per 1M tokens: 0.1 prompt, 0.2 completion EUR)" in text
    assert "<search>" in text and "<answer>" in text and "<information>" in text
    assert render_router_prompt("costs $$5 {literal} $question", "q", []) == "costs $5 {literal} q?"
    with pytest.raises(ValueError, match=r"\$question"):
        render_router_prompt("$unknown $question", "q", [])


def test_action_regex_allows_only_configured_names_and_answers_on_the_last_round():
    import re

    rx = re.compile(router_action_regex(["Alpha", "Be.ta"], think=True))
    assert rx.fullmatch("<think>hm</think> <search>Alpha:who?</search>")
    assert not re.fullmatch(router_action_regex(["Alpha"]), "<think>hm</think><search>Alpha:q</search>")  # think off
    assert rx.fullmatch("<search>Be.ta:q</search>") and not rx.fullmatch("<search>Bexta:q</search>")
    assert rx.fullmatch("<answer>Paris</answer>") and not rx.fullmatch("<search>Gamma:q</search>")
    last = re.compile(router_action_regex(["Alpha"], may_route=False))
    assert last.fullmatch("<answer>x</answer>") and not last.fullmatch("<search>Alpha:q</search>")
    # think=True is the trained format: a leading newline, a multi-line <think>, spaces around the
    # name, newlines inside tags; think=False keeps a small router's tag contents on one line
    assert rx.fullmatch("\n<think>first\nthen</think>\n<search> Alpha : who\nwrote it?</search>")
    assert rx.fullmatch("<answer>line one\nline two</answer>")
    compact = re.compile(router_action_regex(["Alpha"]))
    assert compact.fullmatch("<search> Alpha :who?</search>") and not compact.fullmatch("<answer>one\ntwo</answer>")


def test_only_a_generation_that_starts_an_action_is_marked_constrainable():
    """The generation after one cut by its token cap continues it (continuation=True: an engine
    must not constrain it); the one after a complete action does not."""
    gen, asked = router(["<think>a b c d e f", "g</think><search>Alpha:q</search>", "<answer>x</answer>"])
    alpha, _ = candidate("Alpha")
    result = run(RouterR1Loop(gen, {"Alpha": alpha}, LoopSettings(max_new_tokens=3)))
    assert [a["continuation"] for a in asked] == [False, True, False]
    assert [r.finish_reason for r in result.rounds] == ["length", "stop", "stop"] and result.answer == "x"


def test_the_budget_holds_against_text_that_tokenises_badly():
    """Emoji-heavy sub-queries cost ~4 tokens a character on a byte-level tokenizer; the engine
    here bills every UTF-8 byte and the full max_tokens. With the conservative bound the ledger
    never passes the budget, however many calls the router asks for."""
    query = "🦀🧪" * 40

    async def bill_every_byte(q):
        return Completion("r", len(CANDIDATE_INSTRUCTION.format(query=q).encode("utf-8")) + 30, 100)

    gen, asked = router(lambda p: f"<search>Alpha:{query}</search>" if p.count("<information>") < 8 else "<answer>x</answer>")
    cand = Candidate("Alpha", Price(1_000.0, 1_000.0), bill_every_byte, max_tokens=100)
    budget = 2.5 * cand.worst_case_cost(query)
    result = run(RouterR1Loop(gen, {"Alpha": cand}, LoopSettings(max_turns=8, max_route_calls=8)), budget=budget)
    assert result.ledger.cost <= budget
    assert [r.status for r in result.rounds if r.action == "search"][:3] == ["ok", "ok", "over_budget"]


def test_a_router_failure_keeps_what_was_spent():
    calls = []

    async def generate(prompt, stop, max_new_tokens, temperature, may_route, continuation=False):
        calls.append(prompt)
        if len(calls) == 1:
            return Completion("<search>Alpha:q</search>", 5, 3)
        raise ConnectionError("router engine down")

    alpha, _ = candidate("Alpha", reply="a b", price=(1_000_000.0, 1_000_000.0))
    with pytest.raises(RouterFailed) as info:
        run(RouterR1Loop(generate, {"Alpha": alpha}))
    spent = info.value.result
    assert isinstance(info.value.cause, ConnectionError) and spent.stopped == "router_failed"
    assert spent.ledger.calls == {"Alpha": 1} and spent.ledger.cost > 0 and spent.ledger.router_prompt_tokens == 5
    assert [r.status for r in spent.rounds] == ["ok"]


def test_an_answer_cut_by_the_token_cap_ends_the_loop_with_what_it_wrote():
    """The finding: the router opened <answer>, hit its token cap, and the loop generated the same
    truncated text again, 10 times. Now that generation ends the request with its text, and the
    round says it was cut. Before: 10 generations and no answer."""
    gen, asked = router(lambda p: "<think>short</think> <answer>The Seine river flows through Paris and also")
    result = run(RouterR1Loop(gen, {}, LoopSettings(max_new_tokens=6)))
    assert len(asked) == 1
    assert result.stopped == "answer_truncated" and result.answer == "The Seine river flows through"
    assert result.rounds[0].finish_reason == "length" and result.rounds[0].error == "answer cut at the token cap"
    # a generation that closes its answer, or stops on its own with one open, is not "cut"
    gen, asked = router(lambda p: "<answer>open but stopped")
    result = run(RouterR1Loop(gen, {}, LoopSettings(max_new_tokens=50, max_turns=2)))
    assert len(asked) == 3 and result.stopped == "no_answer" and result.rounds[0].finish_reason == "stop"


def test_a_search_cut_by_the_token_cap_is_an_invalid_action_and_the_loop_goes_on():
    gen, asked = router(["<search>Alpha:a very long sub query that", "<answer>x</answer>"])
    alpha, engine = candidate("Alpha")
    result = run(RouterR1Loop(gen, {"Alpha": alpha}, LoopSettings(max_new_tokens=4)))
    assert engine.calls == [] and result.rounds[0].action == "invalid" and result.rounds[0].finish_reason == "length"
    assert result.answer == "x" and result.stopped == "answer"


def test_the_requests_max_tokens_bounds_the_routers_tokens_over_all_generations():
    gen, asked = router(lambda p: "one two three four five six seven eight nine ten")  # never acts
    result = run(RouterR1Loop(gen, {}, LoopSettings(max_new_tokens=4)), max_tokens=10)
    assert [a["max"] for a in asked] == [4, 4, 2]  # the last generation gets only what is left
    assert result.ledger.router_completion_tokens == 10 and result.stopped == "max_tokens"
    assert result.answer is None


def test_the_loop_deadline_cancels_the_call_in_flight_and_reports_what_was_spent():
    """Past LoopSettings.deadline_s the running candidate call is cancelled (no call outlives the
    request), charged at its worst case, and RouterFailed carries every round so far."""
    gen, asked = router(lambda p: "<search>Slow:q</search>")
    events = []

    async def slow(query):
        events.append("called")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    cand = Candidate("Slow", Price(1.0, 2.0), slow, max_tokens=10, timeout_s=3600)
    with pytest.raises(RouterFailed) as info:
        run(RouterR1Loop(gen, {"Slow": cand}, LoopSettings(deadline_s=0.2)))
    spent = info.value.result
    assert isinstance(info.value.cause, TimeoutError) and spent.stopped == "deadline"
    assert events == ["called", "cancelled"] and len(asked) == 1
    assert spent.rounds[0].status == "cancelled" and spent.ledger.cost == pytest.approx(cand.worst_case_cost("q"))
    assert 0.2 <= spent.latency_s < 2


def test_the_deadline_also_cuts_a_router_generation_that_never_ends():
    async def generate(prompt, stop, max_new_tokens, temperature, may_route, continuation=False):
        await asyncio.sleep(3600)

    with pytest.raises(RouterFailed) as info:
        run(RouterR1Loop(generate, {}, LoopSettings(deadline_s=0.1)))
    assert info.value.result.stopped == "deadline" and info.value.result.rounds == []


def test_observations_are_cut_to_the_router_token_limit_as_upstream_did():
    """The whole <information> block is cut to its first max_observation_tokens router tokens
    (a long one loses its closing tag, as in Router-R1's training loop); short ones are untouched."""
    from actors.router_r1 import WordTokens

    gen, asked = router(["<search>Alpha:long</search>", "<search>Alpha:short</search>", "<answer>x</answer>"])
    words = " ".join(f"w{i}" for i in range(1000))
    alpha, _ = candidate("Alpha", reply=lambda q: words if q == "long" else "brief reply")
    result = run(RouterR1Loop(gen, {"Alpha": alpha}, LoopSettings(max_observation_tokens=20), tokens=WordTokens()))
    first = asked[1]["prompt"][len(PROMPT) + len(result.rounds[0].router_text):]
    assert first == WordTokens().head(information_block(words), 20) and "</information>" not in first
    assert result.rounds[0].observation_cut and not result.rounds[1].observation_cut
    assert asked[2]["prompt"].endswith(information_block("brief reply"))


def test_a_trace_that_fills_the_context_window_stops_with_context_never_an_overflow():
    """Each generation gets at most what is left of the window; when fewer than
    min_generation_tokens are left the request ends (stopped: context) without calling the
    engine with a prompt it would refuse."""
    from actors.router_r1 import WordTokens

    gen, asked = router(["<search>Alpha:q</search>", "<answer>never</answer>"])
    alpha, _ = candidate("Alpha", reply=" ".join(["word"] * 60))
    window = WordTokens().count(PROMPT) + 70
    settings = LoopSettings(max_new_tokens=64, context_window=window, max_observation_tokens=None, min_generation_tokens=16)
    result = run(RouterR1Loop(gen, {"Alpha": alpha}, settings, tokens=WordTokens()))
    assert asked[0]["max"] == 64  # room for a whole generation
    assert len(asked) == 1 and result.stopped == "context" and result.answer is None  # 70 - 59 < 16 left
    roomy = LoopSettings(max_new_tokens=64, context_window=window + 30, max_observation_tokens=None, min_generation_tokens=16)
    gen, asked = router(["<search>Alpha:q</search>", "<answer>fits</answer>"])
    result = run(RouterR1Loop(gen, {"Alpha": alpha}, roomy, tokens=WordTokens()))
    used = WordTokens().count(asked[1]["prompt"])
    assert asked[1]["max"] == window + 30 - used < 64 and result.answer == "fits"  # capped at what is left
