"""Great Expectations Data Docs that open offline, with a fewtune summary page as their index.

The stock Data Docs pages load Bootstrap, jQuery, Vega and Font Awesome from CDNs, and their index builds its
tables with JavaScript. Without a network that leaves unstyled pages and an empty index. So after Great
Expectations writes the site:

- every page loses its external `<script>`/`<link>`/`<img>` tags and its inline scripts (useless without the
  libraries), and gets a small inline stylesheet instead; the status icons become text symbols;
- the bulky unused assets (fonts, animated GIFs) are removed from `static/`;
- `index.html` is replaced by a static summary: the files, every check with its severity and counts, the fatal
  problems, and links to the Great Expectations page of each suite (one per table that was validated).
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path
from typing import Any

from data_checks.suite import DOCS_SITE

_EXTERNAL_SCRIPT = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^>]*>\s*</script>", re.I | re.S)
_INLINE_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>", re.I | re.S)
_EXTERNAL_TAG = re.compile(r"<(?:link|img)\b[^>]*\b(?:href|src)\s*=\s*[\"']?(?:https?:)?//[^>]*>", re.I | re.S)
_FOOTER = re.compile(r"<footer\b.*?</footer>", re.I | re.S)  # a newsletter link
_UNUSED_STATIC = ("fonts", "images/glossary_scroller.gif", "images/validation_failed_unexpected_values.gif",
                  "images/iterative-dev-loop.png", "images/logo-long-vector.svg", "images/short-logo-vector.svg")

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:0;color:#1d2430;background:#fff;
  line-height:1.4;font-size:14px}
main,.container-fluid{padding:1rem 2rem}
h1{font-size:1.5rem}h2,h3,h4{font-size:1.15rem;margin:1.2rem 0 .5rem}
a{color:#1b5fb4}
table{border-collapse:collapse;margin:.4rem 0;max-width:100%}
th,td{border:1px solid #d5dbe3;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f2f4f7}
.card{border:1px solid #d5dbe3;border-radius:6px;margin:.6rem 0;padding:.4rem .8rem}
.card-header{background:#f7f8fa;font-weight:600;padding:.3rem .5rem}
.badge{display:inline-block;padding:0 .4rem;border-radius:4px;background:#e4e8ee;font-size:.85em}
.text-danger,.fatal{color:#b42318}.text-success,.ok{color:#137333}.warn{color:#9a6700}
.fa-times:before{content:"\\2717 ";font-style:normal}.fa-check-circle:before,.fa-check:before{content:"\\2713 ";
  font-style:normal}.fa-exclamation-triangle:before{content:"! ";font-style:normal}
.navbar,.btn-group,.ge-navigation-sidebar-container,.ge-breadcrumbs,#ge-cta-footer{display:none}
.show-scrollbars{overflow:auto}
code,pre{background:#f2f4f7;padding:0 .2rem;border-radius:3px;white-space:pre-wrap}
.problems pre{border-left:3px solid #b42318;padding:.4rem .6rem}
"""


def _offline_page(text: str) -> str:
    text = _EXTERNAL_SCRIPT.sub("", text)
    text = _INLINE_SCRIPT.sub("", text)
    text = _EXTERNAL_TAG.sub("", text)
    text = _FOOTER.sub("", text)
    style = f"<style>{STYLE}</style>"
    return text.replace("</head>", style + "</head>", 1) if "</head>" in text else style + text


def make_offline(site_dir: Path) -> list[Path]:
    """Rewrite every page of a Data Docs site so it needs no network; returns the pages."""
    pages = sorted(site_dir.rglob("*.html"))
    for page in pages:
        page.write_text(_offline_page(page.read_text(encoding="utf-8")), encoding="utf-8")
    for name in _UNUSED_STATIC:
        target = site_dir / "static" / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return pages


