"""Project 09's FlashAttention-2 kernels against the written-out attention (forward, gradients, the saved
log-sum-exp, decode-shaped queries, half precision), on the CPU through Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1), the model with its attention routed through them, the kernels compiled for an H100, and,
where there is a GPU, the kernels on it in bf16 and fp16."""

import contextlib
import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import load_project, logits_and_grads, tiny_gpt

P = load_project("project09_flash_attention")
FA = P.flash_attention
_flash_forward, attention_reference = FA._flash_forward, FA.attention_reference
attention_scores, flash_attention = FA.attention_scores, FA.flash_attention


def _inputs(B, nh, T_q, T_k, hs, dtype=torch.float32, seed=0):
    """q (B, nh, T_q, hs), k and v (B, nh, T_k, hs) and an upstream gradient do shaped like the output."""
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, nh, T_q, hs, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, nh, T_k, hs, generator=g).to(dtype) for _ in range(2))
    return q, k, v, do


def _run(attn, q, k, v, do, causal, dtype=None):
    """attn's output and (dq, dk, dv) for copies of q, k, v cast to dtype (default: their own)."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
    o = attn(*leaves, causal)
    o.backward(do.to(o.dtype))
    return o.detach(), [x.grad for x in leaves]


def _check_against_float64(q, k, v, do, causal, blocks=None):
    """fp32 kernel vs the float64 reference: forward and every gradient."""
    out, grads = _run(lambda *a: flash_attention(*a, blocks=blocks), q, k, v, do, causal)
    ref_out, ref_grads = _run(attention_reference, q, k, v, do, causal, torch.float64)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(g.double(), ref, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# Non-causal gradients are tested as carefully as causal ones: the Triton tutorial's backward ignored `causal`
# and always masked the diagonal, so its non-causal gradients were wrong (triton issues 4541, 5660).
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "B, nh, T, hs",
    [(2, 3, 1, 32), (2, 3, 17, 32), (2, 2, 100, 64), (1, 2, 17, 128), (1, 1, 257, 32)],
)
def test_forward_and_gradients_match_reference(B, nh, T, hs, causal):
    _check_against_float64(*_inputs(B, nh, T, T, hs), causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=lambda b: f"M{b[0]}-N{b[1]}")
def test_unequal_block_sizes(blocks, causal):
    """BLOCK_M != BLOCK_N puts the diagonal across several blocks of the other side: the block ranges of the
    causal stages must still cover every visible pair exactly once."""
    _check_against_float64(*_inputs(1, 2, 50, 50, 32), causal, dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1]))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T_q, T_k", [(1, 100), (17, 100), (20, 50)])
def test_fewer_queries_than_keys(T_q, T_k, causal):
    """T_q = 1 is a KV-cache decode step; causal queries are the last T_q positions of the keys."""
    _check_against_float64(*_inputs(2, 2, T_q, T_k, 32), causal)


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)], ids=lambda b: f"M{b[0]}-N{b[1]}")
def test_every_diagonal_offset(blocks):
    """The causal block ranges are integer arithmetic on T_k - T_q modulo the block sizes: try every
    offset across a block, since an off-by-one there shows only for some of them."""
    for offset in range(max(blocks) + 1):
        q, k, v, do = _inputs(1, 1, 20, 20 + offset, 32)
        _check_against_float64(q, k, v, do, True, dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1]))


def test_decode_step_sees_the_whole_cache():
    """The causal mask aligns a single query to the last key, so it attends to everything, like non-causal."""
    q, k, v, _ = _inputs(1, 2, 1, 33, 32)
    torch.testing.assert_close(flash_attention(q, k, v, causal=True), flash_attention(q, k, v, causal=False))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_saved_lse_is_logsumexp_of_scores(causal):
    q, k, v, _ = _inputs(2, 2, 37, 45, 64)
    _, lse = _flash_forward(q, k, v, causal, dict(BLOCK_M=16, BLOCK_N=16))  # (B, nh, T_q)
    assert lse.dtype == torch.float32
    expected = torch.logsumexp(attention_scores(q.double(), k.double(), causal), dim=-1)
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs():
    """The model hands over (B, T, nh, hs) views transposed to (B, nh, T, hs)."""
    q, k, v, do = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _inputs(2, 3, 20, 20, 32))
    assert not q.is_contiguous()
    _check_against_float64(q, k, v, do, causal=True)


# Half precision: the flash-attention repository's rule. Rounding to 16 bits makes any implementation
# differ from fp32, so the kernel's error against an fp32 reference may be at most 2x (gradients 3x) that of
# PyTorch's own attention computed in the same dtype.
BF16_SKIP = "Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584): GPU only"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "dtype",
    [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skip(reason=BF16_SKIP))],
    ids=["fp16", "bf16"],
)
def test_half_precision_within_rule(dtype, causal):
    q, k, v, do = (x.to(dtype) for x in _inputs(2, 2, 100, 100, 64))  # the same rounded inputs for all three
    out, grads = _run(flash_attention, q, k, v, do, causal)
    torch_out, torch_grads = _run(attention_reference, q, k, v, do, causal)
    ref_out, ref_grads = _run(attention_reference, q, k, v, do, causal, torch.float32)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    err = lambda x, ref: (x.float() - ref).abs().max().item()
    assert err(out, ref_out) <= 2 * err(torch_out, ref_out)
    for name, g, g_torch, ref in zip(("dq", "dk", "dv"), grads, torch_grads, ref_grads):
        assert err(g, ref) <= 3 * err(g_torch, ref), name


@pytest.mark.parametrize(
    "shapes, dtypes, causal",
    [
        (((1, 1, 8, 32), (1, 1, 4, 32)), None, True),  # causal with more queries than keys
        (((1, 1, 8, 48), (1, 1, 8, 48)), None, True),  # head size not a power of two
        (((1, 1, 8, 32), (1, 1, 8, 32)), (torch.float32, torch.float16), False),  # mixed dtypes
    ],
)
def test_rejects_unsupported_inputs(shapes, dtypes, causal):
    q_dtype, kv_dtype = dtypes or (torch.float32, torch.float32)
    q, k = torch.randn(shapes[0], dtype=q_dtype), torch.randn(shapes[1], dtype=kv_dtype)
    with pytest.raises(ValueError):
        flash_attention(q, k, k, causal)


def test_the_model_through_the_kernels_equals_sdpa(monkeypatch):
    """The same GPT (head size 16, two layers) with attention through our kernels, as on a GPU, and through
    scaled_dot_product_attention: the same logits, and the same gradients of the loss."""
    model = tiny_gpt("project09_flash_attention", n_embd=32, n_head=2, block_size=48)
    ids = torch.randint(0, 100, (2, 48), generator=torch.Generator().manual_seed(0))

    sdpa_logits, sdpa_grads = logits_and_grads(model, ids)
    calls = []
    monkeypatch.setattr(P.model, "kernels_run_on", lambda t: calls.append(t.shape) or True)
    triton_logits, triton_grads = logits_and_grads(model, ids)
    assert len(calls) == 2  # both layers went through the kernels
    torch.testing.assert_close(triton_logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    for name, g in sdpa_grads.items():
        torch.testing.assert_close(triton_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_cached_generation_prefills_through_the_kernels(monkeypatch):
    """The prompt's prefill goes through the kernels (its keys also written to the cache), the decode steps
    through SDPA over the cache: the uncached path's greedy tokens, inside the context and past it."""
    model = tiny_gpt("project09_flash_attention", n_embd=32, n_head=2, block_size=32)
    prompt = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(1))
    plain = torch.cat(list(model.generate_stream(prompt, 20, temperature=0, use_cache=False)), dim=1)
    shapes = []
    monkeypatch.setattr(P.model, "kernels_run_on", lambda t: shapes.append(t.size(2)) or True)
    cached = torch.cat(list(model.generate_stream(prompt, 20, temperature=0)), dim=1)
    assert torch.equal(cached, plain)
    assert shapes[:2] == [20, 20] and 32 in shapes  # the prefill in both layers; re-prefills past the context


