"""csp data …: corpus → tokenizer → Parquet token shards, and what a dataset holds."""

from __future__ import annotations

from typing import Annotated

import typer

from cli._app import SHARED_FS_HELP, DetailFormat, emit, group
from cli._progress import bar
from cluster import data, runtime, sources, storage
from sparsity.errors import RUNTIME

app = group("Tokenize a corpus into Parquet shards of fixed-length sequences.")


@app.command()
def prepare(
    out: Annotated[str, typer.Option(help="Local directory or s3://bucket/prefix for the dataset.")],
    corpus: Annotated[str | None, typer.Option(help="Directory, glob or s3:// prefix of .py files (default: this Python's stdlib).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer to use (directory or URI); trained into OUT/tokenizer when omitted.")] = None,
    n_ctx: Annotated[int, typer.Option(help="Context length; each stored row has n_ctx+1 tokens.")] = data.DEFAULT_N_CTX,
    val_fraction: Annotated[float, typer.Option(help="Fraction of files (by path hash) held out for validation.")] = 0.02,
    shard_mb: Annotated[float, typer.Option(help="Source megabytes per shard.")] = data.DEFAULT_SHARD_BYTES / 1e6,
    workers: Annotated[int | None, typer.Option(help="Shard-writing Ray tasks in flight (default: the cluster's CPUs).")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: an in-process Ray).")] = None,
    shared_fs: Annotated[bool, typer.Option("--shared-fs", help=SHARED_FS_HELP)] = False,
) -> None:
    """Tokenize a corpus into Parquet shards; re-running skips finished shards."""
    if shard_mb <= 0:
        raise typer.BadParameter(f"--shard-mb must be > 0, got {shard_mb}")
    if workers is not None and workers < 1:
        raise typer.BadParameter(f"--workers must be ≥ 1, got {workers}")
    data.check_prepare_args(n_ctx, val_fraction, int(shard_mb * 1e6))  # every check before Ray starts
    storage.check_writable(out)  # a malformed, unreachable or read-only --out fails in seconds, before any compute
    runtime.init(address=address, storage={"--out": out, "--corpus": corpus, "--tokenizer": tokenizer}, shared_fs=shared_fs)
    with bar("shards") as update:
        result = data.prepare(
            corpus, out, tokenizer=tokenizer, n_ctx=n_ctx, val_fraction=val_fraction,
            shard_bytes=int(shard_mb * 1e6), workers=workers, progress=update,
        )
    if result.tokenizer_trained:
        typer.echo(f"trained tokenizer → {storage.resolve(out).join(sources.TOKENIZER_DIR).uri}")
    typer.echo(f"wrote {result.shards_written} shards, {result.shards_skipped} already done → {storage.resolve(out).uri}")
    typer.echo(manifest_summary(result.manifest))


@app.command()
def info(
    uri: Annotated[str, typer.Argument(help="A dataset written by `csp data prepare`.")],
    fmt: Annotated[DetailFormat, typer.Option("--format", help="table, or json (the whole manifest).")] = "table",
) -> None:
    """Summarise a dataset: corpus, tokenizer, shards, sequences and tokens per split."""
    m = data.read_manifest(uri)
    emit(m, fmt, table=manifest_summary(m))


@app.command()
def verify(
    uri: Annotated[str, typer.Argument(help="A dataset written by `csp data prepare`.")],
    fmt: Annotated[DetailFormat, typer.Option("--format", help="table, or json (every problem found).")] = "table",
) -> None:
    """Read every shard back against the manifest: present, of the size and checksum it was
    written with, a readable Parquet footer and the right row count. Exit 1 on any problem."""
    with bar("shards") as update:
        report = data.verify(uri, progress=update)
    emit(report, fmt, table=verify_summary(report))
    if report["problems"]:
        raise sources.DataError(
            f"{len(report['problems'])} damaged or missing file(s) in {report['uri']}: "
            f"delete them and re-run `csp data prepare --out {report['uri']}` with the same arguments to rewrite them",
            exit_code=RUNTIME,
        )


def manifest_summary(manifest: dict) -> str:
    """A few readable lines about a dataset."""
    lines = [
        f"corpus     {manifest['corpus']['source']}  ({manifest['corpus']['files']} files, val_fraction {manifest['corpus']['val_fraction']})",
        f"tokenizer  vocab {manifest['tokenizer']['vocab_size']}, eot {manifest['tokenizer']['eot_id']}, sha256 {manifest['tokenizer']['fingerprint'][:12]}",
        f"sequences  n_ctx {manifest['n_ctx']} (+1 target token per row)",
    ]
    for split, s in manifest["splits"].items():
        lines.append(f"{split:<10} {len(s['shards'])} shards, {s['sequences']:,} sequences, {s['tokens']:,} tokens, {s['documents']:,} files")
    lines += [f"warning    {w}" for w in manifest.get("warnings", [])]
    return "\n".join(lines)


def verify_summary(report: dict) -> str:
    """One line per problem, then a summary line."""
    width = max((len(p["path"]) for p in report["problems"]), default=0)
    lines = [f"{p['path']:<{width}}  {p['problem']}" for p in report["problems"]]
    if report["problems"]:
        lines.append(f"{len(report['problems'])} problem(s) in {report['uri']} ({report['shards']} shards checked)")
    else:
        lines.append(f"ok: {report['shards']} shards, {report['sequences']:,} sequences in {report['uri']} match the manifest")
    return "\n".join(lines)
