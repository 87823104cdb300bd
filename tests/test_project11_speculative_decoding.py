"""Project 11's speculative decoding: greedy output is the target's own, token for token, with a draft model
that agrees often, one that never does, one with a shorter context, and prompt lookup, at several k, past the
context end; sampled output has the target's distribution (a chi-square test on the rule over many rows,
and on the whole decoder over many samples) and the same test catches three broken acceptance rules; both KV
caches are rolled back to the accepted length; generate.py --draft / --drafter lookup print the target's text
and refuse a draft with another vocabulary; the benchmark reports its rows."""

import copy

import pytest
import torch
from conftest import (
    assert_one_line_error,
    load_project,
    printed,
    read_report,
    run_main,
    tiny_gpt,
    trained_char_gpt,
)

PROJECT = "project11_speculative_decoding"
P = load_project(PROJECT)
S = P.speculative
META = {"tokenizer": {"type": "tiktoken", "name": "gpt2"}, "training": {}}


def tokens(steps) -> list[int]:
    return [t.item() for t in steps]


def prompt_of(model, n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def target() -> torch.nn.Module:
    return trained_char_gpt(PROJECT, block_size=64)  # 16 + 150 tokens run past its context


@pytest.fixture(scope="module")
def drafts(target) -> dict:
    """Draft models: the target with noise (most drafts kept, some not), and a random smaller model with half
    the context (almost none kept; past its 32 tokens it drafts nothing and the target goes on alone)."""
    close = copy.deepcopy(target)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in close.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g))
    small = tiny_gpt(
        PROJECT, seed=3, vocab_size=target.config.vocab_size, block_size=32, n_layer=1, n_embd=16
    )
    return {"close": close, "small": small}


def decoder(target, drafts, name: str, k: int):
    drafter = S.LookupDrafter() if name == "lookup" else S.ModelDrafter(drafts[name], target)
    return S.SpeculativeDecoder(target, drafter, k)


# --- greedy: the target's own tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("name", ["close", "small", "lookup"])
def test_greedy_output_is_the_targets_own_token_for_token(target, drafts, name, k):
    prompt = prompt_of(target, seed=k)
    expected = tokens(target.generate_stream(prompt, 150, temperature=0))
    spec = decoder(target, drafts, name, k)
    assert tokens(spec.generate_stream(prompt, 150, temperature=0)) == expected
    stats = spec.stats
    assert stats.steps <= 64 - 16 + 1  # at most a pass per token up to the context, then the target alone
    if name != "small":  # both paths taken: accepted drafts and rejected ones
        assert stats.accepted > 0 and stats.rejections > 0


def test_with_the_prefix_cache_the_output_is_still_the_targets_own(target, drafts):
    """Project 10's cache gives the target's prefill (and the first token); the drafts start after it."""
    cache = P.prefix_cache.PrefixCache(10**8, kv_block_size=4)
    prompt = prompt_of(target, 30, seed=5)
    expected = tokens(target.generate_stream(prompt, 30, temperature=0))
    for _ in range(2):  # a miss, then a hit on 28 of the prompt's 30 tokens
        spec = decoder(target, drafts, "close", 5)
        assert tokens(spec.generate_stream(prompt, 30, temperature=0, prefix_cache=cache)) == expected
    assert cache.hit_tokens == 28


def test_sampling_and_filters_run_with_every_drafter(target, drafts):
    for name in ("close", "small", "lookup"):
        spec = decoder(target, drafts, name, 4)
        g = torch.Generator().manual_seed(0)
        out = tokens(spec.generate_stream(prompt_of(target), 120, 0.9, top_k=10, top_p=0.9, generator=g))
        assert len(out) == 120 and all(0 <= t < target.config.vocab_size for t in out)


