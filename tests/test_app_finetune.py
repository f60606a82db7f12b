"""The "Fine-tuning method" group: built from the LoRA technique's declared Controls (full / LoRA /
QLoRA, rank, alpha, dropout, targets, base-weight quantization), wired to the profile both ways."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from app.state import AppState  # noqa: E402
from app.widgets.technique_panel import TechniquePanel  # noqa: E402
from engine.profile import Profile  # noqa: E402


@pytest.fixture
def panel(qtbot):
    state = AppState([Profile(name="p", model="tiny-llama", target="cpu")], autosave=False)
    w = TechniquePanel(state)
    qtbot.addWidget(w)
    return state, w


def _choose(combo, value):
    combo.setCurrentIndex(combo.findData(value))


def test_method_switch_sets_lora_and_quant(panel):
    state, w = panel
    assert w.groups["finetune"].title() == "Fine-tuning method"
    assert w.finetune_method.currentData() == "full" and not w.lora_rank.isEnabled()
    _choose(w.finetune_method, "lora")
    assert state.profile.lora == 16 and state.profile.quant == "none"
    assert w.lora_rank.isEnabled() and w.lora_alpha.isEnabled()
    w.lora_rank.setValue(8)
    assert state.profile.lora == 8
    _choose(w.finetune_method, "qlora")
    assert state.profile.lora == 8 and state.profile.quant == "nf4"
    _choose(w.quant, "nf4-dq")
    assert state.profile.quant == "nf4-dq" and w.finetune_method.currentData() == "qlora"
    _choose(w.finetune_method, "full")
    assert state.profile.lora == 0 and state.profile.quant == "none"


def test_optimizers_listed_with_what_cannot_run(panel, monkeypatch):
    _state, w = panel
    values = [w.optimizer.itemData(i) for i in range(w.optimizer.count())]
    assert values == ["adamw", "adamw-8bit", "paged-adamw-8bit", "adafactor", "sgd", "lion"]
    from app.widgets import technique_panel
    import engine.optimizers as optimizers

    monkeypatch.setattr(optimizers, "bitsandbytes_missing",
                        lambda quick=False: "bitsandbytes is not installed here")
    labels = technique_panel._optimizer_labels()
    assert labels["adamw-8bit"].endswith("(estimate only here)") and labels["adamw"] == "AdamW (torch)"
    from engine.techniques import lora

    assert "estimate only" in lora._method_choices()["qlora"]
