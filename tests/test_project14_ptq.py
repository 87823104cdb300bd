"""Project 14's post-training quantization: the number formats' error bounds and packing, GPTQ against the
slow column-by-column algorithm and against round-to-nearest on the same calibration data, LLM.int8()'s
outlier decomposition, the Triton int4 kernel against dequantise-then-matmul (under TRITON_INTERPRET=1, which
conftest.py sets), and quantize.py -> generate.py end to end, with its bad-input exits and a bit-exact
checkpoint round trip."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    assert_gives_project01s_logits,
    assert_one_line_error,
    digest,
    greedy_ids,
    load_project,
    printed,
    read_report,
    run_main,
)
from safetensors.torch import load_file

PROJECT = "project14_ptq"
P = load_project(PROJECT)
Q = P.quantization


def _weights(seed=0, N=24, K=128):
    """Rows of very different sizes, an all-zero row, and groups that are all positive (skewed)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.logspace(-3, 0, N)[:, None]
    w[3] = 0
    w[5, :64] = w[5, :64].abs() + 0.5
    return w


def test_int8_error_is_at_most_half_a_step():
    w = _weights()
    q, scale = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and q.abs().max() <= 127
    step = scale.float()[:, None]  # the stored scale is the step
    assert ((Q.dequantize_int8(q, scale) - w).abs() <= step / 2 * (1 + 1e-6)).all()
    assert (q.abs().amax(dim=1)[torch.arange(24) != 3] >= 126).all()  # the range is used, not wasted
    assert (scale.float() > 0).all()  # the all-zero row too: no 0 / 0


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step(group_size):
    w = _weights()
    q, scale, zero = Q.quantize_int4(w, group_size)
    assert q.dtype == zero.dtype == torch.uint8 and scale.shape == (24, 128 // group_size)
    assert q.max() <= 15 and zero.max() <= 15
    step = scale.float().repeat_interleave(group_size, dim=1)  # (N, K): each weight's group's step
    assert ((Q.dequantize_int4(q, scale, zero) - w).abs() <= step / 2 * (1 + 1e-6)).all()
    assert (Q.dequantize_int4(q, scale, zero)[3] == 0).all() and (scale.float() > 0).all()  # no 0/0


def test_packed_int4_round_trip_is_exact():
    every_pair = torch.cartesian_prod(torch.arange(16), torch.arange(16)).to(torch.uint8).view(1, -1)
    packed = Q.pack_int4(every_pair)
    assert packed.shape == (1, 256) and packed.dtype == torch.uint8
    assert torch.equal(Q.unpack_int4(packed), every_pair)
    assert torch.equal(Q.pack_int4(Q.unpack_int4(packed)), packed)
    assert sorted(packed.flatten().tolist()) == list(range(256))  # every byte value: nothing collides
    assert packed[0, 1].item() == 0 | (1 << 4)  # (0, 1): feature 2j in the low nibble, 2j + 1 in the high


def _activations(seed, tokens=2048, K=128):
    """Correlated inputs, as real activations are, all through the same mixing matrix (one distribution);
    the seed draws the tokens. Correlation is what GPTQ's error feedback works with."""
    mixing = torch.randn(K, K, generator=torch.Generator().manual_seed(0)) * 0.3
    return torch.randn(tokens, K, generator=torch.Generator().manual_seed(seed + 1)) @ mixing


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 128), (8, None)])
def test_gptq_reconstructs_the_layer_better_than_rtn(bits, group_size):
    """GPTQ's objective, ||W X - Q X||, on the calibration data and on held-out data of the same kind."""
    w, X, held_out = _weights(N=48) * 0.05, _activations(0), _activations(1)
    H = 2 * X.t() @ X / len(X)
    if bits == 4:
        gptq = Q.dequantize_int4(*Q.gptq(w, H, 4, group_size))
        rtn = Q.dequantize_int4(*Q.quantize_int4(w, group_size))
    else:
        gptq, rtn = Q.dequantize_int8(*Q.gptq(w, H, 8)), Q.dequantize_int8(*Q.quantize_int8(w))
    for x in (X, held_out):
        assert (x @ (gptq - w).t()).norm() < 0.8 * (x @ (rtn - w).t()).norm()


