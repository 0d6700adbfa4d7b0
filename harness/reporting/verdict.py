"""The gate's verdict for people (Markdown: a PR comment, a job summary) and for CI (JUnit XML).

Renders the verdict.json record that `harness check` (harness/recipes/check.py) fills.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET


def render_markdown(record: dict) -> str:
    """The verdict for people: a PR comment, a job summary."""
    icon = {"pass": "✅ PASS", "regression": "❌ REGRESSION", "cannot_judge": "⚠️ CANNOT JUDGE"}[record["verdict"]]
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    scope = f" on n={record['n']} held-out examples (of {record.get('heldout_size')})" if record["n"] else ""
    lines = [f"## Adapter gate: {icon} ({record['task']})", "",
             f"Candidate `{record['candidate']}` vs baseline `{record['baseline']}`{scope}.",
             "", f"**{cell(record['reason'])}** (exit {record['exit_code']})", ""]
    if record["rules"]:
        lines += ["| rule | result | score | reason |", "|---|---|---|---|"]
        lines += [f"| {cell(r['name'])} | {'pass' if r['passed'] else '**FAIL**'} | {r['score']:.4g} "
                  f"| {cell(r['reason'])} |" for r in record["rules"]]
        lines.append("")
    if record["warnings"]:
        lines += ["**Warnings**", ""] + [f"- {cell(w)}" for w in record["warnings"]]
    return "\n".join(lines).rstrip() + "\n"


def render_junit(record: dict) -> str:
    """One testcase per rule; a cannot-judge verdict is one errored testcase. ElementTree escapes."""
    rules = record["rules"]
    suite = ET.Element("testsuite", name=f"harness-gate.{record['task']}", tests=str(max(1, len(rules))),
                       failures=str(sum(not r["passed"] for r in rules)),
                       errors=str(int(record["verdict"] == "cannot_judge")))
    for r in rules:
        case = ET.SubElement(suite, "testcase", classname=f"gate.{record['task']}", name=r["name"])
        if not r["passed"]:
            ET.SubElement(case, "failure", message=r["reason"]).text = r["reason"]
    if record["verdict"] == "cannot_judge":
        case = ET.SubElement(suite, "testcase", classname=f"gate.{record['task']}", name="judge")
        ET.SubElement(case, "error", message=record["reason"]).text = record["reason"]
    if record["warnings"]:
        ET.SubElement(suite, "system-out").text = "\n".join(record["warnings"])
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
