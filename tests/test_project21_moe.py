"""Project 21's mixture of experts: with unlimited capacity the layer computes the naive gate-weighted sum
of the chosen experts, token by token; one expert is the dense MLP; the grouped GEMM equals the loop over
experts; the balancing loss is Switch's formula (alpha under uniform routing) and the z-loss ST-MoE's; tokens
over capacity come out as their residual; the counts the layer reports are the router's choices; a collapsed
router is flagged by the benchmark's load metrics; the bias of aux-loss-free balancing steers choices, not
gates; train.py trains (with DDP too), resumes and refuses bad values in one line; hf.py refuses; the
benchmark reports."""

import json

import pytest
import torch
from conftest import (
    assert_one_line_error,
    assert_same_weights,
    hf_export_error,
    load_project,
    perturb_,
    read_report,
    run_main,
    tiny_trainer,
    train_with_and_without_ddp,
)

P = load_project("project21_moe")
train_tiny = tiny_trainer("project21_moe")
SMALL = dict(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32)


def config(**moe):
    return P.model.GPTConfig(**{**SMALL, "n_expert": 4, **moe})


def layer(seed: int = 0, **moe):
    """A perturbed MoE layer (zero biases would hide a bias mix-up) of the SMALL width, in eval mode."""
    torch.manual_seed(seed)
    m = P.moe.MoE(config(**moe))
    perturb_(m, seed)
    return m.eval()


def tokens(seed: int = 1, B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randn(B, T, SMALL["n_embd"], generator=torch.Generator().manual_seed(seed))  # (B, T, C)


def expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on one token, written out: the dense MLP's formula with the e-th slice of every weight."""
    h = torch.nn.functional.gelu(x @ experts.w_fc[e] + experts.b_fc[e], approximate="tanh")
    return h @ experts.w_proj[e] + experts.b_proj[e]


def naive(m, x: torch.Tensor, capacity: int | None = None, choice_major: bool = True) -> torch.Tensor:
    """Choice by choice, token by token: sum of gate x expert over the chosen experts. With a capacity, an
    expert takes the first `capacity` (choice, token) slots, every first choice in token order before any
    second choice (GShard), and the rest add nothing; choice_major=False: token order alone."""
    flat = x.reshape(-1, x.size(-1))
    ids, gates, _, _ = m.router(flat)
    out, taken = torch.zeros_like(flat), [0] * m.n_expert
    slots = [(n, j) for j in range(m.top_k) for n in range(len(flat))]
    for n, j in slots if choice_major else sorted(slots):
        e = ids[n, j].item()
        taken[e] += 1
        if capacity is None or taken[e] <= capacity:
            out[n] += gates[n, j] * expert(m.experts, e, flat[n])
    if m.shared is not None:
        for n in range(len(flat)):
            out[n] += expert(m.shared, 0, flat[n])
    return out.view_as(x)


@pytest.mark.parametrize("moe", [{"top_k": 1}, {"top_k": 2}, {"top_k": 2, "n_shared_expert": 1}])
def test_dropless_output_is_the_naive_weighted_sum_of_the_chosen_experts(moe):
    m, x = layer(**moe), tokens()
    with torch.no_grad():
        torch.testing.assert_close(m(x), naive(m, x), rtol=1e-5, atol=1e-5)


def test_the_gates_are_switchs_p_for_top1_and_mixtrals_renormalised_pair_for_top2():
    x = tokens().view(-1, SMALL["n_embd"])
    for k in (1, 2):
        ids, gates, probs, logits = layer(top_k=k).router(x)
        assert torch.equal(ids, probs.topk(k).indices) and logits.dtype == torch.float32
        expected = probs.gather(-1, ids)
        torch.testing.assert_close(gates, expected if k == 1 else expected / expected.sum(-1, keepdim=True))


def test_one_expert_is_the_dense_mlp():
    """n_expert = 1, top-1: the router's softmax over one expert is 1, so the model is project 07's with the
    expert's weights (transposed: stacked (E, C, H) against nn.Linear's (H, C))."""
    torch.manual_seed(0)
    moe = P.model.GPT(config(n_expert=1, top_k=1))
    perturb_(moe, 0)
    dense = P.model.GPT(P.model.GPTConfig(**SMALL))
    state = {k: v for k, v in moe.state_dict().items() if ".mlp." not in k}
    for i, block in enumerate(moe.blocks):
        ex = block.mlp.experts
        dense_names = ("fc.weight", "fc.bias", "proj.weight", "proj.bias")
        weights = (ex.w_fc[0].T, ex.b_fc[0], ex.w_proj[0].T, ex.b_proj[0])
        state |= {f"blocks.{i}.mlp.{n}": w for n, w in zip(dense_names, weights, strict=True)}
    dense.load_state_dict(state)
    idx = torch.randint(300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(idx)[0], dense.eval()(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.75])
def test_grouped_mm_equals_the_loop_over_experts_forward_and_backward(capacity_factor):
    """torch's grouped GEMM (its CPU implementation here; CUTLASS on sm90 GPUs, not run in this suite)
    against the loop over contiguous slices, with an expert that gets no token, dropless and with drops."""
    results = []
    for grouped in (False, True):
        m = layer(top_k=2, capacity_factor=capacity_factor).train()
        m.router.expert_bias[3] = -10.0  # expert 3 is never chosen: an empty slice
        m.grouped = grouped
        x = tokens().requires_grad_()
        (m(x) * tokens(seed=2)).sum().backward()
        assert m.counts[3] == 0
        results.append([x.grad, *(p.grad for p in m.parameters())])
    for loop, grouped in zip(*results, strict=True):
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grouped", [False, True])
def test_under_bf16_autocast_the_router_stays_fp32_and_the_experts_run_in_bf16(grouped):
    m, x = layer(top_k=2), tokens()
    m.grouped = grouped
    with torch.no_grad():
        reference = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m.router(x.view(-1, 32))[3]
            out = m(x)
    assert logits.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)  # bf16's 8 bits, not exact
    assert not torch.equal(out, reference)  # the experts did run in bf16