def _column_by_column_gptq(w, H, bits, group_size, damp=0.01):
    """GPTQ the slow way, in float64, as the reference: no Cholesky factor and no lazy batches. After each
    column is rounded, its error goes onto every later column at once (OBS's update), and the column leaves
    the inverse Hessian of the columns still to round by one step of Gaussian elimination."""
    W, K = w.double().clone(), w.size(1)
    Hinv = torch.linalg.inv(H.double() + damp * H.diag().mean() * torch.eye(K, dtype=torch.float64))
    g, (lo, hi) = group_size or K, (0, 15) if bits == 4 else (-127, 127)
    q = torch.zeros_like(W)
    for i in range(K):
        if i % g == 0:  # a group's scale from its weights as updated so far
            scale, zero = (t.double() for t in Q.scale_and_zero(W[:, i : i + g], bits))
        q[:, i] = ((W[:, i] / scale).round() + zero).clamp(lo, hi)
        err = (W[:, i] - (q[:, i] - zero) * scale) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:]
        Hinv -= Hinv[:, i, None] * Hinv[None, i, :] / Hinv[i, i]
    return q


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (8, None)])
def test_gptq_gives_the_column_by_column_algorithms_integers(bits, group_size):
    """The Cholesky form of the inverse Hessian and the lazy batch updates (blocks of 64 columns over 256,
    so that errors cross block boundaries and groups start inside blocks) change the arithmetic, not the
    result: every integer equals the slow algorithm's."""
    w, X = _weights(N=16, K=256) * 0.05, _activations(0, K=256)
    H = 2 * X.t() @ X / len(X)
    got = Q.gptq(w, H, bits, group_size, lazy_batch=64)[0]
    assert torch.equal(got.double(), _column_by_column_gptq(w, H, bits, group_size))


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With H a multiple of I no column's error can be compensated by another's, so GPTQ must round each
    weight to nearest: any wrong index in the updates or the group scales shows here."""
    w = _weights(N=16) * 0.05
    for got, want in [
        (Q.gptq(w, 3 * torch.eye(128), 4, 32), Q.quantize_int4(w, 32)),
        (Q.gptq(w, torch.eye(128), 8), Q.quantize_int8(w)),
    ]:
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("M, N, K, group_size", [(1, 40, 128, 32), (3, 70, 256, 128), (2, 16, 64, 64)])
def test_triton_kernel_equals_dequantise_then_matmul(M, N, K, group_size):
    g = torch.Generator().manual_seed(M)
    q, scale, zero = Q.quantize_int4(torch.randn(N, K, generator=g), group_size)
    x = torch.randn(M, K, generator=g)
    want = x @ Q.dequantize_int4(q, scale, zero).t()
    got = P.kernels.int4_matmul(x, Q.pack_int4(q), scale, zero, block_n=16)  # several N blocks, a ragged last
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# The interpreter runs the kernel as Python and accepts what the GPU compiler refuses (project 09's lesson).
# Triton's wheel carries ptxas, so compiling for an H100/H200 (sm_90) needs no GPU, only a fresh process
# without TRITON_INTERPRET.
COMPILE_FOR_SM90 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels

kernel = kernels._int4_matmul_kernel
types = {"X": "*" + sys.argv[1], "W": "*u8", "S": "*fp16", "Z": "*u8", "Y": "*" + sys.argv[1]}
shared = []
for block_n in (16, 32, 64):  # every tile _block_n may choose
    constexprs = {"BLOCK_N": block_n, "BLOCK_K": 64}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    consts = {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    shared.append(triton.compile(source, target=GPUTarget("cuda", 90, 32)).metadata.shared)
print(max(shared))
"""


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_kernel_compiles_for_an_h100_without_a_gpu(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    folder = P.kernels.__file__.rsplit("/", 1)[0]
    cmd = [sys.executable, "-c", COMPILE_FOR_SM90, dtype]
    result = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0 <= int(result.stdout.split()[-1]) <= 227 * 1024  # shared memory per block on sm_90


def test_kernel_tiles_leave_each_sm_two_programs_where_they_can(monkeypatch):
    monkeypatch.setattr(P.kernels, "_sm_count", lambda index: 132)  # an H100/H200, without one
    gpu, choose = torch.device("cuda", 0), P.kernels._block_n
    assert choose(16, 4096, gpu) == 64  # 1,024 programs of 64
    assert choose(1, 11008, gpu) == 32  # 172 of 64 are too few; 344 of 32 are enough
    assert choose(1, 4096, gpu) == 16  # 256: the narrowest tile, though short of 264
    assert choose(1, 4096, torch.device("cpu")) == 64  # the interpreter: no SMs to fill


def test_int4_linear_gives_the_same_output_through_the_kernel(monkeypatch):
    linear = torch.nn.Linear(64, 40)
    q, scale, zero = Q.quantize_int4(linear.weight, 32)
    layer = Q.Int4Linear(Q.pack_int4(q), scale, zero, linear.bias.detach())
    x = torch.randn(1, 2, 64)
    plain = layer(x)
    monkeypatch.setattr(Q, "kernel_runs_on", lambda t: True)
    torch.testing.assert_close(layer(x), plain, atol=1e-5, rtol=1e-5)


def test_int8_layer_in_fp16_does_not_overflow_before_its_scale():
    """x @ q^T before the per-channel scale reaches 4,096 x 1.0 x 127 = 520,192, past fp16's 65,504; the
    scaled output (about 5,200) fits. In fp16 the layer scales the weights first, and matches fp32."""
    q = torch.full((8, 4096), 127, dtype=torch.int8)
    scales = torch.full((8,), 0.01, dtype=torch.float16)
    layer = Q.Int8Linear(q, scales, None)
    x = torch.ones(2, 4096)
    y16 = layer(x.half())
    assert torch.isfinite(y16).all()
    torch.testing.assert_close(y16.float(), layer(x), rtol=2e-3, atol=0)


def test_llm_int8_keeps_outlier_features_in_floating_point():
    """One input feature at 40 (an emergent outlier): the decomposition multiplies it in floating point, so
    the output stays as close to the float layer as int8 weights alone allow; without it, the outlier sets
    each token's activation scale and the other features round to almost nothing."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    x = torch.randn(5, 128)
    x[:, 17] = 40.0
    q, scale = Q.quantize_int8(linear.weight)
    exact = linear(x)
    weight_only = Q.Int8Linear(q, scale, linear.bias)(x)
    decomposed = Q.Int8OutlierLinear(q, scale, linear.bias, threshold=6.0)(x)
    plain_w8a8 = Q.Int8OutlierLinear(q, scale, linear.bias, threshold=math.inf)(x)
    err = lambda y: (y - exact).norm().item()
    assert err(decomposed) < 1.5 * err(weight_only)
    assert err(plain_w8a8) > 5 * err(decomposed)
    # no outliers: the same integer path either way
    x[:, 17] = 1.0
    outlier = Q.Int8OutlierLinear(q, scale, linear.bias, threshold=6.0)
    torch.testing.assert_close(outlier(x), Q.Int8OutlierLinear(q, scale, linear.bias, math.inf)(x))


# --- quantize.py, the checkpoint, generate.py ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_ckpt(float_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "gptq"
    flags = ["--method", "gptq", "--group-size", 16, "--calibration-samples", 8, "--device", "cpu"]
    assert run_main(P.quantize, "--checkpoint", float_ckpt, *flags, "--out", out) == 0
    return out


def test_quantized_checkpoint_holds_integers_and_records_its_format(gptq_ckpt):
    tensors = load_file(gptq_ckpt / "model.safetensors")
    assert tensors["blocks.0.mlp.fc.weight"].dtype == torch.uint8  # packed int4
    assert tensors["blocks.0.mlp.fc.weight"].shape == (128, 16)  # (N, K/2)
    assert tensors["blocks.0.mlp.fc.scales"].dtype == torch.float16
    assert tensors["blocks.0.mlp.fc.scales"].shape == (128, 2)  # K / 16 groups
    embedding = tensors.get("wte.weight", tensors.get("lm_head.weight"))  # tied: safetensors keeps one name
    assert embedding.dtype == torch.float32  # the embedding stays in floating point
    spec = json.loads((gptq_ckpt / "config.json").read_text())["quantization"]
    assert spec["method"] == "gptq" and spec["bits"] == 4 and spec["group_size"] == 16


@pytest.mark.parametrize("method", ["int8", "int4", "int8-outlier"])
def test_quantized_checkpoint_round_trips_bit_exact(method, float_ckpt, tmp_path):
    model, config = P.checkpoint.load_checkpoint(float_ckpt)
    Q.quantize_model(model, method, group_size=16)
    spec = {"method": method, "bits": Q.BITS[method], "group_size": 16 if method == "int4" else None}
    spec["threshold"] = 6.0 if method == "int8-outlier" else None
    meta = {"tokenizer": config["tokenizer"], "training": config["training"], "quantization": spec}
    P.checkpoint.save_checkpoint(tmp_path / "q", model, meta)
    again, _ = P.loader.load_quantized(tmp_path / "q")
    want, got = model.state_dict(), again.state_dict()
    assert want.keys() == got.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], again(ids)[0])


def test_generate_from_a_quantized_checkpoint(gptq_ckpt, float_ckpt):
    """generate.py reads the format from config.json and prints the quantized model's own greedy tokens."""
    flags = ["--checkpoint", gptq_ckpt, "--prompt", "ROMEO:", "--max-new-tokens", 12, "--temperature", 0]
    out = printed(P.generate, *flags, "--device", "cpu")
    model, _ = P.loader.load_quantized(gptq_ckpt)
    assert isinstance(model.blocks[0].mlp.fc, Q.Int4Linear)
    enc = P.tokenizer.gpt2_encoding()
    assert out == "ROMEO:" + enc.decode(greedy_ids(model, enc.encode_ordinary("ROMEO:"), 12)) + "\n"


def test_gptq_lowers_the_models_layer_error_against_rtn(float_ckpt, tiny_runs):
    """The whole model: on the checkpoint's own training text, GPTQ's Linear layers reproduce the float ones'
    outputs better than round-to-nearest's in the same format."""
    model, _ = P.checkpoint.load_checkpoint(float_ckpt)
    tokens = P.loader.token_split(tiny_runs.data(PROJECT), "train")
    calibration = P.loader.calibration_batch(tokens, 16, 32, seed=0)
    held_out = P.loader.calibration_batch(tokens, 4, 32, seed=1)
    names = [n for n, _ in Q.block_linears(model)]
    inputs = P.benchmark.layer_inputs(model, held_out, names)
    gptq = Q.quantize_model(copy.deepcopy(model), "gptq", 16, calibration=calibration)
    rtn = Q.quantize_model(copy.deepcopy(model), "int4", 16)
    assert P.benchmark.layer_error(gptq, model, inputs) < P.benchmark.layer_error(rtn, model, inputs)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--method", "int4", "--group-size", "24"], "--group-size"),  # 24 does not divide 32
        (["--method", "int4", "--group-size", "5"], "--group-size"),  # odd: two values a byte
        (["--method", "gptq", "--bits", "3"], "--bits"),
        (["--method", "int4", "--bits", "8"], "--bits"),
        (["--method", "int8", "--group-size", "32"], "--group-size"),
    ],
)
def test_bad_quantize_flags(float_ckpt, tmp_path, capsys, flags, named):
    rc = run_main(P.quantize, "--checkpoint", float_ckpt, "--out", tmp_path / "q", "--device", "cpu", *flags)
    assert named in assert_one_line_error(capsys, rc)
    assert not (tmp_path / "q").exists()


