"""Why a task is stuck: the model, the corpus prior at its prompts, the corpus's examples of the
construction, and a fine-tuning control; prints one JSON object.

    python benchmarks/task_diagnosis.py --checkpoint CKPT [--data DATA] [--tasks a,b,…]
                                        [--steps 300] [--smoke]

Per task, on held-out pairs (TEST_SEED, 128 by default):

1. ``model``: the checkpoint's task loss and accuracy, and per side: the mean binary CE on
   the clean prompts (answer ``target``) and on the corrupt ones (answer ``alt``), and the
   fraction of each side's prompts on which the model ranks ``target`` above ``alt``. A
   model that gives both prompts the same answer shows as one side near 1 and the other
   near 0 in ``ce`` with both ``prefers_target`` fractions alike.
2. ``suffix_prior``: for each pair the longest token suffix its clean and corrupt prompts
   share (at most ``--max-suffix`` tokens), and how often each of the two answers follows
   it in the training token stream, backing off to shorter suffixes until the two answers
   follow it at least ``--min-events`` times together, down to one token (``length``
   records the one used; 0, the answers' unigram counts, only where the prompts differ in
   their last token). ``loss``: what a predictor gets that sees only that shared suffix (add-one
   smoothing over the two answers): it gives both prompts the same distribution, so it is
   never below chance (2 ln 2), and far above it where the corpus favours one answer.
   ``majority``: the corpus share of the answer more frequent after the suffix.
   ``model_agrees``: the fraction of prompts on which the model's choice is that majority
   answer. ``suffix_prior_names``: the same with every identifier token of the suffix
   (not a keyword or builtin) matching any identifier token with the same leading
   character, since the tasks draw their names at random. ``own_suffix_prior``: the exact
   back-off on each prompt's *own* suffix, which sees the difference between the prompts
   when it lies within a few tokens. ``in_context_copy``: what an induction copy predicts
   (the token after the earlier occurrence of the prompt's longest repeated suffix):
   how often that is the prompt's answer, the other answer or neither, and how often the
   model's choice is the copy's.
3. ``corpus``: counts of the task's construction in the training files (``ast``), per
   million training tokens (tasks without a counter: none).
4. ``finetune``: a copy of the model trained on the task's TRAIN pairs only (``pair_loss``,
   Adam, AbsTopK as in the model, a sparse model's zero weights kept zero after every step),
   with the held-out loss and accuracy at several step counts and the seconds taken: a
   positive control that the pairs are distinguishable and the answers learnable from
   these prompts.
5. ``tokenization``: whether each answer token is what the tokenizer emits after the prompt
   inside the completed program (``task.complete``), and each answer token's count in the
   training stream.

``--smoke``: a random d_model-32 model, a tokenizer and token stream from a slice of the
stdlib, two tasks, a few fine-tuning steps — every code path in seconds (a test runs it).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread unless --threads says otherwise

import _bootstrap  # noqa: E402  (first of ours: fixes sys.path; cpu_name)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparsity.tasks import REGISTRY, TEST_SEED, TRAIN_SEED, encode, pair_accuracy, pair_loss  # noqa: E402

DEFAULT_TASKS = ("if_ternary", "var_swap", "final_kwarg", "bracket_counting", "set_or_string",
                 "set_or_string_fixedvarname", "var_if", "enumerate_range", "indent_for", "else_elif")
SMOKE_TASKS = ("if_ternary", "indent_for")
CHANCE = 2 * math.log(2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- loading


def load_checkpoint(ckpt: str, data_uri: str | None):
    """(model, tokenizer, data URI, description) of a trained checkpoint."""
    from jobs.loader import LoadedModel

    lm = LoadedModel(ckpt, data_uri)
    if lm.data_uri is None:
        raise SystemExit(f"no dataset for {ckpt}: its run.json names none; pass --data")
    return lm.model, lm.tok, lm.data_uri


def train_stream(data_uri: str) -> np.ndarray:
    """The training split as one token stream (rows in manifest order, end to end)."""
    from cluster import data

    return np.ascontiguousarray(data.load_rows(data_uri, "train").reshape(-1))


def train_sources(data_uri: str) -> tuple[list[str], dict]:
    """Paths of the training split's source files, when the dataset was made from the stdlib
    of this interpreter (checked by the corpus fingerprint in its manifest)."""
    from cluster import data
    from sparsity import corpus

    c = data.read_manifest(data_uri).get("corpus", {})
    if not str(c.get("source", "")).startswith("stdlib"):
        return [], {"skipped": f"corpus source {c.get('source')!r} is not the stdlib; no source files to parse"}
    files = corpus.list_files(None)
    vf = float(c.get("val_fraction", corpus.DEFAULT_VAL_FRACTION))
    paths = [f.path for f in corpus.split_files(files, vf)["train"]]
    return paths, {"fingerprint_matches_manifest": corpus.fingerprint(files) == c.get("fingerprint"), "val_fraction": vf}


def smoke_setup():
    """A tokenizer and token stream from a slice of the stdlib, a random d_model-32 model with
    three quarters of its matrices' weights zeroed (so the mask path runs), the source paths."""
    from sparsity import corpus, tokenizer
    from sparsity.config import ModelConfig
    from sparsity.model import GPT
    from sparsity.topk import sparse_targets

    files = corpus.split_files(corpus.list_files(None))["train"]
    tok = tokenizer.train(corpus.iter_texts(files[:300]))
    ids: list[int] = []
    for text in corpus.iter_texts(files[:120]):
        ids += tok.encode(text) + [tok.eot_id]
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.n_vocab, block_size=128, d_model=32, n_head=2, d_head=16, d_mlp=128)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in sparse_targets(model):
            t.param.mul_(torch.rand(t.param.shape, generator=g) < 0.25)
    return model, tok, np.asarray(ids, dtype=np.uint16), [f.path for f in files[:120]]


