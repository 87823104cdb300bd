"""Sample text from a trained checkpoint, or from GPT-2's published weights.

python generate.py --init-from gpt2 --prompt "The meaning of life is"   # OpenAI's GPT-2 small
python generate.py --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --top-k 50
python generate.py --stream          # print text as it is sampled, whole characters only
python generate.py --interactive     # type prompts, get continuations
python generate.py --dtype float16   # half-precision weights: half the memory
python generate.py --no-cache        # without the KV cache: the same text, each step rerunning the window
python generate.py --system "$(cat rules.txt)" --prompt-file questions.txt  # a shared prefix, prefilled once
python generate.py --system "You are a poet." --interactive   # each turn reuses the conversation so far
python generate.py --draft data/models/project11_speculative_decoding   # speculative decoding: the same text
python generate.py --drafter lookup  # drafts copied from earlier in the text (prompt lookup), no draft model
"""

import codecs
import sys
import time
from pathlib import Path

import torch

from checkpoint import DEFAULT_DIR, MODELS_DIR, checkpoint_exists, load_checkpoint
from cli import (
    DTYPES,
    ArgumentParser,
    UserError,
    add_device_args,
    check_dtype,
    command,
    exits_cleanly,
    non_negative_int,
    pick_device,
    positive_float,
    positive_int,
    probability,
    sync,
    temperature,
)
from data import DATA_DIR
from hf import load_gpt2
from model import GPT
from prefix_cache import PrefixCache
from speculative import LookupDrafter, ModelDrafter, SpeculativeDecoder
from tokenizer import GPT2Tokenizer


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
    p.add_argument("--num-samples", type=positive_int, default=1, help="continuations of the prompt")
    p.add_argument("--seed", type=non_negative_int, default=1337, help="same seed, same samples")
    p.add_argument("--stream", action="store_true", help="print text as it is sampled, whole characters only")
    prompts.add_argument(
        "--interactive", action="store_true", help="read prompts from stdin until EOF or 'quit'"
    )
    p.add_argument("--no-cache", action="store_true", help="rerun the whole window every step (no KV cache)")
    # NEW: speculative decoding (speculative.py): a drafter proposes, the model checks k tokens per pass
    p.add_argument(
        "--drafter", choices=["model", "lookup"], default=None, help="a draft model or prompt lookup"
    )
    p.add_argument(
        "--draft",
        type=Path,
        default=None,
        help="the draft model's checkpoint, same tokenizer (implies --drafter model; default: this "
        "project's, from train.py --preset draft)",
    )
    p.add_argument("--speculate-k", type=positive_int, help="tokens drafted per target pass (default 5)")
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
    """NEW: project 03's pre-trained model, the target; this project's own checkpoint is the draft model."""
    target = MODELS_DIR / "project03_pretrain"
    if not checkpoint_exists(target):
        train = command("train.py", "--preset", "cpu", project="project03_pretrain")
        raise UserError(f"no target model in {target}: train one with {train}, or pass --checkpoint")
    return target


def speculative_decoder(args, target: GPT, device, dtype: torch.dtype) -> SpeculativeDecoder:
    """NEW: the target with the drafter that --drafter and --draft name, checked before generating."""
    if args.drafter == "lookup" and args.draft is not None:
        raise UserError("--draft names a draft model, which --drafter lookup does not use")
    if args.no_cache:
        raise UserError("speculative decoding checks its drafts against the KV cache: drop --no-cache")
    k = args.speculate_k or 5
    if args.drafter == "lookup":
        return SpeculativeDecoder(target, LookupDrafter(), k)
    draft, _ = load_checkpoint(args.draft or DEFAULT_DIR, device, tokenizer="tiktoken")
    try:
        return SpeculativeDecoder(target, ModelDrafter(draft.to(dtype), target), k)
    except ValueError as e:  # a draft with another vocabulary
        raise UserError(f"{args.draft or DEFAULT_DIR}: {e}") from e


def encode_prompt(tokenizer: GPT2Tokenizer, prompt: str, block_size: int, device) -> torch.Tensor:
    try:
        ids = tokenizer.encode(prompt)  # byte-level: any valid text encodes
    except UnicodeEncodeError as e:  # lone surrogates: what Python makes of undecodable bytes in argv
        raise UserError(f"the prompt is not valid Unicode text ({e.reason} at position {e.start})") from e
    if not ids:
        raise UserError("the prompt is empty; give at least one character")
    if len(ids) > block_size:
        raise UserError(f"the prompt is {len(ids)} tokens; this model's context is {block_size}")
    return torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)


