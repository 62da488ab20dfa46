"""
One self-contained HTML page per run: tables, inline SVG charts and a code browser.

The page is a single file with its CSS and JavaScript inside and no request of any kind (no
script, font or image from anywhere), so it opens offline from file:// and can be mailed around.
Scripts gather plain data (numbers, strings, lists, dicts) and compose a page from the pieces
below; every piece escapes the text it is given, so a context holding "</script>" stays text.

    import report
    browser = report.code_browser_data(model, tokens, token_text=[str(t) for t in range(11)])
    report.write("out/report.html", "My run", [
        report.section("Results", report.table([["loss", 1.23]], ["metric", "value"])),
        report.section("Codes", report.code_browser(browser)),
    ])

Map of this file:
  1. markup           escaping, links, sections, the page and its atomic write
  2. tables           a results table
  3. charts           line charts, bar charts, a heat map, a histogram (SVG)
  4. code browser     the data (what every code does on a reference set) and its rendering, a
                      file in place of the authors' Code Browser web application: an overview of
                      every codebook, a card per code with its top-activating contexts
"""
import html
import math
import re

import torch

import codebook as cb
import runs

# ------------------------------------------------------------------------------------------------
# 1. Markup. A Markup string is HTML this module wrote; anything else is text and gets escaped.


class Markup(str):
    pass


INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u202a-\u202e\u2066-\u2069]")  # controls, bidi overrides


def escape(value):
    """Text -> HTML (Markup passes through unchanged); a character that would not show, or would reorder
    the text around it, shows as its escape (\\x00, \\u202e)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(INVISIBLE.sub(lambda m: repr(m[0])[1:-1], str(value)), quote=True))


def join(parts, sep=""):
    return Markup(sep.join(escape(p) for p in parts))


def tag(name, body="", **attrs):
    """<name attrs>body</name>; attribute values are escaped, `class_` is written `class`."""
    written = "".join(f' {k.rstrip("_").replace("_", "-")}="{html.escape(str(v), quote=True)}"'
                      for k, v in attrs.items() if v is not None)
    return Markup(f"<{name}{written}>{escape(body)}</{name}>")


def link(text, anchor):
    """A link to an anchor of the same page (pages never link outside themselves)."""
    return tag("a", text, href="#" + anchor)


def code_link(address):
    """A code's address as a link to its card in the code browser."""
    return tag("a", address, href="#" + str(address), class_="code")


def highlight(text, pattern, class_="word"):
    """Text with every match of the regex `pattern` marked."""
    pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
    out, last = [], 0
    for m in pattern.finditer(text):
        if m.end() > m.start():
            out += [escape(text[last:m.start()]), tag("mark", m.group(0), class_=class_)]
            last = m.end()
    return join(out + [text[last:]])


def fmt(value):
    """A number as a person reads it: 0.1235, 12.3, 1,234; anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def anchor(text):
    """A fragment id made of text: lowercase letters and digits joined by "-"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pct(value, digits=1):
    """A share as a percentage; one that rounds to zero but is not zero shows as under the last digit."""
    shown = f"{100 * value:.{digits}f}"
    return f"<{10 ** -digits:.{digits}f}%" if value > 0 and float(shown) == 0 else f"{shown}%"


class Section:
    """A titled part of the page; its title goes into the page's table of contents."""

    def __init__(self, title, *parts, note=""):
        self.title, self.parts, self.note = title, parts, note
        self.anchor = "sec-" + anchor(title)

    def render(self):
        note = tag("p", self.note, class_="note") if self.note else ""
        return tag("section", join([tag("h2", self.title), note, *self.parts]), id=self.anchor)


def section(title, *parts, note=""):
    return Section(title, *parts, note=note)


def row(*parts):
    """Pieces side by side (charts, tables), wrapping on a narrow window."""
    return tag("div", join(tag("div", p, class_="cell") for p in parts), class_="row")


def scroll(*parts, height=420):
    """Pieces in a box of at most `height` pixels that scrolls (a long table)."""
    return tag("div", join(parts), class_="scroll", style=f"max-height:{height}px")


def figure(title, body, caption=""):
    return tag("figure", join([tag("h3", title), body, tag("figcaption", caption) if caption else ""]))


def page(title, sections, subtitle=""):
    """The whole document as a string."""
    for i, s in enumerate(sections):  # a title without a letter or digit, or twice on the page, still gets its own anchor
        if s.anchor == "sec-" or s.anchor in [other.anchor for other in sections[:i]]:
            s.anchor += f"-{i}"
    toc = tag("nav", join(link(s.title, s.anchor) for s in sections))
    body = join([tag("header", join([tag("h1", title), tag("p", subtitle, class_="sub") if subtitle else "", toc])),
                 tag("main", join(s.render() for s in sections))])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>"
            f"<body>{body}<script>{SCRIPT}</script></body></html>\n")


