"""Reports must show a run's numbers faithfully, mark significance honestly, stay small
(Markdown) and self-contained (HTML), and render whatever the model wrote as text."""

import base64
import html
import json
import re
from html.parser import HTMLParser

import pytest

from fixtures_runs import make_run
from harness.errors import RunError
from harness.reporting import report
from harness.reporting.content import significance
from harness.reporting.report import MD_MAX_BYTES, write_reports
from harness.scoring.metrics import DEGENERATION, METRICS, SIMILARITY

SECTIONS = ("Summary", "Headline metrics", "Degenerate output", "Plots", "Examples", "Guards", "Configuration",
            "Fingerprints", "Environment")
HEADLINE = [m for m in METRICS if m not in DEGENERATION]
SCRIPT, IMG, LINK, PIPE = ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
                           "](javascript:alert(1))", "| col |")


def _headline_cells(md: str) -> dict[str, list[str]]:
    """Metric -> cells of the Markdown headline table (the first rows that start with a metric; the
    constant-answer table below it repeats the similarity metrics)."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        name = cells[0].split(" ")[0]
        if line.startswith("| ") and name in METRICS and name not in rows:
            rows[name] = cells[1:]
    return rows


def _html_row(html: str, metric: str) -> str:
    return re.search(rf'<tr data-metric="{metric}">(.*?)</tr>', html, re.S).group(1)


class _Tags(HTMLParser):
    """Every start tag with its attributes, as a browser would tokenize the page."""

    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


def test_single_run_renders_self_contained_html_and_markdown(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "reports" / "nested"
    html_path, md_path = write_reports([run], out)
    html = html_path.read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]  # no temp files
    for section in SECTIONS:
        assert f">{section}</h2>" in html
    plots = [attrs["src"] for tag, attrs in _tags(html) if tag == "img"]
    assert len(plots) == 4
    for src in plots:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing is fetched: no external src/href, no CSS import or url(), and a CSP saying so.
    for tag, attrs in _tags(html):
        for key in ("src", "href"):
            assert not re.match(r"\s*(https?:|//|file:)", attrs.get(key) or "", re.I), (tag, attrs)
    assert "@import" not in html and "url(" not in html
    assert "default-src 'none'" in html and "@media print" in html
    assert "# Evaluation report: demo" in md_path.read_text(encoding="utf-8")


def test_three_runs_are_compared_side_by_side_against_one_base(tmp_path):
    runs = [make_run(tmp_path, f"adapter-{k}", seed=k) for k in (1, 2, 3)]
    html_path, md_path = write_reports(runs, tmp_path / "out")
    html, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    for k in (1, 2, 3):
        assert f'<th class="group" colspan="3">adapter-{k}</th>' in html
        assert f"adapter-{k}: tuned | adapter-{k}: Δ (95% CI)" in md
    assert html.count('<th rowspan="2" class="num">Base</th>') == 1  # one shared base column
    assert "lora.r" in html  # the spec setting that differs between adapters
    assert "not be comparable" not in html and "not be comparable" not in md


def test_runs_with_different_bases_get_a_warning_banner(tmp_path):
    first = make_run(tmp_path, "a")
    shifted = make_run(tmp_path, "b", base_shift=1.0)
    fewer = make_run(tmp_path, "c", n=20)
    html_path, md_path = write_reports([first, shifted, fewer], tmp_path / "out")
    for text in (html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")):
        assert "not be comparable" in text
        assert "b: base metrics differ from a" in text
        assert "c: held-out ids differ from a (0 only here, 4 missing)" in text


def test_markdown_numbers_equal_metrics_json(tmp_path):
    run = make_run(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    _, md_path = write_reports([run], tmp_path / "out")
    rows = _headline_cells(md_path.read_text(encoding="utf-8"))
    assert list(rows) == HEADLINE
    for name, (base, tuned, delta, wtl) in rows.items():
        for cell, block in ((base, metrics["base"][name]), (tuned, metrics["tuned"][name])):
            assert cell == f"{block['value']:.2f} [{block['ci95'][0]:.2f}, {block['ci95'][1]:.2f}]"
        d = metrics["delta"][name]
        assert delta.replace("**", "").startswith(f"{d['value']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]")
        counts = metrics["win_tie_loss"][name]
        assert wtl == f"{counts['win']} / {counts['tie']} / {counts['loss']}"


@pytest.mark.parametrize(("ci", "higher", "expected"), [
    ([1.0, 5.0], True, "better"), ([-3.0, -1.0], True, "worse"), ([-1.5, -0.5], False, "better"),
    ([0.5, 2.0], False, "worse"), ([-0.2, 1.2], True, None), ([0.0, 2.0], True, None),
])
def test_significance_needs_a_ci_that_excludes_zero(ci, higher, expected):
    assert significance(ci, higher) == expected


def test_significance_is_marked_in_both_formats(tmp_path):
    deltas = {"rougeL": (3.0, 1.0, 5.0), "bleu": (0.5, -0.2, 1.2), "chrf": (-2.0, -3.0, -1.0),
              "perplexity": (-1.0, -1.5, -0.5), "rouge2": (1.0, 0.0, 2.0)}
    expected = {"rougeL": "better", "bleu": None, "chrf": "worse", "perplexity": "better", "rouge2": None}
    html_path, md_path = write_reports([make_run(tmp_path, deltas=deltas)], tmp_path / "out")
    html = html_path.read_text(encoding="utf-8")
    rows = _headline_cells(md_path.read_text(encoding="utf-8"))
    for name, sig in expected.items():
        delta_class = re.search(r'<td class="num delta ([a-z ]+)">', _html_row(html, name)).group(1)
        md_delta = rows[name][2]
        if sig:
            assert delta_class == f"sig {sig}"
            assert md_delta.startswith("**") and md_delta.endswith(f"sig. {sig}")
        else:
            assert delta_class == "ns"
            assert not md_delta.startswith("**") and md_delta.endswith("n.s.")


def test_markdown_stays_under_60_kb_for_2000_long_examples(tmp_path):
    run = make_run(tmp_path, n=2000, words=250, title_words=60)
    _, md_path = write_reports([run], tmp_path / "out")
    md = md_path.read_text(encoding="utf-8")
    assert len(md.encode("utf-8")) < MD_MAX_BYTES
    examples = [line for line in md.splitlines() if line.startswith("   - ")]
    assert len(examples) == 3 * 2 * 3  # 3 best + 3 worst, each with reference, base, tuned
    assert all(len(line) < 320 and line.endswith("…") for line in examples)


def test_markdown_falls_back_to_less_detail_rather_than_growing(tmp_path):
    warnings = tuple(f"warning {i}: " + "the tuned model said something long " * 20 for i in range(200))
    runs = [make_run(tmp_path, f"adapter-{k}", n=6, seed=k, words=300, warnings=warnings) for k in range(5)]
    _, md_path = write_reports(runs, tmp_path / "out")
    md = md_path.read_text(encoding="utf-8")
    assert len(md.encode("utf-8")) < MD_MAX_BYTES
    assert list(_headline_cells(md)) == HEADLINE
    assert all(len(line) < 200 for line in md.splitlines() if line.startswith("   - "))  # shorter texts


def test_markdown_is_cut_as_a_last_resort(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MD_MAX_BYTES", 1500)
    _, md_path = write_reports([make_run(tmp_path)], tmp_path / "out")
    md = md_path.read_text(encoding="utf-8")
    assert len(md.encode("utf-8")) < 1500 and md.endswith("see report.html._\n")


def test_injected_markup_renders_as_text(tmp_path):
    hostile = f"# heading {SCRIPT} *bold* _it_ `code` [x]({LINK[2:]} &amp; ~~s~~\nsecond line"
    texts = [
        {"title": f"{SCRIPT} {PIPE}", "reference": IMG, "base": LINK, "tuned": hostile,
         "scores": {"base": {"rougeL": 0.0}, "tuned": {"rougeL": 100.0}}},  # most improved
        {"title": f"{IMG}{LINK}", "reference": PIPE, "base": hostile, "tuned": SCRIPT,
         "scores": {"base": {"rougeL": 100.0}, "tuned": {"rougeL": 0.0}}},  # most regressed
    ]
    run = make_run(tmp_path, texts=texts, warnings=(f"{SCRIPT} {IMG} {PIPE}",))
    html_path, md_path = write_reports([run], tmp_path / "out")
    html, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")

    assert "<script>alert" not in html and html.count("<script") == 1  # only our filter
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    for tag, attrs in _tags(html):
        assert not any(key.startswith("on") for key in attrs), (tag, attrs)
        assert not any("javascript:" in (value or "") for value in attrs.values()), (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")

    assert "<script" not in md and "<img" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert not re.search(r"(?<!\\)\]\(", md)  # no link syntax survives
    assert r"\| col \|" in md and r"\# heading" in md and r"\`code\`" in md
    assert r"\*bold\*" in md and r"\_it\_" in md and "second line" in md
    example_lines = [line for line in md.splitlines() if line.startswith(("   - ", "1. ", "- "))]
    assert example_lines and not any(re.search(r"(?<!\\)\|", line) for line in example_lines)

    # A CommonMark renderer that lets raw HTML through must still produce only text.
    markdown_it = pytest.importorskip("markdown_it")
    rendered = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    assert "<script" not in rendered and "<img" not in rendered and "<a " not in rendered
    # headline, constant-answer (similarity metrics), degenerate-output (base, tuned, delta) and guards
    # tables, cells intact
    assert rendered.count("<tr>") == 1 + len(HEADLINE) + 1 + len(SIMILARITY) + 1 + 3 + 1 + 6


def test_rouge_gain_with_a_length_shift_is_flagged_once(tmp_path):
    shifted = {"base": {"length_ratio": 0.9}, "tuned": {"length_ratio": 1.6}}
    losses = {m: (-1.0, -2.0, -0.5) for m in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    runs = [make_run(tmp_path, "gain", guards=shifted),
            make_run(tmp_path, "warned", guards=shifted, warnings=("length ratio moved from 0.90 to 1.60",)),
            make_run(tmp_path, "loss", guards=shifted, deltas=losses)]
    html_path, md_path = write_reports(runs, tmp_path / "out")
    flag = ("gains in rouge1, rouge2, rougeL, rougeLsum, bleu, chrf come with outputs moving away from the "
            "reference length: length ratio 0.90 → 1.60")
    md = md_path.read_text(encoding="utf-8")
    assert html.unescape(html_path.read_text(encoding="utf-8")).count(flag) == 1 and md.count(flag) == 1
    assert f"- gain: {flag}" in md


def test_optional_inputs_may_be_absent(tmp_path):
    html_path, _ = write_reports([make_run(tmp_path, train_log=False, optional=False)], tmp_path / "out")
    html = html_path.read_text(encoding="utf-8")
    assert "No training log for: run-a." in html
    assert "No fingerprints recorded." in html and "not recorded" in html  # fingerprints, base cache


def test_missing_run_folder_is_a_one_line_error_naming_it(tmp_path):
    missing = tmp_path / "runs" / "nope"
    with pytest.raises(RunError) as error:
        write_reports([missing], tmp_path / "out")
    assert str(missing) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["manifest.json", "spec.yaml", "metrics.json", "predictions.jsonl"])
def test_missing_run_file_is_named_and_nothing_is_written(tmp_path, name):
    good, bad = make_run(tmp_path, "good"), make_run(tmp_path, "bad")
    (bad / name).unlink()
    with pytest.raises(RunError, match=re.escape(str(bad / name))):
        write_reports([good, bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malformed_run_files_are_named_with_the_problem(tmp_path):
    run = make_run(tmp_path)
    with open(run / "predictions.jsonl", "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    with pytest.raises(RunError, match=re.escape(f"{run / 'predictions.jsonl'}:25: invalid JSON")):
        write_reports([run], tmp_path / "out")
    run = make_run(tmp_path, "b")
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["delta"]["rougeL"]["ci95"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RunError, match=re.escape(f"{run / 'metrics.json'}: delta.rougeL needs")):
        write_reports([run], tmp_path / "out")


def _section(html: str, section: str) -> str:
    return re.search(rf'<section id="{section}">(.*?)</section>', html, re.S).group(1)


def test_degenerate_output_section_shows_cis_and_an_escaped_looping_output(tmp_path):
    looping = f"{SCRIPT} It is very easy to use. " * 5
    texts = [{"base": "A plain base output.", "base_loops": False, "base_rep4": 0.0},
             {"tuned": looping, "tuned_loops": True, "tuned_rep4": 0.99, "tuned_truncated": True}]
    run = make_run(tmp_path, texts=texts)
    metrics = json.loads((run / "metrics.json").read_text())
    html_path, md_path = write_reports([run], tmp_path / "out")
    html, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")

    section = _section(html, "degeneration")
    md_part = md[md.index("## Degenerate output"):md.index("## Guards")]
    for name in DEGENERATION:
        for side in ("base", "tuned"):
            block = metrics[side][name]
            value, ci = f"{block['value']:.3f}", f"[{block['ci95'][0]:.3f}, {block['ci95'][1]:.3f}]"
            assert f'{value}<br><span class="ci">{ci}</span>' in section and f"{value} {ci}" in md_part
        d = metrics["delta"][name]
        assert f"{d['value']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" in md_part.replace("**", "")
    assert "sig. better" in md_part  # fixture: tuned loops significantly less
    assert "| Δ tuned − base |" in md_part and "Welleck" in md_part and "Li et al. 2016" in md_part

    # The most repetitive looping output is shown, as text: escaped in both formats.
    assert "<script>alert" not in html and "<script" not in md
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt; It is very easy to use."
    assert escaped in section and escaped in md_part
    assert "id ex-0001" in section and "rep-4 0.990" in md_part and "_(truncated)_" in md_part
    tuned_loops = sum(json.loads(line).get("tuned_loops") is True
                      for line in (run / "predictions.jsonl").read_text().splitlines())
    assert f"({tuned_loops} of 24 outputs loop)" in md_part
    assert 'value="flag:loops"' in html and 'data-flags="loops' in html


def test_degenerate_output_for_several_runs_and_for_runs_without_it(tmp_path):
    runs = [make_run(tmp_path, f"adapter-{k}", seed=k) for k in (1, 2)]
    html_path, md_path = write_reports(runs, tmp_path / "out")
    md = md_path.read_text(encoding="utf-8")
    part = md[md.index("## Degenerate output"):md.index("## Guards")]
    assert [line.split(" | ")[0] for line in part.splitlines() if line.startswith("| ") and "---" not in line] == [
        "| Model", "| Base", "| adapter-1", "| Δ adapter-1 − base", "| adapter-2", "| Δ adapter-2 − base"]
    assert part.count("outputs loop); the most repetitive") == 3  # base once, then each adapter
    assert _section(html_path.read_text(encoding="utf-8"), "degeneration").count('<tr data-kind="delta">') == 2

    old = make_run(tmp_path, "old")  # a run from before these metrics: no numbers, no flags
    metrics = json.loads((old / "metrics.json").read_text())
    for block in ("base", "tuned", "delta", "win_tie_loss", "higher_is_better"):
        for name in DEGENERATION:
            del metrics[block][name]
    (old / "metrics.json").write_text(json.dumps(metrics))
    rows = [json.loads(line) for line in (old / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ("base_loops", "tuned_loops", "base_rep4", "tuned_rep4"):
            del row[key]
    (old / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    html_path, md_path = write_reports([old], tmp_path / "old-out")
    for text in (html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")):
        assert "Not measured: metrics.names lists none of rep4, loops, distinct2." in text
        assert "looping not recorded in predictions.jsonl" in text
