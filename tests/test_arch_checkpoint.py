"""Checkpoints of any plain ViT (issue "CAIT for the ViTs people compress today", item 5): the config records the
architecture's options (:class:`cait.models.arch.ViTArch`), so a compact DeiT III, DINOv2 with registers, CLIP, a ViT
without a class token or a distilled DeiT saves and loads without its name deciding anything, and a config that lies
about the architecture is refused before anything is allocated.

Small configurations of the real timm classes (``test_prefix_tokens.FAMILIES`` and three more), each in seconds.
"""
import copy
import json

import pytest
import timm
import torch

import cait
from cait.io.checkpoint import CheckpointError, load_checkpoint, read_config, save_pretrained
from cait.models.arch import ViTArch
from cait.models.spec import describe
from conftest import randomize_
from test_prefix_tokens import FAMILIES, SMALL
from test_prune import random_consistent_mask, zero_masked_rows_

CASES = {
    **FAMILIES,
    "deit3_layer_scale": ("deit3_small_patch16_224", dict(SMALL, img_size=64), 1, (4, 4)),
    "clip_quickgelu_pre_norm": ("vit_base_patch16_clip_quickgelu_224", dict(SMALL, img_size=64), 1, (4, 4)),
    "siglip_avg_fc_norm": ("vit_base_patch16_siglip_224", dict(SMALL, img_size=64, global_pool="avg"), 0, (4, 4)),
}


def compact(case: str) -> torch.nn.Module:
    """A compact twin of the case: ATME ``h1``, then CDCP with a random head-consistent mask."""
    torch.manual_seed(0)
    name, kwargs, _, _ = CASES[case]
    model = randomize_(timm.create_model(name, num_classes=10, **kwargs).eval(), std=0.05)
    model = cait.add_compactors(cait.apply_atme(model, "h1"))
    randomize_(model, seed=7, std=0.05)
    mask = random_consistent_mask(describe(model), seed=3)
    zero_masked_rows_(model, mask)
    return cait.prune(model, mask).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_a_compact_twin_of_every_family_saves_and_loads_to_the_same_function(case, tmp_path):
    model = compact(case)
    _, _, prefix, _ = CASES[case]
    path = save_pretrained(model, tmp_path / "twin")
    config = read_config(path)
    assert ViTArch.from_dict(config["architecture"]).prefix_tokens == prefix
    loaded = load_checkpoint(path)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert describe(loaded) == describe(model) and str(cait.get_layout(loaded)) == "h1"
    again = read_config(save_pretrained(loaded, tmp_path / "again"))          # the record is stable under a reload
    assert {k: again[k] for k in ("architecture", "data", "blocks")} == {k: config[k] for k in
                                                                       ("architecture", "data", "blocks")}


def test_the_record_keeps_what_changes_the_function_but_no_tensor():
    clip = ViTArch.of(timm.create_model("vit_base_patch16_clip_quickgelu_224", **SMALL, img_size=64))
    deit = ViTArch.of(timm.create_model("deit_tiny_patch16_224", **SMALL, img_size=64))
    assert (clip.act, clip.norm_eps, clip.pre_norm) == ("quick_gelu", 1e-5, True)
    assert (deit.act, deit.norm_eps, deit.pre_norm) == ("gelu", 1e-6, False)
    assert json.loads(json.dumps(clip.to_dict())) == clip.to_dict()


def test_a_config_whose_architecture_lies_is_refused_before_the_weights_are_read(tmp_path):
    path = save_pretrained(compact("dinov2_registers"), tmp_path / "twin")
    cfile = path / "config.json"
    good = json.loads(cfile.read_text())

    def refused(match, **arch):
        cfile.write_text(json.dumps(dict(good, architecture=dict(good["architecture"], **arch))))
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path)

    refused(r"'depth' must be an integer in \[1, 64\]", depth=1000)
    refused("more than 3,000,000,000", embed_dim=8192, num_heads=64, mlp_hidden=65536)
    refused("'act' must be one of", act="relu")
    refused("not divisible by num_heads", num_heads=5)
    refused("block widths for an architecture of depth 3", depth=3)
    refused("architecture hash differs", reg_tokens=2)         # a valid record, but not the one the weights carry
    cfile.write_text(json.dumps({k: v for k, v in good.items() if k != "architecture"}))
    with pytest.raises(CheckpointError, match="records no architecture and its base_model"):
        load_checkpoint(path)


def test_a_model_the_record_cannot_describe_is_refused_before_anything_is_written(tmp_path):
    model = timm.create_model("deit_tiny_patch16_224", **SMALL, img_size=64, embed_norm_layer="layernorm")
    with pytest.raises(CheckpointError, match="patch-embedding norm"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="not a timm VisionTransformer"):
        save_pretrained(timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1)), tmp_path / "swin")
    assert not (tmp_path / "swin").exists()
    with pytest.raises(CheckpointError, match="would rebuild it with other tensors"):   # EVA-02 B: a norm in the FFN
        save_pretrained(timm.create_model("eva02_base_patch14_224", depth=1, img_size=56), tmp_path / "eva")
    assert not (tmp_path / "eva").exists()


def test_a_checkpoint_without_the_record_still_loads(tmp_path):
    """Files written before the record (the bundled pair, earlier Hub uploads) rebuild from their DeiT name."""
    model = cait.apply_atme(timm.create_model(cait.TEST_MODEL).eval(), "h2")
    path = save_pretrained(model, tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    del config["architecture"], config["data"]
    (path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file
    from cait.io.checkpoint import architecture_hash
    save_file(load_file(path / "model.safetensors"), path / "model.safetensors",
              metadata={"format": config["format"], "config_sha256": architecture_hash(config)})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_checkpoint(path)(x), model(x))


def test_the_compress_command_line_takes_any_supported_timm_name(tmp_path, capsys, monkeypatch):
    """``python -m cait.compress --model deit3_small_patch16_224`` (the issue's first refusal) writes a twin that
    loads; random weights here (the Hub is switched off), and the summary says so."""
    from cait.cli.compress import main as compress_main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "twin"
    assert compress_main(["--model", "deit3_small_patch16_224", "--flops-reduction", "0.5", "--calibration", "none",
                          "--round-to", "8", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "random initialisation" in summary["weights"] and summary["flops"] <= 0.51 * summary["base_flops"]
    loaded = cait.load_pretrained(out)
    assert ViTArch.of(loaded).layer_scale and read_config(out)["base_model"] == "deit3_small_patch16_224"
    assert compress_main(["--model", "swin_tiny_patch4_window7_224", "--flops-reduction", "0.5",
                          "--output", str(tmp_path / "swin")]) == 2
    assert "Swin: windowed attention" in capsys.readouterr().err and not (tmp_path / "swin").exists()
