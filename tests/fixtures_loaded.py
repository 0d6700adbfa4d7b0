"""The tiny run's tuned model loaded once per test module (import `loaded` into the module)."""

from __future__ import annotations

import pytest

from harness.serving.loaded_run import LoadedRun


@pytest.fixture(scope="module")
def loaded(tiny_run):
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before the autouse env fixture
        mp.setenv("HARNESS_DEVICE", "cpu")
        return LoadedRun.load(tiny_run)
