"""The 20 hand-crafted next-token tasks: contrast pairs built from Python templates.

Every task fills a template with random identifiers, words and numbers and puts 0–3
unrelated lines (imports, constants, comments) in front, so prompts vary while the clean
and corrupt prompts of one pair differ in a token or a few. Answers are single tokens of
the stdlib BPE (pat_str of :mod:`sparsity.tokenizer`): e.g. a closing quote is asked for
together with its newline (``'\\n``), an identifier together with its leading space
(`` count``), and a body indentation as the whitespace token before the first word (7
spaces for an 8-space indent, since the last space joins the word).

Identifiers that are answers come from :data:`ANSWER_NAMES`, words that are one token with
a leading space in that tokenizer; identifiers elsewhere may be any plausible name.
``complete`` of each task appends a fixed suffix that turns ``clean + target`` into a
program ``ast.parse`` accepts (all 20 tasks have one).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from sparsity.tasks.base import Pair, Task

# One token each as " name" in the stdlib BPE (checked by tests through encode).
ANSWER_NAMES = [
    "args", "attr", "base", "block", "char", "child", "client", "cmd", "code", "config",
    "context", "count", "current", "data", "default", "doc", "end", "err", "error",
    "event", "exc", "expected", "file", "filename", "files", "first", "frame", "func",
    "group", "handler", "header", "index", "item", "key", "last", "line", "lines", "log",
    "loop", "message", "method", "mode", "module", "msg", "name", "names", "node", "obj",
    "other", "out", "output", "parser", "path", "pos", "prefix", "result", "root",
    "server", "size", "sock", "source", "spec", "start", "state", "stream", "string",
    "text", "thread", "token", "url", "user", "value", "values", "version", "widget",
]
# One token each as ".attr" (attribute access right after ``self``).
DOT_ATTRS = ["name", "path", "value", "text", "file", "root", "module", "loop"]
# Any plausible identifiers (need not be single tokens).
NAMES = ANSWER_NAMES + [
    "buf", "total", "items", "entry", "record", "row", "col", "width", "height", "offset",
    "queue", "stack", "parent", "target", "label", "flag", "options", "params", "limit",
    "tmp", "seen", "counter", "response", "request", "payload", "chunk",
]
FUNCS = [
    "process", "handle", "update", "parse_line", "load_data", "build", "run", "main",
    "check", "render", "collect", "merge", "compute", "apply", "visit", "setup", "reset",
    "validate", "convert", "format_row", "walk", "scan", "flush", "emit", "normalize",
    "resolve", "dispatch", "transform", "summarize", "filter_items", "get_value",
    "make_key", "read_header", "split_path", "find_node", "count_lines", "encode",
]
CLASSES = [
    "Node", "Config", "Parser", "Record", "Handler", "Client", "Request", "Entry",
    "Widget", "Session", "Buffer", "Token", "Item", "Event", "Task", "Job", "Field",
    "Matrix", "Point", "Frame", "Reader", "Writer", "Cache", "Registry",
]
WORDS = [
    "hello", "world", "error", "done", "default", "ascii", "utf", "name", "value", "ok",
    "failed", "spam", "eggs", "foo", "bar", "data", "result", "invalid", "missing",
    "file", "not", "found", "warning", "start", "stop", "ready", "empty", "total",
    "count", "index", "key", "user", "admin", "test", "debug", "info", "path", "line",
]
PREAMBLE = [
    "import os", "import sys", "import re", "import json", "import logging",
    "from pathlib import Path", "from collections import defaultdict",
    "import itertools", "# helpers", "# TODO: refactor this", "# utilities",
    "DEBUG = False", "MAX_SIZE = 100", "TIMEOUT = 30", "VERSION = 2", "__all__ = []",
    "log = logging.getLogger()", "_cache = {}", "import math", "from typing import Any",
]


def _preamble(rng: random.Random, k: int = 3) -> str:
    """0..k unrelated top-level lines, maybe followed by a blank line."""
    lines = rng.sample(PREAMBLE, rng.randint(0, k))
    if not lines:
        return ""
    return "".join(line + "\n" for line in lines) + ("\n" if rng.random() < 0.5 else "")


def _num(rng: random.Random) -> str:
    return str(rng.choice([0, 1, 2, 3, 5, 8, 10, 16, 42, 64, 100, 255, 1000]))


def _def(rng: random.Random, *args: str) -> str:
    return f"def {rng.choice(FUNCS)}({', '.join(args)}):\n"


def _filler(rng: random.Random, indent: str, avoid: set[str], p: float = 0.5) -> str:
    """An optional unrelated statement (using none of the names in ``avoid``)."""
    if rng.random() >= p:
        return ""
    n = rng.choice([x for x in NAMES if x not in avoid])
    kind = rng.randrange(4)
    if kind == 0:
        return f"{indent}{n} = {_num(rng)}\n"
    if kind == 1:
        return f"{indent}{n} = []\n"
    if kind == 2:
        return f"{indent}# {rng.choice(WORDS)} {rng.choice(WORDS)}\n"
    return f"{indent}{n} = None\n"


def _suffix(text: str) -> Callable[[str], str]:
    def complete(s: str) -> str:
        return s + text

    return complete


def _identity(s: str) -> str:
    return s


# ---------------------------------------------------------------------------------------


def _single_double_quote(rng: random.Random) -> Pair:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    v = rng.choice(NAMES)
    if rng.random() < 0.5:  # inside a function
        head = _preamble(rng) + _def(rng, *rng.sample(NAMES, rng.randint(0, 2)))
        head += _filler(rng, "    ", {v})
        stmt = rng.choice([f"    {v} = ", "    return ", f"    {v} += "])
    else:
        head = _preamble(rng)
        stmt = rng.choice([f"{v} = ", f"{v} += "])
    return Pair(head + stmt + "'" + words, head + stmt + '"' + words, "'\n", '"\n')


def _bracket_counting(rng: random.Random) -> Pair:
    fns = ["len", "str", "int", "abs", "sorted", "list", "sum", "repr", "float", "round", "hash", "bool"]
    f, g, h = rng.choice(fns), rng.choice(fns), rng.choice(fns)
    v, a, b = rng.sample(NAMES, 3)
    op = rng.choice([" + ", " - ", " * ", ", "])
    head = _preamble(rng, 2) + _def(rng, a, b) + _filler(rng, "    ", {v, a, b})
    lhs = rng.choice([f"    {v} = ", "    return "])
    return Pair(
        f"{head}{lhs}{f}({g}({a}){op}{h}({b}",
        f"{head}{lhs}{f}({g}({a})){op}{h}({b}",
        "))\n",
        ")\n",
    )


def _set_or_string_with(rng: random.Random, v: str) -> Pair:
    x, seq = rng.sample([n for n in NAMES if n != v], 2)
    head = _preamble(rng, 1) + _def(rng, seq)
    empty = rng.choice(["''", '""', "str()"])
    mid = _filler(rng, "    ", {v, x, seq}) + f"    for {x} in {seq}:\n"
    if rng.random() < 0.4:
        cond = rng.choice([f"if {x}:", f"if not {x}:", f"if {x} is not None:"])
        tail = f"        {cond}\n            {v}"
    else:
        tail = f"        {v}"
    return Pair(
        f"{head}    {v} = set()\n{mid}{tail}",
        f"{head}    {v} = {empty}\n{mid}{tail}",
        ".add",
        " +=",
    )


def _set_or_string(rng: random.Random) -> Pair:
    return _set_or_string_with(rng, rng.choice(NAMES))


def _set_or_string_fixed(rng: random.Random) -> Pair:
    return _set_or_string_with(rng, "current")


def _with_as(rng: random.Random) -> Pair:
    a, b = rng.sample(ANSWER_NAMES, 2)
    p, d, v = rng.sample([n for n in NAMES if n not in (a, b)], 3)
    ctx = rng.choice([f"open({p})", f"open({p}, 'rb')", f"gzip.open({p})", f"io.StringIO({p})", f"closing({p})"])
    head = _preamble(rng, 2) + _def(rng, p) + f"    {d} = []\n"
    use = rng.choice([f"        {v} =", "        return", f"        {d} ="])

    def prompt(name: str) -> str:
        return f"{head}    with {ctx} as {name}:\n{use}"

    return Pair(prompt(a), prompt(b), " " + a, " " + b)


def _with_open(rng: random.Random) -> Pair:
    obj = rng.choice(["config", "data", "report", "cache", "state", "index", "results", "settings", "json", "log"])
    write = rng.choice(["save", "write", "dump", "store", "export"])
    read = rng.choice(["load", "read", "parse", "restore"])
    q = rng.choice(["'", '"'])
    cls = rng.choice(CLASSES)
    path = rng.choice(["path", "filename", "fname", "dest", "target"])
    pre, fill = _preamble(rng, 2), _filler(rng, "        ", {path})

    def prompt(verb: str) -> str:
        return f"{pre}class {cls}:\n    def {verb}_{obj}(self, {path}):\n{fill}        with open({path}, {q}"

    return Pair(prompt(write), prompt(read), "w", "r")


def _with_open_complete(s: str) -> str:
    return s + s[-2] + ") as f:\n            pass\n"


def _for_while(rng: random.Random) -> Pair:
    a, v = rng.sample(NAMES, 2)
    head = _preamble(rng) + _def(rng, a) + _filler(rng, "    ", {a, v})
    if rng.random() < 0.5:
        head += f"    {v} = {a}\n"
    return Pair(f"{head}    for {v}", f"{head}    while {v}", " in", ":\n")


def _else_elif(rng: random.Random) -> Pair:
    v = rng.choice(ANSWER_NAMES)
    w = rng.choice([n for n in NAMES if n != v])
    cond = rng.choice([
        f"== {_num(rng)}", f"> {_num(rng)}", f"< {_num(rng)}", "is None",
        f"== '{rng.choice(WORDS)}'", f"in ({_num(rng)}, {_num(rng)})",
    ])
    stmt = rng.choice([f"return {_num(rng)}", f"{w} = {_num(rng)}", f"return '{rng.choice(WORDS)}'", "pass", f"{w} += 1"])
    head = _preamble(rng, 2) + _def(rng, v) + _filler(rng, "    ", {v}) + f"    if {v} {cond}:\n        {stmt}\n"
    return Pair(head + "    else", head + "    elif", ":\n", " " + v)


def _if_ternary(rng: random.Random) -> Pair:
    v, a, b = rng.sample(NAMES, 3)
    cond = rng.choice([b, f"not {b}", f"{b} is None", f"{b} is not None", f"{b} > {_num(rng)}", f"{b} == {_num(rng)}"])
    head = _preamble(rng, 2) + _def(rng, a, b) + _filler(rng, "    ", {v, a, b})
    return Pair(f"{head}    {v} = {a} if {cond}", f"{head}    {v} = {a}\n    if {cond}", " else", ":\n")


def _if_equals(rng: random.Random) -> Pair:
    v, a = rng.sample(NAMES, 2)
    head = _preamble(rng) + _def(rng, *rng.sample([v, a], 2)) + _filler(rng, "    ", {v, a})
    return Pair(f"{head}    if {v}", f"{head}    {v}", " ==", " =")


def _fstring_brace(rng: random.Random) -> Pair:
    a, b = rng.sample(NAMES, 2)
    head = _preamble(rng) + _def(rng, a, b) + _filler(rng, "    ", {a, b})
    call = rng.choice(["print(", "log.info(", "print(", "warnings.warn("])
    word = rng.choice(["", rng.choice(WORDS) + " "])
    sep = rng.choice([":", " =", " -", ""])
    start = f"{head}    {call}f\"{word}{{{a}}}{sep}"
    return Pair(f"{start} {{{b}", f"{start}\", {b}", "}", ")\n")


def _bracket_brace(rng: random.Random) -> Pair:
    v = rng.choice(NAMES)
    pool = [n for n in NAMES if n != v]
    elems = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.randrange(3)
        elems.append(_num(rng) if kind == 0 else rng.choice(pool) if kind == 1 else f"len({rng.choice(pool)})")
    if not elems[-1][-1].isalnum():  # end on a name or number, never on ')'
        elems[-1] = rng.choice(pool)
    body = ", ".join(elems)
    if rng.random() < 0.5:
        head = _preamble(rng, 2) + _def(rng, *rng.sample(pool, rng.randint(0, 2))) + _filler(rng, "    ", {v})
        lhs = rng.choice([f"    {v} = ", "    return "])
    else:
        head, lhs = _preamble(rng), f"{v} = "
    return Pair(f"{head}{lhs}[{body}", f"{head}{lhs}{{{body}", "]\n", "}\n")


def _var_swap(rng: random.Random) -> Pair:
    a, b = rng.sample(ANSWER_NAMES, 2)
    head = _preamble(rng) + _def(rng, a, b) + _filler(rng, "    ", {a, b})
    if rng.random() < 0.5:
        cmp_ = rng.choice([">", "<", ">=", "<="])
        head, ind = head + f"    if {a} {cmp_} {b}:\n", "        "
    else:
        ind = "    "
    return Pair(f"{head}{ind}{a}, {b} = {b},", f"{head}{ind}{b}, {a} = {a},", " " + a, " " + b)


def _var_if(rng: random.Random) -> Pair:
    x = rng.choice(NAMES)
    a, b = rng.sample([n for n in ANSWER_NAMES if n != x], 2)
    dflt = rng.choice(["0", "1", "False", "True", "''", _num(rng), "()", "'utf-8'"])
    pre, f = _preamble(rng), rng.choice(FUNCS)
    body = _filler(rng, "    ", {a, b}) + "    if"
    return Pair(
        f"{pre}def {f}({x}, {a}=None, {b}={dflt}):\n{body}",
        f"{pre}def {f}({x}, {a}={dflt}, {b}=None):\n{body}",
        " " + a,
        " " + b,
    )


def _indent_for(rng: random.Random) -> Pair:
    a, x, w = rng.sample(NAMES, 3)
    head = _preamble(rng, 1) + _def(rng, a) + _filler(rng, "    ", {a, x, w})
    block = rng.choice([f"if {a}:", f"if not {a}:", f"with {a}:", f"while {a}:", f"for {w} in {a}:"])
    stmt = rng.choice([f"{w} = {_num(rng)}", f"print({a})", "pass", f"{a}.sort()", f"{w} = []"])
    head += f"    {block}\n        {stmt}\n"
    loop = f"for {x} in {rng.choice([a, f'range({_num(rng)})', f'sorted({a})'])}:\n"
    return Pair(f"{head}    {loop}", f"{head}        {loop}", " " * 7, " " * 11)


def _while_return_true(rng: random.Random) -> Pair:
    a, x = rng.sample(NAMES, 2)
    cond = rng.choice([f"{x} is None", f"not {x}", f"{x} < 0", f"{x} == {_num(rng)}", f"{x} in {a}"])
    pop = rng.choice([f"{a}.pop()", f"{a}.pop(0)", f"next({a})"])
    head = (
        _preamble(rng, 1) + _def(rng, a)
        + f"    while {a}:\n        {x} = {pop}\n        if {cond}:\n            return"
    )
    return Pair(head + " False\n    return", head + " True\n    return", " True", " False")


def _lambda_func(rng: random.Random) -> Pair:
    f = rng.choice(["key", "fn", "func", "callback", "check", "getter", "handler", "transform", "pred", "score"])
    args = ", ".join(rng.sample(NAMES, rng.randint(1, 3)))
    if rng.random() < 0.5:
        head, ind = _preamble(rng) + _def(rng, *rng.sample(NAMES, rng.randint(0, 2))), "    "
    else:
        head, ind = _preamble(rng), ""
    head += _filler(rng, ind, {f})
    return Pair(f"{head}{ind}{f} = lambda {args}", f"{head}{ind}def {f}({args}", ":", "):\n")


def _enumerate_range(rng: random.Random) -> Pair:
    a, x = rng.sample(NAMES, 2)
    i = rng.choice(["i", "idx", "n", "pos", "num", "lineno", "k", "j"])
    head = _preamble(rng) + _def(rng, a) + _filler(rng, "    ", {a, x, i})
    return Pair(f"{head}    for {i}, {x} in", f"{head}    for {i} in", " en", " range")


def _final_kwarg(rng: random.Random) -> Pair:
    k1, k2 = rng.sample(ANSWER_NAMES, 2)
    x, arg, r = rng.sample([n for n in NAMES if n not in (k1, k2)], 3)
    f = rng.choice(FUNCS)
    body = rng.choice([f"return {x}", "pass", f"print({x})"])
    head = f"{_preamble(rng, 2)}def {f}({x}, {k1}={_num(rng)}, {k2}={_num(rng)}):\n    {body}\n\n"
    val = rng.choice([_num(rng), "None", "True", rng.choice(NAMES)])
    return Pair(f"{head}{r} = {f}({arg}, {k1}={val},", f"{head}{r} = {f}({arg}, {k2}={val},", " " + k2, " " + k1)


def _class_init(rng: random.Random) -> Pair:
    b, c = rng.sample(DOT_ATTRS, 2)
    a = rng.choice([n for n in NAMES if n not in DOT_ATTRS])
    cls = rng.choice(CLASSES) + rng.choice(["", "(object)", "(Base)"])
    pre = _preamble(rng, 2)

    def prompt(second: str) -> str:
        return (
            f"{pre}class {cls}:\n    def __init__(self, {a}, {second}):\n"
            f"        self.{a} = {a}\n        self"
        )

    return Pair(prompt(b), prompt(c), "." + b, "." + c)


single_double_quote = Task(
    "single_double_quote",
    "Close a string with the quote that opened it. "
    "Example: `    name = 'hello` → `'\\n` / `    name = \"hello` → `\"\\n`.",
    _single_double_quote,
    _identity,
)
bracket_counting = Task(
    "bracket_counting",
    "Count open parentheses to close a nested call with one or two. "
    "Example: `    x = len(str(a) + str(b` → `))\\n` / `    x = len(str(a)) + str(b` → `)\\n`.",
    _bracket_counting,
    _identity,
)
set_or_string = Task(
    "set_or_string",
    "Accumulate into a variable according to its earlier type: a set gets `.add`, a string "
    "`+=`. Example: `    seen = set()\\n    for x in xs:\\n        seen` → `.add` / "
    "`    seen = ''\\n    for x in xs:\\n        seen` → ` +=`.",
    _set_or_string,
    _suffix("(0)\n"),
)
set_or_string_fixedvarname = Task(
    "set_or_string_fixedvarname",
    "As set_or_string, always with the variable `current`. Example: "
    "`    current = set()\\n    for x in xs:\\n        current` → `.add` / "
    "`    current = \"\"\\n    for x in xs:\\n        current` → ` +=`.",
    _set_or_string_fixed,
    _suffix("(0)\n"),
)
with_as = Task(
    "with_as",
    "Use the name bound by `with ... as` in the block (a distractor list is defined just before). "
    "Example: `    with open(p) as stream:\\n        text =` → ` stream` / "
    "`    with open(p) as source:\\n        text =` → ` source`.",
    _with_as,
    _suffix("\n"),
)
with_open = Task(
    "with_open",
    "Pick the file mode of `open` from the enclosing method's name (save/write/dump vs "
    "load/read/parse). Example: `    def save_config(self, path):\\n        with open(path, '` "
    "→ `w` / `    def load_config(self, path):\\n        with open(path, '` → `r`.",
    _with_open,
    _with_open_complete,
)
for_while = Task(
    "for_while",
    "Continue a loop header according to its keyword: `for x` takes ` in`, `while x` a colon. "
    "Example: `    for node` → ` in` / `    while node` → `:\\n`.",
    _for_while,
    _suffix(" ():\n        pass\n"),
)
else_elif = Task(
    "else_elif",
    "After an if block, `else` takes a colon while `elif` repeats the variable tested by the "
    "`if`. Example: `    if mode > 0:\\n        return 1\\n    else` → `:\\n` / "
    "`    if mode > 0:\\n        return 1\\n    elif` → ` mode`.",
    _else_elif,
    _suffix("        pass\n"),
)
if_ternary = Task(
    "if_ternary",
    "An `if` inside an assignment is a conditional expression (needs ` else`), on its own line "
    "a statement (needs a colon). Example: `    x = a if flag` → ` else` / "
    "`    x = a\\n    if flag` → `:\\n`.",
    _if_ternary,
    _suffix(" None\n"),
)
if_equals = Task(
    "if_equals",
    "A name after `if` is compared with ` ==`, a name starting a statement is assigned with ` =`. "
    "Example: `    if count` → ` ==` / `    count` → ` =`.",
    _if_equals,
    _suffix(" 0:\n        pass\n"),
)
fstring_brace = Task(
    "fstring_brace",
    "Inside an f-string replacement field a name is followed by `}`; after the string is "
    "closed, the call is closed. Example: `    print(f\"{key}: {value` → `}` / "
    "`    print(f\"{key}:\", value` → `)\\n`.",
    _fstring_brace,
    _suffix("\")\n"),
)
bracket_brace = Task(
    "bracket_brace",
    "Close a display with the bracket that opened it: `]` for a list, `}` for a set. "
    "Example: `    x = [1, count, 2` → `]\\n` / `    x = {1, count, 2` → `}\\n`.",
    _bracket_brace,
    _identity,
)
var_swap = Task(
    "var_swap",
    "Finish a tuple swap with the first name on the left. "
    "Example: `    lo, hi = hi,` → ` lo` (names from a list) / `    hi, lo = lo,` → ` hi`.",
    _var_swap,
    _suffix("\n"),
)
var_if = Task(
    "var_if",
    "Test the parameter whose default is None (`if x is None`). Example: "
    "`def f(a, mode=None, size=0):\\n    if` → ` mode` / "
    "`def f(a, mode=0, size=None):\\n    if` → ` size`.",
    _var_if,
    _suffix(" is None:\n        pass\n"),
)
indent_for = Task(
    "indent_for",
    "Indent a for-loop body one level deeper than the `for` line, which sits at depth 1 or 2 "
    "after an if/with/while block (the answer is the indentation token: 7 or 11 spaces, the "
    "last space joining the next word). Example: `    if a:\\n        pass\\n    for x in a:\\n` "
    "→ 7 spaces / `    if a:\\n        pass\\n        for x in a:\\n` → 11 spaces.",
    _indent_for,
    _suffix(" pass\n"),
)
while_return_true = Task(
    "while_return_true",
    "A function whose while loop returns early with one boolean returns the other one after "
    "the loop. Example: `    while q:\\n        x = q.pop()\\n        if x < 0:\\n            "
    "return False\\n    return` → ` True` / (`return True` in the loop) → ` False`.",
    _while_return_true,
    _suffix("\n"),
)
lambda_func = Task(
    "lambda_func",
    "Parameters of a lambda end with `:`, those of a def with `):\\n`. "
    "Example: `    key = lambda item` → `:` / `    def key(item` → `):\\n`.",
    _lambda_func,
    _suffix(" None\n"),
)
enumerate_range = Task(
    "enumerate_range",
    "A loop unpacking two names iterates over `enumerate` (first token ` en`), one index "
    "name over `range`. Example: `    for i, item in` → ` en` / `    for i in` → ` range`.",
    _enumerate_range,
    _suffix("umerate([]):\n        pass\n"),
)
final_kwarg = Task(
    "final_kwarg",
    "In a call, the last keyword argument is the defined keyword not yet passed. Example: "
    "`def f(x, mode=1, size=2):\\n    pass\\n\\nr = f(y, mode=3,` → ` size` / "
    "`... r = f(y, size=3,` → ` mode`.",
    _final_kwarg,
    _suffix("=0)\n"),
)
class_init = Task(
    "class_init",
    "In `__init__`, store the parameter not yet stored on self. Example: "
    "`    def __init__(self, count, name):\\n        self.count = count\\n        self` → "
    "`.name` / (with parameter `path`) → `.path`.",
    _class_init,
    _suffix(" = None\n"),
)

REGISTRY: dict[str, Task] = {
    t.name: t
    for t in (
        single_double_quote, bracket_counting, set_or_string, set_or_string_fixedvarname,
        with_as, with_open, for_while, else_elif, if_ternary, if_equals, fstring_brace,
        bracket_brace, var_swap, var_if, indent_for, while_return_true, lambda_func,
        enumerate_range, final_kwarg, class_init,
    )
}
