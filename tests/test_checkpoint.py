"""Save/load: exact round trips, and bad files refused with the file and the problem named."""
import json
import pickle

import pytest
import torch
from conftest import randomize_

import cait
from cait.io.checkpoint import CheckpointError


@pytest.fixture
def compact(tiny):
    return cait.compress(randomize_(tiny()), 0.55)


@pytest.fixture
def saved(compact, tmp_path):
    return cait.save_pretrained(compact, tmp_path / "ckpt")


def test_round_trip_is_exact(compact, saved):
    loaded = cait.load_pretrained(saved)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), compact(x))
    assert cait.get_layout(loaded) == cait.get_layout(compact)
    assert loaded.cait_meta == compact.cait_meta and loaded.cait_meta.preview is True
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["base_model"] == "deit_test_patch4_32" and cfg["merge"] == compact.cait_meta.merge
    assert len(cfg["blocks"]) == 6


def test_fp16_round_trip_and_uncompressed_model(tiny, tmp_path):
    model = randomize_(tiny())
    cait.save_pretrained(model, tmp_path / "fp16", dtype=torch.float16)
    loaded = cait.load_pretrained(tmp_path / "fp16")
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=2e-2, atol=2e-2)
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["blocks"] is None


def test_compactor_models_are_not_saved(tiny, tmp_path):
    with pytest.raises(ValueError, match="fold the compactors"):
        cait.save_pretrained(cait.add_compactors(tiny()), tmp_path / "x")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory_and_files(saved, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        cait.load_pretrained(tmp_path / "nope")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        cait.load_pretrained(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        cait.load_pretrained(saved)


@pytest.mark.parametrize("text,match", [
    ("{not json", "config.json: not valid JSON"),
    ('{"format": "other"}', "format is 'other'"),
    ("[1, 2]", "format is 'list'"),
])
def test_bad_config_text(saved, text, match):
    (saved / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        cait.load_pretrained(saved)


@pytest.mark.parametrize("changes,match", [
    ({"base_model": 7}, "'base_model' must be a model name"),
    ({"base_model": "vit_giant_patch14_224"}, "architecture hash differs"),   # provenance, but tied to the weights
    ({"architecture": {"depth": 2}}, r"architecture keys missing \['family'"),
    ({"architecture": None, "base_model": "vit_giant_patch14_224"},
     "records no architecture and its base_model 'vit_giant_patch14_224' is not one this package builds by name"),
    ({"data": {"mean": "imagenet"}}, "data 'mean' must be a list of up to 16 numbers"),
    ({"data": {"url": "http://x"}}, "'data' must be an object with keys among"),
    ({"img_size": "big"}, r"'img_size' must be an integer in \[16, 1024\], got 'big'"),
    ({"img_size": 10 ** 6}, r"'img_size' must be an integer in \[16, 1024\]"),
    ({"img_size": True}, r"'img_size' must be an integer"),
    ({"img_size": 34}, "img_size 34 is not a multiple of the patch size 4"),
    ({"num_classes": 10 ** 9}, r"'num_classes' must be an integer in \[1, 22000\]"),
    ({"merge": "h99"}, "does not describe a buildable model"),
    ({"merge": 3}, "'merge' must be a layout string"),
    ({"blocks": [{"qk_dim": 1}]}, "'blocks' must be null or a list"),
    ({"meta": [1]}, "'meta' must be an object"),
])
def test_bad_config_values(saved, changes, match):
    _edit_config(saved, **changes)
    with pytest.raises(CheckpointError, match=match):
        cait.load_pretrained(saved)


def _drop_hash(path):
    """Rewrite the weights as a file written before the architecture hash existed."""
    from safetensors.torch import load_file, save_file
    save_file(load_file(path / "model.safetensors"), path / "model.safetensors", metadata={"format": "x"})


@pytest.mark.parametrize("changes", [{"merge": "v2,h4"}, {"img_size": 36}, {"num_classes": 9}])
def test_weights_are_tied_to_the_config_they_were_saved_with(tiny, tmp_path, changes):
    """An edited layout or image size would load the same tensors and compute another function: refused."""
    path = cait.save_pretrained(cait.apply_atme(tiny(), "h2,v4"), tmp_path / "m")
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError, match="saved with another config.json .architecture hash differs"):
        cait.load_pretrained(path)


def test_widths_that_do_not_match_the_tensors(compact, saved):
    _drop_hash(saved)
    x = torch.randn(2, 3, 32, 32)                                        # a file without the hash still loads, intact
    torch.testing.assert_close(cait.load_pretrained(saved)(x), compact.eval()(x))
    cfg = json.loads((saved / "config.json").read_text())
    cfg["blocks"][0]["ffn_dim"] -= 1
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'blocks.0.mlp.fc1.weight' has shape"):
        cait.load_pretrained(saved)


def test_layout_that_does_not_match_the_tensors(saved):
    _drop_hash(saved)
    _edit_config(saved, merge="")
    with pytest.raises(CheckpointError, match="does not match config.json: missing tensors"):
        cait.load_pretrained(saved)


def test_oversized_and_deeply_nested_configs(saved):
    (saved / "config.json").write_text(" " * 1_100_000 + "{}")
    with pytest.raises(CheckpointError, match="more than a config can be"):
        cait.load_pretrained(saved)
    (saved / "config.json").write_text('{"format": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply|not valid JSON"):
        cait.load_pretrained(saved)


def test_integer_weights_are_refused_before_loading(compact, tmp_path):
    from safetensors.torch import save_file
    path = cait.save_pretrained(compact, tmp_path / "int")
    from cait.io.checkpoint import architecture_hash, read_config
    tensors = {k: v.to(torch.int32) for k, v in compact.state_dict().items()}
    save_file(tensors, path / "model.safetensors",
              metadata={"config_sha256": architecture_hash(read_config(path))})
    with pytest.raises(CheckpointError, match="is I32, expected a floating dtype"):
        cait.load_pretrained(path)


def test_stale_temporary_files_are_cleaned_on_the_next_save(compact, tmp_path):
    import os
    import time
    path = cait.save_pretrained(compact, tmp_path / "m")
    old, fresh = path / ".model.safetensors.dead.tmp", path / ".config.json.live.tmp"
    old.write_bytes(b"x"), fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 7200,) * 2)
    cait.save_pretrained(compact, path)
    assert not old.exists() and fresh.exists()                       # a write in progress elsewhere is left alone


def test_truncated_and_garbage_weights(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        cait.load_pretrained(saved)
    (saved / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        cait.load_pretrained(saved)


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/cait_pickle_was_executed",))


def test_a_pickle_is_never_unpickled(saved, tmp_path):
    import os
    marker = "/tmp/cait_pickle_was_executed"
    if os.path.exists(marker):
        os.unlink(marker)
    (saved / "model.safetensors").write_bytes(pickle.dumps({"w": _Boom()}))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        cait.load_pretrained(saved)
    assert not os.path.exists(marker)


def test_nan_weights_are_refused(compact, tmp_path):
    with torch.no_grad():
        compact.head.weight[0, 0] = float("nan")
    path = cait.save_pretrained(compact, tmp_path / "nan")
    with pytest.raises(CheckpointError, match="'head.weight' contains NaN"):
        cait.load_pretrained(path)
