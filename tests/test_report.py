"""report.py: the page is one file that requests nothing, escapes what it shows, and its code browser
tells what the recorded codes did; then the page itself in headless Chromium (selenium and
chromedriver): no console error, every codebook and card there, the search filters, an anchor
scrolls to its card, the screenshot shows something. Without Chromium the browser tests skip,
unless CODEBOOK_REQUIRE_BROWSER=1 (CI), where they fail instead."""
import base64
import math
import os
import re

import pytest
import torch

import codebook as cb
import report
from conftest import count, page_errors

HOSTILE = '</script><b>"&'  # a token whose text would break a page that did not escape it
TEXT = [str(d) for d in range(9)] + [HOSTILE, "^"]  # token 9 is hostile, 10 is BOS


@pytest.fixture(scope="module")
def run():
    """A tiny codebook model, k-means initialised as the scripts do, its reference set and per-position labels."""
    torch.manual_seed(0)
    model = cb.GPT(cb.GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, d_model=32, d_mlp=64, codebooks={
        "attn": dict(num_codes=24, k=1), "mlp": dict(num_codes=40, k=2, layers=[1])}))
    data = torch.randint(0, 10, (32, 17), generator=torch.Generator().manual_seed(0))
    cb.init_codebooks_kmeans(model, data[:, :-1])
    model.eval()
    tokens = torch.cat([torch.full((12, 1), 10), data[:12, 1:-1]], 1)
    labels = torch.where(tokens < 10, tokens % 3, -1)  # three labels: the token's value mod 3
    return model, tokens, labels


def browser_data(run, **kw):
    model, tokens, labels = run
    return report.code_browser_data(model, tokens, TEXT, labels=labels, label_names=["zero", "one", "two"],
                                    contexts=5, before=4, after=2, **kw)


def write_page(run, path, **kw):
    data = browser_data(run, **kw)
    curves = [{"name": "loss", "x": [0, 10, 20], "y": [2.4, 2.0, 1.9]}]
    return data, report.write(str(path), "Test run", [
        report.section("Results", report.table([["loss", 1.9], ["<i>accuracy</i>", "50.0%"]], ["metric", "value"])),
        report.section("Training", report.line_chart(curves, "step", "loss", log_y=True),
                       report.bar_chart(["a", "b"], [{"name": "hits", "values": [0.2, 0.9]}], report.pct, 1.0)),
        report.section("States", report.heat_map([[0.0, 0.5], [1.0, 0.0]], ["s0", "s1"], ["c0", "c1"])),
        report.section("Code browser", report.code_browser(data))])


# --- the data -------------------------------------------------------------------------------

def test_cards_count_the_recorded_codes_and_hold_their_strongest_contexts(run):
    model, tokens, labels = run
    data = browser_data(run, max_cards=6)
    ids, scores = cb.record_dataset(model, tokens)
    assert [b["address"] for b in data["codebooks"]] == [a for a, _, _ in model.codebook_heads()]
    assert any("label" in c for b in data["codebooks"] for c in b["cards"])
    for book in data["codebooks"]:
        v, s = ids[book["address"]], scores[book["address"]]
        counts = torch.bincount(v.flatten(), minlength=book["num_codes"])
        assert book["used"] == int((counts > 0).sum()) and sorted(book["counts"]) == sorted(counts[counts > 0].tolist())
        assert [c["fires"] for c in book["cards"]] == sorted(counts[counts > 0].tolist(), reverse=True)[:6]  # most frequent first
        for card in book["cards"]:
            c = card["code"]
            fired = (v == c).any(-1)  # (rows, seq)
            strength = torch.where(v == c, s, torch.tensor(-float("inf"))).amax(-1)
            expected = strength[fired].sort(descending=True).values[:5]
            assert [x["score"] for x in card["contexts"]] == pytest.approx(expected.tolist())
            for x in card["contexts"]:
                assert fired[x["row"], x["pos"]] and x["token"] == TEXT[tokens[x["row"], x["pos"]]]
                assert x["left"] == "".join(TEXT[t] for t in tokens[x["row"], max(0, x["pos"] - 4):x["pos"]])
            # the best label by F1, counted by hand
            on = [labels[fired] == lab for lab in range(3)]
            precision = [float(m.float().mean()) for m in on]
            recall = [float(m.sum()) / float((labels == lab).sum()) for lab, m in enumerate(on)]
            f1 = [2 * p * r / (p + r) if p + r else 0 for p, r in zip(precision, recall)]
            best = max(range(3), key=lambda lab: f1[lab])
            if f1[best] == 0:  # fires on no labelled position (BOS only): no label to name
                assert "label" not in card
                continue
            assert card["label"]["name"] == ["zero", "one", "two"][best]
            assert card["label"]["precision"] == pytest.approx(precision[best])
            assert card["label"]["recall"] == pytest.approx(recall[best])