# ---------------------------------------------------------------------------- corpus prior


class SuffixIndex:
    """Positions of every token of a stream, grouped by token, to count what follows a
    suffix pattern: start from the positions of the pattern's last element and keep those
    whose preceding tokens match, one token further back per length.

    A pattern element is a token id (``("t", id)``: that token) or a name class
    (``("c", k)``: any identifier token with the same leading character, see
    :func:`name_classes`), so names that a task draws at random can be abstracted."""

    def __init__(self, stream: np.ndarray, vocab: int, classes: np.ndarray):
        self.s = stream.astype(np.int64)
        body = self.s[:-1]  # a position needs a follower
        self.order = np.argsort(body, kind="stable")
        self.start = np.concatenate([[0], np.cumsum(np.bincount(body, minlength=vocab))])
        self.unigram = np.bincount(self.s, minlength=vocab)
        self.cls = classes
        self._class_pos: dict[int, np.ndarray] = {}
        self._cache: dict[tuple, list[tuple[int, int, int]]] = {}

    def _positions(self, el: tuple[str, int]) -> np.ndarray:
        kind, v = el
        if kind == "t":
            return self.order[self.start[v] : self.start[v + 1]]
        if v not in self._class_pos:
            self._class_pos[v] = np.sort(np.concatenate([self.order[self.start[i] : self.start[i + 1]] for i in np.flatnonzero(self.cls == v)]))
        return self._class_pos[v]

    def counts(self, pattern: list[tuple[str, int]], answers: tuple[int, int]) -> list[tuple[int, int, int]]:
        """[(occurrences, n_first_answer, n_second_answer)] after the pattern's last 0, 1, …,
        len(pattern) elements (0: the whole stream, the answers' unigram counts)."""
        key = (tuple(pattern), answers)
        if key in self._cache:
            return self._cache[key]
        s, u = self.s, self.unigram
        out = [(int(s.size), int(u[answers[0]]), int(u[answers[1]]))]
        pos = self._positions(pattern[-1])
        for back in range(len(pattern)):
            if back:
                pos = pos[pos >= back]
                kind, v = pattern[-1 - back]
                prev = s[pos - back]
                pos = pos[(prev == v) if kind == "t" else (self.cls[prev] == v)]
            nxt = s[pos + 1]
            out.append((int(pos.size), int((nxt == answers[0]).sum()), int((nxt == answers[1]).sum())))
        self._cache[key] = out
        return out


