"""LiveExperts: one encoder replica's expert generation, switched live (no Serve: the deployment
is a thin wrapper). Real engine, real adapters, real generation store."""

import asyncio
import threading
import time

import numpy as np
import pytest

from actors.routed_encoder import route_and_encode_requests
from serve.app.live_experts import LiveExperts, encoder_builder
from serve.artifacts.generations import GenerationError, GenerationStore


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory):
    """A LoRA adapter trained for another base model (hidden size 32): its shapes do not fit."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    small = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    out = tmp_path_factory.mktemp("foreign") / "alpha"
    get_peft_model(small, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def generations(tmp_path_factory, engine, random_adapters, mean_pilots, foreign_adapter):
    """g1: alpha; g2: alpha + beta; g3: the foreign adapter under the name alpha."""
    store = GenerationStore(tmp_path_factory.mktemp("experts"))
    pilots = mean_pilots(engine, {"alpha": ["cell biology", "protein folding"], "beta": ["debate", "public policy"]})
    g1 = store.publish({"alpha": random_adapters["alpha"]}, pilots, reason="alpha")
    g2 = store.publish(random_adapters, pilots, reason="alpha+beta")
    g3 = store.publish({"alpha": foreign_adapter}, pilots, reason="foreign")
    store.activate(g1.id)
    return store, g1.id, g2.id, g3.id


@pytest.fixture
def live(generations, model_path, encoder_settings):
    store, g1, *_ = generations
    store.activate(g1)
    loads = []

    experts = LiveExperts(store, encoder_builder(model_path, encoder_settings), on_reload=lambda g, s, ok: loads.append((g, ok)))
    asyncio.run(experts.reconfigure({"generation": "current"}))  # what Serve does after the constructor
    assert loads == [(g1, True)]
    loads.clear()
    return experts, loads


def test_starts_on_the_current_generation_and_follows_the_pointer(live, generations):
    experts, loads = live
    store, g1, g2, _ = generations
    assert experts.generation == g1 and experts.encoder.experts == ["alpha"]
    assert asyncio.run(experts.sync()) is False  # nothing changed
    store.activate(g2)
    assert asyncio.run(experts.sync()) is True
    assert experts.generation == g2 and experts.encoder.experts == ["alpha", "beta"]
    assert loads == [(g2, True)]


def test_a_batch_finishes_on_the_generation_it_started_with(live, generations):
    """Batches run in threads while the generation switches back and forth: each batch's routed
    experts belong to the generation it reports, and its vectors equal that generation's
    encoder run alone."""
    experts, _ = live
    store, g1, g2, _ = generations
    queries = ["debate on public policy", "protein folding in cells", "policy"]
    results, stop = [], threading.Event()

    def batches():
        while not stop.is_set():
            gen, enc = experts.active
            out = route_and_encode_requests(enc, [{"queries": queries, "forced": [None, None, "alpha"]}])[0]
            results.append((gen, out))

    def ran_on(gen):  # a batch that started after the switch has finished
        deadline = time.monotonic() + 60
        while not any(g == gen for g, _ in results[-3:]) and time.monotonic() < deadline:
            time.sleep(0.01)

    worker = threading.Thread(target=batches)
    worker.start()
    ran_on(g1)
    for target in (g2, g1, g2):
        store.activate(target)
        asyncio.run(experts.sync())
        ran_on(target)
    stop.set()
    worker.join()
    seen = {gen for gen, _ in results}
    assert seen == {g1, g2}, seen
    reference = {}
    for gen, out in results:
        allowed = {"alpha", "base"} if gen == g1 else {"alpha", "beta", "base"}
        assert set(out["experts"]) <= allowed
        if gen not in reference:
            enc = experts.build(store.get(gen))
            reference[gen] = route_and_encode_requests(enc, [{"queries": queries, "forced": [None, None, "alpha"]}])[0]
        np.testing.assert_allclose(out["embeddings"], reference[gen]["embeddings"], atol=1e-5)
        assert out["experts"] == reference[gen]["experts"]
    assert reference[g2]["experts"][0] == "beta"  # the new expert is routed to once served


def test_a_generation_that_does_not_load_leaves_the_old_one_serving(live, generations):
    experts, loads = live
    store, g1, _, g3 = generations
    store.activate(g3)  # an adapter for another base model: wrong shapes
    assert asyncio.run(experts.sync()) is False
    assert experts.generation == g1 and g3 in experts.failed and loads == [(g3, False)]
    assert asyncio.run(experts.sync()) is False and len(loads) == 1  # not retried in a loop
    store.activate(g1)
    assert asyncio.run(experts.sync()) is False  # already served
    store.activate(g3)  # moved away and back: tried again (the files may have been fixed)
    assert asyncio.run(experts.sync()) is False and loads == [(g3, False), (g3, False)]
    store.pointer_path.unlink()  # the pointer vanished: the experts keep being served, not the bare base
    assert asyncio.run(experts.sync()) is False and experts.generation == g1
    store.activate(g1)
    # pinned through Serve's user_config on a running replica: recorded, the old generation serves
    # on (raising would make Serve stop the replica)
    asyncio.run(experts.reconfigure({"generation": g3}))
    assert experts.generation == g1 and g3 in experts.failed


def test_a_pin_wins_over_the_pointer_until_released(live, generations):
    experts, _ = live
    store, g1, g2, _ = generations
    asyncio.run(experts.reconfigure({"generation": g2}))
    assert experts.generation == g2 and experts.pin == g2
    store.activate(g1)
    assert asyncio.run(experts.sync()) is False and experts.generation == g2  # pinned
    asyncio.run(experts.reconfigure({"generation": "current"}))
    assert experts.generation == g1
    with pytest.raises(GenerationError, match="invalid generation id"):
        asyncio.run(experts.reconfigure({"generation": "../g000001"}))


def test_without_a_store_the_base_model_serves(model_path, encoder_settings):
    experts = LiveExperts(None, encoder_builder(model_path, encoder_settings))
    assert experts.generation is None and experts.encoder.experts == []
    assert asyncio.run(experts.sync()) is False


def test_a_replica_starts_on_its_pin_directly_and_a_bad_pin_fails_the_start(generations, model_path, encoder_settings):
    """Serve calls reconfigure() right after the constructor: the pinned generation is the first
    and only one loaded. Before: the constructor loaded CURRENT's generation first (a pinned
    service crash-looped when CURRENT's did not load)."""
    store, g1, g2, g3 = generations
    store.activate(g3)  # CURRENT names the unloadable one
    built = []

    plain = encoder_builder(model_path, encoder_settings)

    def build(gen):
        built.append(gen.id if gen else None)
        return plain(gen)

    experts = LiveExperts(store, build)
    asyncio.run(experts.reconfigure({"generation": g2}))
    assert experts.generation == g2 and built == [g2]
    bad = LiveExperts(store, build)
    with pytest.raises(GenerationError, match="no expert generation loads"):
        asyncio.run(bad.reconfigure({"generation": g3}))
    store.activate(g1)


def test_following_current_a_replica_falls_back_to_the_generation_before(generations, model_path, encoder_settings):
    """A replica that starts while CURRENT names a generation that does not load serves the one
    activated before it and says so, instead of failing its start again and again."""
    store, g1, g2, g3 = generations
    store.activate(g2)
    store.activate(g3)
    loads = []

    experts = LiveExperts(store, encoder_builder(model_path, encoder_settings), on_reload=lambda g, s, ok: loads.append((g, ok)))
    asyncio.run(experts.reconfigure({"generation": "current"}))
    assert experts.generation == g2 and g3 in experts.failed and loads == [(g3, False), (g2, True)]
    assert asyncio.run(experts.sync()) is False  # the failed target is not retried every interval
    store.activate(g1)
