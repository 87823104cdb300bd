"""Project 18's knowledge distillation: the soft loss against torch.nn.functional.kl_div and Hinton's T^2
rule, GKD's JSD(beta) at its ends (TRL's convention: beta 0 is forward KL, beta 1 reverse KL), the top-k
tail's stated bound, DistilBERT's layer initialisation, a frozen teacher, accumulation-split invariance, and
train.py and benchmark.py end to end (vocabulary mismatch, exact resume of an on-policy run, the report)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_one_line_error,
    digest,
    load_project,
    read_report,
    run_main,
    tiny_gpt,
    tiny_trainer,
)

PROJECT = "project18_distillation"
P = load_project(PROJECT)
D = P.distill
train_tiny = tiny_trainer(PROJECT)
CPU = torch.device("cpu")


def logits(*shape, seed=0, scale=3.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def cfg(**kw):
    return D.DistillConfig(**kw)


# --- the losses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_soft_loss_is_kl_div_at_temperature_t_times_t_squared(T):
    """Hugging Face's distiller: KLDivLoss(batchmean)(log_softmax(s / T), softmax(t / T)) * T^2, over the
    positions of the batch."""
    s, t = logits(2, 5, 40, seed=1), logits(2, 5, 40, seed=2)
    ref = F.kl_div(
        F.log_softmax(s / T, -1).view(-1, 40), F.softmax(t / T, -1).view(-1, 40), reduction="batchmean"
    )
    torch.testing.assert_close(D.soft_loss(s, t, cfg(temperature=T)), ref * T**2)


def test_gradients_follow_hintons_t_squared_rule():
    """d/dz_s of T^2 KL(p_T || q_T) is T (q_T - p_T) per position; at high T, with zero-mean logits, it tends
    to (z_s - z_t) / V (Hinton et al., eq. 3-4): the same size at every T, which the T^2 factor is for.
    Without it the gradient would shrink as 1 / T^2."""
    s, t = logits(4, 30, seed=3), logits(4, 30, seed=4)
    s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    grads = {}
    for T in (2.0, 100.0, 10000.0):
        z = s.clone().requires_grad_()
        (g,) = torch.autograd.grad(D.soft_loss(z.unsqueeze(0), t.unsqueeze(0), cfg(temperature=T)), z)
        exact = T * (F.softmax(s / T, -1) - F.softmax(t / T, -1)) / 4  # mean over 4 positions
        torch.testing.assert_close(g, exact)
        grads[T] = g
    limit = (s - t) / (30 * 4)
    torch.testing.assert_close(grads[10000.0], limit, rtol=5e-3, atol=0)  # first order in z / T
    assert not torch.allclose(grads[2.0], limit, rtol=0.05)  # far from the limit at T = 2


def test_reverse_kl_swaps_the_arguments():
    s, t = logits(3, 20, seed=5), logits(3, 20, seed=6)
    reverse = D.soft_loss(s, t, cfg(divergence="reverse-kl", temperature=1.0))
    ref = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(reverse, ref)


def test_generalized_jsd_ends_limits_and_zero():
    """TRL's GKDTrainer convention, mixture m = beta p + (1 - beta) q: beta = 0 is forward KL(p || q),
    beta = 1 reverse KL(q || p), and the interior formula tends to those ends once divided by beta and
    1 - beta; equal distributions give 0 at every beta; swapping p, q and beta, 1 - beta changes nothing."""
    log_p, log_q = (F.log_softmax(logits(3, 50, seed=seed, scale=1.0), -1) for seed in (7, 8))
    jsd = D.generalized_jsd  # (the limits hold once beta << q / p everywhere: milder logits, a small beta)
    torch.testing.assert_close(jsd(log_p, log_q, 0.0), D.kl(log_p, log_q))
    torch.testing.assert_close(jsd(log_p, log_q, 1.0), D.kl(log_q, log_p))
    torch.testing.assert_close(jsd(log_p, log_q, 1e-6) / 1e-6, D.kl(log_p, log_q), rtol=1e-3, atol=0)
    torch.testing.assert_close(jsd(log_p, log_q, 1 - 1e-6) / 1e-6, D.kl(log_q, log_p), rtol=1e-3, atol=0)
    torch.testing.assert_close(jsd(log_p, log_q, 0.3), jsd(log_q, log_p, 0.7))
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert jsd(log_p, log_p, beta).abs().max() < 1e-12
        if 0 < beta < 1:  # a JSD is bounded by the entropy of the mixing weights
            bound = -(beta * torch.log(torch.tensor(beta)) + (1 - beta) * torch.log(torch.tensor(1 - beta)))
            assert (jsd(log_p, log_q, beta) <= bound).all() and (jsd(log_p, log_q, beta) > 0).all()


# --- the teacher's top k ------------------------------------------------------------------------------------


def top(t: torch.Tensor, k: int, T: float):
    values, ids = F.log_softmax(t / T, -1).topk(k, dim=-1)
    return values, ids


@pytest.mark.parametrize("divergence", ["forward-kl", "reverse-kl", "jsd"])
def test_top_k_loss_is_within_its_stated_bound(divergence):
    """The README's bound: with the tail as one bucket the loss never exceeds the full one (data processing),
    equals it when k = V, and its gradient on the student's logits differs from the full loss's only over the
    tail, by at most 2m in L1 per position (forward KL), m = the teacher's tail mass at temperature T."""
    T, V, c = 2.0, 200, cfg(divergence=divergence)
    s, t = logits(2, 6, V, seed=9), logits(2, 6, V, seed=10)
    z = s.clone().requires_grad_()
    full = D.soft_loss(z, t, c)
    (g_full,) = torch.autograd.grad(full, z)
    torch.testing.assert_close(D.soft_loss(s, top(t, V, T), c), full.detach(), rtol=1e-5, atol=1e-6)
    for k in (1, 5, 20, 100):
        values, ids = top(t, k, T)
        loss = D.soft_loss(z, (values, ids), c)
        assert loss <= full + 1e-6
        if divergence == "forward-kl":
            (g_k,) = torch.autograd.grad(loss, z)
            mass = 1 - values.exp().sum(-1)  # (2, 6)
            err = (g_full - g_k).abs().sum(-1) * 12 / T  # back from T^2 * mean over 12 positions to q - p
            assert (err <= 2 * mass + 1e-6).all()
            kept = torch.zeros_like(g_full, dtype=torch.bool).scatter(-1, ids, True)
            torch.testing.assert_close(g_k[kept], g_full[kept])  # exact on the kept tokens


