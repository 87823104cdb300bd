"""Project 22c's Kolmogorov-Arnold networks: the vectorised B-spline bases are the naive Cox-de Boor
recursion and sum to one inside the grid; a KANLinear's output is the per-edge sum written out; a grid
update moves the knots to the inputs' quantiles and keeps the function on them; a KAN fits a 1-D function
better than an MLP of equal parameters; the L1 regulariser is efficient-kan's formula; the KAN-GPT has the
GPT's parameters and the default config is project 07's model; train.py trains, updates grids, resumes
exactly and refuses bad values in one line, under DDP as one process does; hf.py refuses; the benchmark
reports."""

import json
import math

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

P = load_project("project22c_kan")
train_tiny = tiny_trainer("project22c_kan")
SMALL = dict(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32)


def naive_basis(x: float, t: list[float], s: int, p: int) -> float:
    """B_s,p(x) on knots t, by the textbook recursion, one scalar at a time."""
    if p == 0:
        return float(t[s] <= x < t[s + 1])
    left = (x - t[s]) / (t[s + p] - t[s]) * naive_basis(x, t, s, p - 1)
    right = (t[s + p + 1] - x) / (t[s + p + 1] - t[s + 1]) * naive_basis(x, t, s + 1, p - 1)
    return left + right


def kan_layer(seed: int = 0, n_in: int = 3, n_out: int = 4, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = P.kan.KANLinear(n_in, n_out, **kw)
    with torch.no_grad():
        layer.spline_weight.normal_(0, 0.5)  # large enough that the splines matter next to the SiLU branch
    return layer


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_bases_are_the_naive_cox_de_boor_recursion_and_sum_to_one_inside_the_grid(order):
    G = 5
    grid = P.kan.uniform_grid(2, G, order, -1.0, 1.0)  # (I, G + 2k + 1)
    grid[1] = torch.sort(torch.randn(G + 2 * order + 1, generator=torch.Generator().manual_seed(0)))[0]
    x = torch.rand(64, 2, generator=torch.Generator().manual_seed(1)) * 4 - 2  # inside and outside
    bases = P.kan.b_spline_bases(x, grid, order)  # (N, I, G + k)
    assert bases.shape == (64, 2, G + order)
    for n in range(0, 64, 7):
        for i in range(2):
            t = grid[i].tolist()
            want = [naive_basis(x[n, i].item(), t, s, order) for s in range(G + order)]
            torch.testing.assert_close(bases[n, i], torch.tensor(want), rtol=1e-5, atol=1e-6)
    # partition of unity on [t_k, t_{G+k}) (the grid proper), and not outside the extended knots
    inside = (x >= grid[:, order]) & (x < grid[:, G + order])  # (N, I)
    torch.testing.assert_close(bases.sum(-1)[inside], torch.ones(int(inside.sum())))
    outside = (x < grid[:, 0]) | (x >= grid[:, -1])
    assert outside.any() and (bases.sum(-1)[outside] == 0).all()


def test_layer_output_is_the_per_edge_sum_written_out():
    """y_j = sum_i (w_b,ji silu(x_i) + sum_s c_jis B_s(x_i)), edge by edge, with the naive bases."""
    layer = kan_layer(n_in=3, n_out=4)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2)) * 0.6
    y = layer(x)
    want = torch.zeros(5, 4)
    for n in range(5):
        for j in range(4):
            for i in range(3):
                xi, t = x[n, i].item(), layer.grid[i].tolist()
                spline = sum(layer.spline_weight[j, i, s].item() * naive_basis(xi, t, s, 3) for s in range(8))
                silu = xi / (1 + math.exp(-xi))
                want[n, j] += layer.base_weight[j, i].item() * silu + spline
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


