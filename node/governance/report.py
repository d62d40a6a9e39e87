"""The evaluation report as one self-contained HTML file.

Plots are drawn with matplotlib's Agg backend (no display needed) and
embedded as PNG data URIs, so the file can be mailed to a committee or
archived with nothing beside it: no script, stylesheet or image is fetched.
"""
from __future__ import annotations

import base64
import html
import io
import math


from node.governance import metrics
from node.governance.scoring import ScoredSet


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(count: int):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return plt, fig, list(axes.flat[:count])


def roc_figure(record: dict, scored: ScoredSet) -> str | None:
    labels = [l for l, row in record["pathologies"].items() if row["evaluated"] and row["auroc"] is not None]
    if not labels:
        return None
    plt, fig, axes = _grid(len(labels))
    for ax, label in zip(axes, labels):
        row = record["pathologies"][label]
        y, s = scored.column(label)
        fpr, tpr = metrics.roc_curve(y, s)
        ax.plot(fpr, tpr, color="#1f5fa8", lw=1.6)
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
        if row["sensitivity"] is not None and row["specificity"] is not None:
            ax.plot([1 - row["specificity"]], [row["sensitivity"]], "o", color="#c0392b", ms=5, label="operating point")
        lo, hi = row["auroc_ci"]
        ax.set_title(f"{label}\nAUROC {row['auroc']:.3f} ({lo:.3f}–{hi:.3f})", fontsize=9)
        ax.set_xlabel("1 − specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    uri = _png(fig)
    plt.close(fig)
    return uri


def reliability_figure(record: dict) -> str | None:
    labels = [l for l, row in record["pathologies"].items() if row["evaluated"]]
    if not labels:
        return None
    plt, fig, axes = _grid(len(labels))
    for ax, label in zip(axes, labels):
        row = record["pathologies"][label]
        bins = [b for b in row["reliability"] if b["count"]]
        centres = [(b["lower"] + b["upper"]) / 2 for b in row["reliability"]]
        width = row["reliability"][0]["upper"] - row["reliability"][0]["lower"]
        heights = [b["fraction_positive"] or 0.0 for b in row["reliability"]]
        ax.bar(centres, heights, width=width * 0.9, color="#7fa7d6", edgecolor="#1f5fa8", lw=0.6)
        ax.plot([b["mean_probability"] for b in bins], [b["fraction_positive"] for b in bins], "o-", color="#1f5fa8", ms=3)
        ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
        ax.set_title(f"{label}\nECE {row['ece']:.3f}", fontsize=9)
        ax.set_xlabel("predicted probability", fontsize=8)
        ax.set_ylabel("fraction positive", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    uri = _png(fig)
    plt.close(fig)
    return uri


def _fmt(value, ci=None, digits: int = 3) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    if ci:
        text += f" <small>({ci[0]:.{digits}f}–{ci[1]:.{digits}f})</small>"
    return text


def render_html(record: dict, scored: ScoredSet) -> str:
    esc = html.escape
    ds = record["dataset"]
    rows = []
    for label, row in record["pathologies"].items():
        if not row["evaluated"]:
            rows.append(f"<tr class='ne'><td>{esc(label)}</td><td colspan='9'>not evaluated: {esc(row['reason'])}</td></tr>")
            continue
        rows.append(
            "<tr>"
            f"<td>{esc(label)}</td><td>{row['n']}</td><td>{_fmt(row['prevalence'])}</td>"
            f"<td>{_fmt(row['auroc'], row['auroc_ci'])}</td><td>{row['threshold']:.4f}</td>"
            f"<td>{_fmt(row['sensitivity'], row['sensitivity_ci'])}</td>"
            f"<td>{_fmt(row['specificity'], row['specificity_ci'])}</td>"
            f"<td>{_fmt(row['ppv'], row['ppv_ci'])}</td><td>{_fmt(row['npv'], row['npv_ci'])}</td>"
            f"<td>{_fmt(row['ece'])}</td></tr>"
        )
    figures = []
    for title, uri in (("ROC curves (dot: the operating point)", roc_figure(record, scored)),
                       ("Reliability diagrams (bars: fraction positive per probability bin)", reliability_figure(record))):
        if uri:
            figures.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='{uri}'>")
    demo = record["model_info"].get("demo")
    warning = ("<p class='demo'>DEMO WEIGHTS — NOT FOR CLINICAL USE: these figures describe demonstration weights.</p>"
               if demo else "")
    unreadable = "".join(f"<li>{esc(u['image'])}: {esc(u['reason'])}</li>" for u in ds["images_unreadable"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Carina evaluation of {esc(record['model'])}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}} td:first-child,th:first-child{{text-align:left}}
tr.ne td{{color:#888;text-align:left}} .demo{{background:#fdecea;border:1px solid #c0392b;padding:.5em}}
small{{color:#666}} img{{max-width:100%}} dl{{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}}
</style></head><body>
<h1>Local validation of {esc(record['model'])}</h1>
{warning}
<dl>
<dt>Date</dt><dd>{esc(record['date'])}</dd><dt>Run by</dt><dd>{esc(record['user'])}</dd>
<dt>Runtime</dt><dd>{esc(str(record.get('backend') or 'torch'))}</dd>
<dt>Labels</dt><dd>{esc(ds['labels_file'])} ({esc(ds['labels_format'])}, SHA-256 {esc(ds['labels_sha256'])})</dd>
<dt>Images</dt><dd>{ds['images_scored']} scored of {ds['images_listed']} listed; {ds['images_missing']} not found;
{len(ds['images_unreadable'])} unreadable</dd>
<dt>Dataset SHA-256</dt><dd>{esc(ds['dataset_sha256'])}</dd>
<dt>Confidence intervals</dt><dd>AUROC: 95 % percentile bootstrap, {record['bootstrap']['resamples']} resamples of images;
proportions: 95 % Wilson score intervals</dd>
</dl>
<h2>Per pathology, at the model's operating point (positive: probability ≥ threshold)</h2>
<table><thead><tr><th>Pathology</th><th>n</th><th>Prevalence</th><th>AUROC (95 % CI)</th><th>Threshold</th>
<th>Sensitivity</th><th>Specificity</th><th>PPV</th><th>NPV</th><th>ECE</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
{''.join(figures)}
{f'<h2>Unreadable images</h2><ul>{unreadable}</ul>' if unreadable else ''}
</body></html>
"""
