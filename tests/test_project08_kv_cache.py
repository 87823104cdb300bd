"""Project 08's KV cache: decoding with it gives the tokens and (within float rounding) the logits of decoding
without it, greedy and sampled, inside the context and past it; prompts of different lengths in one
left-padded batch give what each gives alone; transformers' generate (its own cache) picks the same tokens;
the cache holds 2 * n_layer * B * T * C * bytes; generate.py --no-cache prints what the default prints; the
benchmark reports its rows. (Checkpoints, bad input and causal masking: test_contract.py; pinned outputs:
test_golden.py.)"""

import json
from dataclasses import replace

import pytest
import torch
from conftest import (
    assert_one_line_error,
    load_project,
    printed,
    read_report,
    run_main,
    tiny_gpt,
    tiny_hf_model,
    trained_char_gpt,
)

PROJECT = "project08_kv_cache"
P = load_project(PROJECT)


def tokens(steps) -> list[int]:
    """generate_stream's (1, 1) tokens as a list."""
    return [t.item() for t in steps]


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return trained_char_gpt(PROJECT)


def prompt_of(model, n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def test_greedy_tokens_are_the_same_with_and_without_the_cache(trained):
    prompt = prompt_of(trained)
    cached = tokens(trained.generate_stream(prompt, 220, temperature=0))
    assert cached == tokens(trained.generate_stream(prompt, 220, temperature=0, use_cache=False))
    assert len(set(cached)) >= 4  # a varied text, not one token repeated


def test_past_the_context_the_window_slides_as_without_the_cache(tiny_runs):
    """tiny's 32-token context: after the first 24 steps every step re-prefills the newest window."""
    model, _ = P.checkpoint.load_checkpoint(tiny_runs.checkpoint(PROJECT))
    prompt = prompt_of(model, 8)
    cached = tokens(model.generate_stream(prompt, 200, temperature=0))
    assert cached == tokens(model.generate_stream(prompt, 200, temperature=0, use_cache=False))


def test_sampled_tokens_with_the_same_seed_are_the_same(trained):
    def sample(use_cache):
        g = torch.Generator().manual_seed(7)
        steps = trained.generate_stream(
            prompt_of(trained), 200, 1.0, top_k=20, generator=g, use_cache=use_cache
        )
        return tokens(steps)

    assert sample(True) == sample(False)


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "explicit"])
def test_logits_match_a_full_forward_pass_at_every_step(trained, flash):
    model = P.model.GPT(replace(trained.config, flash=flash))
    model.load_state_dict(trained.state_dict())
    model.eval()
    ids = torch.cat(
        [prompt_of(model), torch.tensor([tokens(model.generate_stream(prompt_of(model), 100, 0))])], 1
    )
    T = 16
    with torch.no_grad():
        model.setup_cache(1, ids.size(1))
        torch.testing.assert_close(
            model.prefill(ids[:, :T]), model.next_token_logits(ids[:, :T]), rtol=0, atol=1e-5
        )
        for slot in range(T, ids.size(1)):
            step = model.decode(ids[:, slot : slot + 1], slot)
            torch.testing.assert_close(step, model.next_token_logits(ids[:, : slot + 1]), rtol=0, atol=1e-5)
        # the prefill's logits at every prompt position, through forward's cached path
        model.setup_cache(1, T)
        cached, _ = model(ids[:, :T], input_pos=torch.arange(T))
        torch.testing.assert_close(cached, model(ids[:, :T])[0], rtol=0, atol=1e-5)


def test_a_left_padded_batch_gives_each_prompt_its_own_tokens(trained):
    prompts = [prompt_of(trained, n, seed=n)[0].tolist() for n in (3, 10, 17)]
    batch = trained.generate_batch(prompts, 60, temperature=0)  # (3, 60)
    for row, p in zip(batch.tolist(), prompts):
        assert row == tokens(trained.generate_stream(torch.tensor([p]), 60, temperature=0))


def test_a_left_padded_batch_slides_past_the_context_as_each_prompt_alone(tiny_runs):
    model, _ = P.checkpoint.load_checkpoint(tiny_runs.checkpoint(PROJECT))
    prompts = [prompt_of(model, n, seed=n)[0].tolist() for n in (2, 9, 20)]
    batch = model.generate_batch(prompts, 40, temperature=0)  # 20 + 40 > 32: every row slides at some step
    for row, p in zip(batch.tolist(), prompts):
        assert row == tokens(model.generate_stream(torch.tensor([p]), 40, temperature=0, use_cache=False))


def test_greedy_tokens_match_transformers_generate_with_its_cache(tmp_path):
    hf = tiny_hf_model()
    hf.save_pretrained(tmp_path)
    ours = P.hf.load_hf_dir(tmp_path).eval()
    prompt = prompt_of(ours, 8)
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=48, do_sample=False,
                      eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert tokens(ours.generate_stream(prompt, 48, temperature=0)) == out[0, 8:].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cache_holds_two_tensors_per_layer_of_every_position(dtype):
    model = tiny_gpt(PROJECT)
    c = model.config
    model.setup_cache(3, 40, dtype)
    caches = [m for m in model.modules() if isinstance(m, P.model.KVCache)]
    held = sum(b.numel() * b.element_size() for cache in caches for b in cache.buffers())
    assert held == 2 * c.n_layer * 3 * 40 * c.n_embd * dtype.itemsize  # 2 * n_layer * B * T * C * bytes
    assert not any("cache" in name for name in model.state_dict())  # never saved in a checkpoint
    model.clear_cache()
    assert not any(isinstance(m, P.model.KVCache) for m in model.modules())


