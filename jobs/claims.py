"""The paper's two frontier claims, checked on one run's models from verified circuits only:
at equal width, sparser weights give smaller circuits; at equal nonzeros, the wider model is
better on both axes. Each claim line ends in its verdict, judged against the noise one
model shows between two seeds; :func:`claim_verdict` reads that verdict back for the
report's opening block."""

from __future__ import annotations

import math


def density_label(d: float) -> str:
    """A weight density in words: 'dense' or '1/n'."""
    return "dense" if d >= 1 else f"1/{round(1 / d)}"


def frontier_claims(summary, circ=None) -> list[str]:
    """The paper's two frontier claims, checked on this run's models from verified circuits
    only:

    1. at equal width, sparser weights give smaller circuits;
    2. at equal nonzeros, the wider model is better on both axes (lower val loss, smaller
       circuits): the frontier moves outward.

    Circuit sizes are compared on the same tasks: the geometric mean of edges over the tasks
    verified in every model compared (``circ``: the real circuits, one row per model and
    task); models whose verified circuits are for different tasks cannot be compared, and
    the claim says so. Without ``circ``, each model's ``geomean_edges`` over its own tasks.

    Where the plan trained a point at two seeds, their difference is the noise scale: a
    difference smaller than it is reported as within noise. Circuit sizes are compared as
    ratios (on a log scale, as the geometric mean that summarises them): two seeds' circuits
    of 300 and 400 edges differ as much as 30 and 40 do, so a difference counts by its factor,
    not by its edges."""
    df = summary[summary["model_id"].notna()]
    ok = circ[(circ["status"] == "ok") & circ["control"].isna()] if circ is not None else None
    seed0 = df[df["seed"] == 0] if "seed" in df else df
    noise_loss, noise_size = _seed_noise(df, ok)
    out = []
    if "seed" in df and (df["seed"] != 0).any():
        edges_txt = (f"geomean edges {_factor(noise_size)}" if noise_size is not None else
                     "geomean edges: not both have a verified circuit for a common task")
        out.append(f"Seed noise (one point at two seeds): val loss ±{noise_loss:.3f}, {edges_txt}.")
    out += _sparser_claims(seed0, ok, noise_size)
    out += _wider_claims(seed0, ok, noise_loss, noise_size)
    return out


def _log_size(edges: float) -> float:
    """A circuit size on the log scale its noise and differences are read on (a 0-edge size counts as 1)."""
    return math.log(max(edges, 1.0))


def _factor(log_ratio: float) -> str:
    """A size difference on the log scale, as the factor it is: '×2.74'."""
    return f"×{math.exp(abs(log_ratio)):.2f}"


def _common_sizes(ok, models) -> tuple[list[float], list[str]] | None:
    """Geomean edges of each model over the tasks all of them verified (``ok``: the verified
    real circuits), and those tasks; None when some model has no verified circuit or no task
    is common. Without ``ok``, each model's own ``geomean_edges`` and no tasks."""
    import numpy as np

    if ok is None:
        e = [float(m["geomean_edges"]) for m in models]
        return None if any(math.isnan(v) for v in e) else (e, [])
    per = [ok[ok["model_id"] == m["model_id"]] for m in models]
    common = sorted(set.intersection(*(set(p["task"]) for p in per)))
    if not common:
        return None
    return [float(np.exp(np.log(p[p["task"].isin(common)]["n_edges"].clip(lower=1).astype(float)).mean())) for p in per], common


def _on(tasks: list[str]) -> str:
    return f" on {', '.join(tasks)}" if tasks else ""


def _seed_noise(df, ok) -> tuple[float, float | None]:
    """(val loss, log of geomean edges): the largest difference between two seeds of one
    point; the second None when no point has two seeds with a verified circuit for a common task."""
    noise_loss, noise_size = 0.0, None
    if "seed" in df:
        for _, grp in df.groupby(["pfrac", "ef"]):
            if grp["seed"].nunique() > 1:
                noise_loss = max(noise_loss, float(grp["val_loss"].max() - grp["val_loss"].min()))
                e = _common_sizes(ok, [r for _, r in grp.iterrows()])
                if e:
                    logs = [_log_size(x) for x in e[0]]
                    noise_size = max(noise_size or 0.0, max(logs) - min(logs))
    return noise_loss, noise_size


