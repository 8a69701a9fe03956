"""Stage report: compare runs — one or a sweep's points — in the source report's tables, plots and figure grids.

Inputs: the run directories of ``report.runs`` (default: this run), each with its ``config.yaml`` and ``DONE``
markers. Runs are grouped by (method, ``cls.split``); a group's runs differ in their seeds. Tables (the source
report's Tables 1–3): per group, CAM mIoU on train at the background threshold and the sweep's best, after the
random walk, DeepLab val mIoU, each as mean ± std over the seeds with n; per-class IoU per stage (group means); one
row per run with its status (a failed run is shown as failed). Figures (matplotlib): bars with error bars per group
and stage (``bars.png``), a per-class IoU heat map per stage (``iou_<stage>.png``), and the qualitative grids
for the same images across groups: image | each group's CAM | pseudo label | DeepLab | ground truth
(``cams.png``, ``predictions.png``). Outputs: ``report/report.md``, ``report/report.html`` (embeds every figure),
``report/results.json`` (every number and each run's config), the PNGs.
"""
from __future__ import annotations

import html
import io
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import runs, viz
from ..config import Config, load_yaml
from ..data.records import CAM_KEYS, LABEL_KEYS, decode_cam, decode_label
from ..data.shards import load_manifest, manifest_classes, read_shard, split_ids, split_urls
from ..data.datasets import dataset_classes
from ..data.voc import PALETTE
from ..errors import DataError
from ..registry import DATASETS, METHODS, STAGE_SPECS, TRAINERS

logger = logging.getLogger(__name__)

STAGES = tuple((s.name, key, title) for s in STAGE_SPECS.values() for key, title in s.report)  # the table columns
CHAIN = tuple(s.name for s in STAGE_SPECS.values() if s.uses_gpu and not s.optional)  # every run's GPU stages: its status


def load_run(run: Path) -> dict[str, Any]:
    """A run's config (plain data), its stages' DONE metrics and its status (done | failed at / stopped before X)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_yaml(run / "config.yaml")) if (run / "config.yaml").is_file() else {}
    done = {st: runs.read_done(run, st) for st in ("teacher", *CHAIN) if runs.is_done(run, st)}
    method = METHODS.get(str(cfg.get("method")))
    missing = [st for st in CHAIN if st not in done and not (method and st in method.skips)]  # clip_es: no cls
    status = "done" if not missing else f"incomplete: no {missing[0]}"
    return {"run": str(run), "name": run.name, "config": cfg, "done": done, "status": status,
            "method": cfg.get("method", "?") + ("+irn" if cfg.get("refine") == "irn" else ""), "split": (cfg.get("cls") or {}).get("split", "?"),
            "seed": ((cfg.get("cls") or {}).get("train") or {}).get("seed")}


def mean_std(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std" (sample std, 0 for one value), "n"}`` of the finite values (mean None when there is none)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, "n": len(xs)}


def groups(points: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs grouped by (method, split), in first-seen order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        out.setdefault((p["method"], p["split"]), []).append(p)
    return out


def class_means(ious: np.ndarray) -> list[float | None]:
    """Per-class mean over runs [R, C] of the IoUs that exist (NaN: class absent); None where no run has one."""
    seen = ~np.isnan(ious)
    n = seen.sum(0)
    total = np.where(seen, ious, 0.0).sum(0)
    return [float(t / k) if k else None for t, k in zip(total, n)]


def summary_rows(grouped: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """Per group: every headline figure as mean ± std over its runs, and per stage the per-class IoU means."""
    rows = []
    for (method, split), ps in grouped.items():
        row: dict[str, Any] = {"method": method, "split": split, "runs": [p["name"] for p in ps]}
        for stage, key, title in STAGES:
            row[title] = mean_std([p["done"].get(stage, {}).get(key) for p in ps])
        for stage in ("cam", "pseudo", "eval"):
            ious = [p["done"].get(stage, {}).get("iou") for p in ps]
            ious = [np.array([np.nan if x is None else x for x in v], float) for v in ious if v]
            row[f"iou_{stage}"] = None if not ious else class_means(np.stack(ious))
        rows.append(row)
    return rows


def _pct(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    if s["n"] == 1:  # one run: no spread to show
        return f"{100 * s['mean']:.1f} (n=1)"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={s['n']})"


def stage_times(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Per run: each finished stage's minutes, the total and the GPU-hours (seconds × GPUs the stage used)."""
    stages = [st for st in ("teacher", *CHAIN) if any(st in p["done"] for p in points)]
    rows = []
    for p in points:
        gpu_h = 0.0
        for st in stages:
            if st in p["done"]:
                env = _environment(Path(p["run"]) / st)
                gpu_h += float(p["done"][st].get("seconds", 0)) * env.get("gpus_used", 0) / 3600
        total = sum(float(p["done"][st].get("seconds", 0)) for st in stages if st in p["done"]) / 60
        rows.append([p["name"], *[f"{p['done'][st]['seconds'] / 60:.1f}" if "seconds" in p["done"].get(st, {}) else "–"
                                  for st in stages], f"{total:.1f}", f"{gpu_h:.2f}"])
    return ["run", *[f"{st} (min)" for st in stages], "total (min)", "GPU-hours"], rows