def test_benchmark_prefill_takes_the_keys_bf16_autocast_makes():
    """benchmark.py times GPT-2's prefill under the GPU's bf16 autocast: the cache it sets up holds bf16
    keys (a cache in the weights' fp32 would refuse them, and the GPU run would end with nothing written).
    Run here on the CPU, whose autocast also makes bf16, with SDPA."""
    mc, tc = P.config.PRESETS["tiny"]
    mc = dataclasses.replace(mc, **P.config.ATTENTION["sdpa"])
    tok_s, prefill_ms = P.benchmark.train_and_prefill(
        mc, tc, torch.bfloat16, SimpleNamespace(repeats=1), torch.device("cpu")
    )
    assert tok_s > 0 and prefill_ms > 0


def test_benchmark_holds_sdpa_to_its_flash_backend_on_the_gpu(monkeypatch):
    """The speed targets are against SDPA's FlashAttention-2 backend: on CUDA in 16 bits the benchmark's
    SDPA runs under sdpa_kernel(FLASH_ATTENTION); elsewhere PyTorch chooses."""
    chosen = []
    pinned = lambda backend: chosen.append(backend) or contextlib.nullcontext()  # noqa: E731
    monkeypatch.setattr(P.benchmark, "sdpa_kernel", pinned)
    q = torch.randn(1, 2, 5, 16)
    P.benchmark.sdpa(q, q, q, True)
    assert chosen == []
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    monkeypatch.setattr(P.benchmark.F, "scaled_dot_product_attention", lambda *a, **k: "ran")
    assert P.benchmark.sdpa(cuda_like, q, q, True) == "ran"
    assert chosen == [P.benchmark.SDPBackend.FLASH_ATTENTION]