def test_stored_top_k_lines_up_with_the_batches(tiny_runs, tmp_path):
    """precompute + TopKLoader give every batch the teacher's top k of exactly its rows, for either rank of a
    two-process run (rank 1 reads the rows after rank 0's)."""
    teacher, _ = P.checkpoint.load_checkpoint(tiny_runs.checkpoint(PROJECT))
    tokens = P.data.encode_text_file(tiny_runs.data(PROJECT))[:2000]  # 62 rows of 32 tokens
    loaders = [P.shards.TokenLoader(tokens, 3, 32, rank, 2) for rank in (0, 1)]
    P.teacher_logits.precompute(teacher, loaders[0].shards, tmp_path, k=5, temperature=2.0)
    for loader in loaders:
        stream = P.teacher_logits.TopKLoader(loader, tmp_path)
        for _ in range(3):
            x, y, (values, ids) = stream.next_batch()
            with torch.no_grad():
                ref_values, ref_ids = top(teacher(x)[0], 5, 2.0)
            torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)
            assert torch.equal(ids, ref_ids)


# --- student and teacher ----------------------------------------------------------------------------------


def test_layer_map_matches_distilgpt2s_extraction():
    assert D.layer_map(12, 6) == [0, 2, 4, 7, 9, 11]  # Hugging Face's scripts/extract.py for DistilGPT2
    assert D.layer_map(4, 2) == [0, 3] and D.layer_map(2, 1) == [0] and D.layer_map(3, 3) == [0, 1, 2]