def test_grid_update_moves_knots_to_the_quantiles_and_keeps_the_function_on_the_samples():
    """Inputs from N(0.1, 0.35^2), most inside the initial [-1, 1] grid, on rough splines (coefficients
    N(0, 0.5^2)): after update_grid the inner knots are 0.98 x the inputs' quantiles + 0.02 x a uniform grid
    over their range (+-0.01), and the output on the samples moves by under 1% of its variance (mean squared;
    measured 0.18% here; over 30 pairs of layer and data seeds a median of 0.3% and one of 1.44%: the new
    splines are a least-squares fit of the old on another grid, not exact, and the worst sample, in the
    sparse tails, moves by up to a third of the output's range)."""
    layer = kan_layer(n_in=4, n_out=3)
    x = 0.1 + 0.35 * torch.randn(2000, 4, generator=torch.Generator().manual_seed(3))
    before = layer(x)
    layer.update_grid(x)
    after = layer(x)
    assert ((after - before).square().mean() / before.var()).item() < 0.01
    G, k = 5, 3
    inner = layer.grid[:, k : k + G + 1]  # (I, G + 1)
    xs = x.sort(0).values
    quantiles = xs[torch.linspace(0, 1999, G + 1).long()].T  # (I, G + 1)
    uniform = torch.stack([torch.linspace(a - 0.01, b + 0.01, G + 1) for a, b in zip(xs[0], xs[-1])])
    torch.testing.assert_close(inner, 0.98 * quantiles + 0.02 * uniform, rtol=1e-5, atol=1e-5)
    assert (layer.grid.diff(dim=1) > 0).all()  # sorted knots: every basis well defined


def test_refit_is_torchs_least_squares_on_the_old_edge_values():
    """refit_coefficients solves, per input, through S x S matrices only: the same coefficients as
    torch.linalg.lstsq on the (N, S) new bases against the old splines' (N, O) edge values."""
    layer = kan_layer(n_in=3, n_out=2)
    x = 0.2 + 0.5 * torch.randn(500, 3, generator=torch.Generator().manual_seed(4))
    new_grid = P.kan.uniform_grid(3, 5, 3, -1.5, 1.8)
    got = P.kan.refit_coefficients(x, layer.grid, layer.spline_weight.detach(), new_grid, 3)  # (O, I, S)
    old = P.kan.b_spline_bases(x.double(), layer.grid.double(), 3)  # (N, I, S)
    edges = torch.einsum("nis,ois->nio", old, layer.spline_weight.detach().double())  # (N, I, O)
    new = P.kan.b_spline_bases(x.double(), new_grid.double(), 3)  # (N, I, S)
    for i in range(3):
        want = torch.linalg.lstsq(new[:, i], edges[:, i]).solution  # (S, O)
        torch.testing.assert_close(got[:, i].double(), want.T, rtol=1e-4, atol=1e-5)


def test_grid_update_on_inputs_inside_an_unchanged_grid_is_exact():
    """Inputs whose quantiles and range give the same grid again (uniform_fraction 1, margin 0, samples on
    [-1, 1] with both ends present): the least-squares refit must give back the same coefficients."""
    layer = kan_layer(n_in=2, n_out=2)
    x = torch.linspace(-1, 1, 401).unsqueeze(1).repeat(1, 2)
    before, old = layer(x), layer.spline_weight.clone()
    layer.update_grid(x, margin=0.0, uniform_fraction=1.0)
    torch.testing.assert_close(layer.grid, P.kan.uniform_grid(2, 5, 3, -1.0, 1.0))
    torch.testing.assert_close(layer.spline_weight, old, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-5)