def name_classes(tok) -> np.ndarray:
    """(vocab,) class of every token: ≥ 0 for an identifier-like token (letters after at most
    one space or punctuation character; not a Python keyword or builtin), the class being its
    leading character; -1 for every other token (matched exactly)."""
    import builtins
    import keyword
    import re

    exact = set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins))
    ident = re.compile(r"^([^\w\s]| )?([A-Za-z_][A-Za-z0-9_]*)$")
    cls = np.full(tok.n_vocab, -1, dtype=np.int64)
    lead: dict[str, int] = {}
    for i in range(tok.n_vocab):
        if i == tok.eot_id:
            continue
        try:
            text = tok.encoding.decode_single_token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            continue
        m = ident.match(text)
        if m and m.group(2) not in exact:
            cls[i] = lead.setdefault(m.group(1) or "", len(lead))
    return cls


def shared_suffix(a: list[int], b: list[int], cap: int) -> list[int]:
    n = 0
    while n < min(len(a), len(b), cap) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n :]


def backoff(counts: list[tuple[int, int, int]], min_events: int) -> tuple[int, tuple[int, int, int]]:
    """(length, counts) of the longest pattern (≥ 1 element) the two answers follow ≥
    ``min_events`` times together; the one-element pattern when none does (then the add-one
    smoothing pulls a rare pair of answers towards even odds)."""
    for L in range(len(counts) - 1, 0, -1):
        if counts[L][1] + counts[L][2] >= min_events:
            return L, counts[L]
    return 1, counts[1]


def _pattern(ids: list[int], cls: np.ndarray | None) -> list[tuple[str, int]]:
    return [("c", int(cls[i])) if cls is not None and cls[i] >= 0 else ("t", i) for i in ids]


def _pattern_text(tok, ids: list[int], cls: np.ndarray | None) -> str:
    return "".join(("<name>" if tok.decode([i])[:1] not in " .(" else tok.decode([i])[:1] + "<name>") if cls is not None and cls[i] >= 0
                   else tok.decode([i]) for i in ids)


def _prior_summary(rows: list[dict], min_events: int) -> dict:
    losses, major, prefers_t = [], [], []
    for r in rows:
        n = r["n_target"] + r["n_alt"]
        p_t = (r["n_target"] + 1) / (n + 2)
        losses.append(-math.log(p_t) - math.log(1 - p_t))
        major.append(max(r["n_target"], r["n_alt"]) / n if n else float("nan"))
        if r["n_target"] != r["n_alt"]:
            prefers_t.append(p_t > 0.5)
    return {
        "pairs": len(rows), "loss": _mean(losses), "majority": _nanmean(major), "prefers_target": _mean(prefers_t),
        "pairs_tied": len(rows) - len(prefers_t), "length_mean": _mean([r["length"] for r in rows]), "shared_mean": _mean([r["shared"] for r in rows]),
        "length_hist": {str(k): sum(r["length"] == k for r in rows) for k in sorted({r["length"] for r in rows})},
        "events_median": float(np.median([r["n_target"] + r["n_alt"] for r in rows])) if rows else None,
        "pairs_under_min_events": sum(r["n_target"] + r["n_alt"] < min_events for r in rows),
        "examples": rows[:3],
    }


def suffix_prior(index: SuffixIndex, tok, batch, cap: int, min_events: int) -> dict:
    """Per pair: the prior at the prompts' shared suffix (tokens exact, and names abstracted
    to their class), each prompt's own-suffix prior, and the in-context copy."""
    shared: dict[str, list[dict]] = {"exact": [], "names": []}
    own_rows, copies = [], []
    for i in range(len(batch)):
        c = batch.clean[i, : int(batch.clean_last[i]) + 1].tolist()
        x = batch.corrupt[i, : int(batch.corrupt_last[i]) + 1].tolist()
        t, a = int(batch.target[i]), int(batch.alt[i])
        suf = shared_suffix(c, x, cap)
        for kind, cls in (("exact", None), ("names", index.cls)):
            if suf:
                L, (occ, nt, na) = backoff(index.counts(_pattern(suf, cls), (t, a)), min_events)
            else:  # the prompts differ in their last token: nothing shared but the answers' unigram counts
                L, (occ, nt, na) = 0, (int(index.s.size), int(index.unigram[t]), int(index.unigram[a]))
            shared[kind].append({"shared": len(suf), "length": L, "occurrences": occ, "n_target": nt, "n_alt": na,
                                 "suffix": _pattern_text(tok, suf[len(suf) - L :], cls)})
        own = []
        for prompt, want in ((c, 0), (x, 1)):
            L, (occ, nt, na) = backoff(index.counts(_pattern(prompt[-cap:], None), (t, a)), min_events)
            p_t = (nt + 1) / (nt + na + 2)
            own.append((L, -math.log(p_t if want == 0 else 1 - p_t), p_t > 0.5))
        own_rows.append(own)
        copies.append((in_context_copy(c), in_context_copy(x), t, a))
    own = {"loss": _mean([p[0][1] + p[1][1] for p in own_rows]), "length_mean": _mean([s[0] for p in own_rows for s in p]),
           "accuracy": _mean([(p[0][2] + (not p[1][2])) / 2 for p in own_rows])}
    return {"shared": _prior_summary(shared["exact"], min_events), "names": _prior_summary(shared["names"], min_events),
            "own": own, "_rows": shared, "_copies": copies}