def _sparser_claims(seed0, ok, noise: float | None) -> list[str]:
    """Claim 1, per width with several densities: sparser → smaller circuits. ``noise``: the
    seed noise of circuit size, as a log ratio (None: no point's two seeds share a verified
    task, so sizes have no noise scale and the claim cannot be judged).

    Reproduced when the densest model's circuits are larger than the sparsest's by more than
    the seed noise and no sparser model's are larger than a denser one's by more than it (a
    monotone trend whose neighbouring steps are each within the noise is still a trend); not
    reproduced when some sparser model's circuits are larger beyond the noise."""
    out = []
    for d_model, grp in seed0.groupby("d_model"):
        if grp["density"].nunique() < 2:
            continue
        g = grp.dropna(subset=["geomean_edges"]).sort_values("density")
        e = _common_sizes(ok, [r for _, r in g.iterrows()]) if len(g) >= 2 else None
        if e is None:
            why = ("fewer than two of its densities have verified circuits" if len(g) < 2 else
                   "its densities' verified circuits are for different tasks")
            out.append(f"Sparser at equal width (d_model {d_model}): {why}, so it cannot be judged.")
            continue
        edges, tasks = e
        dens = ", ".join(f"{density_label(d)}: {x:.1f}" for d, x in zip(g["density"], edges, strict=True))
        logs = [_log_size(x) for x in edges]  # sparsest first: sizes should grow along the list
        worst = max(logs[i] - logs[j] for i in range(len(logs)) for j in range(i + 1, len(logs)))  # a sparser one larger
        span = logs[-1] - logs[0]
        if noise is None:
            order = (f"no sparser model larger, {_factor(span)} from densest to sparsest" if worst <= 0 else
                     f"a sparser model larger by {_factor(worst)}")
            verdict = (f"{order}, but no point's two seeds share a verified task, so there is no noise scale for "
                       "circuit size: cannot be judged")
        elif worst > noise:
            verdict = (f"not reproduced: a sparser model has larger circuits ({_factor(worst)}), beyond the seed noise "
                       f"({_factor(noise)} between two seeds of one model)")
        elif span > noise:
            verdict = (f"reproduced: sparser → smaller circuits ({_factor(span)} from densest to sparsest, beyond the seed "
                       f"noise of {_factor(noise)}; no sparser model larger beyond it)")
        else:  # every difference within the noise one model shows between its two seeds
            verdict = f"within seed noise ({_factor(noise)} between two seeds of one model): cannot be told apart"
        out.append(f"Sparser at equal width (d_model {d_model}; geomean edges of verified circuits{_on(tasks)} — {dens}): {verdict}.")
    return out


def _wider_claims(seed0, ok, noise_loss: float, noise_size: float | None) -> list[str]:
    """Claim 2, per pfrac at several widths: the wider model better on both axes (circuit
    size against ``noise_size``, the seed noise as a log ratio; None: the circuit side
    cannot be judged)."""
    out = []
    for _, grp in seed0.groupby("pfrac"):  # one pfrac: about the same nonzeros at every width
        g = grp.sort_values("d_model")
        if g["d_model"].nunique() < 2:
            continue
        narrow, wide = g.iloc[0], g.iloc[-1]
        dl = float(wide["val_loss"] - narrow["val_loss"])
        head = f"Wider at equal nonzeros (~{int(narrow['nonzeros']):,}): d_model {int(wide['d_model'])} vs {int(narrow['d_model'])}"
        e = _common_sizes(ok, [narrow, wide])
        if e is None:
            out.append(f"{head} val loss {dl:+.3f}; not both have a verified circuit for a common task, so the circuit side "
                       "cannot be judged.")
            continue
        (e_n, e_w), tasks = e
        ratio = _log_size(e_w) - _log_size(e_n)
        sizes = f"{head} — val loss {dl:+.3f}, geomean edges{_on(tasks)} {e_w:.1f} vs {e_n:.1f} (×{math.exp(ratio):.2f}"
        if noise_size is None:
            out.append(f"{sizes}); no point's two seeds share a verified task, so the circuit side cannot be judged.")
            continue
        better_loss, better_edges = dl < -noise_loss, ratio < -noise_size
        verdict = ("reproduced: the frontier moves outward" if better_loss and better_edges else
                   "partly: better on one axis" if better_loss or better_edges else "not reproduced")
        out.append(f"{sizes}; seed noise {_factor(noise_size)}): {verdict}.")
    return out


# How a claim line of frontier_claims ends, most specific first: the verdict block sorts by it.
CLAIM_VERDICTS = (("not reproduced", "not reproduced"), ("reproduced", "reproduced"), ("partly", "partly"),
                  ("within seed noise", "within seed noise"), ("cannot be judged", "cannot be judged"))
def claim_verdict(text: str) -> str:
    """The verdict word of one frontier_claims line ("noise scale" for the seed-noise line)."""
    low = text.lower()
    for needle, word in CLAIM_VERDICTS:
        if needle in low:
            return word
    return "noise scale"