def test_quantize_refuses_a_quantized_checkpoint_and_its_own_input(gptq_ckpt, float_ckpt, tmp_path, capsys):
    rc = run_main(P.quantize, "--checkpoint", gptq_ckpt, "--out", tmp_path / "q", "--device", "cpu")
    assert "already quantized" in assert_one_line_error(capsys, rc)
    rc = run_main(P.quantize, "--checkpoint", float_ckpt, "--out", float_ckpt, "--device", "cpu")
    assert "--out" in assert_one_line_error(capsys, rc)


def test_benchmark_on_a_tiny_checkpoint(float_ckpt, tiny_runs, tmp_path):
    flags = ["--checkpoint", float_ckpt, "--data", tiny_runs.data(PROJECT), "--preset", "tiny",
             "--group-sizes", "16,32", "--calibration-samples", 8, "--eval-tokens", 300,
             "--decode-tokens", 4, "--repeats", 1, "--device", "cpu", "--out", tmp_path]  # fmt: skip
    assert run_main(P.benchmark, *flags) == 0
    rows = read_report(tmp_path, PROJECT)
    value = lambda metric, variant: rows[(metric, variant)]["value"]
    assert value("kl_vs_fp32", "fp32") == 0 and value("layer_rel_error", "fp32") == 0
    for g in (16, 32):
        assert value("layer_rel_error", f"int4 GPTQ g{g}") < value("layer_rel_error", f"int4 RTN g{g}")
    sizes = [value("linear_weight_mib", v) for v in ("fp32", "bf16", "int8 RTN", "int4 RTN g32")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] / sizes[3] > 6
    assert value("int4_kernel_max_abs_diff", P.benchmark.KERNEL_CHECK) < 1e-4
    assert value("decode_tok_per_s", "int4 g32 (RTN or GPTQ), batch 1") > 0