def balance_by_hand(probs: torch.Tensor, ids: torch.Tensor, E: int) -> float:
    """Switch's E * sum_i f_i P_i with explicit loops: f_i the share of slots choosing i, P_i the mean
    probability of i."""
    slots = [e for row in ids.tolist() for e in row]
    f = [slots.count(i) / len(slots) for i in range(E)]
    P_ = [sum(p[i] for p in probs.tolist()) / len(probs) for i in range(E)]
    return E * sum(fi * pi for fi, pi in zip(f, P_, strict=True))


def test_balance_loss_is_switchs_formula_and_alpha_under_uniform_routing():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    ids = torch.tensor([[0, 1], [0, 1], [3, 2]])
    assert P.moe.balance_loss(probs, ids, 4).item() == pytest.approx(balance_by_hand(probs, ids, 4))
    uniform, spread = torch.full((8, 4), 0.25), torch.arange(16).view(8, 2) % 4  # each expert 4 of 16 slots
    assert P.moe.balance_loss(uniform, spread, 4).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 8)
    assert P.moe.balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), 4).item() == pytest.approx(4.0)
    # the layer weighs it by alpha (Switch: 0.01): with uniform probabilities, E * sum_i f_i / E = 1 whatever
    # the choices, so the loss is alpha itself
    m = layer(top_k=2, aux_loss_alpha=0.01)
    m.router.gate.weight.data.zero_()  # every probability 1/E
    with torch.no_grad():
        m(tokens())
    ids = m.router(tokens().view(-1, 32))[0]
    assert m.aux["balance"].item() == pytest.approx(0.01 * balance_by_hand(torch.full((32, 4), 0.25), ids, 4))
    assert m.aux["balance"].item() == pytest.approx(0.01)
    m = layer(top_k=2, aux_loss_alpha=0.01)  # a real router: the layer's loss is alpha x the formula
    with torch.no_grad():
        m(tokens())
    ids, _, probs, _ = m.router(tokens().view(-1, 32))
    assert m.aux["balance"].item() == pytest.approx(0.01 * balance_by_hand(probs, ids, 4))
    assert m.aux["balance"].item() > 0.01  # a random router is not balanced


