"""Ask a fine-tuned model to follow an instruction; it answers until it emits <|endoftext|>.

python generate.py --instruction "Name three primary colors."
python generate.py --instruction "Translate to French." --input "Good morning"
python generate.py --interactive                      # a chat: earlier turns stay in the context
python generate.py --prompt "Once upon a time"        # plain continuation, no template
python generate.py --init-from gpt2 --instruction ... # the base model, for comparison
"""

import codecs
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import DEFAULT_DIR, load_base, load_checkpoint
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
from data import format_prompt
from model import GPT
from tokenizer import EOT, GPT2Tokenizer

DEFAULT_INSTRUCTION = "Give three tips for staying healthy."


def parse_args(argv):
    p = ArgumentParser(description="Answer instructions with a fine-tuned checkpoint of this project.")
    source = p.add_mutually_exclusive_group()  # a checkpoint of this GPT, or GPT-2's weights
    source.add_argument(
        "--checkpoint", type=Path, default=DEFAULT_DIR, help="a checkpoint written by train.py"
    )
    source.add_argument(
        "--init-from",
        default=None,
        help="instead of a checkpoint: gpt2, gpt2-medium, ... (Hugging Face Hub) or a local Hugging Face "
        "GPT-2 folder, to compare with the model before fine-tuning",
    )
    p.add_argument(
        "--instruction", default=None, help=f"what to do, in the template (default: {DEFAULT_INSTRUCTION!r})"
    )
    p.add_argument("--input", default="", help="optional context for the instruction")
    p.add_argument("--prompt", default=None, help="continue this text as is, without the template")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="at most this many tokens")
    p.add_argument("--temperature", type=temperature, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample only from the k likeliest tokens")
    p.add_argument("--top-p", type=probability, default=None, help="sample from the smallest set with mass p")
    p.add_argument("--num-samples", type=positive_int, default=1, help="answers to the instruction")
    p.add_argument("--seed", type=non_negative_int, default=1337, help="same seed, same samples")
    p.add_argument("--stream", action="store_true", help="print text as it is sampled, whole characters only")
    p.add_argument("--interactive", action="store_true", help="chat on stdin until EOF or 'quit'")
    add_device_args(p)
    args = p.parse_args(argv)
    if args.prompt is not None and (args.instruction is not None or args.input):
        p.error("--prompt is plain text without the template; use it or --instruction/--input, not both")
    if args.interactive and (args.prompt is not None or args.instruction is not None or args.input):
        p.error(
            "--interactive reads instructions from stdin; --prompt, --instruction and --input do not apply"
        )
    if args.instruction is not None and not args.instruction.strip():
        p.error("--instruction is empty; give the task to do")
    return args


def encode(tokenizer: GPT2Tokenizer, text: str) -> list[int]:
    try:
        return tokenizer.encode(text)  # byte-level: any valid text encodes
    except UnicodeEncodeError as e:  # lone surrogates: what Python makes of undecodable bytes in argv
        raise UserError(f"the prompt is not valid Unicode text ({e.reason} at position {e.start})") from e


def to_tensor(ids: list[int], block_size: int, device) -> torch.Tensor:
    if not ids:
        raise UserError("the prompt is empty; give at least one character")
    if len(ids) > block_size:  # rejected, not cut: a cut prompt would lose the instruction or the template
        raise UserError(f"the prompt is {len(ids)} tokens; this model's context is {block_size}")
    return torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)


def respond(model: GPT, tokenizer: GPT2Tokenizer, idx: torch.Tensor, args, gen, amp, stream: bool) -> str:
    """Sample until <|endoftext|> (NEW: the fine-tuned model learned to emit it after each response) or
    --max-new-tokens. With stream=True text is printed as soon as it forms whole characters."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen)
    with amp:
        steps = model.generate_stream(idx, args.max_new_tokens, **sampling)
    if not stream:  # the text comes at the end: a bar on stderr meanwhile (none when it is not a terminal)
        steps = tqdm(steps, total=args.max_new_tokens, desc="sampling", unit="tok", leave=False, disable=None)
    for next_id in steps:
        if next_id.item() == EOT:
            break
        pieces.append(utf8.decode(tokenizer.id_to_bytes(next_id.item())))
        if stream and pieces[-1]:
            print(pieces[-1], end="", flush=True)
    pieces.append(utf8.decode(b"", final=True))  # bytes still pending at the end become U+FFFD
    if stream:
        print(pieces[-1], end="", flush=True)
    return "".join(pieces)


def load_model(args, device) -> GPT:
    if args.init_from:  # GPT-2's own weights or another base, to see what fine-tuning changed
        return load_base(args.init_from, device, DEFAULT_DIR)[0].eval()
    return load_checkpoint(args.checkpoint, device, tokenizer="tiktoken")[0]


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    model = load_model(args, device)
    tokenizer = GPT2Tokenizer()
    amp = autocast(device, pick_dtype(args.dtype, device))
    gen = torch.Generator(device=device).manual_seed(args.seed)  # same seed, same samples
    if args.interactive:
        return chat(model, tokenizer, args, gen, amp)
    if args.prompt is not None:  # plain continuation: print the prompt, then what follows
        text, shown = args.prompt, args.prompt
    else:  # NEW: the instruction goes into the template the model was fine-tuned on
        text, shown = (
            format_prompt(
                args.instruction if args.instruction is not None else DEFAULT_INSTRUCTION, args.input
            ),
            "",
        )
    idx = to_tensor(encode(tokenizer, text), model.config.block_size, device)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(shown, end="", flush=True)
        response = respond(model, tokenizer, idx, args, gen, amp, stream=args.stream)
        print("" if args.stream else response)
    return 0


def fit_history(tokenizer, turns: list[tuple[str, str]], instruction: str, budget: int) -> list[int]:
    """NEW: the conversation as consecutive template blocks (earlier instructions with their answers, then
    the new instruction), dropping the oldest turns until it leaves `budget` tokens free in the context."""
    while True:
        text = "".join(format_prompt(q) + a + "\n\n" for q, a in turns) + format_prompt(instruction)
        ids = encode(tokenizer, text)
        if len(ids) <= budget or not turns:
            return ids
        turns.pop(0)


def chat(model: GPT, tokenizer: GPT2Tokenizer, args, gen, amp) -> int:
    """Each line typed is an instruction; the answers so far stay in the prompt while they fit."""
    print("Type an instruction and press Enter (Ctrl-D or 'quit' to leave).", file=sys.stderr)
    block_size = model.config.block_size
    turns: list[tuple[str, str]] = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line == "quit":
            return 0
        if not line:
            continue
        # Room for the answer: up to --max-new-tokens, but never more than half the context.
        budget = block_size - min(args.max_new_tokens, block_size // 2)
        try:
            ids = fit_history(tokenizer, turns, line, budget)
            idx = to_tensor(ids, block_size, gen.device)
        except UserError as e:  # a bad instruction should not end the session
            print(f"error: {e}", file=sys.stderr)
            continue
        answer = respond(model, tokenizer, idx, args, gen, amp, stream=True)
        print()
        turns.append((line, answer))


if __name__ == "__main__":
    raise SystemExit(main())
