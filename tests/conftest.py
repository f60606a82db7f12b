import os
import sys
from pathlib import Path

# Qt must see these before it is imported anywhere.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    """Point QSettings and Headroom's caches at a temporary folder for every test."""
    monkeypatch.setenv("HEADROOM_SETTINGS_DIR", str(tmp_path / "settings"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    yield


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def window(qtbot):
    """The shown main window on the tiny CPU profile (tests/app_helpers.py), no slow-run question;
    shut down after the test. A module that wants another window defines its own ``window``."""
    from app_helpers import tiny_main_window

    w = tiny_main_window(qtbot, ask_before_slow_runs=False)
    yield w
    w.shutdown()
