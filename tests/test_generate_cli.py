"""`harness generate` on the tiny run: one title, a prompt, and files or piped titles through the
batched generator (JSON Lines out, bad lines named, interrupted jobs resumable)."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from harness.cli import main
from harness.serving import generate_cli
from harness.serving.loaded_run import LoadedRun
from tests.fixtures_loaded import loaded  # noqa: F401  (a fixture)

TITLES = ["Garlic Press", "Kids' Rain Boots , Dinosaur Print", "Aquarium Starter Kit", "Mug"]
MORE_TITLES = ["Desk Lamp", "Travel Mug , Steel", "Cotton Throw Blanket", "Ceramic Planter", "Yoga Mat",
               "Chef Knife"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def piped(text: str) -> io.TextIOWrapper:
    """A non-terminal stdin holding `text`."""
    return io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8")


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def named_lines(err: str, source) -> list[str]:
    """The stderr lines naming a line of `source` (transformers prints its loading bar there too)."""
    return [line for line in err.splitlines() if line.startswith(str(source))]


@pytest.fixture
def generate_calls(monkeypatch) -> list[tuple[int, bool]]:
    """(prompts, use_adapter) of every LoadedRun.generate call made while the test runs."""
    calls = []
    original = LoadedRun.generate

    def spy(self, prompts, gen, use_adapter=True, **kwargs):
        calls.append((len(prompts), use_adapter))
        return original(self, prompts, gen, use_adapter, **kwargs)

    monkeypatch.setattr(LoadedRun, "generate", spy)
    return calls


def expected(loaded, line: int, title: str, max_new_tokens: int | None = None, compare: bool = False) -> dict:  # noqa: F811
    """The record for `title`, from generating it alone (greedy, fp32: batching changes nothing)."""
    tuned = loaded.describe(title, max_new_tokens=max_new_tokens)
    record = {"line": line, "title": title, "description": tuned.text, "tokens": tuned.n_tokens,
              "truncated": tuned.hit_max_new_tokens, "title_truncated": False}
    if compare:
        base = loaded.describe(title, max_new_tokens=max_new_tokens, use_adapter=False)
        record.update(base_description=base.text, base_tokens=base.n_tokens, base_truncated=base.hit_max_new_tokens)
    return record


# -- one title, or a prompt -----------------------------------------------------------------------

def test_generate_title_prints_the_loaded_run_description(tiny_run, loaded, capsys):  # noqa: F811
    assert main(["generate", str(tiny_run), "--title", TITLES[0]]) == 0
    out = capsys.readouterr().out
    assert out.strip()
    assert out == loaded.describe(TITLES[0]).text + "\n"


def test_generate_on_a_terminal_prompts_and_streams(tiny_run, loaded, monkeypatch):  # noqa: F811
    """Typed titles at `title> ` until an empty line; tokens streamed to the terminal."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdin", _Terminal(f"{TITLES[3]}\n\n{TITLES[0]}\n"))
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["generate", str(tiny_run), "--max-new-tokens", "3"]) == 0
    prompts = terminal.getvalue().split("title> ")
    assert len(prompts) == 3 and prompts[0] == "" and prompts[2] == ""  # stopped at the empty line
    assert " ".join(prompts[1].split()) == loaded.describe(TITLES[3], max_new_tokens=3).text


def test_generate_compare_labels_tuned_and_base(tiny_run, loaded, capsys):  # noqa: F811
    assert main(["generate", str(tiny_run), "--title", TITLES[2], "--compare"]) == 0
    tuned, base = capsys.readouterr().out.splitlines()
    assert tuned.startswith("tuned:") and base.startswith("base:")
    assert tuned.split(":", 1)[1].strip() == loaded.describe(TITLES[2]).text
    assert base.split(":", 1)[1].strip() == loaded.describe(TITLES[2], use_adapter=False).text


