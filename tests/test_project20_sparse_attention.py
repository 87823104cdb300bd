"""Project 20's block-sparse attention: every pattern's mask is its definition written as loops; the block
layout holds exactly the mask's non-zeros and the same blocks as FlexAttention's create_block_mask; the
Triton kernels' forward and gradients equal dense attention with the same mask (float64) for every pattern,
at lengths that are not a multiple of the block, on the CPU through Triton's interpreter; the model through
the kernels equals SDPA with the mask; the rolling KV cache of the window's size generates the tokens of the
full cache with the window mask; bad flags end in one line; the benchmark reports what it measured."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    assert_one_line_error,
    load_project,
    logits_and_grads,
    read_report,
    run_main,
    tiny_gpt,
    tiny_trainer,
)

P = load_project("project20_sparse_attention")
SA = P.sparse_attention
Pattern, build_layout, sparse_attention, masked_reference = (
    SA.Pattern,
    SA.build_layout,
    SA.sparse_attention,
    SA.masked_reference,
)
train_tiny = tiny_trainer("project20_sparse_attention")
# Small sizes, so that a 77-token sequence (not a multiple of the 16-token block) crosses every kind of block.
SMALL = dict(window=20, n_global=3, n_random=1, summary=4, block=16)


def naive_mask(p, T: int) -> torch.Tensor:
    """Each pattern's rule, one (query, key) pair at a time, from the papers' descriptions."""
    rand = SA._random_table(p.n_random, p.seed)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):  # causal: keys at or before the query
            near = i - j < p.window
            m[i, j] = {
                "dense": True,
                "window": near,
                "strided": near or (i - j) % p.window == 0,
                "fixed": i // p.window == j // p.window or j % p.window >= p.window - p.summary,
                "longformer": near or j < p.n_global,
                "bigbird": near or j < p.n_global or bool(rand[i // p.block, j // p.block]),
            }[p.name]
    return m


@pytest.mark.parametrize("name", SA.PATTERNS)
def test_pattern_masks_follow_their_definitions(name):
    p = Pattern(name, **SMALL)
    assert torch.equal(p.token_mask(45), naive_mask(p, 45))


def test_bigbird_sees_the_same_random_blocks_at_every_length():
    """Training at one length and decoding at another must agree: the random table is cut, not redrawn."""
    p = Pattern("bigbird", **SMALL)
    assert torch.equal(p.token_mask(200)[:77, :77], p.token_mask(77))
    assert (p._random_blocks(200, None).sum(1) <= p.n_random).all()


def expand(layout) -> torch.Tensor:
    """The (T, T) mask a layout stands for: full blocks all True, partial ones their tile, the rest False."""
    b, nb = layout.block, layout.full_kv.num.numel()
    out = torch.zeros(nb * b, nb * b, dtype=torch.bool)
    for qb in range(nb):
        for i in range(int(layout.full_kv.num[qb])):
            kb = int(layout.full_kv.idx[qb, i])
            out[qb * b : (qb + 1) * b, kb * b : (kb + 1) * b] = True
        for i in range(int(layout.partial_kv.num[qb])):
            kb, t = int(layout.partial_kv.idx[qb, i]), int(layout.partial_kv.tile[qb, i])
            out[qb * b : (qb + 1) * b, kb * b : (kb + 1) * b] = layout.tiles[t].bool()
    return out[: layout.T, : layout.T]


@pytest.mark.parametrize("name", SA.PATTERNS)
@pytest.mark.parametrize("T, block", [(77, 16), (128, 32)])
def test_layout_covers_exactly_the_masks_non_zeros(name, T, block):
    mask = Pattern(name, **SMALL).token_mask(T)
    layout = build_layout(mask, block)
    assert torch.equal(expand(layout), mask)
    for lists in ((layout.full_kv, layout.partial_kv), (layout.full_q, layout.partial_q)):
        for bl in lists:  # sorted, and never listing a block twice or one holding no True
            for r in range(bl.num.numel()):
                kept = bl.idx[r, : int(bl.num[r])]
                assert torch.equal(kept, kept.sort().values.unique())
    assert all(t.any() and not t.all() for t in layout.tiles.bool())  # partial tiles are really partial
    # The transposed lists name the same blocks: every (query block, key block) pair once each way.
    pairs = lambda f, p: {
        (r, int(c)) for bl in (f, p) for r in range(bl.num.numel()) for c in bl.idx[r, : int(bl.num[r])]
    }  # noqa: E731, E501
    assert pairs(layout.full_kv, layout.partial_kv) == {
        (c, r) for r, c in pairs(layout.full_q, layout.partial_q)
    }


@pytest.mark.parametrize("name", ["window", "longformer", "fixed"])
def test_layout_has_flexattentions_blocks(name):
    """FlexAttention's create_block_mask (uncompiled, at our block size) keeps the same full and partial key
    blocks per query block: the two BlockMasks are one idea."""
    from torch.nn.attention.flex_attention import create_block_mask

    p, T = Pattern(name, **SMALL), 96
    rule = p.mask_mod(T)
    flex = create_block_mask(lambda b, h, q, kv: rule(q, kv), None, None, T, T, device="cpu", BLOCK_SIZE=16)
    ours = build_layout(p.token_mask(T), 16)
    for theirs_num, theirs_idx, mine in (
        (flex.kv_num_blocks, flex.kv_indices, ours.partial_kv),
        (flex.full_kv_num_blocks, flex.full_kv_indices, ours.full_kv),
    ):
        assert torch.equal(theirs_num[0, 0].int(), mine.num)
        for r in range(mine.num.numel()):
            n = int(mine.num[r])
            assert sorted(theirs_idx[0, 0, r, :n].tolist()) == mine.idx[r, :n].tolist()


def _run(attn, q, k, v, do, dtype=None):
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
    o = attn(*leaves)
    o.backward(do.to(o.dtype))
    return o.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("name", SA.PATTERNS)
@pytest.mark.parametrize("T, hs", [(77, 32), (33, 64)])
def test_kernels_equal_dense_attention_with_the_mask(name, T, hs):
    """Forward and dQ, dK, dV of the fp32 kernels against the float64 masked reference, project 09's rule
    (2e-5): causal by construction, T not a multiple of the 16-token block, batch and heads > 1."""
    p, g = Pattern(name, **SMALL), torch.Generator().manual_seed(0)
    mask = p.token_mask(T)
    q, k, v, do = (torch.randn(2, 2, T, hs, generator=g) for _ in range(4))
    out, grads = _run(lambda *a: sparse_attention(*a, build_layout(mask, 16)), q, k, v, do)
    ref, ref_grads = _run(lambda *a: masked_reference(*a, mask), q, k, v, do, torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_a_row_that_sees_nothing_in_its_first_partial_block_stays_finite():
    """The strided pattern's rows meet partial blocks where they see no key at all (between two strides):
    the online softmax must not turn -inf - -inf into NaN there."""
    p = Pattern("strided", window=24, block=16)
    mask = p.token_mask(64)
    layout = build_layout(mask, 16)
    assert layout.full_kv.num[3] == 0  # the last query block starts on partial blocks only
    q = torch.randn(1, 1, 64, 16)
    out = sparse_attention(q, q, q, layout)
    torch.testing.assert_close(out, masked_reference(q, q, q, mask), atol=1e-5, rtol=1e-5)


def test_layout_and_inputs_are_checked():
    layout = build_layout(Pattern("window", **SMALL).token_mask(40), 16)
    with pytest.raises(ValueError, match="layout is for 40"):
        sparse_attention(*(torch.randn(1, 1, 41, 32) for _ in range(3)), layout)
    with pytest.raises(ValueError, match="diagonal"):
        build_layout(torch.zeros(8, 8, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="unknown pattern"):
        Pattern("butterfly")


def test_work_grows_linearly_with_a_window():
    """The tiles a window visits grow as T (about T / B * (w / B + 1)), dense causal's as T^2 / 2B^2."""
    p = Pattern("window", window=64, block=16)
    tiles = {T: build_layout(p.token_mask(T), 16).visited() for T in (256, 512, 1024)}
    dense = {T: build_layout(Pattern("dense").token_mask(T), 16).visited() for T in (256, 512, 1024)}
    # Past the first window, each query block visits 5 tiles (the partial edge, 3 full, the diagonal).
    assert tiles[1024] - tiles[512] == 2 * (tiles[512] - tiles[256]) == 512 // 16 * 5
    assert dense[1024] == 64 * 65 // 2 and dense[1024] - dense[512] > 2 * (dense[512] - dense[256])