def test_the_cache_refuses_what_it_cannot_hold():
    model = tiny_gpt(PROJECT, block_size=32)
    with pytest.raises(ValueError, match="longer than the context"):
        model.setup_cache(1, 33)
    with pytest.raises(ValueError, match="setup_cache"):
        model.prefill(torch.zeros((1, 4), dtype=torch.long))
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="does not fit"):
        model.prefill(torch.zeros((1, 9), dtype=torch.long))
    with pytest.raises(ValueError, match="past the KV cache"):
        model.decode(torch.zeros((1, 1), dtype=torch.long), 8)


def test_generate_prints_the_same_text_with_and_without_the_cache(tiny_runs, capsys):
    flags = ["--checkpoint", tiny_runs.checkpoint(PROJECT), "--prompt", "ROMEO:", "--max-new-tokens", 60]
    for sampling in (["--temperature", 0], ["--temperature", 1.0, "--seed", 3]):
        assert printed(P.generate, *flags, *sampling) == printed(P.generate, *flags, *sampling, "--no-cache")
    rc = run_main(
        P.generate, "--checkpoint", tiny_runs.checkpoint(PROJECT), "--no-cache", "--prompt", "a " * 40
    )
    assert "context" in assert_one_line_error(capsys, rc)


def test_benchmark_reports_both_paths_side_by_side(tiny_runs, tmp_path):
    flags = ["--preset", "tiny", "--lengths", "8,24", "--device", "cpu", "--out", tmp_path]
    assert run_main(P.benchmark, *flags, "--checkpoint", tiny_runs.checkpoint(PROJECT)) == 0
    rows = read_report(tmp_path, PROJECT)
    for n in (8, 24):
        cached = rows[("decode_tok_per_s", f"kv cache, {n} new")]
        assert cached["value"] > 0 and cached["baseline"] == f"no cache, {n} new"
        assert rows[("decode_tok_per_s", f"kv cache + compile, {n} new")]["value"] is None  # CUDA only
    formula, buffers = (
        rows[("cache_memory_mib", "formula, T = 32")],
        rows[("cache_memory_mib", "KVCache buffers, T = 32")],
    )
    assert formula["value"] == buffers["value"] == 2 * 2 * 32 * 32 * 4 / 2**20
    assert rows[("same_greedy_tokens", "kv cache vs no cache, 200 new")]["value"] is True
    assert rows[("same_greedy_tokens", "batched (left-padded) vs alone")]["value"] is True
    assert rows[("same_greedy_tokens", "HF generate vs kv cache, 16 new")]["value"] is True
    assert 0 <= rows[("max_abs_logit_diff", "kv cache vs no cache, every step")]["value"] < 1e-4


def test_compiled_decoding_cut_short_keeps_what_it_timed(trained, monkeypatch):
    """On the GPU compiling and timing the compiled step take the longest; a Ctrl-C there (run_benchmarks.py's
    budget) reaches the caller after the lengths already timed, and the model is left without its cache."""
    steps = []

    def compile_then_ctrl_c(fn, **kwargs):
        def step(*args):  # the compiled step: fine for the warm-up and the first length, then Ctrl-C
            steps.append(1)
            if len(steps) > 2 + 7 + 7:  # run(3) makes 2 steps; length 8, an untimed and a timed run of 7
                raise KeyboardInterrupt
            return fn(*args)

        return step

    monkeypatch.setattr(P.benchmark.torch, "compile", compile_then_ctrl_c)
    timed = []
    with pytest.raises(KeyboardInterrupt):
        for n, tok_s in P.benchmark.compiled_decoding(
            trained, prompt_of(trained), [8, 16], torch.device("cpu"), 1
        ):
            timed.append((n, tok_s > 0))
    assert timed == [(8, True)]
    assert all(block.attn.kv_cache is None for block in trained.blocks)


def test_benchmark_cut_short_writes_its_rows_and_exits_130(tmp_path, monkeypatch):
    """speed_rows says a Ctrl-C cut it short: main writes those rows, marks the report, skips the identity
    checks (the user asked to stop) and exits 130, which run_benchmarks.py shows as "cut short"."""
    B = P.benchmark
    timed = [B.row("decode_tok_per_s", "kv cache, 8 new", 100.0, "tok/s")]
    monkeypatch.setattr(B, "speed_rows", lambda *args: (timed, True))
    monkeypatch.setattr(B, "identity_rows", lambda *args: pytest.fail("ran after a Ctrl-C"))
    flags = ["--preset", "tiny", "--lengths", "8", "--device", "cpu", "--out", tmp_path]
    assert run_main(B, *flags) == 130
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["config"]["cut_short"] is True and [r["value"] for r in report["rows"]] == [100.0]