def test_both_caches_are_rolled_back_to_the_accepted_length(target, drafts):
    """After every speculative step, the slots each cache keeps give the logits of a fresh full forward pass,
    though the slots past them still hold the keys of rejected drafts."""
    spec = decoder(target, drafts, "close", 5)
    draft = spec.drafter
    prompt = prompt_of(target)
    ids, checked_after_rejection, rejections = prompt, 0, 0
    with torch.no_grad():
        for next_id in spec.generate_stream(prompt, 40, temperature=0):
            ids = torch.cat([ids, next_id], dim=1)
            if spec.cached != ids.size(1) - 1:  # inside a step: its tokens are still being yielded
                continue
            fresh = target.next_token_logits(ids)  # (1, V), no cache
            cached = target.verify(ids[:, spec.cached :], spec.cached, 1)[:, -1]
            torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-5)
            fresh = draft.model.next_token_logits(ids)
            cached = draft.model.verify(ids[:, draft.cached :], draft.cached, 1)[:, -1]
            torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-5)
            checked_after_rejection += spec.stats.rejections > rejections
            rejections = spec.stats.rejections
    assert checked_after_rejection >= 3


def test_the_lookup_drafter_copies_what_followed_the_last_ngram():
    lookup = S.LookupDrafter(max_ngram=3)
    greedy = (0.0, None, None)
    text = torch.tensor([[5, 6, 7, 1, 5, 6, 7, 1, 5, 6]])
    assert lookup.propose(text, 3, greedy, None)[0].tolist() == [7, 1, 5]  # "1 5 6" at 3: its earliest match
    assert lookup.propose(text, 20, greedy, None)[0].tolist() == [7, 1, 5, 6]  # to the end of the text
    assert lookup.propose(torch.tensor([[1, 2, 3, 9, 2]]), 3, greedy, None)[0].tolist() == [3, 9, 2]  # 1-gram
    assert lookup.propose(torch.tensor([[1, 2, 3, 4]]), 3, greedy, None)[0].tolist() == []  # nothing to copy


