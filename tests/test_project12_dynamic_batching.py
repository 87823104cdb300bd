"""Project 12's serving engine: under staggered arrivals, mixed prompt lengths and max_tokens, every request
gets the tokens (greedy, and sampled with its own seed) and the logits it would get alone; a finished request
frees its row at once (static batching waits for the batch); the scheduler keeps its limits and its FIFO
order; a full KV budget makes requests wait; abort frees a row without disturbing the others; bad requests
are ValueErrors that leave the running ones alone; stop strings and stop tokens end a request; the prefix
cache changes nothing but the work; generate.py serves prompt files through the engine; the benchmark writes
vLLM's serving metrics. (Checkpoints, bad input and causal masking: test_contract.py; pinned outputs:
test_golden.py.)"""

import functools
import json

import pytest
import torch
from conftest import STAGGERED_REQUESTS as STAGGERED
from conftest import (
    assert_one_line_error,
    engine_arrivals,
    load_project,
    make_corpus,
    printed,
    read_report,
    run_main,
    trained_char_gpt,
)
from conftest import char_ids as ids
from conftest import generate_alone as alone
from conftest import serve_engine as serve

PROJECT = "project12_dynamic_batching"
P = load_project(PROJECT)
Engine, EngineConfig = P.engine.Engine, P.engine.EngineConfig
SamplingParams = P.sequence.SamplingParams
GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return trained_char_gpt(PROJECT)  # context 256


class Chars:
    """trained_char_gpt's character vocabulary, as the engine's tokenizer."""

    def __init__(self):
        self.chars = sorted(set(make_corpus(100)))

    def encode(self, text: str) -> list[int]:
        return [self.chars.index(c) for c in text]

    def id_to_bytes(self, token_id: int) -> bytes:
        return self.chars[token_id].encode()


# --- every request gets what it would get alone -----------------------------------------------------------


arrivals_of = functools.partial(engine_arrivals, SamplingParams)


def test_staggered_arrivals_give_each_request_its_greedy_tokens_alone(trained):
    expected = [alone(trained, prompt, n, **GREEDY) for _, prompt, n in STAGGERED]
    engine = Engine(trained, EngineConfig(max_num_seqs=3, max_num_batched_tokens=256))
    got, outputs, steps = serve(engine, arrivals_of(STAGGERED, **GREEDY))
    assert got == expected
    assert max(len(s) for s in steps) == 3  # they did run together
    assert [o[-1].finish_reason for o in outputs] == ["length"] * len(STAGGERED)
    assert not engine.has_unfinished() and len(engine.scheduler.free_rows) == 3


def test_seeded_sampling_gives_each_request_its_tokens_alone(trained):
    kinds = [dict(temperature=1.0), dict(temperature=0.8, top_k=5), dict(temperature=1.2, top_p=0.9)]
    requests = [
        (step, prompt, n, {**kinds[i % 3], "seed": 100 + i}) for i, (step, prompt, n) in enumerate(STAGGERED)
    ]
    expected = [alone(trained, prompt, n, **sampling) for _, prompt, n, sampling in requests]
    arrivals = {}
    for step, prompt, n, sampling in requests:
        arrivals.setdefault(step, []).append((prompt, SamplingParams(max_tokens=n, **sampling)))
    got, _, _ = serve(Engine(trained, EngineConfig(max_num_seqs=3, max_num_batched_tokens=256)), arrivals)
    assert got == expected
    assert len({tuple(t) for t in got}) == len(got)


