"""Stage report: compare runs (methods) in tables and figure grids.

Tables (like the seed report's Tables 1–3): per run, the method, CAM mIoU on train (at the bg threshold and the
sweep's best), after AffinityNet + random walk, and the final DeepLab val mIoU; plus per-class IoU.
Figures: ``cams.png`` (rows = train images; columns = input, each run's CAM heat map, each run's pseudo label,
ground truth) and ``predictions.png`` (rows = val images; input, each run's DeepLab prediction, ground truth).
Outputs: ``report/report.md``, ``report/report.html``, the PNGs.
"""
from __future__ import annotations

import html
import io
import logging
from pathlib import Path

import numpy as np

from .. import runs, viz
from ..config import Config, load_yaml
from ..data.records import CAM_KEYS, LABEL_KEYS, decode_cam, decode_label
from ..data.shards import load_manifest, read_shard, split_ids, split_urls
from ..data.voc import CLASSES

logger = logging.getLogger(__name__)


def _done(run: Path, stage: str) -> dict:
    return runs.read_done(run, stage) if runs.is_done(run, stage) else {}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(run_dirs: list[Path]) -> tuple[list[str], list[list[str]]]:
    """The main comparison table: header and one row per run."""
    header = ["run", "method", "CAM mIoU (train)", "CAM best (thr)", "after RW (train)", "DeepLab val mIoU"]
    rows = []
    for r in run_dirs:
        cfg = load_yaml(r / "config.yaml") if (r / "config.yaml").exists() else {}
        cam, pseudo, ev = _done(r, "cam"), _done(r, "pseudo"), _done(r, "eval")
        best = f"{_pct(cam.get('best_miou'))} ({cam.get('best_threshold', '–')})" if cam else "–"
        rows.append([r.name, cfg.get("method", "?"), _pct(cam.get("miou")), best, _pct(pseudo.get("miou")), _pct(ev.get("miou"))])
    return header, rows


def class_table(run_dirs: list[Path], stage: str) -> tuple[list[str], list[list[str]]]:
    """Per-class IoU of ``stage`` (cam, pseudo or eval) for every run."""
    header = ["run"] + ["bg"] + list(CLASSES)
    rows = []
    for r in run_dirs:
        iou = _done(r, stage).get("iou") or [None] * 21
        rows.append([r.name] + [_pct(x) for x in iou])
    return header, rows


def _find(url_dir: Path, names: list[str], keys: tuple[str, ...], wanted: set[str]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for name in names:
        if not (url_dir / name).exists():
            continue
        for s in read_shard(str(url_dir / name), keys):
            if s["__key__"] in wanted:
                found[s["__key__"]] = s
        if len(found) == len(wanted):
            break
    return found


def figures(cfg: Config, run_dirs: list[Path], out: Path) -> list[str]:
    """Write the figure grids; returns their file names."""
    manifest = load_manifest(cfg.shards_dir, verify=False)
    written = []
    for split, ids_split, stages, name in ((cfg.cam.split, cfg.cam.eval_split, ("cam", "pseudo"), "cams.png"),
                                           ("val", "val", ("eval",), "predictions.png")):
        urls = split_urls(cfg.shards_dir, split, manifest)
        names = [Path(u).name for u in urls]
        wanted = set(split_ids(manifest, ids_split)[: cfg.report.num_images])
        if not wanted:
            continue
        base = _find(cfg.shards_dir, names, ("jpg", "seg.png?"), wanted)
        keys = sorted(base)
        per_stage = {(r, st): _find(r / st, names, CAM_KEYS if st == "cam" else LABEL_KEYS, wanted)
                     for r in run_dirs for st in stages}
        titles = ["input"] + [f"{st} {r.name}" for st in stages for r in run_dirs] + ["ground truth"]
        rows = []
        for k in keys:
            img = base[k]["jpg"]
            row = [img]
            for st in stages:
                for r in run_dirs:
                    s = per_stage[(r, st)].get(k)
                    if s is None:
                        row.append(np.full_like(img, 255))
                    elif st == "cam":
                        cams, _ = decode_cam(s)
                        row.append(viz.overlay(img, viz.heatmap(cams.numpy())))
                    else:
                        row.append(viz.colorize(decode_label(s)))
            gt = base[k].get("seg.png")
            row.append(viz.colorize(gt) if gt is not None else np.full_like(img, 255))
            rows.append(row)
        if rows:
            buf = io.BytesIO()
            viz.grid(rows, titles).save(buf, format="PNG")
            runs.atomic_write(out / name, buf.getvalue())
            written.append(name)
    return written


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table border=1 cellpadding=3><tr>{th}</tr>{trs}</table>"


def run(cfg: Config) -> dict:
    """Write report.md, report.html and the figure grids for ``report.runs`` (default: this run)."""
    run_dirs = [Path(r) for r in cfg.report.runs] or [cfg.run_dir]
    out = runs.stage_dir(cfg.run_dir, "report")
    header, rows = table(run_dirs)
    pics = figures(cfg, run_dirs, out)
    best = max(rows, key=lambda r: float(r[5]) if r[5] != "–" else -1)
    summary = f"Best final val mIoU: {best[5]} ({best[1]}, run {best[0]})." if best[5] != "–" else "No run has finished eval yet."
    md = ["# wsss-dist report", "", summary, "", "## mIoU (%) per method", "", markdown(header, rows), ""]
    page = [f"<h1>wsss-dist report</h1><p>{html.escape(summary)}</p><h2>mIoU (%) per method</h2>", html_table(header, rows)]
    for stage, title in (("cam", "CAM per-class IoU (train)"), ("pseudo", "Pseudo-label per-class IoU (train)"), ("eval", "DeepLab per-class IoU (val)")):
        h, r = class_table(run_dirs, stage)
        md += [f"## {title}", "", markdown(h, r), ""]
        page += [f"<h2>{html.escape(title)}</h2>", html_table(h, r)]
    for p in pics:
        md += [f"## {p}", "", f"![{p}]({p})", ""]
        page.append(f"<h2>{p}</h2><img src='{p}'>")
    runs.atomic_write(out / "report.md", "\n".join(md))
    runs.atomic_write(out / "report.html", "<html><body>" + "\n".join(page) + "</body></html>")
    return {"runs": [str(r) for r in run_dirs], "figures": pics, "best": best[0]}