def test_benchmark_cut_short_writes_what_it_measured(monkeypatch):
    """run_benchmarks.py stops a benchmark past its budget with Ctrl-C: on the GPU path the rows measured
    until then are still written, the report says it was cut short, and the exit code is 130."""
    B, written = P.benchmark, {}

    def first_case_then_ctrl_c(args, dtype, device, rows, curves):
        rows.append(B.row("attention_tflops", "sdpa, hs 64, causal, fwd, T=512", 100.0, "TFLOP/s"))
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(B, "pick_dtype", lambda name, device: torch.bfloat16)
    monkeypatch.setattr(B, "correctness_rows", lambda device: [])
    monkeypatch.setattr(B, "kernel_rows", first_case_then_ctrl_c)
    monkeypatch.setattr(B, "write_report", lambda args, *a: written.update(config=a[-2], rows=a[-1]))
    assert B.main(["--no-train"]) == 130
    assert written["config"]["cut_short"] is True
    assert [r["value"] for r in written["rows"]] == [100.0]


def test_training_through_the_kernels_matches_sdpa(tiny_runs, tmp_path, monkeypatch):
    """A few steps of train.py --preset tiny with the Triton path and with SDPA: the same losses."""
    train, read_metrics = P.train, P.checkpoint.read_metrics
    data = tiny_runs.data("project09_flash_attention")
    flags = ["--preset", "tiny", "--device", "cpu", "--data", str(data), "--max-iters", "3",
             "--eval-interval", "3", "--eval-iters", "1"]  # fmt: skip
    assert train.main([*flags, "--attention", "sdpa", "--out", str(tmp_path / "sdpa")]) == 0
    monkeypatch.setattr(P.model, "kernels_run_on", lambda t: True)
    assert train.main([*flags, "--attention", "triton", "--out", str(tmp_path / "triton")]) == 0
    a, b = ([m["loss"] for m in read_metrics(tmp_path / run) if "loss" in m] for run in ("sdpa", "triton"))
    assert a == pytest.approx(b, rel=1e-5) and len(a) == 3