def test_student_copies_the_teachers_embeddings_and_every_other_block():
    teacher = tiny_gpt(PROJECT, n_layer=4)
    student = P.model.GPT(D.student_config(teacher.config, cfg(), teacher.config.vocab_size, 0.0))
    D.init_from_teacher(student, teacher)
    assert student.config.n_layer == 2
    for name in ("wte.weight", "wpe.weight", "ln_f.weight"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])
    for i, t in enumerate([0, 3]):
        for name, value in student.blocks[i].state_dict().items():
            assert torch.equal(value, teacher.blocks[t].state_dict()[name]), (i, name)
    whole = P.model.GPT(D.student_config(teacher.config, cfg(student_layers=4), 100, 0.0))
    D.init_from_teacher(whole, teacher)  # all four layers: the teacher itself
    ids = torch.randint(100, (2, 16))
    torch.testing.assert_close(whole.eval()(ids)[0], teacher(ids)[0], rtol=0, atol=0)


def test_frozen_teacher_draws_no_random_numbers_and_keeps_its_weights():
    """Eval mode (dropout off), no gradients: the teacher's forward leaves the RNG where it was (the
    student's dropout stream is the one a run without a teacher draws), and training never changes it."""
    teacher = tiny_gpt(PROJECT, dropout=0.5).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = D.Distiller(teacher, cfg())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randint(100, (2, 16))
    rng = torch.get_rng_state()
    distiller.teacher_logits(x)
    assert torch.equal(torch.get_rng_state(), rng)
    student = tiny_gpt(PROJECT, seed=1, n_layer=1, dropout=0.1).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(3):
        distiller.loss(student, x, torch.roll(x, -1, 1)).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


class Batches:
    """Fixed batches of 8 sequences, served whole or as micro-batches of `b` rows, in order."""

    def __init__(self, b: int, n: int = 2):
        data = torch.randint(100, (n, 8, 17), generator=torch.Generator().manual_seed(0))
        self.rows = [seq for batch in data for seq in batch]
        self.b, self.i = b, 0

    def next_batch(self):
        rows = torch.stack(self.rows[self.i : self.i + self.b])
        self.i += self.b
        return rows[:, :-1], rows[:, 1:]


def sgd_steps(b: int, distiller, steps: int = 2):
    """train_step with plain SGD and no clipping, so the weights are the gradients' exact record."""
    student = tiny_gpt(PROJECT, seed=1, n_layer=1).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    tc = P.train.TrainConfig(grad_clip=1e9)
    loader, fp32 = Batches(b, steps), P.precision.PRECISIONS["fp32"]
    scaler, dist = P.precision.NoScaler(), P.distributed.Dist()
    out = [
        P.train.train_step(student, opt, scaler, loader, 8 // b, 0.5, tc, CPU, fp32, dist, distiller)[:2]
        for _ in range(steps)
    ]
    return out, student.state_dict()


def test_loss_is_invariant_to_the_accumulation_split():
    """8 sequences a step as 1 x 8, 2 x 4 or 4 x 2 micro-batches: the same loss, gradient norm and weights,
    because both the cross-entropy and the soft loss are means over tokens."""
    distiller = D.Distiller(tiny_gpt(PROJECT), cfg())
    ref_out, ref_weights = sgd_steps(8, distiller)
    for b in (4, 2):
        out, weights = sgd_steps(b, distiller)
        for (loss, norm), (ref_loss, ref_norm) in zip(out, ref_out):
            assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-4)
        for name, w in weights.items():
            torch.testing.assert_close(w, ref_weights[name], rtol=1e-4, atol=1e-6, msg=name)


