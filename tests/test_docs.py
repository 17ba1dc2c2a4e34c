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