# --- sampling: the target's distribution --------------------------------------------------------------------


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probabilities: the chance of a worse fit if they were right; 0 when a
    cell of probability 0 is not empty (a token the target never samples came out)."""
    expected = probs.double().flatten() * counts.sum()
    counts = counts.double().flatten()
    seen = expected > 0
    if counts[~seen].sum() > 0:
        return 0.0
    stat = ((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum()
    df = torch.tensor((seen.sum().item() - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, stat / 2).item()


def variant_rule(keep_probability, at_rejection):
    """A rule of accept_sampled's shape with its two parts replaceable: the probability of keeping a draft,
    from (p(x), q(x)), and the distribution sampled at the first rejection, from (p, q) there."""

    def rule(p, q, drafts, generator):
        B, k = drafts.shape
        p_draft = p[:, :k].gather(-1, drafts[..., None])[..., 0]
        q_draft = q.gather(-1, drafts[..., None])[..., 0]
        keep = torch.rand((B, k), generator=generator) < keep_probability(p_draft, q_draft)
        accepted = keep.int().cumprod(dim=1).sum(dim=1)
        rows = torch.arange(B)
        p_next = p[rows, accepted]
        q_next = torch.cat([q, q.new_zeros((B, 1, q.size(-1)))], dim=1)[rows, accepted]
        dist = torch.where((accepted < k)[:, None], at_rejection(p_next, q_next), p_next)
        return accepted, torch.multinomial(dist, 1, generator=generator)[:, 0]

    return rule


BROKEN_RULES = {
    "always accept": variant_rule(lambda pd, qd: torch.ones_like(pd), lambda p, q: (p - q).clamp(min=0)),
    "resample from p": variant_rule(lambda pd, qd: (pd / qd).clamp(max=1), lambda p, q: p),
    "ratio q/p": variant_rule(lambda pd, qd: (qd / pd).clamp(max=1), lambda p, q: (p - q).clamp(min=0)),
}
V, K, LENGTH, ROWS = 4, 3, 3, 40_000


def markov_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """A target and a draft that depend on the last token only, (V, V) each: the exact distribution of a
    sequence is then a product of table entries. The draft disagrees with the target a good deal."""
    g = torch.Generator().manual_seed(0)
    return torch.softmax(torch.randn(V, V, generator=g), -1), torch.softmax(
        2 * torch.randn(V, V, generator=g), -1
    )


def speculative_markov(rule, p_table, q_table, generator) -> torch.Tensor:
    """ROWS independent sequences of LENGTH tokens after token 0, each by speculative steps of K drafts with
    `rule`, all rows at once. (ROWS, LENGTH)."""
    out = torch.zeros(ROWS, LENGTH + K + 1, dtype=torch.long)
    length, last, rows = (
        torch.zeros(ROWS, dtype=torch.long),
        torch.zeros(ROWS, dtype=torch.long),
        torch.arange(ROWS),
    )
    while (length < LENGTH).any():
        drafts, qs, ps = [], [], [p_table[last]]
        for _ in range(K):
            qs.append(q_table[last if not drafts else drafts[-1]])
            drafts.append(torch.multinomial(qs[-1], 1, generator=generator)[:, 0])
            ps.append(p_table[drafts[-1]])
        drafts = torch.stack(drafts, dim=1)  # (ROWS, K)
        accepted, next_id = rule(torch.stack(ps, 1), torch.stack(qs, 1), drafts, generator)
        new = torch.cat([drafts, next_id[:, None]], dim=1)  # position `accepted` gets next_id
        new[rows, accepted] = next_id
        active = length < LENGTH
        for j in range(K + 1):
            write = active & (j <= accepted)
            out[rows[write], length[write] + j] = new[write, j]
        length, last = length + (accepted + 1) * active, next_id
    return out[:, :LENGTH]


def markov_p_value(rule) -> float:
    p_table, q_table = markov_tables()
    seqs = speculative_markov(rule, p_table, q_table, torch.Generator().manual_seed(1))
    exact = p_table[0][:, None, None] * p_table[:, :, None] * p_table[None, :, :]  # (V, V, V): x1, x2, x3
    counts = torch.bincount(seqs[:, 0] * V * V + seqs[:, 1] * V + seqs[:, 2], minlength=V**3)
    return chi_square_p_value(counts, exact)


def test_the_acceptance_rule_gives_the_targets_distribution():
    """40,000 sequences of three tokens, each made by speculative steps of 3 drafts (every path: drafts kept,
    rejected at each position, the extra token after all three), against the exact joint distribution."""
    assert markov_p_value(S.accept_sampled) > 1e-3
    assert (
        markov_p_value(variant_rule(lambda pd, qd: (pd / qd).clamp(max=1), lambda p, q: (p - q).clamp(min=0)))
        > 1e-3
    )


@pytest.mark.parametrize("broken", BROKEN_RULES)
def test_the_same_test_catches_a_broken_acceptance_rule(broken):
    assert markov_p_value(BROKEN_RULES[broken]) < 1e-6


@pytest.fixture(scope="module")
def tiny_pair() -> tuple:
    """A target and a draft with a vocabulary of 6 that disagree (total variation 0.3-0.4 between their next
    token distributions here), no token near-certain: (target, draft, prompt)."""
    target = tiny_gpt(PROJECT, seed=2, vocab_size=6, block_size=16)
    draft = tiny_gpt(PROJECT, seed=3, vocab_size=6, block_size=16, n_layer=1)
    return target, draft, torch.tensor([[1, 2, 3, 1, 2]])  # lookup finds "1 2" and proposes "3 1 2"


SAMPLING = dict(temperature=0.9, top_k=5)  # top-k 5 of 6: every step rules one token out


def decoder_p_value(target, drafter, prompt, samples: int = 1500) -> tuple[float, object]:
    """The first two sampled tokens of `samples` runs of the whole decoder (k = 3) against the target's exact
    joint distribution of them, computed from its own logits; and the decoder's statistics."""
    spec = S.SpeculativeDecoder(target, drafter, 3)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6, 6, dtype=torch.long)
    for _ in range(samples):
        first, second = tokens(spec.generate_stream(prompt, 4, generator=g, **SAMPLING))[:2]
        counts[first, second] += 1
    with torch.no_grad():
        p1 = P.model.probabilities(target.next_token_logits(prompt), **SAMPLING)[0]  # (6,)
        after = torch.cat([prompt.expand(6, -1), torch.arange(6)[:, None]], dim=1)  # every first token
        p2 = P.model.probabilities(target.next_token_logits(after), **SAMPLING)  # (6, 6)
    return chi_square_p_value(counts, p1[:, None] * p2), spec.stats