def test_every_steps_logits_equal_a_full_forward_pass(trained):
    """Greedy tokens can hide a small error; the logits of every sequence at every step cannot."""
    engine = Engine(trained, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256))
    real, captured = trained.step_logits, []
    trained.step_logits = lambda idx, batch: captured.append(real(idx, batch)) or captured[-1]
    try:
        history = {}
        arrivals = arrivals_of(STAGGERED[:6], **GREEDY)
        prompts = [prompt for _, prompt, _ in STAGGERED[:6]]
        for step in range(60):
            for prompt, params in arrivals.get(step, []):
                history[engine.add_request(prompt, params)] = list(prompt)
            for row, out in enumerate(engine.step()):
                with torch.no_grad():
                    full = trained(torch.tensor([history[out.request_id][-256:]]))[0][0, -1]
                torch.testing.assert_close(captured[-1][row], full, rtol=0, atol=1e-5)
                history[out.request_id] += out.token_ids
    finally:
        del trained.step_logits
    assert [history[r][: len(p)] for r, p in enumerate(prompts)] == prompts


# --- the scheduler --------------------------------------------------------------------------------------


def test_a_finished_request_frees_its_row_for_the_next_step(trained):
    def first_steps(static: bool) -> list[int]:
        engine = Engine(trained, EngineConfig(max_num_seqs=2, static=static))
        arrivals = {
            0: [(ids(8, i), SamplingParams(max_tokens=n, **GREEDY)) for i, n in enumerate((2, 10, 3))]
        }
        _, _, steps = serve(engine, arrivals)
        return [next(i for i, s in enumerate(steps) if r in s) for r in range(3)]

    assert first_steps(static=False) == [0, 0, 2]  # the first request's second token ends it at step 1
    assert first_steps(static=True) == [0, 0, 10]  # static batching: after the batch's longest request


def test_limits_and_first_come_first_served(trained):
    engine = Engine(trained, EngineConfig(max_num_seqs=3, max_num_batched_tokens=256))
    real, scheduled = engine.scheduler.schedule, []

    def record():
        seqs = real()
        scheduled.append([(s.request_id, len(s.next_tokens(256)[0])) for s in seqs])
        return seqs

    engine.scheduler.schedule = record
    lengths = [120, 100, 50, 90, 10, 200, 30, 5]  # prompts; 120 + 100 + 50 > 256
    arrivals = {0: [(ids(n, i), SamplingParams(max_tokens=6, **GREEDY)) for i, n in enumerate(lengths)]}
    got, _, _ = serve(engine, arrivals)
    assert all(len(s) <= 3 and sum(n for _, n in s) <= 256 for s in scheduled)
    admitted = [next(i for i, s in enumerate(scheduled) if r in dict(s)) for r in range(8)]  # first steps
    assert admitted == sorted(admitted)  # first come, first served: the short prompts do not overtake
    assert [r for r, _ in scheduled[0]] == [0, 1]  # the third prompt waits for the token budget, not a row
    assert got[5] == alone(trained, ids(200, 5), 6, **GREEDY)


def test_a_full_kv_budget_makes_requests_wait_not_fail(trained):
    c = trained.config
    row_mib = c.n_layer * 2 * c.block_size * c.n_embd * 4 / 2**20  # one sequence's whole context
    engine = Engine(trained, EngineConfig(max_num_seqs=8, kv_cache_mb=2.5 * row_mib))
    assert engine.max_num_seqs == 2
    requests = [(0, ids(10 + 7 * i, 20 + i), 5 + 3 * i) for i in range(5)]
    got, _, steps = serve(engine, arrivals_of(requests, **GREEDY))
    assert got == [alone(trained, prompt, n, **GREEDY) for _, prompt, n in requests]
    assert max(len(s) for s in steps) == 2
    with pytest.raises(ValueError, match="holds no sequence"):
        Engine(trained, EngineConfig(kv_cache_mb=0.5 * row_mib))
    with pytest.raises(ValueError, match="below the context"):
        Engine(trained, EngineConfig(max_num_batched_tokens=100))
    with pytest.raises(ValueError, match="does not fit in memory"):  # 10**9 rows: 122 TiB
        Engine(trained, EngineConfig(max_num_seqs=10**9))