def test_a_kan_fits_a_1d_function_better_than_an_mlp_of_equal_parameters():
    """The paper's toy setting: exp(sin(pi x)) on [-1, 1], a [1, 5, 1] KAN (90 parameters) against a
    1-30-1 SiLU MLP (91), 400 full-batch Adam steps each from seed 0: the spline edges fit it with a
    mean squared error at least 10x lower (measured: 5.8e-5 against 4.2e-3, 72x)."""
    x = torch.linspace(-1, 1, 256).unsqueeze(1)
    y = torch.exp(torch.sin(math.pi * x))

    def fit(model: torch.nn.Module) -> float:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(400):
            loss = (model(x) - y).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return loss.item()

    torch.manual_seed(0)
    kan = torch.nn.Sequential(P.kan.KANLinear(1, 5), P.kan.KANLinear(5, 1, grid_range=(-2.0, 2.0)))
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(1, 30), torch.nn.SiLU(), torch.nn.Linear(30, 1))
    n_kan, n_mlp = (sum(p.numel() for p in m.parameters()) for m in (kan, mlp))
    assert abs(n_kan - n_mlp) <= 1
    assert 10 * fit(kan) < fit(mlp)


def test_regularization_is_the_l1_of_mean_abs_coefficients_plus_entropy():
    layer = kan_layer()
    per_edge = layer.spline_weight.abs().mean(-1)  # (O, I)
    l1 = per_edge.sum()
    share = per_edge / l1
    torch.testing.assert_close(layer.regularization_loss(), l1)
    torch.testing.assert_close(layer.regularization_loss(entropy=2.0), l1 - 2 * (share * share.log()).sum())
    model = P.model.GPT(P.model.GPTConfig(**SMALL, mlp="kan"))
    want = sum(b.mlp.fc.regularization_loss() + b.mlp.proj.regularization_loss() for b in model.blocks)
    torch.testing.assert_close(model.kan_regularization(), want)
    assert P.model.GPT(P.model.GPTConfig(**SMALL)).kan_regularization().item() == 0


@pytest.mark.parametrize("C", [32, 128, 768])
def test_kan_width_matches_the_mlps_parameters(C):
    """2 C H (G + k + 1) against 8 C^2 + 5 C: equal up to the rounding of H, at most C (G + k + 1) apart."""
    cfg = dict(SMALL, n_embd=C, n_head=4)
    with torch.device("meta"):
        gpt, kan = P.model.GPT(P.model.GPTConfig(**cfg)), P.model.GPT(P.model.GPTConfig(**cfg, mlp="kan"))
    per_block = (gpt.num_params() - kan.num_params()) / SMALL["n_layer"]
    assert abs(per_block) <= C * 9
    assert P.train.flops_per_token(kan.config) == pytest.approx(P.train.flops_per_token(gpt.config), rel=0.01)


def test_default_config_is_project07s_model():
    P07 = load_project("project07_mixed_precision")
    torch.manual_seed(0)
    ours = P.model.GPT(P.model.GPTConfig(**SMALL))
    torch.manual_seed(0)
    theirs = P07.model.GPT(P07.model.GPTConfig(**SMALL))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    assert P.train.flops_per_token(ours.config) == P07.train.flops_per_token(theirs.config)


def test_model_grid_update_spans_each_layers_inputs_and_keeps_the_loss():
    torch.manual_seed(0)
    model = P.model.GPT(P.model.GPTConfig(**SMALL, mlp="kan")).eval()
    perturb_(model, 0)
    idx = torch.randint(300, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(idx, idx)[1]
        model.update_kan_grids(idx)
        after = model(idx, idx)[1]
    assert abs(after.item() - before.item()) < 0.01 * before.item()
    captured = {}

    def hook(layer, args) -> None:  # returns None: the input goes on unchanged
        captured[layer] = args[0].reshape(-1, args[0].size(-1))  # (N, I)

    layers = [m for m in model.modules() if isinstance(m, P.kan.KANLinear)]
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    for m in layers:  # the inner grid runs from just below the inputs' minimum to just above their maximum
        lo, hi = m.grid[:, 3], m.grid[:, -4]
        assert (lo <= captured[m].min(0).values).all() and (hi >= captured[m].max(0).values).all()
        assert (hi - lo < captured[m].max(0).values - captured[m].min(0).values + 0.1).all()


def test_a_kan_checkpoint_round_trips_with_its_grid(tmp_path):
    torch.manual_seed(0)
    model = P.model.GPT(P.model.GPTConfig(**SMALL, mlp="kan"))
    idx = torch.randint(300, (2, 16), generator=torch.Generator().manual_seed(1))
    model.update_kan_grids(idx)
    P.checkpoint.save_checkpoint(tmp_path / "ck", model, {"tokenizer": {"type": "tiktoken"}, "training": {}})
    loaded, _ = P.checkpoint.load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.blocks[1].mlp.proj.grid, model.blocks[1].mlp.proj.grid)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx)[0], model.eval()(idx)[0])


