"""Long prompts never crash: a title whose prompt leaves too little room within train.max_length is cut
(title tokens only, the frame whole) or, with `train.long_prompts: skip`, left out of training; held-out
scoring, `generate` and `serve` handle the same titles. Both tiny architectures."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest

from harness import fingerprint, models
from harness.cli import main
from harness.data.prompts import build_prompt, encode_prompt, fit_prompts, max_prompt_tokens
from harness.data.prepared import Example, read_prepared
from harness.errors import SpecError
from harness.models import base_files
from harness.spec import load_spec
from tests.conftest import DEMO_DATA, REPO, run_tiny

CUSTOM = "Product: {title}\n{instruction}\nAnswer:"
MARK = "TITLEMARK"


def demo_titles() -> list[str]:
    return [json.loads(line)["title"] for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()]


# Words of the shipped demo set (the tiny tokenizers know them): one title far longer than any prompt room.
LONG_TITLE = " ".join(dict.fromkeys(demo_titles()[:12]))


def spec_and_tokenizer(model_dir: Path, template: str | None, *extra: str):
    overrides = [f"model.base={model_dir}", *([f"prompt.template={template}"] if template else []), *extra]
    spec = load_spec(str(REPO / "tasks" / "amazon_desc.yaml"), overrides)
    return spec, models.load_tokenizer(str(model_dir), spec.model, uses_chat_template=template is None)


def arch_template(extra: list[str]) -> str | None:
    """The prompt.template a tiny_arch's overrides set (None: the chat template)."""
    return next((o.split("=", 1)[1] for o in extra if o.startswith("prompt.template=")), None)


def frame_tokens(tokenizer, spec) -> int:
    return len(encode_prompt(tokenizer, build_prompt(tokenizer, spec.prompt, "")))


def length_for_room(frame: int, title_tokens: int) -> int:
    """The smallest train.max_length whose prompts hold the frame and `title_tokens` title tokens."""
    length = frame
    while max_prompt_tokens(length) < frame + title_tokens:
        length += 1
    return length


def templates_of(model_dir: Path, tiny_model_dir: Path) -> list[str | None]:
    """Every prompt format the model can take: its chat template (the tiny Llama), presets, a format string."""
    return ([None] if model_dir == tiny_model_dir else []) + ["alpaca", "llama2_inst", CUSTOM]


def test_cut_keeps_the_frame_and_fits_exactly(tiny_arch, tiny_model_dir):
    model_dir, _ = tiny_arch
    for template in templates_of(model_dir, tiny_model_dir):
        spec, tok = spec_and_tokenizer(model_dir, template)
        max_length = length_for_room(frame_tokens(tok, spec), 5)
        limit = max_prompt_tokens(max_length)
        long, short = fit_prompts(tok, spec.prompt, [LONG_TITLE, "Mug"], max_length)
        assert (short.text, short.truncated) == (build_prompt(tok, spec.prompt, "Mug"), False)
        assert long.truncated and long.full_tokens > limit
        assert long.ids == encode_prompt(tok, long.text) and len(long.ids) <= limit, template
        prefix, suffix = build_prompt(tok, spec.prompt, MARK).split(MARK)
        assert long.text.startswith(prefix) and long.text.endswith(suffix), template  # the frame is whole
        kept = long.text[len(prefix):len(long.text) - len(suffix)]
        assert kept and LONG_TITLE.startswith(kept), template
        # Exactly: the title's next token would not fit.
        ends = [end for _, end in tok(LONG_TITLE, add_special_tokens=False, return_offsets_mapping=True)
                ["offset_mapping"] if end > len(kept)]
        longer = encode_prompt(tok, build_prompt(tok, spec.prompt, LONG_TITLE[:ends[0]]))
        assert len(longer) > limit, template
        # Token by token too: the frame's tokens before the title (BOS where the format has one) and after it
        # (markers, end-of-turn and assistant tokens) are all there; only the edge tokens may merge with the title.
        head, tail = encode_prompt(tok, prefix)[:-1], encode_prompt(tok, suffix)[1:]
        assert long.ids[:len(head)] == head and long.ids[len(long.ids) - len(tail):] == tail, template


def test_a_frame_that_leaves_no_room_is_a_spec_error(tiny_arch):
    model_dir, extra = tiny_arch
    spec, tok = spec_and_tokenizer(model_dir, "alpaca")
    frame = frame_tokens(tok, spec)
    with pytest.raises(SpecError, match=rf"train.max_length {frame}: the prompt without a title is already "
                                        rf"{frame} tokens .* at least {length_for_room(frame, 1)}"):
        fit_prompts(tok, spec.prompt, ["Mug"], frame)