def test_z_loss_is_the_mean_squared_logsumexp():
    m = layer(z_loss_coef=0.001)
    with torch.no_grad():
        m(tokens())
    logits = m.router(tokens().view(-1, 32))[3]
    by_hand = sum(torch.log(torch.exp(row).sum()) ** 2 for row in logits) / len(logits)
    assert m.aux["z"].item() == pytest.approx(0.001 * by_hand.item(), rel=1e-5)


def test_tokens_over_capacity_come_out_as_their_residual():
    """Capacity factor 0.5: each expert takes ceil(0.5 * N k / E) slots, first come first served; a token
    all of whose choices were dropped gets nothing from the layer, so its block passes on the residual."""
    torch.manual_seed(0)
    model = P.model.GPT(config(top_k=1, capacity_factor=0.5))
    perturb_(model, 0)
    block, m = model.blocks[0].eval(), model.blocks[0].mlp
    x = tokens()
    assert m.capacity(32) == 4
    with torch.no_grad():
        h = x + block.attn(block.ln_1(x))  # the residual stream entering the MoE branch
        out = m(block.ln_2(h))
        torch.testing.assert_close(out, naive(m, block.ln_2(h), capacity=4), rtol=1e-5, atol=1e-5)
        dropped = out.abs().sum(-1) == 0  # (B, T)
        assert 0 < dropped.sum() < 32 - 4  # some dropped, at most 4 per expert kept
        assert torch.equal(block(x)[dropped], h[dropped])  # exactly the residual
        assert not torch.allclose(block(x)[~dropped], h[~dropped])


def test_over_capacity_an_expert_takes_first_choices_before_second_choices():
    """Top-2 with drops: GShard's priority, every token's first choice before any token's second, so a later
    token's first choice is never dropped to make room for an earlier token's second choice."""
    m, x = layer(top_k=2, capacity_factor=0.5), tokens()
    with torch.no_grad():
        out = m(x)
        torch.testing.assert_close(out, naive(m, x, capacity=m.capacity(32)), rtol=1e-5, atol=1e-5)
        token_order = naive(m, x, capacity=m.capacity(32), choice_major=False)
    assert not torch.allclose(out, token_order, rtol=1e-5, atol=1e-5)  # the two priorities differ here


def test_the_counts_the_layer_reports_are_the_routers_choices():
    m = layer(top_k=2, capacity_factor=0.5)  # dropped slots are counted too: the load the router asked for
    x = tokens(seed=3)
    with torch.no_grad():
        m(x)
    ids = m.router(x.view(-1, 32))[0]
    assert m.counts.tolist() == torch.bincount(ids.flatten(), minlength=4).tolist()
    assert m.counts.sum() == 32 * 2


def test_a_collapsed_router_is_flagged_by_the_benchmarks_load_metrics():
    m = layer(top_k=1)
    x = tokens() + 3.0  # a shared direction that expert 0's row points along
    m.router.gate.weight.data[0] = 10.0
    with torch.no_grad():
        m(x)
    assert m.counts.tolist() == [32, 0, 0, 0]
    stats = P.benchmark.load_stats(m.counts[None])
    assert stats == {"max_over_mean": 4.0, "dead": 3, "collapsed": True}
    balanced = P.benchmark.load_stats(torch.tensor([[9, 8, 8, 7], [8, 8, 8, 8]]))
    assert balanced["max_over_mean"] == pytest.approx(9 / 8) and not balanced["collapsed"]


def test_bias_balancing_steers_the_choice_not_the_gates():
    """DeepSeek-V3: the bias is added for choosing experts only; the rule lowers an overloaded expert's bias
    and raises an underloaded one's, only while training."""
    m = layer(top_k=2, bias_update=0.1)
    x = tokens()
    plain_ids, _, probs, _ = m.router(x.view(-1, 32))
    m.router.expert_bias.copy_(torch.tensor([5.0, 0, 0, 0]))  # expert 0 always chosen
    ids, gates, probs_b, _ = m.router(x.view(-1, 32))
    assert (ids == 0).any(-1).all() and not torch.equal(ids, plain_ids)
    torch.testing.assert_close(probs_b, probs)  # the probabilities know nothing of the bias
    chosen = probs.gather(-1, ids)
    torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))
    with torch.no_grad():
        m.train()(x)  # the forward pass leaves the bias alone: train_step updates it once per step
    assert m.router.expert_bias.tolist() == [5.0, 0, 0, 0]
    m.router.update_bias(m.counts)
    counts = m.counts.float()
    step = 0.1 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(m.router.expert_bias, torch.tensor([5.0, 0, 0, 0]) + step)
    assert m.router.expert_bias[0] < 5.0 and (step[1:] >= 0).all()  # overloaded: lowered; others not


