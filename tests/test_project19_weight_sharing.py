"""Project 19's weight sharing: every sharing mode's parameter count is the formula's (at GPT-2 124M's shape
too); a shared model computes what an unshared model with copied blocks computes, and its one tensor's
gradient is the sum of the copies' gradients; the tie survives the checkpoint, .to() and the optimizer; a
repeated block sees different inputs on each run (one KV cache per run) and generation stays exact; bad
values end in one line; the benchmark reports every variant."""

import json

import pytest
import torch
from conftest import (
    assert_one_line_error,
    assert_same_weights,
    greedy_ids,
    hf_export_error,
    load_project,
    perturb_,
    read_report,
    run_main,
    tiny_trainer,
    train_with_and_without_ddp,
)
from safetensors import safe_open

P = load_project("project19_weight_sharing")
train_tiny = tiny_trainer("project19_weight_sharing")
SMALL = dict(vocab_size=300, block_size=32, n_layer=3, n_head=2, n_embd=32)  # 3 layers: shared by 3 uses
MODES = {
    "none": {},
    "all": {"share": "all"},
    "attn": {"share": "attn"},
    "mlp": {"share": "mlp"},
    "factorised": {"embd_dim": 8},
    "repeat": {"repeat": 2},
}


def gpt(seed: int = 0, **config):
    """A perturbed GPT of the SMALL shape (fresh models have zero biases and identity LayerNorms)."""
    torch.manual_seed(seed)
    model = P.model.GPT(P.model.GPTConfig(**{**SMALL, **config}))
    perturb_(model, seed)
    return model.eval()


def expected_params(c) -> tuple[int, int]:
    """(all parameters, those outside the embeddings) by the formula the README works through."""
    C, L, Vp = c.n_embd, c.n_layer, c.padded_vocab_size
    attn = 3 * C * C + 3 * C + C * C + C  # qkv and its projection, with biases
    mlp = 4 * C * C + 4 * C + 4 * C * C + C  # up to 4C and back down, with biases
    norms = 2 * 2 * C  # ln_1 and ln_2: a gain and a bias each
    blocks = {
        "none": L * (attn + mlp + norms),
        "all": attn + mlp + norms,
        "attn": attn + L * (mlp + norms),
        "mlp": mlp + L * (attn + norms),
    }[c.share]  # repeat runs the same blocks again: no parameters
    E = c.embd_dim or C
    embeddings = Vp * E + (E * C if c.embd_dim else 0) + c.block_size * C  # lm_head is wte: counted once
    non_embedding = blocks + 2 * C  # and ln_f
    return embeddings + non_embedding, non_embedding


@pytest.mark.parametrize("mode", MODES)
def test_each_sharing_modes_parameter_count_is_the_formulas(mode):
    model = gpt(**MODES[mode])
    assert (model.num_params(non_embedding=False), model.num_params()) == expected_params(model.config)
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in set(model.parameters()))


def test_gpt2_small_counts_and_its_tied_embedding():
    """GPT-2 124M's shape, on the meta device (no memory): the README's worked example, number for number."""
    counts = {}
    for mode, config in {**MODES, "factorised": {"embd_dim": 128}}.items():
        with torch.device("meta"):
            model = P.model.GPT(P.model.GPTConfig(**config))
        counts[mode] = model.num_params(non_embedding=False)
        assert (counts[mode], model.num_params()) == expected_params(model.config)
    assert counts == {
        "none": 124_475_904,
        "all": 46_509_312,
        "attn": 98_489_856,
        "mlp": 72_529_152,
        "factorised": 92_379_648,
        "repeat": 124_475_904,
    }
    # Press & Wolf's tying: lm_head is wte, so its 50,304 x 768 = 38.6M weights are stored once, not twice
    assert model.lm_head.weight is model.wte.weight and model.lm_head.weight.numel() == 38_633_472


