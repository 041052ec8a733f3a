"""Mean ± std over seeds of every finished point of a sweep: summary.csv, summary.md, summary.png.

``aggregate(DIR)`` reads ``DIR/sweep.yaml`` (the resolved sweep written by ``savlt sweep``) and
the ``metrics.json`` of every *complete* point under ``DIR/runs/`` (unfinished points are listed,
not used), so it works on a partially finished sweep; ``savlt sweep`` calls it at the end of every
invocation. Without a ``sweep.yaml`` every complete run folder under ``DIR/runs/`` is used.

Groups are method × shots × every other grid key with more than one value (except the seed,
which is what the statistics run over) × center. For each group and metric (accuracy, macro-F1
and the binary high-risk screen's accuracy, AUC, sensitivity, specificity, PPV, NPV):

- ``mean``: the mean over the seeds with a value (a null metric, e.g. an undefined AUC, is left
  out, not counted as 0);
- ``std``: the sample standard deviation (ddof = 1); empty when fewer than two seeds have a value;
- ``n``: the number of seeds with a value; ``runs``: complete runs in the group;
- ``values``: the per-seed values, ``seed:value`` separated by ``;`` (``null`` when undefined).

summary.csv has one row per group × center × metric (full precision); summary.md one table per
center (rows = method × shots, cells = "mean ± std"), the layout of the paper's tables;
summary.png plots accuracy and AUC against shots per center, one line per method, std error bars;
summary_center-<center>.png the same per center, one line per method with its 95 % band over seeds, a row
per setting of the other varying keys (e.g. the protocol).

The ranking (``ranking``; ranking.csv, and the first tables of summary.md): per center and setting,
each method's accuracy averaged over the shot counts that every method has, for every seed (the
seeds complete at each of them), then mean ± std and a 95 % t-interval over those seeds, ranked by the mean; against
``REFERENCE`` (SAVLT), the mean paired difference and a Wilcoxon signed-rank test over the same
seeds (same seed = same few-shot draw), its p-values Holm-corrected over the methods compared;
"beyond noise" = corrected p < 0.05.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from savlt import io
from savlt.io import markdown_table, text_table, write_text
from savlt.sweep.grid import display_key, format_value
from savlt.sweep.runner import SweepLayout, is_complete

# (csv name, table heading, path inside a center's metrics)
METRICS: list[tuple[str, str, tuple[str, ...]]] = [
    ("accuracy", "accuracy", ("accuracy",)),
    ("macro_f1", "macro-F1", ("macro_f1",)),
    ("binary_accuracy", "bin. accuracy", ("binary", "accuracy")),
    ("auc", "AUC", ("binary", "auc")),
    ("sensitivity", "sensitivity", ("binary", "sensitivity")),
    ("specificity", "specificity", ("binary", "specificity")),
    ("ppv", "PPV", ("binary", "ppv")),
    ("npv", "NPV", ("binary", "npv")),
]
FIXED_KEYS = ("method", "train.shots", "train.seed")  # method and shots always group; seeds are averaged
REFERENCE = "savlt"  # the method every other is tested against in the ranking


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int
    values: list[tuple[int, float | None]]  # (seed, value)


@dataclass
class Group:
    method: str
    shots: int
    extras: tuple[Any, ...]  # values of Summary.extra_keys
    runs: list[dict[str, Any]] = field(default_factory=list)  # metrics.json of each seed
    train_center: str | None = None

    def stat(self, center: str, path: tuple[str, ...]) -> Stat:
        values: list[tuple[int, float | None]] = []
        for metrics in self.runs:
            value: Any = metrics.get("centers", {}).get(center)
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            values.append((int(metrics.get("seed", -1)), float(value) if ok else None))
        present = np.array([v for _, v in values if v is not None], dtype=np.float64)
        mean = float(present.mean()) if len(present) else None
        std = float(present.std(ddof=1)) if len(present) > 1 else None
        return Stat(mean, std, len(present), values)


@dataclass
class Summary:
    out: Path
    extra_keys: list[str]  # dotted grid keys (besides method, shots, seed) that vary
    groups: list[Group]
    centers: list[str]
    complete: list[str]
    incomplete: list[str]
    labels: dict[str, str] = field(default_factory=dict)  # dotted key -> the key as the grid wrote it
    csv: Path | None = None
    markdown: Path | None = None
    plot: Path | None = None

    def label(self, key: str) -> str:
        return self.labels.get(key) or display_key(key)

    @property
    def key_header(self) -> list[str]:
        return ["method", "shots", *(self.label(k) for k in self.extra_keys)]

    def key_cells(self, group: Group) -> list[str]:
        return [group.method, str(group.shots), *(format_value(v) for v in group.extras)]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per group × center × metric (what summary.csv holds)."""
        out = []
        for group in self.groups:
            for center in self.centers:
                for name, _, path in METRICS:
                    s = group.stat(center, path)
                    out.append(
                        {
                            **dict(zip(self.key_header, self.key_cells(group), strict=True)),
                            "center": center,
                            "metric": name,
                            "mean": s.mean,
                            "std": s.std,
                            "n": s.n,
                            "runs": len(group.runs),
                            "values": ";".join(
                                f"{seed}:{'null' if v is None else repr(v)}" for seed, v in s.values
                            ),
                        }
                    )
        return out


