"""Project 13's paged KV memory: the Triton decode kernel (under TRITON_INTERPRET=1) equals attention over
contiguous keys on random pools with random block tables, ragged lengths and lengths that are not a multiple
of the block size, and compiles for an H100; the block manager allocates, shares, copies on write and frees
blocks; the engine gives every request the tokens it would get alone, with blocks allocated as sequences
grow, with prefix blocks shared in place, through the kernel, and when a full pool preempts sequences
(recompute); a shared block is copied before it is written; abort and the end of a request give every block
back; a budget below one sequence is an error; generate.py and benchmark.py run. (Checkpoints, bad input and
causal masking: test_contract.py; pinned outputs: test_golden.py.)"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import STAGGERED_REQUESTS as STAGGERED
from conftest import (
    assert_one_line_error,
    engine_arrivals,
    load_project,
    printed,
    read_report,
    run_main,
    trained_char_gpt,
)
from conftest import char_ids as ids
from conftest import generate_alone as alone
from conftest import serve_engine as serve

PROJECT = "project13_paged_attention"
P = load_project(PROJECT)
Engine, EngineConfig = P.engine.Engine, P.engine.EngineConfig
SamplingParams = P.sequence.SamplingParams
PA = P.paged_attention
GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return trained_char_gpt(PROJECT)  # context 256, 2 layers, 2 heads of 16


arrivals_of = functools.partial(engine_arrivals, SamplingParams)


def all_blocks_free(engine) -> bool:
    blocks = engine.block_manager
    return blocks.num_free == len(blocks.blocks) and all(b.ref_count == 0 for b in blocks.blocks)


# --- the kernel -----------------------------------------------------------------------------------------


def contiguous_attention(q, k_pool, v_pool, tables, lens):
    """Each sequence's keys and values laid out contiguously by hand, then softmax(q k^T / sqrt(hs)) v."""
    out = []
    for b, n in enumerate(lens.tolist()):
        k = torch.cat([k_pool[i] for i in tables[b].tolist()], dim=1)[:, :n]  # (nh, n, hs)
        v = torch.cat([v_pool[i] for i in tables[b].tolist()], dim=1)[:, :n]
        w = F.softmax(q[b, :, None] @ k.transpose(1, 2) / q.size(-1) ** 0.5, dim=-1)  # (nh, 1, n)
        out.append((w @ v)[:, 0])
    return torch.stack(out)  # (B, nh, hs)


@pytest.mark.parametrize("block_size,blocks_per_split", [(4, 1), (4, 2), (8, 8), (16, 2)])
def test_the_paged_kernel_equals_contiguous_attention(block_size, blocks_per_split):
    g = torch.Generator().manual_seed(block_size + blocks_per_split)
    P_, nh, hs, M = 40, 2, 16, 6
    k_pool, v_pool = (torch.randn(P_, nh, block_size, hs, generator=g) for _ in range(2))
    lens = torch.tensor(
        [1, block_size, block_size + 1, 3 * block_size - 1, M * block_size], dtype=torch.int32
    )
    tables = torch.stack([torch.randperm(P_, generator=g)[:M] for _ in lens]).int()  # random, disjoint-ish
    q = torch.randn(len(lens), nh, hs, generator=g)
    expected = contiguous_attention(q, k_pool, v_pool, tables, lens)
    torch.testing.assert_close(
        PA.paged_attention(q, k_pool, v_pool, tables, lens, blocks_per_split), expected
    )
    torch.testing.assert_close(PA.paged_attention_reference(q, k_pool, v_pool, tables, lens), expected)
    # a table entry past a sequence's end is never read: poison the pool there and nothing changes
    poisoned = k_pool.clone()
    poisoned[tables[0, 1:].long()] = float("nan")
    out = PA.paged_attention(q[:1], poisoned, v_pool, tables[:1], lens[:1], blocks_per_split)
    torch.testing.assert_close(out, expected[:1])


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import paged_attention as PA

kernel = PA._paged_decode_kernel
constexprs = dict(L=16, HS=64, BLOCKS_PER_SPLIT=8)
def kind(name):
    if name in constexprs:
        return "constexpr"
    pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Tables": "*i32", "Lens": "*i32", "Out": "*fp32",
                "Lse": "*fp32"}
    return pointers.get(name, "fp32" if name == "scale" else "i32")
