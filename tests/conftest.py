import sys
from pathlib import Path

# Test helpers (dicom_factory, peers) are plain modules next to the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))


import pytest


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The demo-weights model, loaded once per test session.

    Hermetic: a developer's real ~/.torchxrayvision weights must not turn this
    into a real model."""
    import torchxrayvision as xrv

    from inference.model import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xrv.utils, "get_cache_dir", lambda: str(tmp_path_factory.mktemp("empty-cache")) + "/")
        return load_model(None, device="cpu")