def test_skip_drops_and_truncate_keeps_every_example(tiny_arch):
    from harness.training.tokenization import tokenize_counting

    model_dir, extra = tiny_arch
    spec, tok = spec_and_tokenizer(model_dir, arch_template(extra))
    max_length = length_for_room(frame_tokens(tok, spec), 5)
    titles = demo_titles()[:20] + [LONG_TITLE]
    examples = [Example(str(i), t, "A sturdy thing that does its job well.", "demo") for i, t in enumerate(titles)]
    long = sum(f.truncated for f in fit_prompts(tok, spec.prompt, titles, max_length))
    assert 0 < long < len(titles)
    spec.train.max_length = max_length
    cut, counts = tokenize_counting(spec, tok, examples)
    assert len(cut) == len(titles) and counts == {"truncated": long, "skipped": 0}
    assert cut.column_names == ["input_ids", "labels"]
    assert all(len(ids) <= max_length and any(t != -100 for t in labels)
               for ids, labels in zip(cut["input_ids"], cut["labels"]))
    spec.train.long_prompts = "skip"
    skipped, counts = tokenize_counting(spec, tok, examples)
    assert len(skipped) == len(titles) - long and counts == {"truncated": 0, "skipped": long}
    assert all(len(ids) <= max_length for ids in skipped["input_ids"])
    nothing, counts = tokenize_counting(spec, tok, examples[-1:])  # every example too long
    assert len(nothing) == 0 and counts == {"truncated": 0, "skipped": 1}


def test_skip_that_leaves_nothing_to_train_on_stops_in_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from tests.conftest import tiny_overrides

    spec, tok = spec_and_tokenizer(tiny_model_dir, None)
    max_length = length_for_room(frame_tokens(tok, spec), 1)  # every demo title is longer than one token
    monkeypatch.chdir(tmp_path)
    sets = [arg for o in tiny_overrides(tiny_model_dir, f"train.max_length={max_length}", "train.long_prompts=skip")
            for arg in ("--set", o)]
    assert main(["run", str(REPO / "tasks" / "amazon_desc.yaml"), "--runs-dir", str(tmp_path / "runs"), *sets]) == 2
    assert "train.long_prompts: skip drops every training example" in capsys.readouterr().err


def test_fingerprint_changes_only_when_a_prompt_is_cut(tiny_model_dir):
    spec, _ = spec_and_tokenizer(tiny_model_dir, None)
    record = {"rouge_stemmer": True}
    before = fingerprint.hash_json(asdict(spec.prompt))  # the prompt fingerprint before titles could be cut
    assert fingerprint.settings_fingerprints(spec, record)["prompt"] == before
    assert fingerprint.settings_fingerprints(spec, record, ["a cut prompt"])["prompt"] != before


def small_length_run(tmp_path: Path, model_dir: Path, extra: list[str], monkeypatch, *more: str) -> tuple[Path, int]:
    """A full tiny run at a train.max_length that cuts some titles and not others."""
    spec, tok = spec_and_tokenizer(model_dir, arch_template(extra))
    max_length = length_for_room(frame_tokens(tok, spec), 5)
    monkeypatch.chdir(tmp_path)
    return run_tiny(tmp_path, model_dir, *extra, f"train.max_length={max_length}", *more), max_length


def test_a_run_with_a_small_max_length_completes_and_counts(tiny_arch, tmp_path, monkeypatch):
    model_dir, extra = tiny_arch
    run_dir, max_length = small_length_run(tmp_path, model_dir, extra, monkeypatch)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    record = manifest["long_prompts"]
    prepared = read_prepared(run_dir / "data")
    spec, tok = spec_and_tokenizer(model_dir, arch_template(extra))
    cut = {name: sum(f.truncated for f in fit_prompts(tok, spec.prompt, [e.title for e in examples], max_length))
           for name, examples in (("train", prepared.train), ("heldout", prepared.heldout))}
    assert record == {"policy": "truncate", "max_length": max_length, "max_prompt_tokens": max_prompt_tokens(max_length),
                      "train": {"truncated": cut["train"], "skipped": 0}, "heldout": {"truncated": cut["heldout"]}}
    assert cut["train"] > 0
    # Base and tuned scored on every held-out row; the cut prompts are part of the prompt fingerprint.
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [e.id for e in prepared.heldout]
    if cut["heldout"]:
        assert manifest["fingerprints"]["prompt"] != fingerprint.hash_json(asdict(spec.prompt))
    assert "long prompts: " in (run_dir / "report.md").read_text()
    assert "Long prompts" in (run_dir / "report.html").read_text()


def test_skip_in_a_run_counts_what_it_left_out(tiny_model_dir, tmp_path, monkeypatch):
    run_dir, _ = small_length_run(tmp_path, tiny_model_dir, [], monkeypatch, "train.long_prompts=skip")
    record = json.loads((run_dir / "manifest.json").read_text())["long_prompts"]
    assert record["policy"] == "skip" and record["train"]["truncated"] == 0 and record["train"]["skipped"] > 0