signature = {name: kind(name) for name in kernel.arg_names}
consts = {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}
source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
print(triton.compile(source, target=GPUTarget("cuda", 90, 32)).metadata.shared)
"""


def test_the_kernel_compiles_for_an_h100_without_a_gpu():
    """The interpreter accepts what the GPU compiler may refuse: compile for sm_90 (bf16, head size 64,
    16-token blocks), in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cwd = P.model.__file__.rsplit("/", 1)[0]
    cmd = [sys.executable, "-c", COMPILE_FOR_SM90]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0 <= int(result.stdout.split()[-1]) <= 227 * 1024


# --- the block manager ----------------------------------------------------------------------------------


def test_blocks_are_allocated_shared_copied_on_write_and_freed():
    BM, Sequence = P.block_manager.BlockManager, P.sequence.Sequence
    blocks = BM(num_blocks=6, block_size=4)
    a = Sequence(0, list(range(10)), SamplingParams())
    blocks.make_writable(a, 0, 10)  # positions 0..9: three blocks, the last partly filled
    assert len(a.block_table) == 3 and blocks.num_free == 3
    a.num_cached = 10
    blocks.register(a)  # its two full blocks
    assert len(blocks.cached) == 2
    b = Sequence(1, list(range(9)) + [99], SamplingParams())  # the same first 9 tokens
    assert blocks.match_prefix(b) == 8 and b.block_table == a.block_table[:2]  # shared in place
    assert [blocks.blocks[i].ref_count for i in a.block_table] == [2, 2, 1] and blocks.num_free == 3
    assert blocks.blocks_needed(b, 8, 10) == 1 and blocks.blocks_needed(b, 0, 10) == 3  # 2 copies + 1 new
    blocks.make_writable(b, 0, 10)  # b rewrites positions 0..9: it copies the shared blocks first
    assert blocks.copies == [(a.block_table[0], b.block_table[0]), (a.block_table[1], b.block_table[1])]
    assert [blocks.blocks[i].ref_count for i in a.block_table] == [1, 1, 1] and blocks.num_free == 0
    assert not set(a.block_table) & set(b.block_table)
    blocks.free(b)
    blocks.free(a)
    assert blocks.num_free == 6 and all(blk.ref_count == 0 for blk in blocks.blocks)
    c = Sequence(2, list(range(10)), SamplingParams())
    assert blocks.match_prefix(c) == 8  # freed blocks keep their keys and values: still a hit
    first, second = c.block_table
    blocks.free(c)  # its second block first: a prefix outlives what extends it
    for taken in range(1, 6):  # new blocks come from the least recently freed, evicting cached ones last
        blocks.make_writable(Sequence(3, [1], SamplingParams()), 0, 1)
        assert sorted(blocks.cached.values()) == ([first, second] if taken < 5 else [first])
    assert blocks.num_free == 1


def test_a_hash_collision_is_a_miss_not_another_prompts_keys():
    blocks = P.block_manager.BlockManager(4, 4)
    a = P.sequence.Sequence(0, list(range(9)), SamplingParams())
    blocks.make_writable(a, 0, 9)
    a.num_cached = 9
    blocks.register(a)
    for block in blocks.blocks:  # same key, other tokens: what a collision would look like
        block.tokens = tuple(t + 1 for t in block.tokens)
    assert blocks.match_prefix(P.sequence.Sequence(1, list(range(9)), SamplingParams())) == 0


# --- the engine: every request gets what it would get alone ---------------------------------------------


@pytest.fixture(scope="module")
def expected(trained) -> list[list[int]]:
    return [alone(trained, prompt, n, **GREEDY) for _, prompt, n in STAGGERED]


@pytest.mark.parametrize("block_size", [16, 5])
def test_staggered_arrivals_give_each_request_its_greedy_tokens_alone(trained, expected, block_size):
    """Blocks of 16 (vLLM's default) and of 5 (lengths cross block boundaries everywhere), each sequence's
    blocks taken as it grows, in a pool of four contexts."""
    engine = Engine(trained, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, block_size=block_size))
    peak = []
    record = lambda e: peak.append(len(e.scheduler.running))
    got, outputs, _ = serve(engine, arrivals_of(STAGGERED, **GREEDY), each_step=record)
    assert got == expected
    assert [o[-1].finish_reason for o in outputs] == ["length"] * len(STAGGERED)
    assert max(peak) >= 3  # they did run together
    assert all_blocks_free(engine)


