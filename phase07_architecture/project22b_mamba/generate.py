"""Sample text from a trained checkpoint, or from GPT-2's published weights.

python generate.py --init-from gpt2 --prompt "The meaning of life is"   # OpenAI's GPT-2 small
python generate.py --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --top-k 50
python generate.py --stream          # print text as it is sampled, whole characters only
python generate.py --interactive     # type prompts, get continuations
python generate.py --dtype float16   # half-precision weights: half the memory
"""

import codecs
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import DEFAULT_DIR, MODELS_DIR, checkpoint_exists, load_checkpoint
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    exits_cleanly,
    non_negative_int,
    pick_device,
    positive_int,
    probability,
    temperature,
)
from data import DATA_DIR
from hf import load_gpt2
from model import GPT
from precision import DTYPES, check_dtype
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
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=positive_int, default=500, help="tokens to sample per sample")
    p.add_argument("--temperature", type=temperature, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample only from the k likeliest tokens")
    p.add_argument("--top-p", type=probability, default=None, help="sample from the smallest set with mass p")
    p.add_argument("--num-samples", type=positive_int, default=1, help="continuations of the prompt")
    p.add_argument("--seed", type=non_negative_int, default=1337, help="same seed, same samples")
    p.add_argument("--stream", action="store_true", help="print text as it is sampled, whole characters only")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin until EOF or 'quit'")
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


def sample(model: GPT, tokenizer: GPT2Tokenizer, idx: torch.Tensor, args, gen, stream) -> str:
    """One continuation of idx. With stream=True text is printed as soon as it forms whole characters."""
    # a token is a run of bytes, and one character's UTF-8 bytes may be split across tokens (an emoji
    # is 4 bytes, often 2-3 tokens). The incremental decoder holds an incomplete sequence back until the
    # next token completes it, so the stream never shows half a character.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen)
    steps = model.generate_stream(idx, args.max_new_tokens, **sampling)
    if not stream:  # the text comes at the end: a bar on stderr meanwhile (none when it is not a terminal)
        steps = tqdm(steps, total=args.max_new_tokens, desc="sampling", unit="tok", leave=False, disable=None)
    for next_id in steps:
        pieces.append(utf8.decode(tokenizer.id_to_bytes(next_id.item())))
        if stream and pieces[-1]:
            print(pieces[-1], end="", flush=True)
    pieces.append(utf8.decode(b"", final=True))  # bytes still pending at the end become U+FFFD
    if stream:
        print(pieces[-1], end="", flush=True)
    return "".join(pieces)


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
    gen = torch.Generator(device=device).manual_seed(args.seed)  # same seed, same samples
    block_size = model.config.block_size

    if args.interactive:
        return interact(model, tokenizer, args, gen)
    idx = encode_prompt(tokenizer, args.prompt, block_size, device)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt, end="", flush=True)
        text = sample(model, tokenizer, idx, args, gen, stream=args.stream)
        print("" if args.stream else text)
    return 0


def interact(model: GPT, tokenizer: GPT2Tokenizer, args, gen) -> int:
    """A prompt loop: each line typed is continued; an empty line repeats the last prompt."""
    print("Type a prompt and press Enter (Ctrl-D or 'quit' to leave).", file=sys.stderr)
    last = "\n"
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() == "quit":
            return 0
        try:
            idx = encode_prompt(tokenizer, line or last, model.config.block_size, gen.device)
        except UserError as e:  # a bad prompt should not end the session
            print(f"error: {e}", file=sys.stderr)
            continue
        last = line or last
        print(last, end="", flush=True)
        sample(model, tokenizer, idx, args, gen, stream=True)
        print()


if __name__ == "__main__":
    raise SystemExit(main())
