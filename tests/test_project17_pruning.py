"""Project 17's pruning: exact sparsity per layer (per row for Wanda, per group for N:M) in every Linear of
every block, qkv included; Wanda's scores against |W| times the input norms computed directly; SparseGPT
against the slow column-by-column OBS algorithm, and against magnitude when no input is correlated; on one
layer with the same calibration data, SparseGPT's reconstruction error below Wanda's below magnitude's; the
joint sparse + int4 grid; a structured-pruned model equal to the full model with the same heads and
channels masked, with its KV cache; recovery that keeps pruned weights at exactly zero; prune.py ->
generate.py end to end, with its bad-input exits."""

import copy
import json

import pytest
import torch
from conftest import assert_one_line_error, greedy_ids, load_project, printed, read_report, run_main, tiny_gpt

PROJECT = "project17_pruning"
P = load_project(PROJECT)
R = P.pruning
PATTERNS = [
    R.Sparsity(0.5),
    R.Sparsity(0.3),
    R.Sparsity(0.5, 2, 4),
    R.Sparsity(0.5, 4, 8),
    R.Sparsity(0.25, 3, 4),
]


def _model_and_calibration(seed=0):
    model = tiny_gpt(PROJECT, seed=seed, vocab_size=100, block_size=32, n_embd=32, n_head=4)
    return model, torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", R.METHODS)
