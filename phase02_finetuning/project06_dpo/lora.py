"""LoRA: fine-tune a frozen GPT by learning a low-rank update for some of its Linear layers
(Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021).

A pretrained weight W (out, in) stays frozen. Next to it we train two small matrices, A (r, in) and
B (out, r) with r << in, and the layer computes W x + (alpha / r) * B A x. B starts at zero, so training
starts from exactly the pretrained model. The paper's observation is that the change fine-tuning needs has
a low "intrinsic rank": r = 8 on GPT-2 small's 4 x 12 layers is 1.2M trainable numbers instead of 124M,
so the optimizer state shrinks ~100x and an adapter file is a few MB. After training, B A can be added
into W ("merged"): the model is then an ordinary GPT again, with no extra cost at inference.
"""

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cli import UserError

ADAPTER_FORMAT = 1


@dataclass
class LoRAConfig:
    r: int = 8  # rank of the update B A
    alpha: float = 16.0  # the update is scaled by alpha / r, so changing r does not change the step size
    dropout: float = 0.05  # on the adapter's input only; the frozen path sees x unchanged
    targets: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # name suffixes

    def __post_init__(self):
        self.targets = tuple(self.targets)  # JSON gives a list
        if self.r < 1 or not 0.0 <= self.dropout < 1.0 or not self.targets:
            raise UserError(
                f"bad LoRA settings: r={self.r} (>= 1), dropout={self.dropout} (in [0, 1)), "
                f"targets={list(self.targets)} (at least one)"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        return cls(**d)


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update. Subclassing nn.Linear keeps the base's
    state-dict keys (`weight`, `bias`), so a base checkpoint still loads; the adapter adds lora_A, lora_B."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear's __init__: it would allocate a weight only to discard it
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: no copy, and the base model sees every merge
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = self.weight
        # the adapter. A as the reference implementation (loralib) initialises it, the same
        # kaiming-uniform as nn.Linear's default; B = 0 makes the update B A exactly zero at the start.
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.merged = False  # True while W holds W + scaling * B A
        self.adapters_enabled = True  # False: behave as the base layer (see adapters_disabled)
        self.train(base.training)  # a model already in eval() must not get adapter dropout back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # (..., out): x W^T + b, the frozen base (already holding B A when merged)
        if self.merged or not self.adapters_enabled:
            return y
        # down to r dimensions through A, back up through B. Two thin matmuls instead of forming
        # B A (out, in): r (in + out) multiply-adds per token rather than in * out.
        h = self.lora_dropout(x) @ self.lora_A.T  # (..., r)
        return y + (h @ self.lora_B.T) * self.scaling  # (..., out)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, (out, in), in float32: in bf16 (8 bits of mantissa) the r-term sums in B @ A and the
        addition to W would each round; in float32 W + delta is rounded once, to the nearest bf16."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_(self.weight.float() + self.delta_weight())  # W <- W + scaling B A
            self.merged = True

    def extra_repr(self) -> str:
        r = self.lora_A.shape[0]
        return f"{super().extra_repr()}, r={r}, scaling={self.scaling}, merged={self.merged}"


def _matches(name: str, pattern: str) -> bool:
    """Whole dotted components: "attn.proj" matches blocks.0.attn.proj, never blocks.0.mlp.proj."""
    return name == pattern or name.endswith("." + pattern)


def _find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The names of the Linear layers that targets name, each once, in model order. A pattern that matches
    nothing is refused: a typo would otherwise train an adapter on fewer layers than intended, silently."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen = {}
    for pattern in config.targets:
        hits = [(n, m) for n, m in model.named_modules() if _matches(n, pattern)]
        if not hits:
            raise UserError(f"LoRA target {pattern!r} matches no layer (try 'attn.qkv', 'mlp.fc', ...)")
        for name, module in hits:
            if type(module) is not nn.Linear:
                raise UserError(f"LoRA target {pattern!r} matches {name}, a {type(module).__name__}")
            if id(module.weight) in tied:  # lm_head: its weight is wte's, an update would change both
                raise UserError(f"LoRA target {pattern!r} matches {name}, whose weight is an embedding's")
            if config.r > min(module.in_features, module.out_features):  # B A would be full rank, and larger
                raise UserError(
                    f"LoRA rank {config.r} is above {name}'s smaller side "
                    f"({min(module.in_features, module.out_features)}): no longer low-rank"
                )
            chosen[name] = None
    return list(chosen)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter, then wrap each Linear that config.targets names in a LoRALinear, in place.
    Returns the wrapped layers' names."""
    if lora_layers(model):
        raise UserError("the model already has LoRA adapters")
    names = _find_targets(model, config)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), config.r, config.alpha, config.dropout))
    return names


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """NEW: inside, the model is its frozen base: DPO's reference model without a second copy of weights."""
    layers = lora_layers(model)
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters are merged into the weights; disable them before merging")
    try:
        for layer in layers:
            layer.adapters_enabled = False
        yield
    finally:
        for layer in layers:
            layer.adapters_enabled = True


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put plain nn.Linear layers back, in place: the result is an
    ordinary model that saves as an ordinary checkpoint. Its parameters stay frozen (requires_grad False)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            bias = module.bias is not None
            plain = nn.Linear(module.in_features, module.out_features, bias=bias, device="meta")  # no alloc
            plain.weight, plain.bias = module.weight, module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, plain)
    return model