# five requests whose prompts fit the pool together but whose outputs do not: 64 blocks of 4 positions
# (one context) for 5 x (40 + ~100) positions
CROWDED = [(step, ids(30 + 7 * i, 90 + i), 80 + 9 * i) for i, step in enumerate((0, 0, 0, 1, 2))]


@pytest.mark.parametrize(
    "sampling",
    [GREEDY, dict(temperature=1.0, seed=7), dict(temperature=0.8, top_k=5, seed=8)],
    ids=["greedy", "sampled", "top-k"],
)
def test_a_full_pool_preempts_and_the_preempted_requests_keep_their_tokens(trained, sampling):
    """Recompute preemption: a preempted request gives its blocks back, is prefilled again with its prompt
    and the tokens it had, and goes on to produce exactly the tokens it would produce alone."""
    config = EngineConfig(max_num_seqs=5, kv_cache_mb=64 * 2048 / 2**20, block_size=4)
    engine = Engine(trained, config)
    assert len(engine.block_manager.blocks) == 64
    seeded = lambda i: {**sampling, "seed": sampling["seed"] + i} if "seed" in sampling else sampling
    requests = [(step, prompt, n, seeded(i)) for i, (step, prompt, n) in enumerate(CROWDED)]
    arrivals = {}
    for step, prompt, n, params in requests:
        arrivals.setdefault(step, []).append((prompt, SamplingParams(max_tokens=n, **params)))
    got, _, _ = serve(engine, arrivals)
    assert got == [alone(trained, prompt, n, **dict(params)) for _, prompt, n, params in requests]
    assert engine.scheduler.num_preemptions > 0
    assert all_blocks_free(engine)


def test_preemption_takes_the_most_recently_admitted_sequence(trained):
    """Two sequences fill a pool of one context; when the first needs a block, the second gives its back
    and waits at the head of the queue, before the third, and gets its tokens alone later."""
    config = EngineConfig(max_num_seqs=2, kv_cache_mb=64 * 2 * 2 * 4 * 32 * 4 / 2**20, block_size=4)
    engine = Engine(trained, config)
    prompts = [ids(100, 20), ids(100, 21), ids(8, 22)]
    rids = [engine.add_request(p, SamplingParams(max_tokens=60, **GREEDY)) for p in prompts]
    tokens = {r: [] for r in rids}
    preempted_at = None
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        if preempted_at is None and engine.scheduler.num_preemptions:
            preempted_at = [s.request_id for s in engine.scheduler.waiting]
    assert preempted_at[0] == rids[1]  # newer than rids[0]: preempted, now first in line
    assert [tokens[r] for r in rids] == [alone(trained, p, 60, **GREEDY) for p in prompts]
    assert all_blocks_free(engine)


def test_the_triton_kernel_path_gives_the_same_tokens(trained, monkeypatch):
    """The engine's decoding attention through the kernel (TRITON_INTERPRET=1 runs it on the CPU)."""
    calls = []
    real = P.model.paged_attention
    monkeypatch.setattr(P.model, "paged_kernel_runs_on", lambda q, pool: True)
    monkeypatch.setattr(P.model, "paged_attention", lambda *a: calls.append(1) or real(*a))
    requests = [(0, ids(5, 1), 6), (0, ids(21, 2), 5), (2, ids(3, 3), 4)]
    engine = Engine(trained, EngineConfig(max_num_seqs=3, block_size=8))
    got, _, _ = serve(engine, arrivals_of(requests, **GREEDY))
    assert got == [alone(trained, prompt, n, **GREEDY) for _, prompt, n in requests]
    assert calls


