"""Project 16's quantization-aware training: the fake-quantised forward is project 14's quantise-dequantise
bit for bit, and it and the straight-through estimator equal PyTorch's fake_quantize_per_channel_affine;
the estimator passes gradients inside the grid's range and zeroes them outside,
a few QAT steps lower the quantized model's loss, and train.py --qat -> quantize.py -> generate.py gives
project 14's integer format, with the bad-input exits."""

import json
import shutil

import pytest
import torch
from conftest import (
    assert_gives_project01s_logits,
    assert_one_line_error,
    greedy_ids,
    load_project,
    printed,
    read_report,
    run_main,
    tiny_gpt,
)
from safetensors.torch import load_file

PROJECT = "project16_qat"
P = load_project(PROJECT)
P14 = load_project("project14_ptq")  # the reference: project 14's own code, not this folder's copy


def _weights(seed=0, N=24, K=128):
    """Rows of very different sizes, an all-zero row, and a group that is all positive."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.logspace(-3, 0, N)[:, None]
    w[3] = 0
    w[5, :64] = w[5, :64].abs() + 0.5
    return w


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 128), (8, None)])
def test_fake_quantize_equals_project14_quantise_dequantise(bits, group_size):
    w = _weights()
    got = P.qat.fake_quantize(w, bits, group_size)
    if bits == 4:
        want = P14.quantization.dequantize_int4(*P14.quantization.quantize_int4(w, group_size))
    else:
        want = P14.quantization.dequantize_int8(*P14.quantization.quantize_int8(w))
    assert torch.equal(got, want)  # bit for bit: the model trains with exactly the weights it exports
    assert not torch.equal(got, w)  # and it did round


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, None)])
def test_ste_with_scales_from_the_weights_passes_every_gradient(bits, group_size):
    """Scales recomputed from the weights cover them: every weight is inside its grid's range, so the
    straight-through estimator is the identity, however far the rounding moved the forward values."""
    w = _weights().requires_grad_()
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    P.qat.fake_quantize(w, bits, group_size).backward(upstream)
    assert torch.equal(w.grad, upstream)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, None)])
def test_ste_with_fixed_scales_zeroes_the_gradient_of_clipped_weights(bits, group_size):
    """Scales fixed from the trained weights (a range-setting step, then training): a weight that drifts more
    than half a step beyond the grid's ends is clamped to the end and gets no gradient; one within half a
    step rounds to the end and keeps its gradient, as does every weight inside."""
    w0 = _weights()
    scale, zero = P.qat.weight_qparams(w0, bits, group_size)  # (N, G, 1) each, fixed from here on
    s, z = scale[:, 0, 0], zero[:, 0, 0]  # the first group's, (N,): columns 7, 9 and 11 lie in it
    lo, hi = (0, 15) if bits == 4 else (-127, 127)
    w = w0.clone()
    w[:, 7] = (hi - z + 2) * s  # two steps above the top of the grid
    w[:, 9] = (lo - z - 2) * s  # two steps below the bottom
    w[:, 11] = (hi - z + 0.4) * s  # beyond the top level, but nearer to it than half a step
    w.requires_grad_()
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    out = P.qat.FakeQuantize.apply(w, scale, zero, bits)
    out.backward(upstream)
    clipped = torch.zeros(w.shape, dtype=torch.bool)
    clipped[:, [7, 9]] = True
    assert (w.grad[clipped] == 0).all()
    assert torch.equal(w.grad[~clipped], upstream[~clipped])
    top, bottom = (hi - z) * s, (lo - z) * s  # the grid's ends, (N,)
    assert torch.equal(out[:, 7], top) and torch.equal(out[:, 9], bottom) and torch.equal(out[:, 11], top)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 128), (8, None)])
def test_fake_quantize_and_its_ste_equal_pytorchs_fake_quantize_per_channel_affine(bits, group_size):
    """PyTorch's own op as the reference: with a group's row as its "channel", the same scales and zero points
    give the same forward values and the same straight-through gradients, clipped weights included (the
    scales are fixed from w0 and the weights grown by 30%, so hundreds of them fall beyond the grid)."""
    w0 = _weights()
    scale, zero = P.qat.weight_qparams(w0, bits, group_size)  # (N, G, 1) each
    lo, hi = (0, 15) if bits == 4 else (-127, 127)
    upstream = torch.randn(w0.shape, generator=torch.Generator().manual_seed(1))
    w, rows = (w0 * 1.3).requires_grad_(), (w0 * 1.3).view(-1, w0.size(1) // scale.size(1)).requires_grad_()
    ours = P.qat.FakeQuantize.apply(w, scale, zero, bits)
    ours.backward(upstream)
    theirs = torch.fake_quantize_per_channel_affine(rows, scale.flatten(), zero.flatten().int(), 0, lo, hi)
    theirs.backward(upstream.view(rows.shape))
    assert torch.equal(ours.view(rows.shape), theirs)
    assert torch.equal(w.grad.view(rows.shape), rows.grad)
    assert (w.grad == 0).sum() > 100  # the clipping was exercised


def test_prepare_qat_swaps_the_blocks_linears_and_keeps_their_parameters():
    model = tiny_gpt(PROJECT)
    before = {n: m.weight for n, m in P.quantization.block_linears(model)}
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids)[0]
    P.qat.prepare_qat(model, "int4", 16)
    layers = dict(P.quantization.block_linears(model))
    assert layers.keys() == before.keys() and all(isinstance(m, P.qat.QATLinear) for m in layers.values())
    assert all(layers[n].weight is w for n, w in before.items())  # the same Parameters: optimizers keep them
    with torch.no_grad():
        fake = model(ids)[0]
    assert not torch.equal(fake, plain) and (fake - plain).norm() < 0.25 * plain.norm()  # rounded, not broken
    with pytest.raises(ValueError, match="does not divide"):
        P.qat.prepare_qat(tiny_gpt(PROJECT), "int4", 24)


def test_a_few_qat_steps_lower_the_quantized_models_loss():
    torch.manual_seed(0)
    model = P.qat.prepare_qat(tiny_gpt(PROJECT).train(), "int4", 16)
    ids = torch.randint(0, 100, (4, 33), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(ids[:, :-1], ids[:, 1:])[1]
        loss.backward()
        losses.append(loss.item())
        assert all(m.weight.grad.abs().sum() > 0 for _, m in P.quantization.block_linears(model))
        optimizer.step()
    exported = P.qat.convert_qat(model)  # what the last step's fake-quantised forward computed
    with torch.no_grad():
        final = exported(ids[:, :-1], ids[:, 1:])[1].item()
    assert final < losses[0] - 0.1


# --- train.py --qat -> quantize.py -> generate.py -----------------------------------------------------------


@pytest.fixture(scope="module")
def qat_ckpt(float_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "run"
    flags = ["--init-from", float_ckpt, "--qat", "int4", "--group-size", 16, "--max-iters", 3]
    assert run_main(P.train, "--preset", "tiny", "--device", "cpu", *flags, "--out", out) == 0
    return out


def test_qat_checkpoint_exports_to_project14s_integers(qat_ckpt, tmp_path, capsys):
    training = json.loads((qat_ckpt / "config.json").read_text())["training"]
    assert training["qat"] == "int4" and training["group_size"] == 16 and "init_from" in training
    latent = load_file(qat_ckpt / "model.safetensors")  # an ordinary float checkpoint
    out = tmp_path / "int4"
    assert run_main(P.quantize, "--checkpoint", qat_ckpt, "--method", "int4", "--group-size", 16,
                    "--out", out, "--device", "cpu") == 0  # fmt: skip
    assert "QAT" not in capsys.readouterr().err  # its own format: no note
    tensors = load_file(out / "model.safetensors")
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.proj"):
        q, scale, zero = P14.quantization.quantize_int4(latent[f"{name}.weight"], 16)
        assert torch.equal(tensors[f"{name}.weight"], P14.quantization.pack_int4(q))
        assert torch.equal(tensors[f"{name}.scales"], scale) and torch.equal(tensors[f"{name}.zeros"], zero)
    # the exported model computes exactly what the fake-quantised one did
    fake, _ = P.checkpoint.load_checkpoint(qat_ckpt)
    P.qat.prepare_qat(fake, "int4", 16)
    exported, _ = P.loader.load_quantized(out)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids)[0], fake(ids)[0], rtol=0, atol=1e-6)
    flags = ["--checkpoint", out, "--prompt", "ROMEO:", "--max-new-tokens", 8, "--temperature", 0]
    text = printed(P.generate, *flags, "--device", "cpu")
    enc = P.tokenizer.gpt2_encoding()
    assert text == "ROMEO:" + enc.decode(greedy_ids(exported, enc.encode_ordinary("ROMEO:"), 8)) + "\n"


def test_plain_training_is_unchanged_by_the_new_flags(float_ckpt):
    training = json.loads((float_ckpt / "config.json").read_text())["training"]
    assert not {"qat", "group_size"} & training.keys() and training["init_from"] is None


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--qat", "int3"], "--qat"),
        (["--qat", "int4", "--group-size", "24"], "--group-size"),  # 24 does not divide 32
        (["--qat", "int4", "--group-size", "5"], "--group-size"),  # odd: two values a byte
        (["--qat", "int8", "--group-size", "16"], "--group-size"),
    ],
)
def test_bad_qat_flags(float_ckpt, tmp_path, capsys, flags, named):
    rc = run_main(P.train, "--preset", "tiny", "--device", "cpu", "--init-from", float_ckpt, *flags,
                  "--out", tmp_path / "run")  # fmt: skip
    assert named in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "run").exists()


def test_qat_run_resumes_only_in_its_format(qat_ckpt, capsys):
    rc = run_main(P.train, "--device", "cpu", "--resume", "--qat", "int8", "--out", qat_ckpt)
    assert "--qat" in assert_one_line_error(capsys, rc)


def test_init_from_refuses_a_quantized_checkpoint(qat_ckpt, tmp_path, capsys):
    out = tmp_path / "int8"
    assert run_main(P.quantize, "--checkpoint", qat_ckpt, "--method", "int8", "--out", out) == 0
    # another format than the one QAT trained for works, with a note naming the one it was trained for
    assert "trained with QAT for --method int4 --group-size 16" in capsys.readouterr().err
    rc = run_main(P.train, "--preset", "tiny", "--init-from", out, "--out", tmp_path / "run")
    assert "already quantized" in assert_one_line_error(capsys, rc)


# --- project 01's character model, the benchmark's default --------------------------------------------------


def test_init_from_project01_starts_from_its_weights(char_ckpt):
    config = json.loads((char_ckpt / "config.json").read_text())
    model = P.loader.start_model(str(char_ckpt), P.loader.model_config(config)).eval()
    assert_gives_project01s_logits(model, char_ckpt)


def test_qat_fine_tuning_of_a_character_model(char_ckpt, tiny_runs, tmp_path, capsys):
    out, text = tmp_path / "run", tiny_runs.data("project01_minimal_gpt")
    flags = ["--init-from", char_ckpt, "--qat", "int4", "--group-size", 16, "--max-iters", 2, "--data", text]
    assert run_main(P.train, "--preset", "tiny", "--device", "cpu", *flags, "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer"] == json.loads((char_ckpt / "config.json").read_text())["tokenizer"]
    assert config["model"]["gelu"] == "none"  # project 01's exact GELU goes on with the weights
    chars = config["tokenizer"]["chars"]
    model, _ = P.checkpoint.load_checkpoint(out)
    sample = printed(P.generate, "--checkpoint", out, "--prompt", "ROMEO:", "--max-new-tokens", 8,
                     "--temperature", 0, "--device", "cpu")  # fmt: skip
    ids = [chars.index(c) for c in "ROMEO:"]
    assert sample == "ROMEO:" + "".join(chars[i] for i in greedy_ids(model, ids, 8)) + "\n"
    shards = tmp_path / "shards"
    shards.mkdir()
    rc = run_main(P.train, "--preset", "tiny", "--init-from", char_ckpt, "--data", shards,
                  "--out", tmp_path / "other")  # fmt: skip
    assert "text file" in assert_one_line_error(capsys, rc)


def test_benchmark_on_a_tiny_checkpoint(char_ckpt, tiny_runs, tmp_path):
    text = tiny_runs.data("project01_minimal_gpt")
    flags = ["--checkpoint", char_ckpt, "--data", text, "--preset", "tiny",
             "--group-size", 16, "--steps", 2, "--calibration-samples", 4, "--eval-tokens", 200,
             "--timing-repeats", 1, "--device", "cpu", "--out", tmp_path]  # fmt: skip
    assert run_main(P.benchmark, *flags) == 0
    rows = read_report(tmp_path, PROJECT)
    value = lambda metric, variant: rows[(metric, variant)]["value"]
    assert value("qat_export_max_token_loss_diff", "exported vs fake-quantised") < 1e-5
    assert value("perplexity", "int4 g16 RTN") > 0 and value("train_step_ms", "plain, 8 x 32 tokens") > 0
    assert value("weight_mib", "int4 g16 QAT, exported") < value("weight_mib", "fp32")
    assert 0 < value("fake_quant_ms", "forward + backward, the 8 block weights")
    # a recovered share of a degradation under 0.5% (a tiny model's, say: 328% was once printed) is flagged
    small = value("perplexity", "int4 g16 RTN") < 1.005 * value("perplexity", "fp32")
    literal = rows[("qat_recovered_pct", "int4 g16, vs the original fp32 and its RTN")]
    assert ("means little" in literal.get("note", "")) == (small and literal["value"] is not None)


@pytest.mark.parametrize("lr", ["0", "-1e-4", "nan"])
def test_benchmark_refuses_a_bad_lr_before_any_work(lr, tmp_path, capsys):
    """Checked where it is parsed, not by train.py after the PTQ rows have been measured."""
    rc = run_main(P.benchmark, "--lr", lr, "--device", "cpu", "--out", tmp_path)
    assert "--lr" in assert_one_line_error(capsys, rc)
    assert not list(tmp_path.iterdir())


def test_init_from_a_character_model_trained_on_project01s_default(
    char_ckpt, tiny_runs, tmp_path, monkeypatch
):
    """Project 01 records no --data for Tiny Shakespeare: the fine-tuning reads that text file, and the run
    records it, so that quantize.py's GPTQ calibrates on it too."""
    ckpt = shutil.copytree(char_ckpt, tmp_path / "p01")
    config = json.loads((ckpt / "config.json").read_text())
    config["training"]["data"] = None
    (ckpt / "config.json").write_text(json.dumps(config))
    text = tiny_runs.data("project01_minimal_gpt")
    monkeypatch.setattr(P.loader, "TINY_SHAKESPEARE", text)
    out = tmp_path / "run"
    flags = ["--init-from", ckpt, "--qat", "int4", "--group-size", 16, "--max-iters", 1]
    assert run_main(P.train, "--preset", "tiny", "--device", "cpu", *flags, "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["training"]["data"] == str(text)
    assert run_main(P.quantize, "--checkpoint", out, "--group-size", 16, "--calibration-samples", 4,
                    "--device", "cpu", "--out", tmp_path / "gptq") == 0  # fmt: skip