def drafter_of(tiny_pair, name: str):
    target, draft, _ = tiny_pair
    return S.ModelDrafter(draft, target) if name == "model" else S.LookupDrafter()


@pytest.mark.parametrize("name", ["model", "lookup"])
def test_sampled_tokens_of_the_decoder_follow_the_targets_distribution(tiny_pair, name):
    target, _, prompt = tiny_pair
    p_value, stats = decoder_p_value(target, drafter_of(tiny_pair, name), prompt)
    assert p_value > 1e-3
    assert stats.accepted > 0 and stats.rejections > 0  # both paths taken


# (Resampling from p at a rejection barely changes the lookup's output here: its one-hot q takes little of p.)
BROKEN_IN_DECODER = [("model", rule) for rule in BROKEN_RULES] + [
    ("lookup", "always accept"),
    ("lookup", "ratio q/p"),
]


@pytest.mark.parametrize("name, broken", BROKEN_IN_DECODER)
def test_the_decoder_test_catches_a_broken_acceptance_rule(tiny_pair, name, broken, monkeypatch):
    monkeypatch.setattr(S, "accept_sampled", BROKEN_RULES[broken])
    target, _, prompt = tiny_pair
    assert decoder_p_value(target, drafter_of(tiny_pair, name), prompt, samples=400)[0] < 1e-6


def test_expected_speedup_formula():
    """Leviathan et al.'s eq. 1 and theorem 3.8 at their limits and one value worked by hand."""
    B = P.benchmark
    assert B.expected_tokens_per_pass(0.0, 5) == 1.0 and B.expected_tokens_per_pass(1.0, 5) == 6.0
    assert B.expected_tokens_per_pass(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert B.expected_speedup(0.5, 2, c=0.25) == pytest.approx(1.75 / 1.5)
    assert B.expected_speedup(0.5, 2, c=0.25, verify=2.0) == pytest.approx(1.75 / 2.5)


# --- the scripts --------------------------------------------------------------------------------------------


def test_the_draft_preset_is_a_smaller_gpt_with_the_targets_tokenizer_and_context():
    draft, target = P.config.PRESETS["draft"][0], P.config.PRESETS["cpu"][0]
    assert (draft.vocab_size, draft.block_size) == (target.vocab_size, target.block_size)
    assert P.model.GPT(draft).num_params() < P.model.GPT(target).num_params() / 2


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory):
    """A random one-layer draft with GPT-2's vocabulary, as a checkpoint."""
    path = tmp_path_factory.mktemp("draft") / "small"
    model = tiny_gpt(PROJECT, seed=5, vocab_size=50257, block_size=32, n_layer=1, n_embd=16)
    P.checkpoint.save_checkpoint(path, model, META)
    return path


def test_generate_with_a_drafter_prints_the_targets_own_greedy_text(tiny_runs, small_draft, capsys):
    target = tiny_runs.checkpoint(PROJECT)
    flags = ["--checkpoint", target, "--prompt", "ROMEO:", "--max-new-tokens", 40, "--temperature", 0]
    plain = printed(P.generate, *flags)  # 3 + 40 tokens: past tiny's 32-token context
    capsys.readouterr()
    for drafter in (
        ["--draft", target],
        ["--draft", small_draft, "--speculate-k", 3],
        ["--drafter", "lookup"],
    ):
        assert printed(P.generate, *flags, *drafter) == plain, drafter
        assert "[speculative]" in capsys.readouterr().err
    sampled = ["--checkpoint", target, "--draft", small_draft, "--temperature", 1.0, "--seed", 3]
    assert printed(P.generate, *sampled) == printed(P.generate, *sampled)  # same seed, same sample