def in_context_copy(ids: list[int]) -> tuple[int | None, int]:
    """What an induction copy predicts after ``ids``: the token that followed the earlier
    occurrence of the prompt's longest repeated suffix (the latest among equals), and that
    suffix's length; (None, 0) when the last token never occurred before."""
    n, best, nxt = len(ids), 0, None
    for j in range(n - 2, -1, -1):
        if ids[j] == ids[-1]:
            L = 1
            while L <= j and ids[j - L] == ids[n - 1 - L]:
                L += 1
            if L > best:
                best, nxt = L, ids[j + 1]
    return nxt, best


def copy_summary(copies, choice) -> dict:
    """How often the in-context copy gives each prompt its own answer or the other one, and
    how often the model's choice is the copy's (prompts where the copy is one of the two)."""
    right = wrong = none = 0
    agree = []
    for (cc, cx, t, a), picks in zip(copies, zip(*choice, strict=True), strict=True):
        for (tok_id, _), want, other, pick_t in ((cc, t, a, picks[0]), (cx, a, t, picks[1])):
            if tok_id == want:
                right += 1
            elif tok_id == other:
                wrong += 1
            else:
                none += 1
                continue
            agree.append(pick_t == (tok_id == t))
    n = right + wrong + none
    return {"copy_is_answer": round(right / n, 4), "copy_is_other_answer": round(wrong / n, 4), "copy_is_neither": round(none / n, 4),
            "model_agrees_with_copy": _mean(agree)}


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs]
    return round(sum(xs) / len(xs), 4) if xs else None


def _nanmean(xs) -> float | None:
    xs = [x for x in xs if not math.isnan(x)]
    return _mean(xs)


# ---------------------------------------------------------------------------- constructions


def _name(n) -> str | None:
    return n.id if isinstance(n, ast.Name) else None


def _is_call_to(n, fn: str) -> bool:
    return isinstance(n, ast.Call) and _name(n.func) == fn


def _names_in(n) -> list[str]:
    return [m.id for m in ast.walk(n) if isinstance(m, ast.Name)]


def _bodies(node):
    for field in ("body", "orelse", "finalbody"):
        b = getattr(node, field, None)
        if isinstance(b, list) and b and isinstance(b[0], ast.stmt):
            yield b
    for h in getattr(node, "handlers", []) or []:
        yield h.body
    for c in getattr(node, "cases", []) or []:
        yield c.body


