"""Knowledge distillation: a small student learns from a frozen teacher's next-token distributions as well
as from the data's labels (Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, 2015).

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * D(teacher_T, student_T)

p_T = softmax(teacher_logits / T) and q_T = softmax(student_logits / T), per position. A temperature T > 1
lifts the small probabilities the teacher gives to the tokens that did not come next ("dark knowledge");
their gradient shrinks as 1/T^2, which the T^2 factor undoes, so alpha keeps its meaning at any T. D is
forward KL(p || q) (Hinton; DistilBERT, DistilGPT2), reverse KL(q || p) (MiniLLM, Gu et al. 2024), or GKD's
generalized Jensen-Shannon divergence (Agarwal et al. 2024). Every loss is a mean over positions, so it does
not depend on how a batch is split into micro-batches.

Shapes: B = batch, T = positions, V = vocabulary, k = kept teacher logits.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import UserError
from model import GPT, GPTConfig

DIVERGENCES = ("forward-kl", "reverse-kl", "jsd")


@dataclass
class DistillConfig:
    temperature: float = 2.0  # Hugging Face's distillation script: T = 2, alpha_ce = alpha_clm = 0.5
    alpha: float = 0.5  # weight of the teacher's soft targets; 1 - alpha goes to the labels' cross-entropy
    divergence: str = "forward-kl"
    beta: float = 0.5  # jsd only: 0 is forward KL, 1 reverse KL (TRL's GKDTrainer convention)
    on_policy: float = 0.0  # GKD's lambda: the share of micro-batches the student writes itself
    top_k: int = 0  # 0: the teacher runs on the fly; k: its k largest log-probs, precomputed on disk
    student_layers: int = 0  # 0: half the teacher's
    student_width: int = 0  # 0: the teacher's (n_embd)
    student_init: str = "teacher"  # "teacher": copy every other teacher layer (DistilBERT); "scratch"


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q), per position: (..., V) log-probs -> (...)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """D(teacher p, student q) per position. Forward KL covers every token the teacher finds likely;
    reverse KL lets a small student pick the teacher's main modes instead (MiniLLM's argument)."""
    if cfg.divergence == "forward-kl":
        return kl(log_p, log_q)
    if cfg.divergence == "reverse-kl":
        return kl(log_q, log_p)
    return generalized_jsd(log_p, log_q, cfg.beta)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's JSD(beta) with mixture m = beta p + (1 - beta) q: beta KL(p || m) + (1 - beta) KL(q || m).
    It vanishes at both ends (m becomes p or q), but JSD / beta -> KL(p || q) as beta -> 0 and
    JSD / (1 - beta) -> KL(q || p) as beta -> 1: TRL returns those limits at the ends, and so do we."""
    if beta == 0:
        return kl(log_p, log_q)
    if beta == 1:
        return kl(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))  # log of the mixture
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - e^a) for a <= 0, accurate near 0 (a tail of mass 1e-9 is not rounded to zero mass)."""
    return torch.log(-torch.expm1(a.clamp(max=-1e-12)))


def coarsen(topk: tuple[torch.Tensor, torch.Tensor], log_q: torch.Tensor):
    """Teacher and student as distributions over k + 1 outcomes: the teacher's k likeliest tokens, and one
    bucket for the rest of the vocabulary. The teacher's kept log-probs are exact (normalised over the whole
    vocabulary when they were stored), so the tail's mass m = 1 - sum of them is known without its logits."""
    log_p_k, idx = topk  # (B, T, k) teacher log-probs at temperature T, (B, T, k) their token ids
    log_q_k = log_q.gather(-1, idx)  # (B, T, k) the student's log-probs of the same tokens
    tail = lambda lp: log1mexp(torch.logsumexp(lp, -1, keepdim=True))  # noqa: E731  (B, T, 1)
    return torch.cat([log_p_k, tail(log_p_k)], -1), torch.cat([log_q_k, tail(log_q_k)], -1)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """16-bit logits (autocast, a bf16 teacher) are widened: a softmax over 50,257 tokens needs fp32."""
    return x.float() if x.element_size() < 4 else x