def test_each_codebook_s_figures_and_every_context_s_cuts_counted_by_hand(run):
    model, tokens, _ = run
    shown = [[f"<{r},{p}>" for p in range(tokens.shape[1])] for r in range(tokens.shape[0])]
    data = report.code_browser_data(model, tokens, position_text=shown, max_cards=None, contexts=1000, before=3, after=2)
    ids, _ = cb.record_dataset(model, tokens)
    positions = tokens.numel()
    for book in data["codebooks"]:
        counts = torch.bincount(ids[book["address"]].flatten(), minlength=book["num_codes"]).tolist()
        share = [n / sum(counts) for n in counts if n]
        assert book["entropy_bits"] == pytest.approx(-sum(q * math.log2(q) for q in share))
        assert book["dead_share"] == pytest.approx(counts.count(0) / book["num_codes"]) and book["positions"] == positions
        for card in book["cards"]:
            assert card["density"] == pytest.approx(counts[card["code"]] / positions)  # a share of positions, whatever k
            for x in card["contexts"]:  # "…" where the row holds tokens the context leaves out
                assert x["cut_left"] == (x["left"].count("<") < x["pos"])
                assert x["cut_right"] == (x["right"].count("<") < tokens.shape[1] - 1 - x["pos"])
    cut = {(x["cut_left"], x["cut_right"]) for b in data["codebooks"] for c in b["cards"] for x in c["contexts"]}
    positions_seen = {x["pos"] for b in data["codebooks"] for c in b["cards"] for x in c["contexts"]}
    assert len(cut) == 3 and positions_seen == set(range(tokens.shape[1]))  # every position, at the edges too


def test_a_code_on_unlabelled_positions_only_has_no_label_and_a_card_shows_its_label_s_figures(run):
    model, tokens, _ = run
    ids, _ = cb.record_dataset(model, tokens)
    book = model.codebook_heads()[0][0]
    code = int(ids[book][..., 0].flatten().mode().values)
    labels = torch.where((ids[book] == code).any(-1), -1, tokens % 2)  # none where the code fires
    data = report.code_browser_data(model, tokens, TEXT, labels=labels, label_names=["even", "odd"], max_cards=None)
    cards = {c["code"]: c for c in data["codebooks"][0]["cards"]}
    assert "label" not in cards[code] and cards[code]["fires"] > 0
    page = str(report.code_browser(data))
    labelled = [c for b in data["codebooks"] for c in b["cards"] if "label" in c]
    assert any(round(100 * c["label"]["precision"]) != round(100 * c["label"]["recall"]) for c in labelled)
    for c in labelled:
        p, r = (f"{100 * c['label'][key]:.0f}%" for key in ("precision", "recall"))
        assert re.search(rf'id="{re.escape(c["address"])}".*?<b>{c["label"]["name"]}</b> P {p} · R {r}</span>', page)


def test_ranked_codes_and_attributes_show_what_they_are_given():
    ranked = str(report.ranked_codes([{"address": "L0.H1.3", "precision": 0.8, "recall": 0.2}], "texts"))
    assert re.findall(r"<td[^>]*>(.*?)</td>", ranked) == ["1", '<a href="#L0.H1.3" class="code">L0.H1.3</a>',
                                                         "80.0%", "20.0%", "32.0%"]  # F1 2 x 0.8 x 0.2 / 1.0
    assert "precision (texts)" in ranked
    assert str(report.tag("a", "x", href='#"><script>', title="a&b")) == \
        '<a href="#&quot;&gt;&lt;script&gt;" title="a&amp;b">x</a>'