def count_constructions(paths: list[str]) -> dict:
    """Counts, over the given source files, of the constructions the tasks ask about."""
    from sparsity import corpus

    c: dict[str, int] = {}

    def add(key: str, n: int = 1) -> None:
        c[key] = c.get(key, 0) + n

    parsed = failed = 0
    for path in paths:
        text = corpus.read_source(path)
        if text is None:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            failed += 1
            continue
        parsed += 1
        lines = text.splitlines()
        defaults: dict[str, list[str]] = {}  # module-level function → its defaulted parameters, in order
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                pos = a.posonlyargs + a.args
                kw = [p.arg for p in pos[len(pos) - len(a.defaults):]] if a.defaults else []
                kw += [p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None]
                defaults[node.name] = kw
        for node in ast.walk(tree):
            # if_ternary: conditional expressions vs if statements
            if isinstance(node, ast.IfExp):
                add("if_ternary.ifexp")
            elif isinstance(node, ast.If):
                add("if_ternary.if_stmt")
                if node.orelse:  # else_elif: what follows an if block's else
                    ln = lines[node.orelse[0].lineno - 1].lstrip() if isinstance(node.orelse[0], ast.If) else ""
                    add("else_elif.elif" if ln.startswith("elif") else "else_elif.else")
            elif isinstance(node, ast.For | ast.AsyncFor):
                t, it = node.target, node.iter
                if isinstance(t, ast.Tuple) and len(t.elts) == 2:
                    add("enumerate_range.for_2names_enumerate" if _is_call_to(it, "enumerate") else
                        "enumerate_range.for_2names_range" if _is_call_to(it, "range") else "enumerate_range.for_2names_other")
                elif isinstance(t, ast.Name):
                    add("enumerate_range.for_1name_range" if _is_call_to(it, "range") else
                        "enumerate_range.for_1name_enumerate" if _is_call_to(it, "enumerate") else "enumerate_range.for_1name_other")
                add(f"indent_for.for_at_col_{node.col_offset}" if node.col_offset in (4, 8) else "indent_for.for_at_other_col")
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                t, v = node.targets[0], node.value
                if isinstance(v, ast.IfExp) and isinstance(t, ast.Name) and isinstance(v.body, ast.Name):
                    add("if_ternary.assign_name_ifexp")  # v = a if cond else …  (the clean form)
                if isinstance(t, ast.Tuple) and isinstance(v, ast.Tuple) and len(t.elts) == len(v.elts) == 2:
                    tn, vn = [_name(e) for e in t.elts], [_name(e) for e in v.elts]
                    if None not in tn and vn[0] == tn[1]:  # a, b = b, …
                        add("var_swap.swap" if vn[1] == tn[0] else "var_swap.b_comma_not_a")
                    if None not in tn:
                        add("var_swap.tuple2_assign")
            elif isinstance(node, ast.Call):
                # bracket_counting: f(g(a) op h(b)) closes two, f(g(a)) op h(b) one
                if isinstance(node.func, ast.Name) and node.args and not node.keywords:
                    last = node.args[-1]
                    if (isinstance(last, ast.BinOp) and isinstance(last.left, ast.Call) and isinstance(last.right, ast.Call)) or (
                            len(node.args) >= 2 and isinstance(node.args[-2], ast.Call) and isinstance(last, ast.Call)):
                        add("bracket_counting.outer_closes_two")
                fn = _name(node.func)
                if fn in defaults:  # final_kwarg: calls passing ≥ 2 of the defined keyword parameters
                    passed = [k.arg for k in node.keywords if k.arg in defaults[fn]]
                    if len(passed) >= 2:
                        order = [defaults[fn].index(k) for k in passed]
                        add("final_kwarg.call_2kw_def_order" if order == sorted(order) else "final_kwarg.call_2kw_other_order")
            if isinstance(node, ast.BinOp | ast.Tuple):
                pair = (node.left, node.right) if isinstance(node, ast.BinOp) else tuple(node.elts[-2:]) if len(node.elts) >= 2 else ()
                if len(pair) == 2 and isinstance(pair[0], ast.Call) and pair[0].args and isinstance(pair[0].args[-1], ast.Call) \
                        and isinstance(pair[1], ast.Call):
                    add("bracket_counting.inner_then_op")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                _function_counts(node, add)
            for body in _bodies(node):  # if_ternary's corrupt form: v = a, then an if statement
                for s1, s2 in zip(body, body[1:], strict=False):
                    if isinstance(s1, ast.Assign) and len(s1.targets) == 1 and isinstance(s1.targets[0], ast.Name) \
                            and isinstance(s1.value, ast.Name) and isinstance(s2, ast.If):
                        add("if_ternary.assign_name_then_if")
    return {"files_parsed": parsed, "files_failed": failed, "counts": dict(sorted(c.items()))}


def _own_nodes(fn):
    """The nodes of a function's body, nested functions, lambdas and classes excluded."""
    todo = list(fn.body)
    while todo:
        n = todo.pop()
        yield n
        todo.extend(c for c in ast.iter_child_nodes(n) if not isinstance(c, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef))