def test_train_with_kan_grid_updates_and_l1_resumes_exactly(tiny_runs, tmp_path, capsys):
    data = tiny_runs.data("project22c_kan")
    kan = ["--mlp", "kan", "--grid-updates", "3", "--kan-l1", "0.0001", "--eval-iters", "1"]
    flags = ["--data", data, "--eval-interval", "2", *kan]
    assert train_tiny(*flags, "--max-iters", "4", "--out", tmp_path / "straight") == 0
    assert train_tiny(*flags, "--max-iters", "2", "--out", tmp_path / "split") == 0
    capsys.readouterr()
    rc = train_tiny(*flags, "--max-iters", "4", "--out", tmp_path / "split", "--resume", "--mlp", "mlp")
    assert "--mlp" in assert_one_line_error(capsys, rc)
    assert train_tiny(*flags, "--max-iters", "4", "--out", tmp_path / "split", "--resume") == 0
    straight, config = P.checkpoint.load_checkpoint(tmp_path / "straight")
    split, _ = P.checkpoint.load_checkpoint(tmp_path / "split")
    assert config["model"]["mlp"] == "kan" and config["training"]["train_config"]["grid_updates"] == 3
    assert isinstance(straight.blocks[0].mlp, P.kan.KANMLP)
    uniform = P.kan.uniform_grid(32, 5, 3, -2.0, 2.0)
    assert not torch.allclose(straight.blocks[0].mlp.fc.grid, uniform)  # moved by the updates
    for name, weight in straight.state_dict().items():
        assert torch.equal(split.state_dict()[name], weight), name
    losses = [json.loads(s) for s in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    straight_losses = [
        json.loads(s) for s in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m.get("loss") for m in losses] == [m.get("loss") for m in straight_losses]
    assert (
        run_main(P.generate, "--checkpoint", tmp_path / "split", "--max-new-tokens", "3", "--device", "cpu")
        == 0
    )


@pytest.mark.parametrize(
    "flags, named",
    [(["--mlp", "kam"], "mlp"), (["--grid-size", "0"], "--grid-size"), (["--kan-l1", "-1"], "--kan-l1")],
)
def test_bad_kan_values_exit_2_with_one_line(flags, named, corpus_file, tmp_path, capsys):
    rc = train_tiny("--data", corpus_file, "--out", tmp_path / "run", *flags)
    assert named in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--grid-updates", "2"], ["--kan-l1", "0.1"], ["--spline-order", "2"]])
def test_kan_flags_without_a_kan_mlp_exit_2_with_one_line(flags, corpus_file, tmp_path, capsys):
    """The KAN flags on a model whose MLP is GPT-2's: --grid-updates crashed in update_kan_grids (an MLP has
    no update_grid; a traceback), --kan-l1 and the spline flags did nothing. Each is refused in one line."""
    rc = train_tiny("--data", corpus_file, "--out", tmp_path / "run", "--max-iters", "2", *flags)
    assert "--mlp kan" in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "run").exists()


