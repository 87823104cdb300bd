"""GPT-2 in Hugging Face's format, both ways: load OpenAI's released weights (124M to 1.5B) into our GPT, and
save our GPT so that transformers.GPT2LMHeadModel.from_pretrained() reads it.

    python hf.py --out gpt2-ours     # then transformers.GPT2LMHeadModel.from_pretrained("gpt2-ours")

Two differences between the formats, besides the module names (h.0.attn.c_attn <-> blocks.0.attn.qkv):

- Conv1D. OpenAI's GPT-2 code (TensorFlow) multiplied x @ W with W stored (in, out), and Hugging Face kept
  that layout in a `Conv1D` module for c_attn, c_proj and c_fc. nn.Linear computes x @ W.T with W stored
  (out, in), so those four weights are transposed on the way in and back on the way out. Everything else
  (embeddings, LayerNorms, biases) has the same layout in both.
- Vocabulary padding. Our wte / lm_head have padded_vocab_size rows (50257 -> 50304) and HF's have
  vocab_size. Loading appends zero rows; forward() slices the logits back to vocab_size, so a padded row is
  never predicted and its value does not matter. Saving drops them again.

Shapes in comments: C = n_embd, V = vocab_size, Vp = padded_vocab_size.
"""

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cli import PROJECT, REPO_ROOT, ArgumentParser, UserError, exits_cleanly, unwritable
from model import GPT, GPTConfig

GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M, 1558M
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # the two names HF uses for our F.gelu(approximate="tanh")
# HF name -> ours, inside a block. Block i is h.i there and blocks.i here.
RENAMES = {
    ".attn.c_attn.": ".attn.qkv.",
    ".attn.c_proj.": ".attn.proj.",
    ".mlp.c_fc.": ".mlp.fc.",
    ".mlp.c_proj.": ".mlp.proj.",
}
CONV1D_WEIGHTS = (".attn.qkv.weight", ".attn.proj.weight", ".mlp.fc.weight", ".mlp.proj.weight")  # our names


class HFFormatError(UserError):
    """A checkpoint or config that our GPT cannot represent (a ValueError, like every UserError)."""


def config_from_hf(hf_config: dict) -> GPTConfig:
    """GPT2Config's dict (config.json) -> GPTConfig. Options that would change the computation are refused
    rather than ignored: the model would load and then quietly compute something else."""
    get = hf_config.get  # a missing key means GPT2Config's default
    n_embd = get("n_embd", 768)
    supported = {
        "model_type": get("model_type", "gpt2") == "gpt2",
        "activation_function": get("activation_function", "gelu_new") in TANH_GELUS,
        "layer_norm_epsilon": get("layer_norm_epsilon", 1e-5) == 1e-5,  # nn.LayerNorm's default eps
        "n_inner": get("n_inner") in (None, 4 * n_embd),  # our MLP is always 4x wide
        "scale_attn_weights": get("scale_attn_weights", True),  # we always divide by sqrt(hs)
        "scale_attn_by_inverse_layer_idx": not get("scale_attn_by_inverse_layer_idx", False),
        "reorder_and_upcast_attn": not get("reorder_and_upcast_attn", False),
        "add_cross_attention": not get("add_cross_attention", False),
        "tie_word_embeddings": get("tie_word_embeddings", True),  # our lm_head is wte
    }
    bad = [f"{field}={get(field)!r}" for field, ok in supported.items() if not ok]
    if bad:
        raise HFFormatError(f"GPT-2 config not supported by this model: {', '.join(bad)}")
    return GPTConfig(
        vocab_size=get("vocab_size", 50257),
        block_size=get("n_positions", 1024),
        n_layer=get("n_layer", 12),
        n_head=get("n_head", 12),
        n_embd=n_embd,
        dropout=0.0,  # loaded for inference or fine-tuning; set config.dropout yourself to train with it
    )


def config_to_hf(config: GPTConfig) -> dict:
    """GPTConfig -> a dict that GPT2Config(**d) and config.json accept."""
    if config.arch != "gpt":  # NEW: GPT-2's format holds attention blocks only
        raise HFFormatError("GPT-2's format has no Mamba blocks (arch='mamba'); only arch='gpt' exports")
    eos = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>; unknown for other vocabs
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,  # unpadded: the padding is ours, HF's embedding has V rows
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # older name for the same thing, still read by some tools
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_inner": None,  # = 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
    }


def _name_from_hf(key: str) -> str:
    key = key.removeprefix("transformer.")  # GPT2LMHeadModel has it, GPT2Model and OpenAI's files do not
    if key.startswith("h."):
        key = "blocks." + key.removeprefix("h.")
    for hf, ours in RENAMES.items():
        key = key.replace(hf, ours)
    return key