def _function_counts(fn, add) -> None:
    """set_or_string and var_if inside one function (its own scope)."""
    set_names, str_names = set(), set()
    nodes = list(_own_nodes(fn))
    for n in nodes:
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
            v = n.value
            if _is_call_to(v, "set") and not v.args:
                set_names.add(n.targets[0].id)
            elif (isinstance(v, ast.Constant) and isinstance(v.value, str)) or (_is_call_to(v, "str") and not v.args):
                str_names.add(n.targets[0].id)
    for n in nodes:
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add" and isinstance(n.func.value, ast.Name):
            add("set_or_string.add_call_on_name")
            if n.func.value.id in set_names:
                add("set_or_string.add_on_set()_name")
        elif isinstance(n, ast.AugAssign) and isinstance(n.op, ast.Add) and isinstance(n.target, ast.Name):
            add("set_or_string.augadd_on_name")
            if n.target.id in str_names:
                add("set_or_string.augadd_on_str_name")
    a = fn.args
    pos = a.posonlyargs + a.args
    dflt = list(zip([p.arg for p in pos[len(pos) - len(a.defaults):]], a.defaults, strict=True)) if a.defaults else []
    none = [p for p, d in dflt if isinstance(d, ast.Constant) and d.value is None]
    if len(dflt) >= 2 and len(none) == 1:
        add("var_if.fn_2defaults_one_None")
        first_if = next((s for s in fn.body if isinstance(s, ast.If)), None)
        if first_if is not None:
            names = _names_in(first_if.test)
            params = [p.arg for p in pos]
            first = names[0] if names else None
            add("var_if.first_if_tests_None_param" if first == none[0] else
                "var_if.first_if_tests_other_param" if first in params else "var_if.first_if_tests_nonparam")


CONSTRUCTION_KEYS = {
    "if_ternary": "if_ternary.", "var_swap": "var_swap.", "final_kwarg": "final_kwarg.", "bracket_counting": "bracket_counting.",
    "set_or_string": "set_or_string.", "set_or_string_fixedvarname": "set_or_string.", "var_if": "var_if.",
    "enumerate_range": "enumerate_range.", "indent_for": "indent_for.", "else_elif": "else_elif.",
}


# ---------------------------------------------------------------------------- model and fine-tuning


@torch.no_grad()
def score(model, b) -> dict:
    """Loss, accuracy and the per-side split of a model on a batch of pairs."""
    model.eval()
    lc, lx = b.answer_logits(model)
    t, a = b.target, b.alt
    two_c = torch.stack([lc.gather(1, t[:, None])[:, 0], lc.gather(1, a[:, None])[:, 0]], 1).float().log_softmax(1)
    two_x = torch.stack([lx.gather(1, t[:, None])[:, 0], lx.gather(1, a[:, None])[:, 0]], 1).float().log_softmax(1)
    return {"loss": round(float(pair_loss(lc, lx, t, a).mean()), 4), "accuracy": round(float(pair_accuracy(lc, lx, t, a).mean()), 4),
            "ce_clean": round(float(-two_c[:, 0].mean()), 4), "ce_corrupt": round(float(-two_x[:, 1].mean()), 4),
            "prefers_target_clean": round(float((two_c[:, 0] > two_c[:, 1]).float().mean()), 4),
            "prefers_target_corrupt": round(float((two_x[:, 0] > two_x[:, 1]).float().mean()), 4),
            "_choice": ((two_c[:, 0] > two_c[:, 1]).tolist(), (two_x[:, 0] > two_x[:, 1]).tolist())}


@torch.no_grad()
def lm_loss(model, rows: np.ndarray) -> float:
    """Mean next-token cross-entropy on (n, T+1) token rows."""
    model.eval()
    return round(float(model.loss(torch.from_numpy(rows.astype(np.int64)))), 4)


