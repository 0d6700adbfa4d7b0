from pathlib import Path

import pytest

from harness.errors import SpecError
from harness.spec import TaskSpec, load_spec, spec_to_dict

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


def test_shipped_spec_loads_into_typed_dataclasses():
    spec = load_spec("amazon_desc", tasks_dir=REPO / "tasks")
    assert isinstance(spec, TaskSpec)
    assert spec.train.lr == pytest.approx(3e-4) and isinstance(spec.train.lr, float)
    assert spec.data_paths()[0].is_file()
    assert spec.model.base == "embedded:smollm2-135m-instruct"


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n  learning_rate: 1\n")
    with pytest.raises(SpecError, match=r"t.yaml: train.learning_rate: unknown key"):
        load_spec(str(path))
    path = write(tmp_path, "name: x\ntrian: {}\n")
    with pytest.raises(SpecError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_spec(str(path))


@pytest.mark.parametrize("text, message", [
    ("name: x\ntrain: {batch_size: many}\n", r"train.batch_size: expected int, got 'many'"),
    ("name: x\ntrain: {batch_size: true}\n", r"train.batch_size: expected int"),
    ("name: x\ntrain: {quantization: nf8}\n", r"train.quantization: 'nf8' is not allowed \(allowed: 'auto', 'none', 'nf4'\)"),
    ("name: x\ndata: {heldout_fraction: 1.5}\n", r"data.heldout_fraction: must be between 0 and 1"),
    ("name: x\nmetrics: {names: [rougeX]}\n", r"metrics.names\[0\]: unknown metric 'rougeX' \(did you mean"),
    ("name: x\nmetrics: {names: [loop]}\n", r"metrics.names\[0\]: unknown metric 'loop' \(did you mean 'loops'"),
    ("name: x\ngeneration: {no_repeat_ngram_size: -1}\n", r"generation.no_repeat_ngram_size: must be >= 0 \(0 = off\)"),
    ("name: x\ngeneration: {min_new_tokens: 96}\n",
     r"generation.min_new_tokens: must be >= 0 \(0 = off\) and below generation.max_new_tokens"),
    ("name: x\ngeneration: {no_repeat_ngram_size: 2.5}\n", r"generation.no_repeat_ngram_size: expected int"),
    ("name: x\nmetrics: {loop_warning: 1.5}\n", r"metrics.loop_warning: must be in \[0, 1\]"),
    ("name: x\ngate: {max_loop_share: -0.1}\n", r"gate.max_loop_share: must be in \[0, 1\] or null"),
    ("description: no name\n", r"name: missing required key"),
    ("name: x\ntrain: [1, 2]\n", r"train: expected a mapping"),
    ("name: x\n  bad: : yaml\n", r"t.yaml:2: not valid YAML"),
    ("- just\n- a list\n", r"a spec must be a mapping"),
])
def test_bad_values_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(SpecError, match=message) as info:
        load_spec(str(write(tmp_path, text)))
    assert "\n" not in str(info.value)


def test_missing_task_suggests_known_names():
    with pytest.raises(SpecError, match=r"no such task \(did you mean 'amazon_desc'\?\)"):
        load_spec("amazon_dsc", tasks_dir=REPO / "tasks")


def test_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, "name: x\n")
    spec = load_spec(str(path), ["train.lr=1e-4", "data.max_heldout=5", "lora.target_modules=[q_proj]"])
    assert spec.train.lr == 1e-4 and spec.data.max_heldout == 5 and spec.lora.target_modules == ["q_proj"]
    with pytest.raises(SpecError, match=r"train.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_spec(str(path), ["train.lrr=1"])
    with pytest.raises(SpecError, match=r"expected section.key=value"):
        load_spec(str(path), ["train.lr"])


def test_data_paths_relative_to_spec_file_but_cli_paths_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "t.yaml"
    path.write_text("name: x\ndata: {path: d.jsonl}\n")
    assert load_spec(str(path)).data_paths() == [tmp_path / "specs" / "d.jsonl"]
    monkeypatch.chdir(tmp_path)
    spec = load_spec(str(path), ["data.path=[a.jsonl, b.jsonl]"])
    assert spec.data_paths() == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]


def test_resolved_spec_round_trips(tmp_path):
    spec = load_spec("amazon_desc", tasks_dir=REPO / "tasks")
    as_dict = spec_to_dict(spec)
    assert Path(as_dict["data"]["path"][0]).is_absolute()
    assert "base_dir" not in as_dict


def test_bare_on_off_mean_the_switch_not_a_boolean(tmp_path):
    """PyYAML reads `packing: on` as True; the on/off switches take it as 'on'."""
    spec = load_spec(str(write(tmp_path, "name: x\ntrain: {packing: on, liger_kernels: off}\n")),
                     ["train.packing=off", "train.liger_kernels=on"])
    assert (spec.train.packing, spec.train.liger_kernels) == ("off", "on")
    assert load_spec(str(write(tmp_path, "name: x\ntrain: {packing: on}\n"))).train.packing == "on"
    with pytest.raises(SpecError, match=r"train.quantization: True is not allowed"):
        load_spec(str(write(tmp_path, "name: x\ntrain: {quantization: on}\n")))
