"""The built book, read in a real browser: every page, headless Chromium, at 1400 px and at 390 px.

What a reader meets and `jupyter-book build -W` cannot see. Each page fails on:

- a raw Markdown table: a `|---|` separator row left as text (a table CommonMark did not render, or one a
  cell printed into a stream output);
- at 1400 px, a display equation, table, or code/output block wider than the text column. Nothing the
  reader needs may hide behind a sideways scroll on a desktop screen: split the equation, slim the table,
  wrap the block (`_static/course.css`). At 390 px (a phone) a table may scroll sideways inside its own
  container (the theme wraps tables in `.pst-scrollable-table-container`), on purpose, and the page itself
  must not; a display equation must fit its box there too (`course.css` lets display math scroll, as a
  fallback only: since 2026-12-05 every one is split over aligned lines where a phone would cut it);
- a JavaScript console error (a script that failed, or a resource that did not load: offline, a CDN
  counts as not loading);
- on a chapter page, a claim card (the last code cell's output) that is not a table, or whose `grade`
  column is not visible without scrolling at 1400 px (at 390 px: reachable by its table's own scroll), or
  whose grades are wider than their cells (cut at the edge);
- an output holding a traceback or a known warning (`repro_utils.notebooks.KNOWN_DEBRIS`, and any
  `...Warning:` line).

Offline: the book loads MathJax from a CDN. The local server below rewrites that one address to a local
copy of the same MathJax release (3.2.2, from the pinned `django-static-mathjax` wheel), so equations are
typeset and measured with no network. Without the local copy the CDN is used, and a page whose MathJax did
not load fails with that reason.

Screenshots (each page's first screen at both widths, the claim cards, and every element that failed) go
to `_build/screenshots/` for a person to look at. Skipped, with the reason, where Chromium, its driver or
selenium is missing (`.ci/run` installs all three).
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from repro_utils.execute import build_html
from repro_utils.notebooks import KNOWN_DEBRIS

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build" / "browser"  # a fresh build each time: an incremental one keeps stale _static files
HTML = BUILD / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
MATHJAX_CDN = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"
WIDTHS = (1400, 390)

pytestmark = pytest.mark.slow


def _pages() -> list[str]:
    """Every page of the table of contents, as its path without suffix (book/intro, chapters/03_.../03_...)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        for entry in part["chapters"]:
            if "file" in entry:
                pages.append(entry["file"])
            else:
                found = sorted(ROOT.glob(entry["glob"] + ".ipynb")) + sorted(ROOT.glob(entry["glob"] + ".md"))
                pages += [str(p.relative_to(ROOT).with_suffix("")) for p in found
                          if not p.name.endswith(".next.ipynb")]  # a staged next version is not in the book
    return pages


