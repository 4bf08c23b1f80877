"""HTML building blocks of the report page: escaped tables, inline plots and thumbnails (with the experts' boxes
drawn on them). Every text that comes from the data goes through `html.escape`; only `Raw` cells, made here from
escaped parts, are inserted as they are."""

from __future__ import annotations

import base64
import html
import io
import re

from matplotlib.figure import Figure
from PIL import Image, ImageDraw

THUMB = 192
NOT_RUN = '<p class="not-run">{} stage not run.</p>'
OBJECT_COLOUR, OCR_COLOUR = "#ff7f0e", "#00b7eb"
e = html.escape


class Raw(str):
    """A cell that is already HTML (built from escaped parts)."""


def note(text: str) -> str:
    return f'<p class="not-run">{e(text)}</p>'


def anchor(name: str) -> str:
    """The id of a section or a reason: lower case, words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table(headers: list[str], rows: list[list], cls: str = "") -> str:
    """An HTML table; cells are escaped unless they are `Raw`."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else e(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def img(b64: str, alt: str, mime: str = "png") -> str:
    return f'<img src="data:image/{mime};base64,{b64}" alt="{e(alt)}">'


def bar(counts: dict, title: str, xlabel: str = "samples") -> str:
    """A horizontal bar chart, largest first, with the counts written on the bars."""
    items = sorted(counts.items(), key=lambda kv: kv[1])[-20:]
    fig = Figure(figsize=(6, 0.4 * len(items) + 1.2))
    ax = fig.subplots()
    bars = ax.barh([str(k) for k, _ in items], [v for _, v in items], color="#4c72b0")
    ax.bar_label(bars, padding=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.margins(x=0.15)
    return img(png(fig), title)


def thumbnail(data: bytes, objects: list[dict] | None = None, ocr: list[dict] | None = None,
              frame: tuple[int, int] | None = None) -> str:
    """A JPEG thumbnail (base64) of a stored image with the detected objects (orange boxes, labelled) and OCR
    lines (cyan polygons) drawn; their coordinates are pixels of `frame` (width, height: the original image, as
    the extract stage writes them; default: the stored image)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = frame if frame and all(frame) else image.size
    image.thumbnail((THUMB, THUMB))
    sx, sy = image.width / width, image.height / height
    draw = ImageDraw.Draw(image)
    for line in ocr or []:
        points = [(x * sx, y * sy) for x, y in line.get("box") or []]
        if len(points) >= 3:
            draw.polygon(points, outline=OCR_COLOUR, width=2)
    for obj in objects or []:
        box = obj.get("box") or []
        if len(box) == 4:
            x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
            draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=OBJECT_COLOUR, width=2)
            draw.text((x0 + 2, y0 + 1), str(obj.get("label") or ""), fill=OBJECT_COLOUR)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()