def test_benchmark_group_sizes_that_do_not_fit_are_refused_before_measuring(float_ckpt, tmp_path, capsys):
    rc = run_main(P.benchmark, "--checkpoint", float_ckpt, "--preset", "tiny", "--group-sizes", "64",
                  "--device", "cpu", "--out", tmp_path)  # fmt: skip
    assert "--group-sizes" in assert_one_line_error(capsys, rc)


# --- project 01's character model: the one whose weights are in its blocks ---------------------------------


def test_project01_checkpoint_gives_project01s_logits(char_ckpt):
    """Its tied, unpadded embedding is padded to this GPT's vocabulary; the model is otherwise the same."""
    assert_gives_project01s_logits(P.loader.load_float_model(char_ckpt, None, "cpu")[0], char_ckpt)


def test_character_text_splits_as_project01_splits_it(char_ckpt, tiny_runs):
    data = tiny_runs.data("project01_minimal_gpt")
    p01 = load_project("project01_minimal_gpt").data
    chars = P.checkpoint.read_config(char_ckpt)["tokenizer"]["chars"]
    train, val = p01.train_val_split(torch.tensor(p01.CharTokenizer(chars).encode(p01.read_text(data))), 8)
    assert P.loader.token_split(data, "train", chars).tolist() == train.tolist()
    assert P.loader.token_split(data, "val", chars).tolist() == val.tolist()