def test_the_demo_task_fits_whole(tiny_run):
    """The shipped demo's titles fit: nothing is cut, the prompt fingerprint is the one from before."""
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["long_prompts"]["heldout"] == {"truncated": 0}
    assert manifest["long_prompts"]["train"] == {"truncated": 0, "skipped": 0}
    spec = load_spec(str(tiny_run / "spec.yaml"))
    assert manifest["fingerprints"]["prompt"] == fingerprint.hash_json(asdict(spec.prompt))


@pytest.fixture(scope="module")
def cutting_run(tiny_arch, tmp_path_factory):
    """A finished tiny run whose train.max_length cuts long titles, with a loaded model."""
    from harness.serving.loaded_run import LoadedRun

    model_dir, extra = tiny_arch
    tmp = tmp_path_factory.mktemp("cutting")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_DEVICE", "cpu")
        mp.setenv("HARNESS_SCORE_CACHE", str(tmp / "score-cache"))
        run_dir, max_length = small_length_run(tmp, model_dir, extra, mp)
        return run_dir, LoadedRun.load(run_dir)


def test_generate_cuts_and_says_so(cutting_run, tmp_path, capsys, caplog):
    run_dir, loaded = cutting_run
    titles = tmp_path / "titles.txt"
    titles.write_text(f"Mug\n{LONG_TITLE}\n", encoding="utf-8")
    assert main(["generate", str(run_dir), "--input", str(titles)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["line"], r["title_truncated"]) for r in records] == [(1, False), (2, True)]
    assert records[1]["title"] == LONG_TITLE and records[1]["description"] == loaded.describe(LONG_TITLE).text
    with caplog.at_level(logging.WARNING):
        assert main(["generate", str(run_dir), "--title", LONG_TITLE]) == 0
    assert "the title was cut to fit" in caplog.text


def test_serve_refuses_a_title_too_long_with_422(cutting_run):
    from fastapi.testclient import TestClient

    from harness.serving.serve import create_app

    _, loaded = cutting_run
    limit = max_prompt_tokens(loaded.spec.train.max_length)
    with TestClient(create_app(loaded, window_ms=0, max_batch=4)) as client:
        response = client.post("/generate", json={"title": LONG_TITLE})
        assert response.status_code == 422
        assert f"trained on prompts of at most {limit}" in response.json()["detail"]
        assert client.post("/generate", json={"title": "Mug", "max_new_tokens": 3}).status_code == 200


def test_the_cli_run_at_the_smallest_length_exits_0(tiny_model_dir, tmp_path, monkeypatch):
    """The issue's reproduction (`run amazon_desc --set train.max_length=48`: SmolLM2's frame is 41 tokens)
    on the tiny Llama: room for one title token; every title is cut, the run completes with exit 0."""
    from tests.conftest import tiny_overrides

    spec, tok = spec_and_tokenizer(tiny_model_dir, None)
    max_length = length_for_room(frame_tokens(tok, spec), 1)
    monkeypatch.chdir(tmp_path)
    sets = [arg for o in tiny_overrides(tiny_model_dir, f"train.max_length={max_length}") for arg in ("--set", o)]
    assert main(["run", str(REPO / "tasks" / "amazon_desc.yaml"), "--runs-dir", str(tmp_path / "runs"), *sets]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "manifest.json").read_text())["long_prompts"]
    prepared = read_prepared(run_dir / "data")
    assert record["train"]["truncated"] == len(prepared.train) and record["heldout"]["truncated"] == len(prepared.heldout)


@pytest.mark.real_model
@pytest.mark.parametrize("template, max_length", [(None, 48), ("alpaca", 64), ("llama2_inst", 32)])
def test_the_real_tokenizer_cuts_to_fit(template, max_length):
    """SmolLM2's byte-level BPE: a title with accents and CJK characters (written for this test) is cut on a
    character boundary, its prompt within the limit, the frame whole."""
    from harness.spec import EMBEDDED_MODEL

    spec, tok = spec_and_tokenizer(Path(base_files.resolve_base(EMBEDDED_MODEL)), template)
    title = "Größe XL Über-Jacke für Wanderer, wasserdicht – 日本製の素材, leicht und atmungsaktiv, Farbe Tannengrün"
    (fitted,) = fit_prompts(tok, spec.prompt, [title], max_length)
    prefix, suffix = build_prompt(tok, spec.prompt, MARK).split(MARK)
    kept = fitted.text[len(prefix):len(fitted.text) - len(suffix)]
    assert fitted.truncated and len(fitted.ids) <= max_prompt_tokens(max_length)
    assert fitted.text.startswith(prefix) and fitted.text.endswith(suffix) and title.startswith(kept)
    assert fitted.ids == encode_prompt(tok, fitted.text)