def _chromium() -> tuple[str | None, str | None, str | None]:
    """(browser, driver, why not): Debian's chromium and chromium-driver, and the selenium package."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    missing = [name for name, ok in (("chromium", browser), ("chromedriver (chromium-driver)", driver),
                                     ("selenium", importlib.util.find_spec("selenium"))) if not ok]
    return browser, driver, ("not installed: " + ", ".join(missing) + " (.ci/run installs them)") if missing else None


def _local_mathjax() -> Path | None:
    spec = importlib.util.find_spec("mathjax")  # the django-static-mathjax wheel: MathJax 3.2.2's es5 build
    if spec is None or not spec.submodule_search_locations:
        return None
    es5 = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    return es5 if (es5 / "tex-mml-chtml.js").is_file() else None


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the built book; in HTML, the MathJax CDN address points at the local copy under /_mathjax/."""

    mathjax: Path | None = None

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        if self.mathjax and path.startswith("/_mathjax/"):
            f = self.mathjax / path[len("/_mathjax/"):]
            return self._send(f.read_bytes(), self.guess_type(str(f))) if f.is_file() else self.send_error(404)
        f = Path(self.translate_path(path))
        if self.mathjax and f.suffix == ".html" and f.is_file():
            html = f.read_text().replace(MATHJAX_CDN, "/_mathjax/tex-mml-chtml.js")
            return self._send(html.encode(), "text/html; charset=utf-8")
        return super().do_GET()

    def _send(self, body: bytes, ctype: str):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def site():
    """The book built now from the working tree into `_build/browser/_build/html` (from scratch: Sphinx
    does not overwrite a changed `_static` file in an earlier build), served on the loopback address."""
    browser, driver, why = _chromium()
    if why and os.environ.get("CI"):
        pytest.fail(f"browser test in CI: {why}")  # CI must run it: a skip there would hide a broken book
    if why:
        pytest.skip(f"browser test: {why}")
    shutil.rmtree(BUILD, ignore_errors=True)
    r = build_html(ROOT, path_output=BUILD, capture=True)
    assert r.returncode == 0, "the book does not build with -W:\n" + r.stdout[-3000:] + r.stderr[-3000:]
    handler = type("H", (_Handler,), {"mathjax": _local_mathjax()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(HTML)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    yield f"http://127.0.0.1:{server.server_address[1]}", browser, driver
    server.shutdown()


@pytest.fixture(scope="module")
def chrome(site):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, browser, driver = site
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)  # no Selenium Manager: offline
    d.set_page_load_timeout(60)
    d.set_script_timeout(60)
    yield d
    d.quit()


# One pass over the rendered page; returns a list of {"what", "where", "el"?} problems. `arguments[0]` is
# the viewport width; `arguments[1]` the known debris strings; `arguments[2]` whether this is a chapter.
INSPECT = r"""
const [width, debris, isChapter] = arguments;
const problems = [];
const article = document.querySelector("article.bd-article") || document.querySelector("main");
const colRect = article.getBoundingClientRect();
const colStyle = getComputedStyle(article);
const colRight = colRect.right - parseFloat(colStyle.paddingRight) + 1;
const colLeft = colRect.left + parseFloat(colStyle.paddingLeft) - 1;
const where = (el) => {
  const sec = el.closest("section");
  const h = sec && sec.querySelector("h1, h2, h3, h4");
  return (h ? h.textContent.replace("#", "").trim() : "(top)").slice(0, 70);
};
let marked = 0;
const mark = (el) => { el.setAttribute("data-browser-test", String(++marked)); return marked; };
const scrollsX = (el) => {
  for (let a = el.parentElement; a && a !== article; a = a.parentElement) {
    const o = getComputedStyle(a).overflowX;
    if (o === "auto" || o === "scroll") return a;
  }
  return null;
};

// 1. raw Markdown tables: a |---| separator row left as text, outside code
const SEP = /\|\s*:?[-\u2013\u2014]+:?\s*(\|\s*:?[-\u2013\u2014]+:?\s*)+\|?/;  // "---" may have become a dash
const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
const seen = new Set();
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  const el = n.parentElement;
  if (seen.has(el) || el.closest("script, style, mjx-container")) continue;
  const inCode = el.closest("pre, code, .highlight");
  if (inCode && !el.closest(".cell_output")) continue;  // a table written in source code is fine
  const text = inCode ? inCode.textContent : n.data;  // a text node's own text: its ancestors would repeat it
  if (SEP.test(text)) {
    seen.add(el);
    problems.push({what: (inCode ? "an output prints a Markdown table as text: " : "raw Markdown table: ")
                   + JSON.stringify(text.trim().slice(0, 90)), where: where(el), el: mark(inCode || el)});
  }
}

// 2. widths
const tooWide = (el, kind, inner) => {
  const r = el.getBoundingClientRect();
  const w = inner ? inner.getBoundingClientRect().width : el.scrollWidth;
  const box = scrollsX(el);
  if (width >= 1000) {
    if (r.right > colRight || w > colRight - colLeft + 1 || (inner && el.scrollWidth > el.clientWidth + 1))
      problems.push({what: `${kind} ${Math.round(w)} px wide in a ${Math.round(colRight - colLeft)} px column`,
                     where: where(el), el: mark(el)});
  } else if (r.right > width + 1 && !box) {
    problems.push({what: `${kind} runs off a ${width} px screen with no scroll of its own`, where: where(el),
                   el: mark(el)});
  } else if (inner && w > el.clientWidth + 1) {  // a display equation: split it over aligned lines instead
    problems.push({what: `${kind} ${Math.round(w)} px wide in a ${el.clientWidth} px box at ${width} px: a reader `
                   + "scrolls to see its end (split it over aligned lines)", where: where(el), el: mark(el)});
  }
};
article.querySelectorAll('mjx-container[display="true"]').forEach(
  (m) => tooWide(m, "display equation", m.querySelector("mjx-math")));
article.querySelectorAll("table").forEach((t) => tooWide(t, "table", null));
if (width >= 1000) {
  article.querySelectorAll("div.cell pre, div.highlight pre, .output pre").forEach((p) => {
    if (p.scrollWidth > p.clientWidth + 1)
      problems.push({what: `a code or output block scrolls sideways (${p.scrollWidth} px of text in ${p.clientWidth} px)`
                     + `: ${JSON.stringify(p.textContent.trim().split("\n")[0].slice(0, 60))}`,
                     where: where(p), el: mark(p)});
  });
}
// the page itself: compared with the width asked for, since a phone's emulated viewport widens to its content
if (document.documentElement.scrollWidth > width + 1)
  problems.push({what: `the page is wider than the screen (${document.documentElement.scrollWidth} px at ${width} px)`,
                 where: "(page)"});
// table cells: text that spills over its cell (and prints over the next one), and a number or a row's name that a
// data table (a DataFrame or Styler) breaks across lines ("1871.03|4", "system_prompt_5|12")
const lines = (el) => {
  const r = document.createRange(); r.selectNodeContents(el);
  return new Set([...r.getClientRects()].filter((q) => q.width > 0).map((q) => Math.round(q.top))).size;
};
const spill = [], broken = [];
article.querySelectorAll(".cell_output table").forEach((t) => {
  const data = !!t.closest("div.text_html");
  [...t.querySelectorAll("th, td")].forEach((c) => {
    if (c.scrollWidth > c.clientWidth + 1) spill.push(c);
    const text = c.textContent.trim();  // a column header may break where it must; a value or a row's name not
    if (data && !c.closest("thead") && text && !/[\s\-\u2013\u2014/]/.test(text) && lines(c) > 1) broken.push(c);
  });
});
if (spill.length)
  problems.push({what: `${spill.length} table cell(s) whose text spills over the next one, e.g. ${JSON.stringify(spill[0].textContent.trim().slice(0, 40))}`,
                 where: where(spill[0]), el: mark(spill[0])});
if (broken.length)
  problems.push({what: `${broken.length} word(s) or number(s) a data table breaks across lines, e.g. ${JSON.stringify(broken[0].textContent.trim().slice(0, 40))}`,
                 where: where(broken[0]), el: mark(broken[0])});
// TeX that MathJax never sees: a heading's math repeated in the page's contents sidebar
document.querySelectorAll(".bd-sidebar-secondary, .bd-sidebar-primary, title").forEach((s) => {
  const m = s.textContent.match(/\\\(.{0,40}?\\\)|\$[^$\s][^$]{0,40}\$/);
  if (m) problems.push({what: `raw TeX in the sidebar: ${JSON.stringify(m[0])} (keep math out of headings)`, where: "(sidebar)"});
});
if (document.querySelector(".MathJax_Error, mjx-merror"))
  problems.push({what: "MathJax error: " + document.querySelector(".MathJax_Error, mjx-merror").textContent,
                 where: where(document.querySelector(".MathJax_Error, mjx-merror"))});

// 3. outputs: tracebacks and known warnings
const WARN = /\b[A-Z]\w*Warning: /;
article.querySelectorAll(".cell_output").forEach((o) => {
  const text = o.textContent;
  const hits = debris.filter((d) => text.includes(d));
  if (text.includes("Traceback (most recent call last)")) hits.push("Traceback (most recent call last)");
  const m = text.match(WARN);
  if (m) hits.push(m[0]);
  if (hits.length) problems.push({what: "output holds " + hits.map((h) => JSON.stringify(h)).join(", "),
                                  where: where(o), el: mark(o)});
});

// 4. the claim card: the last code cell's output must hold a table with a visible grade column
let card = null;
if (isChapter) {
  const cells = [...article.querySelectorAll("div.cell")].filter((c) => c.querySelector(".cell_output"));
  const last = cells[cells.length - 1];
  const tables = last ? [...last.querySelectorAll(".cell_output table")] : [];
  const graded = tables.filter((t) => [...t.querySelectorAll("thead th, tr:first-child th")].some(
    (th) => th.textContent.trim().toLowerCase() === "grade"));
  if (!graded.length) {
    problems.push({what: "the claim card (the last cell's output) is not a table with a 'grade' column"
                   + (tables.length ? "" : ` (no table; it starts ${JSON.stringify((last ? last.textContent : "").trim().slice(0, 80))})`),
                   where: "(claim card)", el: last ? mark(last) : undefined});
  }
  graded.forEach((t) => {
    const ths = [...t.querySelectorAll("thead th, tr:first-child th")];
    const col = ths.findIndex((th) => th.textContent.trim().toLowerCase() === "grade");
    const box = scrollsX(t);
    const right = Math.min(width, box ? box.getBoundingClientRect().right : Infinity, width >= 1000 ? colRight : Infinity);
    const hidden = [...t.rows].map((row) => row.cells[col]).filter((c) => c && c.getBoundingClientRect().right > right + 1);
    if (hidden.length && (width >= 1000 || !box))
      problems.push({what: `the claim card's grade column is not visible (${hidden.length} of ${t.rows.length} cells past the right edge)`,
                     where: "(claim card)", el: mark(t)});
    // at every width: a grade's words fit their cell (a word wider than the cell is cut at its edge)
    const cut = [...t.rows].map((row) => row.cells[col]).filter((c) => c && [...c.querySelectorAll("strong")].some(
      (b) => b.getBoundingClientRect().right > c.getBoundingClientRect().right + 1));
    if (cut.length)
      problems.push({what: `the claim card's grades are cut at their cell's edge (${cut.length} of ${t.rows.length} cells)`,
                     where: "(claim card)", el: mark(t)});
    card = card || mark(t);
  });
}
return {problems, card, mathjax: !!(window.MathJax && window.MathJax.startup),
        needsMath: !!article.querySelector(".math, .MathJax, mjx-container") || /\\\[|\\\(/.test(article.textContent)};
"""

WAIT_MATHJAX = """
const done = arguments[arguments.length - 1];
if (window.MathJax && MathJax.startup && MathJax.startup.promise)
  MathJax.startup.promise.then(() => done("typeset"), (e) => done("error: " + e));
else done("absent");
"""


def _shot(d, el_id, path: Path) -> None:
    el = d.find_elements("css selector", f'[data-browser-test="{el_id}"]')
    if el:
        d.execute_script("arguments[0].scrollIntoView({block: 'start'});", el[0])
        try:
            el[0].screenshot(str(path))
        except Exception:  # an element taller than the renderer allows: its first screen instead
            d.save_screenshot(str(path))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("page", _pages())
def test_page_reads_well_in_a_browser(site, chrome, page, width):
    base, _, _ = site
    d = chrome
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": width < 1000})
    d.get_log("browser")  # drop what earlier pages logged
    d.get(f"{base}/{page}.html")
    mathjax = d.execute_async_script(WAIT_MATHJAX)
    d.execute_script("return document.fonts.ready")
    chapter = page.startswith("chapters/")
    out = d.execute_script(INSPECT, width, list(KNOWN_DEBRIS), chapter)
    problems = [f"{p['where']}: {p['what']}" for p in out["problems"]]
    if out["needsMath"] and mathjax != "typeset":
        problems.append(f"MathJax did not typeset this page ({mathjax}): no local copy (pip install "
                        f"django-static-mathjax) and the CDN did not load")
    problems += [f"console {e['level']}: {e['message'][:200]}" for e in d.get_log("browser") if e["level"] == "SEVERE"]

    stem = page.replace("/", "__") + f"@{width}"
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot(str(SHOTS / f"{stem}.png"))
    if out["card"]:
        _shot(d, out["card"], SHOTS / f"{stem}.claim-card.png")
    for i, p in enumerate(out["problems"][:12]):
        if p.get("el"):
            _shot(d, p["el"], SHOTS / f"{stem}.problem-{i + 1:02d}.png")
    (SHOTS / f"{stem}.json").write_text(json.dumps(problems, indent=1))
    assert not problems, (f"{page} at {width} px: {len(problems)} problem(s) a reader sees "
                          f"(screenshots in {SHOTS.relative_to(ROOT)}/{stem}*):\n  " + "\n  ".join(problems))

