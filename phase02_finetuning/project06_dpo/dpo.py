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
import copy

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import IGNORE
from lora import adapters_disabled
from preference import eval_pair_batches

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log p(response | prompt) per row: the sum of log p(target) over the positions whose target is not
    IGNORE (the response and its <|endoftext|>), or with average=True its mean per token (what IPO uses).
    logits (N, T, V), targets (N, T) -> (N,)."""
    scored = targets != IGNORE  # (N, T): prompt and padding positions are False
    # float32: a bf16 log-prob keeps ~3 significant digits; summed over hundreds of tokens and then
    # subtracted (policy - reference, chosen - rejected), the rounding would swamp the small differences DPO
    # learns from.
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    safe_targets = targets.masked_fill(~scored, 0)  # gather needs a real index; these positions are zeroed
    token_logp = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
    total = (token_logp * scored).sum(dim=-1)  # (N,)
    return total / scored.sum(dim=-1) if average else total


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
    applies to "sigmoid" only. IPO's log-probs are per-token averages (policy_logprobs(average=True)), as
    TRL computes them and the IPO authors confirmed: with sums, the 1 / (2 beta) target margin would mean
    something different for a 10-token answer than for a 500-token one.
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
    average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of a preference.pair_batch batch: ((B,) chosen, (B,) rejected), summed over the
    response or (average=True) averaged. One forward pass over all 2B rows; autocast_ctx (e.g.
    cli.autocast(...)) wraps the model only: log-probs are float32."""
    with autocast_ctx if autocast_ctx is not None else contextlib.nullcontext():
        logits, _ = model(batch["x"])  # (2B, T, V)
    logps = sequence_logprobs(logits, batch["y"], average)  # (2B,)
    n_pairs = logps.size(0) // 2
    return logps[:n_pairs], logps[n_pairs:]  # NEW: chosen rows come first in the batch


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    autocast_ctx: contextlib.AbstractContextManager | None = None,
    average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """policy_logprobs for the frozen reference: no graph is kept, since it is never trained. (It should be
    in eval mode, so dropout does not make its log-probs noisy.)"""
    return policy_logprobs(model, batch, autocast_ctx, average)


class Reference:
    """Where the reference log-probs come from. Three ways, the same numbers:
    "model"        a frozen copy of the starting policy: a second model in memory, a second forward pass;
    "precomputed"  the starting policy's log-probs for every training pair, computed once before training;
    "lora"         the policy itself with its adapters switched off: the base it started from, no copy.
    average=True gives per-token averages (IPO), as policy_logprobs does."""

    def __init__(
        self, mode: str, policy, train_pairs: list, batch_size: int, device, amp, average: bool = False
    ):
        self.mode, self.device, self.amp, self.average = mode, device, amp, average
        self.model, self.table = None, None
        if mode == "model":
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        elif mode == "precomputed":  # the policy is still the reference now: score with it, keep no copy
            policy.eval()
            batches = tqdm(
                eval_pair_batches(train_pairs, batch_size), desc="reference log-probs", unit="batch"
            )
            self.table = torch.cat([torch.stack(self.compute(policy, b), dim=1) for b in batches])  # (N, 2)
            policy.train()

    def compute(self, policy, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the reference on a batch: (chosen (B,), rejected (B,)) log-probs."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.mode == "lora":
            with adapters_disabled(policy):
                return reference_logprobs(policy, batch, self.amp, self.average)
        return reference_logprobs(self.model or policy, batch, self.amp, self.average)

    def logprobs(self, policy, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference log-probs of a training batch: looked up, or computed."""
        if self.table is not None:
            rows = self.table[batch["index"].to(self.table.device)]  # (B, 2)
            return rows[:, 0], rows[:, 1]
        return self.compute(policy, batch)
