"""Training and evaluation report: PNG plots (matplotlib, the ``report`` extra) and a
markdown summary linking them.

From a training workdir's ``metrics.jsonl`` (``experiment.metrics``):
- ``rewards.png``: mean patched reward of the attacker (``{split}/x/reward/mean``) and the
  defender (``{split}/y/reward/mean``) per split over steps;
- ``errors.png``: attack error rates (``{split}/x/rate/<ERROR>``) and response error rates
  (``{split}/y/rate/<ERROR>``) over steps (series that are zero throughout are left out);
- ``losses.png``: loss and preference margin per player and split;
- ``time.png``: seconds per stage (``time/*`` except ``time/step``) as stacked areas;
- ``validation.png``: validation reward per split and the ASR-style rates
  (``valid/harmful/asr``, ``valid/benign/compliance_rate``) at the validated steps.
From eval JSONs (``launch/eval.py``): ``frontier.png``, attack success rate against benign
compliance, one point per (eval, harmful set × benign set) — the safety–compliance frontier
across checkpoints or runs — and a table per eval. lm-evaluation-harness result files are
folded into the summary (``lmeval.fold_lmeval``).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from advgame_jax.data.readers import jsonl_records, loads_json, read_text
from advgame_jax.errors import UserError
from advgame_jax.evaluation.results import write_text_atomic

SPLITS = ("harmful", "benign")
PLAYERS = (("attacker", "x"), ("defender", "y"))


class ReportError(UserError, ValueError):
    """Missing inputs, or matplotlib not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("launch/report.py needs matplotlib: pip install -e '.[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ReportError(f"--workdir {workdir!r}: no metrics.jsonl (expected a training workdir)")
    out = [
        rec
        for _, rec in jsonl_records(
            path, "expected a metrics record (a JSON object with a 'step') a line", ReportError
        )
    ]
    for n, rec in enumerate(out, 1):
        if not isinstance(rec.get("step"), int):
            raise ReportError(
                f"{path}: record {n} has no integer 'step'; expected the "
                "metrics.jsonl of a training workdir"
            )
    if not out:
        raise ReportError(f"{path}: no records")
    return sorted(out, key=lambda r: r["step"])


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _lines(ax, records, keys_labels, *, marker=None):
    drawn = []
    for key, label in keys_labels:
        x, y = series(records, key)
        if x:
            ax.plot(x, y, label=label, marker=marker)
            drawn.append(label)
    if drawn:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _steps_axis(ax)
    return drawn


def _steps_axis(ax):
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_rewards(plt, records, out_dir) -> list[str]:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = _lines(
        ax, records, [(f"{s}/{v}/reward/mean", f"{p} {s}") for p, v in PLAYERS for s in SPLITS]
    )
    ax.set_ylabel("mean patched reward (0-10, errors -1)")
    ax.set_title("Rewards of both players")
    _save(plt, fig, os.path.join(out_dir, "rewards.png"))
    return drawn


def _error_keys(records, v) -> list[str]:
    """The ``*/{v}/rate/*`` training keys that are non-zero somewhere, sorted."""
    keys = sorted(
        {
            k
            for r in records
            for k in r
            if k.split("/")[1:3] == [v, "rate"]
            and not k.endswith("/valid")
            and not k.startswith("valid/")
        }
    )
    return [k for k in keys if any(r.get(k) for r in records)]


def _plot_errors(plt, records, out_dir) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = []
    for ax, (player, v) in zip(axes, PLAYERS, strict=True):
        keys = _error_keys(records, v)
        labels += _lines(ax, records, [(k, k.replace(f"/{v}/rate/", " ")) for k in keys])
        ax.set_title(f"{player} error rates ({v})")
        ax.set_ylabel("share of slots")
        if not keys:
            ax.text(0.5, 0.5, "no errors", ha="center", va="center", transform=ax.transAxes)
    _save(plt, fig, os.path.join(out_dir, "errors.png"))
    return labels


def _plot_losses(plt, records, out_dir) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = _lines(
        axes[0], records, [(f"{s}/{p}/loss", f"{p} {s}") for p, _ in PLAYERS for s in SPLITS]
    ) + _lines(
        axes[1], records, [(f"{s}/{p}/margin", f"{p} {s}") for p, _ in PLAYERS for s in SPLITS]
    )
    axes[0].set_title("loss")
    axes[1].set_title("preference margin")
    _save(plt, fig, os.path.join(out_dir, "losses.png"))
    return drawn


def _plot_time(plt, records, out_dir) -> list[str]:
    stages = sorted(
        {k for r in records for k in r if k.startswith("time/") and k not in ("time/step",)}
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records if r["step"] > 0]
    ys = [[float(r.get(k) or 0.0) for r in records if r["step"] > 0] for k in stages]
    if steps and stages:
        ax.stackplot(steps, ys, labels=[k[5:] for k in stages])
        ax.legend(fontsize=7, loc="upper left")
    _steps_axis(ax)
    ax.set_ylabel("seconds")
    ax.set_title("Time per stage")
    _save(plt, fig, os.path.join(out_dir, "time.png"))
    return [k[5:] for k in stages] if steps else []


def _plot_validation(plt, records, out_dir) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = _lines(
        axes[0], records, [(f"valid/{s}/reward", f"defender {s}") for s in SPLITS], marker="o"
    ) + _lines(
        axes[1],
        records,
        [
            ("valid/harmful/asr", "ASR (harmful)"),
            ("valid/benign/compliance_rate", "compliance (benign)"),
        ],
        marker="o",
    )
    axes[0].set_title("validation reward (0-10)")
    axes[1].set_title("validation rates")
    axes[1].set_ylim(-0.05, 1.05)
    _save(plt, fig, os.path.join(out_dir, "validation.png"))
    return drawn


_TRAINING_PLOTS = (
    ("rewards.png", _plot_rewards),
    ("errors.png", _plot_errors),
    ("losses.png", _plot_losses),
    ("time.png", _plot_time),
    ("validation.png", _plot_validation),
)


def plot_training(records: Sequence[dict], out_dir: str) -> dict[str, list[str]]:
    """Write the training PNGs; returns {file name: series labels drawn}."""
    plt = _pyplot()
    return {name: plot(plt, records, out_dir) for name, plot in _TRAINING_PLOTS}


def read_eval(path: str) -> dict:
    expected = "expected the eval.json written by launch/eval.py"
    d = loads_json(read_text(path, "an eval JSON", ReportError), path, expected, ReportError)
    if not isinstance(d, dict) or not isinstance(d.get("sets"), dict):
        raise ReportError(f"--eval {path!r}: no 'sets' field (expected launch/eval.py output)")
    return d


def frontier_points(evals: dict[str, dict]) -> list[dict]:
    """One point per eval × harmful-bearing set × benign-bearing set (with the CIs)."""
    pts = []
    for label, d in evals.items():
        sets = d["sets"]
        harm = [(n, m) for n, m in sets.items() if m.get("asr") is not None]
        ben = [(n, m) for n, m in sets.items() if m.get("benign_compliance") is not None]
        for hn, hm in harm:
            for bn, bm in ben:
                pts.append(
                    {
                        "eval": label,
                        "harmful_set": hn,
                        "benign_set": bn,
                        "asr": hm["asr"],
                        "compliance": bm["benign_compliance"],
                        "asr_ci": hm.get("asr_ci"),
                        "compliance_ci": bm.get("benign_compliance_ci"),
                    }
                )
    return pts


def plot_frontier(points: Sequence[dict], out_dir: str) -> str:
    """ASR (x) against benign compliance (y), 95% CIs as error bars, one legend entry each."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "osD^vP*Xh"
    for i, p in enumerate(points):
        x, y = 100 * p["asr"], 100 * p["compliance"]

        def err(ci, v):
            return [[v - 100 * ci[0]], [100 * ci[1] - v]] if ci else None

        ax.errorbar(
            x,
            y,
            xerr=err(p.get("asr_ci"), x),
            yerr=err(p.get("compliance_ci"), y),
            fmt=markers[i % len(markers)],
            ms=8,
            capsize=3,
            alpha=0.8,
            label=f"{p['eval']} ({p['harmful_set']} / {p['benign_set']})",
        )
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("attack success rate % (lower is safer)")
    ax.set_ylabel("benign compliance % (higher is more helpful)")
    ax.set_title("Safety-compliance frontier (best: top left), 95% CIs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, os.path.join(out_dir, "frontier.png"))


def _last(records, key) -> Optional[float]:
    vals = [r[key] for r in records if r.get(key) is not None]
    return vals[-1] if vals else None


_TRAINING_KEYS = (
    "valid/harmful/reward",
    "valid/benign/reward",
    "valid/harmful/asr",
    "valid/benign/compliance_rate",
    "harmful/x/reward/mean",
    "benign/x/reward/mean",
    "harmful/y/reward/mean",
    "benign/y/reward/mean",
    "time/step",
)
_TRAINING_SECTIONS = (
    ("rewards.png", "Rewards"),
    ("errors.png", "Error rates"),
    ("losses.png", "Losses and margins"),
    ("time.png", "Time per stage"),
    ("validation.png", "Validation"),
)


def _training_section(workdir: str, out_dir: str) -> list[str]:
    """The training run's first/last table and its plots (markdown lines)."""
    records = read_metrics(workdir)
    drawn = plot_training(records, out_dir)
    last = records[-1]
    md = [
        f"Training run `{os.path.abspath(workdir)}`: {len(records)} records, last step "
        f"{last['step']}.",
        "",
        "| metric | first | last |",
        "|---|---|---|",
    ]
    for key in _TRAINING_KEYS:
        x, y = series(records, key)
        if y:
            md.append(f"| `{key}` | {y[0]:.3g} (step {x[0]}) | {y[-1]:.3g} (step {x[-1]}) |")
    md.append("")
    for name, title in _TRAINING_SECTIONS:
        md += [
            f"## {title}",
            "",
            f"![{title}]({name})",
            "",
            "Series: " + (", ".join(drawn[name]) or "none recorded") + ".",
            "",
        ]
    return md


def _read_evals(eval_paths: Sequence[str]) -> dict[str, dict]:
    """Eval JSONs labelled by their folder's name (primed where two share one)."""
    evals = {}
    for p in eval_paths:
        label = os.path.basename(os.path.dirname(os.path.abspath(p))) or p
        while label in evals:
            label += "'"
        evals[label] = read_eval(p)
    return evals


def _eval_section(eval_paths: Sequence[str], out_dir: str) -> list[str]:
    """The frontier plot and one table per eval (markdown lines)."""
    from advgame_jax.evaluation.metrics import markdown_table

    evals = _read_evals(eval_paths)
    md = []
    pts = frontier_points(evals)
    if pts:
        plot_frontier(pts, out_dir)
        md += ["## Safety-compliance frontier", "", "![frontier](frontier.png)", ""]
    for label, d in evals.items():
        md += [
            f"## Evaluation `{label}`",
            "",
            f"Target `{d.get('target')}`, classifier `{d.get('classifier')}`.",
            "",
            markdown_table(d["sets"]),
        ]
    return md


def _lmeval_section(lmeval_paths: Sequence[str]) -> list[str]:
    """The lm-evaluation-harness results folded into one table (markdown lines)."""
    from advgame_jax.evaluation.lmeval import fold_lmeval

    md = [
        "## Utility (lm-evaluation-harness)",
        "",
        "| task | metric | value |",
        "|---|---|---|",
    ]
    for p in lmeval_paths:
        for task, metric, value in fold_lmeval(p):
            md.append(f"| {task} | {metric} | {value:.4g} |")
    md.append("")
    return md


def build_report(
    out_dir: str,
    *,
    workdir: str = "",
    eval_paths: Sequence[str] = (),
    lmeval_paths: Sequence[str] = (),
) -> str:
    """Write the PNGs and ``report.md`` in ``out_dir``; returns the markdown path."""
    if not (workdir or eval_paths or lmeval_paths):
        raise ReportError("give --workdir and/or --eval / --lmeval files")
    _pyplot()  # fail early without matplotlib
    os.makedirs(out_dir, exist_ok=True)
    md = ["# AdvGame report", ""]
    if workdir:
        md += _training_section(workdir, out_dir)
    if eval_paths:
        md += _eval_section(eval_paths, out_dir)
    if lmeval_paths:
        md += _lmeval_section(lmeval_paths)
    return write_text_atomic(os.path.join(out_dir, "report.md"), "\n".join(md) + "\n")
