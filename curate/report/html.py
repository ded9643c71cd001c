"""HTML building blocks of the report: escaped text, tables, notes, embedded images, the page.

The page is self-contained: images are data URIs, the style sheet is inline, there is no
script, and a Content-Security-Policy forbids loading anything else (a stray external
reference would show up as a console error in the browser test, not pass unnoticed).
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Any, Iterable


class Html(str):
    """Markup that is already safe: inserted as it is, never escaped again. Adding text to it
    escapes the text; the sum is markup."""

    def __add__(self, other: object) -> "Html":
        return Html(str.__add__(self, esc(other)))

    def __radd__(self, other: object) -> "Html":
        return Html(str.__add__(esc(other), self))


def esc(value: Any) -> Html:
    return value if isinstance(value, Html) else Html(html.escape(str(value)))


def join(parts: Iterable[Any]) -> Html:
    return Html("".join(esc(p) for p in parts))


def tag(name: str, body: Any = "", **attrs: Any) -> Html:
    """<name attrs>body</name>; attribute `cls` is written as `class`, None values are left out."""
    at = "".join(f' {"class" if k == "cls" else k.replace("_", "-")}="{html.escape(str(v), quote=True)}"'
                 for k, v in attrs.items() if v is not None)
    return Html(f"<{name}{at}>{esc(body)}</{name}>")


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes, mime: str = "image/png", alt: str = "", cls: str | None = None) -> Html:
    return Html(f'<img src="{data_uri(data, mime)}" alt="{html.escape(alt, quote=True)}"'
                + (f' class="{cls}"' if cls else "") + ">")


def figure(image: Html, caption: Any, cls: str | None = None) -> Html:
    return tag("figure", join([image, tag("figcaption", caption)]), cls=cls)


def table(headers: list[str], rows: Iterable[list[Any]], cls: str | None = None) -> Html:
    """A table; numbers are right-aligned and written with thousands separators."""
    head = tag("tr", join(tag("th", h) for h in headers))
    body = join(tag("tr", join(_cell(v) for v in row)) for row in rows)
    return tag("table", join([tag("thead", head), tag("tbody", body)]), cls=cls)


def _cell(v: Any) -> Html:
    if isinstance(v, bool) or v is None:
        return tag("td", "" if v is None else str(v))
    if isinstance(v, int):
        return tag("td", f"{v:,}", cls="num")
    if isinstance(v, float):
        return tag("td", f"{v:,.4g}", cls="num")
    return tag("td", v)


def note(text: Any, kind: str = "info") -> Html:
    """A boxed line: info (grey), warn (amber: unfinished or missing data), error (red)."""
    return tag("p", text, cls=f"note {kind}")


def details(summary: Any, body: Any, open_: bool = False) -> Html:
    return Html(f"<details{' open' if open_ else ''}>{tag('summary', summary)}{esc(body)}</details>")


def pre(text: str) -> Html:
    return tag("pre", text)


def code(text: str) -> Html:
    return tag("code", text)


@dataclass(frozen=True)
class Section:
    id: str  # anchor and data-section name (the browser test looks for each)
    title: str
    body: Html


def page(title: str, subtitle: str, sections: list[Section]) -> str:
    nav = join(tag("a", s.title, href=f"#{s.id}") for s in sections)
    body = join(Html(f'<section id="{s.id}" data-section="{s.id}">') + tag("h2", s.title) + s.body
                + Html("</section>") for s in sections)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>"
            f"<header>{tag('h1', title)}{tag('p', subtitle, cls='sub')}{tag('nav', nav)}</header>"
            f"<main>{body}</main></body></html>\n")


# Nothing but this page's own inline style and data: images may load.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px} .sub{margin:2px 0 8px;color:#b8c0cc}
nav a{color:#9cc3ff;margin-right:14px;text-decoration:none} nav a:hover{text-decoration:underline}
main{padding:8px 24px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:16px 0;padding:4px 18px 14px;overflow-x:auto}
h2{font-size:18px;border-bottom:1px solid #eceff3;padding-bottom:6px} h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px} th,td{border-bottom:1px solid #eceff3;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600} td div{white-space:nowrap} td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{padding:6px 10px;border-radius:4px;margin:6px 0} .note.info{background:#eef1f5}
.note.warn{background:#fff4d6;border-left:4px solid #e0a800} .note.error{background:#fde2e1;border-left:4px solid #d93025}
figure{display:inline-block;margin:4px;vertical-align:top;text-align:center}
figcaption{font-size:12px;color:#555;max-width:220px;overflow-wrap:anywhere} figure.plotfig figcaption{max-width:620px}
img{max-width:100%} .plot{max-width:640px} .wide{max-width:1100px}
.sheet figure img,.group figure img{width:112px;height:112px;object-fit:cover;border:3px solid #ccc;border-radius:3px}
figure.kept img{border-color:#2e9d4d!important} figure.dropped img{border-color:#d93025!important}
.group{border-top:1px dashed #dde1e7;padding:6px 0} .row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.bar{display:flex;height:16px;min-width:2px;border-radius:2px;overflow:hidden;background:#eee}
.bar span{display:block;height:100%} .s-kept{background:#2e9d4d} .s-filtered{background:#e8a23a}
.s-duplicate{background:#8e63c7} .s-failed{background:#d93025} .key span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
pre{background:#f4f5f7;padding:8px;overflow:auto;max-height:420px;font-size:12px}
details{margin:4px 0} summary{cursor:pointer;color:#245}
"""