def write(path, title, sections, subtitle=""):
    """Write the page to `path` atomically (readers see the old page or the new one); return path."""
    text = page(title, sections, subtitle)

    def write_text(tmp):
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:  # a name not in UTF-8: shown escaped
            f.write(text)
    runs.write_atomically(path, write_text)
    return path


# ------------------------------------------------------------------------------------------------
# 2. Tables.

# cells written as numbers ("12.5%", "<0.1%", "2.0% / 3.5%") align as numbers
NUMBER = re.compile(r"^<?[-+]?[\d,.]+(%| s| ms)?( / <?[-+]?[\d,.]+(%| s| ms)?)?$")


def table(rows, columns, groups=None):
    """rows: lists of cells (text, numbers or Markup); columns: header texts; groups: an upper
    header row of (text, columns spanned). Numbers are right aligned and formatted by fmt()."""
    head = [tag("tr", join(tag("th", c) for c in columns))]
    if groups:
        head.insert(0, tag("tr", join(tag("th", g, colspan=span, class_="group" if g else None) for g, span in groups)))
    head = tag("thead", join(head))
    body = []
    for r in rows:
        cells = [tag("td", fmt(v), class_="num") if isinstance(v, (int, float)) and not isinstance(v, bool)
                 else tag("td", v, class_="num" if NUMBER.match(str(v)) else None) for v in r]
        body.append(tag("tr", join(cells)))
    return tag("table", join([head, tag("tbody", join(body))]))


# ------------------------------------------------------------------------------------------------
# 3. Charts, drawn as inline SVG. Sizes are in SVG units; the SVG scales to its column's width.

PALETTE = ["#2f6fb0", "#e0803a", "#3a9a5b", "#c0434d", "#7b5cb8", "#8c6d31", "#d36ba8", "#6b7280"]


def nice_ticks(lo, hi, count=5, outward=False):
    """About `count` round tick values in [lo, hi]; outward: the first and last at or beyond them."""
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= step * m)
    first = (math.floor if outward else math.ceil)(lo / step + (1e-9 if outward else -1e-9)) * step
    last = (math.ceil if outward else math.floor)(hi / step + (-1e-9 if outward else 1e-9)) * step
    return [round(first + i * step, 12) for i in range(int(round((last - first) / step)) + 1)]


def log_ticks(lo, hi):
    """Ticks 1, 2, 5 x 10^n between lo and hi (> 0); only the decades when they span many."""
    if hi / lo < 10:  # within a decade: round values, spaced evenly
        return nice_ticks(lo, hi, 4)
    steps = (1,) if math.log10(hi / lo) > 3 else (1, 2, 5)
    return [m * 10 ** d for d in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in steps if lo <= m * 10 ** d <= hi * (1 + 1e-9)]


def _svg(width, height, body, label):
    return Markup(f'<svg class="chart" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
                  f'aria-label="{html.escape(label, quote=True)}">{body}</svg>')


def _text(x, y, text, anchor="middle", class_="tick", rotate=None):
    turn = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="{class_}"{turn}>{escape(text)}</text>'


def _legend(names):
    return tag("div", join(tag("span", join([tag("i", "", style=f"background:{PALETTE[i % len(PALETTE)]}"), name]))
                           for i, name in enumerate(names)), class_="legend")


