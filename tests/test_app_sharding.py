"""The "GPUs and sharding" group: built from the sharding technique's declared Controls, wired to
the profile; the estimate view labels its bars per rank."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from app.state import AppState  # noqa: E402
from app.widgets.technique_panel import TechniquePanel  # noqa: E402
from engine.profile import Profile  # noqa: E402


def test_gpus_and_sharding_group_sets_the_profile(qtbot):
    state = AppState([Profile(name="p", model="tiny-llama", target="cpu")], autosave=False)
    w = TechniquePanel(state)
    qtbot.addWidget(w)
    assert w.groups["sharding"].title() == "GPUs and sharding"
    assert not w.offload.isEnabled() and not w.bucket_cap_mb.isEnabled()
    w.gpus.setValue(4)  # more than one GPU picks FSDP2
    assert state.profile.shard == "fsdp2" and state.profile.gpus == 4
    assert w.offload.isEnabled() and w.reshard_after_forward.isEnabled()
    w.reshard_after_forward.setChecked(False)
    assert state.profile.reshard_after_forward == "off"
    w.offload.setCurrentIndex(w.offload.findData("optimizer"))
    assert state.profile.offload == "optimizer"

    w.shard.setCurrentIndex(w.shard.findData("none"))  # back to one GPU, FSDP2 options reset
    assert (state.profile.gpus, state.profile.offload, state.profile.reshard_after_forward) == \
        (1, "none", "on")


def test_estimate_view_names_the_worst_rank():
    from types import SimpleNamespace

    from app.widgets.estimate_view import EstimateView

    state = SimpleNamespace(profile=Profile(model="tiny-llama", target="cpu", gpus=2, shard="ddp"))
    meas = SimpleNamespace(extra={"worst_rank": 1, "ranks": [
        {"rank": 0, "peak_allocated_bytes": 10 << 20}, {"rank": 1, "peak_allocated_bytes": 11 << 20}]})
    est_label, meas_label = EstimateView._per_rank_labels(SimpleNamespace(_state=state),
                                                          ["Estimated", "Measured"], meas)
    assert "per rank, 2 GPUs (ddp)" in est_label
    assert "worst rank 1 of 2" in meas_label and "r0 10" in meas_label