def test_soft_weight_zero_is_plain_training():
    """alpha = 0: the labels' cross-entropy alone, exactly what train.py runs without a teacher, and the
    teacher is never run."""
    distiller = D.Distiller(tiny_gpt(PROJECT), cfg(alpha=0.0))
    distiller.teacher_logits = lambda x: pytest.fail("the teacher ran at alpha 0")
    with_teacher, plain = sgd_steps(4, distiller), sgd_steps(4, None)
    assert with_teacher[0] == plain[0]
    assert all(torch.equal(w, plain[1][name]) for name, w in with_teacher[1].items())
    assert sgd_steps(4, D.Distiller(tiny_gpt(PROJECT), cfg()))[0] != plain[0]  # alpha 0.5 is not


def test_on_policy_batch_keeps_the_prompt_and_lets_the_student_write_the_rest():
    student = tiny_gpt(PROJECT, seed=1, n_layer=1).train()
    x, distiller = torch.randint(100, (2, 16)), D.Distiller(tiny_gpt(PROJECT), cfg())
    torch.manual_seed(3)
    batch, mask = distiller.on_policy_batch(student, x)
    torch.manual_seed(3)
    with torch.no_grad():
        written = torch.cat(list(student.eval().generate_stream(x[:, :8], 8)), dim=1)
    assert torch.equal(batch[:, :8], x[:, :8]) and torch.equal(batch[:, 8:], written)
    assert mask.tolist() == [False] * 7 + [True] * 9  # from the prompt's last token on


# --- train.py and benchmark.py ----------------------------------------------------------------------------


def test_distillation_run_writes_a_half_depth_student_and_leaves_the_teacher_alone(tiny_runs, tmp_path):
    teacher = tiny_runs.checkpoint(PROJECT)
    before = digest(teacher)
    flags = ["--data", tiny_runs.data(PROJECT), "--max-iters", 3, "--eval-interval", 3, "--eval-iters", 1]
    assert train_tiny(*flags, "--teacher", teacher, "--out", tmp_path / "s") == 0
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["model"]["n_layer"] == 1 and config["training"]["distill"]["temperature"] == 2.0
    assert config["training"]["distill"]["teacher"] == str(teacher.resolve())
    assert digest(teacher) == before
    assert run_main(P.generate, "--checkpoint", tmp_path / "s", "--max-new-tokens", 3, "--device", "cpu") == 0


def test_on_policy_top_k_run_resumes_exactly(tiny_runs, tmp_path, monkeypatch):
    """GKD's loss with on-policy batches (random numbers: the coin and the student's samples) from the stored
    top k: a run split at step 3 repeats the straight one."""
    monkeypatch.setattr(P.teacher_logits, "CACHE_DIR", tmp_path / "cache")
    flags = ["--data", tiny_runs.data(PROJECT), "--teacher", tiny_runs.checkpoint(PROJECT), "--eval-interval",
             3, "--eval-iters", 1, "--divergence", "jsd", "--on-policy", 0.5, "--top-k", 8]  # fmt: skip
    assert train_tiny(*flags, "--max-iters", "6", "--out", tmp_path / "straight") == 0
    assert train_tiny(*flags, "--max-iters", "3", "--out", tmp_path / "split") == 0
    assert train_tiny(*flags, "--max-iters", "6", "--out", tmp_path / "split", "--resume") == 0
    straight, split = ((tmp_path / d / "metrics.jsonl").read_text() for d in ("straight", "split"))
    assert straight == split
    assert len(list((tmp_path / "cache").iterdir())) == 1  # computed once, reused by the other runs