def test_abort_frees_the_row_and_leaves_the_others_alone(trained):
    engine = Engine(trained, EngineConfig(max_num_seqs=2))
    keep = [ids(12, 30), ids(25, 31)]
    first = engine.add_request(keep[0], SamplingParams(max_tokens=40, **GREEDY))
    doomed = engine.add_request(ids(20, 32), SamplingParams(max_tokens=40, **GREEDY))
    waiting = engine.add_request(keep[1], SamplingParams(max_tokens=40, **GREEDY))
    never = engine.add_request(ids(7, 33), SamplingParams(max_tokens=40, **GREEDY))
    tokens = {first: [], waiting: []}
    for _ in range(5):
        for out in engine.step():
            tokens.get(out.request_id, []).extend(out.token_ids)
    assert engine.scheduler.free_rows == []
    assert engine.abort(doomed) and engine.abort(never)
    assert len(engine.scheduler.free_rows) == 1  # at once, not at the next step
    assert [s.request_id for s in engine.scheduler.schedule()] == [first, waiting]  # the waiting one's turn
    assert not engine.abort(doomed) and not engine.abort(12345)


def test_abort_mid_way_changes_nothing_for_the_others(trained):
    engine = Engine(trained, EngineConfig(max_num_seqs=3))
    prompts = [ids(12, 40), ids(30, 41), ids(5, 42)]
    rids = [engine.add_request(p, SamplingParams(max_tokens=30, **GREEDY)) for p in prompts]
    tokens = {r: [] for r in rids}
    for step in range(40):
        if step == 7:
            engine.abort(rids[1])
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert len(tokens[rids[1]]) == 7
    assert [tokens[rids[0]], tokens[rids[2]]] == [alone(trained, prompts[i], 30, **GREEDY) for i in (0, 2)]
    assert not engine.has_unfinished()


def test_closing_generate_early_aborts_its_requests(trained):
    engine = Engine(trained, EngineConfig(max_num_seqs=2))
    stream = engine.generate([ids(5, 50), ids(6, 51), ids(7, 52)], SamplingParams(max_tokens=50, **GREEDY))
    next(stream)
    stream.close()
    assert not engine.has_unfinished() and len(engine.scheduler.free_rows) == 2


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        ([], {}, "empty"),
        ([1] * 257, {}, "longer than the context"),
        ([1, 2, 999], {}, "outside"),
        ([1, 2], {"stop": ("x",)}, "tokenizer"),
        ("text", {}, "tokenizer"),
    ],
)
def test_a_bad_request_is_a_value_error_and_the_others_go_on(trained, prompt, params, message):
    engine = Engine(trained, EngineConfig(max_num_seqs=2))
    good = engine.add_request(ids(9, 60), SamplingParams(max_tokens=20, **GREEDY))
    tokens = [t for out in engine.step() for t in out.token_ids]
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams(**params))
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.token_ids]
    assert tokens == alone(trained, ids(9, 60), 20, **GREEDY)
    assert engine.abort(good) is False


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 0},
        {"max_tokens": -3},
        {"temperature": -1},
        {"temperature": 1e-9},
        {"top_p": 0},
        {"top_k": 0},
        {"top_k": 50.0},  # would fail inside a step shared with other requests
        {"seed": -1},
        {"seed": 1.5},
        {"stop": ("",)},
        {"stop": "ab"},
    ],
)
def test_bad_sampling_parameters_are_value_errors(params):
    with pytest.raises(ValueError):
        SamplingParams(**params)


# --- stop strings and tokens ----------------------------------------------------------------------------


