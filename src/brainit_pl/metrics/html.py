"""``report.html``: one self-contained page of a run — ground truth beside each stage, metrics with intervals,
figures (brain maps, cluster maps, grids).

Every picture is embedded as a base64 PNG, so the page opens from disk, by mail or in a browser on another
machine, with nothing beside it. Written by ``brainit-pl evaluate`` (``OUT/report.html``), ``reconstruct`` and
``brainit-pl test`` (``<reconstruct folder>/report.html``, every stage) and the demo (``OUT/report/report.html``).

    write_html_report(path, title=..., results={"semantic": metrics_json}, galleries=[...], figures=[...])
    reconstruction_report(folder)   # a `brainit-pl reconstruct` folder: its stages, metrics and images
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from brainit_pl.files import atomic_write_text
from brainit_pl.metrics.folders import RECON_KINDS, SUBJECT_DIR, list_pngs
from brainit_pl.metrics.report import HEADERS, format_value, version_label
from brainit_pl.metrics.suite import METRIC_NAMES

STAGES = (*RECON_KINDS, "linear")  # reconstruct's stages, then the linear baseline's (workflows.baseline)
THUMBNAIL = 112  # pixels per gallery image
GALLERY_IMAGES = 8  # images per subject in a gallery
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: center; }
td small { color: #777; }
.gallery td { padding: 2px; } .gallery img { display: block; }
figure { display: inline-block; margin: 0.5em; } figure img { max-width: 100%; }
pre { background: #f6f6f6; padding: 1em; overflow: auto; }
"""


@dataclass(frozen=True)
class Gallery:
    """One subject's images: the ground truth beside each column (stage) of the same file names."""

    subject: str
    gt_dir: Path
    columns: Mapping[str, Path]  # label (a stage) → folder of PNGs
    names: Sequence[str]


def png_data_uri(source: str | os.PathLike | Image.Image, size: int | None = None) -> str:
    """A PNG (file or PIL image) as a ``data:`` URI, resized to ``size`` × ``size`` when given."""
    image = source if isinstance(source, Image.Image) else Image.open(source)
    image = image.convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _cell(name: str, value: float | None, bounds: Sequence[float] | None) -> str:
    text = html.escape(format_value(name, value))
    if bounds:
        text += f"<br><small>[{format_value(name, bounds[0])}, {format_value(name, bounds[1])}]</small>"
    return f"<td>{text}</td>"


def metrics_table(label: str, results: Mapping[str, Any]) -> str:
    """One stage's metrics.json as a table: a row per subject and the mean, each value with its interval."""
    header = "".join(f"<th>{html.escape(HEADERS[n])}</th>" for n in METRIC_NAMES)
    rows = []
    ci = results.get("ci") or {}
    entries = [(s, row, ci.get(s, {})) for s, row in results["per_subject"].items()]
    if len(entries) > 1 or (entries and entries[0][0] != "all"):
        entries.append(("mean", results["mean"], results.get("mean_ci") or {}))
    for subject, row, bounds in entries:
        cells = "".join(_cell(n, row.get(n), bounds.get(f"{n}_ci")) for n in METRIC_NAMES)
        rows.append(f"<tr><th>{html.escape(subject)}</th>{cells}</tr>")
    method = results.get("ci_method") or {}
    level = f"{100 * method.get('level', 0.95):.0f}%"
    note = f"{level} bootstrap intervals over images in brackets." if ci else "No intervals (--n-boot 0)."
    return (
        f"<h3>{html.escape(label)}</h3><p>{html.escape(version_label(results))}, "
        f"{results.get('n_images', '?')} test images. {note}</p>"
        f"<table><tr><th>subject</th>{header}</tr>{''.join(rows)}</table>"
    )


def gallery_table(gallery: Gallery, n_images: int = GALLERY_IMAGES) -> str:
    """Ground truth | each column, one row per image (the first ``n_images``), as embedded thumbnails."""
    labels = ["ground truth", *gallery.columns]
    folders = [gallery.gt_dir, *gallery.columns.values()]
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    rows = []
    for name in list(gallery.names)[:n_images]:
        cells = [_thumbnail(Path(folder) / name, f"{label} {name}") for label, folder in zip(labels, folders)]
        rows.append(f"<tr><th>{html.escape(Path(name).stem)}</th>{''.join(cells)}</tr>")
    return (
        f"<h3>{html.escape(gallery.subject)}</h3>"
        f'<table class="gallery"><tr><th>image</th>{head}</tr>{"".join(rows)}</table>'
    )


