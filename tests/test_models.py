"""Getting a DeiT: timm's names, the tiny test DeiT, and a visible (never silent) fallback when the Hub is out of
reach."""
import pytest

import cait
from cait.models.deit import PATCH_SIZES, architecture, create_model, update_cfg


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown model 'deit_huge'.*deit_small_patch16_224"):
        create_model("deit_huge")


def test_offline_every_deit_falls_back_to_random_weights_and_says_why():
    model, info = create_model("deit_tiny_patch16_224")                 # conftest: HF_HUB_OFFLINE=1
    assert info.source == "random" and not info.trained and "HF_HUB_OFFLINE" in info.detail
    assert not model.training and architecture(model) == "deit_tiny_patch16_224"
    model, info = create_model("deit_tiny_patch16_224", pretrained=False)
    assert info.detail == "random initialisation (pretrained weights not requested)"


def test_the_tiny_test_deit_has_its_own_shape_and_no_weights():
    model, _ = create_model(cait.TEST_MODEL, pretrained=False)
    assert (model.patch_embed.grid_size, model.embed_dim, len(model.blocks), model.num_classes) == ((8, 8), 48, 6, 10)
    assert PATCH_SIZES[cait.TEST_MODEL] == 4 and set(cait.DEIT_MODELS) < set(PATCH_SIZES)
    import timm
    with pytest.raises(ValueError, match="has no pretrained weights"):
        timm.create_model(cait.TEST_MODEL, pretrained=True)


def test_a_models_cfg_describes_it_after_a_change(tiny):
    model = update_cfg(tiny(), num_classes=3, input_size=(3, 48, 48))
    assert model.pretrained_cfg["num_classes"] == 3 and model.default_cfg is model.pretrained_cfg
    model.pretrained_cfg = {}
    with pytest.raises(ValueError, match="no pretrained_cfg"):
        architecture(model)
