"""Project 06's DPO: the loss against the paper's formulas worked out by hand (IPO on per-token averages),
sequence log-probs against a per-token loop, the LoRA adapters switched off to serve as the reference,
preference batches, a few DPO steps on a tiny model that learn the preferences, and the preference data
(local files, the Orca download through a fake `datasets`)."""

import copy
import json
import math

import pytest
import torch
from conftest import fake_datasets, load_project, logits_of, randomize_adapters_, tiny_gpt, write_json

PROJECT = "project06_dpo"
P = load_project(PROJECT)
IGNORE = P.data.IGNORE
TINY = P.model.GPTConfig(vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=32)
RECORDS = [
    {"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "I will not."},
    {"instruction": "Add 2 and 3.", "input": "", "chosen": "2 + 3 = 5.", "rejected": "Maybe 7?"},
    {
        "instruction": "Fix the grammar.",
        "input": "He go home.",
        "chosen": "He goes home.",
        "rejected": "He goes to the stupid home.",
    },
]


def log_sigmoid(x: float) -> float:
    return math.log(1 / (1 + math.exp(-x)))


# --- the loss -------------------------------------------------------------------------------------------

# Sequence log-probs of two pairs: the first has margin h = 0.5 - (-1.0) = 1.5, the second h = -1 - 1 = -2.
POLICY_CHOSEN, POLICY_REJECTED = [-5.0, -7.0], [-6.0, -4.0]
REF_CHOSEN, REF_REJECTED = [-5.5, -6.0], [-5.0, -5.0]


def hand_loss(loss_type: str, beta: float, eps: float) -> float:
    losses = []
    for pc, pr, rc, rr in zip(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED):
        h = (pc - rc) - (pr - rr)
        if loss_type == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))
    return sum(losses) / len(losses)


SETTINGS = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0)]  # (loss_type, beta, eps)


@pytest.mark.parametrize("loss_type,beta,eps", SETTINGS)
def test_dpo_loss_equals_the_formula_by_hand(loss_type, beta, eps):
    logps = [torch.tensor(v).double() for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]
    loss, metrics = P.dpo.dpo_loss(*logps, beta=beta, label_smoothing=eps, loss_type=loss_type)
    expected = hand_loss(loss_type, beta, eps)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-12)
    chosen = [beta * (pc - rc) for pc, rc in zip(POLICY_CHOSEN, REF_CHOSEN)]  # [0.5 beta, -beta]
    rejected = [beta * (pr - rr) for pr, rr in zip(POLICY_REJECTED, REF_REJECTED)]  # [-beta, beta]
    assert metrics["rewards/chosen"] == pytest.approx(sum(chosen) / 2, rel=1e-12)
    assert metrics["rewards/rejected"] == pytest.approx(sum(rejected) / 2, rel=1e-12)
    assert metrics["rewards/margin"] == pytest.approx((sum(chosen) - sum(rejected)) / 2, rel=1e-12)
    assert metrics["rewards/accuracy"] == 0.5  # the first pair is ranked right, the second wrong
    assert all(isinstance(v, float) for v in metrics.values())


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    logps = torch.tensor([-12.0, -3.5, -40.0])
    loss, metrics = P.dpo.dpo_loss(logps, logps - 2.0, logps.clone(), logps - 2.0, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)  # sigma(0) = 1/2: no preference yet
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margin"] == 0.0
    assert metrics["rewards/accuracy"] == 0.0


