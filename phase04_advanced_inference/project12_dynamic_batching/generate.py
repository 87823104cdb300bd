"""Sample text from a trained checkpoint, or from GPT-2's published weights, through the serving engine
(engine.py): every prompt is a request, and the requests are served together, continuously batched.

python generate.py --init-from gpt2 --prompt "The meaning of life is"   # OpenAI's GPT-2 small
python generate.py --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --top-k 50
python generate.py --stream          # print text as it is sampled, whole characters only
python generate.py --interactive     # type prompts, get continuations
python generate.py --dtype float16   # half-precision weights: half the memory
python generate.py --no-cache        # without the KV cache: the same text, one request at a time, each step
                                     # rerunning the window
python generate.py --prompt-file questions.txt --max-num-seqs 8   # many prompts at once, printed in order
python generate.py --system "$(cat rules.txt)" --prompt-file questions.txt  # a shared prefix, prefilled once
python generate.py --system "You are a poet." --interactive   # each turn reuses the conversation so far
"""

import argparse
import itertools
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from checkpoint import DEFAULT_DIR, MODELS_DIR, checkpoint_exists, load_checkpoint
from cli import (
    DTYPES,
    ArgumentParser,
    UserError,
    add_device_args,
    check_dtype,
    exits_cleanly,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
    probability,
    temperature,
)
from data import DATA_DIR
from engine import Engine, EngineConfig
from hf import load_gpt2
from model import GPT
from prefix_cache import PrefixCache
from sequence import RequestOutput, SamplingParams, Sequence
from tokenizer import EOT, GPT2Tokenizer


def stop_text(text: str) -> str:
    """argparse type for --stop: a non-empty string; \\n is a newline."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text.replace("\\n", "\n")


def parse_args(argv):
    p = ArgumentParser(
        description="Generate text with a checkpoint of this project's GPT-2, or with GPT-2's weights."
    )
    source = p.add_mutually_exclusive_group()  # a checkpoint of this GPT, or GPT-2's weights
    source.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a checkpoint of this GPT (default: this project's, else project03_pretrain's)",
    )
    source.add_argument(
        "--init-from",
        default=None,
        help="instead of a checkpoint: gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded from the "
        "Hugging Face Hub) or a local Hugging Face GPT-2 directory",
    )
    prompts = p.add_mutually_exclusive_group()  # one prompt, a file of them, or a conversation
    prompts.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    prompts.add_argument(
        "--prompt-file",
        type=Path,
        default=None,
        help="several prompts, one per line (write \\n for a newline inside one); instead of --prompt",
    )
    p.add_argument("--system", default="", help="text put before every prompt: the prefix they all share")
    cache = p.add_mutually_exclusive_group()  # the prefix cache's size, or none
    cache.add_argument(
        "--cache-mb", type=positive_float, default=256, help="the prefix cache's memory budget"
    )
    cache.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt in full")
    p.add_argument("--max-new-tokens", type=positive_int, default=500, help="tokens to sample per sample")
    p.add_argument("--temperature", type=temperature, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample only from the k likeliest tokens")
    p.add_argument("--top-p", type=probability, default=None, help="sample from the smallest set with mass p")
    p.add_argument("--num-samples", type=positive_int, default=1, help="continuations of each prompt")
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=1337,
        help="request k samples with seed + k: same seed, same samples",
    )
    p.add_argument("--stream", action="store_true", help="print text as it is sampled, whole characters only")
    prompts.add_argument(
        "--interactive", action="store_true", help="read prompts from stdin until EOF or 'quit'"
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="rerun the whole window every step (no KV cache), one request at a time: no engine",
    )
    p.add_argument("--stop", type=stop_text, action="append", help="end a completion before this text")
    p.add_argument("--stop-at-eot", action="store_true", help="end a completion at <|endoftext|>")
    # NEW: the engine's limits (engine.EngineConfig)
    p.add_argument(
        "--max-num-seqs",
        type=positive_int,
        default=EngineConfig.max_num_seqs,
        help="requests served at once (each holds a row of the KV cache)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=EngineConfig.max_num_batched_tokens,
        help="tokens one step computes at most (at least the context)",
    )
    p.add_argument(
        "--kv-mb", type=positive_float, default=None, help="the KV cache's memory budget (default: no limit)"
    )
    add_device_args(p, dtype=False)
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="the weights' dtype (16 bits: half the memory); auto is float16 on GPUs (closer to float32's "
        "perplexity than bfloat16: see the README), float32 elsewhere",
    )
    return p.parse_args(argv)


def default_checkpoint() -> Path:
    """This project's model, else project 03's pre-trained one (the same GPT)."""
    pretrained = MODELS_DIR / "project03_pretrain"
    return pretrained if not checkpoint_exists(DEFAULT_DIR) and checkpoint_exists(pretrained) else DEFAULT_DIR


def encode_prompt(tokenizer: GPT2Tokenizer, prompt: str, block_size: int) -> list[int]:
    try:
        ids = tokenizer.encode(prompt)  # byte-level: any valid text encodes
    except UnicodeEncodeError as e:  # lone surrogates: what Python makes of undecodable bytes in argv
        raise UserError(f"the prompt is not valid Unicode text ({e.reason} at position {e.start})") from e
    if not ids:
        raise UserError("the prompt is empty; give at least one character")
    if len(ids) > block_size:
        raise UserError(f"the prompt is {len(ids)} tokens; this model's context is {block_size}")
    return ids


def read_prompts(args) -> list[str]:
    """--prompt, or --prompt-file's lines (\\n in a line is a newline); each after --system."""
    if args.prompt_file is None:
        return [args.system + args.prompt]
    try:
        lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --prompt-file {args.prompt_file}: {e}") from e
    prompts = [args.system + line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompt-file {args.prompt_file} holds no prompt")
    return prompts


def sampling_params(args, seed: int) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=seed,
        max_tokens=args.max_new_tokens,
        stop=tuple(args.stop or ()),
        stop_token_ids=(EOT,) if args.stop_at_eot else (),
    )