def finetune(model, task, tok, test, n_train: int, steps: int, batch: int, lr: float, evals: list[int], val_rows: np.ndarray,
             seed: int = 0) -> dict:
    """A copy of ``model`` trained on ``task``'s TRAIN pairs (none with a test prompt);
    held-out loss and accuracy at the steps in ``evals``, and the language-model loss on
    ``val_rows`` before and after (what learning the task cost elsewhere)."""
    from sparsity.topk import sparse_targets

    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    masks = [(t.param, t.param != 0) for t in sparse_targets(m) if bool((t.param == 0).any())]
    nz0 = sum(int(mk.sum()) for _, mk in masks)
    train = encode(task, tok, n_train, TRAIN_SEED, m.config.block_size, exclude=frozenset(p.clean for p in test.pairs),
                   at_least=min(n_train, 64))
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    curve, t0, t_eval, recent = [], time.perf_counter(), 0.0, []

    def record(step: int) -> None:
        nonlocal t_eval
        t1 = time.perf_counter()
        s = score(m, test)
        t_eval += time.perf_counter() - t1
        curve.append({"step": step, "loss": s["loss"], "accuracy": s["accuracy"], "ce_clean": s["ce_clean"], "ce_corrupt": s["ce_corrupt"],
                      "train_loss": round(float(np.mean(recent[-10:])), 4) if recent else None,
                      "seconds": round(time.perf_counter() - t0 - t_eval, 2)})

    if 0 in evals:
        record(0)
    for step in range(1, steps + 1):
        m.train()
        b = train.subset(torch.randint(len(train), (min(batch, len(train)),), generator=g))
        lc, lx = b.answer_logits(m)
        loss = pair_loss(lc, lx, b.target, b.alt).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p, mk in masks:
                p.mul_(mk)
        recent.append(loss.item())
        if step in evals:
            record(step)
    nz1 = sum(int((p != 0).sum()) for p, _ in masks)
    lm = {"lm_loss_before": lm_loss(model, val_rows), "lm_loss_after": lm_loss(m, val_rows), "lm_rows": len(val_rows)}
    first = next((c["step"] for c in curve if c["loss"] <= 0.15), None)
    return {"train_pairs": len(train), "test_pairs": len(test), "steps": steps, "batch": batch, "lr": lr,
            "sparse_matrices": len(masks), "nonzero_before": nz0, "nonzero_after": nz1, "curve": curve,
            "first_step_at_or_below_0.15": first, "seconds": round(time.perf_counter() - t0 - t_eval, 2), **lm}


def tokenization(task, tok, test, index: SuffixIndex, context: int) -> dict:
    """Do the answers tokenize as asked inside the completed program, and how common are they?"""
    ok = n = 0
    for p in test.pairs:
        for prompt, ans in ((p.clean, p.target), (p.corrupt, p.alt)):
            if task.complete is None:
                continue
            ids, aid = tok.encode(prompt), tok.encode(ans)
            full = tok.encode(task.complete(prompt + ans))
            ok += full[: len(ids) + 1] == ids + aid[:1]
            n += 1
    answers = sorted({int(x) for x in test.target.tolist() + test.alt.tolist()})
    counts = {tok.decode([a]): int(index.unigram[a]) for a in answers}
    lengths = [int(x) + 1 for x in test.clean_last.tolist() + test.corrupt_last.tolist()]
    return {"answer_as_in_completed_program": round(ok / n, 4) if n else None, "prompts_checked": n,
            "answer_token_counts": counts if len(counts) <= 4 else None,
            "answer_token_count_min": min(counts.values()), "answer_tokens": len(counts),
            "prompt_tokens_max": max(lengths), "context": context}


