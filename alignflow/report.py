"""reports/<pipeline>/report.html: one self-contained page (plots as embedded PNGs; DVC's own HTML loads
vega from a CDN and is blank offline), plus the CSVs DVC plots read."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from alignflow.layout import Layout, atomic_path, write_csv  # noqa: E402
from alignflow.stage import STAGES  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def _curves(layout: Layout) -> list[str]:
    figs = []
    for spec in STAGES.values():  # each learning curve the stage table declares, with its plotted column
        if spec.curve is None:
            continue
        name, y = spec.curve, list(dict.fromkeys(["loss", spec.plots[spec.curve]["y"]]))
        path = layout.plot_file(name)
        if not path.exists():
            continue
        df = pd.read_csv(path)
        y = [col for col in y if col in df.columns]
        if df.empty or not y:  # e.g. the base curve of a given checkpoint (nothing trained)
            continue
        fig, axes = plt.subplots(1, len(y), figsize=(5 * len(y), 3.2), squeeze=False)
        for ax, col in zip(axes[0], y):
            groups = df.groupby("run") if "run" in df else [(name, df)]
            for label, g in groups:
                g = g.dropna(subset=[col])
                ax.plot(g["step"], g[col].rolling(10 if col == "reward" else 1, min_periods=1).mean(), label=str(label))
            ax.set(title=f"{name.removesuffix('_curve')}: {col}", xlabel="step")
            if "run" in df:
                ax.legend(fontsize=7)
        figs.append(_png(fig))
    return figs


def _estimates_vs_true(layout: Layout, metrics: dict, ope_out: dict) -> str:
    rows, true = [], {n: p["sampled_value"] for n, p in metrics["policies"].items()}
    for est, res in ope_out["estimators"].items():
        for cand, e in res["estimates"].items():
            rows.append({"estimator": est, "candidate": cand, "estimate": e["value"], "ci_low": e["ci_low"],
                         "ci_high": e["ci_high"], "true_value": true.get(cand)})
    write_csv(layout.plot_file("ope_vs_true"), rows)
    df = pd.DataFrame(rows)
    ests = list(ope_out["estimators"])
    fig, axes = plt.subplots(1, len(ests), figsize=(4 * len(ests), 3.5), squeeze=False, sharey=True)
    for ax, est in zip(axes[0], ests):
        d = df[df.estimator == est]
        ax.errorbar(d["true_value"], d["estimate"], yerr=[d["estimate"] - d["ci_low"], d["ci_high"] - d["estimate"]],
                    fmt="o", ms=4, capsize=2)
        lo, hi = min(d["true_value"].min(), d["ci_low"].min()), max(d["true_value"].max(), d["ci_high"].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(title=est, xlabel="true value (sampled)", ylabel="estimate with CI")
    return _png(fig)


def _sharpe(layout: Layout, selection: dict) -> str:
    rows = [{"estimator": est, "k": int(k), "sharpe_ratio": v}
            for est, s in selection.items() if "sharpe_ratio_at_k" in s
            for k, v in s["sharpe_ratio_at_k"].items()]
    write_csv(layout.plot_file("sharpe_ratio_at_k"), rows)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for est, g in pd.DataFrame(rows).groupby("estimator"):
        ax.plot(g["k"], g["sharpe_ratio"].astype(float), marker="o", label=est)
    ax.set(title="SharpeRatio@k", xlabel="k")
    ax.legend(fontsize=7)
    return _png(fig)


def _metric_rows(metrics: dict) -> list[dict]:
    """One row per (policy, split, metric): greedy mean, and mean@k / pass@k where sampled."""
    return [{"policy": policy, "split": split, "metric": label, **figures}
            for policy, per_split in metrics.get("metrics", {}).items()
            for split, per_metric in per_split.items() for label, figures in per_metric.items()]


def _metric_bars(metrics: dict, champion: str) -> str:
    """The eval split's greedy metrics for base -> SFT -> champion: the figure a user looks for first."""
    policies = [p for p in ("base", "sft", champion) if p in metrics.get("metrics", {})]
    labels = sorted({m for p in policies for m in metrics["metrics"][p]["eval"]})
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(labels) * len(policies) / 2), 3.2))
    width = 0.8 / max(1, len(policies))
    for i, policy in enumerate(policies):
        values = [metrics["metrics"][policy]["eval"].get(m, {}).get("greedy") or 0.0 for m in labels]
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=policy)
    ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(labels))], labels)
    ax.set(title="eval split, greedy", ylabel="mean")
    ax.legend(fontsize=7)
    return _png(fig)


