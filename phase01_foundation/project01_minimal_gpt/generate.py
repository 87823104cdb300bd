"""Sample text from a trained checkpoint.

python generate.py --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --top-k 50
python generate.py --stream          # print characters as they are sampled
python generate.py --interactive     # type prompts, get continuations
"""

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import DEFAULT_DIR, load_checkpoint
from cli import (
    ArgumentParser,
    UserError,
    add_device_args,
    autocast,
    exits_cleanly,
    non_negative_int,
    pick_device,
    pick_dtype,
    positive_int,
    probability,
    temperature,
)
from data import CharTokenizer
from model import GPT


def parse_args(argv):
    p = ArgumentParser(description="Generate text with a checkpoint of this project's character-level GPT.")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR, help="a checkpoint written by train.py")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=positive_int, default=500, help="characters to sample per sample")
    p.add_argument("--temperature", type=temperature, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample only from the k likeliest tokens")
    p.add_argument("--top-p", type=probability, default=None, help="sample from the smallest set with mass p")
    p.add_argument("--num-samples", type=positive_int, default=1, help="continuations of the prompt")
    p.add_argument("--seed", type=non_negative_int, default=1337, help="same seed, same samples")
    p.add_argument("--stream", action="store_true", help="print each character as soon as it is sampled")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin until EOF or 'quit'")
    add_device_args(p)
    return p.parse_args(argv)


def encode_prompt(tokenizer: CharTokenizer, prompt: str, block_size: int, device) -> torch.Tensor:
    ids = tokenizer.encode(prompt)  # raises UserError for characters the model never saw
    if not ids:
        raise UserError("the prompt is empty; give at least one character")
    if len(ids) > block_size:
        raise UserError(f"the prompt is {len(ids)} characters; this model's context is {block_size}")
    return torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)


def sample(model: GPT, tokenizer: CharTokenizer, idx: torch.Tensor, args, gen, amp, stream) -> str:
    """One continuation of idx. With stream=True each character is printed as soon as it is sampled."""
    pieces = []
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen)
    with amp:
        steps = model.generate_stream(idx, args.max_new_tokens, **sampling)
    if not stream:  # the text comes at the end: a bar on stderr meanwhile (none when it is not a terminal)
        steps = tqdm(steps, total=args.max_new_tokens, desc="sampling", unit="tok", leave=False, disable=None)
    for next_id in steps:
        piece = tokenizer.decode(next_id[0].tolist())
        pieces.append(piece)
        if stream:
            print(piece, end="", flush=True)
    return "".join(pieces)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    model, config = load_checkpoint(args.checkpoint, device, tokenizer="char")
    tokenizer = CharTokenizer(config["tokenizer"].get("chars", ""))
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"checkpoint {args.checkpoint} is corrupt: its vocabulary does not match its weights")
    amp = autocast(device, pick_dtype(args.dtype, device))
    gen = torch.Generator(device=device).manual_seed(args.seed)  # same seed, same samples
    block_size = model.config.block_size

    if args.interactive:
        return interact(model, tokenizer, args, gen, amp)
    idx = encode_prompt(tokenizer, args.prompt, block_size, device)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt, end="", flush=True)
        text = sample(model, tokenizer, idx, args, gen, amp, stream=args.stream)
        print("" if args.stream else text)
    return 0


def interact(model: GPT, tokenizer: CharTokenizer, args, gen, amp) -> int:
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
        sample(model, tokenizer, idx, args, gen, amp, stream=True)
        print()


if __name__ == "__main__":
    raise SystemExit(main())