@pytest.mark.parametrize("sp", PATTERNS, ids=str)
def test_every_linear_of_every_block_gets_exactly_the_sparsity_asked(method, sp):
    """Including the fused qkv projection (Wanda's released code skips GPT-2's Conv1D layers). Magnitude
    counts per layer, Wanda per output row, SparseGPT per block of columns (one block here); N:M in every
    group of M inputs of every row."""
    model, calibration = _model_and_calibration()
    R.prune_model(model, method, sp, calibration)
    names = [name for name, _ in R.block_linears(model)]
    assert len(names) == 4 * model.config.n_layer and "0.attn.qkv" in names
    for name, linear in R.block_linears(model):
        zero = linear.weight == 0  # (N, K)
        N, K = zero.shape
        if sp.m:
            per_group = zero.view(N, K // sp.m, sp.m).sum(-1)
            assert (per_group == sp.m - sp.n).all(), name
        elif method == "wanda":
            assert (zero.sum(1) == int(K * sp.fraction)).all(), name
        else:
            assert zero.sum() == int(N * K * sp.fraction), name


def _activations(seed, tokens=2048, K=128):
    """Correlated inputs whose features differ in size (a few large ones, as LLMs' outlier features), all
    through the same mixing: what Wanda's norms and SparseGPT's inverse Hessian work with."""
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(K, K, generator=g) * 0.3
    scale = torch.ones(K)
    scale[torch.randperm(K, generator=g)[:8]] = 8.0
    return (torch.randn(tokens, K, generator=torch.Generator().manual_seed(seed + 1)) @ mixing) * scale


def test_wandas_scores_are_the_weights_times_the_input_norms():
    """Wanda's metric as its paper writes it, |W_ij| * ||X_j||_2 over the calibration tokens, from X itself:
    the mask from the Hessian's diagonal is the same."""
    w, X = torch.randn(24, 128, generator=torch.Generator().manual_seed(3)), _activations(0)
    H = 2 * X.t() @ X / len(X)
    scores = w.abs() * X.norm(dim=0)[None, :]
    want = torch.ones_like(w, dtype=torch.bool).scatter(
        1, scores.topk(64, dim=1, largest=False).indices, False
    )
    assert torch.equal(R.wanda_mask(w, H, R.Sparsity(0.5)), want)


@pytest.mark.parametrize("sp", [R.Sparsity(0.5), R.Sparsity(0.5, 2, 4)], ids=str)
def test_on_one_layer_sparsegpt_beats_wanda_beats_magnitude(sp):
    """||W X - W' X|| on the calibration data and on held-out data of the same kind."""
    w, X, held_out = (
        torch.randn(48, 128, generator=torch.Generator().manual_seed(1)),
        _activations(0),
        _activations(1),
    )
    H = 2 * X.t() @ X / len(X)
    magnitude = w * R.magnitude_mask(w, sp)
    wanda = w * R.wanda_mask(w, H, sp)
    sparsegpt = R.sparsegpt(w, H, sp)
    for x in (X, held_out):
        error = [(x @ (p - w).t()).norm() for p in (sparsegpt, wanda, magnitude)]
        assert error[0] < error[1] < error[2], error


def _column_by_column_sparsegpt(w, H, sp, block, damp=0.01):
    """SparseGPT the slow way, in float64, as the reference: the inverse Hessian of the columns still to
    visit, shrunk by one column at a time, no Cholesky factor and no lazy updates. A block's mask (N:M:
    a group's) comes from OBS's saliency w^2 / [H_F^-1]_ii, F the columns from i on; a pruned weight's
    error goes onto every later column at once."""
    W, K = w.double().clone(), w.size(1)
    H = H.double() + damp * H.diag().mean() * torch.eye(K, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    d2 = torch.tensor([torch.linalg.inv(H[i:, i:])[0, 0].item() for i in range(K)], dtype=torch.float64)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i in range(K):
        if not sp.m and i % block == 0:
            cols = slice(i, i + block)
            keep[:, cols] = R.keep_mask(W[:, cols] ** 2 / d2[None, cols], sp, per_row=False)
        if sp.m and i % sp.m == 0:
            cols = slice(i, i + sp.m)
            keep[:, cols] = R.keep_mask(W[:, cols] ** 2 / d2[None, cols], sp, per_row=True)
        q = torch.where(keep[:, i], W[:, i], 0.0)
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:]
        W[:, i] = q
        Hinv -= Hinv[:, i, None] * Hinv[None, i, :] / Hinv[i, i]
    return W


@pytest.mark.parametrize(
    "sp", [R.Sparsity(0.5), R.Sparsity(0.6), R.Sparsity(0.5, 2, 4), R.Sparsity(2 / 3, 1, 3)], ids=str
)
def test_sparsegpt_equals_the_column_by_column_algorithm(sp):
    """The Cholesky factor and the lazy block updates (blocks of 64 over 192 columns, so errors cross block
    boundaries; 63 for 1:3, so no group straddles two blocks) change the arithmetic, not the result: the same
    mask and the same weights."""
    w, X = torch.randn(16, 192, generator=torch.Generator().manual_seed(2)), _activations(0, K=192)
    H = 2 * X.t() @ X / len(X)
    got = R.sparsegpt(w, H, sp, block=64).double()
    want = _column_by_column_sparsegpt(w, H, sp, block=64)
    assert torch.equal(got == 0, want == 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sparsegpt_without_correlated_inputs_is_magnitude_pruning():
    """With H a multiple of I nothing can compensate a pruned weight: SparseGPT must keep the largest weights
    unchanged and zero the rest, exactly as magnitude pruning (per layer, here one block of columns)."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))
    for sp in (R.Sparsity(0.5), R.Sparsity(0.5, 2, 4)):
        want = w * (R.magnitude_mask(w, sp) if not sp.m else R.keep_mask(w.abs(), sp, per_row=True))
        assert torch.equal(R.sparsegpt(w, 3 * torch.eye(128), sp), want)


def test_sparsegpt_joint_int4_puts_what_stays_on_a_4_bit_grid():
    """SparseGPT's 50% + 4-bit: at least half the weights are zero and each group of 32 inputs of a row holds
    at most 16 values, 0.0 among them; the layer error stays below pruning and rounding apart."""
    w, X = torch.randn(24, 128, generator=torch.Generator().manual_seed(5)), _activations(0)
    H = 2 * X.t() @ X / len(X)
    joint = R.sparsegpt(w, H, R.Sparsity(0.5), bits=4, group_size=32)
    assert (joint == 0).float().mean() >= 0.5
    for group in joint.view(24, 4, 32).flatten(0, 1):
        assert len(group.unique()) <= 16 and (group == 0).any()
    pruned = R.sparsegpt(w, H, R.Sparsity(0.5))
    scale, zero = R.int4_params(pruned.view(24, 4, 32))
    rounded = ((pruned.view(24, 4, 32) / scale[..., None]).round() + zero[..., None]).clamp(0, 15) - zero[
        ..., None
    ]
    apart = (rounded * scale[..., None]).view(24, 128)
    assert (X @ (joint - w).t()).norm() < (X @ (apart - w).t()).norm()


def test_structured_pruning_equals_the_full_model_with_those_heads_and_channels_masked():
    """The smaller dense model computes what the full model computes with the removed heads' and channels'
    output columns zeroed; and generates through its KV cache (one per layer, of that layer's heads) exactly
    as without it."""
    model, calibration = _model_and_calibration()
    small, kept = R.structured_prune(copy.deepcopy(model), 0.5, 0.25, calibration)
    assert small.config.layer_heads == [2, 2] and small.config.layer_mlp == [96, 96]
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for block, (heads, channels) in zip(masked.blocks, kept):
            hs = block.attn.head_size
            cols = torch.ones(block.attn.proj.in_features, dtype=torch.bool)
            for h in heads:
                cols[h * hs : (h + 1) * hs] = False
            block.attn.proj.weight[:, cols] = 0
            gone = torch.ones(block.mlp.proj.in_features, dtype=torch.bool)
            gone[channels] = False
            block.mlp.proj.weight[:, gone] = 0
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(small(ids)[0], masked(ids)[0], rtol=0, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    prompt = ids[0, :8].tolist()
    cached = [t.item() for t in small.generate_stream(torch.tensor([prompt]), 12, temperature=0)]
    assert cached == greedy_ids(small, prompt, 12)


def test_taylor_scores_rank_a_silenced_head_last():
    """A head whose output columns are zero cannot change the loss: its first-order score is the lowest."""
    model, calibration = _model_and_calibration()
    with torch.no_grad():
        hs = model.blocks[0].attn.head_size
        model.blocks[0].attn.proj.weight[:, 2 * hs : 3 * hs] = 0
        model.blocks[0].attn.qkv.weight.view(3, 4, hs, -1)[:, 2] = 0
        model.blocks[0].attn.qkv.bias.view(3, 4, hs)[:, 2] = 0
    heads, _ = R.taylor_scores(model, calibration)[0]
    assert heads.argmin().item() == 2 and heads[2] == 0


def test_recovery_keeps_pruned_weights_exactly_zero(tiny_runs):
    """Through AdamW's steps (momentum, and a gradient at every pruned weight) the mask holds, the kept
    weights move and the loss falls."""
    model, calibration = _model_and_calibration()
    R.prune_model(model, "wanda", R.Sparsity(0.5), calibration)
    before = {n: linear.weight.detach().clone() for n, linear in R.block_linears(model)}
    tokens = torch.randint(0, 100, (4000,), generator=torch.Generator().manual_seed(1)).numpy()
    tokens[1::2] = tokens[::2]  # a pattern to learn: every other token repeats the one before
    losses = R.recover(model, tokens, 30, 3e-3, 8)
    for name, linear in R.block_linears(model):
        assert torch.equal(linear.weight == 0, before[name] == 0), name
        assert not torch.equal(linear.weight, before[name])
    assert sum(losses[-5:]) < sum(losses[:5])


# --- prune.py, the checkpoint, generate.py ----------------------------------------------------------------


@pytest.fixture(scope="module")
def char_ckpt(tiny_runs):
    """Project 01's tiny character checkpoint: what this project prunes by default."""
    return tiny_runs.checkpoint("project01_minimal_gpt")


@pytest.mark.parametrize(
    "flags, zero",
    [
        (["--method", "sparsegpt", "--pattern", "2:4"], 0.5),
        (["--method", "structured", "--heads", "0.5"], 0.0),
    ],
)
def test_prune_writes_a_checkpoint_that_round_trips_and_generates(char_ckpt, tmp_path, flags, zero):
    out = tmp_path / "pruned"
    common = ["--calibration-samples", 4, "--device", "cpu", "--out", out]
    assert run_main(P.prune, "--checkpoint", char_ckpt, *flags, *common) == 0
    model, config = P.checkpoint.load_checkpoint(out, tokenizer="char")
    assert R.sparsity_of(model) == zero and config["pruning"]["method"] == flags[1]
    if zero == 0:  # structured: a smaller model, and config.json says which shape
        assert config["model"]["layer_heads"] == [1] * model.config.n_layer
    chars = config["tokenizer"]["chars"]
    text = printed(P.generate, "--checkpoint", out, "--prompt", "ROMEO:", "--max-new-tokens", 12,
                   "--temperature", 0, "--device", "cpu")  # fmt: skip
    ids = [chars.index(c) for c in "ROMEO:"]
    assert text == "ROMEO:" + "".join(chars[i] for i in greedy_ids(model, ids, 12)) + "\n"


def test_recovery_through_prune_py_is_recorded(char_ckpt, tmp_path):
    out = tmp_path / "recovered"
    assert run_main(P.prune, "--checkpoint", char_ckpt, "--method", "wanda", "--recover-iters", 3,
                    "--calibration-samples", 4, "--device", "cpu", "--out", out) == 0  # fmt: skip
    model, config = P.checkpoint.load_checkpoint(out, tokenizer="char")
    assert config["pruning"]["recovery"]["iters"] == 3 and R.sparsity_of(model) == 0.5


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--sparsity", "1"], "--sparsity"),
        (["--sparsity", "-0.1"], "--sparsity"),
        (["--pattern", "4:4"], "--pattern"),
        (["--pattern", "5:4"], "--pattern"),
        (["--pattern", "2-4"], "--pattern"),
        (["--pattern", "3:5"], "does not divide"),  # 5 does not divide the 32 inputs of qkv
        (["--method", "wanda", "--bits", "4"], "--bits"),
        (["--method", "sparsegpt", "--bits", "4", "--group-size", "24"], "group size"),
        (["--method", "structured", "--heads", "1"], "--heads"),
        (["--method", "sparsegpt", "--bits", "4", "--recover-iters", "2"], "--recover-iters"),
    ],
)
def test_bad_prune_flags_are_one_line(char_ckpt, tmp_path, capsys, flags, says):
    rc = run_main(P.prune, "--checkpoint", char_ckpt, "--calibration-samples", 4, "--device", "cpu",
                  "--out", tmp_path / "p", *flags)  # fmt: skip
    assert says in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "p").exists()