def _is_lora(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if _is_lora(n)}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the base weights' names, shapes and float32 values, in name order (the tied wte/lm_head
    counted once). It reads every weight once: about 0.3 s for GPT-2 small's 500 MB on one CPU core, plus
    the copy from the GPU. Merged weights are not the base, so a merged model is refused (and a
    merge/unmerge round trip can change last bits, hence the fingerprint: fingerprint before merging)."""
    if any(layer.merged for layer in lora_layers(model)):
        raise RuntimeError("adapters are merged into the weights; fingerprint the unmerged model")
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if not _is_lora(name):
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(p.float().cpu().contiguous().numpy())
    return h.hexdigest()


def save_adapter(out_dir: Path, model: nn.Module, config: LoRAConfig, base: dict) -> None:
    """Write adapter.safetensors (the LoRA tensors only) and adapter_config.json. base describes the model
    the adapter belongs to ({"init_from": ...}, as train.py records it); its fingerprint is added if missing.
    Both files are written under temporary names and renamed last: a crash never leaves a half-written
    file, and only one between the two renames could pair new tensors with the old config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {**base, "fingerprint": base.get("fingerprint") or base_fingerprint(model)}
    meta = {"format": ADAPTER_FORMAT, "lora": config.to_dict(), "base": base}
    tensors = {n: t.contiguous().cpu() for n, t in lora_state_dict(model).items()}
    tmp_tensors, tmp_config = out_dir / ".adapter.safetensors.tmp", out_dir / ".adapter_config.json.tmp"
    save_file(tensors, str(tmp_tensors))
    tmp_config.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_tensors, out_dir / "adapter.safetensors")
    os.replace(tmp_config, out_dir / "adapter_config.json")


def load_adapter(adapter_dir: Path, model: nn.Module) -> tuple[LoRAConfig, dict]:
    """Put a saved adapter on a plain base model. Refuses an adapter trained on other base weights: its
    B A was learned as a correction to those weights and means nothing on top of different ones."""
    adapter_dir = Path(adapter_dir)
    try:
        meta = json.loads((adapter_dir / "adapter_config.json").read_text())
        config = LoRAConfig.from_dict(meta["lora"])
        recorded = meta["base"]["fingerprint"]
    except FileNotFoundError as e:
        raise UserError(f"no adapter at {adapter_dir} (adapter_config.json is missing)") from e
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"adapter {adapter_dir} is corrupt: its adapter_config.json is unreadable") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise UserError(f"adapter {adapter_dir} has format {meta.get('format')}; this project reads format 1")
    if base_fingerprint(model) != recorded:
        recorded_base = meta["base"].get("init_from", "not recorded")  # what train.py records
        raise UserError(f"adapter {adapter_dir} was trained on a different base model ({recorded_base})")
    apply_lora(model, config)
    load_lora_tensors(model, adapter_dir / "adapter.safetensors")
    return config, meta


def load_lora_tensors(model: nn.Module, path: Path) -> None:
    """Copy an adapter file's tensors into a model that already has its LoRA layers (onto the base weight's
    device and dtype); the file must hold exactly the model's LoRA tensors, in their shapes."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"adapter file {path} is corrupt ({reason})") from e
    params = lora_state_dict(model)
    wrong = sorted(params.keys() ^ tensors.keys())  # missing or unexpected
    wrong += [n for n in tensors if n in params and tensors[n].shape != params[n].shape]
    if wrong:
        raise UserError(
            f"adapter file {path} is corrupt: it does not match its config "
            f"({len(wrong)} tensors: {wrong[0]}, ...)"
        )
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
