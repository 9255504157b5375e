"""Evaluation outputs: `results.json`, PNG plots (matplotlib, Agg), `report.md` and the
per-window arrays (`per_window_nll.npz`, `ceiling_per_window.npz`).

Pure functions of the results dict produced by `mcjax.eval.pipeline.run_evaluation`, so a
report can be re-rendered from a saved `results.json` (`write_outputs(results, out_dir)`).
The dict's "arrays" entry ({file name: {key: array}}) is written as .npz files, not JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mcjax.eval import metrics

__all__ = ["focus_grid", "plot_dnll_vs_ratio", "plot_accuracy_vs_length", "plot_focus_map",
           "render_markdown", "write_outputs", "plots_with_data", "PLOTS", "NET_NAMES"]

PLOTS = ("accuracy_vs_length.png", "dnll_vs_ratio.png", "focus_map.png")
NET_NAMES = {"gist": "GistNet", "lens": "LensNet"}
VARIANT_LABELS = {"full": "full context", "gistnet": "GistNet", "gistnet_untrained":
                  "untrained GistNet", "mean_pool": "mean-pooled embeddings",
                  "mean_pool_hidden": "mean-pooled hidden states",
                  "truncation": "truncation (compressed span dropped)"}
METHOD_LABELS = {"megacontext_lens": "MegaContext, LensNet focus",
                 "megacontext_random": "MegaContext, random focus",
                 "megacontext_recency": "MegaContext, recency focus",
                 "megacontext_retrieval": "MegaContext, retrieval focus (training-free)",
                 "sliding_window": "sliding window (last W_max tokens)",
                 "full_context": "full context (plain base model)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- plots


def plot_dnll_vs_ratio(section: dict, path: Path, ceiling: dict | None = None) -> None:
    """ΔNLL@H (± standard error over windows) of each variant against the whole-prefix
    compression ratio (and the ceiling's points, when measured)."""
    plt = _plt()
    rows = section["layouts"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in section["variants"]:
        if variant == "full":
            continue
        x = [r["context_ratio"] for r in rows]
        y = [r["delta_nll"][variant]["mean"] for r in rows]
        err = [r["delta_nll"][variant]["stderr"] or 0.0 for r in rows]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=VARIANT_LABELS.get(variant,
                                                                                   variant))
    ceil = [r for r in (ceiling or {}).get("layouts", []) if r.get("ceiling")]
    if ceil:
        ax.errorbar([r["context_ratio"] for r in ceil],
                    [r["ceiling"]["delta_nll"] for r in ceil],
                    yerr=[r["ceiling"]["delta_nll_se"] or 0.0 for r in ceil], marker="*",
                    ms=10, ls="", capsize=3, color="black",
                    label=f"ceiling: free vectors ({ceil[0]['n']} windows)")
    ax.axhline(0.0, color="black", lw=0.8, ls="--", label="full context (ΔNLL = 0)")
    ax.set_xscale("log")
    ratios = sorted({round(r["context_ratio"], 1) for r in rows})
    ax.set_xticks(ratios, [f"{v:g}:1" for v in ratios])  # the measured ratios, not 10^k
    ax.minorticks_off()
    ax.set_xlabel("compression ratio of the prefix (tokens per slot)")
    ax.set_ylabel("ΔNLL@H (nats/token)")
    ax.set_title(f"ΔNLL@H vs compression ({section['windows']} held-out windows)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_length(section: dict, path: Path) -> None:
    """Passkey accuracy of each method against history length (skipped points omitted and
    named in the legend)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = len(section["methods"])
    for i, (method, per_length) in enumerate(section["methods"].items()):
        # a small horizontal offset per method keeps coinciding lines visible
        shift = 2.0 ** (0.012 * (i - (n - 1) / 2))
        pts = [(int(L) * shift, r["accuracy"]) for L, r in per_length.items()
               if r["status"] == "ok"]
        skipped = [int(L) for L, r in per_length.items() if r["status"] != "ok"]
        label = METHOD_LABELS.get(method, method)
        if skipped:
            label += f" (skipped at {', '.join(map(str, skipped))})"
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=label)
        else:
            ax.plot([], [], marker="x", ls="", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(section["lengths"], [str(L) for L in section["lengths"]])
    ax.minorticks_off()
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("history length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_title(f"passkey retrieval at W_max = {section['w_max']} "
                 f"({section['cases']} cases per length)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def focus_grid(snapshots: Sequence[dict], total_tokens: int, buckets: int) -> np.ndarray:
    """[snapshot, bucket] LOD of each equal stretch of the history in each snapshot: the
    finest LOD among the WC entries covering it; NaN where the history had not reached."""
    grid = np.full((len(snapshots), buckets), np.nan)
    edges = np.linspace(0, total_tokens, buckets + 1)
    for r, snap in enumerate(snapshots):
        for level, start, end, _ in snap["runs"]:
            covered = (edges[:-1] < end) & (edges[1:] > start)
            grid[r, covered] = np.fmin(grid[r, covered], level)
    return grid


def plot_focus_map(section: dict, path: Path, num_levels: int) -> None:
    """The LOD of every span of one stream across refocus steps (x: history position,
    y: refocus step, colour: LOD; white: not yet in the history)."""
    plt = _plt()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    snaps = section["snapshots"]
    total = max(s["num_tokens"] for s in snaps)
    buckets = int(max(1, min(256, total // max(1, section.get("block_size", 32)))))
    grid = focus_grid(snaps, total, buckets)
    colors = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd"][: num_levels + 1]
    cmap = ListedColormap(colors).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(-0.5, num_levels + 1), cmap.N)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(snaps)))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm,
                   interpolation="nearest", extent=(0, total, len(snaps) - 0.5, -0.5))
    span = section.get("needle_span")
    if span:
        for x in span:
            ax.axvline(x, color="black", lw=1.0, ls=":")
        ax.text(span[1], len(snaps) - 0.5, " needle", va="bottom", fontsize=8)
    ax.set_yticks(range(len(snaps)))
    ax.set_yticklabels([f"{i}: {s['stage']}" for i, s in enumerate(snaps)], fontsize=7)
    ax.set_xlabel("history position (tokens, oldest left)")
    ax.set_ylabel("refocus step")
    ax.set_title(f"focus map: {section.get('method', '')}, history {section.get('length')} "
                 f"tokens, stream {section.get('stream', 0)} (colour = LOD)", fontsize=9)
    cbar = fig.colorbar(im, ax=ax, ticks=range(num_levels + 1), pad=0.01)
    cbar.ax.set_yticklabels([f"LOD{i}" for i in range(num_levels + 1)])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown


def _f(x, fmt="{:+.4f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return fmt.format(x)


def _pm(stat: dict) -> str:
    if stat.get("mean") is None:
        return "n/a"
    se = stat.get("stderr")
    return _f(stat["mean"]) + ("" if se is None else f" ± {se:.4f}")


def _net_lines(meta: dict) -> list[str]:
    lines = []
    sources = meta.get("networks", {})
    for part in ("gist", "lens"):
        src = sources.get(part, {})
        name = NET_NAMES[part]
        if src.get("source") == "checkpoint":
            how = f" ({src['chosen_by']})" if src.get("chosen_by") else ""
            lines.append(f"- **{name}: trained**, from `{src['path']}` step {src['step']}{how}.")
        elif src.get("source") == "params_file":
            step = src.get("card_step", (src.get("card_source") or {}).get("step"))
            lines.append(f"- **{name}: trained**, params file `{src['path']}` (card "
                         f"`{src['card']}`" + (f", step {step}" if step is not None else "")
                         + ").")
        elif src.get("source") == "shipped":
            lines.append(f"- **{name}: trained, shipped** with the package: `{src.get('path')}`"
                         f" (card `{src.get('card')}`, step {src.get('step')}).")
        else:
            lines.append(f"- **{name}: UNTRAINED** (random init, seed {src.get('seed')}; "
                         f"{src.get('why', 'no checkpoint')}). Results that use it measure an "
                         f"untrained network, not the method.")
    lines.append("- Baselines without learned parts: full context, truncation, mean-pooled "
                 "embeddings, sliding window, random focus, recency focus, retrieval focus; the "
                 "untrained "
                 "GistNet is a baseline on purpose (the init training starts from, seed "
                 f"{sources.get('untrained_gist', {}).get('seed')}).")
    return lines


def _stat_cell(row: dict, mean: str, se: str, fmt="{:+.4f}") -> str:
    if row.get(mean) is None:
        return "n/a"
    se_fmt = " ± " + fmt.replace("+", "")
    return _f(row[mean], fmt) + ("" if row.get(se) is None else se_fmt.format(row[se]))


def _gap(row: dict) -> str:
    if row.get("gap_recovered") is None:
        return "n/a"
    return _stat_cell(row, "gap_recovered", "gap_recovered_se", "{:+.3f}")


def _paired_lines(rows: list[dict] | None, nll: dict) -> list[str]:
    """The paired-statistics table (every variant against truncation, same windows)."""
    if not rows:
        return []
    n = rows[0]["n"]
    out = ["### Paired against truncation", "",
           f"{n} held-out windows, each inside one document; the same windows and targets for "
           f"every variant. {metrics_note(nll)}", ""]
    if n < 64:
        out += [f"**Only {n} windows** (SPEC §2.9 asks for >= 64): SEs are rough.", ""]
    out += ["| layout | variant | n | ΔNLL ± se | variant − truncation ± se | significant | "
            "gap recovered ± se |", "| --- | --- | ---: | ---: | ---: | :---: | ---: |"]
    for r in rows:
        gap = _gap(r)
        out.append(f"| {r['layout']} | {VARIANT_LABELS.get(r['variant'], r['variant'])} | "
                   f"{r['n']} | {_stat_cell(r, 'delta_nll', 'delta_nll_se')} | "
                   f"{_stat_cell(r, 'mean_diff_vs_truncation', 'se')} | "
                   f"{'yes' if r['significant'] else 'no'} | {gap} |")
    out += ["", f"Per-window NLLs (and per-target NLLs, window offsets / document ids): "
                f"`{nll.get('per_window_file', 'per_window_nll.npz')}`.", ""]
    return out


def metrics_note(nll: dict) -> str:
    note = nll.get("paired_note")
    return (note[0].upper() + note[1:] + ".") if note else ""


def _ceiling_lines(section: dict | None) -> list[str]:
    out = ["## Ceiling: free vectors in the gist slots", ""]
    if not section or not section.get("layouts"):
        return out + [(section or {}).get("skipped", "not measured in this run (--only "
                                                      "ceiling)"), ""]
    out += [f"{section['windows']} held-out windows (the first of the ΔNLL sample); "
            f"{section['note']}.", "",
            "| layout | gists | start | fitted on | steps | lr (× emb. RMS) | "
            "KL start → end (truncation) | "
            "ΔNLL start "
            "| ΔNLL ceiling | ceiling − truncation ± se | gap recovered ± se | ΔNLL GistNet "
            "(same windows) | GistNet gap recovered |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: |"]
    for r in section["layouts"]:
        c, i, g = r["ceiling"], r["start"], r.get("gistnet") or {}
        out.append(f"| {r['layout']} | {r['lod2_gists'] + r['lod1_gists']} | "
                   f"{r.get('init', 'mean_pool')} | {r.get('fit', 'continuation')} | "
                   f"{r['steps']} | "
                   f"{r['learning_rate']:g} | {r['kl_start']['mean']:.4f} → "
                   f"{r['kl_ceiling']['mean']:.4f} ({r['kl_truncation']['mean']:.4f}) | "
                   f"{_stat_cell(i, 'delta_nll', 'delta_nll_se')}"
                   f" | {_stat_cell(c, 'delta_nll', 'delta_nll_se')} | "
                   f"{_stat_cell(c, 'mean_diff_vs_truncation', 'se')} | {_gap(c)} | "
                   f"{_stat_cell(g, 'delta_nll', 'delta_nll_se')} | {_gap(g)} |")
    out += ["", f"Per-window arrays: `{section.get('per_window_file', 'ceiling_per_window.npz')}`"
                f" (NLL full / truncation / start / ceiling, KL curves).", ""]
    return out


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    out = [f"# MegaContext evaluation — {meta['config_name']}", ""]
    out += [f"- base model: `{meta['base']}`; block size K = {meta['block_size']}, "
            f"{meta['num_levels']} gist levels, H = {meta['horizon']}",
            f"- command: `{meta['command']}`", f"- written {meta['time']} in "
            f"{meta.get('seconds', 0):.0f} s on {meta.get('device', '?')}", ""]
    out += ["## Networks", ""] + _net_lines(meta) + [""]

    nll = results.get("delta_nll")
    out += ["## ΔNLL@H vs compression ratio", ""]
    if nll and nll.get("layouts"):
        shown = [v for v in nll["variants"] if v != "full"]
        out += [f"{nll['windows']} held-out windows of {nll['window_len']} tokens. "
                f"{nll['targets'][0].upper()}{nll['targets'][1:]}.", "",
                "Context ratio = prefix tokens per slot of the compressed prefix (gists + raw "
                "tail); span ratio = tokens per gist in the gisted span.", "",
                "| layout | context ratio | span ratio | slots | NLL full | "
                + " | ".join(f"ΔNLL {VARIANT_LABELS.get(v, v)}" for v in shown) + " |",
                "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in shown)
                + " |"]
        for r in nll["layouts"]:
            d = r["delta_nll"]
            out.append(f"| {r['name']} | {r['context_ratio']:.1f} | {r['span_ratio']:.0f} | "
                       f"{r['prefix_slots']} | {r['nll']['full']:.4f} | "
                       + " | ".join(_pm(d[v]) if v in d else "n/a" for v in shown) + " |")
        out += [""] + [f"- {v}: {why}" for v, why in
                       (nll.get("skipped_variants") or {}).items()]
        out += ["", "![ΔNLL@H vs compression ratio](dnll_vs_ratio.png)", ""]
        out += _paired_lines(results.get("dnll_paired"), nll)
    else:
        out += [(nll or {}).get("skipped", "not measured in this run"), ""]

    out += _ceiling_lines(results.get("ceiling"))

    pk = results.get("passkey")
    out += ["## Passkey retrieval vs history length", ""]
    if pk and pk.get("methods"):
        out += [f"Task: {pk.get('task', 'passkey')} — "
                f"{pk.get('task_note', 'one needle, phrased like the question')}.", "",
                f"W_max = {pk['w_max']}; {pk['cases']} cases per length (needle depths evenly "
                f"spaced); haystack: {pk['haystack']}; {pk['max_new_tokens']} greedy tokens; "
                f"MegaContext sessions feed the bulk of the history at once, then the last "
                f"{pk['refocus_steps']} blocks one refocus at a time.", "",
                f"Scoring: {pk['scoring']} Brackets: Wilson 95 % intervals.", ""]
        lengths = pk["lengths"]
        out += ["| method | " + " | ".join(f"{L} tokens" for L in lengths) + " |",
                "| --- | " + " | ".join("---:" for _ in lengths) + " |"]
        for method, per in pk["methods"].items():
            cells = []
            for L in lengths:
                r = per.get(str(L), {"status": "not run"})
                ci = r.get("ci95") if r["status"] == "ok" else None
                cells.append(f"{r['correct']}/{r['n']} = {r['accuracy']:.2f}"
                             + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                             if r["status"] == "ok" else r["status"])
            out.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
        recall_rows = []
        for method, per in pk["methods"].items():
            rs = [per.get(str(L), {}) for L in lengths]
            if not any("focus_recall" in r for r in rs):
                continue
            cells = []
            for r in rs:
                if "focus_recall" not in r:
                    cells.append(r.get("status", "not run"))
                    continue
                lo, hi = metrics.wilson_interval(r["focus_recall"], r["n"])
                both = sum(bool(raw) and bool(e.get("found")) for raw, e in
                           zip(r.get("answer_raw", []), r.get("examples", [])))
                cells.append(f"{r['focus_recall']}/{r['n']} [{lo:.2f}, {hi:.2f}]; "
                             f"read right when raw: {both}/{r['focus_recall']}")
            recall_rows.append(f"| {METHOD_LABELS.get(method, method)} | "
                               + " | ".join(cells) + " |")
        if recall_rows:
            out += ["", "Focus recall: cases whose answer tokens (the needle's key digits) "
                    "were raw in the working context when the answer started, and how many "
                    "of those the reader then answered right (focus failures and reading "
                    "failures apart).", "",
                    "| method | " + " | ".join(f"{L} tokens" for L in lengths) + " |",
                    "| --- | " + " | ".join("---:" for _ in lengths) + " |"] + recall_rows
        out += ["", "![accuracy vs history length](accuracy_vs_length.png)", ""]
        notes = pk.get("notes") or []
        out += [f"- {n}" for n in notes] + ([""] if notes else [])
    else:
        out += [(pk or {}).get("skipped", "not measured in this run"), ""]

    fq = results.get("focus_quality")
    out += ["## Focus quality: scores vs measured counterfactual utility", ""]
    if fq and fq.get("scorers"):
        out += [f"{fq['windows']} held-out windows, {fq['candidates']} candidate actions "
                f"({fq['expand_candidates']} expansions, {fq['collapse_candidates']} "
                f"collapses); mean |value| {_f(fq['value_mean_abs'], '{:.4f}')} nats/token. "
                f"{fq['definition']}.", "",
                "| scorer | n | Pearson (value) | Spearman (value) | sign agreement "
                "(normalised utility) | Pearson expand | Pearson collapse |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for s, row in fq["scorers"].items():
            v, u = row["vs_value"], row["vs_normalised_utility"]
            sign = (f"{u['sign_agreement']:.2f} (n={u['n_sign']})"
                    if u["sign_agreement"] is not None else "n/a (n=0)")
            label = s + (" (UNTRAINED)" if s == "lens" and "lens" in meta.get("untrained", [])
                         else "")
            deg = f" ({v['degenerate']})" if v.get("degenerate") else ""
            out.append(f"| {label} | {v['n']} | {_f(v['pearson'])}{deg} | {_f(v['spearman'])} "
                       f"| {sign} | {_f(row['expand_vs_value']['pearson'])} | "
                       f"{_f(row['collapse_vs_value']['pearson'])} |")
        out.append("")
    else:
        out += [(fq or {}).get("skipped", "not measured in this run"), ""]

    fm = results.get("focus_map")
    out += ["## Focus map", ""]
    if fm and fm.get("snapshots"):
        out += [f"{METHOD_LABELS.get(fm['method'], fm['method'])}, stream {fm['stream']} of "
                f"the {fm['length']}-token passkey run (needle at tokens "
                f"{fm['needle_span'][0]}–{fm['needle_span'][1]}): the LOD of every span after "
                f"each refocus (red = raw tokens).", "", "![focus map](focus_map.png)", "",
                "Final focus (runs of equal LOD, oldest first):", "", "```",
                fm.get("text", ""), "```", ""]
    else:
        out += ["not recorded in this run", ""]
    return "\n".join(out)


def _json_default(x: Any):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def plots_with_data(results: dict) -> dict[str, Callable[[Path], None]]:
    """{file name: writer} of the plots whose section this run measured (a plot of a
    section that was not run is not written, rather than written empty)."""
    nll, passkey, fmap = (results.get(k) for k in ("delta_nll", "passkey", "focus_map"))
    plots = {}
    if nll and nll.get("layouts"):
        plots["dnll_vs_ratio.png"] = lambda p: plot_dnll_vs_ratio(nll, p, results.get("ceiling"))
    if passkey and passkey.get("methods"):
        plots["accuracy_vs_length.png"] = lambda p: plot_accuracy_vs_length(passkey, p)
    if fmap and fmap.get("snapshots"):
        plots["focus_map.png"] = lambda p: plot_focus_map(fmap, p, results["meta"]["num_levels"])
    return plots


def write_outputs(results: dict, out_dir: str | Path) -> dict[str, str]:
    """Write results.json, report.md, the PNGs of the sections measured (a PNG of this
    name left from an earlier run into `out_dir` is removed, so none is stale) and the
    "arrays" entry's .npz files into `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = results.get("arrays") or {}
    results = {k: v for k, v in results.items() if k != "arrays"}
    plots = plots_with_data(results)
    paths = {"results": out / "results.json", "report": out / "report.md",
             **{p.removesuffix(".png"): out / p for p in plots}}
    for name, arrs in arrays.items():
        if arrs:
            paths[name.removesuffix(".npz")] = out / name
            np.savez(out / name, **arrs)
    results["files"] = sorted(p.name for p in paths.values())
    paths["results"].write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    for name in PLOTS:
        if name in plots:
            plots[name](out / name)
        else:
            (out / name).unlink(missing_ok=True)
    paths["report"].write_text(render_markdown(results))
    return {k: str(v) for k, v in paths.items()}