def mean_std(stat: Stat, runs: int, digits: int = 3) -> str:
    """Format as "0.812 ± 0.021"; one value alone has no std; a count below `runs` is shown."""
    if stat.mean is None:
        return "n/a"
    text = f"{stat.mean:.{digits}f}" + (f" ± {stat.std:.{digits}f}" if stat.std is not None else "")
    return text + (f" (n={stat.n})" if stat.n != runs else "")


def _read_points(
    layout: SweepLayout,
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, list[Any]], dict[str, str]]:
    """(point name, grid values) of every point, the grid and its key labels, from sweep.yaml."""
    if layout.sweep.is_file():
        spec = yaml.safe_load(layout.sweep.read_text()) or {}
        points = [(p["name"], p.get("values") or {}) for p in spec.get("points", [])]
        return points, spec.get("grid") or {}, spec.get("labels") or {}
    runs = layout.root / "runs"
    folders = sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    return [(name, {}) for name in folders], {}, {}


def collect(sweep_dir: str | Path) -> Summary:
    """Group the complete points of a sweep folder (nothing is written)."""
    layout = SweepLayout(sweep_dir)
    points, grid, labels = _read_points(layout)
    extra_keys = [k for k, values in grid.items() if k not in FIXED_KEYS and len(values) > 1]
    position = {k: {yaml.safe_dump(v): i for i, v in enumerate(grid[k])} for k in extra_keys}
    groups: dict[tuple[Any, ...], Group] = {}
    methods: dict[str, int] = {}
    centers: dict[str, None] = {}
    complete, incomplete = [], []
    for name, values in points:
        folder = layout.run(name)
        if not is_complete(folder):
            incomplete.append(name)
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        complete.append(name)
        method, shots = str(metrics["method"]), int(metrics["shots"])
        extras = tuple(values.get(k) for k in extra_keys)
        methods.setdefault(method, len(methods))
        key = (method, shots, *(yaml.safe_dump(v) for v in extras))
        group = groups.setdefault(key, Group(method, shots, extras, train_center=metrics.get("train_center")))
        group.runs.append(metrics)
        centers.update(dict.fromkeys(metrics.get("centers", {})))

    def order(group: Group) -> tuple[Any, ...]:
        rank = [
            position[k].get(yaml.safe_dump(v), len(position[k]))
            for k, v in zip(extra_keys, group.extras, strict=True)
        ]
        return (methods[group.method], group.shots, *rank)

    ordered = sorted(groups.values(), key=order)
    return Summary(layout.root, extra_keys, ordered, list(centers), complete, incomplete, labels)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_csv(summary: Summary, path: Path) -> None:
    header = [*summary.key_header, "center", "metric", "mean", "std", "n", "runs", "values"]
    io.write_csv(path, header, ([_csv_value(row[h]) for h in header] for row in summary.rows()))


def center_title(summary: Summary, center: str) -> str:
    trains = {g.train_center for g in summary.groups}
    return (
        f"{center} (internal test)"
        if trains == {center}
        else f"{center} (external)"
        if center not in trains
        else center
    )


