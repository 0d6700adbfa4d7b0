"""Task specs: YAML files that map 1:1 onto typed dataclasses.

A spec is plain data. Loading checks every key and type, so a typo fails at once with a
one-line error naming the file and the key ("did you mean ..."), never halfway through a
run. `--set section.key=value` overrides are parsed as YAML scalars and checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from harness.errors import SpecError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
# Equal to harness.scoring.metrics.METRICS (a test holds them together); spec loading stays free of the scorers.
METRIC_NAMES = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "perplexity", "rep4", "loops", "distinct2")
# Named prompt formats of the fine-tuning notebooks (texts in harness/data/prompts.py PRESETS).
PROMPT_PRESETS = ("alpaca", "llama2_inst")
# Experiment trackers `train.report_to` may name (harness.training.tracking), besides "none".
TRACKERS = ("tensorboard", "mlflow", "wandb")


@dataclass
class DataSpec:
    """Where the records are and how they are cleaned and split."""

    path: list[str] = field(default_factory=lambda: ["data/amazon_demo.jsonl"])
    title_field: str = "title"
    content_field: str = "content"
    id_field: str = "uid"
    min_content_chars: int = 20
    max_content_chars: int = 1200
    heldout_fraction: float = 0.15
    split_salt: str = "harness-v1"
    max_train: int | None = None
    max_heldout: int | None = None
    strict: bool = False
    # A test file (or globs) to score on instead of a hash split of `path`; `path` is then all training data.
    heldout_path: list[str] | None = None
    workers: int | None = None


@dataclass
class PromptSpec:
    """How a title becomes a prompt: `template=None` uses the model's chat template, `alpaca` or
    `llama2_inst` a notebook format, anything else is a format string with {title} (and {instruction})."""

    instruction: str = "Write a product description for the following product title."
    system: str | None = None
    template: str | None = None


@dataclass
class ModelSpec:
    """The base model: the embedded default, a local folder, or a hub id."""

    base: str = EMBEDDED_MODEL
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # Other names of the base model: an adapter whose base_model_name_or_path is one of them fits.
    base_aliases: list[str] = field(default_factory=list)
    # Score with the tokenizer saved next to an adapter (`eval`) when it differs from the base's.
    adapter_tokenizer: bool = False
    # The base model is random on purpose (bench architectures, test models): skip the probe's refusal
    # of a model whose perplexity on plain English is absurd (it is still measured and recorded).
    random_weights: bool = False


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainSpec:
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    # A title whose prompt leaves less than max_length // 8 tokens for the description: truncate cuts the
    # title's tokens (the prompt's frame stays whole), skip leaves the example out of training. Held-out
    # titles are always cut, never skipped (harness/data/prompts.py fit_prompts).
    long_prompts: Literal["truncate", "skip"] = "truncate"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 42
    logging_steps: int = 5
    eval_fraction: float = 0.05
    quantization: Literal["auto", "none", "nf4"] = "auto"
    gradient_checkpointing: bool = False
    packing: Literal["auto", "on", "off"] = "auto"
    liger_kernels: Literal["auto", "on", "off"] = "auto"
    attention: Literal["auto", "sdpa", "varlen", "flex_attention", "eager"] = "auto"
    compile: Literal["off", "on"] = "off"
    fused_lora: Literal["auto", "on", "off"] = "auto"
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    save_steps: int = 20
    # Keep the checkpoint with the lowest eval loss (on the train.eval_fraction slice), not the last.
    keep_best: bool = False
    # Experiment trackers that watch training: none, tensorboard, mlflow, wandb, or a list of them.
    report_to: str | list[str] = "none"


@dataclass
class GenerationSpec:
    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # > 0: never repeat an n-gram of this many model tokens (0 = off)
    min_new_tokens: int = 0  # > 0: the end-of-turn token cannot end an output shorter than this (0 = off)
    # -- fast scorer (harness/scoring/generation.py): engine, fixed batch shapes, sampling seed --
    engine: Literal["auto", "compiled", "graphs", "static", "dynamic"] = "auto"
    static_batch_size: int = 512
    prompt_buckets: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    seed: int = 0
    # -- minimum Bayes risk decoding (harness/scoring/mbr_selection.py): 0 = off; N >= 2 samples N candidates
    # per prompt (temperature/top_p, whatever do_sample says) and keeps the one with the highest mean utility
    # against the other N-1 --
    mbr_samples: int = 0
    mbr_utility: Literal["rougeL", "chrf"] = "rougeL"


@dataclass
class MetricsSpec:
    names: list[str] = field(default_factory=lambda: list(METRIC_NAMES))
    rouge_stemmer: bool = True
    bootstrap_replicates: int = 1000
    bootstrap_seed: int = 0
    length_shift_warning: float = 0.5  # warn: similarity gains while the length ratio shifts this much away from 1
    loop_warning: float = 0.2  # warn when more than this share of a model's outputs loop
    diversity_drop_warning: float = 0.25  # warn when tuned distinct-2 falls by more than this share of base's


@dataclass
class RuleSpec:
    """One regression rule of the CI gate."""

    metric: str
    margin: float = 0.0
    floor: float | None = None


@dataclass
class GateSpec:
    """The CI gate: which rules a candidate adapter must pass against a baseline."""

    subset: int | None = None
    subset_seed: int = 0
    rules: list[RuleSpec] = field(
        default_factory=lambda: [RuleSpec("rougeL", margin=1.0), RuleSpec("chrf", margin=1.0),
                                 RuleSpec("perplexity", margin=0.5), RuleSpec("loops", margin=0.05)]
    )
    max_empty_share: float = 0.05
    max_truncated_share: float = 0.5
    max_loop_share: float | None = None  # null = no absolute limit on the candidate's looping outputs


@dataclass
class SweepSpec:
    """How `harness sweep` chooses settings: on a validation slice carved from train, never held-out."""

    # One metric name: the best tuned value on validation wins (direction follows the metric). A list of
    # names: the highest worst paired gain wins (tuned must beat base on every one, CI clear of zero).
    select: str | list[str] = "rougeL"
    validation_fraction: float = 0.1
    validation_salt: str = "harness-validation-v1"  # must differ from data.split_salt
    max_validation: int | None = 64
    max_loop_share: float = 0.1  # tuned outputs looping more often than this, or than base, are infeasible
    sampler: Literal["grid", "tpe"] = "grid"
    n_trials: int | None = None  # tpe only: how many trials to complete
    seed: int = 0


@dataclass
class TaskSpec:
    name: str
    description: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    gate: GateSpec = field(default_factory=GateSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    # Folder that relative data paths in the YAML are resolved against; not a YAML key.
    base_dir: str = field(default=".", metadata={"internal": True})

    def data_paths(self) -> list[Path]:
        return self._resolve(self.data.path)

    def heldout_paths(self) -> list[Path]:
        """`data.heldout_path` resolved like `data.path` (empty when held-out rows come from a split)."""
        return self._resolve(self.data.heldout_path or [])

    def _resolve(self, paths: list[str]) -> list[Path]:
        return [Path(p) if Path(p).is_absolute() else Path(self.base_dir) / p for p in paths]


def _did_you_mean(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (allowed: {', '.join(choices)})"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int->float, str->[str])."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except SpecError as exc:
                errors.append(str(exc))
        raise SpecError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(tp)):
            value = "on" if value else "off"  # YAML 1.1 (PyYAML) reads a bare on/off as a boolean
        if value not in typing.get_args(tp):
            allowed = ", ".join(repr(a) for a in typing.get_args(tp))
            raise SpecError(f"{where}: {value!r} is not allowed (allowed: {allowed})")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            return [value]
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" as a string; accept it as the float the user meant.
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise SpecError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    public = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    names = [f.name for f in public]
    for key in data:
        if key not in names:
            raise SpecError(f"{where}.{key}: unknown key{_did_you_mean(str(key), names)}".lstrip("."))
    kwargs = {}
    for f in public:
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{where}.{f.name}".lstrip("."))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{where}.{f.name}: missing required key".lstrip("."))
    return cls(**kwargs)


def resolve_spec_path(name_or_path: str, tasks_dir: Path = Path("tasks")) -> Path:
    """A task name (`amazon_desc`) means `tasks/<name>.yaml`; anything else is a path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise SpecError(f"{candidate}: spec file not found")
        return candidate
    path = tasks_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in tasks_dir.glob("*.yaml")) if tasks_dir.is_dir() else []
        raise SpecError(f"{path}: no such task{_did_you_mean(name_or_path, known) if known else ''}")
    return path


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(raw: dict, keys: list[str], value: Any, text: str) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {text}: '{k}' is not a section")
    node[keys[-1]] = value