def _thumbnail(path: Path, alt: str) -> str:
    """A table cell with the image at ``path`` as a thumbnail, "—" when it is missing."""
    return f"<td>{_img(png_data_uri(path, THUMBNAIL), alt)}</td>" if path.is_file() else "<td>—</td>"


def figure(path: str | os.PathLike, caption: str | None = None) -> str:
    """An embedded PNG with its caption (the file name's stem by default)."""
    caption = caption or Path(path).stem.replace("_", " ")
    return (
        f"<figure>{_img(png_data_uri(path), caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def write_html_report(
    path: str | os.PathLike,
    *,
    title: str,
    results: Mapping[str, Mapping[str, Any]] | None = None,
    galleries: Iterable[Gallery] = (),
    figures: Iterable[str | os.PathLike] = (),
    notes: Sequence[str] = (),
    summary: Mapping[str, Any] | None = None,
    n_images: int = GALLERY_IMAGES,
) -> Path:
    """Write the self-contained page.

    Args:
        path: the HTML file (written atomically).
        title: the page's heading.
        results: label (a stage) → results dict (metrics.json) for the metric tables.
        galleries: ground truth beside the stages, per subject.
        figures: PNGs shown whole (brain maps, cluster maps, curves); missing files are skipped.
        notes: paragraphs under the title (plain text).
        summary: shown as JSON at the end (the demo's numbers).
        n_images: images per subject in a gallery.

    Returns:
        ``path``.
    """
    parts = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(n)}</p>" for n in notes)]
    galleries = list(galleries)
    if galleries:
        parts.append("<h2>Reconstructions</h2>")
        parts += [gallery_table(g, n_images) for g in galleries]
    if results:
        parts.append("<h2>Metrics</h2>")
        parts += [metrics_table(label, r) for label, r in results.items()]
    shown = [figure(p) for p in figures if Path(p).is_file()]
    if shown:
        parts += ["<h2>Figures</h2>", *shown]
    if summary is not None:
        parts += ["<h2>Summary</h2>", f"<pre>{html.escape(json.dumps(summary, indent=2))}</pre>"]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    atomic_write_text(Path(path), page)
    return Path(path)


def reconstruction_galleries(folder: str | os.PathLike) -> list[Gallery]:
    """The galleries of a ``brainit-pl reconstruct`` folder: per subject, ``gt/subjNN`` beside each stage."""
    folder = Path(folder)
    galleries = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and SUBJECT_DIR.match(p.name)):
        stages = {stage: sub / stage for stage in STAGES if (sub / stage).is_dir()}
        if stages:
            names = list_pngs(next(iter(stages.values())))
            galleries.append(Gallery(sub.name, folder / "gt" / sub.name, stages, names))
    return galleries


def reconstruction_report(
    folder: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    figures: Iterable[str | os.PathLike] = (),
    notes: Sequence[str] = (),
    summary: Mapping[str, Any] | None = None,
) -> Path:
    """``report.html`` of a ``brainit-pl reconstruct`` folder (its stages' ``metrics_<stage>/metrics.json``).

    Args:
        folder: the reconstruct folder (``--out`` of reconstruct, ``<log dir>/reconstruct`` of ``test``); a
            missing one gives a page with the figures and summary only.
        path: the HTML file [``folder/report.html``].
    """
    folder = Path(folder)
    results = {}
    for stage in STAGES:
        metrics = folder / f"metrics_{stage}" / "metrics.json"
        if metrics.is_file():
            results[stage] = json.loads(metrics.read_text())
    return write_html_report(
        path or folder / "report.html",
        title=title or f"Reconstructions: {folder.name}",
        results=results,
        galleries=reconstruction_galleries(folder) if folder.is_dir() else [],
        figures=figures,
        notes=notes,
        summary=summary,
    )