def markdown(summary: Summary) -> str:
    total = len(summary.complete) + len(summary.incomplete)
    lines = [f"# Sweep summary: {summary.out.name}", ""]
    backbones = sorted({str(r.get("backbone")) for g in summary.groups for r in g.runs})
    seeds = sorted({int(r.get("seed", -1)) for g in summary.groups for r in g.runs})
    lines += [
        f"Complete runs: {len(summary.complete)} of {total}"
        + (f"; backbone: {', '.join(backbones)}" if backbones else "")
        + (f"; seeds: {', '.join(map(str, seeds))}" if seeds else "")
        + ".",
        "",
        "Each cell is the mean ± sample standard deviation (ddof = 1) over seeds; `runs` is the number "
        "of seeds in the row, and `(n=k)` marks a metric that is defined for only k of them. "
        "Binary metrics are the high-risk screen (HSIL + cancer).",
        "",
    ]
    if summary.incomplete:
        shown = ", ".join(summary.incomplete[:10]) + (" …" if len(summary.incomplete) > 10 else "")
        lines += [f"Not finished (left out): {shown}", ""]
    if not summary.groups:
        return "\n".join([*lines, "No complete runs yet.", ""])
    lines += ranking_markdown(summary)
    header = [*summary.key_header, "runs", *(title for _, title, _ in METRICS)]
    for center in summary.centers:
        rows = [
            [
                *summary.key_cells(g),
                str(len(g.runs)),
                *(mean_std(g.stat(center, p), len(g.runs)) for _, _, p in METRICS),
            ]
            for g in summary.groups
        ]
        lines += [f"## {center_title(summary, center)}", "", markdown_table(header, rows), ""]
    return "\n".join(lines)


def text_summary(summary: Summary, metrics: Sequence[str] = ("accuracy", "auc")) -> str:
    """A terminal table: rows = method × shots, columns = the chosen metrics per center."""
    chosen = [(name, title, path) for name, title, path in METRICS if name in metrics]
    header = [*summary.key_header, *(f"{c} {title}" for c in summary.centers for _, title, _ in chosen)]
    rows = [
        [
            *summary.key_cells(g),
            *(mean_std(g.stat(c, p), len(g.runs)) for c in summary.centers for _, _, p in chosen),
        ]
        for g in summary.groups
    ]
    return text_table(header, rows) if rows else "no complete runs yet"


def plot(summary: Summary, path: Path) -> None:
    """Accuracy and AUC against shots, one panel per center, one line per method (± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted({g.shots for g in summary.groups})
    x_of = {s: i for i, s in enumerate(shots)}
    series: dict[tuple[Any, ...], list[Group]] = {}
    for g in summary.groups:
        series.setdefault((g.method, *(yaml.safe_dump(v) for v in g.extras)), []).append(g)
    panels = [(name, title, path_) for name, title, path_ in METRICS if name in ("accuracy", "auc")]
    cols = max(1, len(summary.centers))
    fig, axes = plt.subplots(len(panels), cols, figsize=(3.6 * cols + 1.8, 3.0 * len(panels)), squeeze=False)
    width = 0.25 / max(1, len(series) - 1) if len(series) > 1 else 0.0
    for row, (_, title, mpath) in enumerate(panels):
        for col, center in enumerate(summary.centers):
            ax = axes[row][col]
            for k, groups in enumerate(series.values()):
                first = groups[0]
                label = first.method + "".join(
                    f", {summary.label(key)}={format_value(v)}"
                    for key, v in zip(summary.extra_keys, first.extras, strict=True)
                )
                stats = [(x_of[g.shots], g.stat(center, mpath)) for g in groups]
                stats = [(x, s) for x, s in stats if s.mean is not None]
                if not stats:
                    continue
                offset = (k - (len(series) - 1) / 2) * width
                ax.errorbar(
                    [x + offset for x, _ in stats],
                    [s.mean for _, s in stats],
                    yerr=[s.std or 0.0 for _, s in stats],
                    marker="o",
                    capsize=3,
                    label=label,
                )
            ax.set_xticks(range(len(shots)), [str(s) for s in shots])
            ax.set_xlim(-0.5, len(shots) - 0.5)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(center_title(summary, center))
            if row == len(panels) - 1:
                ax.set_xlabel("shots per class")
            if col == 0:
                ax.set_ylabel(title)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / (3.6 * cols + 1.8), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Ranked:
    """One method's line of a ranking: per-seed values (seed -> value averaged over the shots)."""

    method: str
    values: dict[int, float]
    mean: float
    std: float | None
    low: float | None
    high: float | None
    difference: float | None = None  # mean paired difference to the reference
    p: float | None = None  # Wilcoxon signed-rank, two-sided
    p_holm: float | None = None


