"""A run resolves its fast-path switches once, up front (resolve_device), and training reuses them."""

import json

from tests.conftest import run_tiny

from harness import devices


def test_a_run_resolves_the_fast_path_once(tiny_model_dir, tmp_path, monkeypatch):
    from harness.recipes import run
    from harness.training import train

    calls = []
    resolve = train.fast_path_options

    def counted(spec, device, *reasons):
        calls.append(device.kind)
        return resolve(spec, device, *reasons)

    monkeypatch.setattr(train, "fast_path_options", counted)
    monkeypatch.setattr(run, "fast_path_options", counted)
    run_dir = run_tiny(tmp_path, tiny_model_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["train"]["steps"] == 4
    assert calls == ["cpu"]  # resolve_device's; the Trainer's SFTConfig took the same dict


def test_the_spec_decides_activation_checkpointing_not_trls_default(tiny_model_dir, tmp_path):
    """trl's configs default checkpointing to on; a spec saying false must train without it (it used to
    run every harness training with each forward recomputed in the backward)."""
    from harness import models
    from harness.data.records import prepare
    from harness.spec import load_spec
    from harness.training.tokenization import tokenized_dataset
    from harness.training.train import build_trainer, checkpointing_field
    from tests.conftest import REPO, tiny_overrides

    device = devices.pick_device()
    for on in (False, True):
        spec = load_spec(str(REPO / "tasks" / "amazon_desc.yaml"),
                         tiny_overrides(tiny_model_dir, f"train.gradient_checkpointing={str(on).lower()}"))
        tokenizer = models.load_tokenizer(str(tiny_model_dir), spec.model, uses_chat_template=True)
        model = models.load_model(str(tiny_model_dir), spec.model, tokenizer, device)
        data = tokenized_dataset(spec, tokenizer, prepare(spec).train[:8])
        trainer = build_trainer(spec, model, tokenizer, data, None, tmp_path / str(on), device, max_steps=1,
                                save_strategy="no")
        assert getattr(trainer.args, checkpointing_field()) is on
        trainer.train()  # the Trainer switches checkpointing on as training starts
        assert trainer.model.get_base_model().is_gradient_checkpointing is on
