import numpy as np
import pytest

from actors.encoder import EncoderEngine, EncoderSettings, adapter_dirs

TEXTS = [
    "Vitamin D deficiency increases infection risk.",
    "The boundary layer on a flat plate in supersonic flow.",
    "Should schools ban homework?",
    "Dietary fiber and cholesterol.",
]


def test_base_embeddings_match_sentence_transformers_convention(engine, model_path):
    """Mean pooling + L2 norm, computed independently with plain transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModel.from_pretrained(str(model_path)).eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    got = engine.encode(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert got.shape == (4, 384) and engine.dim == 384


def test_adapters_change_embeddings_and_base_ignores_them(engine, model_path, encoder_settings):
    plain = EncoderEngine(model_path, None, encoder_settings)
    base = engine.encode(TEXTS, "base")
    np.testing.assert_allclose(base, plain.encode(TEXTS), atol=1e-5)
    alpha = engine.encode(TEXTS, "alpha")
    beta = engine.encode(TEXTS, "beta")
    assert np.abs(alpha - base).max() > 1e-2
    assert np.abs(alpha - beta).max() > 1e-2


def test_a_base_pass_never_switches_the_adapters_off_model_wide(engine, monkeypatch):
    """Base rows run as peft's "__base__" rows of a mixed pass: disable_adapter() walks every
    module on entry and exit (6 ms a call on MiniLM-L6 here, more than a one-text forward)."""
    def walk(*a, **k):
        raise AssertionError("disable_adapter() used for a base pass")

    monkeypatch.setattr(engine.model, "disable_adapter", walk)
    monkeypatch.setattr(engine.model, "disable_adapters", walk, raising=False)
    base = engine.encode(TEXTS, "base")
    assert base.shape == (4, 384)


def test_mixed_adapter_batch_equals_per_adapter_batches(engine):
    names = ["alpha", "base", "beta", "alpha"]
    mixed = engine.encode(TEXTS, names)
    for i, name in enumerate(names):
        alone = engine.encode([TEXTS[i]], name)
        np.testing.assert_allclose(mixed[i], alone[0], atol=1e-5)


def test_unknown_adapter_and_bad_lengths(engine):
    with pytest.raises(KeyError, match="unknown expert"):
        engine.encode(TEXTS[:1], "gamma")
    with pytest.raises(ValueError, match="one entry per text"):
        engine.encode(TEXTS, ["alpha"])
    assert engine.encode([]).shape[0] == 0


def test_reserved_expert_names_rejected(model_path, random_adapters):
    with pytest.raises(ValueError, match="invalid expert name"):
        EncoderEngine(model_path, {"base": random_adapters["alpha"]})


def test_adapter_dirs_finds_only_adapter_folders(tmp_path, random_adapters):
    (tmp_path / "junk").mkdir()
    import shutil

    shutil.copytree(random_adapters["alpha"], tmp_path / "alpha")
    assert list(adapter_dirs(tmp_path)) == ["alpha"]
    assert adapter_dirs(tmp_path / "missing") == {}


def test_settings_validation():
    with pytest.raises(ValueError, match="pooling"):
        EncoderSettings(pooling="max")


def test_device_resolution():
    import torch

    from actors.encoder import resolve_torch_device

    assert resolve_torch_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_torch_device("auto") == "cuda"
    else:
        assert resolve_torch_device("auto") == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_torch_device("cuda:0")


def test_concurrent_base_and_expert_encodes_equal_sequential_ones(engine):
    """/v1/embeddings (base) and routed batches (experts) run in different threads of one replica:
    the vectors must equal the same requests run one at a time (peft's disable_adapter() is
    model-wide state, so an unguarded base pass switches the experts off for the other thread)."""
    import threading

    texts = [f"protein folding and gene expression, sample {i} " * 3 for i in range(16)]
    want = {"base": engine.encode(texts, "base"), "alpha": engine.encode(texts, "alpha")}
    mixed_names = ["alpha", "beta"] * 8
    want["mixed"] = engine.encode(texts, mixed_names)
    assert not np.allclose(want["base"], want["alpha"], atol=1e-3)
    wrong, errors = [], []

    def loop(kind):
        try:
            for _ in range(12):
                got = engine.encode(texts, mixed_names if kind == "mixed" else kind, batch_size=4)
                if not np.allclose(got, want[kind], atol=1e-5):
                    wrong.append(kind)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(k,)) for k in ("base", "alpha", "mixed")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []
