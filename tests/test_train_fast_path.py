"""A run resolves its fast-path switches once, up front (resolve_device), and training reuses them."""

import json

from tests.conftest import run_tiny


def test_a_run_resolves_the_fast_path_once(tiny_model_dir, tmp_path, monkeypatch):
    from harness.recipes import run
    from harness.training import train

    calls = []
    resolve = train.fast_path_options

    def counted(spec, device):
        calls.append(device.kind)
        return resolve(spec, device)

    monkeypatch.setattr(train, "fast_path_options", counted)
    monkeypatch.setattr(run, "fast_path_options", counted)
    monkeypatch.chdir(tmp_path)  # reports/ lands here
    run_dir = run_tiny(tmp_path, tiny_model_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["train"]["steps"] == 4
    assert calls == ["cpu"]  # resolve_device's; the Trainer's SFTConfig took the same dict
