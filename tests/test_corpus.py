import pytest

from sparsity import corpus
from sparsity.errors import CorpusError


def test_default_corpus_is_the_stdlib_without_site_packages(stdlib_files):
    """The default corpus is this interpreter's stdlib (~1,800 .py files), minus site-packages."""
    assert 1000 < len(stdlib_files) < 5000
    assert all(f.rel.endswith(".py") for f in stdlib_files)
    assert not any("site-packages" in f.rel.split("/") for f in stdlib_files)
    assert [f.rel for f in stdlib_files] == sorted(f.rel for f in stdlib_files)


def test_directory_glob_and_single_file_sources(small_corpus):
    """A directory, a glob and a single file each list exactly their .py files."""
    by_dir = corpus.list_files(small_corpus)
    by_glob = corpus.list_files(f"{small_corpus}/json/**/*.py")
    one = corpus.list_files(small_corpus / "json" / "decoder.py")
    assert {f.path for f in by_glob} == {f.path for f in by_dir if f.rel.startswith("json/")}
    assert "decoder.py" in {f.rel for f in by_glob}  # names are relative to the glob's fixed root
    assert [f.rel for f in one] == ["decoder.py"]
    assert "binary.py" in {f.rel for f in by_dir}


def test_unreadable_and_non_utf8_files_are_counted_not_raised(small_corpus):
    """Binary and Latin-1 files are skipped and counted by reason; readable ones are read."""
    files = corpus.list_files(small_corpus)
    stats = corpus.CorpusStats()
    texts = list(corpus.iter_texts(files, stats))
    assert stats.skipped == {"binary": 1, "not_utf8": 1}
    assert stats.files == len(texts) == len(files) - 2


def test_missing_and_empty_sources_give_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="corpus not found"):
        corpus.list_files(tmp_path / "nope")
    (tmp_path / "README.txt").write_text("no python here")
    with pytest.raises(CorpusError, match="no .py files"):
        corpus.list_files(tmp_path)
    with pytest.raises(CorpusError, match="no .py files"):
        corpus.list_files(f"{tmp_path}/**/*.py")


def test_split_is_a_stable_function_of_the_relative_path(stdlib_files):
    """The split depends only on the relative path and sends ~2% of the stdlib to val."""
    split = corpus.split_files(stdlib_files)
    frac = len(split["val"]) / len(stdlib_files)
    assert 0.01 < frac < 0.035
    assert corpus.split_of("json/decoder.py") == corpus.split_of("json/decoder.py")
    moved = [corpus.SourceFile("/elsewhere/" + f.rel, f.rel) for f in split["val"]]
    assert corpus.split_files(moved)["val"] == moved


def test_fingerprint_changes_with_content(small_corpus, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(small_corpus, copy)
    a = corpus.fingerprint(corpus.list_files(copy))
    assert a == corpus.fingerprint(corpus.list_files(small_corpus))
    (copy / "json" / "decoder.py").write_text("x = 1\n")
    assert corpus.fingerprint(corpus.list_files(copy)) != a