def test_every_code_that_fires_gets_a_card_up_to_a_page_of_max_cards(run, monkeypatch):
    everything = browser_data(run, max_cards=None)
    firing = [len(b["cards"]) for b in everything["codebooks"]]
    assert firing == [int(ids.unique().numel()) for ids in cb.record_dataset(run[0], run[1])[0].values()]
    monkeypatch.setattr(report, "MAX_CARDS", sum(firing) - 1)  # one card too many: each codebook gets its share
    capped = browser_data(run, max_cards=None)
    share = (sum(firing) - 1) // len(firing)
    assert [len(b["cards"]) for b in capped["codebooks"]] == [min(n, share) for n in firing]


def test_a_code_that_never_fires_gets_its_card_when_asked_for(run, tmp_path):
    data = browser_data(run, max_cards=1)
    book = data["codebooks"][-1]  # L1.MLP: 40 codes, some of them unused on 12 x 16 tokens
    counts = torch.bincount(cb.record_dataset(run[0], run[1])[0][book["address"]].flatten(), minlength=40)
    dead = int((counts == 0).nonzero()[0])
    data, path = write_page(run, tmp_path / "report.html", max_cards=1, always=[f"{book['address']}.{dead}"])
    card = data["codebooks"][-1]["cards"][-1]
    assert card["address"] == f"{book['address']}.{dead}" and card["fires"] == 0 and card["contexts"] == []
    page = open(path).read()
    assert re.search(rf'id="{re.escape(card["address"])}".*?never fires on the reference set', page)


def test_position_text_shows_each_position_its_own_way(run):
    model, tokens, _ = run
    shown = [[f"<{r},{p}>" for p in range(tokens.shape[1])] for r in range(tokens.shape[0])]
    data = report.code_browser_data(model, tokens, position_text=shown, before=2, after=1, separator=" ")
    for x in data["codebooks"][0]["cards"][0]["contexts"]:
        r, p = x["row"], x["pos"]
        assert x["token"] == f"<{r},{p}>"
        assert x["left"] == "".join(f"<{r},{q}> " for q in range(max(0, p - 2), p))
        assert x["right"] == "".join(f" <{r},{q}>" for q in range(p + 1, min(p + 2, tokens.shape[1])))


