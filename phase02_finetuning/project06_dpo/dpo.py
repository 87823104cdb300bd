"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model
is Secretly a Reward Model"). RLHF fits a reward model to preference pairs, then runs RL (PPO) to maximise
that reward while a KL penalty keeps the policy near a reference model. That objective's optimum is known in
closed form, pi*(y|x) ~ pi_ref(y|x) exp(r(x, y) / beta), so read backwards every policy defines an implicit
reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) (plus a term of x alone, which cancels between two answers
to one prompt). Put that reward into the Bradley-Terry model of preferences and RLHF becomes a logistic
loss on fixed (prompt, chosen, rejected) triples: no reward model, no sampling from the policy, just the
log-probabilities of both answers under the policy (trained) and the reference (frozen SFT model).

Shapes in comments: B = pairs in a batch, N = rows (2B: chosen then rejected), T = sequence, V = vocab.
"""

import contextlib

import torch
import torch.nn.functional as F

from data import IGNORE

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NEW: log p(response | prompt) per row: the sum of log p(target) over the positions whose target is
    not IGNORE (the response and its <|endoftext|>). logits (N, T, V), targets (N, T) -> (N,)."""
    scored = targets != IGNORE  # (N, T): prompt and padding positions are False
    # float32: a bf16 log-prob keeps ~3 significant digits; summed over hundreds of tokens and then
    # subtracted (policy - reference, chosen - rejected), the rounding would swamp the small differences DPO
    # learns from.
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    safe_targets = targets.masked_fill(~scored, 0)  # gather needs a real index; these positions are zeroed
    token_logp = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return (token_logp * scored).sum(dim=-1)  # (N,)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of a batch from four (B,) tensors of sequence log-probs. Returns (mean loss, metrics).

    beta: how far the policy may move from the reference (the KL penalty's weight in RLHF); small beta lets
    it move further. label_smoothing eps: the assumed chance that a pair's label is flipped ("conservative
    DPO", cDPO): the loss then also pulls a little towards the opposite preference and stops pushing once
    the margin is large. loss_type "ipo" (Azar et al. 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences") regresses the margin onto 1 / (2 beta) instead of pushing it to
    infinity, which DPO does on pairs preferred the same way every time, whatever beta says; label_smoothing
    applies to "sigmoid" only.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    # NEW: the implicit reward of an answer is beta * log(pi / pi_ref) of it: how much more likely the policy
    # made it than the reference did.
    chosen_logratio = policy_chosen - ref_chosen  # (B,)
    rejected_logratio = policy_rejected - ref_rejected  # (B,)
    h = chosen_logratio - rejected_logratio  # (B,): log-odds, before beta, that chosen beats rejected
    if loss_type == "sigmoid":
        # NEW: -log sigma(beta h), the Bradley-Terry likelihood of the label. F.logsigmoid never forms
        # sigma(x) itself, which rounds to 0 for x below about -88 in float32 (log 0 = -inf, a nan gradient).
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2  # NEW (IPO): a target margin, not an unbounded one
    chosen_rewards = beta * chosen_logratio.detach()  # (B,)
    rejected_rewards = beta * rejected_logratio.detach()  # (B,)
    metrics = {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean().item(),
    }
    return losses.mean(), metrics


def policy_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    autocast_ctx: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of a preference.pair_batch batch: ((B,) chosen, (B,) rejected). One forward pass
    over all 2B rows; autocast_ctx (e.g. cli.autocast(...)) wraps the model only: log-probs are float32."""
    with autocast_ctx if autocast_ctx is not None else contextlib.nullcontext():
        logits, _ = model(batch["x"])  # (2B, T, V)
    logps = sequence_logprobs(logits, batch["y"])  # (2B,)
    n_pairs = logps.size(0) // 2
    return logps[:n_pairs], logps[n_pairs:]  # NEW: chosen rows come first in the batch


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    autocast_ctx: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """policy_logprobs for the frozen reference: no graph is kept, since it is never trained. (It should be
    in eval mode, so dropout does not make its log-probs noisy.)"""
    return policy_logprobs(model, batch, autocast_ctx)