def make_engine(model: GPT, args, num_requests: int, prefix_cache, tokenizer) -> Engine:
    """NEW: an engine with a row for each request, up to --max-num-seqs (and --kv-mb)."""
    config = EngineConfig(min(args.max_num_seqs, num_requests), args.max_num_batched_tokens, args.kv_mb)
    try:
        return Engine(model, config, prefix_cache, tokenizer)
    except ValueError as e:  # limits that cannot work with this model: one line, exit 2
        raise UserError(f"{e}; see --max-num-batched-tokens and --kv-mb") from e


def one_at_a_time(model: GPT, prompts: list[list[int]], params: list[SamplingParams], tokenizer):
    """--no-cache: each request alone through model.generate_stream without a KV cache (every step reruns the
    whole window), in the engine's output format: the reference its tokens equal."""
    device = model.wte.weight.device
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        seq = Sequence(i, prompt, p, tokenizer.id_to_bytes, device)
        sampling = (p.temperature, p.top_k, p.top_p, seq.generator)
        for next_id in model.generate_stream(torch.tensor([prompt], device=device), p.max_tokens, *sampling,
                                             use_cache=False):  # fmt: skip
            out = seq.append(next_id.item())
            yield i, out
            if out.finished:
                break


def print_in_order(events, heads: list[str], stream: bool) -> tuple[list[list[int]], list[RequestOutput]]:
    """NEW: print every request's head (header and prompt) and completion in request order, whatever order
    the engine finishes them in: a completion once it and those before it are done, or with stream, the
    current one's text as it comes. Returns each request's new token ids and its last output."""
    texts, ids, last, shown = [[] for _ in heads], [[] for _ in heads], [None] * len(heads), 0
    print(heads[0], end="", flush=True)
    for i, out in events:
        texts[i].append(out.text)
        ids[i] += out.token_ids
        last[i] = out
        if stream and i == shown:
            print(out.text, end="", flush=True)
        while shown < len(heads) and last[shown] is not None and last[shown].finished:
            print("" if stream else "".join(texts[shown]))
            shown += 1
            if shown < len(heads):
                print(heads[shown] + ("".join(texts[shown]) if stream else ""), end="", flush=True)
    return ids, last


def report_reuse(out: RequestOutput, prompt_tokens: int, prefix_cache: PrefixCache | None) -> None:
    if prefix_cache is not None:
        print(f"[prefix cache] {out.cached_tokens} of {prompt_tokens} prompt tokens reused", file=sys.stderr)


