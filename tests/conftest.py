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


def _process_state() -> dict:
    """Process-wide torch/transformers state that no test (or thread it leaves running) may change:
    a change here would alter every later test's numbers in ways that look like unrelated bugs."""
    if "torch" not in sys.modules:
        return {}
    import torch

    def name(f):
        return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', f)}"

    state = {
        "default dtype": torch.get_default_dtype(),
        "grad enabled": torch.is_grad_enabled(),
        "fp32 matmul precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "torch.nn.init": tuple(name(getattr(torch.nn.init, f)) for f in
                               ("kaiming_uniform_", "normal_", "uniform_", "zeros_", "ones_")),
    }
    if "transformers.modeling_utils" in sys.modules:
        from transformers import AttentionInterface
        from transformers.modeling_utils import PreTrainedModel

        state["init_weights"] = name(PreTrainedModel.init_weights)
        local = AttentionInterface._global_mapping.get("headroom_local")
        state["headroom_local"] = name(local) if local is not None else None
    if "engine.techniques.local_attention" in sys.modules:  # once swapped by the CUDA emulation
        state["local_attention"] = name(sys.modules["engine.techniques.local_attention"].local_attention)
    return state


@pytest.fixture(autouse=True)
def _process_state_unchanged(request):
    """Warn (in the run's warnings summary) when a test leaves process-wide state changed: later
    tests would fail for reasons that look unrelated (two traced estimates at once once left local
    attention swapped for its CUDA emulation: NaN logits three test files later)."""
    before = _process_state()
    yield
    after = _process_state()
    changed = {k: (before[k], after[k]) for k in before if k in after and before[k] != after[k]}
    if before.get("headroom_local") is None:
        changed.pop("headroom_local", None)  # the first registration is not a change
    if changed:
        import warnings

        warnings.warn(f"{request.node.nodeid} left process-wide state changed (before, after): "
                      f"{changed}", stacklevel=1)


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