@pytest.fixture(scope="module")
def char_gptq_ckpt(char_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("char") / "gptq"
    assert run_main(P.quantize, "--checkpoint", char_ckpt, "--method", "gptq", "--group-size", 16,
                    "--calibration-samples", 4, "--device", "cpu", "--out", out) == 0  # fmt: skip
    return out


def test_generate_from_a_quantized_character_model(char_gptq_ckpt):
    model, config = P.loader.load_quantized(char_gptq_ckpt)
    assert isinstance(model.blocks[0].mlp.fc, Q.Int4Linear) and config["tokenizer"]["type"] == "char"
    text = printed(P.generate, "--checkpoint", char_gptq_ckpt, "--prompt", "ROMEO:", "--max-new-tokens", 12,
                   "--temperature", 0, "--device", "cpu")  # fmt: skip
    chars = config["tokenizer"]["chars"]
    ids = [chars.index(c) for c in "ROMEO:"]
    assert text == "ROMEO:" + "".join(chars[i] for i in greedy_ids(model, ids, 12)) + "\n"


def test_character_model_refuses_token_shards_and_unknown_characters(
    char_ckpt, char_gptq_ckpt, tmp_path, capsys
):
    shards = tmp_path / "shards"
    shards.mkdir()
    rc = run_main(P.quantize, "--checkpoint", char_ckpt, "--data", shards, "--group-size", 16,
                  "--out", tmp_path / "q", "--device", "cpu")  # fmt: skip
    assert "text file" in assert_one_line_error(capsys, rc)
    rc = run_main(P.generate, "--checkpoint", char_gptq_ckpt, "--prompt", "ROMEO: \u00e9", "--device", "cpu")
    assert "vocabulary" in assert_one_line_error(capsys, rc)


def _edited_copy(ckpt, tmp_path, **changes):
    """A copy of a checkpoint with config.json's entries changed: {"training.data": None, ...}."""
    out = shutil.copytree(ckpt, tmp_path / "copy")
    config = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "change",
    [{"quantization__method": "int3"}, {"quantization__group_size": 24}, {"quantization__group_size": "16"}],
)
def test_a_hand_edited_quantization_config_is_one_line(gptq_ckpt, tmp_path, capsys, change):
    """A config.json whose quantization entry names no format of this project: exit 2, one line."""
    ckpt = _edited_copy(gptq_ckpt, tmp_path, **change)
    rc = run_main(P.generate, "--checkpoint", ckpt, "--max-new-tokens", 2, "--device", "cpu")
    assert "quantization config this project cannot read" in assert_one_line_error(capsys, rc)


