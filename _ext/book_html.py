"""A local Sphinx extension for the book's HTML (listed in _config.yml under sphinx.local_extensions).

jupyter-book 1.0.4 with sphinx-thebe 0.3.1 and sphinx-togglebutton 0.4.5 puts two inline scripts on every
page twice; the second ``const THEBE_JS_URL = ...`` is a SyntaxError in every reader's console (the
browser test, tests/test_browser.py, fails on console errors). Each page keeps the first copy of a script.
"""

from __future__ import annotations


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for js in context.get("script_files", []):
        attrs = getattr(js, "attributes", {}) or {}
        key = ("body", attrs["body"]) if attrs.get("body") else ("file", str(getattr(js, "filename", js)))
        if key in seen:
            continue
        seen.add(key)
        kept.append(js)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", _dedupe_scripts, priority=999)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