def test_a_run_scored_with_mbr_generates_with_mbr_and_prints_the_choice_on_a_terminal(tiny_run, tmp_path,
                                                                                      monkeypatch):
    """The run's MBR decoding (its temperature and top_p) is what `generate` and `serve` use at temperature 0;
    on a terminal the chosen text is printed once all candidates are done, not streamed."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    spec = yaml.safe_load((run / "spec.yaml").read_text(encoding="utf-8"))
    spec["generation"].update(mbr_samples=4, batch_size=4, temperature=1.5, top_p=0.9)
    (run / "spec.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    mbr_run = LoadedRun.load(run)
    settings = mbr_run.settings()
    assert (settings.mbr_samples, settings.do_sample, settings.temperature, settings.top_p) == (4, False, 1.5, 0.9)
    assert mbr_run.settings(temperature=0.7, top_p=0.5).top_p == 0.5
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["generate", str(run), "--title", TITLES[1]]) == 0
    assert terminal.getvalue() == mbr_run.describe(TITLES[1]).text + "\n"


def test_generate_refuses_missing_or_unfinished_runs_and_bad_options(tiny_run, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--title", "x"]) == 2
    assert main(["generate", str(tmp_path), "--title", "x"]) == 2  # a folder without spec.yaml
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(tiny_run / "spec.yaml", unfinished / "spec.yaml")
    assert main(["generate", str(unfinished), "--title", "x"]) == 2
    assert main(["generate", str(tiny_run), "--title", "x", "--temperature", "-1"]) == 2
    assert main(["generate", str(tiny_run), "--title", "   "]) == 2
    assert main(["generate", str(tiny_run), "--title", "x" * 501]) == 2
    errors = capsys.readouterr().err.splitlines()
    messages = [line for line in errors if line.startswith("harness: error:")]
    assert len(messages) == 6
    assert "no such run folder" in messages[0] and "spec.yaml" in messages[1] and "adapter" in messages[2]
    assert "temperature" in messages[3] and "empty" in messages[4] and "limit is 500" in messages[5]


# -- files and piped titles -----------------------------------------------------------------------

def test_piped_titles_go_through_one_batched_call_and_come_out_in_input_order(tiny_run, loaded, capsys,  # noqa: F811
                                                                             monkeypatch, generate_calls):
    monkeypatch.setattr(sys, "stdin", piped("\n".join(MORE_TITLES) + "\n"))
    assert main(["-q", "generate", str(tiny_run), "--max-new-tokens", "5"]) == 0
    calls = list(generate_calls)
    out = capsys.readouterr()
    assert calls == [(len(MORE_TITLES), True)]  # the batched generator, not a loop over titles
    assert records(out.out) == [expected(loaded, i, t, 5) for i, t in enumerate(MORE_TITLES, 1)]
    assert "description" not in out.err  # no progress bar when stderr is not a terminal


def test_txt_input_names_each_bad_line_and_describes_the_rest(tiny_run, loaded, tmp_path, capsys, caplog):  # noqa: F811
    lines = [TITLES[0], "", "x" * 501, "<br>", TITLES[1], "   ", TITLES[3]]
    source = tmp_path / "titles.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "descriptions.jsonl"
    assert main(["-q", "generate", str(tiny_run), "--input", str(source), "--output", str(out)]) == 1
    assert named_lines(capsys.readouterr().err, source) == [
        f"{source}:2: blank line", f"{source}:3: the title is 501 characters (the limit is 500)",
        f"{source}:4: the title is empty once cleaned", f"{source}:6: blank line"]
    assert f"4 line(s) of {source} not described (each named above)" in caplog.messages
    assert records(out.read_text(encoding="utf-8")) == [expected(loaded, n, lines[n - 1]) for n in (1, 5, 7)]


def test_jsonl_input_names_bad_lines_and_takes_the_title_field(tiny_run, loaded, tmp_path, capsys):  # noqa: F811
    rows = [json.dumps({"name": TITLES[2], "uid": "a"}), "{not json", json.dumps(["a list"]),
            json.dumps({"title": TITLES[0]}), json.dumps({"name": 7}), json.dumps({"name": None}),
            "   ", json.dumps({"name": TITLES[3]})]
    source = tmp_path / "titles.jsonl"
    source.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code = main(["-q", "generate", str(tiny_run), "--input", str(source), "--output", str(out),
                 "--title-field", "name", "--max-new-tokens", "4"])
    assert code == 1
    assert named_lines(capsys.readouterr().err, source) == [
        f"{source}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{source}:3: a JSON array, not an object with a 'name' field", f"{source}:4: no 'name' field",
        f"{source}:5: 'name' is a JSON number, not a string", f"{source}:6: 'name' is a JSON null, not a string",
        f"{source}:7: blank line"]
    assert records(out.read_text(encoding="utf-8")) == [expected(loaded, 1, TITLES[2], 4),
                                                        expected(loaded, 8, TITLES[3], 4)]


def test_a_clean_file_exits_0_and_compare_adds_the_base_description(tiny_run, loaded, tmp_path, capsys,  # noqa: F811
                                                                    generate_calls):
    source = tmp_path / "titles.jsonl"
    source.write_text("\ufeff" + "".join(json.dumps({"title": t}) + "\n" for t in TITLES), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(tiny_run), "--input", str(source), "--output", str(out), "--compare",
                 "--progress"]) == 0
    assert list(generate_calls) == [(4, True), (4, False)]
    assert records(out.read_text(encoding="utf-8")) == [expected(loaded, i, t, compare=True)
                                                        for i, t in enumerate(TITLES, 1)]
    err = capsys.readouterr().err
    assert "8/8" in err and "100%" in err  # the progress bar, asked for although stderr is no terminal


def test_an_interrupted_job_keeps_finished_lines_and_resume_does_only_the_rest(tiny_run, loaded, tmp_path,  # noqa: F811
                                                                               monkeypatch, caplog):
    titles = TITLES + MORE_TITLES
    source = tmp_path / "titles.txt"
    source.write_text("\n".join(titles) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(generate_cli, "CHUNK_TITLES", 4)  # three generate calls for ten titles
    original = LoadedRun.generate
    generated: list[int] = []

    def interrupted_after_five(self, prompts, gen, use_adapter=True, on_done=None, **kwargs):
        def done(i, result):
            on_done(i, result)
            generated.append(i)
            if len(generated) == 5:
                raise KeyboardInterrupt

        return original(self, prompts, gen, use_adapter, on_done=done, **kwargs)

    monkeypatch.setattr(LoadedRun, "generate", interrupted_after_five)
    command = ["generate", str(tiny_run), "--input", str(source), "--output", str(out)]
    assert main(command) == 130
    assert "interrupted: 5 descriptions are in" in caplog.text
    assert len(records(out.read_text(encoding="utf-8"))) == 5  # every finished line, each complete
    with out.open("a", encoding="utf-8") as fh:
        fh.write('{"line": 9, "title": "Yo')  # a write cut short by the interruption

    calls = []
    monkeypatch.setattr(LoadedRun, "generate", lambda self, prompts, *a, **k: calls.append(len(prompts)) or
                        original(self, prompts, *a, **k))
    assert main([*command, "--resume"]) == 0
    assert sum(calls) == len(titles) - 5  # finished lines are not generated again
    monkeypatch.setattr(LoadedRun, "generate", original)
    assert records(out.read_text(encoding="utf-8")) == [expected(loaded, i, t) for i, t in enumerate(titles, 1)]


@pytest.mark.parametrize("args, message", [
    (["--title", "x", "--input", "t.txt"], "give --title or --input, not both"),
    (["--title", "x", "--output", "o.jsonl"], "--output apply to --input FILE or titles piped on stdin"),
    (["--input", "t.txt", "--resume"], "--resume needs --output"),
    (["--input", "t.txt", "--title-field", "name"], "--title-field applies to .jsonl input"),
    (["--input", "t.json"], "not .json"),
    (["--input", "missing.txt"], "cannot read missing.txt: folder does not exist"),
    (["--input", "t.txt", "--output", "t.txt"], "t.txt exists; add --resume"),
    (["--input", "t.txt", "--output", "t.txt", "--resume"], "t.txt:1: not a line `harness generate` wrote"),
], ids=["title-and-input", "output-without-batch", "resume-without-output", "field-for-txt", "json",
        "missing-input", "output-exists", "resume-foreign-file"])
def test_batch_options_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("Mug\n", encoding="utf-8")
    (tmp_path / "t.json").write_text("[]", encoding="utf-8")
    assert main(["generate", str(tmp_path / "no-run"), *args]) == 2  # a missing run would fail later
    assert message in capsys.readouterr().err


def test_resume_refuses_an_output_written_from_another_input(tiny_run, tmp_path, capsys):
    source = tmp_path / "titles.txt"
    source.write_text("Mug\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"line": 1, "title": "Lamp", "description": "x"}) + "\n", encoding="utf-8")
    assert main(["generate", str(tiny_run), "--input", str(source), "--output", str(out), "--resume"]) == 2
    assert "has another title" in capsys.readouterr().err
    assert main(["generate", str(tiny_run), "--input", str(source), "--output", str(out), "--resume",
                 "--compare"]) == 2
    assert "written without --compare" in capsys.readouterr().err
