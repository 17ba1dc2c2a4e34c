"""csp tokenizer …: train and inspect the byte-level BPE."""

from __future__ import annotations

from typing import Annotated

import typer

from cli._app import group
from cluster import sources, storage
from sparsity import tokenizer as tok_lib

app = group("Train and inspect the 2048-token BPE (trained locally; nothing is downloaded).")


@app.command()
def build(
    out: Annotated[str, typer.Option(help="Directory or s3:// prefix to write tokenizer.tiktoken + tokenizer.json to.")],
    corpus: Annotated[str | None, typer.Option(help="Directory, glob or s3:// prefix of .py files (default: this Python's stdlib).")] = None,
    vocab_size: Annotated[int, typer.Option(help="Number of token ids, <|endoftext|> included (the last id).")] = tok_lib.DEFAULT_VOCAB_SIZE,
) -> None:
    """Train a byte-level BPE on the train split of a corpus and save it."""
    tok, stats = sources.build_tokenizer(corpus, vocab_size=vocab_size)
    sources.save_tokenizer(tok, out)
    skipped = sum(stats.skipped.values())
    typer.echo(f"trained {tok.n_vocab}-token BPE on {stats.files} files ({stats.bytes / 1e6:.1f} MB, {skipped} skipped) → {storage.resolve(out).uri}")
    typer.echo(f"sha256 {tok.fingerprint}")


@app.command()
def info(
    path: Annotated[str, typer.Argument(help="Tokenizer directory, or a dataset made by `csp data prepare`.")],
    text: Annotated[str | None, typer.Option(help="Also show how this text tokenizes.")] = None,
) -> None:
    """Show a tokenizer's size, special tokens and fingerprint."""
    tok = sources.load_tokenizer(path)
    m = tok.meta
    typer.echo(f"vocab_size  {tok.n_vocab} (<|endoftext|> = {tok.eot_id})")
    typer.echo(f"trainer     {m.get('trainer', '?')}")
    typer.echo(f"sha256      {tok.fingerprint}")
    typer.echo(f"corpus      {m.get('corpus_fingerprint', '')[:16] or '?'}")
    if text is not None:
        ids = tok.encode(text)
        pieces = [tok.encoding.decode_single_token_bytes(i).decode("utf-8", "replace") for i in ids]
        typer.echo(f"{len(ids)} tokens: " + " ".join(f"{i}:{p!r}" for i, p in zip(ids, pieces, strict=True)))