def example_rows(metrics: dict) -> list[dict]:
    """SFT's and the champion's greedy completions of the same first prompts of each split, side by side."""
    examples, champion = metrics.get("examples", {}), metrics["champion"]
    policies = [p for p in dict.fromkeys(("sft", champion)) if p in examples]
    if not policies:
        return []
    rows = []
    for split, shown in examples[policies[0]].items():
        for i, example in enumerate(shown):
            row = {"split": split, "prompt": example["prompt"]}
            for policy in policies:
                theirs = examples[policy][split][i]
                row[f"{policy} completion"], row[f"{policy} reward"] = theirs["completion"], theirs["reward"]
            rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))  # rows may differ (greedy vs sampled figures)
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    cell = lambda v: f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v if v is not None else ''))}</td>"  # noqa: E731
    body = "".join("<tr>" + "".join(cell(r.get(k)) for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(layout: Layout, metrics: dict, ope_out: dict) -> Path:
    policies = [{"policy": n, **p} for n, p in metrics["policies"].items()]
    selection = {k: v for k, v in metrics["selection"].items() if k != "vsdr"}
    sel_rows = [{"estimator": e, "regret@1": s.get("regret_at_1"), "nMSE": s.get("nmse"),
                 "rank corr.": s.get("rank_correlation")} for e, s in selection.items()]
    vsdr = metrics["selection"].get("vsdr", {})
    vsdr_rows = [{"ranking": k, "spearman": vsdr.get("spearman", {}).get(k), "regret@1": vsdr.get("regret_at_1", {}).get(k)}
                 for k in ("vsdr", "sim_only", "ood_only")]
    scores = ope_out.get("vsdr", {}).get("scores", {})
    parts = [
        f"<h1>alignflow report: {html.escape(layout.pipeline)}</h1>",
        f"<p>Champion (chosen by <code>{html.escape(ope_out['rule'])}</code> from estimates alone): "
        f"<b>{html.escape(metrics['champion'])}</b>; regret {metrics['champion_regret']:.3f}; "
        f"behaviour value {metrics['behavior_value']:.3f}; promoted: {ope_out['promoted']} "
        f"({html.escape(ope_out['promotion_reason'])}).</p>",
        "<h2>Policies (true values)</h2>", _table(policies),
        "<h2>Metrics: base, SFT, champion</h2>", _metric_bars(metrics, metrics["champion"]),
        _table(_metric_rows(metrics)),
        "<h2>Example completions (greedy): SFT and champion</h2>", _table(example_rows(metrics)),
        "<h2>Learning curves</h2>", *_curves(layout),
        "<h2>Estimate (with interval) vs true value</h2>", _estimates_vs_true(layout, metrics, ope_out),
        "<h2>Selection quality: SharpeRatio@k per estimator</h2>", _sharpe(layout, selection), _table(sel_rows),
        "<h2>VSDR ranking</h2>",
        *([f"<p>Skipped: {html.escape(vsdr['skipped'])}.</p>"] if "skipped" in vsdr else
          [_table(vsdr_rows),
           _table([{"candidate": n, "vsdr_score": s} for n, s in sorted(scores.items(), key=lambda kv: -kv[1])])]),
    ]
    style = "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style>"
    path = layout.report
    with atomic_path(path) as tmp:
        tmp.write_text(f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>{''.join(parts)}</body></html>")
    return path
