"""Project 10's prefix cache: generation with it gives the tokens and (within float rounding) the logits of
generation without it, on hits, partial hits, misses, prompts that diverge inside a block, after evictions and
under hash collisions; the cache keeps only full blocks, evicts least recently used leaves, never a block in
use, and stays within its budget; generate.py prints the same text with and without it and reports hits;
the benchmark reports its rows. (Checkpoints, bad input and causal masking: test_contract.py; pinned outputs:
test_golden.py.)"""

import pytest
import torch
from conftest import assert_one_line_error, load_project, printed, read_report, run_main, trained_char_gpt
from conftest import char_ids as ids

PROJECT = "project10_prompt_caching"
P = load_project(PROJECT)
PrefixCache = P.prefix_cache.PrefixCache
BLOCK = 4  # small blocks, so short prompts span many


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return trained_char_gpt(PROJECT)


SYSTEM = ids(30, 0)  # a shared prefix of 7 full blocks and 2 tokens


def greedy(model, prompt: list[int], prefix_cache=None, n: int = 40) -> list[int]:
    steps = model.generate_stream(torch.tensor([prompt]), n, temperature=0, prefix_cache=prefix_cache)
    return [t.item() for t in steps]


def bytes_per_block(model) -> int:
    c = model.config
    return c.n_layer * 2 * c.n_embd * BLOCK * 4  # float32 keys and values of every layer


def test_hits_misses_and_partial_hits_give_the_uncached_tokens(trained):
    cache = PrefixCache(10**8, kv_block_size=BLOCK)
    prompts = {
        "miss": SYSTEM + ids(7, 1),
        "partial hit: the shared prefix": SYSTEM + ids(9, 2),
        "full hit: the same prompt again": SYSTEM + ids(7, 1),
        "diverges inside a block": SYSTEM[:13] + ids(20, 3),
        "hit on an earlier reply": SYSTEM + ids(7, 1) + greedy(trained, SYSTEM + ids(7, 1))[:25],
    }
    reused = []
    for name, prompt in prompts.items():
        before = cache.hit_tokens
        assert greedy(trained, prompt, cache) == greedy(trained, prompt), name
        reused.append(cache.hit_tokens - before)
    # full blocks only, and never the prompt's last token: its logits start the generation
    assert reused == [0, 28, 36, 12, 60]


def test_logits_equal_a_full_forward_pass(trained):
    cache = PrefixCache(10**8, kv_block_size=BLOCK)
    greedy(trained, SYSTEM + ids(5, 4), cache)  # fills the cache
    prompt = torch.tensor([SYSTEM + ids(11, 5)])
    with torch.no_grad():
        trained.setup_cache(1, prompt.size(1) + 10)
        logits = trained.prefill_with_prefix_cache(prompt, cache)  # 28 tokens from the cache
        seq = prompt
        for slot in range(prompt.size(1), prompt.size(1) + 10):
            torch.testing.assert_close(logits, trained.next_token_logits(seq), rtol=0, atol=1e-5)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            logits = trained.decode(seq[:, -1:], slot)
        trained.clear_cache()
    assert cache.hit_tokens == 28


def test_sampled_tokens_with_the_same_seed_are_the_same(trained):
    cache = PrefixCache(10**8, kv_block_size=BLOCK)

    def sample(prefix_cache):
        g = torch.Generator().manual_seed(3)
        prompt = torch.tensor([SYSTEM + ids(6, 6)])
        return [
            t.item()
            for t in trained.generate_stream(prompt, 60, 1.0, 10, generator=g, prefix_cache=prefix_cache)
        ]

    first = sample(cache)
    assert sample(cache) == first == sample(None)  # the second run hits


def test_evictions_free_least_recently_used_leaves_and_outputs_stay_the_same(trained):
    cache = PrefixCache(12 * bytes_per_block(trained), kv_block_size=BLOCK)  # room for 12 blocks
    a, b, c = (ids(33, seed) for seed in (10, 11, 12))  # 8 full blocks each (the last token never cached)
    for prompt in (a, b, a, c, a):
        assert greedy(trained, prompt, cache, n=5) == greedy(trained, prompt, n=5)
        assert cache.bytes_used <= cache.capacity_bytes
    assert cache.num_blocks == 12
    hits = cache.hit_tokens
    greedy(trained, a, cache, n=1)
    assert cache.hit_tokens - hits > 0  # a, the most recently used, survived b's and c's arrivals