def test_default_config_is_project07s_model_and_flops_count_active_experts():
    P07 = load_project("project07_mixed_precision")
    torch.manual_seed(0)
    ours = P.model.GPT(P.model.GPTConfig(**SMALL))
    torch.manual_seed(0)
    theirs = P07.model.GPT(P07.model.GPTConfig(**SMALL))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    dense = P.train.flops_per_token(ours.config)
    assert dense == P07.train.flops_per_token(theirs.config)
    router = 6 * SMALL["n_layer"] * SMALL["n_embd"] * 8  # C x E, 6 FLOPs a weight
    for k in (1, 2):  # expert width 4 C / k: k experts hold the dense MLP's weights
        moe = P.model.GPT(config(n_expert=8, top_k=k))
        assert P.train.flops_per_token(moe.config) == dense + router
        experts = sum(p.numel() for b in moe.blocks for p in b.mlp.experts.parameters())
        assert moe.num_active_params() == moe.num_params() - experts * (8 - k) // 8
        # the router's C x E, and k output biases of C where the dense MLP has one
        assert moe.num_active_params() - ours.num_params() == SMALL["n_layer"] * (32 * 8 + (k - 1) * 32)


def test_a_moe_checkpoint_round_trips_with_its_bias(tmp_path):
    torch.manual_seed(0)
    model = P.model.GPT(config(top_k=2, bias_update=1e-3, n_shared_expert=1))
    perturb_(model, 0)
    model.blocks[1].mlp.router.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))
    P.checkpoint.save_checkpoint(tmp_path / "ck", model, {"tokenizer": {"type": "tiktoken"}, "training": {}})
    loaded, _ = P.checkpoint.load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.blocks[1].mlp.router.expert_bias, model.blocks[1].mlp.router.expert_bias)
    idx = torch.randint(300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx)[0], model.eval()(idx)[0])


def test_train_routes_from_flags_logs_the_router_and_keeps_the_experts_on_resume(tiny_runs, tmp_path, capsys):
    data = tiny_runs.data("project21_moe")
    flags = ["--data", data, "--eval-interval", "2", "--eval-iters", "1", "--out", tmp_path / "run"]
    moe = ["--n-expert", "4", "--top-k", "1", "--capacity-factor", "1.25", "--bias-update", "0.001"]
    assert train_tiny(*flags, "--max-iters", "2", *moe) == 0
    model, config = P.checkpoint.load_checkpoint(tmp_path / "run")
    assert (config["model"]["n_expert"], config["model"]["top_k"], config["model"]["capacity_factor"]) == (
        4,
        1,
        1.25,
    )
    assert isinstance(model.blocks[0].mlp, P.moe.MoE)
    assert model.blocks[0].mlp.router.expert_bias.abs().sum() > 0  # the rule moved it while training
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [s for s in steps if "loss" in s]
    assert all(s["balance_loss"] > 0 and s["z_loss"] > 0 and s["max_load_over_mean"] >= 1 for s in logged)
    assert (
        run_main(P.generate, "--checkpoint", tmp_path / "run", "--max-new-tokens", "3", "--device", "cpu")
        == 0
    )
    capsys.readouterr()
    rc = train_tiny(*flags, "--max-iters", "4", "--resume", "--top-k", "2")
    assert "--top-k" in assert_one_line_error(capsys, rc)
    assert train_tiny(*flags, "--max-iters", "3", "--resume") == 0  # the recorded experts, resumed


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--n-expert", "4", "--top-k", "5"], "top_k"),
        (["--n-expert", "-1"], "--n-expert"),
        (["--capacity-factor", "-1"], "--capacity-factor"),
        (["--top-k", "0"], "--top-k"),
        (["--n-expert", "4", "--top-k", "4", "--n-shared-expert", "200"], "expert width"),  # 4 C // 204 = 0
    ],
)
def test_bad_expert_values_exit_2_with_one_line(flags, named, corpus_file, tmp_path, capsys):
    rc = train_tiny("--data", corpus_file, "--out", tmp_path / "run", *flags)
    assert named in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--top-k", "1"], ["--n-shared-expert", "1", "--bias-update", "0.001"]])
