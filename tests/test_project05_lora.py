"""Project 05's lora.py: LoRA adapters on a frozen GPT, checked against peft (Hugging Face's LoRA library)
on transformers' GPT-2. Offline: every model here is a tiny random one built in the test."""

import copy
import os

import peft
import pytest
import torch
from conftest import (
    TINY_HF,
    base_weights,
    load_project,
    logits_of,
    random_ids,
    randomize_adapters_,
    tiny_gpt,
    tiny_hf_model,
)
from safetensors import safe_open

PROJECT = "project05_lora"
P = load_project(PROJECT)
L = P.lora
HF_NAMES = {
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}


def test_fresh_adapter_leaves_the_model_unchanged():
    model = tiny_gpt(PROJECT)
    expected = logits_of(model)
    names = L.apply_lora(model, L.LoRAConfig(r=4))
    assert len(names) == 4 * TINY_HF["n_layer"]
    assert not any(m.training for m in model.modules())  # the new layers follow the model's eval()
    for layer in L.lora_layers(model):
        assert (
            torch.count_nonzero(layer.lora_B) == 0
            and torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
        )
    assert torch.equal(logits_of(model), expected)  # exactly: B = 0 makes the update an exact zero


def test_lora_linear_shares_the_base_weight_and_merges_in_float32():
    base = torch.nn.Linear(64, 48, dtype=torch.bfloat16)
    layer = L.LoRALinear(base, r=4, alpha=8.0)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (48, 4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    delta = layer.lora_B.float() @ layer.lora_A.float() * 2.0  # scaling = 8 / 4
    expected = (layer.weight.float() + delta).bfloat16()  # one rounding, to the nearest bf16
    layer.merge()
    assert torch.equal(layer.weight, expected)


def test_merged_equals_unmerged_and_unmerge_restores_the_base():
    model = tiny_gpt(PROJECT)
    before, base_logits = base_weights(model), logits_of(model)
    L.apply_lora(model, L.LoRAConfig(r=4))
    randomize_adapters_(model)
    unmerged = logits_of(model)
    assert (unmerged - base_logits).abs().max() > 1e-2  # the adapters do change the output
    L.merge_lora(model)
    assert all(layer.merged for layer in L.lora_layers(model))
    torch.testing.assert_close(logits_of(model), unmerged, atol=1e-5, rtol=0)
    L.merge_lora(model)  # a second merge is a no-op, not a second W += BA
    torch.testing.assert_close(logits_of(model), unmerged, atol=1e-5, rtol=0)
    L.unmerge_lora(model)
    for name, w in base_weights(model).items():
        torch.testing.assert_close(w, before[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits_of(model), unmerged, atol=1e-5, rtol=0)


def test_only_adapters_get_gradients_and_move():
    model = tiny_gpt(PROJECT).train()  # with the default adapter dropout active
    L.apply_lora(model, L.LoRAConfig())
    before = base_weights(model)
    # Every parameter goes to the optimizer, with weight decay: a frozen one must still not move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    idx = random_ids()
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    for layer in L.lora_layers(model):
        # With B = 0 the loss does not depend on A yet: the first step moves only B (Hu et al., section 4.1).
        assert torch.count_nonzero(layer.lora_A.grad) == 0 and torch.count_nonzero(layer.lora_B.grad) > 0
    B_before = [layer.lora_B.detach().clone() for layer in L.lora_layers(model)]
    optimizer.step()
    for name, w in base_weights(model).items():
        assert torch.equal(w, before[name]), name
    for layer, B in zip(L.lora_layers(model), B_before):
        assert not torch.equal(layer.lora_B, B)


def test_trainable_parameter_count_on_gpt2_small_shapes():
    def count(targets: tuple[str, ...]) -> tuple[int, int]:
        with torch.device("meta"):  # shapes only: nothing allocated
            model = P.model.GPT(P.model.GPTConfig())
            L.apply_lora(model, L.LoRAConfig(r=8, targets=targets))
        assert all(p.device.type == "meta" for p in model.parameters())
        return L.trainable_parameters(model), sum(p.numel() for p in model.parameters())

    assert count(("attn.qkv",))[0] == 12 * 8 * (768 + 3 * 768) == 294_912
    trainable, total = count(L.LoRAConfig().targets)
    assert trainable == 12 * 8 * (768 + 2304 + 768 + 768 + 768 + 3072 + 3072 + 768) == 1_179_648
    assert trainable / (total - trainable) < 0.01


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "targets", [("attn.qkv", "attn.proj"), ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
)
def test_matches_peft_on_transformers_gpt2(targets):
    hf_model = tiny_hf_model()
    config = P.hf.config_from_hf(hf_model.config.to_dict())
    ours = P.model.GPT(config)
    ours.load_state_dict(P.hf.state_dict_from_hf(hf_model.state_dict(), config))
    lora_config = L.LoRAConfig(r=4, alpha=12.0, dropout=0.0, targets=targets)
    L.apply_lora(ours, lora_config)
    randomize_adapters_(ours)
    # "c_proj" alone would also catch mlp.c_proj: a regex, which peft matches against full module names.
    pattern = r"transformer\.h\.\d+\.(" + "|".join(HF_NAMES[t].replace(".", r"\.") for t in targets) + ")"
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=12.0, lora_dropout=0.0, target_modules=pattern, fan_in_fan_out=True
    )
    peft_model = peft.get_peft_model(hf_model, peft_config).eval()
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, L.LoRALinear):
                _, i, target = name.split(".", 2)  # blocks.{i}.attn.qkv
                theirs = peft_model.base_model.model.get_submodule(f"transformer.h.{i}.{HF_NAMES[target]}")
                # peft keeps nn.Linear layouts even for GPT-2's transposed Conv1D: A (r, in), B (out, r).
                theirs.lora_A["default"].weight.copy_(layer.lora_A)
                theirs.lora_B["default"].weight.copy_(layer.lora_B)
        n_peft = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert n_peft == len(L.lora_layers(ours)) == len(targets) * config.n_layer
    assert L.trainable_parameters(ours) == peft_model.get_nb_trainable_parameters()[0]

    with torch.no_grad():
        diff = (logits_of(ours) - peft_model(random_ids()).logits).abs().max().item()
        assert diff < 1e-4
        merged_hf = peft_model.merge_and_unload()
        L.merge_and_unload(ours)
        diff = (logits_of(ours) - merged_hf(random_ids()).logits).abs().max().item()
        assert diff < 1e-4