# ---------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a trained checkpoint (run dir or step dir)")
    ap.add_argument("--data", help="its dataset (default: the one its run.json names)")
    ap.add_argument("--tasks", help=f"comma-separated (default: {','.join(DEFAULT_TASKS)})")
    ap.add_argument("--test-pairs", type=int, default=128)
    ap.add_argument("--train-pairs", type=int, default=2048, help="the fine-tuning pool (fewer where a task has fewer prompts)")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    ap.add_argument("--evals", default="0,10,25,50,100,200,300", help="steps at which the fine-tuned copy is scored")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-suffix", type=int, default=8)
    ap.add_argument("--min-events", type=int, default=20)
    ap.add_argument("--val-rows", type=int, default=128, help="held-out rows for the LM loss before/after fine-tuning")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a random d_model-32 model on a slice of the stdlib: seconds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    if args.smoke:
        model, tok, stream, paths = smoke_setup()
        what, data_uri, src_info = "random init (smoke)", None, {"smoke": True}
        names = args.tasks.split(",") if args.tasks else list(SMOKE_TASKS)
        args.steps, args.evals, args.test_pairs, args.train_pairs, args.batch = 6, "0,3,6", 16, 64, 8
        val_rows = stream[: len(stream) // 65 * 65].reshape(-1, 65)[-16:]  # seen in the stream: a smoke value only
    else:
        if not args.checkpoint:
            ap.error("--checkpoint is required (or --smoke)")
        model, tok, data_uri = load_checkpoint(args.checkpoint, args.data)
        what = args.checkpoint
        stream = train_stream(data_uri)
        paths, src_info = train_sources(data_uri)
        from cluster import data

        val = data.load_rows(data_uri, "val")
        val_rows = val[np.unique(np.linspace(0, len(val) - 1, min(args.val_rows, len(val))).astype(int))]
        names = args.tasks.split(",") if args.tasks else list(DEFAULT_TASKS)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {', '.join(REGISTRY)}")
    for p in model.parameters():
        p.requires_grad_(False)
    timing["load"] = time.perf_counter() - t_start

    t = time.perf_counter()
    index = SuffixIndex(stream, tok.n_vocab, name_classes(tok))
    timing["suffix_index"] = time.perf_counter() - t
    t = time.perf_counter()
    cons = count_constructions(paths) if paths else {"files_parsed": 0, "files_failed": 0, "counts": {}}
    timing["constructions"] = time.perf_counter() - t
    per_m = 1e6 / len(stream)

    evals = sorted({int(x) for x in args.evals.split(",") if x and int(x) <= args.steps} | {args.steps})
    cfg = model.config
    out_tasks = {}
    for name in names:
        task = REGISTRY[name]
        log(f"{name} …")
        t_task = time.perf_counter()
        test = encode(task, tok, args.test_pairs, TEST_SEED, cfg.block_size)
        s = score(model, test)
        choice = s.pop("_choice")
        prior = suffix_prior(index, tok, test, args.max_suffix, args.min_events)
        rows = prior.pop("_rows")
        for kind, key in (("exact", "shared"), ("names", "names")):
            agree = [int(pick) == int(r["n_target"] > r["n_alt"]) for r, side in zip(rows[kind], zip(*choice, strict=True), strict=True)
                     if r["n_target"] != r["n_alt"] for pick in side]
            prior[key]["model_agrees"] = _mean(agree)
        prefix = CONSTRUCTION_KEYS.get(name)
        corpus_counts = None
        if prefix and cons["files_parsed"]:
            corpus_counts = {k[len(prefix):]: {"count": v, "per_million_tokens": round(v * per_m, 2)}
                             for k, v in cons["counts"].items() if k.startswith(prefix)}
        rec = {"model": s, "chance": round(CHANCE, 4), "suffix_prior": prior["shared"],
               "suffix_prior_names": prior["names"], "own_suffix_prior": prior["own"],
               "in_context_copy": copy_summary(prior.pop("_copies"), choice),
               "corpus": corpus_counts, "tokenization": tokenization(task, tok, test, index, cfg.block_size)}
        if not args.no_finetune:
            rec["finetune"] = finetune(model, task, tok, test, args.train_pairs, args.steps, args.batch, args.lr, evals, val_rows)
        rec["seconds"] = round(time.perf_counter() - t_task, 2)
        log(f"{name}: model {s['loss']:.3f}  suffix prior {prior['shared']['loss']}  own {prior['own']['loss']}  "
            f"ft {rec.get('finetune', {}).get('curve', [{}])[-1].get('loss')}  ({rec['seconds']:.0f}s)")
        out_tasks[name] = rec

    out = {
        "checkpoint": what, "data": data_uri, "cpu": _bootstrap.cpu_name(), "threads": torch.get_num_threads(),
        "shape": f"d_model {cfg.d_model} × {cfg.n_layer} layers, d_mlp {cfg.d_mlp}, ctx {cfg.block_size}, afrac {cfg.afrac}",
        "train_tokens": int(len(stream)), "corpus_files": src_info | {"parsed": cons["files_parsed"], "failed": cons["files_failed"]},
        "settings": {"test_pairs": args.test_pairs, "max_suffix": args.max_suffix, "min_events": args.min_events,
                     "finetune": None if args.no_finetune else {"steps": args.steps, "evals": evals, "batch": args.batch, "lr": args.lr,
                                                                "train_pairs": args.train_pairs}},
        "tasks": out_tasks,
        "seconds": {k: round(v, 2) for k, v in timing.items()} | {"total": round(time.perf_counter() - t_start, 2)},
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