def test_dpo_loss_is_finite_for_huge_margins():
    """logsigmoid, not log(sigmoid): a margin of -2000 (beta h = -200) must give a loss of 200, not inf."""
    zero = torch.zeros(1)
    pc = torch.tensor([-2000.0], requires_grad=True)
    loss, _ = P.dpo.dpo_loss(pc, zero, zero, zero, beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(200.0, rel=1e-6)
    assert pc.grad.item() == pytest.approx(-0.1, rel=1e-6)  # d/dh -log sigma(beta h) -> -beta


def test_dpo_loss_rejects_unknown_settings():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        P.dpo.dpo_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        P.dpo.dpo_loss(x, x, x, x, label_smoothing=0.5)


# --- sequence log-probs ---------------------------------------------------------------------------------


def test_sequence_logprobs_equals_a_loop_over_response_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)  # (N, T, V)
    targets = torch.tensor(
        [
            [IGNORE, IGNORE, 3, 7, 1, IGNORE],  # prompt, 3 response targets, padding
            [IGNORE, 5, 5, 0, 10, 2],
        ]
    )
    naive = []
    for row in range(2):
        total = 0.0
        for t in range(6):
            if targets[row, t] != IGNORE:
                total += torch.log_softmax(logits[row, t].double(), dim=-1)[targets[row, t]].item()
        naive.append(total)
    got = P.dpo.sequence_logprobs(logits, targets)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(naive, dtype=torch.float32))

    def changed_at(row, t):
        moved = logits.clone()
        moved[row, t] += 5 * torch.randn(11, generator=gen)
        return P.dpo.sequence_logprobs(moved, targets)

    torch.testing.assert_close(changed_at(0, 1), got)  # a prompt position: not scored
    torch.testing.assert_close(changed_at(0, 5), got)  # padding: not scored
    assert changed_at(0, 3)[0] != got[0]  # a response position: scored
    assert changed_at(1, 0)[1] == got[1]  # row 1's first target is IGNORE too


def test_sequence_logprobs_is_float32_for_bf16_logits():
    logits = torch.randn(1, 4, 9).bfloat16()
    targets = torch.tensor([[IGNORE, 1, 2, 3]])
    got = P.dpo.sequence_logprobs(logits, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, P.dpo.sequence_logprobs(logits.float(), targets))