def test_default_config_is_dense_causal():
    """Off by default: the model is project 09's (tests/test_golden.py holds its outputs)."""
    assert P.model.GPTConfig().pattern == "dense" and P.model.pattern_of(P.model.GPTConfig()) is None


@pytest.mark.parametrize("name", ["window", "strided"])
def test_the_model_through_the_kernels_equals_sdpa_with_the_mask(name, monkeypatch):
    """The same GPT with a pattern, attention through our kernels (as on a GPU) and through SDPA with the
    (T, T) mask: the same logits and gradients; and not those of dense attention."""
    model = tiny_gpt("project20_sparse_attention", n_embd=32, n_head=2, block_size=48, pattern=name, window=9)
    ids = torch.randint(0, 100, (2, 45), generator=torch.Generator().manual_seed(0))

    sdpa_logits, sdpa_grads = logits_and_grads(model, ids)
    calls = []
    monkeypatch.setattr(P.model, "kernels_run_on", lambda t: calls.append(t.shape) or True)
    kernel_logits, kernel_grads = logits_and_grads(model, ids)
    assert len(calls) == 2
    torch.testing.assert_close(kernel_logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    for n, g in sdpa_grads.items():
        torch.testing.assert_close(kernel_grads[n], g, atol=1e-5, rtol=1e-4, msg=n)
    dense = tiny_gpt("project20_sparse_attention", n_embd=32, n_head=2, block_size=48)
    assert not torch.allclose(dense(ids)[0], sdpa_logits, atol=1e-3)


def test_rolling_cache_generates_the_full_caches_tokens():
    """Mistral's rolling buffer: a prompt longer than the window, then more new tokens than the window. Greedy
    tokens equal those of the full cache with the window mask and of the uncached forward; the buffer holds
    `window` positions, not the prompt and every new token."""
    model = tiny_gpt(
        "project20_sparse_attention", n_embd=32, n_head=2, block_size=64, pattern="window", window=8
    )
    prompt = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(1))
    sizes = []
    setup = model.setup_cache
    model.setup_cache = lambda *a, **k: setup(*a, **k) or sizes.append(model.cache_size)
    run = lambda **kw: torch.cat(list(model.generate_stream(prompt, 30, temperature=0, **kw)), dim=1)  # noqa: E731
    rolling, full, plain = run(), run(rolling=False), run(use_cache=False)
    assert torch.equal(rolling, full) and torch.equal(full, plain)
    assert sizes == [8, 13 + 30]
    dense = tiny_gpt("project20_sparse_attention", n_embd=32, n_head=2, block_size=64)
    assert not torch.equal(torch.cat(list(dense.generate_stream(prompt, 30, temperature=0)), dim=1), rolling)