def _name_to_hf(key: str) -> str:
    if key.startswith("blocks."):
        key = "h." + key.removeprefix("blocks.")
    for hf, ours in RENAMES.items():
        key = key.replace(ours, hf)
    return "transformer." + key


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 weights -> a state dict for GPT(config).load_state_dict(strict=True)."""
    sd, lm_head = {}, None
    for key, w in hf_sd.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal mask and its fill value, stored as buffers by older checkpoints
        if key == "lm_head.weight":
            lm_head = w
            continue
        name = _name_from_hf(key)
        sd[name] = w.t() if name.endswith(CONV1D_WEIGHTS) else w  # Conv1D (in, out) -> Linear (out, in)
    wte = sd.get("wte.weight")  # (V, C)
    if wte is None or wte.shape != (config.vocab_size, config.n_embd):
        shape = None if wte is None else tuple(wte.shape)
        raise HFFormatError(f"wte.weight: expected ({config.vocab_size}, {config.n_embd}), found {shape}")
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise HFFormatError("lm_head.weight: differs from wte.weight, but this model ties the two")
    padding = wte.new_zeros(config.padded_vocab_size - config.vocab_size, config.n_embd)
    sd["wte.weight"] = sd["lm_head.weight"] = torch.cat([wte, padding])  # (Vp, C), tied
    return sd


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights -> GPT2LMHeadModel's state dict: transformer.* keys plus lm_head.weight (same tensor)."""
    hf_sd = {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # the same tensor as wte, added below
        if name == "wte.weight":
            w = w[: model.config.vocab_size]  # (V, C): padding rows dropped
        elif name.endswith(CONV1D_WEIGHTS):
            w = w.t()  # Linear (out, in) -> Conv1D (in, out)
        hf_sd[_name_to_hf(name)] = w.detach().contiguous()
    hf_sd["lm_head.weight"] = hf_sd["transformer.wte.weight"]
    return hf_sd


def load_hf_dir(path: str | Path) -> GPT:
    """A local HF GPT-2 folder: config.json plus model.safetensors or (older) pytorch_model.bin."""
    path = Path(path)
    st_file, bin_file = path / "model.safetensors", path / "pytorch_model.bin"
    if not (path / "config.json").is_file() or not (st_file.is_file() or bin_file.is_file()):
        raise HFFormatError(f"{path}: expected config.json and model.safetensors (or pytorch_model.bin)")
    try:
        raw_config = json.loads((path / "config.json").read_text())
        if "model_type" not in raw_config:  # e.g. one of this project's own checkpoints
            raise HFFormatError(
                f"{path} is not a Hugging Face GPT-2 folder (its config.json has no model_type); "
                "for this project's checkpoints use --checkpoint"
            )
        config = config_from_hf(raw_config)
        if st_file.is_file():
            hf_sd = load_file(st_file)
        else:  # weights_only: a .bin is a pickle, and a full unpickle could run any code
            hf_sd = torch.load(bin_file, map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, SafetensorError, pickle.UnpicklingError) as e:
        raise HFFormatError(f"{path}: cannot read the checkpoint ({e})") from e
    model = GPT(config)
    try:
        model.load_state_dict(state_dict_from_hf(hf_sd, config))
    except RuntimeError as e:  # missing, unexpected or misshapen weights
        raise HFFormatError(f"{path}: weights do not match its config.json ({e})") from e
    return model


def save_hf_dir(model: GPT, path: str | Path) -> None:
    """Write config.json and model.safetensors, readable by GPT2LMHeadModel.from_pretrained(path)."""
    hf_config = config_to_hf(model.config)  # NEW: first: a model the format cannot hold writes nothing
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory; lm_head.weight is wte's, and HF re-ties it on load.
    hf_sd = {k: v.cpu() for k, v in state_dict_to_hf(model).items() if k != "lm_head.weight"}
    hf_sd["transformer.wte.weight"] = hf_sd["transformer.wte.weight"].clone()  # own the V rows, not Vp
    save_file(hf_sd, path / "model.safetensors", metadata={"format": "pt"})  # "pt": what HF expects
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def load_gpt2(name_or_path: str, cache_dir: str | Path | None = None) -> GPT:
    """A local HF GPT-2 folder, or one of GPT2_MODELS, downloaded once from the Hugging Face Hub."""
    if Path(name_or_path).is_dir():
        return load_hf_dir(name_or_path)
    if name_or_path not in GPT2_MODELS:
        raise UserError(f"{name_or_path!r} is neither a local folder nor one of {', '.join(GPT2_MODELS)}")
    from huggingface_hub import snapshot_download  # imported here: only this path needs the Hub

    repo_id = f"openai-community/{name_or_path}"  # where the bare names "gpt2", ... now redirect to
    try:
        folder = snapshot_download(
            repo_id=repo_id, allow_patterns=["config.json", "model.safetensors"], cache_dir=cache_dir
        )
    except Exception as e:  # offline, proxy, disk full: each library raises its own type
        raise UserError(
            f"could not download {repo_id} from the Hugging Face Hub ({type(e).__name__}: {e}); "
            "pass a local folder with config.json and model.safetensors instead"
        ) from e
    return load_hf_dir(folder)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    from checkpoint import load_checkpoint  # here, not at the top: checkpoint.py imports this module later on

    p = ArgumentParser(description="Export a checkpoint of this project to Hugging Face's GPT-2 format.")
    p.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "data" / "models" / PROJECT,
                   help="a checkpoint written by train.py")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="folder for config.json and model.safetensors")
    args = p.parse_args(argv)
    if unwritable(args.out) or args.out.exists() and any(args.out.iterdir()):
        raise UserError(f"--out {args.out}: {unwritable(args.out) or 'not empty'}; choose a new folder")
    model, _ = load_checkpoint(args.checkpoint, tokenizer="tiktoken")
    save_hf_dir(model, args.out)
    print(f"wrote {args.out}: transformers.GPT2LMHeadModel.from_pretrained({str(args.out)!r}) loads it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