def test_stop_strings_end_the_text_before_them_and_streamed_text_is_never_taken_back(trained):
    chars = Chars()
    prompt = "ROMEO:\nThe"
    full = "".join(chars.chars[t] for t in alone(trained, chars.encode(prompt), 60, **GREEDY))
    stop = full[20:23]  # three characters the greedy text holds
    engine = Engine(trained, EngineConfig(max_num_seqs=2), tokenizer=chars)
    outs = [
        out
        for _, out in engine.generate(
            [prompt, prompt],
            [
                SamplingParams(max_tokens=60, stop=(stop, "never"), **GREEDY),
                SamplingParams(max_tokens=60, **GREEDY),
            ],
        )
    ]
    stopped = [o for o in outs if o.request_id == 0]
    assert "".join(o.text for o in stopped) == full[: full.find(stop)]
    assert stopped[-1].finish_reason == "stop" and len(stopped) < 60
    assert "".join(o.text for o in outs if o.request_id == 1) == full  # its neighbour runs on


def test_a_stop_token_ends_the_request_and_is_not_output(trained):
    tokens = alone(trained, ids(10, 70), 30, **GREEDY)
    stop = tokens[12]
    engine = Engine(trained)
    outs = [
        out
        for _, out in engine.generate(
            [ids(10, 70)], SamplingParams(max_tokens=30, stop_token_ids=(stop,), **GREEDY)
        )
    ]
    assert [t for o in outs for t in o.token_ids] == tokens[: tokens.index(stop)]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"


# --- the prefix cache inside the engine -----------------------------------------------------------------


def test_the_prefix_cache_changes_the_work_not_the_tokens(trained):
    cache = P.prefix_cache.PrefixCache(10**8, kv_block_size=4)
    system = ids(30, 80)
    requests = [(step, system + ids(3 + step, 81 + step), 10 + step) for step in (0, 0, 3, 4, 12)]
    engine = Engine(trained, EngineConfig(max_num_seqs=3), prefix_cache=cache)
    got, outputs, _ = serve(engine, arrivals_of(requests, **GREEDY))
    assert got == [alone(trained, prompt, n, **GREEDY) for _, prompt, n in requests]
    # the first two arrive together and both miss; the later ones reuse the system prompt's 7 full blocks
    assert [o[0].cached_tokens for o in outputs] == [0, 0, 28, 28, 28]
    again, outputs, _ = serve(
        engine, {0: [(requests[0][1] + got[0], SamplingParams(max_tokens=5, **GREEDY))]}
    )
    assert outputs[0][0].cached_tokens == 40  # a whole earlier conversation: its reply was cached too
    assert again[0] == alone(trained, requests[0][1] + got[0], 5, **GREEDY)


# --- generate.py and benchmark.py -----------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "1", "--top-k", "20"]])
def test_generate_serves_a_prompt_file_as_no_cache_does_one_at_a_time(tiny_runs, tmp_path, capsys, sampling):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO: what\\nlight\nJULIET: oh\n\nKING: speak\nthe\n", encoding="utf-8")
    flags = ["--checkpoint", tiny_runs.checkpoint(PROJECT), "--prompt-file", prompts, "--max-new-tokens", 12]
    flags += [*sampling, "--num-samples", 2, "--max-num-seqs", 3]
    served = printed(P.generate, *flags)
    err = capsys.readouterr().err
    assert served == printed(P.generate, *flags, "--no-cache") == printed(P.generate, *flags, "--stream")
    heads = [line for line in served.splitlines() if line.startswith("---")]
    assert heads == [f"--- prompt {n}, sample {i} ---" for n in (1, 2, 3, 4) for i in (1, 2)]
    assert "ROMEO: what\nlight" in served
    assert "[engine] 8 requests, 96 new tokens" in err and "up to 3 at once" in err


def test_generate_stops_at_a_stop_string(tiny_runs):
    flags = ["--checkpoint", tiny_runs.checkpoint(PROJECT), "--prompt", "ROMEO:", "--temperature", "0"]
    full = printed(P.generate, *flags, "--max-new-tokens", 20)
    stop = full[len("ROMEO:") + 6 : len("ROMEO:") + 9]
    text = full[len("ROMEO:") :]
    assert (
        printed(P.generate, *flags, "--max-new-tokens", 20, "--stop", stop)
        == "ROMEO:" + text[: text.find(stop)] + "\n"
    )