def test_a_16_bit_kan_keeps_fp32_knots_and_updates_its_grid_without_nans():
    """In a bf16 model (--precision bf16-pure, generate.py --dtype) the knots stayed in bf16: quantiles of a
    feature with a narrow range (0.5 +- 0.001) rounded to one value, the repeated knots divided 0 by 0 and
    update_grid's pinv raised (or the bases were nan). The grid stays fp32 whatever the weights' dtype."""
    torch.manual_seed(0)
    layer = P.kan.KANLinear(4, 3).to(torch.bfloat16)
    assert layer.grid.dtype == torch.float32 and layer.spline_weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.grid, P.kan.uniform_grid(4, 5, 3, -1.0, 1.0))  # not rounded to bf16
    x = 0.5 + 0.001 * torch.randn(512, 4, generator=torch.Generator().manual_seed(0))
    x[:, 1] = torch.randn(512, generator=torch.Generator().manual_seed(1))  # one wide feature beside them
    x = x.to(torch.bfloat16)
    layer.update_grid(x)
    assert (layer.grid.diff(dim=1) > 0).all()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.isfinite().all()
    model = P.model.GPT(P.model.GPTConfig(**SMALL, mlp="kan")).to(torch.bfloat16)
    assert model.blocks[0].mlp.fc.grid.dtype == torch.float32
    idx = torch.randint(300, (2, 16), generator=torch.Generator().manual_seed(1))
    model.update_kan_grids(idx)
    with torch.no_grad():
        assert model(idx, idx)[1].isfinite()


def test_hf_export_refuses_a_kan_model_in_one_line(tmp_path, capsys):
    assert "KAN" in hf_export_error(P, P.model.GPT(P.model.GPTConfig(**SMALL, mlp="kan")), tmp_path, capsys)


def test_benchmark_reports_every_variant(tiny_runs, tmp_path):
    data = tiny_runs.data("project22c_kan")
    flags = ["--preset", "tiny", "--data", data, "--steps", "3", "--repeats", "1", "--device", "cpu"]
    assert run_main(P.benchmark, *flags, "--gen-tokens", "4", "--grid-updates", "2", "--out", tmp_path) == 0
    rows = read_report(tmp_path, "project22c_kan")
    mc, _ = P.train.PRESETS["tiny"]
    for name, (c, _) in P.benchmark.variants(mc, 2).items():
        for metric in (
            "val_loss",
            "train_tok_per_s",
            "decode_tok_per_s",
            "mlp_fwd_bwd_ms",
            "saved_for_backward_mib",
        ):
            assert rows[(metric, name)]["value"] > 0, (metric, name)
        with torch.device("meta"):
            assert rows[("params", name)]["value"] == P.model.GPT(c).num_params(non_embedding=False)
    assert abs(rows[("params", "KAN-GPT")]["ratio"] - 1) < 0.01
    assert rows[("mlp_saved_for_backward_mib", "KAN-GPT")]["ratio"] > 1  # the bases are kept for backward
    assert rows[("train_peak_mib", "KAN-GPT")]["value"] is None  # a GPU figure: not measured on a CPU
    assert next(tmp_path.glob("kan_training-*-tiny.png")).read_bytes()[:4] == b"\x89PNG"


def test_ddp_with_grid_updates_trains_as_one_process_does(corpus_file, tiktoken_cache, tmp_path):
    """Two gloo processes, grid updates on the first two steps and the L1 term: each rank moves its grids on
    its own batch, then rank 0's grids and refitted coefficients are broadcast, so the ranks stay one model
    and end with one process's weights (rank 0's first micro-batch is the single process's first). Without
    the broadcast the ranks' splines differ and so do the averaged gradients (0.07 apart, tried)."""
    flags = ["--preset", "tiny", "--data", str(corpus_file), "--max-iters", "3", "--eval-interval", "3",
             "--eval-iters", "1", "--device", "cpu", "--total-batch-tokens", "512", "--mlp", "kan",
             "--grid-updates", "2", "--kan-l1", "0.001"]  # fmt: skip
    ddp, single = train_with_and_without_ddp(P, flags, tmp_path, tiktoken_cache)
    assert_same_weights(ddp, single, atol=1e-5)