def report_cache(prefix_cache: PrefixCache | None) -> None:
    if prefix_cache is not None and prefix_cache.queried_tokens:
        print(
            f"[prefix cache] hit rate {prefix_cache.hit_rate:.0%} of prompt tokens; "
            f"{prefix_cache.bytes_used / 2**20:.1f} MiB in {prefix_cache.num_blocks} blocks",
            file=sys.stderr,
        )


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.init_from:  # GPT-2's own weights, converted from the Hugging Face format (hf.py)
        model = load_gpt2(args.init_from, cache_dir=DATA_DIR / "hf").to(device).eval()
    else:
        model, _ = load_checkpoint(args.checkpoint or default_checkpoint(), device, tokenizer="tiktoken")
    tokenizer = GPT2Tokenizer()
    auto = torch.float16 if device.type == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else DTYPES[args.dtype]
    check_dtype(dtype, device)
    model = model.to(dtype)  # 16-bit weights: half the memory read per token; every op runs in dtype
    cached = not (args.no_cache or args.no_prefix_cache)
    prefix_cache = PrefixCache(int(args.cache_mb * 2**20)) if cached else None
    if args.interactive:
        return interact(model, tokenizer, args, prefix_cache)

    prompts = read_prompts(args)
    encoded = [encode_prompt(tokenizer, prompt, model.config.block_size) for prompt in prompts]  # all, first
    many = args.num_samples > 1 or len(prompts) > 1
    heads, requests = [], []  # NEW: every sample of every prompt is a request, all served together
    for n, (prompt, ids) in enumerate(zip(prompts, encoded), start=1):
        for i in range(args.num_samples):
            header = f"--- {f'prompt {n}, ' if len(prompts) > 1 else ''}sample {i + 1} ---\n" if many else ""
            heads.append(header + prompt)
            requests.append(ids)
    params = [sampling_params(args, args.seed + k) for k in range(len(requests))]
    start = time.perf_counter()
    if args.no_cache:
        engine, events = None, one_at_a_time(model, requests, params, tokenizer)
    else:
        engine = make_engine(model, args, len(requests), prefix_cache, tokenizer)
        events = engine.generate(requests, params)
    new_ids, last = print_in_order(events, heads, args.stream)
    seconds = time.perf_counter() - start
    for out, ids in zip(last, requests):
        report_reuse(out, len(ids), prefix_cache)
    report_cache(prefix_cache)
    tokens = sum(len(ids) for ids in new_ids)
    how = "one at a time" if engine is None else f"up to {engine.max_num_seqs} at once"
    reasons = Counter(out.finish_reason for out in last)  # "length" (max tokens) or "stop"
    print(f"[engine] {len(requests)} requests, {tokens} new tokens in {seconds:.2f} s: "
          f"{tokens / seconds:.1f} tokens/s, {how}; finished: "
          f"{', '.join(f'{n} {why}' for why, n in sorted(reasons.items()))}", file=sys.stderr)  # fmt: skip
    return 0


def interact(model: GPT, tokenizer: GPT2Tokenizer, args, prefix_cache: PrefixCache | None) -> int:
    """A conversation: each line typed is added to everything said so far (after --system), and the model
    continues the whole. The conversation so far is the prefix the cache already holds."""
    print("Type a prompt and press Enter (Ctrl-D or 'quit' to leave).", file=sys.stderr)
    engine = None if args.no_cache else make_engine(model, args, 1, prefix_cache, tokenizer)
    conversation = tokenizer.encode(args.system) if args.system else []  # token ids, not text: re-encoding
    # the text could split the old tokens differently and miss the cache
    for turn_number in itertools.count():
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            break
        if line.strip() == "quit":
            break
        try:
            turn = encode_prompt(tokenizer, line + "\n", model.config.block_size)
        except UserError as e:  # a bad prompt should not end the session
            print(f"error: {e}", file=sys.stderr)
            continue
        if len(conversation) + len(turn) >= model.config.block_size:
            print("[the conversation fills the context: starting again after --system]", file=sys.stderr)
            conversation = tokenizer.encode(args.system) if args.system else []
        conversation += turn
        prompt = conversation[-model.config.block_size :]
        params = [sampling_params(args, args.seed + turn_number)]
        events = (
            one_at_a_time(model, [prompt], params, tokenizer)
            if engine is None
            else engine.generate([prompt], params)
        )
        (reply,), (last,) = print_in_order(events, [""], True)
        report_reuse(last, len(prompt), prefix_cache)
        conversation += reply
    report_cache(prefix_cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