def line_chart(series, x_label="", y_label="", log_y=False, y_format=fmt, width=560, height=250):
    """series: [{"name": str, "x": [...], "y": [...]}]; missing (None, NaN) values are skipped,
    and on a log axis values <= 0 too."""
    def ok(v):
        return v is not None and math.isfinite(v) and (v > 0 or not log_y)

    points = [[(float(x), float(y)) for x, y in zip(s["x"], s["y"]) if ok(y)] for s in series]
    everything = [p for ps in points for p in ps]
    if not everything:
        return tag("p", "no data", class_="note")
    left, right, top, bottom = 58, 14, 10, 40
    w, h = width - left - right, height - top - bottom
    xs, ys = [p[0] for p in everything], [p[1] for p in everything]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    if log_y:
        lo, hi = min(ys), max(ys) if max(ys) > min(ys) else min(ys) * 10
        lo, hi = lo / 1.05, hi * 1.05
        ticks = log_ticks(lo, hi)
        y0, y1, ty = math.log10(lo), math.log10(hi), math.log10
    else:
        lo = 0.0 if 0 <= min(ys) < 0.25 * max(ys) else min(ys)  # start a positive axis at zero when near it
        ticks = nice_ticks(lo, max(ys), 5, outward=True)
        y0, y1, ty = ticks[0], ticks[-1], float
    X = lambda v: left + (v - x0) / (x1 - x0) * w
    Y = lambda v: top + h - (ty(v) - y0) / (y1 - y0) * h
    out = []
    for t in ticks:
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" class="grid"/>')
        out.append(_text(left - 6, Y(t) + 4, y_format(t), "end"))
    for t in nice_ticks(x0, x1, 6):
        out.append(_text(X(t), top + h + 16, fmt(int(t) if float(t).is_integer() else t)))
    out.append(f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" class="axis"/>')
    for i, ps in enumerate(points):
        if len(ps) > 1500:  # a long run: every n-th point is enough for the eye
            ps = ps[::math.ceil(len(ps) / 1500)] + ps[-1:]
        coords = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in ps)
        colour = PALETTE[i % len(PALETTE)]
        if len(ps) == 1:
            out.append(f'<circle cx="{X(ps[0][0]):.1f}" cy="{Y(ps[0][1]):.1f}" r="3" fill="{colour}"/>')
        else:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
    out.append(_text(left + w / 2, height - 4, x_label, class_="label"))
    out.append(_text(14, top + h / 2, y_label + (" (log)" if log_y else ""), class_="label", rotate=-90))
    chart = _svg(width, height, "".join(out), f"{y_label} against {x_label}")
    return join([chart, _legend([s["name"] for s in series]) if len(series) > 1 else ""])


def bar_chart(categories, series, value_format=fmt, max_value=None, links=None, width=560):
    """Horizontal grouped bars: one row per category, one bar per series in it.
    series: [{"name": str, "values": [one per category]}]; links: an anchor per category label."""
    values = [v for s in series for v in s["values"] if v is not None and math.isfinite(v)]
    top_value = max_value if max_value is not None else max(values + [0]) or 1.0
    bar_h, gap = 13, 9
    label_w = min(200, 12 + 7 * max((len(str(c)) for c in categories), default=4))
    left, right = label_w, 64
    w = width - left - right
    group_h = bar_h * len(series) + gap
    height = group_h * len(categories) + 6
    out = []
    for c, name in enumerate(categories):
        y = 4 + c * group_h
        label = _text(left - 8, y + bar_h * len(series) / 2 + 4, name, "end", "tick")
        if links and links[c]:
            label = f'<a href="#{html.escape(links[c], quote=True)}">{label}</a>'
        out.append(label)
        for i, s in enumerate(series):
            v = s["values"][c]
            if v is None or not math.isfinite(v):
                continue
            length = max(0.0, min(1.0, v / top_value)) * w
            yy = y + i * bar_h
            out.append(f'<rect x="{left}" y="{yy}" width="{length:.1f}" height="{bar_h - 2}" '
                       f'fill="{PALETTE[i % len(PALETTE)]}"><title>{escape(s["name"])}: {escape(value_format(v))}</title></rect>')
            out.append(_text(left + length + 4, yy + bar_h - 3, value_format(v), "start", "value"))
    out.append(f'<line x1="{left}" x2="{left}" y1="0" y2="{height}" class="axis"/>')
    chart = _svg(width, height, "".join(out), ", ".join(s["name"] for s in series))
    return join([chart, _legend([s["name"] for s in series]) if len(series) > 1 else ""])


