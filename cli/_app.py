"""The one place where errors become messages and exit codes (fastapi-cli's habit).

Every ``csp`` group is a ``typer.Typer(cls=CspGroup)``. The root group's ``main`` runs
the command with click's standalone mode off, so a usage error or a CspError arrives here
as an exception and leaves as one line on stderr and exit code 2 — no traceback, no rich
box. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
import sys
from enum import Enum

import typer
from typer.core import TyperGroup

from sparsity.errors import CspError

# Typer ships its own copy of click; reach its exception classes through the public
# BadParameter rather than a private module path.
UsageError = typer.BadParameter.__mro__[1]
ClickException = UsageError.__mro__[1]
Abort = typer.Abort


def choice(name: str, values) -> type[Enum]:
    """An Enum of string ``values`` for a typer option: help lists them, click validates them."""
    return Enum(name, [(v, v) for v in values], type=str)


FORMATS = ("table", "csv", "json")
Format = choice("Format", FORMATS)  # every listing command: one row per item
DetailFormat = choice("DetailFormat", ("table", "json"))  # the info commands: one nested record


def strict_json(value):
    """``value`` with every missing or non-finite number as None (JSON's null): pandas and
    numpy give NaN, NaT and <NA>, which ``json.dumps`` would write as the non-JSON ``NaN``;
    numpy scalars become Python ones."""
    import math

    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    item = getattr(value, "item", None)  # a numpy scalar
    if callable(item) and getattr(value, "ndim", None) == 0:
        return strict_json(item())
    if getattr(value, "ndim", None) == 1 and callable(getattr(value, "tolist", None)):  # a list cell read back from Parquet
        return strict_json(value.tolist())
    return value


MISSING = "—"  # how a table shows a missing value, whatever its type (NaN, <NA>, None)


def table_text(df, **kw) -> str:
    """A DataFrame as an aligned table with one marker (:data:`MISSING`) for every missing
    value — a float's NaN, a nullable column's <NA> and an object's None alike."""
    import pandas as pd

    out = df.copy()
    for c in out.columns:
        dtype = out[c].dtype
        if pd.api.types.is_object_dtype(dtype) or (isinstance(dtype, pd.api.extensions.ExtensionDtype) and not isinstance(dtype, pd.CategoricalDtype | pd.StringDtype)):
            # the marker itself in place of <NA> and None: pandas prints an object column's None as "None", not na_rep
            out[c] = out[c].astype(object).where(out[c].notna(), MISSING)
    return out.to_string(index=False, na_rep=MISSING, **kw)


def emit(rows, fmt, table: str | None = None, empty: str = "(no rows)") -> None:
    """Print ``rows`` (a DataFrame or a list of flat dicts) as ``--format`` says: csv (empty
    cells for missing values) and json (null) from the rows; table as ``table`` when given,
    else the rows aligned with one missing-value marker, or ``empty`` when there are none."""
    import json

    fmt = getattr(fmt, "value", fmt)
    if fmt == "json":
        records = rows.to_dict(orient="records") if hasattr(rows, "to_dict") else rows
        typer.echo(json.dumps(strict_json(records), indent=2, default=str, allow_nan=False))
        return
    if fmt == "csv":
        import csv
        import io

        if hasattr(rows, "to_csv"):
            typer.echo(rows.to_csv(index=False), nl=False)
            return
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        typer.echo(buf.getvalue(), nl=False)
        return
    if table is not None:
        typer.echo(table)
    elif hasattr(rows, "to_string"):
        typer.echo(table_text(rows) if len(rows) else empty)
    else:
        def cell(v) -> str:
            missing = v is None or type(v).__name__ == "NAType" or (isinstance(v, float) and v != v)  # v != v: NaN
            return MISSING if missing else str(v)

        width = {k: max(len(k), *(len(cell(r[k])) for r in rows)) for k in (rows[0] if rows else {})}
        typer.echo("\n".join("  ".join(f"{cell(r[k]):<{w}}" for k, w in width.items()) for r in rows) if rows else empty)


def _say(line: str) -> None:
    typer.echo(" ".join(line.split()), err=True)


# Library errors name config fields ("batch_size=7 out of range: …"); at the command line
# the user typed flags, so the message names the flag they typed ("--batch 7 out of range").
FIELD_FLAGS = {
    "batch_size": "--batch", "block_size": "--n-ctx", "n_ctx": "--n-ctx", "pfrac": "--pfrac", "ef": "--ef",
    "ef_mlp": "--ef-mlp", "afrac": "--afrac", "steps": "--steps", "lr": "--lr", "optimizer": "--optimizer",
    "n_layer": "--n-layer", "d_model": "--d-model", "n_head": "--n-head", "d_head": "--d-head", "seed": "--seed",
    "eval_every": "--eval-every", "ckpt_every": "--ckpt-every", "milestones": "--milestones", "target": "--target", "ablation": "--ablation",
    "k_coef": "--k-coef", "warmup_frac": "--warmup-frac", "grad_clip_rms": "--grad-clip-rms", "device": "--device", "vocab_size": "--vocab-size", "val_fraction": "--val-fraction",
    "workers": "--workers", "placement": "--placement", "stop_window": "--stop-window", "stop_open_tol": "--stop-open-tol",
}
_FIELD_RE = re.compile(r"^(\w+)=(\S+)(?= )")


def flag_message(message: str) -> str:
    """``field=value …`` → ``--flag value …`` for the fields that are flags."""
    m = _FIELD_RE.match(message)
    if m and m.group(1) in FIELD_FLAGS:
        return f"{FIELD_FLAGS[m.group(1)]} {m.group(2)}{message[m.end(2):]}"
    return message


# Commands that keep finished work and pick up after it when run again with the same arguments.
RESUMABLE = ("demo", "train", "sweep", "prune", "data prepare")


def _resume_hint(args: list[str]) -> str:
    """What a user interrupted in ``csp ARGS`` can do next: run it again where that resumes."""
    words = [a for a in args if not a.startswith("-")][:2]
    command = next((c for c in RESUMABLE if c.split() == words[: len(c.split())]), None)
    if command is None or words[:2] == ["sweep", "status"]:
        return ""
    return f"; run the same command again to resume (csp {command} keeps what it finished)"


class CspGroup(TyperGroup):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        self._argv = sys.argv[1:] if args is None else list(args)  # what the Ctrl-C line names
        try:
            rv = super().main(args=args, prog_name=prog_name or "csp", complete_var=complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        except UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as click prints it
                typer.echo(e.format_message(), err=True)
                code = 2
                return self._finish(code, standalone_mode)
            where = e.ctx.command_path if e.ctx is not None else "csp"
            msg = e.format_message().replace("Value error, ", "")  # click's wording for an enum choice
            _say(f"{where}: error: {msg} (see '{where} --help')")
            code = 2
        except ClickException as e:
            _say(f"csp: error: {e.format_message()}")
            code = e.exit_code
        except Abort:
            _say("csp: aborted")
            code = 1
        except CspError as e:
            _say(f"csp: error: {flag_message(str(e))}")
            code = e.exit_code
        return self._finish(code, standalone_mode)

    def invoke(self, ctx):
        """The command; Ctrl-C leaves one line saying what to do next (typer then exits 130)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if ctx.parent is None:  # the root: subgroups pass it up
                _say(f"csp: interrupted{_resume_hint(self._argv)}")
            raise

    @staticmethod
    def _finish(code: int, standalone_mode: bool) -> int:
        if standalone_mode:
            sys.exit(code)
        return code


def group(help: str | None = None, completion: bool = False) -> typer.Typer:
    """A command group with csp's error handling, ``-h`` as well as ``--help``, and shell
    completion options only where asked (the root)."""
    return typer.Typer(
        cls=CspGroup,
        help=help,
        no_args_is_help=True,
        add_completion=completion,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def version() -> str:
    """csp's package version, with the git commit (and .dirty) when run from a checkout."""
    from sparsity.version import code_version

    return f"csp {code_version()}"


SHARED_FS_HELP = ("On a cluster of several nodes, accept local paths: they are on a filesystem every node mounts "
                  "(default: refuse them and ask for s3://).")
TAKE_OVER_HELP = ("Take over --out from a writer whose heartbeat stopped (a run killed on another machine; one killed "
                  "on this machine is taken over by itself); a live writer is never displaced.")
