"""Router-R1 conformance: the golden traces of tests/actors/golden/router_r1.yaml replayed through
the real loop (actors/router_r1.RouterR1Loop) with a scripted router and scripted candidates.
Each case checks the exact prompt the router saw before every generation, the observations, the
actions, the turns, the stop reason and the ledger. `benchmarks/router_conformance.py` runs this
file and writes benchmarks/results/router_conformance.{json,md}."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from actors.llm_engines import ScriptedEngine
from actors.router_r1 import UPSTREAM_NAME_RULES, Candidate, Completion, LoopSettings, NameResolver, Price, RouterR1Loop
from actors.router_r1 import WordTokens, candidate_messages

GOLDEN = yaml.safe_load((Path(__file__).parent / "golden" / "router_r1.yaml").read_text(encoding="utf-8"))
CASES = GOLDEN["cases"]


def _words(messages) -> int:
    return sum(len(m["content"].split()) for m in messages)


def replay(case: dict):
    """Run one case; returns (result, what the router was asked, the candidate calls made)."""
    engine, asked, calls = ScriptedEngine(list(case["router"])), [], []

    async def generate(prompt, stop, max_new_tokens, temperature, may_route, continuation=False):
        asked.append({"prompt": prompt, "max": max_new_tokens, "may_route": may_route, "continuation": continuation})
        return await engine.complete(prompt, max_tokens=max_new_tokens, temperature=temperature, stop=stop)

    specs = {name: {**spec, **case.get("candidates", {}).get(name, {})} for name, spec in GOLDEN["candidates"].items()}
    pool = {}
    for name, spec in specs.items():
        async def call(query, name=name, spec=spec):
            calls.append([name, query])
            if spec.get("fail"):
                raise RuntimeError(spec["fail"])
            return Completion(spec["reply"], _words(candidate_messages(query)), len(spec["reply"].split()))

        pool[name] = Candidate(name, Price(*spec["price"]), call, max_tokens=spec.get("max_tokens", 512), count_prompt=_words)
    rules = UPSTREAM_NAME_RULES if case.get("name_rules") == "upstream" else ()
    resolve = NameResolver({name: spec.get("aliases", []) for name, spec in specs.items()}, rules)
    loop = RouterR1Loop(generate, pool, LoopSettings(**case.get("settings", {})), resolve=resolve, tokens=WordTokens())
    result = asyncio.run(loop.run(GOLDEN["prompt"], **case.get("request", {})))
    return result, asked, calls


@pytest.mark.parametrize("case", CASES, ids=[f"{c['area']}:{c['id']}" for c in CASES])
def test_golden_trace(case):
    result, asked, calls = replay(case)
    want = case["expect"]
    if "trace" in want:
        pieces = [next(iter(p.values())) for p in want["trace"]]
        gens = [i for i, p in enumerate(want["trace"]) if "gen" in p]
        assert [a["prompt"] for a in asked] == [GOLDEN["prompt"] + "".join(pieces[:i]) for i in gens]
        assert result.generated == "".join(pieces) and [r.router_text for r in result.rounds] == [pieces[i] for i in gens]
    per_round = {"actions": "action", "statuses": "status", "candidates": "candidate", "finish_reasons": "finish_reason",
                 "observation_cut": "observation_cut"}
    for key, attr in per_round.items():
        if key in want:
            assert [getattr(r, attr) for r in result.rounds] == want[key], key
    for key in ("max", "may_route", "continuation"):
        if key in want:
            assert [a[key] for a in asked] == want[key], key
    # every scripted generation is used unless the case says how many run
    assert len(asked) == len(result.rounds) == want.get("generations", len(case["router"]))
    if "calls" in want:
        assert calls == want["calls"]
    for key in ("stopped", "answer", "route_calls"):
        if key in want:
            assert getattr(result, key) == want[key], key
    if "ledger" in want:
        led = result.ledger
        assert (led.cost, led.upstream_cost, led.calls) == (pytest.approx(want["ledger"]["cost"]),
                                                             pytest.approx(want["ledger"]["upstream_cost"]), want["ledger"]["calls"])
        assert led.router_completion_tokens == sum(r.router_completion_tokens for r in result.rounds)


def test_the_suite_covers_every_area_with_at_least_30_cases():
    areas = {c["area"] for c in CASES}
    assert len(CASES) >= 30 and len({c["id"] for c in CASES}) == len(CASES)
    assert areas >= {"actions", "invalid", "names", "truncation", "turns", "budget", "failures", "observations", "context"}
