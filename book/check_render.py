#!/usr/bin/env python3
"""Renders every chapter of the built book (book/book) in headless Chromium, offline, as a reader's browser would,
and fails on any TeX error or math delimiter that MathJax left as text. Saves a screenshot of the top of each chapter
into the folder given (default out/book-check). Run by `./run.sh book-check` after `mdbook build book`.

Needs Debian's `chromium` (apt-get install chromium)."""
import html
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent
BUILT = ROOT / "book"
OUT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "out/book-check")


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    sys.exit("error: no chromium found: install it (Debian: apt-get install chromium) and run again")


def run(browser, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--hide-scrollbars"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=180)


def check(browser, page):
    dom = run(browser, "--dump-dom", page.as_uri()).stdout
    rendered = dom.count("<mjx-container")
    errors = re.findall(r'<mjx-merror[^>]*data-mjx-error="([^"]*)"', dom) + (
        ["(an mjx-merror without a message)"] if dom.count("<mjx-merror") > 0 and "data-mjx-error" not in dom else []
    )
    text = re.sub(r"<(script|style|pre|code)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    text = re.sub(r"<mjx-container.*?</mjx-container>", " ", text, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    left = [text[max(0, m.start() - 30):m.end() + 30].strip() for m in re.finditer(r"\\[()\[\]]", text)]
    return rendered, errors, left


def main():
    browser = chromium()
    summary = (ROOT / "src" / "SUMMARY.md").read_text()
    pages = [BUILT / (p[:-3] + ".html") for p in re.findall(r"\]\(([^)]+\.md)\)", summary)]
    if not pages or not all(p.exists() for p in pages):
        sys.exit(f"error: {BUILT} has no built chapters: run `mdbook build book` first")
    OUT.mkdir(parents=True, exist_ok=True)
    failed = False
    for page in pages:
        rendered, errors, left = check(browser, page)
        source = re.sub(r"<(script|pre|code)[^>]*>.*?</\1>", " ", page.read_text(), flags=re.S)
        if rendered == 0 and re.search(r"\\[(\[]", source):
            errors.append("the page has math but none was rendered: did MathJax load? (is Chromium working?)")
        shot = OUT / (page.stem + ".png")
        run(browser, f"--screenshot={shot}", "--window-size=1100,1600", page.as_uri())
        status = "ok" if not errors and not left else "FAILED"
        failed |= status != "ok"
        print(f"{status:6} {page.name}: {rendered} formulas rendered, {len(errors)} TeX errors, "
              f"{len(left)} delimiters left as text; screenshot {shot}")
        for e in errors[:5]:
            print(f"         TeX error: {e}")
        for l in left[:5]:
            print(f"         unrendered: …{l}…")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