def test_rolling_cache_only_for_a_window():
    model = tiny_gpt("project20_sparse_attention", n_embd=32, n_head=2, block_size=32, pattern="longformer")
    with pytest.raises(ValueError, match="window pattern"):
        model.setup_cache(1, 16, rolling=True)


@pytest.mark.parametrize("flags", [["--pattern", "butterfly"], ["--window", "0"]])
def test_bad_pattern_flags_end_in_one_line(flags, tmp_path, capsys):
    assert_one_line_error(capsys, train_tiny(*flags, "--out", tmp_path / "run"))


def test_fixed_pattern_needs_a_window_longer_than_its_summary(tmp_path, capsys):
    """With a stride no longer than its summary, every key is a summary position: "fixed" would silently be
    dense causal attention (the model's summary is 16, so --window 16 or less was dense)."""
    with pytest.raises(ValueError, match="summary"):
        Pattern("fixed", window=16, summary=16)
    assert not Pattern("fixed", window=17, summary=16).token_mask(40).tril().all()
    flags = ("--pattern", "fixed", "--window", "16", "--out", tmp_path / "run")
    assert "summary" in assert_one_line_error(capsys, train_tiny(*flags))


@pytest.mark.parametrize(
    "flags", [("--pattern", "window"), ("--pattern", "fixed"), ("--pattern", "bigbird", "--window", "8")]
)
def test_a_pattern_that_is_dense_at_the_context_is_refused(flags, tmp_path, capsys):
    """The tiny and cpu presets' contexts (32, 128) are shorter than the default window (256), and bigbird's
    two random 64-token blocks cover them: these would train dense attention under a sparse pattern's name."""
    line = assert_one_line_error(capsys, train_tiny(*flags, "--out", tmp_path / "run"))
    assert "--window" in line and "dense" in line


def test_training_records_the_pattern(tiny_runs, tmp_path):
    """train.py --pattern window trains a model whose checkpoint says so, and --resume keeps it fixed."""
    data = tiny_runs.data("project20_sparse_attention")
    flags = [
        "--data",
        data,
        "--max-iters",
        "2",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--out",
        tmp_path,
    ]
    assert train_tiny(*flags, "--pattern", "window", "--window", "8") == 0
    assert P.checkpoint.read_config(tmp_path)["model"]["pattern"] == "window"
    rc = train_tiny(*flags[:-4], "--out", tmp_path, "--resume", "--max-iters", "4", "--pattern", "dense")
    assert rc == 2