# The interpreter runs a kernel as Python, so it accepts things the GPU compiler refuses (a plain global
# float inside a kernel did). Compiling for an H100/H200 (sm_90) needs no GPU, since Triton's wheel carries
# ptxas, but it needs the kernels as GPU kernels: a fresh process without TRITON_INTERPRET.
COMPILE_FOR_SM90 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import flash_attention as FA

def compile_for_sm90(kernel, constexprs, **options):
    pointers = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in ("LSE", "DELTA"):
            return "*fp32"
        return "*bf16" if name in pointers else "fp32" if name.endswith("scale") else "i32"
    signature = {name: kind(name) for name in kernel.arg_names}
    consts = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared

class BF16Query:  # what _launch_config reads of a (B, nh, T, hs) bf16 query on the GPU
    is_cuda = True
    def __init__(self, T, hs):
        self.shape = {-2: T, -1: hs}
    def size(self, dim):
        return self.shape[dim]
    def element_size(self):
        return 2

def tiles(cfg):  # _launch_config's dict: the block sizes are constexprs, the rest compiler options
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    return blocks, {k: v for k, v in cfg.items() if k not in blocks}

shared = []
for hs in (64, 128):  # GPT-2 124M, and the benchmark's other head dim
    meta = dict(HEAD_DIM=hs, CAUSAL=sys.argv[1] == "causal")
    for T in (1, 1024):  # a decode step's single query, then prefill and training
        blocks, options = tiles(FA._launch_config(BF16Query(T, hs), backward=False))
        shared.append(compile_for_sm90(FA._fwd_kernel, dict(**blocks, **meta), **options))
    blocks, options = tiles(FA._launch_config(BF16Query(1024, hs), backward=True))
    for kernel in (FA._bwd_dkdv_kernel, FA._bwd_dq_kernel):
        shared.append(compile_for_sm90(kernel, dict(**blocks, **meta), **options))
    shared.append(compile_for_sm90(FA._bwd_preprocess, dict(HEAD_DIM=hs, BLOCK_M=blocks["BLOCK_M"])))
print(min(shared), max(shared))
"""


@pytest.mark.parametrize("causal", ["causal", "full"])
def test_kernels_compile_for_an_h100_without_a_gpu(causal):
    """Every kernel in _launch_config's GPU configurations in bf16 (head dims 64 and 128; a decode step's
    single query and a 1,024-token sequence) compiles for sm_90, within its 227 KiB of shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", COMPILE_FOR_SM90, causal]
    result = subprocess.run(
        cmd, cwd=P.model.__file__.rsplit("/", 1)[0], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    least, most = map(int, result.stdout.split()[-2:])
    assert 0 <= least and most <= 227 * 1024


ON_THE_GPU = """
import torch
from flash_attention import attention_reference, flash_attention

for dtype in (torch.bfloat16, torch.float16):
    for causal in (True, False):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(2, 4, 1000, 64, device="cuda", generator=g) for _ in range(4))

        def run(fn, cast):
            leaves = [x.to(cast).requires_grad_() for x in (q, k, v)]
            o = fn(*leaves, causal)
            o.backward(do.to(cast))
            return [o.float(), *(x.grad.float() for x in leaves)]

        ours = run(flash_attention, dtype)
        torch_16 = run(attention_reference, dtype)  # PyTorch's attention in the same 16-bit dtype
        ref = run(attention_reference, torch.float32)
        for name, a, b, r, limit in zip(("o", "dq", "dk", "dv"), ours, torch_16, ref, (2, 3, 3, 3)):
            ok = (a - r).abs().max() <= limit * (b - r).abs().max()
            assert ok, (dtype, causal, name, (a - r).abs().max().item(), (b - r).abs().max().item())
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_bf16_and_fp16_within_the_rule():
    """Compiled for the GPU in a process without the interpreter: bf16 (which the interpreter cannot check)
    and fp16 within 2x (gradients 3x) the error of PyTorch's own attention in that dtype, T = 1000."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    folder = P.model.__file__.rsplit("/", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", ON_THE_GPU], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