def test_interactive_turns_reuse_the_conversation(tiny_runs, monkeypatch, capsys):
    lines = iter(["ROMEO: speak", "JULIET: again", "quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    flags = ["--checkpoint", tiny_runs.checkpoint(PROJECT), "--interactive", "--max-new-tokens", "1"]
    system = "Two lovers talk in the garden at night, and the nurse calls from within the house."  # 18 tokens
    assert run_main(P.generate, *flags, "--system", system) == 0  # tiny's context: 32 tokens
    err = capsys.readouterr().err
    reused = [line.split()[2] for line in err.splitlines() if "prompt tokens reused" in line]
    assert reused == ["0", "16"]  # the second turn's prompt holds the first


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-num-batched-tokens", "8"], "below the context"),
        (["--kv-mb", "0.001"], "holds no sequence"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--stop", ""], "--stop"),
    ],
)
def test_generate_bad_engine_flags_are_one_line_errors(tiny_runs, capsys, flags, message):
    rc = run_main(P.generate, "--checkpoint", tiny_runs.checkpoint(PROJECT), "--max-new-tokens", 2, *flags)
    assert message in assert_one_line_error(capsys, rc)


def test_benchmark_writes_vllms_serving_metrics(tmp_path):
    assert run_main(P.benchmark, "--preset", "tiny", "--device", "cpu", "--out", tmp_path) == 0
    rows = read_report(tmp_path, PROJECT)
    offline = rows[("output_throughput", "continuous batching, offline")]
    assert offline["baseline"] == "static batching, offline" and offline["value"] > 0
    # not timed (the speed lives in benchmark.py): the same work in fewer, fuller steps
    steps = rows[("steps", "continuous batching, offline")]
    assert steps["baseline"] == "static batching, offline" and steps["ratio"] < 1
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    online = {r["variant"] for r in report["rows"] if r["metric"] == "p99_ttft_ms"}
    assert len(online) == 2 * len(report["config"]["request_rates"])
    keys = {
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "median_tpot_ms",
        "p99_tpot_ms",
        "mean_itl_ms",
        "median_itl_ms",
        "p99_itl_ms",
    }
    for variant in online:
        assert keys <= {metric for metric, v in rows if v == variant}
        assert rows[("completed", variant)]["value"] == report["config"]["online_requests"]
    assert next(tmp_path.glob("*.png")).read_bytes().startswith(b"\x89PNG")


def test_benchmark_cut_short_keeps_the_rates_measured(tmp_path, monkeypatch):
    """run_benchmarks.py stops a benchmark past its budget with Ctrl-C: a Ctrl-C in the second request rate
    (static batching done, continuous not) still writes the offline rows and the first rate, both variants,
    marks the report cut short and exits 130."""
    B, calls = P.benchmark, []
    real_run = B.run

    def run_then_ctrl_c(*args):
        calls.append(args[-1])
        if len(calls) == 7:  # warm-up, 2 offline, 2 at the first rate, static at the second, then this
            raise KeyboardInterrupt
        return real_run(*args)

    monkeypatch.setattr(B, "run", run_then_ctrl_c)
    assert run_main(B, "--preset", "tiny", "--device", "cpu", "--out", tmp_path) == 130
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["config"]["cut_short"] is True and len(report["config"]["request_rates"]) == 1
    variants = {r["variant"] for r in report["rows"] if r["metric"] == "p99_ttft_ms"}
    rate = report["config"]["request_rates"][0]
    assert variants == {f"static batching, {rate:g} req/s", f"continuous batching, {rate:g} req/s"}
    assert ("output_throughput", "continuous batching, offline") in read_report(tmp_path, PROJECT)
    assert next(tmp_path.glob("*.png")).read_bytes().startswith(b"\x89PNG")