def recipes(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Per run: the method, networks, weights and training lengths that made its numbers (a stage the method does not
    run, e.g. clip_es's cls, shows –, not the unused config value)."""
    def get(cfg: dict, key: str) -> str:
        method = METHODS.get(str(cfg.get("method")))
        if method and key.split(".")[0] in method.skips:
            return "–"
        if key == "aff.init" and cfg.get("refine") == "irn":  # IRN's boundary network starts from irn.init
            return f"{get(cfg, 'irn.init')} (irn.init)"
        for part in key.split("."):
            cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
        return "–" if cfg in ({}, None, "") else str(cfg)

    keys = ("method", "refine", "model.backbone", "model.weights", "cls.train.steps", "cls.train.batch_size", "aff.init",
            "seg.backbone", "seg.init", "seg.weights", "seg.train.steps")
    return ["run", *keys], [[p["name"], *[get(p["config"], k) for k in keys]] for p in points]


def _environment(stage_dir: Path) -> dict:
    try:
        env = runs.read_json(stage_dir / "environment.json")
    except (OSError, ValueError):
        return {}
    return env if isinstance(env, dict) else {}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table border=1 cellpadding=3 style='border-collapse:collapse'><tr>{th}</tr>{trs}</table>"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def bar_figure(rows: list[dict]) -> bytes:
    """Grouped bars: one group of bars per stage, one bar per (method, split), error bars = std over seeds."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(STAGES) * max(1, len(rows))), 4))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        means = [100 * (r[t]["mean"] or 0) for *_, t in STAGES]
        stds = [100 * (r[t]["std"] or 0) for *_, t in STAGES]
        xs = np.arange(len(STAGES)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=f"{r['method']} ({r['split']})")
    ax.set_xticks(np.arange(len(STAGES)), [t.replace(" (", "\n(") for *_, t in STAGES])
    ax.set_ylabel("mIoU (%)")
    ax.set_title("mIoU per method and stage (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    data = _png(fig)
    plt.close(fig)
    return data


def loss_curves(run: Path, stage: str) -> list[tuple[int, float]]:
    """The training loss of a run's trainer stage as (step, loss), from its TensorBoard events ([] when none)."""
    tb = run / stage / "tb"
    if not tb.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags().get("scalars", []) if t.endswith("/loss")]
    return [(e.step, e.value) for t in tags for e in events.Scalars(t)]


def loss_figure(points: list[dict]) -> bytes | None:
    """Training loss against step, one panel per trainer stage, one line per run (None when no run has curves)."""
    import matplotlib.pyplot as plt

    stages = [st for st in TRAINERS if any(loss_curves(Path(p["run"]), st) for p in points)]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.2), squeeze=False)
    for ax, st in zip(axes[0], stages):
        for p in points:
            curve = loss_curves(Path(p["run"]), st)
            if curve:
                ax.plot(*zip(*sorted(curve)), label=p["name"], linewidth=1)
        ax.set_title(f"{st}: training loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    data = _png(fig)
    plt.close(fig)
    return data


def iou_figure(rows: list[dict], stage: str, title: str, classes: Sequence[str]) -> bytes | None:
    """A heat map of per-class IoU (%): rows = (method, split), columns = background + the dataset's classes."""
    import matplotlib.pyplot as plt

    mats = [(f"{r['method']} ({r['split']})", r[f"iou_{stage}"]) for r in rows if r[f"iou_{stage}"]]
    if not mats:
        return None
    m = np.array([[np.nan if x is None else 100 * x for x in v] for _, v in mats])
    names = ["bg", *classes][: m.shape[1]]
    parts = [range(s, min(s + WIDE, m.shape[1])) for s in range(0, m.shape[1], WIDE)]  # COCO: 4 panels of ≤ 21
    fig, axes = plt.subplots(len(parts), 1, figsize=(12, len(parts) * (0.5 * len(mats) + 1.6)), squeeze=False,
                             layout="constrained" if len(parts) > 1 else None)  # panels: room for their labels
    for ax, cols in zip(axes[:, 0], parts):
        sub = m[:, cols.start:cols.stop]
        im = ax.imshow(sub, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(cols)), names[cols.start:cols.stop], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(mats)), [n for n, _ in mats], fontsize=8)
        for i in range(sub.shape[0]):
            for j in range(sub.shape[1]):
                if not np.isnan(sub[i, j]):
                    ax.text(j, i, f"{sub[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if sub[i, j] < 50 else "black")
        fig.colorbar(im, ax=ax, label="IoU (%)")
    axes[0, 0].set_title(title)
    data = _png(fig)
    plt.close(fig)
    return data


def _find(url_dir: Path, names: list[str], keys: tuple[str, ...], wanted: set[str], num_labels: int) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for name in names:
        if not (url_dir / name).exists():
            continue
        for s in read_shard(str(url_dir / name), keys, num_labels=num_labels):
            if s["__key__"] in wanted:
                found[s["__key__"]] = s
        if len(found) == len(wanted):
            break
    return found


def grid_figure(rows: list[list[np.ndarray | None]], titles: list[str], classes: Sequence[str],
                colours: np.ndarray = PALETTE, present: set[int] | None = None) -> bytes:
    """A titled grid of pictures (None: an empty cell) with a legend of the dataset's classes in its palette (more
    than VOC's 21 labels: only those in ``present``, the labels the grid shows)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(rows), len(titles), figsize=(1.9 * len(titles), 1.7 * len(rows) + 0.8), squeeze=False)
    for i, row in enumerate(rows):
        for j, pic in enumerate(row):
            ax = axes[i][j]
            ax.axis("off")
            if pic is not None:
                ax.imshow(pic)
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    entries = viz.legend_entries(classes, colours, present, most=WIDE)
    ncol = max(1, min(len(entries), 7))  # VOC: 7 columns, 3 rows (as before)
    legend_rows = -(-len(entries) // ncol)
    fig.legend(handles=[Patch(color=np.array(rgb) / 255, label=n) for _, n, rgb in entries],
               loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=min(0.5, max(0.12, 0.2 * legend_rows / (1.7 * len(rows) + 0.8))))  # room for its rows
    data = _png(fig)
    plt.close(fig)
    return data


def figures(cfg: Config, grouped: dict[tuple[str, str], list[dict]], out: Path) -> list[str]:
    """The qualitative grids (the first run of each group), same images across groups; their file names."""
    manifest = load_manifest(cfg.shards_dir, verify=False)
    labels_count = len(manifest_classes(manifest)) + 1
    reps = [(f"{m} ({s})", Path(ps[0]["run"])) for (m, s), ps in grouped.items()]
    written = []
    for split, ids_split, stages, name in ((cfg.cam.split, cfg.cam.eval_split, ("cam", "pseudo"), "cams.png"),
                                           ("val", "val", ("eval",), "predictions.png")):
        names = [Path(u).name for u in split_urls(cfg.shards_dir, split, manifest)]
        wanted = set(split_ids(manifest, ids_split)[: cfg.report.num_images])
        if not wanted:
            continue
        base = _find(cfg.shards_dir, names, ("jpg", "seg.png?"), wanted, labels_count)
        found = {(r, st): _find(r / st, names, CAM_KEYS if st == "cam" else LABEL_KEYS, wanted, labels_count)
                 for _, r in reps for st in stages}
        titles = ["image"] + [f"{ {'cam': 'CAM', 'pseudo': 'pseudo', 'eval': 'DeepLab'}[st]} {g}" for st in stages
                              for g, _ in reps] + ["ground truth"]
        rows, present = [], set()
        colours = viz.palette(cfg.data.name)
        for k in sorted(base):
            img = base[k]["jpg"]
            row: list[np.ndarray | None] = [img]
            for st in stages:
                for _, r in reps:
                    s = found[(r, st)].get(k)
                    if s is None:
                        row.append(None)
                    elif st == "cam":
                        row.append(viz.overlay(img, viz.heatmap(decode_cam(s)[0].numpy())))
                    else:
                        label = decode_label(s)
                        present.update(np.unique(label).tolist())
                        row.append(viz.colorize(label, colours))
            gt = base[k].get("seg.png")
            if gt is not None:
                present.update(np.unique(gt).tolist())
            row.append(viz.colorize(gt, colours) if gt is not None else None)
            rows.append(row)
        if rows:
            runs.atomic_write(out / name, grid_figure(rows, titles, manifest_classes(manifest), colours, present))
            written.append(name)
    return written


WIDE = DATASETS["voc"].num_labels  # per-class tables and heat maps up to VOC's width keep one column per class


def per_class_table(rows: list[dict], stage: str, classes: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The per-class IoU (%) table of ``stage``: one row per (method, split) and a column per class; with more labels
    than :data:`WIDE` (COCO's 81) transposed, one row per class sorted by the first group's IoU, best first."""
    names = ["bg", *classes]
    cells = [["–"] * len(names) if not r[f"iou_{stage}"] else
             ["–" if x is None else f"{100 * x:.1f}" for x in r[f"iou_{stage}"]] for r in rows]
    if len(names) <= WIDE:
        return ["method", "split", *names], [[r["method"], r["split"], *c] for r, c in zip(rows, cells)]
    first = next((r[f"iou_{stage}"] for r in rows if r[f"iou_{stage}"]), None) or [None] * len(names)
    order = sorted(range(len(names)), key=lambda i: (first[i] is None, -(first[i] or 0.0), i))
    return (["class", *(f"{r['method']} ({r['split']})" for r in rows)],
            [[names[i], *(c[i] if i < len(c) else "–" for c in cells)] for i in order])


def report_classes(cfg: Config, rows: list[dict]) -> tuple[str, ...]:
    """The class names of the report's columns: the dataset's (registry, manifest or labels file); when those cannot
    be read, ``class 1``.. as many as the runs' per-class IoUs have."""
    try:
        return dataset_classes(cfg)
    except (DataError, OSError):
        n = max((len(r[f"iou_{st}"]) for r in rows for st in ("cam", "pseudo", "eval") if r.get(f"iou_{st}")), default=1)
        return tuple(f"class {i}" for i in range(1, n))


def run(cfg: Config) -> dict:
    """Write report.md, report.html, results.json and the figures for ``report.runs`` (default: this run)."""
    import matplotlib

    matplotlib.use("Agg")
    points = [load_run(Path(r)) for r in (cfg.report.runs or (str(cfg.run_dir),))]
    grouped = groups(points)
    rows = summary_rows(grouped)
    classes = report_classes(cfg, rows)
    out = runs.stage_dir(cfg.run_dir, "report")
    header = ["method", "split", *[t for *_, t in STAGES]]
    table = [[r["method"], r["split"], *[_pct(r[t]) for *_, t in STAGES]] for r in rows]
    run_header = ["run", "method", "split", "seed", "status", *[t for *_, t in STAGES]]
    run_rows = [[p["name"], p["method"], p["split"], str(p["seed"]), p["status"],
                 *["–" if p["done"].get(st, {}).get(k) is None else f"{100 * p['done'][st][k]:.1f}" for st, k, _ in STAGES]]
                for p in points]
    pics: list[str] = []
    runs.atomic_write(out / "bars.png", bar_figure(rows))
    pics.append("bars.png")
    losses = loss_figure(points)
    if losses is not None:
        runs.atomic_write(out / "losses.png", losses)
        pics.append("losses.png")
    for stage, title in (("cam", "CAM per-class IoU (train)"), ("pseudo", "Pseudo-label per-class IoU (train)"),
                         ("eval", "DeepLab per-class IoU (val)")):
        data = iou_figure(rows, stage, title, classes)
        if data is not None:
            runs.atomic_write(out / f"iou_{stage}.png", data)
            pics.append(f"iou_{stage}.png")
    if (cfg.shards_dir / "manifest.json").is_file():
        pics += figures(cfg, grouped, out)
    else:
        logger.warning("report: no shards in %s: no image grids", cfg.shards_dir)
    finals = [(r["DeepLab (val)"]["mean"], f"{r['method']} ({r['split']})") for r in rows if r["DeepLab (val)"]["mean"] is not None]
    best = max(finals) if finals else None
    summary = (f"Best final val mIoU: {100 * best[0]:.1f} ({best[1]}, mean over seeds)." if best else "No run has finished eval yet.")
    failed = [p["name"] for p in points if p["status"] != "done"]
    if failed:
        summary += f" Not finished: {', '.join(failed)}."
    md = ["# wsss-dist report", "", summary, "", "## mIoU (%) per method: mean ± std over seeds (n)", "",
          markdown(header, table), "", "## Runs", "", markdown(run_header, run_rows), ""]
    page = [f"<h1>wsss-dist report</h1><p>{html.escape(summary)}</p><h2>mIoU (%) per method: mean ± std over seeds (n)</h2>",
            html_table(header, table), "<h2>Runs</h2>", html_table(run_header, run_rows)]
    for title, (h, t) in (("Stage times and GPU-hours", stage_times(points)), ("Recipes", recipes(points))):
        md += [f"## {title}", "", markdown(h, t), ""]
        page += [f"<h2>{title}</h2>", html_table(h, t)]
    for stage, title in (("cam", "CAM per-class IoU (train)"), ("pseudo", "Pseudo-label per-class IoU (train)"),
                         ("eval", "DeepLab per-class IoU (val)")):
        h, t = per_class_table(rows, stage, classes)
        md += [f"## {title} (mean over seeds)", "", markdown(h, t), ""]
        page += [f"<h2>{html.escape(title)} (mean over seeds)</h2>", html_table(h, t)]
    for p in pics:
        md += [f"## {p}", "", f"![{p}]({p})", ""]
        page.append(f"<h2>{p}</h2><img src='{p}' style='max-width:100%'>")
    runs.atomic_write(out / "report.md", "\n".join(md))
    runs.atomic_write(out / "report.html", "<html><head><meta charset='utf-8'></head><body>" + "\n".join(page) + "</body></html>")
    runs.write_json(out / "results.json", {"groups": rows, "runs": points})
    return {"runs": [p["run"] for p in points], "figures": pics, "groups": len(rows), "failed": failed,
            "best": best[1] if best else None}