def load_spec(name_or_path: str, overrides: list[str] = (), tasks_dir: Path = Path("tasks")) -> TaskSpec:
    """Load, override and validate a task spec; every failure is a one-line SpecError."""
    path = resolve_spec_path(name_or_path, tasks_dir)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SpecError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read spec ({exc})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a mapping of sections")
    for text in overrides:
        keys, value = parse_override(text)
        if keys in (["data", "path"], ["data", "heldout_path"]) and value is not None:
            # Paths typed on the command line are relative to the shell's folder, not the spec's.
            value = [str(Path(p).resolve()) for p in (value if isinstance(value, list) else [value])]
        _apply_override(raw, keys, value, text)
    try:
        spec = build(TaskSpec, raw, "")
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    spec.base_dir = str(path.parent.resolve())
    _check_values(spec, path)
    return spec


def _check_values(spec: TaskSpec, path: Path) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (0.0 < spec.data.heldout_fraction < 1.0, "data.heldout_fraction", "must be between 0 and 1"),
        (spec.data.min_content_chars >= 0, "data.min_content_chars", "must be >= 0"),
        (spec.data.max_content_chars > spec.data.min_content_chars, "data.max_content_chars",
         "must be greater than data.min_content_chars"),
        (bool(spec.data.path), "data.path", "must name at least one file"),
        (spec.data.heldout_path is None or bool(spec.data.heldout_path), "data.heldout_path",
         "must name at least one file, or be null"),
        (spec.data.workers is None or spec.data.workers >= 1, "data.workers", "must be >= 1 or null"),
        (spec.lora.r > 0, "lora.r", "must be > 0"),
        (0.0 <= spec.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)"),
        (spec.train.lr > 0, "train.lr", "must be > 0"),
        (spec.train.epochs > 0, "train.epochs", "must be > 0"),
        (spec.train.max_steps is None or spec.train.max_steps > 0, "train.max_steps", "must be > 0 or null"),
        (spec.train.batch_size > 0, "train.batch_size", "must be > 0"),
        (spec.train.grad_accum > 0, "train.grad_accum", "must be > 0"),
        (spec.train.max_length >= 16, "train.max_length", "must be >= 16"),
        (0.0 <= spec.train.eval_fraction < 0.5, "train.eval_fraction", "must be in [0, 0.5)"),
        (not spec.train.keep_best or spec.train.eval_fraction > 0, "train.keep_best",
         "needs train.eval_fraction > 0 (the eval set that picks the best checkpoint)"),
        (spec.generation.max_new_tokens > 0, "generation.max_new_tokens", "must be > 0"),
        (spec.generation.batch_size > 0, "generation.batch_size", "must be > 0"),
        (spec.generation.temperature > 0, "generation.temperature", "must be > 0"),
        (0.0 < spec.generation.top_p <= 1.0, "generation.top_p", "must be in (0, 1]"),
        (spec.generation.no_repeat_ngram_size >= 0, "generation.no_repeat_ngram_size", "must be >= 0 (0 = off)"),
        (0 <= spec.generation.min_new_tokens < spec.generation.max_new_tokens, "generation.min_new_tokens",
         "must be >= 0 (0 = off) and below generation.max_new_tokens"),
        (spec.generation.static_batch_size > 0, "generation.static_batch_size", "must be > 0"),
        (bool(spec.generation.prompt_buckets) and min(spec.generation.prompt_buckets) > 0
         and spec.generation.prompt_buckets == sorted(set(spec.generation.prompt_buckets)),
         "generation.prompt_buckets", "must list positive widths in increasing order"),
        (spec.generation.mbr_samples == 0 or spec.generation.mbr_samples >= 2, "generation.mbr_samples",
         "must be 0 (off) or >= 2 (candidates per prompt)"),
        (spec.generation.mbr_samples <= min(spec.generation.batch_size, spec.generation.static_batch_size),
         "generation.mbr_samples", "must be <= generation.batch_size and static_batch_size (a prompt's "
         "candidates decode in one batch)"),
        (not spec.generation.mbr_samples or spec.generation.engine != "graphs", "generation.engine",
         "graphs decodes greedily only and generation.mbr_samples samples its candidates; set engine auto, "
         "static or dynamic"),
        (not spec.generation.mbr_samples or spec.generation.mbr_utility != "rougeL" or spec.metrics.rouge_stemmer,
         "generation.mbr_utility", "rougeL scores candidates with rouge-score's stemmer, and "
         "metrics.rouge_stemmer is false: set it true, or mbr_utility chrf"),
        (spec.metrics.bootstrap_replicates >= 100, "metrics.bootstrap_replicates", "must be >= 100"),
        (0.0 <= spec.metrics.loop_warning <= 1.0, "metrics.loop_warning", "must be in [0, 1]"),
        (0.0 <= spec.metrics.diversity_drop_warning <= 1.0, "metrics.diversity_drop_warning", "must be in [0, 1]"),
        (spec.gate.subset is None or spec.gate.subset >= 1, "gate.subset", "must be >= 1 or null"),
        (bool(spec.gate.rules), "gate.rules", "must list at least one rule"),
        (all(r.margin >= 0 for r in spec.gate.rules), "gate.rules", "every margin must be >= 0"),
        (0.0 <= spec.gate.max_empty_share <= 1.0, "gate.max_empty_share", "must be in [0, 1]"),
        (0.0 <= spec.gate.max_truncated_share <= 1.0, "gate.max_truncated_share", "must be in [0, 1]"),
        (spec.gate.max_loop_share is None or 0.0 <= spec.gate.max_loop_share <= 1.0, "gate.max_loop_share",
         "must be in [0, 1] or null"),
        (0.0 < spec.sweep.validation_fraction < 1.0, "sweep.validation_fraction", "must be between 0 and 1"),
        (spec.sweep.validation_salt != spec.data.split_salt, "sweep.validation_salt",
         "must differ from data.split_salt (the same salt would carve the slice along the held-out boundary)"),
        (spec.sweep.max_validation is None or spec.sweep.max_validation >= 1, "sweep.max_validation",
         "must be >= 1 or null"),
        (0.0 <= spec.sweep.max_loop_share <= 1.0, "sweep.max_loop_share", "must be in [0, 1]"),
        (spec.sweep.sampler != "tpe" or (spec.sweep.n_trials or 0) >= 1, "sweep.n_trials",
         "must be >= 1 with sampler tpe"),
        (spec.sweep.sampler != "grid" or spec.sweep.n_trials is None, "sweep.n_trials",
         "only for sampler tpe (a grid runs every combination); leave it null"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise SpecError(f"{path}: {key}: {msg}")
    for i, name in enumerate(spec.metrics.names):
        if name not in METRIC_NAMES:
            raise SpecError(f"{path}: metrics.names[{i}]: unknown metric '{name}'{_did_you_mean(name, list(METRIC_NAMES))}")
    for i, rule in enumerate(spec.gate.rules):
        if rule.metric not in METRIC_NAMES:
            raise SpecError(f"{path}: gate.rules[{i}].metric: unknown metric '{rule.metric}'"
                            f"{_did_you_mean(rule.metric, list(METRIC_NAMES))}")
    _check_select(spec, path)
    _check_report_to(spec, path)
    template = spec.prompt.template
    if template is not None and template not in PROMPT_PRESETS and "{title}" not in template:
        close = difflib.get_close_matches(template, PROMPT_PRESETS, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f" ({', '.join(PROMPT_PRESETS)})"
        raise SpecError(f"{path}: prompt.template: must contain {{title}} or name a preset{hint}")


def _check_select(spec: TaskSpec, path: Path) -> None:
    """sweep.select names scored metrics, each once (HIGHER_IS_BETTER gives every one of METRIC_NAMES a
    direction, loops, rep4 and distinct2 included, so any of them can be ranked or gained on)."""
    select = spec.sweep.select
    named = [("sweep.select", select)] if isinstance(select, str) else \
        [(f"sweep.select[{i}]", name) for i, name in enumerate(select)]
    if not named:
        raise SpecError(f"{path}: sweep.select: must name a metric or list at least one")
    seen = set()
    for key, name in named:
        if name not in METRIC_NAMES:
            raise SpecError(f"{path}: {key}: unknown metric '{name}'{_did_you_mean(name, list(METRIC_NAMES))}")
        if name not in spec.metrics.names:
            raise SpecError(f"{path}: {key}: '{name}' is not among metrics.names")
        if name in seen:
            raise SpecError(f"{path}: {key}: '{name}' is listed twice")
        seen.add(name)


def report_to_names(report_to: str | list[str]) -> list[str]:
    """`train.report_to` as a list of tracker names ([] for "none")."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [n for n in names if n != "none"]


def _check_report_to(spec: TaskSpec, path: Path) -> None:
    """train.report_to: "none", or trackers from TRACKERS (a list without "none" and without repeats)."""
    report_to = spec.train.report_to
    names = [report_to] if isinstance(report_to, str) else report_to
    if not names:
        raise SpecError(f"{path}: train.report_to: must name a tracker, a list of them, or none")
    seen = set()
    for i, name in enumerate(names):
        key = "train.report_to" if isinstance(report_to, str) else f"train.report_to[{i}]"
        if name == "none" and len(names) == 1:
            continue
        if name not in TRACKERS:
            allowed = list(TRACKERS) + (["none"] if isinstance(report_to, str) else [])
            raise SpecError(f"{path}: {key}: unknown tracker '{name}'{_did_you_mean(name, allowed)}")
        if name in seen:
            raise SpecError(f"{path}: {key}: '{name}' is listed twice")
        seen.add(name)


def spec_to_dict(spec: TaskSpec) -> dict:
    """The resolved spec as plain data (what a run folder records)."""
    out = dataclasses.asdict(spec)
    out.pop("base_dir")
    out["data"]["path"] = [str(p) for p in spec.data_paths()]
    if spec.data.heldout_path is not None:
        out["data"]["heldout_path"] = [str(p) for p in spec.heldout_paths()]
    return out