def test_vocabulary_mismatch_exits_2_with_one_line(tiny_runs, tmp_path, capsys):
    """A teacher whose vocabulary was padded (50,304 rows, as nanoGPT's) is refused before any work."""
    teacher = tiny_gpt(PROJECT, vocab_size=50304)
    meta = {"tokenizer": {"type": "tiktoken", "name": "gpt2"}, "training": {}}
    P.checkpoint.save_checkpoint(tmp_path / "teacher", teacher, meta)
    data = tiny_runs.data(PROJECT)
    rc = train_tiny("--data", data, "--teacher", tmp_path / "teacher", "--out", tmp_path / "s")
    line = assert_one_line_error(capsys, rc)
    assert "50304" in line and "50257" in line and "vocabulary" in line
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="50304"):
        D.soft_loss(torch.zeros(1, 2, 50257), torch.zeros(1, 2, 50304), cfg())


@pytest.mark.parametrize(
    "flags, wanted",
    [
        (["--temperature", "2"], "--teacher"),
        (["--teacher", "T", "--alpha", "1.5"], "--alpha"),
        (["--teacher", "T", "--divergence", "tvd"], "--divergence"),
        (["--teacher", "T", "--student-width", "48"], "--student-init scratch"),
        (["--teacher", "T", "--top-k", "50257"], "--top-k"),  # before a cache file of that size is made
    ],
)
def test_bad_distillation_flags(tiny_runs, tmp_path, capsys, flags, wanted):
    flags = [str(tiny_runs.checkpoint(PROJECT)) if f == "T" else f for f in flags]
    rc = train_tiny("--data", tiny_runs.data(PROJECT), *flags, "--out", tmp_path / "s")
    assert wanted in assert_one_line_error(capsys, rc)


def test_a_teacher_whose_model_config_is_another_projects_is_one_line(tiny_runs, tmp_path, capsys):
    """Project 19's checkpoints record fields (share, embd_dim, repeat) this GPT does not have."""
    teacher = shutil.copytree(tiny_runs.checkpoint(PROJECT), tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config["model"] |= {"share": "none", "embd_dim": 0, "repeat": 1}
    (teacher / "config.json").write_text(json.dumps(config))
    rc = train_tiny("--data", tiny_runs.data(PROJECT), "--teacher", teacher, "--out", tmp_path / "s")
    assert "model config" in assert_one_line_error(capsys, rc)


def test_resume_cannot_change_the_teacher_or_the_loss(tiny_runs, tmp_path, capsys):
    teacher = tiny_runs.checkpoint(PROJECT)
    flags = ["--data", tiny_runs.data(PROJECT), "--max-iters", 1, "--eval-interval", 1, "--eval-iters", 1]
    assert train_tiny(*flags, "--teacher", teacher, "--out", tmp_path / "s") == 0
    run = shutil.copytree(tmp_path / "s", tmp_path / "copy")
    rc = train_tiny(*flags, "--max-iters", "2", "--temperature", "4", "--out", run, "--resume")
    assert "--temperature" in assert_one_line_error(capsys, rc)


def test_benchmark_reports_student_alone_distilled_and_teacher(tiny_runs, tmp_path):
    teacher = tiny_runs.checkpoint(PROJECT)
    flags = ["--preset", "tiny", "--data", tiny_runs.data(PROJECT), "--checkpoint", teacher, "--steps", 2,
             "--gen-tokens", 4, "--repeats", 1, "--top-k", "1,8"]  # fmt: skip
    assert run_main(P.benchmark, *flags, "--device", "cpu", "--out", tmp_path) == 0
    rows = read_report(tmp_path, PROJECT)
    for variant in ("student alone", "student distilled", "teacher"):
        assert rows[("val_loss", variant)]["value"] > 0 and rows[("train_tok_per_s", variant)]["value"] > 0
    assert rows[("non_embedding_params", "student")]["ratio"] == pytest.approx(0.5, rel=0.01)
    assert rows[("soft_kl", "top-8")]["value"] <= rows[("soft_kl", "full vocabulary")]["value"]
    assert ("gap_closed_percent", "student distilled") in rows
    assert next(tmp_path.glob("loss_curves-*-tiny.png")).read_bytes()[:4] == b"\x89PNG"