def _suite_pages(site_dir: Path) -> dict[str, dict[str, str]]:
    """Relative links to each suite's validation result page and expectation suite page."""
    pages: dict[str, dict[str, str]] = {}
    for page in sorted((site_dir / "validations").rglob("*.html")):
        suite = page.relative_to(site_dir / "validations").parts[0]
        pages.setdefault(suite, {})["validation"] = page.relative_to(site_dir).as_posix()
    for page in sorted((site_dir / "expectations").rglob("*.html")):
        pages.setdefault(page.stem, {})["expectations"] = page.relative_to(site_dir).as_posix()
    return pages


def _cell(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def summary_page(report: dict[str, Any], pages: dict[str, dict[str, str]]) -> str:
    """The index page: a static rendering of `validation.json` with links to the Great Expectations pages."""
    usable = report["usable"]
    status = '<span class="ok">usable</span>' if usable else '<span class="fatal">not usable</span>'
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fewtune validation</title>",
        f"<style>{STYLE}</style></head><body><main>",
        f"<h1>fewtune validation: {status}</h1>",
        f"<p>{report['splits']['train']} training rows and {report['splits']['eval']} eval rows kept "
        f"(eval from the {_cell(report['eval_source'])}); {report['quarantined']} rows quarantined, "
        f"{report['warned_rows']} rows with warnings.</p>",
    ]
    if report["problems"]:
        parts.append('<h2 class="fatal">Why the run stops</h2><div class="problems">')
        parts += [f"<pre>{html.escape(p)}</pre>" for p in report["problems"]]
        parts.append("</div>")
    parts.append("<h2>Files</h2><table><tr><th>role</th><th>path</th><th>rows in</th><th>kept</th>"
                 "<th>quarantined</th></tr>")
    for role, f in report["files"].items():
        parts.append(
            f"<tr><td>{_cell(role)}</td><td><code>{_cell(f['path'])}</code></td><td>{f['rows_in']}</td>"
            f"<td>{f['rows_kept']}</td><td>{f['rows_quarantined']}</td></tr>"
        )
    parts.append("</table><h2>Checks</h2><table><tr><th>check</th><th>severity</th><th>what it expects</th>"
                 "<th>flagged</th><th>quarantined</th><th>warnings</th><th>suite</th></tr>")
    for name, c in report["checks"].items():
        css = {"fatal": "fatal", "row error": "", "warning": "warn"}.get(c["severity"], "")
        failed = c["flagged"] > 0
        suite = c.get("suite")
        link = pages.get(suite or "", {}).get("validation")
        suite_cell = f'<a href="{html.escape(link)}">{_cell(suite)}</a>' if link else _cell(suite)
        parts.append(
            f"<tr><td><b>{_cell(name)}</b></td><td class='{css if failed else ''}'>{_cell(c['severity'])}</td>"
            f"<td>{_cell(c['description'])}</td><td>{c['flagged']}</td><td>{c['quarantined']}</td>"
            f"<td>{c['warned']}</td><td>{suite_cell}</td></tr>"
        )
    parts.append("</table>")
    if report.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_cell(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append("<h2>Great Expectations pages</h2><ul>")
    for suite, links in pages.items():
        items = [f'<a href="{html.escape(href)}">{kind}</a>' for kind, href in sorted(links.items(), reverse=True)]
        parts.append(f"<li>{_cell(suite)}: {', '.join(items)}</li>")
    parts.append("</ul><p>Severities: <b>fatal</b> stops the run (Great Expectations severity <i>critical</i>); "
                 "<b>row error</b> quarantines the row (<i>warning</i>); <b>warning</b> keeps the row and reports it "
                 "(<i>info</i>).</p></main></body></html>")
    return "\n".join(parts)


def write_data_docs(context: Any, site_dir: Path, report: dict[str, Any]) -> Path:
    """Build the Data Docs site of `context` into `site_dir`, make it offline, write the summary index."""
    context.build_data_docs(site_names=[DOCS_SITE])
    make_offline(site_dir)
    index = site_dir / "index.html"
    index.write_text(summary_page(report, _suite_pages(site_dir)), encoding="utf-8")
    return index
