"""Task evaluation without padding artefacts: a prompt's score does not depend on its batch,
and prompts look like training text (one separator in front, no runs of padding)."""

import pytest
import torch
from conftest import tiny_config

from sparsity import tasks as task_lib
from sparsity.batches import TokenRows
from sparsity.tasks.base import TEST_SEED, encode, encode_pairs, pair_accuracy, pair_loss
from sparsity.train import train


@pytest.fixture(scope="module")
def trained_tiny(stdlib_rows):
    """A tiny model trained 40 steps with AbsTopK, the bigram table and the attention sink on:
    every path that could couple a prompt to its batch."""
    cfg = tiny_config(m__enable_bigram_table=True, m__learnable_bigram_table=True, m__sink=True, t__steps=40)
    rows, _ = stdlib_rows
    return train(cfg, TokenRows(rows, cfg.train.batch_size, seed=0), "cpu").model.eval()


@pytest.mark.parametrize("name", list(task_lib.REGISTRY))
def test_batched_scores_equal_one_prompt_at_a_time(trained_tiny, stdlib_tokenizer, name):
    """For every task: per-pair loss and accuracy of a 16-pair batch equal each pair scored alone (1e-5)."""
    task, tok, model = task_lib.get(name), stdlib_tokenizer, trained_tiny
    batch = encode(task, tok, 16, TEST_SEED, model.config.block_size)
    with torch.no_grad():
        lc, lx = batch.answer_logits(model)
        losses = pair_loss(lc, lx, batch.target, batch.alt)
        accs = pair_accuracy(lc, lx, batch.target, batch.alt)
        for i, p in enumerate(batch.pairs):
            one = encode_pairs(task, tok, [p], model.config.block_size)
            c1, x1 = one.answer_logits(model)
            assert float(pair_loss(c1, x1, one.target, one.alt)) == pytest.approx(float(losses[i]), abs=1e-5)
            assert float(pair_accuracy(c1, x1, one.target, one.alt)) == float(accs[i])
    assert batch.clean.shape[1] > int(batch.clean_last.min()) + 1  # the batch really was padded


def test_prompts_start_like_training_text_and_are_read_at_their_last_token(stdlib_tokenizer):
    """One <|endoftext|> (a file boundary) then the prompt; padding only after the answer position."""
    tok = stdlib_tokenizer
    b = encode(task_lib.get("single_double_quote"), tok, 32, TEST_SEED, 64)
    for rows, last, prompts in ((b.clean, b.clean_last, [p.clean for p in b.pairs]), (b.corrupt, b.corrupt_last, [p.corrupt for p in b.pairs])):
        for row, end, text in zip(rows.tolist(), last.tolist(), prompts, strict=True):
            assert row[: end + 1] == [tok.eot_id] + tok.encode(text)
            assert tok.eot_id not in row[1 : end + 1]


def test_the_loss_is_on_the_references_summed_scale():
    """Two prompts at a coin flip each: loss 2·ln 2 (chance), as the reference's last_token_contrast_loss_fn."""
    z = torch.zeros(3, 10)
    loss = pair_loss(z, z, torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    torch.testing.assert_close(loss, torch.full((3,), task_lib.CHANCE_LOSS))


def test_nonsense_task_keeps_prompts_and_scrambles_answers_deterministically():
    real = task_lib.get("single_double_quote")
    fake = task_lib.nonsense(real)
    a, b = real.pairs(64, 0), fake.pairs(64, 0)
    assert [p.clean for p in a] == [p.clean for p in b] and fake.pairs(64, 0) == b
    swapped = sum(p.target != q.target for p, q in zip(a, b, strict=True))
    assert 16 < swapped < 48  # about half the pairs swap their answers
