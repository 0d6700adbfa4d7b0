"""Reports people want to read: one run (base vs tuned) or several adapters against one base.

An `eval` folder of several candidates is read as its candidates side by side, plus a table of
the candidates against each other (paired deltas with 95% CIs).

`write_reports` renders two files from finished run folders:

* `report.html` -- one self-contained page: inline CSS, matplotlib plots as PNG data URIs and
  a Content-Security-Policy that forbids every fetch and every script but our own filter, so
  it opens offline and stays inert whatever the model wrote. Model text is only ever inserted
  through jinja2 autoescaping.
* `report.md` -- the same numbers as a compact GitHub-flavoured summary, always under
  `MD_MAX_BYTES`, with every piece of model/data text escaped so it renders as text.

The folders are read by `loading`, what the templates show is built by `content`, the plots are drawn by
`run_plots` (on the shared helpers of `figures`); this module renders and writes.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import jinja2
from markupsafe import Markup

from harness.errors import RunError
from harness.io import atomic_write_text
from harness.reporting.content import MD_LEVELS, build_context
from harness.reporting.loading import load_runs
from harness.reporting.run_plots import plots

TEMPLATES = Path(__file__).parent / "templates"
MD_MAX_BYTES = 60_000
_MD_ESCAPES = {
    "\\": "\\\\", "&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|", "`": "\\`",
    "[": "\\[", "]": "\\]", "*": "\\*", "_": "\\_", "~": "\\~",
}


def write_reports(run_dirs: list[Path], out_dir: Path) -> tuple[Path, Path]:
    """Render `report.html` and `report.md` for `run_dirs` into `out_dir`; return both paths.

    Both are rendered before either is written, so a bad run folder leaves no half report.
    """
    if not run_dirs:
        raise RunError("no run folders given to report on")
    loaded = [load_runs(Path(d)) for d in run_dirs]
    runs = [run for folder_runs, _ in loaded for run in folder_runs]
    comparisons = [pair for _, pairs in loaded for pair in pairs]
    labels = [r.label or str(r.manifest.get("run_id") or r.path.name) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{i}. {label}" for i, label in enumerate(labels, 1)]
    for run, label in zip(runs, labels):
        run.label = label
    context = build_context(runs, comparisons)
    context["plots"] = plots(runs, context["shared_base"])
    html = render_html(context)
    markdown = render_markdown(context)
    out_dir = Path(out_dir)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    atomic_write_text(html_path, html)
    atomic_write_text(md_path, markdown)
    return html_path, md_path


def md_escape(text, limit: int | None = None) -> str:
    """Model/data text as inert Markdown: one line, at most `limit` chars, markup escaped."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)].rstrip() + "…"
    text = "".join(_MD_ESCAPES.get(c, c) for c in text)
    return "\\" + text if text.startswith("#") else text


TEMPLATE_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), disabled_extensions=("md.j2",),
                                        default=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
TEMPLATE_ENV.filters["md"] = md_escape


def render_html(context: dict) -> str:
    """The page; its only script is our filter, allowed by hash in the page's CSP."""
    script = (TEMPLATES / "filter.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return TEMPLATE_ENV.get_template("report.html.j2").render(
        **context, script=Markup(script), script_hash=f"sha256-{digest}")


def render_markdown(context: dict) -> str:
    """The summary at the most detailed level that fits MD_MAX_BYTES (cut hard as a last resort)."""
    template = TEMPLATE_ENV.get_template("report.md.j2")
    for text_limit, max_warnings, per_side in MD_LEVELS:
        text = template.render(**context, text_limit=text_limit, max_warnings=max_warnings,
                               per_side=per_side)
        if len(text.encode("utf-8")) < MD_MAX_BYTES:
            return text
    note = "\n\n_Summary cut to fit; see report.html._\n"
    budget = MD_MAX_BYTES - len(note.encode("utf-8")) - 4
    cut = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    return cut[: cut.rfind("\n")] + note