def test_prune_refuses_to_write_over_its_input(char_ckpt, capsys):
    rc = run_main(P.prune, "--checkpoint", char_ckpt, "--out", char_ckpt, "--device", "cpu")
    assert "--out" in assert_one_line_error(capsys, rc)
    assert P.loader.PRUNED_DIR != P.checkpoint.DEFAULT_DIR


def test_benchmark_on_a_tiny_checkpoint(char_ckpt, tiny_runs, tmp_path):
    flags = ["--checkpoint", char_ckpt, "--data", tiny_runs.data("project01_minimal_gpt"), "--preset", "tiny",
             "--calibration-samples", 4, "--eval-tokens", 300, "--recover-iters", 2, "--sweep", "0.5",
             "--forward-batch", 1, "--decode-tokens", 4, "--repeats", 1, "--device", "cpu",
             "--out", tmp_path]  # fmt: skip
    assert run_main(P.benchmark, *flags) == 0
    rows = read_report(tmp_path, PROJECT)
    value = lambda metric, variant: rows[(metric, variant)]["value"]
    assert value("kl_vs_dense", "dense") == 0 and value("sparsity_percent", "dense") == 0
    assert value("input_norm_spread", "max/median ||X_j||, largest layer") >= 1
    for name in ("magnitude 50%", "wanda 2:4", "sparsegpt 4:8"):
        assert value("sparsity_percent", name) == 50
        assert value("params", name) == value("params", "dense") > value("nonzero_params", name)
    assert value("params", "structured 50%") < value("params", "structured 25%") < value("params", "dense")
    assert value("checkpoint_mib", "structured 50%") < value("checkpoint_mib", "dense")
    assert rows[("gap_closed_pct", "sparsegpt 2:4 vs magnitude")]
    assert value("decode_tok_per_s", "structured 50%, tiny shape") > 0
    assert value("semi_structured_us", "2:4 sparse matmul") is None  # CUDA only
    assert list(tmp_path.glob("perplexity_vs_sparsity-*.png"))
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["config"]["held_out"].startswith(
        "the last 10%"
    )
