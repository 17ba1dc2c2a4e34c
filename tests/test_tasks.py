"""The 20 next-token tasks: registry, tokenization of answers, seeds, completions."""

from __future__ import annotations

import ast

import pytest

from sparsity.tasks import (
    REGISTRY,
    TEST_SEED,
    TRAIN_SEED,
    Pair,
    Task,
    TaskError,
    encode,
    get,
)

NAMES = [
    "single_double_quote", "bracket_counting", "set_or_string", "set_or_string_fixedvarname",
    "with_as", "with_open", "for_while", "else_elif", "if_ternary", "if_equals",
    "fstring_brace", "bracket_brace", "var_swap", "var_if", "indent_for",
    "while_return_true", "lambda_func", "enumerate_range", "final_kwarg", "class_init",
]
# Every task's clean prompt + target can be finished into a program, so none lacks one.
COMPLETE_NONE: frozenset[str] = frozenset()
N, CONTEXT, MAX_PROMPT = 64, 64, 60


def test_registry_names():
    """The registry holds exactly the 20 tasks, in the documented order."""
    assert list(REGISTRY) == NAMES
    assert all(isinstance(t, Task) and t.name == n for n, t in REGISTRY.items())


def test_get_unknown_task():
    """get() returns a registered task and names the choices for an unknown one."""
    assert get("var_swap") is REGISTRY["var_swap"]
    with pytest.raises(TaskError, match="unknown task 'nope'; choose from single_double_quote"):
        get("nope")


@pytest.mark.parametrize("name", NAMES)
def test_encode_train_and_test(name, stdlib_tokenizer):
    """Train and test pairs encode: answers are single distinct tokens, prompts ≤ 60 tokens."""
    task = REGISTRY[name]
    for seed in (TRAIN_SEED, TEST_SEED):
        batch = encode(task, stdlib_tokenizer, N, seed, MAX_PROMPT)
        assert batch.clean.shape[0] == batch.corrupt.shape[0] == N
        assert batch.clean.shape[1] <= CONTEXT
        assert bool((batch.target != batch.alt).all())


@pytest.mark.parametrize("name", NAMES)
def test_train_test_disjoint(name):
    """No clean prompt appears among both the train and the test pairs."""
    task = REGISTRY[name]
    train = {p.clean for p in task.pairs(N, TRAIN_SEED)}
    test = {p.clean for p in task.pairs(N, TEST_SEED)}
    assert not train & test


@pytest.mark.parametrize("name", NAMES)
def test_pairs_deterministic(name):
    """The same seed gives the same pairs."""
    task = REGISTRY[name]
    assert task.pairs(N, TRAIN_SEED) == task.pairs(N, TRAIN_SEED)
    assert task.pairs(N, TRAIN_SEED) != task.pairs(N, TEST_SEED)


@pytest.mark.parametrize("name", NAMES)
def test_prompts_vary(name):
    """At least 30 of 64 clean prompts are distinct, and clean differs from corrupt."""
    pairs = REGISTRY[name].pairs(N, TRAIN_SEED)
    assert len({p.clean for p in pairs}) >= 30
    assert all(p.clean != p.corrupt for p in pairs)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].complete is not None])
def test_complete_parses(name):
    """complete(clean + target) is a program ast.parse accepts, for 64 pairs."""
    task = REGISTRY[name]
    for p in task.pairs(N, TRAIN_SEED):
        ast.parse(task.complete(p.clean + p.target))


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].complete is not None])
def test_target_token_in_completed_program(name, stdlib_tokenizer):
    """In the completed program the token after the prompt's tokens is the target."""
    task, tok = REGISTRY[name], stdlib_tokenizer
    for p in task.pairs(N, TEST_SEED):
        ids = tok.encode(p.clean)
        full = tok.encode(task.complete(p.clean + p.target))
        assert full[: len(ids) + 1] == ids + tok.encode(p.target)


def test_complete_none_set():
    """The tasks without a completion are exactly the documented set (none)."""
    assert {n for n, t in REGISTRY.items() if t.complete is None} == COMPLETE_NONE


def test_multi_token_answer_raises(stdlib_tokenizer):
    """An answer that is not one token raises TaskError naming its token pieces."""
    task = Task("tiny", "a bad task", lambda rng: Pair(f"x = {rng.random()}\n", "y = 1\n", "hello world", "z"))
    with pytest.raises(TaskError, match=r"task tiny: answer 'hello world' is \d+ tokens \[b'"):
        encode(task, stdlib_tokenizer, 2, TRAIN_SEED, MAX_PROMPT)