def test_bad_inputs_are_one_line_errors(run):
    model, tokens, labels = run
    plain = cb.GPT(cb.GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, d_model=16, d_mlp=32))
    cases = [(lambda: report.code_browser_data(plain, tokens, TEXT), "has no codebooks"),
             (lambda: report.code_browser_data(model, tokens[:0], TEXT), "reference set is empty"),
             (lambda: report.code_browser_data(model, tokens, TEXT[:5]), "5 strings for a vocabulary of 11"),
             (lambda: report.code_browser_data(model, tokens, TEXT, labels=labels[:, :3]), "do not match tokens"),
             (lambda: report.code_browser_data(model, tokens, position_text=[["a"]]), "one string per token"),
             (lambda: report.code_browser_data(model, tokens), "give token_text"),
             (lambda: report.code_browser_data(model, tokens, TEXT, always=["L1.MLP"]), "name a code"),
             (lambda: report.code_browser_data(model, tokens, TEXT, always=["L0.MLP.3"]), "no mlp codebook")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


# --- the page as a file ---------------------------------------------------------------------

def test_the_page_is_one_file_that_requests_nothing_and_escapes_its_text(run, tmp_path):
    _, path = write_page(run, tmp_path / "out" / "report.html")
    assert path == str(tmp_path / "out" / "report.html") and os.listdir(tmp_path / "out") == ["report.html"]
    page = open(path, encoding="utf-8").read()
    for pattern in (r"https?:", r"//cdn", r"@import", r"@font-face", r"url\(", r"<link", r"<img", r"<iframe"):
        assert not re.search(pattern, page, re.I), pattern
    refs = re.findall(r"""\b(?:src|href|xlink:href|action)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert refs and all(r.startswith("#") for r in refs)  # links to its own anchors only
    assert page.count("<script") == 1 and page.count("</script>") == 1  # the page's own script
    assert "<i>accuracy</i>" not in page and "&lt;i&gt;accuracy&lt;/i&gt;" in page
    assert "<b>\"&" not in page and "&lt;/script&gt;&lt;b&gt;&quot;&amp;" in page
    odd = report.write(str(tmp_path / "odd.html"), "caf\udce9", [], subtitle="python steer.py --reference caf\udce9.txt")
    assert "caf\\udce9" in open(odd, encoding="utf-8").read()  # a name not in UTF-8 (kept by Python as a surrogate)
    titled = report.page("t", [report.section(title) for title in ("Codes", "日本語", "中文", "Codes")])
    anchors = re.findall(r'<section id="([^"]+)"', titled)
    assert len(set(anchors)) == 4 and re.findall(r'href="#([^"]+)"', titled) == anchors  # one anchor per section
    # what would not show, or would reorder the text after it, shows as its escape; a regex makes a plain fragment id
    assert report.escape("a\x00b\u202ec<d\n") == "a\\x00b\\u202ec&lt;d\n"
    assert report.anchor("dragon|qu|<b>%41 #x") == "dragon-qu-b-41-x"
    cells = re.findall(r"<td([^>]*)>", report.table([["<0.1%", "2.0% / 3.5%", "x / y"]], ["a", "b", "c"]))
    assert cells == [' class="num"', ' class="num"', ""]  # numbers align as numbers, whatever pct wrote


def test_charts_take_odd_data():
    # a share that rounds to zero is not shown as none (2 dead codes of 8,192)
    assert [report.pct(v) for v in (0, 2 / 8192, 0.5)] == ["0.0%", "<0.1%", "50.0%"] and report.pct(2e-5, 2) == "<0.01%"
    assert report.line_chart([{"name": "x", "x": [0, 1], "y": [float("nan"), None]}]).startswith("<p")
    def ticks(svg, anchor):  # {label: its x (x axis, anchor middle) or the y of its grid line (y axis, anchor end)}
        found = re.findall(rf'<text x="([\d.]+)" y="([\d.]+)" text-anchor="{anchor}" class="tick">([^<]*)<', svg)
        return {label: float(x) if anchor == "middle" else float(y) - 4 for x, y, label in found}

    one = report.line_chart([{"name": "x", "x": [5], "y": [0.0]}])  # one point: a dot at (5, 0)
    assert re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', one) == [(f"{ticks(one, 'middle')['5']:.1f}", f"{ticks(one, 'end')['0']:.1f}")]
    log = report.line_chart([{"name": "x", "x": [0, 1, 2], "y": [0.0, 1e-3, 10.0]}], log_y=True)  # 0 has no place: left out
    x, y = ticks(log, "middle"), ticks(log, "end")
    assert re.findall(r'<polyline points="([^"]*)"', log) == [f"{x['1']:.1f},{y['0.001']:.1f} {x['2']:.1f},{y['10']:.1f}"]
    assert re.findall(r'<rect [^>]*width="([\d.]+)"[^>]*><title>([^<]*)<', report.bar_chart(["a"], [{"name": "v", "values": [0.0]}])) \
        == [("0.0", "v: 0")]  # a bar of no length
    assert report.nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert report.nice_ticks(0.13, 0.97, 4, outward=True) == [0, 0.25, 0.5, 0.75, 1.0]
    assert report.log_ticks(1e-2, 2) == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2]
    assert report.log_ticks(1e-3, 20) == [0.001, 0.01, 0.1, 1, 10]  # many decades: the decades only
    assert str(report.highlight("a dragon <3 dragons", r"dragons?")) == \
        'a <mark class="word">dragon</mark> &lt;3 <mark class="word">dragons</mark>'


# --- the page in a real browser ---------------------------------------------------------------

@pytest.fixture(scope="module")
def opened(run, browser, tmp_path_factory):
    data, path = write_page(run, tmp_path_factory.mktemp("page") / "report.html", max_cards=8)
    url = "file://" + path
    browser.get(url)
    return data, url


def test_browser_shows_every_codebook_and_card_without_errors(browser, opened):
    data, _ = opened
    assert page_errors(browser) == []
    assert count(browser, ".codebook") == len(data["codebooks"]) == 5  # two heads in two layers, one MLP
    assert count(browser, ".card") == sum(len(b["cards"]) for b in data["codebooks"]) > 10
    assert count(browser, ".overview .cbcell") == len(data["codebooks"])
    assert count(browser, "svg.chart") >= 3 + len(data["codebooks"])  # the charts and one sparkline per codebook
    # the hostile token shows as text: a mark holds it, and no element came out of it
    marks = browser.execute_script("return Array.from(document.querySelectorAll('mark'), m => m.textContent)")
    assert HOSTILE in marks
    assert browser.execute_script("return document.querySelectorAll('.ctx b').length") == 0
    # a screenshot that is not one colour: decoded by the browser itself, sampled on a grid
    shot = base64.b64encode(base64.b64decode(browser.get_screenshot_as_base64())).decode()
    colours = browser.execute_async_script("""
        var done = arguments[1], img = new Image();
        img.onload = function () {
          var c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
          var g = c.getContext('2d'); g.drawImage(img, 0, 0);
          var px = g.getImageData(0, 0, img.width, img.height).data, seen = {};
          for (var y = 0; y < img.height; y += 7) for (var x = 0; x < img.width; x += 7) {
            var i = 4 * (y * img.width + x); seen[px[i] + ',' + px[i + 1] + ',' + px[i + 2]] = 1; }
          done(Object.keys(seen).length);
        };
        img.src = 'data:image/png;base64,' + arguments[0];""", shot)
    assert colours >= 8


def test_browser_search_hides_the_cards_that_do_not_match(browser, opened):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    data, url = opened
    browser.get(url)
    box = browser.find_element(By.ID, "code-search")
    clear = lambda: box.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)  # typed, so the page sees it
    visible = "return Array.from(document.querySelectorAll('.card')).filter(c => !c.closest('[hidden]')).map(c => c.id)"
    book = data["codebooks"][1]
    box.send_keys(book["address"] + ".")
    expected = sorted(c["address"] for c in book["cards"])
    WebDriverWait(browser, 5, poll_frequency=0.05).until(lambda d: sorted(d.execute_script(visible)) == expected)
    clear()  # a code's address: its card, not those whose ids start alike (L0.H1.5, not L0.H1.50)
    card = book["cards"][0]["address"]
    box.send_keys(card)
    WebDriverWait(browser, 5, poll_frequency=0.05).until(lambda d: d.execute_script(visible) == [card])
    # by context text: a piece of one card's context; the cards shown are exactly those holding it
    clear()
    piece = data["codebooks"][0]["cards"][0]["contexts"][0]
    query = (piece["left"][-2:] + piece["token"] + piece["right"][:1]).lower()
    box.send_keys(query)
    holds = f"""return Array.from(document.querySelectorAll('.card')).filter(c => Array.from(c.querySelectorAll('.ctx'))
                  .map(x => x.textContent).join('\\n').toLowerCase().indexOf({query!r}) >= 0).map(c => c.id)"""
    WebDriverWait(browser, 5, poll_frequency=0.05).until(lambda d: sorted(d.execute_script(visible)) == sorted(d.execute_script(holds)))
    shown = browser.execute_script(visible)
    assert data["codebooks"][0]["cards"][0]["address"] in shown
    assert 0 < len(shown) < sum(len(b["cards"]) for b in data["codebooks"])
    clear()
    WebDriverWait(browser, 5, poll_frequency=0.05).until(lambda d: len(d.execute_script(visible)) == sum(len(b["cards"]) for b in data["codebooks"]))


def test_browser_code_anchor_scrolls_its_card_into_view(browser, opened):
    data, url = opened
    address = data["codebooks"][-1]["cards"][-1]["address"]  # the last card, far below the first screen
    browser.get(url)
    assert browser.execute_script("return window.scrollY") == 0
    browser.get(f"{url}#{address}")
    top, bottom, height = browser.execute_script(
        "var r = document.getElementById(arguments[0]).getBoundingClientRect(); return [r.top, r.bottom, innerHeight]",
        address)
    assert browser.execute_script("return window.scrollY") > 0 and 0 <= top and bottom <= height
    assert browser.execute_script("return document.querySelector(':target').id") == address