def test_prefix_blocks_are_shared_in_place_and_copied_before_a_write(trained):
    """Requests sharing a 30-token system prompt share its full blocks (4 tokens each): the later ones reuse
    28 tokens, held in place (the same blocks), not copied."""
    system = ids(30, 80)
    requests = [(0, system + ids(3, 81), 60), (1, system + ids(4, 82), 60), (2, system + ids(5, 83), 60)]
    engine = Engine(trained, EngineConfig(max_num_seqs=3, block_size=4))
    shared = []

    def check(e):
        running = e.scheduler.running
        if len(running) == 3 and not shared:
            shared.append([s.block_table[:7] for s in running])

    got, outputs, _ = serve(engine, arrivals_of(requests, **GREEDY), each_step=check)
    assert got == [alone(trained, prompt, n, **GREEDY) for _, prompt, n in requests]
    assert [o[0].cached_tokens for o in outputs] == [0, 28, 28]
    assert shared[0][0] == shared[0][1] == shared[0][2]  # the same seven blocks, in place
    assert engine.block_manager.hit_tokens == 56
    assert all_blocks_free(engine)


def test_a_shared_block_is_copied_before_it_is_written(trained, monkeypatch):
    """Two requests share a system prompt's blocks; the first outgrows the context, so its window slides and
    rewrites its positions 0, 1, 2, ... while the second still reads the shared blocks: it takes copies first
    (copy-on-write), and the second's blocks keep their keys and values to its end."""
    copies = []
    real = P.model.PagedKVCache.copy_blocks
    record = lambda self, sources, dests: copies.append(sources) or real(self, sources, dests)
    monkeypatch.setattr(P.model.PagedKVCache, "copy_blocks", record)
    system = ids(30, 80)
    requests = [(0, system + ids(3, 81), 240), (100, system + ids(4, 82), 150)]  # the first slides at 224
    engine = Engine(trained, EngineConfig(max_num_seqs=2, block_size=4))
    seen = []

    def shared_blocks(e):  # the second request's system-prompt blocks, every layer's keys and values
        second = [s for s in e.scheduler.running if s.request_id == 1]
        if second:
            held = second[0].block_table[:7]
            seen.append(torch.stack([torch.stack((p.k_pool[held], p.v_pool[held])) for p in e.kv_pools]))

    got, _, _ = serve(engine, arrivals_of(requests, **GREEDY), each_step=shared_blocks)
    assert got == [alone(trained, prompt, n, **GREEDY) for _, prompt, n in requests]
    assert len(seen) == 149 and all(torch.equal(kv, seen[0]) for kv in seen)
    assert copies and all(len(c) == 7 for c in copies)  # the 7 shared blocks, once in each layer
    assert all_blocks_free(engine)


# --- memory: abort, budgets -------------------------------------------------------------------------------


def test_abort_gives_every_block_back(trained):
    engine = Engine(trained, EngineConfig(max_num_seqs=2, block_size=4))
    rids = [
        engine.add_request(ids(20 + i, 30 + i), SamplingParams(max_tokens=40, **GREEDY)) for i in range(3)
    ]
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_free < len(engine.block_manager.blocks)
    keep = rids[0]
    assert engine.abort(rids[1]) and engine.abort(rids[2])  # running, then waiting
    held = len(engine.scheduler.running[0].block_table)
    assert engine.block_manager.num_free == len(engine.block_manager.blocks) - held  # at once
    assert engine.abort(keep) and all_blocks_free(engine) and not engine.has_unfinished()
    assert not engine.abort(keep)


def test_a_budget_below_one_sequence_is_a_value_error(trained):
    c = trained.config
    context_mib = c.n_layer * 2 * c.block_size * c.n_embd * 4 / 2**20
    with pytest.raises(ValueError, match="holds no sequence"):
        Engine(trained, EngineConfig(kv_cache_mb=0.9 * context_mib))
    assert len(Engine(trained, EngineConfig(kv_cache_mb=context_mib)).block_manager.blocks) == 16
    with pytest.raises(ValueError, match="block_size"):
        Engine(trained, EngineConfig(block_size=0))


@pytest.mark.parametrize(
    "prompt,message", [([], "empty"), ([1] * 257, "longer than the context"), ([1, 999], "outside")]
)
def test_a_bad_request_is_a_value_error_and_the_others_go_on(trained, prompt, message):
    engine = Engine(trained, EngineConfig(max_num_seqs=2, block_size=4))
    engine.add_request(ids(9, 60), SamplingParams(max_tokens=20, **GREEDY))
    tokens = [t for out in engine.step() for t in out.token_ids]
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_k"):  # a float would fail inside a step the others share
        SamplingParams(top_k=50.0)
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.token_ids]
    assert tokens == alone(trained, ids(9, 60), 20, **GREEDY)
    assert all_blocks_free(engine)


