"""Model presets build, run, and survive save_pretrained / from_pretrained unchanged."""

from __future__ import annotations

import pytest
import torch

from atkd_core.config import ModelConfig
from atkd_core.models.build import build_model, count_parameters, load_model, save_model
from atkd_core.models.presets import ARCHITECTURES, PRESETS
from tests.atkd_core.data.test_tokenizer import _tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_preset_builds_saves_and_loads(arch, tokenizer, tmp_path):
    model = build_model(ModelConfig(preset=f"{arch}-tiny"), tokenizer).eval()
    ids = torch.tensor([tokenizer("What is 1 + 2?", add_special_tokens=False)["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    save_model(model, tokenizer, tmp_path / arch)
    assert (tmp_path / arch / "model.safetensors").is_file()
    reloaded = load_model(tmp_path / arch).eval()
    torch.testing.assert_close(reloaded(ids).logits, logits)


def test_init_is_seeded_and_sizes_grow(tokenizer):
    a = build_model(ModelConfig(preset="neox-tiny", init_seed=3), tokenizer)
    b = build_model(ModelConfig(preset="neox-tiny", init_seed=3), tokenizer)
    c = build_model(ModelConfig(preset="neox-tiny", init_seed=4), tokenizer)
    first = next(a.parameters())
    assert torch.equal(first, next(b.parameters()))
    assert not torch.equal(first, next(c.parameters()))
    sizes = [
        count_parameters(build_model(ModelConfig(preset=f"neox-{s}"), tokenizer))
        for s in ("tiny", "small", "medium")
    ]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_every_preset_name_is_a_valid_config_and_an_unknown_one_is_refused():
    assert all(ModelConfig(preset=name).preset == name for name in PRESETS)
    with pytest.raises(ValueError, match="preset 'neox-huge' is unknown; allowed: .*neox-tiny"):
        ModelConfig(preset="neox-huge")