def test_generate_refuses_a_draft_with_another_vocabulary(tiny_runs, tmp_path, capsys):
    other = tmp_path / "other"
    P.checkpoint.save_checkpoint(other, tiny_gpt(PROJECT, vocab_size=100), META)
    rc = run_main(P.generate, "--checkpoint", tiny_runs.checkpoint(PROJECT), "--draft", other)
    assert "vocabulary" in assert_one_line_error(capsys, rc)


@pytest.mark.parametrize(
    "flags",
    [["--drafter", "lookup", "--draft", "x"], ["--drafter", "lookup", "--no-cache"], ["--speculate-k", "0"]],
)
def test_generate_refuses_contradictory_flags(tiny_runs, capsys, flags):
    rc = run_main(P.generate, "--checkpoint", tiny_runs.checkpoint(PROJECT), *flags)
    assert_one_line_error(capsys, rc)


def test_benchmark_reports_target_and_speculative_rows(tiny_runs, tmp_path):
    target = tiny_runs.checkpoint(PROJECT)
    flags = ["--checkpoint", target, "--ks", "2", "--lookup-k", 3, "--new-tokens", 8, "--repeats", 1,
             "--temperatures", "0,1", "--no-124m", "--device", "cpu"]  # fmt: skip
    assert run_main(P.benchmark, *flags, "--draft", target, "--out", tmp_path / "a") == 0
    rows = read_report(tmp_path / "a", PROJECT)
    assert rows[("decode_tok_per_s", "draft k=2, T=0")]["baseline"] == "target alone, T=0"
    assert rows[("acceptance_rate", "draft k=2, T=0")]["value"] == 1.0  # the target as its own draft
    assert rows[("tokens_per_pass", "draft k=2, T=0")]["value"] > 1.0
    assert rows[("greedy_tokens_as_target", "lookup k=3, T=0")]["value"] == 1.0
    assert rows[("expected_speedup", "draft k=2, T=1")]["value"] > 0
    assert rows[("decode_step_ms", "target: draft step")]["ratio"] == pytest.approx(1.0, rel=0.5)
    # no draft model: its rows say so, the rest is measured
    assert run_main(P.benchmark, *flags, "--draft", tmp_path / "none", "--out", tmp_path / "b") == 0
    rows = read_report(tmp_path / "b", PROJECT)
    assert rows[("decode_tok_per_s", "draft k=2, T=0")]["value"] is None
    assert rows[("decode_tok_per_s", "lookup k=3, T=0")]["value"] > 0


def test_speculate_k_without_a_drafter_is_refused(capsys):
    rc = run_main(P.generate, "--speculate-k", "3", "--prompt", "a")
    assert "--drafter" in assert_one_line_error(capsys, rc)


@pytest.mark.parametrize("name", ["close", "lookup"])
def test_a_prompt_longer_than_the_context_slides_with_the_prefix_cache_too(target, drafts, name):
    """As the target alone (and speculative decoding without the cache) slides the window, so does it with
    project 10's cache: no error, and greedy gives the target's own tokens."""
    cache = P.prefix_cache.PrefixCache(10**8, kv_block_size=4)
    prompt = prompt_of(target, target.config.block_size + 8, seed=9)  # longer than the context
    expected = tokens(target.generate_stream(prompt, 20, temperature=0))
    got = tokens(
        decoder(target, drafts, name, 4).generate_stream(prompt, 20, temperature=0, prefix_cache=cache)
    )
    assert got == expected