def _per_seed(groups: list[Group], center: str, path: tuple[str, ...]) -> dict[int, float]:
    """seed -> the metric averaged over the shot counts of `groups` (seeds with every shot count)."""
    table: dict[int, list[float]] = {}
    for group in groups:
        for seed, value in group.stat(center, path).values:
            if value is not None:
                table.setdefault(seed, []).append(value)
    return {seed: float(np.mean(v)) for seed, v in sorted(table.items()) if len(v) == len(groups)}


def by_setting(summary: Summary) -> list[tuple[tuple[Any, ...], dict[str, list[Group]]]]:
    """The groups per setting of the other varying keys: (their values, method -> its groups)."""
    settings: dict[str, tuple[tuple[Any, ...], dict[str, list[Group]]]] = {}
    for g in summary.groups:
        entry = settings.setdefault(yaml.safe_dump(list(g.extras)), (g.extras, {}))
        entry[1].setdefault(g.method, []).append(g)
    return list(settings.values())


def setting_text(summary: Summary, extras: tuple[Any, ...]) -> str:
    """ "protocol=realistic, …": a setting of the other varying keys, in words."""
    return ", ".join(
        f"{summary.label(k)}={format_value(v)}" for k, v in zip(summary.extra_keys, extras, strict=True)
    )


