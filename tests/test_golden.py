"""Golden outputs: each project's GPT, built with a fixed seed and a fixed tiny config, gives pinned greedy
tokens and pinned logits. Several projects carry a byte-identical model.py (01 = 02, 03 = 06, 04 = 05), and
each copy is checked on its own, so a copy that changes behaviour (a fix made in one of them, an edit that
was meant to change nothing) fails here. Also: generation, which runs lm_head on the last position only,
picks the tokens that the full forward pass ranks first."""

from dataclasses import dataclass

import pytest
import torch
from conftest import PROJECTS, greedy_ids, tiny_gpt

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4]  # 24 tokens
NEW_TOKENS = 16  # 24 + 16 > block_size 32: the last steps slide the window


@dataclass
class Golden:
    vocab_size: int
    tokens: list[int]  # greedy continuation of PROMPT
    logits: dict[tuple[int, int], float]  # (position, token) -> model(PROMPT) logit


# Computed once from the code as it was when this file was written (CPU, float32). Projects 01-02's were
# pinned again when they moved from GPT-2's tanh GELU to the exact one (2026-12-07): the tokens stayed, the
# logits moved by up to 3e-4.
# Projects 03-06: GPT-2's layout, with the vocabulary padded to a multiple of 64 (300 -> 320).
PADDED_GPT2 = Golden(
    vocab_size=300,
    tokens=[170, 170, 52, 228, 228, 228, 228, 228, 228, 228, 228, 228, 228, 228, 228, 228],
    logits={(0, 0): 0.24323, (5, 17): 1.310683, (11, 42): -0.525878, (17, 3): 0.527415, (23, 64): -0.214742},
)
GOLDEN = {
    "project01_minimal_gpt": Golden(  # a character vocabulary
        vocab_size=65,
        tokens=[25, 39, 39, 39, 39, 39, 39, 39, 39, 39, 39, 39, 46, 46, 46, 46],
        logits={
            (0, 0): -0.100941,
            (5, 17): 0.24483,
            (11, 42): -0.285985,
            (17, 3): 0.477658,
            (23, 64): 0.574541,
        },
    ),
    "project02_tokenizer": Golden(  # project 01's model on a byte-level BPE vocabulary (256 bytes and more)
        vocab_size=300,
        tokens=[10] * NEW_TOKENS,
        logits={
            (0, 0): 1.229088,
            (5, 17): 0.20754,
            (11, 42): 0.631813,
            (17, 3): 0.884852,
            (23, 64): -0.617323,
        },
    ),
    "project03_pretrain": PADDED_GPT2,
    "project04_sft": PADDED_GPT2,
    "project05_lora": PADDED_GPT2,
    "project06_dpo": PADDED_GPT2,
    "project07_mixed_precision": PADDED_GPT2,
    "project08_kv_cache": PADDED_GPT2,  # the same model; generate_stream now runs through the KV cache
    "project09_flash_attention": PADDED_GPT2,
    "project10_prompt_caching": PADDED_GPT2,
    "project11_speculative_decoding": PADDED_GPT2,
    "project12_dynamic_batching": PADDED_GPT2,  # the engine is new; generate_stream is project 09's
    "project13_paged_attention": PADDED_GPT2,  # the paged pool is the engine's; generate_stream is unchanged
    "project14_ptq": PADDED_GPT2,  # project 09's model; quantization only swaps the blocks' Linear layers
    "project15_kv_quantization": PADDED_GPT2,  # project 14's model; the plain KVCache stays the default
    "project16_qat": PADDED_GPT2,  # project 14's model; QAT changes only the Linears in training
    "project17_pruning": PADDED_GPT2,  # project 14's model; pruning zeroes weights, the forward is unchanged
    "project18_distillation": PADDED_GPT2,  # project 07's model; distillation changes only the loss
    "project19_weight_sharing": PADDED_GPT2,  # project 07's model; sharing is off by default
    "project20_sparse_attention": PADDED_GPT2,  # project 09's model; the sparse pattern is off by default
    "project21_moe": PADDED_GPT2,  # project 07's model; experts are off by default (n_expert=0: a dense MLP)
    "project22_memory_efficient": PADDED_GPT2,  # project 07's model; checkpointing changes no output
    "project22b_mamba": PADDED_GPT2,  # project 07's model; Mamba is arch="mamba", not the default
    "project22c_kan": PADDED_GPT2,  # project 07's model; the KAN MLP is mlp="kan", not the default
}


@pytest.fixture(params=PROJECTS, ids=[p.name for p in PROJECTS])
def case(request):
    project = request.param
    assert project.name in GOLDEN, f"pin golden values for {project.name} in {__file__}"
    golden = GOLDEN[project.name]
    # seeded, then every weight perturbed (conftest.tiny_gpt): biases and LayerNorms count too
    model = tiny_gpt(project, seed=0, vocab_size=golden.vocab_size, block_size=32)
    return model, golden


def test_greedy_tokens_are_pinned_and_are_the_full_forward_argmax(case):
    model, golden = case
    tokens = [t.item() for t in model.generate_stream(torch.tensor([PROMPT]), NEW_TOKENS, temperature=0)]
    assert tokens == golden.tokens
    assert tokens == greedy_ids(model, PROMPT, NEW_TOKENS)  # lm_head on the last position alone: no change


def test_logits_are_pinned(case):
    model, golden = case
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT]))[0]  # (1, T, V)
    assert logits.shape == (1, len(PROMPT), golden.vocab_size)  # padding rows never show
    for (t, v), value in golden.logits.items():
        assert logits[0, t, v].item() == pytest.approx(value, abs=1e-5), (t, v)
