"""Project 22's memory-efficient training: chunked attention equals PyTorch's SDPA (forward and gradients,
causal, lengths that are no multiple of the chunk); every way of checkpointing (full, selective), offloading
and chunking gives the loss and every gradient of the run that keeps everything, in fp32; the reentrant
checkpoint silently drops the gradients of a block whose input needs none (why use_reentrant=False); the
saved-bytes counter gives a hand-computed sum on a known graph, and full checkpointing keeps only each
block's input; train.py takes the flags and keeps them on --resume; bad values end in one line; the
benchmark reports every variant."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, load_project, perturb_, read_report, run_main, tiny_trainer

P = load_project("project22_memory_efficient")
train_tiny = tiny_trainer("project22_memory_efficient")
SMALL = dict(vocab_size=300, block_size=40, n_layer=2, n_head=2, n_embd=32)
FP32 = P.precision.PRECISIONS["fp32"]


def gpt(seed: int = 0, **config):
    """A perturbed GPT of the SMALL shape, in training mode (fresh models have zero biases)."""
    torch.manual_seed(seed)
    model = P.model.GPT(P.model.GPTConfig(**{**SMALL, **config}))
    perturb_(model, seed)
    return model


def train_losses(run) -> list[float]:
    return [m["loss"] for m in P.checkpoint.read_metrics(run) if "loss" in m]


def loss_and_grads(model, x, y, cpu: bool = False):
    model.zero_grad(set_to_none=True)
    with P.memory.offload(x.device) if cpu else contextlib.nullcontext():
        _, loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("T", [1, 16, 37, 64])
@pytest.mark.parametrize("checkpointed", [True, False])
def test_chunked_attention_equals_sdpa_forward_and_gradients(T, checkpointed):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g, requires_grad=True) for _ in range(3))
    dy = torch.randn(2, 3, T, 8, generator=g)
    ours = P.memory.chunked_attention(q, k, v, chunk=16, checkpointed=checkpointed)  # 37 = 16 + 16 + 5
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), dy), torch.autograd.grad(theirs, (q, k, v), dy)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_chunked_attention_keeps_no_scores_for_backward():
    q, k, v = (torch.randn(1, 2, 64, 8, requires_grad=True) for _ in range(3))
    with P.memory.SavedBytes() as kept:
        P.memory.chunked_attention(q, k, v, chunk=16)
    assert kept.bytes == 3 * q.numel() * 4  # q, k and v themselves: no (T, T) scores, no chunk's either
    with P.memory.SavedBytes() as unchecked:
        P.memory.chunked_attention(q, k, v, chunk=16, checkpointed=False)
    assert unchecked.bytes > 2 * 64 * 64 / 2 * 4  # differentiated as it is, the loop keeps its probabilities


MODES = [(attention, recompute) for attention in P.memory.ATTENTIONS for recompute in P.memory.RECOMPUTE]


@pytest.mark.parametrize("attention,recompute", MODES)
def test_every_mode_gives_the_loss_and_every_gradient_of_keeping_everything(
    attention, recompute, monkeypatch
):
    monkeypatch.setattr(P.memory, "CHUNK", 16)  # 40 tokens: three chunks, the last one short
    x, y = (torch.randint(300, (2, 40), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    ref_loss, ref = loss_and_grads(gpt(), x, y)
    loss, grads = loss_and_grads(gpt(attention=attention, recompute=recompute), x, y)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=0, atol=1e-6, msg=name)


def test_offloading_gives_every_gradient_of_keeping_everything():
    x, y = (torch.randint(300, (2, 40), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    ref_loss, ref = loss_and_grads(gpt(), x, y)
    loss, grads = loss_and_grads(gpt(recompute="full"), x, y, cpu=True)
    assert loss == ref_loss and all(torch.equal(g, ref[n]) for n, g in grads.items())


def test_the_reentrant_checkpoint_silently_drops_gradients_when_the_input_needs_none():
    """The first block after a frozen embedding: its input needs no gradient, its parameters do."""
    block = gpt().blocks[0]
    x = torch.randn(2, 40, 32)  # requires_grad=False
    block(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="requires_grad"):
        out = torch.utils.checkpoint.checkpoint(block._forward, x, use_reentrant=True)
    assert not out.requires_grad  # no graph at all: a backward from a loss built on it would raise or skip
    assert all(p.grad is None for p in block.parameters())
    torch.utils.checkpoint.checkpoint(block._forward, x, use_reentrant=False).sum().backward()
    for n, p in block.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=0, atol=1e-6)


def test_the_counter_sums_each_saved_storage_once():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    with P.memory.SavedBytes(exclude=[w]) as counter:
        h = x @ w  # mm saves x (4 x 8) and w (excluded: a parameter exists anyway)
        r = torch.relu(h)  # saves its output r (4 x 16)
        s = torch.sigmoid(r)  # saves its output s (4 x 16)
        (s * s).sum()  # mul saves s twice: one storage, counted once
    assert counter.bytes == 4 * 8 * 4 + 4 * 16 * 4 + 4 * 16 * 4  # 640 bytes
    with pytest.raises(P.memory.OverBudget), P.memory.SavedBytes(exclude=[w], budget=600):
        torch.sigmoid(torch.relu(x @ w))  # stops at the sigmoid: 128 + 256 + 256 bytes
    with P.memory.SavedBytes() as with_w:
        torch.relu(x @ w.t().t())  # a view of w: the same storage as w
    assert with_w.bytes == 4 * 8 * 4 + 8 * 16 * 4 + 4 * 16 * 4


def test_full_checkpointing_keeps_only_each_blocks_input():
    x = torch.randint(300, (2, 40), generator=torch.Generator().manual_seed(1))
    none, blocks_none = P.benchmark.measure_saved(gpt(), x, FP32)
    full, blocks_full = P.benchmark.measure_saved(gpt(recompute="full"), x, FP32)
    activation = 2 * 40 * 32 * 4  # one (B, T, C) float32 tensor
    assert blocks_full == SMALL["n_layer"] * activation
    assert blocks_none >= 16 * blocks_full  # 16 such tensors per layer (README): q, k, v, 4C twice, ...
    assert none - blocks_none == full - blocks_full  # the head's part does not change
    _, blocks_mlp = P.benchmark.measure_saved(gpt(recompute="mlp"), x, FP32)
    _, blocks_attn = P.benchmark.measure_saved(gpt(recompute="attn"), x, FP32)
    assert blocks_full < blocks_mlp < blocks_attn < blocks_none


def test_offloading_on_a_cpu_is_counted_not_assumed_to_keep_nothing():
    """save_on_cpu's tensor.cpu() is the tensor itself on a CPU: every saved tensor stays where it was, so
    offloading keeps exactly what keeping everything keeps (the benchmark reported 0 without counting)."""
    x = torch.randint(300, (2, 40), generator=torch.Generator().manual_seed(1))
    kept = P.benchmark.measure_saved(gpt(), x, FP32)
    assert P.benchmark.measure_saved(gpt(), x, FP32, cpu=True) == kept
    model = gpt()
    with P.memory.SavedBytes(offload_from=x.device):  # the counter's hooks offload: backward still works
        _, loss = model(x, x)
    loss.backward()
    _, ref = loss_and_grads(gpt(), x, x)
    assert all(torch.equal(p.grad, ref[n]) for n, p in model.named_parameters())


def test_train_takes_the_flags_records_them_and_keeps_them_on_resume(corpus_file, tmp_path, capsys):
    flags = ["--data", corpus_file, "--eval-interval", "2", "--eval-iters", "1", "--max-iters", "2"]
    assert train_tiny(*flags, "--out", tmp_path / "plain") == 0
    memory = ["--recompute", "full", "--attention", "chunked", "--offload"]
    assert train_tiny(*flags, "--out", tmp_path / "run", *memory) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["model"]["recompute"], config["model"]["attention"]) == ("full", "chunked")
    assert train_losses(tmp_path / "run") == pytest.approx(train_losses(tmp_path / "plain"), abs=1e-5)
    flags[-1] = "3"
    assert train_tiny(*flags, "--out", tmp_path / "run", "--resume") == 0
    assert "attention chunked, recompute full" in capsys.readouterr().out  # as recorded
    flags[-1] = "4"
    assert train_tiny(*flags, "--out", tmp_path / "run", "--resume", "--recompute", "attn") == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["recompute"] == "attn"


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--recompute", "some"], "--recompute"),
        (["--attention", "flash"], "--attention"),
        (["--attention", "chunked", "--dropout", "0.1"], "attention dropout"),
    ],
)
def test_bad_memory_flags_exit_2_with_one_line(flags, named, corpus_file, tmp_path, capsys):
    rc = train_tiny("--data", corpus_file, "--out", tmp_path / "run", *flags)
    assert named in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "run").exists()


def test_benchmark_reports_every_variant(tmp_path):
    flags = ["--preset", "tiny", "--context", "32", "--repeats", "1", "--max-context", "512"]
    assert run_main(P.benchmark, *flags, "--op-budget-mib", "1", "--device", "cpu", "--out", tmp_path) == 0
    rows = read_report(tmp_path, "project22_memory_efficient")
    for name in P.benchmark.VARIANTS:
        assert rows[("pass_ms", name)]["value"] > 0
        if name != "none":
            assert rows[("grad_max_abs_diff_fp32", name)]["value"] <= 1e-6
    assert rows[("blocks_saved_mib", "full")]["ratio"] < 0.1
    for metric in ("saved_mib", "blocks_saved_mib"):  # on a CPU, offloading moves nothing: counted, not 0
        assert rows[(metric, "offload")]["value"] == rows[(metric, "none")]["value"] > 0
    op = rows[("attention_op_longest_context", "chunked")]
    assert op["value"] >= 4 * rows[("attention_op_longest_context", "explicit")]["value"]


def test_benchmark_refuses_a_max_context_below_the_first_length_it_tries(tmp_path, capsys):
    """The context search starts at 256 tokens: a lower --max-context left it nothing to try (IndexError)."""
    flags = ["--preset", "tiny", "--context", "32", "--repeats", "1", "--device", "cpu", "--out", tmp_path]
    rc = run_main(P.benchmark, *flags, "--max-context", "100")
    assert "--max-context" in assert_one_line_error(capsys, rc)
    assert not list(tmp_path.iterdir())


def test_benchmark_says_when_no_context_fits_the_budget(tmp_path):
    """A budget that even the first context passes: no longest context, said so (not "not measured")."""
    flags = ["--preset", "tiny", "--layers", "1", "--context", "32", "--repeats", "1", "--max-context", "256"]
    assert run_main(P.benchmark, *flags, "--budget-mib", "1", "--device", "cpu", "--out", tmp_path) == 0
    rows = read_report(tmp_path, "project22_memory_efficient")
    for attention in ("explicit", "chunked"):
        r = rows[("model_longest_context", attention)]
        assert r["value"] is None and "already" in r["note"], r
