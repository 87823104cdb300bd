"""Project 03's hf.py: GPT-2 weights in Hugging Face's format, both ways, checked against transformers'
own GPT2LMHeadModel on logits. Offline: every HF model here is a tiny random one built in the test."""

import json

import pytest
import torch
import transformers
from conftest import TINY_HF, load_project, random_ids, tiny_gpt, tiny_hf_model

P = load_project("project03_pretrain")
TOL = 1e-4  # max abs logit difference; both sides compute in float32


@torch.no_grad()
def max_logit_diff(ours, hf_model) -> float:
    idx = random_ids()
    logits, _ = ours.eval()(idx)  # (B, T, V)
    return (logits - hf_model.eval()(idx).logits).abs().max().item()


def ours_from_hf(hf_model, flash: bool = True):
    config = P.hf.config_from_hf(hf_model.config.to_dict())
    config.flash = flash
    model = P.model.GPT(config)
    model.load_state_dict(P.hf.state_dict_from_hf(hf_model.state_dict(), config))  # strict
    return model


@pytest.mark.parametrize("flash", [True, False])
def test_hf_weights_give_hf_logits(flash):
    hf_model = tiny_hf_model()
    assert max_logit_diff(ours_from_hf(hf_model, flash), hf_model) < TOL


def test_openai_key_layout_loads():
    """OpenAI's own files have no "transformer." prefix and carry the attention mask buffers."""
    hf_model = tiny_hf_model()
    hf_sd = hf_model.transformer.state_dict()  # GPT2Model: h.0.attn.c_attn.weight, wte.weight, ...
    for i in range(TINY_HF["n_layer"]):
        hf_sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        hf_sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    config = P.hf.config_from_hf(hf_model.config.to_dict())
    ours = P.model.GPT(config)
    ours.load_state_dict(P.hf.state_dict_from_hf(hf_sd, config))
    assert max_logit_diff(ours, hf_model) < TOL


def test_our_weights_give_our_logits_in_transformers():
    ours = tiny_gpt("project03_pretrain")
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**P.hf.config_to_hf(ours.config)))
    hf_model.load_state_dict(P.hf.state_dict_to_hf(ours), strict=True)
    assert hf_model.transformer.wte.weight.shape == (100, 32)  # the padding rows stay behind
    assert max_logit_diff(ours, hf_model) < TOL


def test_save_hf_dir_loads_with_from_pretrained(tmp_path):
    ours = tiny_gpt("project03_pretrain")
    P.hf.save_hf_dir(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    hf_model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_logit_diff(ours, hf_model) < TOL
    # ...and back: the round trip through the file is exact.
    again = P.hf.load_hf_dir(tmp_path)
    for name, w in ours.state_dict().items():
        expected = w[:100] if name in ("wte.weight", "lm_head.weight") else w
        assert torch.equal(again.state_dict()[name][: len(expected)], expected), name


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_hf_dir(tmp_path, fmt):
    hf_model = tiny_hf_model(seed=3)
    if fmt == "safetensors":
        hf_model.save_pretrained(tmp_path)  # transformers' own writer
        assert (tmp_path / "model.safetensors").exists()
    else:  # an older checkpoint: a pickled state dict, which load_hf_dir reads with weights_only=True
        hf_model.config.to_json_file(tmp_path / "config.json")
        torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    assert max_logit_diff(P.hf.load_hf_dir(tmp_path), hf_model) < TOL
    assert max_logit_diff(P.hf.load_gpt2(str(tmp_path)), hf_model) < TOL  # a local folder: no download


def test_vocab_padding():
    ours = ours_from_hf(tiny_hf_model())
    assert ours.config.padded_vocab_size == 128
    assert ours.wte.weight.shape == (128, 32)
    assert ours.lm_head.weight is ours.wte.weight  # still tied after load_state_dict
    assert torch.count_nonzero(ours.wte.weight[100:]) == 0
    assert torch.count_nonzero(ours.wte.weight[:100]) == 100 * 32
    logits, _ = ours(random_ids())
    assert logits.shape == (3, 64, 100)


@pytest.mark.parametrize(
    "field, value",
    [
        ("activation_function", "relu"),
        ("activation_function", "gelu"),  # the exact erf GELU: close to ours, but not equal
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("layer_norm_epsilon", 1e-6),
        ("n_inner", 64),
        ("scale_attn_weights", False),
        ("tie_word_embeddings", False),
        ("add_cross_attention", True),
        ("model_type", "gpt_neo"),
    ],
)
def test_unsupported_config_is_refused(field, value):
    hf_config = tiny_hf_model().config.to_dict()
    P.hf.config_from_hf(hf_config)  # accepted as it is
    with pytest.raises(ValueError, match=field):
        P.hf.config_from_hf({**hf_config, field: value})


def test_supported_variants_are_accepted():
    hf_config = tiny_hf_model().config.to_dict()
    for variant in ({"activation_function": "gelu_pytorch_tanh"}, {"n_inner": 4 * 32}):
        assert P.hf.config_from_hf({**hf_config, **variant}).n_embd == 32


def test_bad_weights_are_refused(tmp_path):
    hf_model = tiny_hf_model()
    config = P.hf.config_from_hf(hf_model.config.to_dict())
    hf_sd = dict(hf_model.state_dict())
    with pytest.raises(ValueError, match="lm_head"):  # an untied output layer cannot be represented
        P.hf.state_dict_from_hf({**hf_sd, "lm_head.weight": hf_sd["lm_head.weight"] + 1}, config)
    with pytest.raises(ValueError, match="wte"):
        P.hf.state_dict_from_hf({**hf_sd, "transformer.wte.weight": torch.zeros(99, 32)}, config)
    with pytest.raises(ValueError, match="config.json"):  # an empty folder
        P.hf.load_hf_dir(tmp_path)
    with pytest.raises(P.cli.UserError, match="gpt2-medium"):  # neither a folder nor a GPT-2 name
        P.hf.load_gpt2("gpt3")


def test_gpt2_small_parameter_count():
    """GPT-2 small's published config.json gives the published 124,439,808 parameters plus our padding."""
    published = {
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-05,
        "n_ctx": 1024,
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "n_positions": 1024,
        "vocab_size": 50257,
    }
    config = P.hf.config_from_hf(published)
    assert (config.block_size, config.n_layer, config.n_head, config.n_embd) == (1024, 12, 12, 768)
    assert config.padded_vocab_size == 50304
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        model = P.model.GPT(config)
    assert model.num_params(non_embedding=False) == 124_439_808 + (50304 - 50257) * 768