def test_average_logprobs_divide_by_the_scored_tokens():
    """IPO's per-token average: the sum over the scored targets, divided by how many there are (not by T)."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log().expand(2, 5, 4)  # log_softmax of these is log(probs) again
    targets = torch.tensor([[IGNORE, 0, 1, IGNORE, IGNORE], [IGNORE, 2, 0, 3, 3]])
    ln2 = math.log(2)
    total = [-1 * ln2 - 2 * ln2, -3 * ln2 - 1 * ln2 - 3 * ln2 - 3 * ln2]  # log 1/2 + log 1/4; ...
    torch.testing.assert_close(P.dpo.sequence_logprobs(logits, targets), torch.tensor(total))
    average = P.dpo.sequence_logprobs(logits, targets, average=True)
    torch.testing.assert_close(average, torch.tensor([total[0] / 2, total[1] / 4]))


def test_ipo_loss_on_average_logprobs_by_hand():
    """(h - 1/(2 beta))^2 with h the margin of per-token average log-probs: beta 0.25 makes the target 2."""
    policy_chosen, policy_rejected = torch.tensor([-0.5, -2.0]), torch.tensor([-1.5, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-1.0, -1.5]), torch.tensor([-1.0, -1.5])
    # h = (-0.5 + 1.0) - (-1.5 + 1.0) = 1.0 and (-2.0 + 1.5) - (-1.0 + 1.5) = -1.0
    loss, metrics = P.dpo.dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.25, loss_type="ipo"
    )
    expected = ((1.0 - 2.0) ** 2 + (-1.0 - 2.0) ** 2) / 2  # 5.0
    assert loss.item() == pytest.approx(expected, rel=1e-6) and metrics["loss"] == pytest.approx(expected)


# --- the reference as the policy with its adapters off ---------------------------------------------------


def test_adapters_disabled_gives_the_base_model():
    L = P.lora
    model = tiny_gpt(PROJECT)
    base_logits = logits_of(model)
    L.apply_lora(model, L.LoRAConfig(r=4))
    randomize_adapters_(model)
    lora_logits = logits_of(model)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)  # the adapters do change the output
    with L.adapters_disabled(model):
        assert torch.equal(logits_of(model), base_logits)
    assert torch.equal(logits_of(model), lora_logits)  # on again afterwards
    for layer in L.lora_layers(model):
        layer.merge()  # W holds B A now: switching the adapters off would no longer give the base
    with pytest.raises(RuntimeError, match="merged"), L.adapters_disabled(model):
        pass


# --- pairs and batches ----------------------------------------------------------------------------------


def test_pair_batch_puts_chosen_rows_first_and_masks_the_prompt():
    pairs = [P.preference.encode_pair(r) for r in RECORDS]
    batch = P.preference.pair_batch(pairs)
    x, y = batch["x"], batch["y"]
    B = len(pairs)
    assert x.shape == y.shape and x.shape[0] == 2 * B
    for i, p in enumerate(pairs):
        n = p.chosen.n_prompt
        assert p.rejected.n_prompt == n
        assert torch.equal(x[i, :n], x[B + i, :n])  # the same prompt tokens in both halves
        for row, side in ((i, p.chosen), (B + i, p.rejected)):
            length = len(side.ids) - 1
            assert x[row, :length].tolist() == side.ids[:-1].tolist()
            assert (y[row, : n - 1] == IGNORE).all()  # predicting prompt tokens: not scored
            assert y[row, n - 1] == side.ids[n]  # the first response token, from the last prompt position
            assert y[row, length - 1] == P.data.EOT  # the response ends with <|endoftext|>
            assert (y[row, length:] == IGNORE).all()  # padding
    enc = P.data.gpt2_encoding()
    assert enc.decode(pairs[0].chosen.ids[pairs[0].chosen.n_prompt : -1].tolist()) == "Blue."
    assert enc.decode(pairs[0].rejected.ids[pairs[0].rejected.n_prompt : -1].tolist()) == "I will not."


def test_encode_pairs_drops_pairs_longer_than_the_context(capsys):
    long = {**RECORDS[0], "rejected": "no " * 200}  # only one side is too long: the pair goes
    pairs = P.preference.encode_pairs([RECORDS[1], long], block_size=128, what="training")
    assert len(pairs) == 1 and "dropped 1 of 2 training pairs" in capsys.readouterr().out
    with pytest.raises(P.cli.UserError, match="longer than the model's context"):
        P.preference.encode_pairs([long], block_size=128, what="training")


def test_pair_loader_resumes_exactly_and_reshuffles_each_epoch():
    pairs = [P.preference.encode_pair(r) for r in RECORDS * 3]  # 9 pairs
    loader = P.preference.PairLoader(pairs, batch_size=2, seed=5)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch()["x"] for _ in range(6)]  # crosses into epoch 1 and 2
    resumed = P.preference.PairLoader(pairs, batch_size=2, seed=5)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch()["x"], want)
    assert loader._order_for(0) != loader._order_for(1)
    assert loader._order_for(0) == P.preference.PairLoader(pairs, 2, seed=5)._order_for(0)
    assert sorted(loader._order_for(1)) == list(range(9))
    fixed = P.preference.eval_pair_batches(pairs, batch_size=4)
    assert [b["x"].shape[0] for b in fixed] == [8, 8, 2]  # 2 rows per pair; the last batch has one pair


# --- DPO on a tiny model --------------------------------------------------------------------------------


def test_policy_logprobs_splits_chosen_and_rejected_rows():
    torch.manual_seed(0)
    model = P.model.GPT(TINY).eval()
    pairs = [P.preference.encode_pair(r) for r in RECORDS]
    chosen, rejected = P.dpo.policy_logprobs(model, P.preference.pair_batch(pairs))
    alone = P.data.pad_batch([p.chosen for p in pairs])  # chosen rows only, padded to their own length
    logits, _ = model(alone["x"])
    torch.testing.assert_close(chosen, P.dpo.sequence_logprobs(logits, alone["y"]), rtol=1e-5, atol=1e-4)
    ref_chosen, ref_rejected = P.dpo.reference_logprobs(model, P.preference.pair_batch(pairs))
    assert not ref_chosen.requires_grad and chosen.requires_grad
    torch.testing.assert_close(ref_rejected, rejected.detach())


def test_a_few_dpo_steps_learn_the_preferences():
    torch.manual_seed(0)
    policy = P.model.GPT(TINY)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    batch = P.preference.pair_batch([P.preference.encode_pair(r) for r in RECORDS])
    ref_chosen, ref_rejected = P.dpo.reference_logprobs(reference, batch)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    history = []
    for _ in range(4):
        chosen, rejected = P.dpo.policy_logprobs(policy, batch)
        loss, metrics = P.dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics)
    assert history[0]["rewards/margin"] == 0.0 and history[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    _, final = P.dpo.dpo_loss(*P.dpo.reference_logprobs(policy, batch), ref_chosen, ref_rejected, beta=0.1)
    assert final["rewards/margin"] > 0.3
    assert final["rewards/accuracy"] == 1.0
    assert final["loss"] < math.log(2) - 0.2


# --- preference records ---------------------------------------------------------------------------------


def test_missing_rejected_names_the_record_and_the_field(tmp_path):
    records = [RECORDS[0], {"instruction": "Say hi.", "chosen": "Hi!"}]
    with pytest.raises(P.cli.UserError, match=r"record 1 has no 'rejected' field"):
        P.preference.load_preference_records(write_json(tmp_path / "prefs.json", records))


def test_identical_chosen_and_rejected_pairs_are_dropped(tmp_path, capsys):
    """Such a pair teaches nothing (its margin is always 0): dropped with a warning; none left is an error."""
    same = {"instruction": "Say hi.", "chosen": "Hi!", "rejected": "Hi!"}
    records, _ = P.preference.load_preference_records(write_json(tmp_path / "a.json", [RECORDS[0], same]))
    assert records == [RECORDS[0]]
    assert "dropped 1 records" in capsys.readouterr().out
    with pytest.raises(P.cli.UserError, match="every record has the same 'chosen' and 'rejected'"):
        P.preference.load_preference_records(write_json(tmp_path / "b.json", [same]))


def test_jsonl_records_load_with_input_filled_in(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps({k: v for k, v in r.items() if v}) for r in RECORDS) + "\n")
    records, name = P.preference.load_preference_records(path)
    assert name == "prefs.jsonl" and records == RECORDS  # the missing "input" of records 0 and 1 becomes ""


ORCA_ROWS = [
    {"system": "You are a helpful assistant.", "question": "What is 2+2?", "chosen": "4.", "rejected": "5."},
    {"system": "", "question": "Name a planet.", "chosen": "Mars.", "rejected": "The Moon."},
    {"system": "", "question": "Say yes.", "chosen": "Yes.", "rejected": "Yes."},  # unusable: dropped
]


def test_orca_download_maps_system_and_question(tmp_path, monkeypatch, capsys):
    calls = fake_datasets(monkeypatch, lambda *args, **kwargs: ORCA_ROWS)
    monkeypatch.setattr(P.preference, "ORCA_FILE", tmp_path / "orca_dpo_pairs" / "orca_dpo_pairs.json")
    records, name = P.preference.load_preference_records(None)
    assert [(args, kwargs["split"]) for args, kwargs in calls] == [(("Intel/orca_dpo_pairs",), "train")]
    assert name == "orca_dpo_pairs.json"
    assert records == [
        {
            "instruction": "You are a helpful assistant.\n\nWhat is 2+2?",
            "input": "",
            "chosen": "4.",
            "rejected": "5.",
        },
        {"instruction": "Name a planet.", "input": "", "chosen": "Mars.", "rejected": "The Moon."},
    ]
    assert "dropped 1 of 3" in capsys.readouterr().out
    assert P.preference.load_preference_records(None)[0] == records and len(calls) == 1  # saved once


def test_failed_orca_download_says_use_data(tmp_path, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network")

    fake_datasets(monkeypatch, load_dataset)
    monkeypatch.setattr(P.preference, "ORCA_FILE", tmp_path / "orca_dpo_pairs" / "orca_dpo_pairs.json")
    with pytest.raises(P.cli.UserError, match="Intel/orca_dpo_pairs") as err:
        P.preference.load_preference_records(None)
    assert "--data" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "orca_dpo_pairs").exists()  # nothing half-written