def test_a_character_model_trained_on_project01s_default_calibrates_on_it(
    char_ckpt, tiny_runs, tmp_path, monkeypatch
):
    """Project 01 records no --data for its default, Tiny Shakespeare: GPTQ calibrates on that, not on this
    lineage's default shards."""
    ckpt = _edited_copy(char_ckpt, tmp_path, training__data=None)
    monkeypatch.setattr(P.loader, "TINY_SHAKESPEARE", tiny_runs.data("project01_minimal_gpt"))
    out = tmp_path / "q"
    assert run_main(P.quantize, "--checkpoint", ckpt, "--group-size", 16, "--calibration-samples", 4,
                    "--device", "cpu", "--out", out) == 0  # fmt: skip
    spec = json.loads((out / "config.json").read_text())["quantization"]
    assert spec["calibration"]["data"] == str(tiny_runs.data("project01_minimal_gpt"))


@pytest.mark.parametrize(
    "change, says", [({"model__n_layer": 3}, "does not match"), ({"model__n_head": 5}, "cannot read")]
)
def test_a_character_checkpoint_that_contradicts_its_config_is_one_line(
    char_ckpt, tmp_path, capsys, change, says
):
    ckpt = _edited_copy(char_ckpt, tmp_path, **change)
    rc = run_main(P.quantize, "--checkpoint", ckpt, "--method", "int8", "--out", tmp_path / "q")
    assert says in assert_one_line_error(capsys, rc)


def test_characters_outside_the_vocabulary_name_the_file(char_ckpt, tmp_path, capsys):
    text = tmp_path / "other.txt"
    text.write_text("ROMEO: {#%}\n" * 200)
    rc = run_main(P.quantize, "--checkpoint", char_ckpt, "--data", text, "--group-size", 16,
                  "--out", tmp_path / "q", "--device", "cpu")  # fmt: skip
    message = assert_one_line_error(capsys, rc)
    assert str(text) in message and "'#'" in message


def test_a_quantized_checkpoint_never_replaces_a_training_run(float_ckpt, tmp_path, capsys):
    """quantize.py --overwrite into a folder holding train.py's run (train_state.pt) is refused, the run
    untouched; by default quantize.py writes to a folder of its own, never train.py's."""
    run = shutil.copytree(float_ckpt, tmp_path / "run")
    before = digest(run)
    flags = ["--checkpoint", float_ckpt, "--method", "int8", "--out", run, "--overwrite"]
    assert "training run" in assert_one_line_error(capsys, run_main(P.quantize, *flags))
    assert digest(run) == before
    assert P.loader.QUANTIZED_DIR != P.checkpoint.DEFAULT_DIR
    assert run_main(P.quantize, "--checkpoint", float_ckpt, "--init-from", "gpt2") == 2
