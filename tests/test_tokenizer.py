import pytest
import rustbpe

from sparsity import corpus, tokenizer
from sparsity.errors import TokenizerError


def _stdlib_texts(files):
    return list(corpus.iter_texts(files))


def test_exactly_2048_ids_with_endoftext_last(stdlib_tokenizer):
    """The vocabulary has exactly 2048 ids: 0..2046 are byte sequences, 2047 is <|endoftext|>."""
    enc = stdlib_tokenizer.encoding
    assert enc.n_vocab == 2048 and stdlib_tokenizer.eot_id == 2047
    assert enc.encode("<|endoftext|>", allowed_special="all") == [2047]
    pieces = {enc.decode_single_token_bytes(i) for i in range(2047)}
    assert len(pieces) == 2047  # every id decodes, and to a distinct byte string
    assert all(bytes([b]) in pieces for b in range(256))


def test_training_is_deterministic_byte_for_byte(stdlib_files, stdlib_tokenizer):
    """Training twice on the same corpus gives byte-identical tokenizer files."""
    from cluster import sources

    again, _ = sources.build_tokenizer(None)
    assert again.to_files() == stdlib_tokenizer.to_files()


def test_round_trip_on_every_stdlib_file(stdlib_files, stdlib_tokenizer):
    """decode(encode(text)) == text for every readable stdlib file."""
    texts = _stdlib_texts(stdlib_files)
    ids = stdlib_tokenizer.encode_batch(texts)
    bad = [f for f, t, i in zip(stdlib_files, texts, ids, strict=False) if stdlib_tokenizer.decode(i) != t]
    assert len(texts) > 1000 and bad == []


def test_trainer_and_tiktoken_agree_on_every_stdlib_file(stdlib_files, stdlib_tokenizer):
    """rustbpe trained independently learns the same ranks and encodes every file exactly like tiktoken."""
    texts = _stdlib_texts(stdlib_files)
    train_texts = [t for f, t in zip(stdlib_files, texts, strict=False) if corpus.split_of(f.rel) == "train"]
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(_stdlib_texts([f for f in stdlib_files if corpus.split_of(f.rel) == "train"])), vocab_size=2047, pattern=tokenizer.PAT_STR)
    assert dict(trainer.get_mergeable_ranks()) == stdlib_tokenizer.encoding._mergeable_ranks
    assert len(train_texts) > 1000
    ours = stdlib_tokenizer.encode_batch(texts)
    theirs = trainer.batch_encode(texts)
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if list(a) != list(b)]
    assert mismatched == []


def test_closing_quote_merges_with_newline(stdlib_tokenizer):
    """The pat_str lets a closing quote absorb the newline (the quote task relies on it)."""
    enc = stdlib_tokenizer.encoding
    single = [enc.decode_single_token_bytes(i) for i in stdlib_tokenizer.encode("x = 'abc'\n")]
    double = [enc.decode_single_token_bytes(i) for i in stdlib_tokenizer.encode('x = "abc"\n')]
    assert single[-1] == b"'\n" and double[-1] == b'"\n'


def test_save_load_round_trip_and_rebuild_at_same_path(stdlib_tokenizer, small_corpus, tmp_path):
    """Saving then loading gives the same encoding; a different tokenizer saved to the same
    path loads as the new one (no stale cache)."""
    stdlib_tokenizer.save(tmp_path)
    loaded = tokenizer.load(tmp_path)
    sample = "def f(x):\n    return x + 1\n"
    assert loaded.encode(sample) == stdlib_tokenizer.encode(sample)
    assert loaded.fingerprint == stdlib_tokenizer.fingerprint

    small = tokenizer.train(corpus.iter_texts(corpus.list_files(small_corpus)), vocab_size=600)
    small.save(tmp_path)
    reloaded = tokenizer.load(tmp_path)
    assert reloaded.n_vocab == 600 and reloaded.fingerprint == small.fingerprint


@pytest.mark.parametrize("damage", ["truncate", "bad_json", "missing_ranks", "edited_rank"])
def test_damaged_tokenizer_files_fail_clearly(stdlib_tokenizer, tmp_path, damage):
    stdlib_tokenizer.save(tmp_path)
    ranks, meta = tmp_path / tokenizer.RANKS_FILE, tmp_path / tokenizer.META_FILE
    if damage == "truncate":
        ranks.write_bytes(ranks.read_bytes()[:1000])
    elif damage == "bad_json":
        meta.write_text("{not json")
    elif damage == "missing_ranks":
        ranks.unlink()
    else:
        ranks.write_bytes(ranks.read_bytes().replace(b" 300\n", b" 301\n", 1))
    with pytest.raises(TokenizerError) as e:
        tokenizer.load(tmp_path)
    assert "\n" not in str(e.value)


def test_corpus_too_small_for_the_vocabulary_is_an_error():
    with pytest.raises(TokenizerError, match="corpus too small"):
        tokenizer.train(["x = 1\n"] * 3, vocab_size=2048)
    with pytest.raises(TokenizerError, match="vocab_size"):
        tokenizer.train(["x = 1\n"], vocab_size=100)