def soft_loss(student_logits, teacher, cfg: DistillConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over positions of D(p_T, q_T). teacher: logits (B, T, V), or the stored top-k
    (log-probs, ids). With the top k, D is taken over the k + 1 coarse outcomes: never more than the full D
    (data processing), and the gradient on the student's logits is exact on the k kept tokens and off by at
    most 2m in L1 over the tail (m = the teacher's tail mass; see the README). mask: (T,) positions."""
    T = cfg.temperature
    if isinstance(teacher, torch.Tensor) and teacher.size(-1) != student_logits.size(-1):
        raise ValueError(f"teacher: {teacher.size(-1)} logits a position, student: {student_logits.size(-1)}")
    log_q = F.log_softmax(at_least_fp32(student_logits) / T, dim=-1)  # (B, T, V)
    if isinstance(teacher, torch.Tensor):
        log_p = F.log_softmax(at_least_fp32(teacher) / T, dim=-1)  # (B, T, V)
    else:
        log_p, log_q = coarsen(teacher, log_q)  # (B, T, k + 1) each
    d = divergence(log_p, log_q, cfg)  # (B, T)
    return T**2 * (d.mean() if mask is None else d[:, mask].mean())


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Which teacher layer each student layer copies: one in two, spread evenly from the first to the last
    (12 -> 6 gives 0, 2, 4, 7, 9, 11, as Hugging Face's extraction script for DistilGPT2)."""
    if student_layers == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def student_config(tc: GPTConfig, cfg: DistillConfig, vocab_size: int, dropout: float) -> GPTConfig:
    """The student's shape: the teacher's (tc), with fewer layers or a narrower width. The vocabularies must
    agree token for token: the loss compares the two distributions position by position."""
    if tc.vocab_size != vocab_size:
        raise UserError(
            f"the teacher's vocabulary has {tc.vocab_size} tokens and the student's {vocab_size} (GPT-2's "
            "tokenizer); distillation compares their distributions token by token, so they must be equal"
        )
    layers, width = cfg.student_layers or max(1, tc.n_layer // 2), cfg.student_width or tc.n_embd
    if cfg.student_init == "teacher" and (width != tc.n_embd or layers > tc.n_layer):
        raise UserError(
            f"a student {width} wide with {layers} layers cannot copy the teacher's ({tc.n_embd} wide, "
            f"{tc.n_layer} layers); add --student-init scratch"
        )
    if width % tc.n_head:
        raise UserError(f"--student-width {width} is not a multiple of the teacher's {tc.n_head} heads")
    return replace(tc, n_layer=layers, n_embd=width, dropout=dropout)


def init_from_teacher(student: GPT, teacher: GPT) -> None:
    """DistilBERT's initialisation: the teacher's embeddings, final norm and every other block."""
    keep = layer_map(teacher.config.n_layer, student.config.n_layer)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.")}
    for i, t in enumerate(keep):
        block = teacher.blocks[t].state_dict()
        state.update({f"blocks.{i}.{name}": value for name, value in block.items()})
    student.load_state_dict(state)


class Distiller:
    """The training loss with a frozen teacher: eval mode (no dropout, so no random numbers drawn), no
    gradients, bf16 weights where the GPU has them."""

    def __init__(self, teacher: GPT, cfg: DistillConfig, dtype: torch.dtype = torch.float32):
        self.teacher = teacher.to(dtype).eval().requires_grad_(False)
        self.cfg = cfg

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)[0]  # (B, T, V)

    def loss(self, student, x: torch.Tensor, y: torch.Tensor, topk=None) -> torch.Tensor:
        """One micro-batch's loss; topk: the teacher's stored (log-probs, ids) for it, if precomputed."""
        cfg = self.cfg
        if cfg.on_policy and torch.rand(()) < cfg.on_policy:  # GKD: the student's own text, teacher-graded
            x, mask = self.on_policy_batch(student, x)
            logits, _ = student(x)
            return soft_loss(logits, self.teacher_logits(x), cfg, mask)
        logits, ce = student(x, y)
        if cfg.alpha == 0:
            return ce  # plain training: the teacher is not even asked
        teacher = self.teacher_logits(x) if topk is None else tuple(t.to(x.device) for t in topk)
        return (1 - cfg.alpha) * ce + cfg.alpha * soft_loss(logits, teacher, cfg)

    @torch.no_grad()
    def on_policy_batch(self, student, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep each row's first half; the student samples the second (temperature 1). The loss then covers
        the positions from the last prompt token on: the states the student's own text led to. No KV cache
        on this line: each new token reruns the window (project 08 adds the cache)."""
        model = student.module if isinstance(student, DDP) else student
        keep = x.size(1) // 2
        model.eval()  # no dropout while writing
        new = torch.cat(list(model.generate_stream(x[:, :keep], x.size(1) - keep)), dim=1)  # (B, T - keep)
        model.train()
        mask = torch.arange(x.size(1), device=x.device) >= keep - 1  # (T,)
        return torch.cat([x[:, :keep], new], dim=1), mask