def heat_map(matrix, row_labels, col_labels, row_title="", col_title="", value_format=pct, col_links=None,
             width=640, max_cell=14):
    """matrix: rows of values in [0, 1] (e.g. how often a code fires at a state). Zero cells are
    left out, so a sparse map stays small; each drawn cell tells its value on hover."""
    n_rows, n_cols = len(matrix), len(col_labels)
    left, top, bottom = 62, 8, 44
    cell_w = max(1.0, min(max_cell, (width - left - 8) / max(1, n_cols)))
    cell_h = max(3.0, min(max_cell, 600 / max(1, n_rows)))
    w, h = cell_w * n_cols, cell_h * n_rows
    out = [f'<rect x="{left}" y="{top}" width="{w:.1f}" height="{h:.1f}" class="heat-bg"/>']
    for r, values in enumerate(matrix):
        for c, v in enumerate(values):
            if v and v > 0:
                shade = 0.12 + 0.88 * min(1.0, v)
                out.append(f'<rect x="{left + c * cell_w:.1f}" y="{top + r * cell_h:.1f}" width="{cell_w:.2f}" '
                           f'height="{cell_h:.2f}" fill="#1d4f91" fill-opacity="{shade:.2f}"><title>'
                           f'{escape(row_labels[r])}, {escape(col_labels[c])}: {escape(value_format(v))}</title></rect>')
    label_every = max(1, math.ceil(11 / cell_h))
    for r in range(0, n_rows, label_every):
        out.append(_text(left - 5, top + (r + 0.5) * cell_h + 3.5, row_labels[r], "end"))
    col_every = max(1, math.ceil(11 / cell_w))
    for c in range(0, n_cols, col_every):
        x, y = left + (c + 0.5) * cell_w + 3.5, top + h + 5
        label = _text(x, y, col_labels[c], "end", "tick", rotate=-90)
        if col_links and col_links[c]:
            label = f'<a href="#{html.escape(col_links[c], quote=True)}">{label}</a>'
        out.append(label)
    height = top + h + bottom
    out.append(_text(left + w / 2, height - 2, col_title, class_="label"))
    out.append(_text(12, top + h / 2, row_title, class_="label", rotate=-90))
    return _svg(left + w + 8, height, "".join(out), f"{row_title} x {col_title}")


def histogram(values, bins=20, x_label="", y_label="codes", log_x=False, width=300, height=120, small=False):
    """Counts of `values` in equal bins (of log10(value) with log_x); small: a sparkline, no axes."""
    data = [math.log10(v) if log_x else v for v in values if v is not None and (v > 0 or not log_x)]
    if not data:
        return tag("p", "no data", class_="note")
    lo, hi = min(data), max(data)
    hi = hi if hi > lo else lo + 1
    counts = [0] * bins
    for v in data:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    left, right, top, bottom = (2, 2, 2, 2) if small else (40, 8, 8, 34)
    w, h = width - left - right, height - top - bottom
    bw = w / bins
    peak = max(counts)
    out = []
    for i, n in enumerate(counts):
        if n:
            bh = n / peak * h
            start, end = lo + i * (hi - lo) / bins, lo + (i + 1) * (hi - lo) / bins
            span = f"{10 ** start:.2g} to {10 ** end:.2g}" if log_x else f"{start:.3g} to {end:.3g}"
            out.append(f'<rect x="{left + i * bw + 0.5:.1f}" y="{top + h - bh:.1f}" width="{max(0.5, bw - 1):.1f}" '
                       f'height="{bh:.1f}" class="hist"><title>{n} {escape(y_label)}: {escape(span)}</title></rect>')
    if not small:
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" class="axis"/>')
        for t in nice_ticks(lo, hi, 4):
            if lo <= t <= hi:
                x = left + (t - lo) / (hi - lo) * w
                out.append(_text(x, top + h + 14, f"{10 ** t:.2g}" if log_x else fmt(t)))
        out.append(_text(left - 4, top + 8, fmt(peak), "end"))
        out.append(_text(left + w / 2, height - 3, x_label, class_="label"))
    return _svg(width, height, "".join(out), f"histogram of {x_label or 'values'}")


# ------------------------------------------------------------------------------------------------
# 4. The code browser. code_browser_data() runs the model over a reference set and gathers, for
# every codebook, its usage and a card per code; code_browser() renders that dict. The dict holds
# only plain data, so a script may also keep it in its results.

def token_texts(token_text, vocab_size):
    """A list of display strings, one per token id, from a list or a function of the id."""
    texts = [token_text(t) for t in range(vocab_size)] if callable(token_text) else [str(t) for t in token_text]
    if len(texts) < vocab_size:
        raise ValueError(f"token_text gives {len(texts)} strings for a vocabulary of {vocab_size} tokens")
    return texts


def _positions_by_code(ids, counts):
    """Where every code fires: ids (rows, seq, k) -> (order, starts), order[starts[c]:starts[c] +
    counts[c]] being the flat (position * k + slot) entries of ids that hold code c."""
    order = ids.reshape(-1).argsort(stable=True)
    return order, counts.cumsum(0) - counts


MAX_CARDS = 20_000  # cards in a page when every code that fires would make more (about 1.5 KB each)


