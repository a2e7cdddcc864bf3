"""The Hub, offline: a model card from measurements, the folder push_to_hub uploads, and hf-hub: loading from the
local Hugging Face cache layout (no network)."""
import pytest
import torch

import cait
from cait.io.checkpoint import CheckpointError
from cait.io.hub import HubError, parse_hub_id
from conftest import randomize_


@pytest.fixture
def twin(tiny):
    m = cait.compress(randomize_(tiny(num_classes=8), std=0.05), 0.5)
    from cait.data.synthetic import CLASSES
    m.cait_meta.classes = list(CLASSES)
    return m


def test_push_folder_has_weights_config_and_a_measured_card(twin, tmp_path):
    folder = cait.push_to_hub(twin, "someone/tiny-cait", folder=str(tmp_path / "f"), upload=False)
    card = (tmp_path / "f" / "README.md").read_text()
    assert {p.name for p in (tmp_path / "f").iterdir()} == {"README.md", "config.json", "model.safetensors"}
    assert folder == str(tmp_path / "f")
    assert "ATME layout: `h2,v4`" in card and 'cait.load_pretrained("hf-hub:someone/tiny-cait")' in card
    assert "% fewer)" in card and "× |" in card and "untrained preview" in card and "circle" in card
    with pytest.raises(HubError, match="not a Hub model id"):
        cait.push_to_hub(twin, "../etc", upload=False)


def test_hf_hub_ids_load_from_the_local_cache(twin, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-cait"
    snapshot = repo / "snapshots" / commit                       # what push_to_hub uploads, as the Hub serves it
    cait.push_to_hub(twin, "someone/tiny-cait", folder=str(snapshot), upload=False, measure_speed=False)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = cait.load_pretrained("hf-hub:someone/tiny-cait")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), twin(x))
    assert loaded.pretrained_cfg["hf_hub_id"] == "someone/tiny-cait"
    assert cait.load_pretrained(f"hf-hub:someone/tiny-cait@{commit}").num_classes == 8
    with pytest.raises(CheckpointError, match="hf-hub:someone/other: cannot be fetched"):
        cait.load_pretrained("hf-hub:someone/other")
    with pytest.raises(CheckpointError, match="not a Hub model id"):
        cait.load_pretrained("hf-hub:../../etc/passwd")


def test_hub_ids():
    assert parse_hub_id("hf-hub:a/b@v1.0") == ("a/b", "v1.0") and parse_hub_id("a/b") == ("a/b", None)
    for bad in ("a", "a/b/c", "/a/b", "a/b@", "a/b@x y"):
        with pytest.raises(HubError):
            parse_hub_id(bad)


def _cache_repo(tmp_path, monkeypatch, repo_id):
    """An empty snapshot folder of ``repo_id`` in a local Hugging Face cache, the Hub switched off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "cache" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_timm_model_on_the_hub_loads_by_its_hf_hub_id_from_the_cache_and_compresses(tmp_path, monkeypatch):
    """Issue "CAIT for the ViTs people compress today", item 4: a fine-tuned DINOv2 with registers saved by timm
    (``save_for_hf``: config.json with its architecture and arguments, model.safetensors) loads by ``hf-hub:`` id,
    offline from the local cache, and compresses; a repository with only a pickle is refused, never unpickled."""
    import timm
    from timm.models._hub import save_for_hf
    snapshot = _cache_repo(tmp_path, monkeypatch, "someone/dinov2-reg-finetuned")
    model = randomize_(timm.create_model("vit_small_patch14_reg4_dinov2", depth=2, embed_dim=48, num_heads=3,
                                         img_size=70, num_classes=7).eval(), std=0.05)
    save_for_hf(model, str(snapshot), safe_serialization=True)
    source = cait.ModelSource.parse("hf-hub:someone/dinov2-reg-finetuned")
    loaded, info = cait.create_model(source)
    x = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert info.source == "hub" and loaded.pretrained_cfg["hf_hub_id"] == "someone/dinov2-reg-finetuned"
    assert loaded.num_prefix_tokens == 5 and loaded.num_classes == 7
    twin = cait.compress(loaded, 0.3, round_to=4)
    assert twin(x).shape == (2, 7)
    import json
    config = json.loads((snapshot / "config.json").read_text())          # a config that would make timm load a file
    (snapshot / "config.json").write_text(json.dumps(dict(config, model_args=dict(
        config.get("model_args", {}), checkpoint_path=str(snapshot / "pytorch_model.bin")))))
    with pytest.raises(CheckpointError, match=r"'model_args' may not set \['checkpoint_path'\]"):
        cait.create_model("hf-hub:someone/dinov2-reg-finetuned")
    (snapshot / "config.json").write_text(json.dumps(config))
    (snapshot / "model.safetensors").unlink()
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickled"):
        cait.create_model("hf-hub:someone/dinov2-reg-finetuned")


def test_every_spelling_of_a_model_source_parses_once(tmp_path):
    assert cait.ModelSource.parse("bundled") == cait.ModelSource("bundled")
    assert cait.ModelSource.parse(str(tmp_path)) == cait.ModelSource("dir", str(tmp_path))
    assert cait.ModelSource.parse("deit3_small_patch16_224").kind == "timm"
    assert str(cait.ModelSource.parse("hf-hub:a/b@v1")) == "hf-hub:a/b@v1"
    for bad, match in (("hf-hub:a", "not a Hub model id"), ("swin_imaginary", "neither a timm model name")):
        with pytest.raises(ValueError, match=match):
            cait.ModelSource.parse(bad)
    with pytest.raises(CheckpointError, match="no config.json"):
        cait.create_model(tmp_path)