def test_adapter_files_round_trip_and_refuse_other_bases(tmp_path):
    base = tiny_gpt(PROJECT, seed=0)
    model = copy.deepcopy(base)
    config = L.LoRAConfig(r=2, alpha=4.0, targets=("attn.qkv",))
    L.apply_lora(model, config)
    randomize_adapters_(model)
    assert L.base_fingerprint(model) == L.base_fingerprint(base)  # the adapters are not part of the base
    L.save_adapter(tmp_path, model, config, base={"checkpoint": "tiny"})
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]  # no temp files
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        assert set(f.keys()) == {f"blocks.{i}.attn.qkv.lora_{m}" for i in range(2) for m in "AB"}
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert (tmp_path / "adapter.safetensors").stat().st_size < base_bytes / 10

    fresh = copy.deepcopy(base)
    loaded, meta = L.load_adapter(tmp_path, fresh)
    assert loaded == config and meta["base"]["checkpoint"] == "tiny"
    assert torch.equal(logits_of(fresh), logits_of(model))

    other = tiny_gpt(PROJECT, seed=1)
    with pytest.raises(P.cli.UserError, match="different base model"):
        L.load_adapter(tmp_path, other)
    assert not L.lora_layers(other)  # refused before anything was changed

    data = (tmp_path / "adapter.safetensors").read_bytes()
    (tmp_path / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(P.cli.UserError, match="corrupt"):
        L.load_adapter(tmp_path, copy.deepcopy(base))
    with pytest.raises(P.cli.UserError, match="no adapter"):
        L.load_adapter(tmp_path / "missing", copy.deepcopy(base))


def test_fingerprint_sees_a_one_weight_change():
    model = tiny_gpt(PROJECT)
    fingerprint = L.base_fingerprint(model)
    with torch.no_grad():
        model.blocks[1].mlp.fc.bias[3] += 1e-6
    assert L.base_fingerprint(model) != fingerprint


@pytest.mark.parametrize("pattern", ["attn.qkvv", "kv", "lm_head", "wte"])
def test_bad_targets_are_refused(pattern):
    model = tiny_gpt(PROJECT)
    with pytest.raises(P.cli.UserError, match=pattern):
        L.apply_lora(model, L.LoRAConfig(targets=("attn.qkv", pattern)))
    assert not L.lora_layers(model)


def test_targets_match_whole_name_components():
    model = tiny_gpt(PROJECT)
    assert L.apply_lora(model, L.LoRAConfig(targets=("attn.proj",))) == [
        "blocks.0.attn.proj",
        "blocks.1.attn.proj",
    ]
    assert type(model.blocks[0].mlp.proj) is torch.nn.Linear
    names = L.apply_lora(tiny_gpt(PROJECT), L.LoRAConfig(targets=("proj",)))  # both kinds of proj, no other
    assert names == [f"blocks.{i}.{kind}.proj" for i in range(2) for kind in ("attn", "mlp")]


def test_merge_and_unload_gives_a_plain_gpt():
    model = tiny_gpt(PROJECT)
    L.apply_lora(model, L.LoRAConfig(r=4))
    randomize_adapters_(model)
    L.merge_lora(model)
    merged_logits = logits_of(model)
    plain = L.merge_and_unload(model)
    assert not L.lora_layers(plain) and not any("lora_" in k for k in plain.state_dict())
    torch.testing.assert_close(logits_of(plain), merged_logits, atol=1e-5, rtol=0)
    fresh = P.model.GPT(plain.config).eval()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(logits_of(fresh), logits_of(plain))
