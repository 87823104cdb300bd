"""Project 22b's Mamba: the sequential reference scan is the recurrence written out element by element; the
chunked PyTorch scan and the Triton kernel (under TRITON_INTERPRET=1) give the reference's output, last state
and gradients within mamba-ssm's fp32 tolerances; the block's convolution is causal and the model has no
position embedding or attention; the paper's initialisation; stepping the constant-size state token by
token gives the full forward's logits and greedy generation the uncached forward's tokens; train.py trains
Mamba from flags, keeps it on resume and refuses bad values in one line; hf.py refuses; the benchmark reports
a flat state against a growing KV cache."""

import math

import pytest
import torch
from conftest import (
    assert_one_line_error,
    hf_export_error,
    load_project,
    perturb_,
    read_report,
    run_main,
    tiny_trainer,
)

P = load_project("project22b_mamba")
train_tiny = tiny_trainer("project22b_mamba")
SMALL = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32, arch="mamba")
TOL = dict(rtol=6e-4, atol=2e-3)  # mamba-ssm's test_selective_scan, fp32


def scan_inputs(B=2, T=37, Di=12, N=16, seed=0, h0=True):
    """Random scan inputs (u, delta, A, B, C, D, h0): delta > 0 and A < 0, as the block makes them."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, Di, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(B, T, Di, generator=g))
    A = -torch.rand(Di, N, generator=g) * 4 - 0.1
    Bm, Cm = torch.randn(2, B, T, N, generator=g)
    D = torch.randn(Di, generator=g)
    return u, delta, A, Bm, Cm, D, torch.randn(B, Di, N, generator=g) if h0 else None


def model(seed=0, **over):
    torch.manual_seed(seed)
    m = P.model.GPT(P.model.GPTConfig(**{**SMALL, **over}))
    perturb_(m, seed)
    return m.eval()


def test_the_reference_scan_is_the_recurrence_element_by_element():
    u, delta, A, Bm, Cm, D, h0 = scan_inputs(B=1, T=5, Di=2, N=3)
    y, h = P.mamba.selective_scan_ref(u, delta, A, Bm, Cm, D, h0)
    for d in range(2):
        state = [h0[0, d, n].item() for n in range(3)]
        for t in range(5):
            dt, x = delta[0, t, d].item(), u[0, t, d].item()
            state = [math.exp(dt * A[d, n].item()) * state[n] + dt * Bm[0, t, n].item() * x for n in range(3)]
            want = sum(state[n] * Cm[0, t, n].item() for n in range(3)) + D[d].item() * x
            assert y[0, t, d].item() == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert h[0, d].tolist() == pytest.approx(state, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("T, h0", [(37, True), (64, False), (1, True)])  # ragged, whole chunks, one step
def test_chunked_and_triton_scans_give_the_references_output_and_last_state(impl, T, h0):
    inputs = scan_inputs(T=T, h0=h0)
    y_ref, h_ref = P.mamba.selective_scan_ref(*inputs)
    y, h = P.mamba.selective_scan(*inputs, impl=impl)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)


def test_the_chunked_scan_is_chunk_size_independent():
    inputs = scan_inputs(T=45)
    y_ref, h_ref = P.mamba.selective_scan_ref(*inputs)
    for chunk in (1, 4, 16, 64):
        y, h = P.mamba.selective_scan_chunked(*inputs, chunk=chunk)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(h, h_ref, **TOL)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_scan_gradients_match_the_references(impl):
    """The Triton forward's backward is the chunked scan recomputed: every input's gradient, h0 included."""
    grads = {}
    for name in ("ref", impl):
        leaves = [t.clone().requires_grad_() for t in scan_inputs(T=20)]
        y, h = P.mamba.selective_scan(*leaves, impl=name)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        ((y * w).sum() + h.square().sum()).backward()
        grads[name] = [t.grad for t in leaves]
    for g, g_ref in zip(grads[impl], grads["ref"], strict=True):
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_under_bf16_autocast_the_scan_stays_fp32(impl):
    """Autocast would run the chunked scan's einsum in bf16, an error of ~0.1 here; selective_scan turns it
    off, so the state sums its T steps in fp32, and the gradients follow."""
    leaves = [t.requires_grad_() for t in scan_inputs(T=37)]
    y_ref, h_ref = P.mamba.selective_scan_ref(*leaves)
    grad_ref = torch.autograd.grad(y_ref.sum(), leaves[0])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # backward outside it, as train_step runs it
        y, h = P.mamba.selective_scan(*leaves, impl=impl)
    grad = torch.autograd.grad(y.sum(), leaves[0])[0]
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
    torch.testing.assert_close(grad, grad_ref, **TOL)


def test_an_unknown_scan_is_a_value_error():
    with pytest.raises(ValueError, match="unknown scan"):
        P.mamba.selective_scan(*scan_inputs(T=3), impl="fft")


@pytest.mark.parametrize("impl", P.mamba.SCANS)
def test_the_model_computes_the_same_logits_with_every_scan(impl):
    m, idx = model(), torch.randint(300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(idx)[0]
        for b in m.blocks:
            b.mamba.scan = impl
        torch.testing.assert_close(m(idx)[0], ref, **TOL)


def test_mamba_is_causal_and_has_no_attention_mlp_or_position_embedding():
    m = model()
    assert m.wpe is None and not any(
        isinstance(x, (P.model.CausalSelfAttention, P.model.MLP)) for x in m.modules()
    )
    idx = torch.randint(300, (1, 20), generator=torch.Generator().manual_seed(2))
    later = idx.clone()
    later[0, 12:] = (later[0, 12:] + 1) % 300  # change the future from position 12 on
    with torch.no_grad():
        a, b = m(idx)[0], m(later)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_the_papers_initialisation():
    torch.manual_seed(0)
    mixer = P.model.GPT(P.model.GPTConfig(**SMALL)).blocks[0].mamba
    N, Di = 16, 64  # d_state, expand * n_embd
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1, N + 1.0)).repeat(Di, 1))  # S4D-real, log form
    A = -torch.exp(mixer.A_log)
    torch.testing.assert_close(A, -torch.arange(1, N + 1.0).repeat(Di, 1))  # A = -(1, ..., N): negative
    assert torch.equal(mixer.D, torch.ones(Di))
    assert mixer.dt_rank == 2 and mixer.conv1d.kernel_size == (4,)  # ceil(32 / 16), d_conv
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001 and dt.max() / dt.min() > 5  # log-uniform


def test_the_default_config_is_project07s_gpt():
    P07 = load_project("project07_mixed_precision")
    small = {k: v for k, v in SMALL.items() if k != "arch"}
    torch.manual_seed(0)
    ours = P.model.GPT(P.model.GPTConfig(**small))
    torch.manual_seed(0)
    theirs = P07.model.GPT(P07.model.GPTConfig(**small))
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert P.train.flops_per_token(ours.config) == P07.train.flops_per_token(theirs.config)


def test_stepping_the_state_gives_the_full_forwards_logits_and_the_state_stays_one_size():
    m, idx = model(), torch.randint(300, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = m(idx)[0]  # (B, T, V)
        states = m.new_states(2)
        prefill = m.lm_head(m.hidden(idx[:, :7], states))[..., :300]  # the prompt in one forward
        size = sum(s.nbytes() for s in states)
        steps = [m.step(idx[:, t], states) for t in range(7, 30)]
    torch.testing.assert_close(prefill, full[:, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 7:], rtol=1e-4, atol=1e-4)
    assert sum(s.nbytes() for s in states) == size == 2 * 2 * 64 * (4 * 4 + 16 * 4)  # B, layers, Di, K/N


def test_a_prompt_shorter_than_the_convolution_fills_its_window_with_zeros():
    m, idx = model(), torch.randint(300, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(idx)[0]
        states = m.new_states(1)
        m.hidden(idx[:, :2], states)  # 2 tokens, K = 4
        steps = [m.step(idx[:, t], states) for t in range(2, 6)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 2:], rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_the_uncached_forwards_tokens():
    m, idx = model(), torch.randint(300, (2, 5), generator=torch.Generator().manual_seed(6))
    got = torch.cat(list(m.generate_stream(idx, 12, temperature=0)), dim=1)
    seq = idx
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, m(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq[:, 5:])


def test_train_builds_mamba_from_flags_and_keeps_it_on_resume(tiny_runs, tmp_path, capsys):
    data = tiny_runs.data("project22b_mamba")
    flags = ["--data", data, "--eval-interval", "2", "--eval-iters", "1", "--out", tmp_path / "run"]
    mamba = ["--arch", "mamba", "--d-state", "8", "--expand", "1", "--dt-rank", "3"]
    assert train_tiny(*flags, "--max-iters", "2", *mamba) == 0
    m, config = P.checkpoint.load_checkpoint(tmp_path / "run")
    assert {k: config["model"][k] for k in ("arch", "d_state", "expand", "dt_rank", "d_conv")} == {
        "arch": "mamba", "d_state": 8, "expand": 1, "dt_rank": 3, "d_conv": 4,
    }  # fmt: skip
    assert m.blocks[0].mamba.A_log.shape == (32, 8) and m.blocks[0].mamba.dt_proj.in_features == 3
    gen = ["--checkpoint", tmp_path / "run", "--max-new-tokens", "3", "--device", "cpu"]
    assert run_main(P.generate, *gen) == 0
    capsys.readouterr()
    rc = train_tiny(*flags, "--max-iters", "4", "--resume", "--arch", "gpt")
    assert "--arch" in assert_one_line_error(capsys, rc)
    rc = train_tiny(*flags, "--max-iters", "4", "--resume", "--attention", "explicit")
    assert "--attention" in assert_one_line_error(capsys, rc)
    assert train_tiny(*flags, "--max-iters", "3", "--resume") == 0  # the recorded Mamba, resumed
    assert P.checkpoint.load_checkpoint(tmp_path / "run")[1]["model"]["arch"] == "mamba"


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--arch", "rwkv"], "--arch"),
        (["--arch", "mamba", "--d-state", "0"], "--d-state"),
        (["--arch", "mamba", "--dt-rank", "0"], "--dt-rank"),
        (["--arch", "mamba", "--dt-rank", "big"], "must be auto or a positive integer"),
        (["--d-conv", "3"], "--arch mamba"),  # a Mamba flag on the GPT would change nothing
        (["--arch", "mamba", "--attention", "explicit"], "--attention"),  # and the GPT's flag on Mamba
    ],
)
def test_bad_mamba_values_exit_2_with_one_line(flags, named, corpus_file, tmp_path, capsys):
    rc = train_tiny("--data", corpus_file, "--out", tmp_path / "run", *flags)
    assert named in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "run").exists()


def test_a_bad_recorded_config_is_a_value_error():
    with pytest.raises(ValueError, match="arch"):
        P.model.GPTConfig(arch="rnn")
    with pytest.raises(ValueError, match="dt_rank"):
        P.model.GPTConfig(dt_rank="big")


def test_hf_export_refuses_mamba_in_one_line(tmp_path, capsys):
    assert "Mamba" in hf_export_error(P, model(), tmp_path, capsys)


def test_benchmark_reports_a_flat_state_against_a_growing_kv_cache(tiny_runs, tmp_path):
    data = tiny_runs.data("project22b_mamba")
    flags = ["--preset", "tiny", "--data", data, "--steps", "2", "--repeats", "1", "--device", "cpu",
             "--contexts", "16", "48", "--gen-tokens", "2", "--eval-iters", "1"]  # fmt: skip
    assert run_main(P.benchmark, *flags, "--out", tmp_path) == 0
    rows = read_report(tmp_path, "project22b_mamba")
    assert 0.8 < rows[("params", "mamba")]["ratio"] < 1.25  # about equal parameters
    for name in ("gpt", "mamba"):
        assert rows[("val_loss", name)]["value"] > 0 and rows[("train_tok_per_s", name)]["value"] > 0
        assert rows[("decode_tok_per_s_ctx48", name)]["value"] > 0
    gpt = [rows[(f"decode_cache_mib_ctx{L}", "gpt")]["value"] for L in (16, 48)]
    mamba = [rows[(f"decode_cache_mib_ctx{L}", "mamba")]["value"] for L in (16, 48)]
    assert gpt[1] / gpt[0] == pytest.approx((48 + 2) / (16 + 2)) and mamba[0] == mamba[1]
    mc = P.benchmark.variants(P.train.PRESETS["tiny"][0])["mamba"]  # B, layers, Di, (K + N) fp32 numbers
    assert mamba[0] * 2**20 == 1 * mc.n_layer * mc.d_inner * (mc.d_conv + mc.d_state) * 4
    assert rows[("scan_max_abs_diff_vs_ref", "chunked scan")]["value"] < 1e-3
    assert rows[("scan_ms", "triton scan")]["value"] is None  # no GPU: not measured, not interpreted


def test_a_log_gets_no_weight_decay():
    """mamba-ssm marks A_log _no_weight_decay: decay would pull every A towards -exp(0) = -1, erasing the
    S4D-real spread of time scales. A_log is a (Di, N) matrix, which the rule "decay matrices" caught."""
    m = model()
    tc = P.train.PRESETS["tiny"][1]
    groups = P.train.make_optimizer(m, tc, torch.device("cpu")).param_groups
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert tc.weight_decay > 0 and m.blocks[0].mamba.in_proj.weight.dim() == 2
    assert id(m.blocks[0].mamba.in_proj.weight) in decay  # the matmul weights still decay
    assert not any(id(b.mamba.A_log) in decay or id(b.mamba.D) in decay for b in m.blocks)