@pytest.mark.parametrize("mode", ["all", "attn", "mlp"])
def test_cross_layer_sharing_equals_an_unshared_model_with_copied_blocks(mode):
    """state_dict() lists a shared tensor under every layer's name: an unshared model loads it as copies."""
    shared = gpt(**MODES[mode])
    copies = P.model.GPT(P.model.GPTConfig(**SMALL)).eval()
    copies.load_state_dict(shared.state_dict())
    assert copies.blocks[1].attn.qkv.weight is not copies.blocks[0].attn.qkv.weight  # really unshared
    idx = torch.randint(300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(shared(idx)[0], copies(idx)[0])


def repeat_as_copies(shared):
    """The unshared model of twice the depth whose blocks 2i and 2i+1 are copies of the repeated block i."""
    unrolled = P.model.GPT(P.model.GPTConfig(**{**SMALL, "n_layer": 2 * SMALL["n_layer"]})).eval()
    state = {}
    for name, tensor in shared.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            state[f"blocks.{2 * int(i)}.{rest}"] = state[f"blocks.{2 * int(i) + 1}.{rest}"] = tensor
        else:
            state[name] = tensor
    unrolled.load_state_dict(state)
    return unrolled


def test_blockwise_repeat_equals_an_unshared_model_twice_as_deep():
    shared = gpt(repeat=2)
    idx = torch.randint(300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(shared(idx)[0], repeat_as_copies(shared)(idx)[0], rtol=0, atol=0)


def test_the_factorised_embedding_is_the_product_of_its_factors_at_both_ends():
    """wte (V, E) times the projection (E -> C) is a V x C embedding: an unfactorised model holding that
    product computes the same logits, in and out (the output embedding is tied to both factors)."""
    factorised = gpt(embd_dim=8)
    full = P.model.GPT(P.model.GPTConfig(**SMALL)).eval()
    state = {k: v for k, v in factorised.state_dict().items() if k != "wte_proj.weight"}
    state["wte.weight"] = state["lm_head.weight"] = factorised.wte.weight @ factorised.wte_proj.weight.T
    full.load_state_dict(state)
    idx = torch.randint(300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(factorised(idx)[0], full(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["all", "attn", "mlp", "repeat"])
def test_a_shared_tensors_gradient_is_the_sum_of_every_uses_gradient(mode):
    shared = gpt(**MODES[mode]).train()
    copies = repeat_as_copies(shared) if mode == "repeat" else P.model.GPT(P.model.GPTConfig(**SMALL))
    if mode != "repeat":
        copies.load_state_dict(shared.state_dict())
    idx = torch.randint(300, (4, 33), generator=torch.Generator().manual_seed(2))
    for model in (shared, copies):
        model.train()(idx[:, :-1], idx[:, 1:])[1].backward()
    grads = {n: p.grad for n, p in copies.named_parameters()}
    checked = 0
    for name, p in shared.named_parameters():  # each shared Parameter once, under its first name
        if not name.startswith("blocks."):
            torch.testing.assert_close(p.grad, grads[name])
            continue
        _, i, rest = name.split(".", 2)
        if mode == "repeat":  # block i's two runs are the unrolled model's blocks 2i and 2i + 1
            uses = [f"blocks.{2 * int(i)}.{rest}", f"blocks.{2 * int(i) + 1}.{rest}"]
        else:  # every layer whose name reaches this very tensor (only its own, if unshared)
            names = [f"blocks.{j}.{rest}" for j in range(SMALL["n_layer"])]
            uses = [u for u in names if shared.get_parameter(u) is p]
        total = sum(grads[u] for u in uses)
        torch.testing.assert_close(p.grad, total, rtol=1e-4, atol=1e-6)
        checked += len(uses) > 1
    assert checked > 0  # some parameter really was used several times


def shared_tensors(model) -> int:
    """How many Parameters some module other than their first holder also uses (0 for an unshared model)."""
    holders = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders[p] = holders.get(p, 0) + 1
    return sum(1 for n in holders.values() if n > 1)


def test_the_tie_survives_save_load_to_and_the_optimizer_step(tmp_path):
    """The checkpoint stores each shared tensor once (safetensors refuses shared storage; save_model keeps
    one name and load_model fills it into the model, which the config builds shared again); .to() and an
    optimizer step keep the layers pointing at one tensor."""
    model = gpt(share="attn", repeat=2)
    P.checkpoint.save_checkpoint(tmp_path / "ck", model, {"tokenizer": {"type": "tiktoken"}, "training": {}})
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        stored = list(f.keys())
    assert sum(k.endswith("attn.qkv.weight") for k in stored) == 1  # once, not n_layer times
    assert sum(k.endswith("mlp.fc.weight") for k in stored) == SMALL["n_layer"]  # unshared: every layer's
    size = (tmp_path / "ck" / "model.safetensors").stat().st_size
    assert size < 4 * model.num_params(non_embedding=False) + 20_000  # each tensor once, plus the header
    loaded, _ = P.checkpoint.load_checkpoint(tmp_path / "ck")
    assert shared_tensors(loaded) == shared_tensors(model) > 0
    loaded = loaded.to(torch.float64)
    attn = [block.attn for block in loaded.blocks]
    assert all(a is attn[0] for a in attn) and loaded.lm_head.weight is loaded.wte.weight
    optimizer = P.train.make_optimizer(loaded, P.train.TrainConfig(), torch.device("cpu"))
    idx = torch.randint(300, (2, 33), generator=torch.Generator().manual_seed(3))
    before = attn[0].qkv.weight.detach().clone()
    loaded.train()(idx[:, :-1], idx[:, 1:])[1].backward()
    optimizer.step()
    assert not torch.equal(attn[0].qkv.weight, before)  # it trained
    assert all(block.attn.qkv.weight is attn[0].qkv.weight for block in loaded.blocks)
    assert len(optimizer.state) == len(list(loaded.parameters()))  # one Adam state per shared tensor


def test_a_repeated_block_needs_one_kv_cache_per_run_and_generation_stays_exact():
    """MobileLLM's repeat: the second run of a block sees the first run's output, so its keys and values
    differ; a KV cache keyed by block would hand the second run the first's. This model recomputes the window
    every step (no cache), so its greedy tokens are the unrolled model's, which has one block per run."""
    shared = gpt(repeat=2)
    seen = []
    hook = shared.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        shared(torch.tensor([[5, 7, 11, 13]]))
    hook.remove()
    assert len(seen) == 2  # block 0 ran twice in one forward pass
    C = SMALL["n_embd"]
    assert not torch.allclose(seen[0][..., C:], seen[1][..., C:])  # (k, v) of run 1 != (k, v) of run 2
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4]  # 24 + 16 > 32: slides
    tokens = [t.item() for t in shared.generate_stream(torch.tensor([prompt]), 16, temperature=0)]
    assert tokens == greedy_ids(repeat_as_copies(shared), prompt, 16) == greedy_ids(shared, prompt, 16)
    assert len(set(tokens)) > 1


def test_default_config_is_project07s_model():
    """No sharing by default: the same parameters, names and outputs as project 07 (test_golden.py pins them
    too)."""
    P07 = load_project("project07_mixed_precision")
    torch.manual_seed(0)
    ours = P.model.GPT(P.model.GPTConfig(**SMALL))
    torch.manual_seed(0)
    theirs = P07.model.GPT(P07.model.GPTConfig(**SMALL))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    assert P.train.flops_per_token(ours.config) == P07.train.flops_per_token(theirs.config)


def test_flops_follow_the_blocks_applied_not_the_blocks_stored():
    c = P.model.GPTConfig(**SMALL)
    flops = {m: P.train.flops_per_token(P.model.GPTConfig(**SMALL, **MODES[m])) for m in MODES}
    assert flops["all"] == flops["attn"] == flops["mlp"] == flops["none"]
    per_block = 6 * 12 * c.n_embd**2 + 12 * c.n_embd * c.block_size
    assert flops["repeat"] - flops["none"] == c.n_layer * per_block
    assert flops["factorised"] < flops["none"]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--share", "blocks"], "--share"),
        (["--repeat", "0"], "--repeat"),
        (["--embd-dim", "-1"], "--embd-dim"),
        (["--embd-dim", "32"], "embd_dim"),  # as wide as the tiny preset's n_embd: nothing to factorise
    ],
)
def test_bad_sharing_values_exit_2_with_one_line(flags, named, corpus_file, tmp_path, capsys):
    rc = train_tiny("--data", corpus_file, "--out", tmp_path / "run", *flags)
    assert named in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_with_a_bad_sharing_value_is_refused_in_one_line(tmp_path, capsys):
    P.checkpoint.save_checkpoint(tmp_path / "ck", gpt(), {"tokenizer": {"type": "tiktoken"}, "training": {}})
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["model"]["repeat"] = 0
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    rc = run_main(P.generate, "--checkpoint", tmp_path / "ck", "--device", "cpu")
    assert "repeat must be at least 1" in assert_one_line_error(capsys, rc)


def test_train_shares_from_flags_generates_and_keeps_the_sharing_on_resume(tiny_runs, tmp_path, capsys):
    data = tiny_runs.data("project19_weight_sharing")
    flags = ["--data", data, "--eval-interval", "2", "--eval-iters", "1", "--out", tmp_path / "run"]
    assert train_tiny(*flags, "--max-iters", "2", "--share", "mlp", "--embd-dim", "8", "--repeat", "2") == 0
    model, config = P.checkpoint.load_checkpoint(tmp_path / "run")
    assert (config["model"]["share"], config["model"]["embd_dim"], config["model"]["repeat"]) == ("mlp", 8, 2)
    assert model.blocks[1].mlp is model.blocks[0].mlp and len(model.applied_blocks()) == 4
    assert (
        run_main(P.generate, "--checkpoint", tmp_path / "run", "--max-new-tokens", "3", "--device", "cpu")
        == 0
    )
    rc = train_tiny(*flags, "--max-iters", "4", "--resume", "--share", "all")
    assert "--share" in assert_one_line_error(capsys, rc)
    assert train_tiny(*flags, "--max-iters", "3", "--resume") == 0  # the recorded sharing, resumed


def test_hf_export_writes_shared_layers_as_copies_and_refuses_what_gpt2_cannot_hold(tmp_path, capsys):
    shared = gpt(share="all")
    P.hf.save_hf_dir(shared, tmp_path / "hf")
    unshared = P.hf.load_hf_dir(tmp_path / "hf")  # GPT-2's format: one copy of the block per layer
    assert unshared.config.share == "none"
    idx = torch.randint(300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(unshared(idx)[0], shared(idx)[0], rtol=0, atol=0)
    assert "factorised embedding" in hf_export_error(P, gpt(embd_dim=8), tmp_path, capsys)


def test_benchmark_reports_every_variant(tiny_runs, tmp_path):
    data = tiny_runs.data("project19_weight_sharing")
    flags = ["--preset", "tiny", "--data", data, "--steps", "2", "--repeats", "1", "--device", "cpu"]
    assert run_main(P.benchmark, *flags, "--out", tmp_path) == 0
    rows = read_report(tmp_path, "project19_weight_sharing")
    mc, _ = P.train.PRESETS["tiny"]
    block = 12 * mc.n_embd**2 + 13 * mc.n_embd
    for name, config in P.benchmark.variants(mc, 8).items():
        with torch.device("meta"):
            model = P.model.GPT(config)
        assert rows[("params", name)]["value"] == model.num_params(non_embedding=False)
        assert rows[("val_loss", name)]["value"] > 0 and rows[("train_tok_per_s", name)]["value"] > 0
    # ALBERT's all-shared model keeps 1 of the n_layer blocks (and ln_f)
    expected = (block + 2 * mc.n_embd) / (mc.n_layer * block + 2 * mc.n_embd)
    assert rows[("non_embedding_params", "all-shared")]["ratio"] == pytest.approx(expected)
    assert (
        rows[("params", "repeat x2")]["ratio"] == 1
        and rows[("forward_flops_per_token", "repeat x2")]["ratio"] > 1
    )
    assert rows[("checkpoint_mib", "factorised")]["ratio"] < 0.5  # the 50,304-row embedding, 8 wide not 32
    assert next(tmp_path.glob("params_vs_perplexity-*-tiny.png")).read_bytes()[:4] == b"\x89PNG"


def test_ddp_keeps_a_shared_model_shared_and_equal_to_one_process(corpus_file, tiktoken_cache, tmp_path):
    """test_training_line.py's DDP check, on a model with every kind of sharing: DDP's gradient hook fires
    once per shared tensor, after every use has added to its gradient, so two gloo processes end with one
    process's weights, still tied."""
    flags = ["--preset", "tiny", "--data", str(corpus_file), "--max-iters", "3", "--eval-interval", "3",
             "--eval-iters", "1", "--device", "cpu", "--total-batch-tokens", "512",
             "--share", "attn", "--embd-dim", "8", "--repeat", "2"]  # fmt: skip
    ddp, single = train_with_and_without_ddp(P, flags, tmp_path, tiktoken_cache)
    assert_same_weights(ddp, single)
    assert all(block.attn is ddp.blocks[0].attn for block in ddp.blocks)
