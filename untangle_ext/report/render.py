"""The report's pictures and its one self-contained HTML page (images as base64 PNG, curves as inline SVG).

Heatmap tiles are coloured with numpy and encoded by PIL at the model's input size; the page scales
them up with ``image-rendering: pixelated``. matplotlib draws only the two summary plots with axes.
"""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from .._io import atomic_write
from ..heatmaps import image_to_rgb, to_rgb

PathLike = Union[str, "os.PathLike[str]"]
CURVE_STYLE = {"pattern_attribution": ("PatternAttribution", "#c0392b", ""),
               "gradient": ("gradient", "#555555", "4 3")}


def png_uri(rgb: np.ndarray) -> str:
    """An RGB image (H, W, 3), float in [0, 1] or uint8, as a ``data:image/png;base64`` URI."""
    from PIL import Image

    a = rgb if rgb.dtype == np.uint8 else (np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_tiles(image: torch.Tensor, maps: dict[str, torch.Tensor], cmap: str) -> dict[str, Any]:
    """One image's tiles: the input, and its class / diff / invDiff maps (values in [-1, 1]) coloured by ``cmap``."""
    out: dict[str, Any] = {"input": png_uri(image_to_rgb(image))}
    for kind, stack in maps.items():
        out[kind] = [png_uri(rgb) for rgb in to_rgb(stack, cmap)]
    return out


def _figure_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def reliability_figure(cal: dict) -> str:
    """Reliability diagram (accuracy per confidence bin against the diagonal) above the bin counts."""
    from matplotlib.figure import Figure

    edges = np.asarray(cal["edges"])
    width, left = np.diff(edges), edges[:-1]
    acc = np.array([a if a is not None else 0.0 for a in cal["accuracy"]])
    conf = np.array([c if c is not None else 0.0 for c in cal["confidence"]])
    fig = Figure(figsize=(3.4, 3.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    filled = np.array([a is not None for a in cal["accuracy"]])
    top.bar(left[filled], acc[filled], width[filled], align="edge", color="#4a7dbf", edgecolor="white",
            label="accuracy")
    top.plot((left + width / 2)[filled], conf[filled], "o", color="#e67e22", ms=4, label="mean confidence")
    top.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability, ECE = {cal['ece']:.4f}", fontsize=10)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(left, cal["count"], width, align="edge", color="#888888", edgecolor="white")
    bottom.set_yscale("log")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    return _figure_uri(fig)


def deletion_figure(fractions: Sequence[float], means: dict[str, dict[str, dict]]) -> str:
    """Mean deletion curves per section (solid: uncertain, dotted: confident wrong) and method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 3.4), layout="constrained")
    ax = fig.subplots()
    for section, ls in (("uncertain", "-"), ("confident_wrong", ":")):
        for method, curve in means.get(section, {}).items():
            label, colour, _ = CURVE_STYLE[method]
            ax.plot(fractions, curve["probability"], ls=ls, color=colour,
                    label=f"{section.replace('_', ' ')}: {label}  AUC {curve['auc']:.3f}")
    ax.set_ylim(0, 1.02)
    ax.set_xscale("function", functions=(np.sqrt, np.square))
    ax.set_xlim(0, 1)
    ax.set_xticks([0, 0.01, 0.05, 0.1, 0.25, 0.5, 1])
    ax.set_xticklabels(["0", ".01", ".05", ".1", ".25", ".5", "1"])
    ax.set_xlabel("fraction of pixels removed (√ scale)")
    ax.set_ylabel("mean p(predicted class)")
    ax.set_title("deletion, mean over each section", fontsize=10)
    ax.legend(fontsize=7)
    return _figure_uri(fig)


def summary_figures(data: dict, class_maps: torch.Tensor, cmap: str) -> dict[str, Any]:
    """The summary's pictures: reliability diagram, mean deletion curves, per-class mean maps, colour bar."""
    bar = to_rgb(np.tile(np.linspace(-1, 1, 201), (10, 1)), cmap)
    return {"reliability": reliability_figure(data["calibration"]),
            "deletion": deletion_figure(data["deletion_fractions"], data["deletion_mean"]),
            "class_maps": [png_uri(rgb) for rgb in to_rgb(class_maps, cmap)],
            "colorbar": png_uri(bar)}


def curve_svg(fractions: Sequence[float], curves: dict[str, dict], width: int = 170, height: int = 84) -> str:
    """A small inline SVG of one image's deletion curves (x: fraction removed 0..1 on a √ scale, y: probability)."""
    x0, x1, y0, y1 = 16, width - 4, 4, height - 14

    def pts(values: Sequence[float]) -> str:
        return " ".join(f"{x0 + f ** 0.5 * (x1 - x0):.1f},{y1 - v * (y1 - y0):.1f}" for f, v in zip(fractions, values))

    lines = "".join(
        f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" stroke-dasharray="{dash}" '
        f'points="{pts(curves[m]["probability"])}"><title>{label}</title></polyline>'
        for m, (label, colour, dash) in CURVE_STYLE.items() if m in curves)
    axes = (f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" stroke="#bbb"/>'
            f'<text x="{x0 - 3}" y="{y0 + 7}" text-anchor="end">1</text>'
            f'<text x="{x0 - 3}" y="{y1}" text-anchor="end">0</text>'
            f'<text x="{(x0 + x1) / 2}" y="{height - 3}" text-anchor="middle">pixels removed (√) →</text>')
    return (f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="deletion curves">{axes}{lines}</svg>')


def _name(data: dict, c: int) -> str:
    names = data.get("class_names")
    return html.escape(str(names[c]) if names else str(c))


def _tile(uri: str, caption: str, cls: str = "tile") -> str:
    return f'<figure class="{cls}"><img src="{uri}" alt="{html.escape(caption)}"><figcaption>{caption}</figcaption></figure>'


def _card(data: dict, section: str, card: dict, tiles: dict) -> str:
    """One image: header line, input, top-k maps, diff / invDiff pairs, deletion curves."""
    top = card["topk"]
    t0 = _name(data, top[0]["class"])
    head = (f'#{card["index"]} · true <b>{_name(data, card["label"])}</b> · predicted <b>{t0}</b> '
            f'({top[0]["probability"]:.3f}) · margin {card["margin"]:.3f} · entropy {card["entropy"]:.3f}'
            + ("" if card["correct"] else ' · <span class="wrong">wrong</span>'))
    parts = [_tile(tiles["input"], "input", "tile input")]
    parts += [_tile(uri, f'{_name(data, t["class"])} · p {t["probability"]:.3f}')
              for uri, t in zip(tiles["class"], top)]
    for i, t in enumerate(top[1:]):
        ci = _name(data, t["class"])
        parts.append(f'<div class="pair">{_tile(tiles["diff"][i], f"{t0} − {ci}")}'
                     f'{_tile(tiles["invDiff"][i], f"{ci} − {t0}")}</div>')
    d = card["deletion"]
    parts.append(f'<figure class="tile curvebox">{curve_svg(data["deletion_fractions"], d)}<figcaption>AUC PA '
                 f'{d["pattern_attribution"]["auc"]:.3f} · grad {d["gradient"]["auc"]:.3f}</figcaption></figure>')
    return (f'<article class="card" id="{section}-{card["index"]}"><h3>{head}</h3>'
            f'<div class="row">{"".join(parts)}</div></article>')


def _table(data: dict) -> str:
    """Every shown image as one sortable row (click a header), linked to its card."""
    cols = ("section", "image", "true", "predicted", "p(top)", "p(2nd)", "margin", "entropy", "AUC PA", "AUC grad")
    rows = []
    for section, cards in data["sections"].items():
        for c in cards:
            values = (section.replace("_", " "), c["index"], c["label"], c["predicted"], c["topk"][0]["probability"],
                      c["topk"][1]["probability"], c["margin"], c["entropy"],
                      c["deletion"]["pattern_attribution"]["auc"], c["deletion"]["gradient"]["auc"])
            cells = [f'<td><a href="#{section}-{c["index"]}">{values[0]}</a></td>']
            cells += [f'<td data-v="{v}">{_name(data, v) if j in (2, 3) else v}</td>' if isinstance(v, int)
                      else f'<td data-v="{v:.6g}">{v:.3f}</td>' for j, v in enumerate(values[1:], start=1)]
            rows.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th>{c}</th>" for c in cols)
    return (f'<table class="sortable" id="shown"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _summary(data: dict, figures: dict) -> str:
    cal = data["calibration"]
    pairs = "".join(f'<tr><td>{_name(data, p["pair"][0])} ↔ {_name(data, p["pair"][1])}</td><td>{p["count"]}</td>'
                    f'<td>{p["share"]:.0%}</td><td>{p["wrong"]}</td></tr>' for p in data["confusion_pairs_uncertain"])
    counts, accs = data["class_maps"]["count"], data["class_maps"]["accuracy"]
    classes = "".join(
        _tile(uri, f'{_name(data, c)} · ' + (f'{accs[c]:.0%} of {counts[c]}' if accs[c] is not None else "no images"))
        for c, uri in enumerate(figures["class_maps"]))
    stats = (f'<p class="stats"><b>{data["images"]}</b> test images · accuracy <b>{data["accuracy"]:.2%}</b> '
             f'({data["errors"]} wrong) · ECE <b>{cal["ece"]:.4f}</b> ({len(cal["count"])} bins) · ranked by '
             f'<b>{data["settings"]["uncertainty"]}</b></p>')
    return (f'<section id="summary"><h2>Summary</h2>{stats}<div class="row">'
            f'<figure class="plot"><img src="{figures["reliability"]}" alt="reliability diagram"></figure>'
            f'<figure class="plot"><img src="{figures["deletion"]}" alt="mean deletion curves"></figure>'
            f'<div><h3>Confusion pairs in the uncertain set</h3><p class="note">top class ↔ runner-up</p>'
            f'<table><thead><tr><th>pair</th><th>images</th><th>share</th><th>wrong</th></tr></thead>'
            f'<tbody>{pairs}</tbody></table></div></div>'
            f'<h3>Mean PatternAttribution map per class</h3><p class="note">each test image\'s map for its true '
            f'class on its own scale, averaged per class, the classes on one scale; caption: accuracy of the class</p>'
            f'<div class="row classes">{classes}</div></section>')


CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px 24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:2px}
h3{font-size:13px;font-weight:normal;margin:6px 0}.note{color:#666;font-size:12px;margin:2px 0 6px}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}.pair{display:flex;gap:2px;padding:0 4px;
border-left:1px solid #ddd}figure{margin:0}figure.tile img{width:84px;height:84px;image-rendering:pixelated;
display:block;border:1px solid #ddd}figcaption{font-size:11px;color:#444;text-align:center;max-width:170px}
.classes figure.tile img{width:64px;height:64px}.classes figure{width:96px}.card{border:1px solid #e4e4e4;border-radius:4px;padding:4px 8px;
margin:6px 0}.wrong{color:#c0392b;font-weight:bold}.curve{font-size:9px;fill:#666;display:block}
table{border-collapse:collapse;font-size:12px}td,th{border-bottom:1px solid #eee;padding:2px 6px;text-align:right}
th{cursor:pointer;background:#f6f6f6;position:sticky;top:0}
.scroll{max-height:240px;overflow:auto;display:inline-block;border:1px solid #eee}.stats{font-size:15px}.legend img{width:200px;height:10px;display:block}
.plot img{display:block}
"""

SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var dir = th.dataset.dir === "asc" ? -1 : 1;
    th.dataset.dir = dir === 1 ? "asc" : "desc";
    var key = function (row) {
      var cell = row.cells[col], v = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent;
      var f = parseFloat(v);
      return isNaN(f) ? v : f;
    };
    Array.prototype.slice.call(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      return dir * ((x > y) - (x < y));
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""


def page(data: dict, tiles: dict[int, dict], figures: dict) -> str:
    """The whole report as one HTML string (no external resources)."""
    s = data["settings"]
    legend = (f'<div class="legend"><img src="{figures["colorbar"]}" alt="colour scale"><p class="note">−1 · 0 · +1: '
              f'red = evidence for the class, blue = against. The top-{s["topk"]} maps of one image share one '
              f'scale; <i>a − b</i> is the top class\'s map minus the runner-up\'s (red: pixels that favour the top '
              f'class), <i>b − a</i> its inverse. Curves: p(predicted class) as the most attributed pixels are set '
              f'to {s["deletion_fill"]}, PatternAttribution (red) vs gradient (grey, dashed); a steep fall means '
              f'the decision rests on few pixels.</p></div>')
    sections = "".join(
        f'<section id="{sec}"><h2>{title} ({len(data["sections"].get(sec, []))})</h2>{legend}'
        + "".join(_card(data, sec, c, tiles[c["index"]]) for c in data["sections"].get(sec, []))
        + "</section>"
        for sec, title in (("uncertain", f"The {s['n']} most uncertain predictions"),
                           ("confident_wrong", f"The {s['n']} most confident wrong predictions")))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(data['title'])}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(data['title'])}</h1>"
            f"<p class=\"note\">PatternAttribution explanations of the predictions the model is least sure about, "
            f"and of its most confident mistakes. Every number is also in the JSON file next to this page.</p>"
            f"{_summary(data, figures)}<section id=\"table\"><h2>All shown images</h2><p class=\"note\">click a "
            f"header to sort</p><div class=\"scroll\">{_table(data)}</div></section>{sections}"
            f"<script>{SORT_JS}</script></body></html>\n")


def write_html(path: PathLike, text: str) -> Path:
    """Write the page atomically as UTF-8."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