def test_benchmark_on_the_cpu(tmp_path):
    """The CPU benchmark's fast parts: every pattern's error, the tiles visited, the memory formula."""
    args = [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--out",
        tmp_path,
        "--lengths",
        "256,512",
        "--window",
        "64",
    ]
    assert run_main(P.benchmark, *args, "--no-train", "--no-flex") == 0
    rows = read_report(tmp_path, "project20_sparse_attention")
    for name in SA.PATTERNS:
        for what in ("forward", "gradients"):
            assert rows[("max_abs_diff", f"{name}: {what} vs float64 masked, T=200")]["value"] < 1e-4
    window, dense = (rows[("tiles_visited", f"{v}, T=512")]["value"] for v in ("window 64", "dense"))
    assert window == 8 * 2 - 1 and dense == 8 * 9 // 2  # 64-token tiles: the diagonal and the one before
    assert rows[("tiles_slope", "window, T=256..512")]["value"] == pytest.approx(
        math.log(15 / 7) / math.log(2)
    )
    assert rows[("decode_cache_mib", "rolling, window 64, T=512")]["ratio"] == 64 / 512


def test_benchmark_with_one_length_or_too_long_ends_cleanly(tmp_path, monkeypatch, capsys):
    """One --lengths value has no slope (it was a ZeroDivisionError); lengths past bigbird's random table
    (and its (T, T) masks) end in one line instead of a traceback."""
    monkeypatch.setattr(P.benchmark, "correctness_rows", lambda device: [])
    args = ["--device", "cpu", "--preset", "tiny", "--out", tmp_path, "--window", "16", "--no-train"]
    assert run_main(P.benchmark, *args, "--no-flex", "--lengths", "64") == 0
    rows = read_report(tmp_path, "project20_sparse_attention")
    assert rows[("tiles_slope", "window, T=64..64")]["value"] is None
    capsys.readouterr()
    assert "at most" in assert_one_line_error(capsys, run_main(P.benchmark, *args, "--lengths", "70000"))


def test_benchmark_cut_short_on_the_gpu_writes_what_it_measured(monkeypatch):
    """run_benchmarks.py stops a benchmark past its budget with Ctrl-C: on the GPU path the rows measured
    until then are still written, the report says it was cut short, and the exit code is 130."""
    B, written = P.benchmark, {}

    def first_row_then_ctrl_c(args, dtype, device, rows):
        rows.append(B.row("attention_ms", "ours, fwd, T=1024", 1.0, "ms"))
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(B, "pick_dtype", lambda name, device: torch.bfloat16)
    monkeypatch.setattr(B, "correctness_rows", lambda device: [])
    monkeypatch.setattr(B, "tile_rows", lambda args, rows: None)
    monkeypatch.setattr(B, "kernel_rows", first_row_then_ctrl_c)
    monkeypatch.setattr(B, "write_report", lambda args, *a: written.update(config=a[-2], rows=a[-1]))
    assert B.main(["--lengths", "1024"]) == 130
    assert written["config"]["cut_short"] is True and written["config"]["dtype"] == "bfloat16"
    assert [r["value"] for r in written["rows"] if r["metric"] == "attention_ms"] == [1.0]


# The interpreter runs a kernel as Python and accepts what the GPU compiler refuses (project 09's lesson).
# Compiling for an H100/H200 (sm_90) needs no GPU, since Triton's wheel carries ptxas, but it needs the
# kernels as GPU kernels: a fresh process without TRITON_INTERPRET.
COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import sparse_attention as SA

def kind(name, constexprs):
    if name in constexprs:
        return "constexpr"
    if name in ("LSE", "DELTA"):
        return "*fp32"
    if name == "TILES":
        return "*i8"
    if name.startswith(("FULL_", "PART_")):
        return "*i32"
    if name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"):
        return "*bf16"
    return "fp32" if name.endswith("scale") else "i32"

shared = []
for kernel in (SA._sparse_fwd_kernel, SA._sparse_dkdv_kernel, SA._sparse_dq_kernel):
    for hs in (64, 128):
        constexprs = dict(HEAD_DIM=hs, BLOCK=64)
        signature = {name: kind(name, constexprs) for name in kernel.arg_names}
        consts = {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}
        source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
        options = dict(num_warps=4, num_stages=2)  # _launch_options on a GPU
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        shared.append(compiled.metadata.shared)
print(min(shared), max(shared))
"""


def test_kernels_compile_for_an_h100_without_a_gpu():
    """The three sparse kernels in bf16 at the GPU's 64-token tiles, head dims 64 and 128, compile for sm_90
    within its 227 KiB of shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", COMPILE_FOR_SM90]
    folder = P.model.__file__.rsplit("/", 1)[0]
    result = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    least, most = map(int, result.stdout.split()[-2:])
    assert 0 <= least and most <= 227 * 1024