def test_a_block_in_use_is_never_evicted():
    cache = PrefixCache(4 * 64, kv_block_size=2)  # 4 blocks of 64 bytes
    kv = lambda start, end: torch.zeros(16, dtype=torch.float32)  # noqa: E731 - 64 bytes per block
    cache.insert([1, 2, 3, 4, 5], kv)  # 2 blocks
    held = cache.match([1, 2, 3, 4, 5])
    assert len(held) == 2
    assert cache.insert([7, 8, 9, 10, 11, 12, 13], kv) == 2  # only 2 of its 3 blocks fit: the held ones stay
    assert cache.match([1, 2, 3, 4, 5]) != []
    cache.release(held)
    cache.release(held)
    assert cache.insert(list(range(20, 29)), kv) == 4  # released: they may go now
    assert cache.match([1, 2, 3, 4, 5]) == []


def test_a_hash_collision_is_a_miss_not_another_prompts_keys(trained):
    cache = PrefixCache(10**8, kv_block_size=BLOCK, hash_fn=lambda parent, tokens: b"same")
    first, second = SYSTEM + ids(5, 7), ids(35, 8)
    greedy(trained, first, cache)
    assert greedy(trained, second, cache) == greedy(trained, second)
    assert cache.hit_tokens == 0


def test_chained_keys_name_the_whole_prefix():
    block = (1, 2, 3, 4)
    root = P.prefix_cache.block_hash(b"", block)
    assert P.prefix_cache.block_hash(root, block) != root  # the same tokens after another block
    assert P.prefix_cache.block_hash(b"", block) == root


def test_generate_prints_the_same_text_with_and_without_the_prefix_cache(tiny_runs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO: what\\nlight\nJULIET: oh\n\nROMEO: what\\nlight\n", encoding="utf-8")
    flags = ["--checkpoint", str(tiny_runs.checkpoint(PROJECT)), "--prompt-file", str(prompts)]
    system = "A shared system prompt, the same words before every question the model is asked. "  # 17 tokens
    flags += ["--system", system, "--max-new-tokens", "8"]
    cached = printed(P.generate, *flags)
    report = capsys.readouterr().err
    assert cached == printed(P.generate, *flags, "--no-prefix-cache")
    assert cached.count("--- prompt") == 3 and "ROMEO: what\nlight" in cached
    reused = [line.split()[2] for line in report.splitlines() if "prompt tokens reused" in line]
    assert reused == ["0", "16", "16"]  # the system prompt's first block, from the first request on
    assert "[prefix cache] hit rate" in report


def test_interactive_turns_reuse_the_conversation(tiny_runs, monkeypatch, capsys):
    lines = iter(["ROMEO: speak", "JULIET: again", "quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    flags = ["--checkpoint", str(tiny_runs.checkpoint(PROJECT)), "--interactive", "--max-new-tokens", "1"]
    system = "Two lovers talk in the garden at night, and the nurse calls from within the house."  # 18 tokens
    assert run_main(P.generate, *flags, "--system", system) == 0  # tiny's context: 32 tokens
    err = capsys.readouterr().err
    reused = [line.split()[2] for line in err.splitlines() if "prompt tokens reused" in line]
    assert reused == ["0", "16"]  # the second turn's prompt holds the first
    assert "starting again" not in err


def test_an_empty_prompt_file_is_a_one_line_error(tiny_runs, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    rc = run_main(P.generate, "--checkpoint", str(tiny_runs.checkpoint(PROJECT)), "--prompt-file", str(empty))
    assert "holds no prompt" in assert_one_line_error(capsys, rc)


def test_benchmark_reports_time_to_first_token_and_the_same_tokens(tmp_path):
    assert run_main(P.benchmark, "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path)) == 0
    rows = read_report(tmp_path, PROJECT)
    assert rows[("same_tokens", "prefix cache")]["value"] is True
    assert rows[("hit_rate", "prefix cache")]["value"] > 50
    assert rows[("median_ttft_ms", "prefix cache, hits only")]["baseline"] == "no prefix cache"


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--prompt", "a", "--prompt-file", "q.txt"], "--prompt"),
        (["--interactive", "--prompt-file", "q.txt"], "--interactive"),
        (["--no-prefix-cache", "--cache-mb", "64"], "--cache-mb"),
    ],
)
def test_contradictory_flags_are_refused(flags, named, capsys):
    assert named in assert_one_line_error(capsys, run_main(P.generate, *flags))


def test_a_request_for_no_tokens_caches_nothing_it_did_not_compute(trained):
    """generate_stream(prompt, 0) runs no prefill: its slots hold zeros, which must not be cached as the
    prompt's keys; the next request with that prompt gets the uncached logits and tokens."""
    cache = PrefixCache(10**8, kv_block_size=BLOCK)
    prompt = SYSTEM + ids(7, 6)
    assert greedy(trained, prompt, cache, n=0) == []
    assert len(cache.match(prompt)) == 0  # nothing was stored
    assert greedy(trained, prompt, cache) == greedy(trained, prompt)
