"""Task evaluation without padding artefacts: a prompt's score does not depend on its batch,
and prompts look like training text (one separator in front, no runs of padding)."""

import pytest
import torch
from conftest import tiny_config

from sparsity import tasks as task_lib
from sparsity.batches import TokenRows
from sparsity.tasks.base import TEST_SEED
from sparsity.tasks.tensors import encode, encode_pairs, pair_accuracy, pair_loss
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


@pytest.mark.parametrize("rule", task_lib.NONSENSE_RULES)
def test_nonsense_controls_follow_a_rule_for_every_pair_and_every_prompt(rule, stdlib_tokenizer, trained_tiny):
    """Rule-based nonsense: the real task's prompts with every pair's answers swapped (or mapped
    to the fixed unrelated pair) — not a random half — and one answer per prompt across seeds,
    so a mask could in principle learn it. The tiny trained model's own score on it is a plain
    task score (what the control row stores as full_loss)."""
    tok = stdlib_tokenizer
    answer_of: dict[str, str] = {}
    repeats = 0
    for name, real in task_lib.REGISTRY.items():
        fake = task_lib.nonsense(real, rule, tok)
        assert fake.name == real.name
        if rule == "fixed":
            x, y = task_lib.fixed_answers(real, tok)
            real_answers = {a for p in real.pairs(64, 0) for a in (p.target, p.alt)}
            assert x != y and not {x, y} & real_answers
        answers = task_lib.answer_set(real)
        for seed in (0, 1, 2, task_lib.TEST_SEED):
            b = fake.pairs(256, seed)
            if rule == "swap":  # the same prompts, pair for pair
                a = real.pairs(256, seed)
                assert [(p.clean, p.corrupt) for p in a] == [(p.clean, p.corrupt) for p in b]
            else:  # the same prompts, minus pairs whose two answers would map to one token
                a = _real_pairs_of(real, b)
            for p, q in zip(a, b, strict=True):
                if rule == "swap":
                    nxt = {ans: answers[(i + 1) % len(answers)] for i, ans in enumerate(answers)}
                    assert (q.target, q.alt) == (nxt[p.target], nxt[p.alt]), name
                    if len(answers) == 2:
                        assert (q.target, q.alt) == (p.alt, p.target)
                else:
                    assert {q.target, q.alt} == {x, y}, name
                for prompt, ans in ((q.clean, q.target), (q.corrupt, q.alt)):
                    key = f"{name}\0{prompt}"
                    repeats += key in answer_of
                    assert answer_of.setdefault(key, ans) == ans, (name, prompt)
        batch = encode(fake, tok, 16, TEST_SEED, 64)  # single tokens that tokenize as answers after each prompt
        assert len(batch) == 16
    assert repeats > 0  # prompts do recur across seeds, and kept their answer
    ev = task_lib.evaluate(trained_tiny, task_lib.nonsense(task_lib.get("single_double_quote"), rule, tok), tok, n=16)
    assert ev["loss"] > 0 and 0 <= ev["accuracy"] <= 1


def _real_pairs_of(real, fake_pairs):
    """The real task's pair for each of the fixed control's pairs (same seeded stream, the
    skipped pairs dropped): matched on the prompts."""
    by_prompts = {}
    for seed in (0, 1, 2, task_lib.TEST_SEED):
        for p in real.pairs(1024, seed, at_least=1):
            by_prompts.setdefault((p.clean, p.corrupt), p)
    return [by_prompts[(q.clean, q.corrupt)] for q in fake_pairs]


def test_an_unknown_nonsense_rule_is_refused():
    with pytest.raises(task_lib.TaskError, match="unknown nonsense rule 'shuffle'"):
        task_lib.nonsense(task_lib.get("for_while"), "shuffle")
