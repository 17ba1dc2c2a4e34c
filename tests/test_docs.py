"""The docs a reader is pointed at exist: every document named in the code, the README and
docs/, and every relative link in them, is a file of the repository."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ["README.md", *(str(p.relative_to(ROOT)) for d in ("cli", "cluster", "jobs", "sparsity", "benchmarks", "tests", "docs")
                         for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".md", ".j2"))]
# a document named in text: anything under docs/, or an all-caps name such as README.md;
# lower-case names elsewhere are output files a command writes (--table t.md)
NAMED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*docs/[\w/-]+\.md|(?:[\w-]+/)*[A-Z][A-Z_-]*\.md)\b")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # a markdown link's target


def _exists(name: str, where: pathlib.Path) -> bool:
    return any((base / name).exists() for base in (ROOT, where.parent, ROOT / "docs"))


def test_every_document_named_or_linked_is_in_the_repository():
    missing = []
    for rel in SOURCES:
        path = ROOT / rel
        text = path.read_text(encoding="utf-8")
        names = set(NAMED.findall(text))
        if path.suffix == ".md":
            names |= {t for t in LINK.findall(text) if "://" not in t and not t.startswith("mailto:")}
        missing += [f"{rel}: {n}" for n in sorted(names) if not _exists(n, path)]
    assert not missing, "documents named but not in the repository:\n" + "\n".join(missing)
    assert len(SOURCES) > 50  # the scan reached the code, not just the README


# --- the README's commands run ------------------------------------------------------------

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
CODE_SPAN = re.compile(r"`(csp [^`]+)`")


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall((ROOT / "README.md").read_text(encoding="utf-8")) if kind == lang]


def _csp_lines(block: str) -> list[str]:
    """The `csp …` command lines of a shell block, comments and continuations resolved."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("csp "):
            out.append(line)
    return out


def test_readme_shell_and_python_snippets_run_on_a_demo_store(quick_demo, monkeypatch):
    """Every `csp` line of the README's shell blocks that reads the demo's outputs, and every
    Python block that reads Parquet, runs against a real (quick) demo store: exit 0, no
    traceback. Commands that need a cluster or S3 (`--address`, `s3://`) are checked by
    the option test below instead; they are run by the cluster and S3 tests."""
    import shlex

    from typer.testing import CliRunner

    from cli.main import app

    out, _ = quick_demo
    monkeypatch.chdir(out.parent)  # the snippets name ./csp-runs/…
    assert out.name == "csp-runs"
    ran = []
    for block in _blocks("bash"):
        for line in _csp_lines(block):
            if "--address" in line or "s3://" in line:
                continue
            r = CliRunner().invoke(app, shlex.split(line)[1:])
            assert r.exit_code == 0, (line, r.output, r.exception)
            assert r.stdout.strip(), line  # every command shows something
            ran.append(line)
    assert len(ran) >= 5 and any(line.startswith("csp results circuits") for line in ran)
    py = [b for b in _blocks("python") if "read_parquet" in b]
    assert py, "the README shows no pandas snippet"
    for block in py:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102
        frames = [v for v in scope.values() if type(v).__name__ == "DataFrame"]
        assert frames and all(len(f.columns) for f in frames)
    assert len(scope["models"]) == len(__import__("jobs.demo", fromlist=["quick_plan"]).quick_plan().models)
    assert {"n_nodes", "n_edges", "task"} <= set(scope["circuits"].columns)
    assert (out.parent / "figs" / "frontier.png").exists()


def _command(root, words: list[str]):
    """The click command `words` names under `root`, and the words left over."""
    cmd = root
    while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
        cmd, words = cmd.commands[words[0]], words[1:]
    return cmd, words


def test_every_csp_command_the_readme_names_exists_with_the_options_it_shows():
    """Each `csp …` the README names — in its tables and its blocks — is a real command, and
    every `--option` it shows is one of that command's options, so the front page cannot
    drift from the CLI."""
    import typer

    from cli.main import app

    root = typer.main.get_command(app)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    mentions = [m.replace("\\|", "|") for m in CODE_SPAN.findall(text)]
    for block in _blocks("bash"):
        mentions += _csp_lines(block)
    # a table cell may hold two commands: `csp a` / `csp b`; a submit line wraps another
    mentions = [part.split(" -- ", 1)[0] for m in mentions for part in m.split(" / csp ")]
    assert len(mentions) >= 15
    bad = []
    for m in mentions:
        words = m.split()[1:]
        cmd, rest = _command(root, [w for w in words if not w.startswith("[")])
        if cmd is root or (hasattr(cmd, "commands") and not getattr(cmd, "invoke_without_command", False)):
            bad.append(f"{m}: not a command")
            continue
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for w in rest:
            name = w.strip("[]").split("=", 1)[0]
            if name.startswith("--") and name not in opts:
                bad.append(f"{m}: {cmd.name} has no option {name}")
    assert not bad, "\n".join(bad)