def code_browser_data(model, tokens, token_text=None, labels=None, label_names=None, max_cards=100, contexts=5,
                      before=12, after=4, separator="", always=(), recorded=None, position_text=None, batch_size=64):
    """What every code of every codebook does on a reference set, as plain data.

    tokens (rows, seq): the reference set, fed as model inputs. token_text: display text per token id
    (a list or a function), or position_text: one string per position (rows of strings). labels (rows, seq) ints, -1 where a position has none, with label_names
    their names: then every code's best label (by F1) with its precision and recall (section 4).
    Per codebook, cards for the max_cards most frequent codes (None: every code that fires, unless the page would
    hold more than MAX_CARDS cards; then as many per codebook as make MAX_CARDS), each with its `contexts` strongest
    firings, `before` and `after` tokens around the firing one; codes in `always` (addresses such
    as "L1.H2.517") get a card whatever their rank, a "never fires" card if they do not fire.
    recorded: (ids, scores) from cb.record_dataset(model, tokens), when the caller has them."""
    heads = model.codebook_heads()
    if not heads:
        raise ValueError("the model has no codebooks: give a checkpoint written by a codebook stage "
                         "(codebook.pt of train_fsm.py or train_lm.py), not a base model")
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"the reference set is empty (tokens of shape {tuple(tokens.shape)}): "
                         "give at least one sequence of at least one token")
    if (max_cards is not None and max_cards < 0) or contexts < 1 or before < 0 or after < 0:
        raise ValueError(f"max_cards={max_cards}, contexts={contexts}, before={before}, after={after}: "
                         "need max_cards >= 0, contexts >= 1 and before, after >= 0")
    if position_text is None:
        if token_text is None:
            raise ValueError("give token_text (display text per token id) or position_text (per position)")
        texts = token_texts(token_text, model.config.vocab_size)
        position_text = [[texts[t] for t in row] for row in tokens.tolist()]
    elif len(position_text) != tokens.shape[0] or any(len(r) != tokens.shape[1] for r in position_text):
        raise ValueError(f"position_text must hold one string per token: {tuple(tokens.shape)}")
    if labels is not None:
        if tuple(labels.shape) != tuple(tokens.shape):
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match tokens {tuple(tokens.shape)}")
        label_names = list(label_names) if label_names is not None else [str(i) for i in range(int(labels.max()) + 1)]
        if not label_names:
            raise ValueError("labels: no position has a label (all -1) and no label_names were given")
        if int(labels.max()) >= len(label_names):
            raise ValueError(f"label {int(labels.max())} has no name: {len(label_names)} label_names given")
        masks = torch.stack([labels == s for s in range(len(label_names))])
    extra = {}
    for text in always:
        a = cb.parse_code(text)
        model.locate(a)
        extra.setdefault(str(a.codebook), []).append(a.code)

    ids, scores = recorded if recorded is not None else cb.record_dataset(model, tokens, batch_size)
    if max_cards is None and sum(int(ids[a].unique().numel()) for a, _, _ in heads) > MAX_CARDS:
        max_cards = max(1, MAX_CARDS // len(heads))  # a pretrained model's hundreds of codebooks: a page of MAX_CARDS
    label_rows = labels.tolist() if labels is not None else None
    seq = tokens.shape[1]
    codebooks = []
    for address, book, _ in heads:
        a = cb.parse_address(address)
        v, s = ids[address], scores[address]
        k = v.shape[-1]
        counts = cb.count_codes(v, book.num_codes)
        share = counts.double() / counts.sum()
        entropy = max(0.0, float(-(share[share > 0] * share[share > 0].log2()).sum()))
        fires = counts.tolist()
        ranked = [c for c in counts.argsort(descending=True, stable=True).tolist() if fires[c] > 0]
        chosen = ranked[:max_cards] + [c for c in dict.fromkeys(extra.get(address, [])) if c not in ranked[:max_cards]]
        if labels is not None:
            precision, recall = cb.code_precision_recall(v, masks, book.num_codes)  # (labels, codes)
            best_f1, best_label = cb.f1_score(precision, recall).max(0)
        order, starts = _positions_by_code(v, counts)
        flat_scores = s.reshape(-1)
        starts = starts.tolist()
        cards = []
        for c in chosen:
            n = fires[c]
            card = {"address": f"{address}.{c}", "code": c, "fires": n, "density": n / (v.numel() // k), "contexts": []}
            if n and labels is not None and best_f1[c] > 0:  # a code on no labelled position has no best label
                b = int(best_label[c])
                card["label"] = {"name": label_names[b], "precision": float(precision[b, c]),
                                 "recall": float(recall[b, c])}
            if n:
                entries = order[starts[c]:starts[c] + n]  # the (position, slot) entries holding c
                # top_contexts over the positions where c fires, with c's slot only: the same ranking
                # as over the whole set (a code fills at most one slot of a position), n x fewer ids
                firing = torch.full((n, 1, 1), c), flat_scores[entries].view(n, 1, 1)
                for i, _, score in cb.top_contexts(*firing, c, contexts):
                    r, p = divmod(int(entries[i]) // k, seq)
                    text = position_text[r]
                    context = {"row": r, "pos": p, "score": score,
                               "left": "".join(t + separator for t in text[max(0, p - before):p]), "token": text[p],
                               "right": "".join(separator + t for t in text[p + 1:p + 1 + after]),
                               "cut_left": p > before, "cut_right": p + 1 + after < seq}
                    if labels is not None and label_rows[r][p] >= 0:
                        context["label"] = label_names[label_rows[r][p]]
                    card["contexts"].append(context)
            cards.append(card)
        codebooks.append({"address": address, "layer": a.layer, "site": a.site, "head": a.head,
                          "num_codes": book.num_codes, "k": k, "positions": v.numel() // k,
                          "used": len(ranked), "dead_share": 1 - len(ranked) / book.num_codes,
                          "entropy_bits": entropy, "counts": [n for n in fires if n],
                          "cards": cards})
    return {"rows": tokens.shape[0], "seq": seq,
            "labels": label_names if labels is not None else None, "codebooks": codebooks}


def _place(book):
    return f"H{book['head']}" if book["site"] == "attn" else book["site"].upper()


def _overview(data):
    """The layer x place grid: per codebook its usage at a glance, each cell a link to its cards."""
    books = data["codebooks"]
    places = sorted({_place(b) for b in books}, key=lambda p: (not p.startswith("H"), len(p), p))
    layers = sorted({b["layer"] for b in books})
    by_cell = {(b["layer"], _place(b)): b for b in books}
    head = tag("tr", join([tag("th", "layer")] + [tag("th", p) for p in places]))
    body = []
    for layer in layers:
        cells = [tag("th", f"L{layer}")]
        for p in places:
            b = by_cell.get((layer, p))
            if b is None:
                cells.append(tag("td", "", class_="empty"))
                continue
            density = [n / b["positions"] for n in b["counts"]]
            stats = join([tag("b", b["address"]),
                          tag("span", f"{b['used']:,} / {b['num_codes']:,} used"),
                          tag("span", f"dead {pct(b['dead_share'])} · {b['entropy_bits']:.1f} bits")])
            spark = histogram(density, bins=16, log_x=True, width=150, height=34, small=True)
            cells.append(tag("td", tag("a", join([stats, spark]), href="#" + b["address"], class_="cbcell",
                                       data_book=b["address"])))
        body.append(tag("tr", join(cells)))
    grid = tag("table", join([head, tag("tbody", join(body))]), class_="overview")
    every = [n / b["positions"] for b in books for n in b["counts"]]
    dead = sum(b["num_codes"] - b["used"] for b in books)
    total = sum(b["num_codes"] for b in books)
    summary = (f"{len(books)} codebooks, {total:,} codes, {dead:,} ({pct(dead / total)}) never fire on the "
               f"reference set of {data['rows']:,} x {data['seq']:,} tokens. Entropy: of the codebook's usage, "
               f"in bits (log2 of the codes used is the most it can be). Sparklines: how many codes fire at each "
               f"frequency (log scale).")
    hist = figure("Firing frequency of every code that fires",
                  histogram(every, bins=30, log_x=True, x_label="share of positions where the code fires", width=460,
                            height=150))
    return join([tag("p", summary, class_="note"), row(grid, hist)])


def _card(card, has_labels):
    head = [tag("a", card["address"], href="#" + card["address"], class_="addr")]
    if card["fires"]:
        head.append(tag("span", f"fires {card['fires']:,}× · {pct(card['density'], 2)}", class_="fires"))
    else:
        head.append(tag("span", "never fires on the reference set", class_="fires never"))
    label = card.get("label")
    if label:
        head.append(tag("span", join([tag("b", label["name"]),
                                      f" P {pct(label['precision'], 0)} · R {pct(label['recall'], 0)}"]), class_="label"))
    lines = []
    for ctx in card["contexts"]:
        left = ("…" if ctx["cut_left"] else "") + ctx["left"]
        right = ctx["right"] + ("…" if ctx["cut_right"] else "")
        parts = [tag("span", tag("span", left), class_="l"), tag("mark", ctx["token"]), tag("span", right, class_="r")]
        if has_labels:
            parts.append(tag("span", ctx.get("label", ""), class_="cl"))
        lines.append(tag("div", join(parts), class_="ctx"))
    return tag("div", join([tag("div", join(head), class_="ch"), join(lines)]), class_="card", id=card["address"])


def code_browser(data, label_kind="label"):
    """The overview, a search box and one section of cards per codebook, from code_browser_data()."""
    has_labels = data["labels"] is not None
    sections = []
    for b in data["codebooks"]:
        shown = len(b["cards"])
        title = join([tag("h3", b["address"]),
                      tag("span", f"{b['used']:,} of {b['num_codes']:,} codes fire; {shown:,} cards, most frequent "
                                  "first", class_="note")])
        cards = join(_card(c, has_labels) for c in b["cards"])
        # offscreen sections are not laid out (content-visibility); this guess of their height, three
        # cards a row, keeps the scrollbar steady until they are
        guess = 40 + math.ceil(shown / 3) * (34 + 19 * max((len(c["contexts"]) for c in b["cards"]), default=1))
        sections.append(tag("div", join([tag("div", title, class_="bh"), tag("div", cards, class_="cards")]),
                            class_="codebook", id=b["address"], style=f"contain-intrinsic-size:auto {guess}px"))
    search = tag("div", join([
        Markup('<input id="code-search" type="search" autocomplete="off" spellcheck="false" '
               'placeholder="filter cards: an address (L1.H2, L1.H2.517) or text of their contexts">'),
        tag("span", "", id="code-count", class_="note")]), class_="search")
    help_text = (f"Each card: how often the code fires, its best {label_kind} by F1 (precision P, recall R), "
                 "and the contexts where it fires most strongly, the firing token marked."
                 if has_labels else
                 "Each card: how often the code fires and the contexts where it fires most strongly, the firing "
                 "token marked.")
    return join([_overview(data), search, tag("p", help_text, class_="note"),
                 tag("div", join(sections), class_="browser")])


def ranked_codes(rows, label="matches"):
    """A code search's ranking as a table: rows of {"address", "precision", "recall"} (section 4)."""
    precision, recall = (torch.tensor([r[key] for r in rows], dtype=torch.float64) for key in ("precision", "recall"))
    body = [[i + 1, code_link(r["address"]), pct(r["precision"]), pct(r["recall"]), pct(f1)]
            for i, (r, f1) in enumerate(zip(rows, cb.f1_score(precision, recall).tolist()))]
    return table(body, ["rank", "code", f"precision ({label})", "recall", "F1"])


# ------------------------------------------------------------------------------------------------
# The page's style and script, written once for every page.

CSS = """
:root{--fg:#1d2330;--muted:#5d6677;--line:#e3e6eb;--bg:#f6f7f9;--card:#fff;--accent:#2456a6;--mark:#ffd970;--word:#c8efd4}
*{box-sizing:border-box}
html{scroll-padding-top:64px}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header{background:#fff;border-bottom:1px solid var(--line);padding:14px 28px 10px}
h1{font-size:20px;margin:0 0 2px}
.sub{margin:0 0 6px;color:var(--muted);font-size:13px}
nav{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:13px}
main{max-width:1280px;margin:0 auto;padding:6px 28px 40px}
section{margin-top:22px}
h2{font-size:17px;margin:0 0 8px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:14px;margin:0 0 6px}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
.note{color:var(--muted);font-size:12.5px;margin:2px 0 8px}
.row{display:flex;flex-wrap:wrap;gap:18px 28px;align-items:flex-start}.row>.cell{min-width:0;flex:0 1 auto}
figure{margin:0;background:#fff;border:1px solid var(--line);border-radius:6px;padding:10px 12px}
.scroll{overflow:auto;border:1px solid var(--line);border-radius:6px;background:#fff}.scroll table{width:100%}
.scroll thead th{position:sticky;top:0}
figcaption{color:var(--muted);font-size:12px;margin-top:4px;max-width:560px}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:#eef1f5;font-weight:600}thead th.group{text-align:center;border-bottom:1px solid #d5dae2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
svg.chart{display:block;max-width:100%;height:auto;font-size:11px}
svg .tick{fill:var(--muted);font-size:10.5px}svg .value{fill:var(--fg);font-size:10.5px}
svg .label{fill:var(--fg);font-size:11.5px}
svg .grid{stroke:#edf0f3}svg .axis{stroke:#9aa3b0}svg .hist{fill:#6b8fc7}svg .heat-bg{fill:#f8f9fb;stroke:var(--line)}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:var(--muted);margin-top:2px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
mark.word{background:var(--word);padding:0 1px;border-radius:2px}
.topic{margin:16px 0 0}.topic h3{font-size:15px;margin-bottom:4px}
.chips{display:flex;flex-wrap:wrap;gap:4px 6px;margin-bottom:8px}
.chip{background:#fff;border:1px solid var(--line);border-radius:4px;padding:1px 6px;font-size:12px;color:var(--muted)}
.chip a{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.samples h4{margin:0 0 6px;font-size:12.5px;color:var(--muted);font-weight:600}
.samples{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:10px}
.samples>div{background:#fff;border:1px solid var(--line);border-radius:6px;padding:8px 10px;font-size:13px}
.samples p{margin:0 0 6px;white-space:pre-wrap;overflow-wrap:anywhere}
table.overview td{padding:0}table.overview th{vertical-align:middle}
.cbcell{display:block;padding:5px 8px;color:var(--fg);font-size:11.5px;line-height:1.3}
.cbcell:hover{background:#f0f5ff;text-decoration:none}.cbcell b{display:block;font-size:12.5px}.cbcell span{display:block;color:var(--muted)}
.cbcell svg{max-width:150px;margin-top:2px}
td.empty{background:#fafbfc}
.search{position:sticky;top:0;z-index:2;background:var(--bg);padding:10px 0 6px;display:flex;gap:12px;align-items:center}
#code-search{flex:0 1 520px;font:inherit;padding:6px 10px;border:1px solid #c5cbd4;border-radius:6px;background:#fff}
.codebook{margin-top:14px;content-visibility:auto}
.bh{display:flex;gap:12px;align-items:baseline}.bh h3{margin:0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:8px;margin-top:6px}
.card{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:6px 9px 7px;min-width:0}
.card:target{border-color:var(--accent);box-shadow:0 0 0 2px #c9dafb}
.ch{display:flex;flex-wrap:wrap;gap:2px 10px;align-items:baseline;font-size:12px;margin-bottom:3px}
.addr{font:600 12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.fires{color:var(--muted)}.never{color:#a33}
.ch .label{background:#eef3fb;border-radius:3px;padding:0 5px;color:#24406e}
.ctx{display:grid;grid-template-columns:minmax(0,1fr) auto minmax(0,.55fr) auto;align-items:baseline;
 font:12px/1.55 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre;border-top:1px dotted #eceef2}
.ctx .l{display:flex;justify-content:flex-end;overflow:hidden;color:#3a4252}
.ctx .r{overflow:hidden;color:#3a4252}
.ctx mark{background:var(--mark);border-radius:2px;padding:0 1px;color:#000;font-weight:600}
.ctx .cl{color:var(--muted);font:11px system-ui,sans-serif;padding-left:8px}
[hidden]{display:none!important}
"""

SCRIPT = """
(function () {
  var box = document.getElementById('code-search');
  if (!box) return;
  var cards = Array.prototype.slice.call(document.querySelectorAll('.card'));
  var books = Array.prototype.slice.call(document.querySelectorAll('.codebook'));
  var count = document.getElementById('code-count');
  var texts = null;
  function apply() {  // an address: its codebook's cards or its card; any other text: the cards whose contexts hold it
    var q = box.value.toLowerCase(), address = /^\\s*(l\\d+\\.(h\\d+|mlp|block)(\\.\\d+)?)\\.?\\s*$/.exec(q), shown = 0;
    if (texts === null) texts = cards.map(function (c) {
      return Array.prototype.map.call(c.querySelectorAll('.ctx'), function (x) { return x.textContent; }).join('\\n').toLowerCase();
    });
    cards.forEach(function (c, i) {
      var id = c.id.toLowerCase();
      var ok = !q.trim() || (address ? id === address[1] || id.indexOf(address[1] + '.') === 0 : texts[i].indexOf(q) >= 0);
      c.hidden = !ok; if (ok) shown++;
    });
    books.forEach(function (b) { b.hidden = !!q.trim() && !b.querySelector('.card:not([hidden])'); });
    count.textContent = q.trim() ? shown + ' of ' + cards.length + ' cards' : cards.length + ' cards';
  }
  var timer = null;
  box.addEventListener('input', function () { clearTimeout(timer); timer = setTimeout(apply, 60); });
  document.querySelectorAll('.cbcell').forEach(function (a) {
    a.addEventListener('click', function () { box.value = ''; apply(); });
  });
  function reveal() {  // a link to a card the filter hides: clear the filter, then go there
    var id = location.hash.slice(1);
    try { id = decodeURIComponent(id); } catch (e) {}  // a stray '%': the id as written
    var el = id && document.getElementById(id);
    if (el && el.closest('[hidden]')) { box.value = ''; apply(); el.scrollIntoView(); }
  }
  window.addEventListener('hashchange', reveal);
  document.addEventListener('click', function (e) {  // the same link again changes no hash
    var a = e.target.closest && e.target.closest('a[href^="#"]');
    if (a) setTimeout(reveal, 0);
  });
  count.textContent = cards.length + ' cards';
})();
"""