# --- generate.py and benchmark.py -----------------------------------------------------------------------


def test_generate_in_a_pool_that_preempts_prints_what_no_cache_does(tiny_runs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO: what\\nlight\nJULIET: oh\nKING: speak\n", encoding="utf-8")
    flags = ["--checkpoint", tiny_runs.checkpoint(PROJECT), "--prompt-file", prompts, "--max-new-tokens", 12]
    flags += ["--temperature", "0", "--num-samples", 2, "--max-num-seqs", 6]
    served = printed(P.generate, *flags, "--kv-mb", "0.02", "--block-size", 4)  # 10 blocks, 40 positions
    err = capsys.readouterr().err
    assert served == printed(P.generate, *flags, "--no-cache")
    assert "[engine] 6 requests, 72 new tokens" in err
    assert int(err.split(" preemptions")[0].split()[-1]) > 0


def test_interactive_turns_reuse_the_conversations_blocks(tiny_runs, monkeypatch, capsys):
    """A pool of one context (two blocks of 16): the second turn's prompt starts with the first's, whose full
    block is still in the pool after the first request finished."""
    lines = iter(["ROMEO: speak", "JULIET: again", "quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    flags = ["--checkpoint", tiny_runs.checkpoint(PROJECT), "--interactive", "--max-new-tokens", "1"]
    system = "Two lovers talk in the garden at night, and the nurse calls from within the house."  # 18 tokens
    assert run_main(P.generate, *flags, "--system", system) == 0  # tiny's context: 32 tokens
    err = capsys.readouterr().err
    reused = [line.split()[2] for line in err.splitlines() if "prompt tokens reused" in line]
    assert reused == ["0", "16"]
    assert "of the pool's 2 cached" in err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--kv-mb", "0.001"], "holds no sequence"),
        (["--kv-mb", "1e9"], "does not fit in memory"),  # a petabyte
        (["--block-size", "0"], "--block-size"),
        (["--block-size", "100000000"], "from 1 to the context"),
    ],
)
def test_generate_bad_memory_flags_are_one_line_errors(tiny_runs, capsys, flags, message):
    rc = run_main(P.generate, "--checkpoint", tiny_runs.checkpoint(PROJECT), "--max-new-tokens", 2, *flags)
    assert message in assert_one_line_error(capsys, rc)


def test_benchmark_compares_paged_memory_with_the_contiguous_reservation(tmp_path):
    assert run_main(P.benchmark, "--preset", "tiny", "--device", "cpu", "--out", tmp_path) == 0
    rows = read_report(tmp_path, PROJECT)
    base, paged = "contiguous (project 12)", "paged"
    assert rows[("kv_waste", paged)]["value"] < rows[("kv_waste", base)]["value"]
    assert rows[("max_running", base)]["value"] == 3  # the budget: three whole contexts
    assert rows[("max_running", paged)]["value"] > 3
    assert rows[("same_tokens", "contiguous vs paged")]["value"] == 100
    assert rows[("output_throughput", paged)]["baseline"] == base
    assert rows[("decode_attention_ms", "Triton paged kernel")]["value"] is None  # not measured off the GPU
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["config"]["budget_contexts"] == 3


def test_benchmark_cut_short_keeps_the_finished_runs(tmp_path, monkeypatch):
    """run_benchmarks.py stops a benchmark past its budget with Ctrl-C: a Ctrl-C in the paged run still
    writes the contiguous run's rows, marks the report cut short and exits 130."""
    B, calls = P.benchmark, []
    real_serve = B.serve

    def serve_then_ctrl_c(*args):
        calls.append(args[-1])
        if args[-1] == "paged":
            raise KeyboardInterrupt
        return real_serve(*args)

    monkeypatch.setattr(B, "serve", serve_then_ctrl_c)
    assert run_main(B, "--preset", "tiny", "--device", "cpu", "--out", tmp_path) == 130
    assert calls == ["warm-up", "contiguous (project 12)", "paged"]
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["config"]["cut_short"] is True
    assert {r["variant"] for r in report["rows"]} == {"contiguous (project 12)"}
    assert read_report(tmp_path, PROJECT)[("max_running", "contiguous (project 12)")]["value"] == 3