def t_half_width(std: float | None, n: int, level: float) -> float | None:
    """Half the width of the t-interval of a mean over `n` values with sample std `std`."""
    from scipy import stats

    return float(stats.t.ppf((1 + level) / 2, n - 1) * std / math.sqrt(n)) if std else None


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (None stays None, and is not counted)."""
    known = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[i] = running
    return adjusted


def rank_methods(per_method: dict[str, dict[int, float]], level: float = 0.95) -> list[Ranked]:
    """Rank by the mean over seeds, with a t-interval, and the paired test against ``REFERENCE``."""
    from scipy import stats

    rows = []
    for method, values in per_method.items():
        if not values:
            continue
        data = np.array(list(values.values()))
        std = float(data.std(ddof=1)) if len(data) > 1 else None
        half = t_half_width(std, len(data), level)
        mean = float(data.mean())
        rows.append(
            Ranked(
                method,
                values,
                mean,
                std,
                None if half is None else mean - half,
                None if half is None else mean + half,
            )
        )
    reference = next((r for r in rows if r.method == REFERENCE), None)
    if reference is not None:
        for row in rows:
            if row is reference:
                continue
            seeds = sorted(set(row.values) & set(reference.values))
            if not seeds:
                continue
            diff = np.array([row.values[s] - reference.values[s] for s in seeds])
            row.difference = float(diff.mean())
            row.p = 1.0 if not np.any(diff) else float(stats.wilcoxon(diff).pvalue)
        for row, adjusted in zip(rows, holm([r.p for r in rows]), strict=True):
            row.p_holm = adjusted
    return sorted(rows, key=lambda r: -r.mean)


def ranking(summary: Summary, metric: str = "accuracy") -> dict[tuple[str, tuple[Any, ...]], list[Ranked]]:
    """(center, setting of the other varying keys) -> the ranked methods (see the module's docstring)."""
    path = next(p for name, _, p in METRICS if name == metric)
    out = {}
    settings = by_setting(summary)
    for center in summary.centers:
        for extras, methods in settings:
            # every method over the same shot counts, so a method that lacks one is not favoured
            common = set.intersection(*({g.shots for g in gs} for gs in methods.values()))
            out[(center, extras)] = rank_methods(
                {
                    m: _per_seed([g for g in gs if g.shots in common], center, path)
                    for m, gs in methods.items()
                }
            )
    return out


def _num(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def ranking_rows(ranked: list[Ranked]) -> list[list[str]]:
    rows = []
    for i, r in enumerate(ranked, start=1):
        beyond = "" if r.p_holm is None else ("yes" if r.p_holm < 0.05 else "no")
        rows.append(
            [
                str(i),
                r.method,
                f"{r.mean:.3f}" + ("" if r.std is None else f" ± {r.std:.3f}"),
                "" if r.low is None else f"[{r.low:.3f}, {r.high:.3f}]",
                str(len(r.values)),
                "" if r.difference is None else f"{r.difference:+.3f}",
                "" if r.p is None else f"{r.p:.3g}",
                "" if r.p_holm is None else f"{r.p_holm:.3g}",
                beyond,
            ]
        )
    return rows


RANKING_HEADER = [
    "rank",
    "method",
    "mean ± std",
    "95% interval",
    "seeds",
    f"Δ vs {REFERENCE}",
    "p",
    "p (Holm)",
    "beyond noise",
]


def ranking_markdown(summary: Summary) -> list[str]:
    ranked = ranking(summary)
    if not ranked:
        return []
    lines = [
        "## Ranking",
        "",
        f"Accuracy averaged, for each seed, over the shot counts every method has; mean ± std and 95 % t-interval over the seeds; "
        f"Δ and the Wilcoxon signed-rank p-value against {REFERENCE} over the same seeds (same draws), "
        "Holm-corrected over the methods; beyond noise: corrected p < 0.05."
        + (
            ""
            if any(g.method == REFERENCE for g in summary.groups)
            else f" ({REFERENCE} is not in this sweep: no tests.)"
        ),
        "",
    ]
    for (center, extras), rows in ranked.items():
        setting = setting_text(summary, extras)
        lines += [f"### {center_title(summary, center)}" + (f", {setting}" if setting else ""), ""]
        lines += [markdown_table(RANKING_HEADER, ranking_rows(rows)), ""]
    return lines


def write_ranking_csv(summary: Summary, path: Path) -> None:
    header = [
        *(summary.label(k) for k in summary.extra_keys),
        "center",
        "rank",
        "method",
        "mean",
        "std",
        "low",
        "high",
        "seeds",
        "difference",
        "p",
        "p_holm",
    ]
    rows = []
    for (center, extras), ranked in ranking(summary).items():
        for i, r in enumerate(ranked, start=1):
            rows.append(
                [
                    *(format_value(v) for v in extras),
                    center,
                    i,
                    r.method,
                    r.mean,
                    r.std,
                    r.low,
                    r.high,
                    len(r.values),
                    r.difference,
                    r.p,
                    r.p_holm,
                ]
            )
    io.write_csv(path, header, ([_csv_value(v) for v in row] for row in rows))


def plot_center(summary: Summary, center: str, path: Path, level: float = 0.95) -> None:
    """Accuracy and AUC against shots for one center: a row per setting, one line per method with
    its band (the 95 % t-interval over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted({g.shots for g in summary.groups})
    settings = by_setting(summary)
    panels = [(title, p) for name, title, p in METRICS if name in ("accuracy", "auc")]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.4 * len(settings)), squeeze=False)
    for row, (extras, methods) in enumerate(settings):
        setting = setting_text(summary, extras)
        for col, (title, mpath) in enumerate(panels):
            ax = axes[row][col]
            for method, groups in methods.items():
                points = []
                for g in sorted(groups, key=lambda g: g.shots):
                    s = g.stat(center, mpath)
                    if s.mean is None:
                        continue
                    points.append((shots.index(g.shots), s.mean, t_half_width(s.std, s.n, level) or 0.0))
                if not points:
                    continue
                x, mean, half = (np.array(v, dtype=float) for v in zip(*points, strict=True))
                (line,) = ax.plot(x, mean, marker="o", markersize=3, label=method)
                ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.15, linewidth=0)
            ax.set_xticks(range(len(shots)), [str(s) for s in shots])
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.set_title(
                f"{center_title(summary, center)}: {title}" + (f" ({setting})" if setting else ""),
                fontsize="small",
            )
            ax.set_xlabel("shots per class")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def aggregate(sweep_dir: str | Path, with_plot: bool = True) -> Summary:
    """Write summary.csv, summary.md (and summary.png) into the sweep folder; returns the summary."""
    summary = collect(sweep_dir)
    root = summary.out
    root.mkdir(parents=True, exist_ok=True)
    summary.csv, summary.markdown = root / "summary.csv", root / "summary.md"
    write_csv(summary, summary.csv)
    write_ranking_csv(summary, root / "ranking.csv")
    write_text(summary.markdown, markdown(summary))
    png = root / "summary.png"
    if with_plot and summary.groups:
        plot(summary, png)
        summary.plot = png
        for center in summary.centers:
            plot_center(summary, center, root / f"summary_center-{center}.png")
    else:
        png.unlink(missing_ok=True)
    return summary