def sample(
    model: GPT, tokenizer: GPT2Tokenizer, idx: torch.Tensor, args, gen, stream, prefix_cache=None
) -> tuple[str, list[int]]:
    """One continuation of idx: its text and token ids. With stream=True text is printed as soon as it forms
    whole characters. With prefix_cache, the time to first token is reported against a full prefill's."""
    # a token is a run of bytes, and one character's UTF-8 bytes may be split across tokens (an emoji
    # is 4 bytes, often 2-3 tokens). The incremental decoder holds an incomplete sequence back until the
    # next token completes it, so the stream never shows half a character.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen)
    sampling["use_cache"] = not args.no_cache  # the KV cache unless --no-cache
    if prefix_cache is not None:  # timed first: the prefill's KV cache is gone once generation starts
        target = getattr(model, "target", model)  # NEW: a speculative decoder's target
        without, reused = full_prefill_seconds(target, idx), prefix_cache.hit_tokens
    start, ids, ttft = time.perf_counter(), [], 0.0
    for next_id in model.generate_stream(idx, args.max_new_tokens, prefix_cache=prefix_cache, **sampling):
        ids.append(next_id.item())  # .item() waits for the GPU: the first one times the prefill
        if len(ids) == 1:
            ttft = time.perf_counter() - start
        pieces.append(utf8.decode(tokenizer.id_to_bytes(ids[-1])))
        if stream and pieces[-1]:
            print(pieces[-1], end="", flush=True)
    pieces.append(utf8.decode(b"", final=True))  # bytes still pending at the end become U+FFFD
    if stream:
        print(pieces[-1], end="", flush=True)
    if prefix_cache is not None:
        report_request(idx, prefix_cache.hit_tokens - reused, ttft, without)
    return "".join(pieces), ids


TTFT_SECONDS = {"with": 0.0, "without": 0.0}  # time to first token with and without the prefix cache, summed


def full_prefill_seconds(model: GPT, idx: torch.Tensor) -> float:
    """The time a prefill of the whole prompt takes: what the prefix cache saves is measured, not guessed."""
    model.setup_cache(1, idx.size(1))
    sync(idx.device)
    start = time.perf_counter()
    model.prefill(idx).sum().item()
    model.clear_cache()
    return time.perf_counter() - start


def report_request(idx: torch.Tensor, reused: int, ttft: float, without: float) -> None:
    TTFT_SECONDS["with"] += ttft
    TTFT_SECONDS["without"] += without
    print(
        f"\n[prefix cache] {reused} of {idx.size(1)} prompt tokens reused; first token in "
        f"{ttft * 1e3:.1f} ms (a full prefill takes {without * 1e3:.1f} ms)",
        file=sys.stderr,
    )


def report_cache(prefix_cache: PrefixCache | None) -> None:
    if prefix_cache is not None and prefix_cache.queried_tokens:
        print(
            f"[prefix cache] hit rate {prefix_cache.hit_rate:.0%} of prompt tokens; time to first token "
            f"{TTFT_SECONDS['with']:.3f} s in all, {TTFT_SECONDS['without']:.3f} s without the cache; "
            f"{prefix_cache.bytes_used / 2**20:.1f} MiB in {prefix_cache.num_blocks} blocks",
            file=sys.stderr,
        )


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


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.speculate_k and not (args.drafter or args.draft):
        raise UserError(
            "--speculate-k sets how many tokens a drafter proposes: add --drafter model or lookup"
        )
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
    gen = torch.Generator(device=device).manual_seed(args.seed)  # same seed, same samples
    block_size = model.config.block_size
    if args.drafter or args.draft:  # NEW: the same generate_stream, drafting and checking k tokens a pass
        model = speculative_decoder(args, model, device, dtype)

    cached = not (args.no_cache or args.no_prefix_cache)
    prefix_cache = PrefixCache(int(args.cache_mb * 2**20)) if cached else None
    TTFT_SECONDS.update({"with": 0.0, "without": 0.0})  # this run's totals (tests call main repeatedly)
    if args.interactive:
        return interact(model, tokenizer, args, gen, prefix_cache)
    prompts = read_prompts(args)
    encoded = [encode_prompt(tokenizer, prompt, block_size, device) for prompt in prompts]  # all, first
    for n, (prompt, idx) in enumerate(zip(prompts, encoded), start=1):
        for i in range(args.num_samples):
            if args.num_samples > 1 or len(prompts) > 1:
                print(f"--- {f'prompt {n}, ' if len(prompts) > 1 else ''}sample {i + 1} ---")
            print(prompt, end="", flush=True)
            text, _ = sample(model, tokenizer, idx, args, gen, args.stream, prefix_cache)
            print("" if args.stream else text)
    report_cache(prefix_cache)
    if isinstance(model, SpeculativeDecoder):  # NEW: what the drafts bought
        print(model.stats.summary(), file=sys.stderr)
    return 0


def interact(model: GPT, tokenizer: GPT2Tokenizer, args, gen, prefix_cache: PrefixCache | None) -> int:
    """A conversation: each line typed is added to everything said so far (after --system), and the model
    continues the whole. The conversation so far is the prefix the cache already holds."""
    print("Type a prompt and press Enter (Ctrl-D or 'quit' to leave).", file=sys.stderr)
    conversation = tokenizer.encode(args.system) if args.system else []  # token ids, not text: re-encoding
    while True:  # the text could split the old tokens differently and miss the cache
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            report_cache(prefix_cache)
            return 0
        if line.strip() == "quit":
            report_cache(prefix_cache)
            return 0
        try:
            turn = encode_prompt(tokenizer, line + "\n", model.config.block_size, gen.device)[0].tolist()
        except UserError as e:  # a bad prompt should not end the session
            print(f"error: {e}", file=sys.stderr)
            continue
        if len(conversation) + len(turn) >= model.config.block_size:
            print("[the conversation fills the context: starting again after --system]", file=sys.stderr)
            conversation = tokenizer.encode(args.system) if args.system else []
        conversation += turn
        idx = torch.tensor([conversation[-model.config.block_size :]], device=gen.device)  # (1, T)
        _, reply = sample(model, tokenizer, idx, args, gen, True, prefix_cache)
        conversation += reply
        print()


if __name__ == "__main__":
    raise SystemExit(main())