def test_expert_flags_without_experts_exit_2_with_one_line(flags, corpus_file, tmp_path, capsys):
    """--top-k and the like on the dense model (no --n-expert) would change nothing: refused, not ignored."""
    rc = train_tiny("--data", corpus_file, "--out", tmp_path / "run", "--max-iters", "1", *flags)
    assert "--n-expert" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "run").exists()


def test_the_experts_stacked_biases_are_not_weight_decayed():
    """make_optimizer decays matrices, not biases; an expert's biases are stacked into 2-D tensors (E, H) and
    (E, C), and must stay undecayed like the dense MLP's 1-D ones (else the comparison differs in more)."""
    model = P.model.GPT(config(top_k=2, n_shared_expert=1))
    _, tc = P.train.PRESETS["tiny"]
    decayed, plain = P.train.make_optimizer(model, tc, torch.device("cpu")).param_groups
    assert decayed["weight_decay"] > 0 and plain["weight_decay"] == 0
    name = {id(p): n for n, p in model.named_parameters()}
    biases = {n for n in name.values() if n.endswith(("b_fc", "b_proj"))}
    assert len(biases) == 2 * 2 * SMALL["n_layer"]  # routed and shared experts, two biases each, per layer
    assert biases <= {name[id(p)] for p in plain["params"]}
    assert not biases & {name[id(p)] for p in decayed["params"]}
    assert {n for n in name.values() if n.endswith(("w_fc", "w_proj"))} <= {
        name[id(p)] for p in decayed["params"]
    }


def test_hf_export_refuses_a_mixture_of_experts_in_one_line(tmp_path, capsys):
    assert "mixture of experts" in hf_export_error(P, P.model.GPT(config()), tmp_path, capsys)


def test_benchmark_reports_every_variant(tiny_runs, tmp_path):
    data = tiny_runs.data("project21_moe")
    flags = ["--preset", "tiny", "--data", data, "--steps", "3", "--repeats", "1", "--device", "cpu"]
    assert run_main(P.benchmark, *flags, "--out", tmp_path) == 0
    rows = read_report(tmp_path, "project21_moe")
    mc, _ = P.train.PRESETS["tiny"]
    for name, c in P.benchmark.variants(mc).items():
        assert rows[("val_loss", name)]["value"] > 0 and rows[("train_tok_per_s", name)]["value"] > 0
        with torch.device("meta"):
            assert rows[("active_params", name)]["value"] == P.model.GPT(c).num_active_params()
        if name != "dense":  # equal active parameters: the router's C x E per layer more
            assert rows[("params", name)]["ratio"] > 1 and rows[("active_params", name)]["ratio"] < 1.01
            assert rows[("max_over_mean_load", name)]["value"] >= 1
    assert rows[("forward_ms", "grouped_mm")]["value"] > 0
    assert next(tmp_path.glob("moe_training-*-tiny.png")).read_bytes()[:4] == b"\x89PNG"


def test_ddp_trains_a_mixture_as_one_process_does_biases_included(corpus_file, tiktoken_cache, tmp_path):
    """test_training_line.py's DDP check on a Switch model with capacity drops and bias balancing: the
    auxiliary losses' gradients average like the loss's, and the bias rule runs on the whole step's load
    (all-reduced), so two gloo processes end with one process's weights and biases."""
    flags = ["--preset", "tiny", "--data", str(corpus_file), "--max-iters", "3", "--eval-interval", "3",
             "--eval-iters", "1", "--device", "cpu", "--total-batch-tokens", "512", "--n-expert", "4",
             "--top-k", "1", "--capacity-factor", "1.5", "--bias-update", "0.01"]  # fmt: skip
    ddp, single = train_with_and_without_ddp(P, flags, tmp_path, tiktoken_cache)
    assert_same_weights(ddp, single)
    assert single.blocks[0].mlp.router.expert_bias.abs().sum() > 0
