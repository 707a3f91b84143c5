"""Self-contained HTML reports: one file readable without a server. Figures are embedded as PNG data URIs,
photos as JPEG thumbnails in data URIs; the style is inline, the fonts the system's, nothing is fetched.

A :class:`Page` holds sections in order; each :class:`Section` takes paragraphs, warnings, figures (matplotlib
figures or PNG bytes), tables (a column of thumbnails optional) and galleries of captioned thumbnails. A small
inline script marks ``<body data-images="loaded/total">`` once the page has loaded, for checks in a browser."""

from __future__ import annotations

import base64
import html
import io
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from pipeline import records
from pipeline.data import images

THUMB = 128  # thumbnail side in pixels

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}.skipped{color:#777;font-style:italic}
.warn{background:#fff4e0;border-left:4px solid #e8a33d;padding:.4em .8em}
table{border-collapse:collapse;font-size:.9em;margin:.8em 0}td,th{border:1px solid #ddd;padding:.25em .5em;
vertical-align:middle;text-align:left}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{margin:0;width:%dpx;font-size:.75em;
word-break:break-all}figure img{display:block}
""" % THUMB

SCRIPT = """window.addEventListener("load",function(){var a=Array.prototype.slice.call(document.images);
var ok=a.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
document.body.setAttribute("data-images",ok+"/"+a.length);});"""


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_bytes(fig) -> bytes:
    """A matplotlib Figure drawn on the Agg canvas, as PNG bytes."""

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def thumbnail(root, relpath, size=THUMB) -> "Img | None":
    """A JPEG data URI of the photo ``relpath`` under ``root`` (size x size), or None when it cannot be read."""
    if not root:
        return None
    try:
        pixels = images.load_resized(os.path.join(root, relpath), size)
    except (images.BadImage, OSError):
        return None
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buf, format="jpeg", quality=85)
    return Img(data_uri(buf.getvalue(), "image/jpeg"))


def esc(x) -> str:
    return html.escape(str(x))


class Img(str):
    """A table cell holding an image's data URI (from :func:`thumbnail`)."""


def cell(v) -> str:
    if isinstance(v, Img):
        return f'<td><img src="{v}" alt="" width="{THUMB // 2}" height="{THUMB // 2}"></td>'
    if v is None:
        return "<td></td>"
    if isinstance(v, float):
        return f'<td class="num">{v:.4g}</td>'
    if isinstance(v, int):
        return f'<td class="num">{v}</td>'
    return f"<td>{esc(v)}</td>"


class Section:
    """One ``<section>``: a heading and its parts, in the order they are added."""

    def __init__(self, heading: str, anchor: str):
        self.heading, self.anchor, self.parts = heading, anchor, []

    def text(self, s: str) -> "Section":
        self.parts.append(f"<p>{esc(s)}</p>")
        return self

    def warn(self, s: str) -> "Section":
        self.parts.append(f'<p class="warn">{esc(s)}</p>')
        return self

    def skipped(self, why: str) -> "Section":
        self.parts.append(f'<p class="skipped">Skipped: {esc(why)}</p>')
        return self

    def figure(self, fig_or_png, alt: str) -> "Section":
        png = fig_or_png if isinstance(fig_or_png, bytes) else png_bytes(fig_or_png)
        self.parts.append(f'<figure><img src="{data_uri(png, "image/png")}" alt="{esc(alt)}"></figure>')
        return self

    def table(self, header, rows) -> "Section":
        """Rows of values: numbers right-aligned, :class:`Img` cells as thumbnails, None as an empty cell."""
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def gallery(self, items) -> "Section":
        """``items``: (data URI or None, caption); items without an image are left out."""
        figs = [f'<figure><img src="{uri}" alt="{esc(c)}" width="{THUMB}" height="{THUMB}">'
                f"<figcaption>{esc(c)}</figcaption></figure>" for uri, c in items if uri]
        if figs:
            self.parts.append(f'<div class="gallery">{"".join(figs)}</div>')
        return self

    def html(self) -> str:
        return f'<section id="{esc(self.anchor)}"><h2>{esc(self.heading)}</h2>{"".join(self.parts)}</section>'


class Page:
    """A report page: a title, an optional introduction, a table of contents and sections."""

    def __init__(self, title: str, intro: str = ""):
        self.title, self.intro, self.sections = title, intro, []

    def section(self, heading: str) -> Section:
        s = Section(heading, f"s{len(self.sections) + 1}")
        self.sections.append(s)
        return s

    def html(self) -> str:
        nav = "".join(f'<a href="#{s.anchor}">{esc(s.heading)}</a>' for s in self.sections)
        intro = f"<p>{esc(self.intro)}</p>" if self.intro else ""
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>'
                f"<style>{STYLE}</style></head><body><h1>{esc(self.title)}</h1>{intro}<nav>{nav}</nav>"
                + "".join(s.html() for s in self.sections) + f"<script>{SCRIPT}</script></body></html>")

    def write(self, path: str) -> str:
        """The page at ``path`` (written atomically); returns the path."""
        with records.atomic_path(path, suffix=".html") as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.html())
        return path
