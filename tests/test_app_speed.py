"""The app's speed views: estimated tokens/s beside measured, Which GPU?, Best settings (issue 16)."""

import pytest

pytest.importorskip("PySide6")
pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")


def test_which_gpu_dialog_lists_the_catalog_and_plans_for_a_row(qtbot, window):
    from engine import gpus

    w = window
    w.state.update(target="cuda", gpu="h100-sxm")
    dialog = w.show_which_gpu()
    qtbot.waitUntil(lambda: dialog.result is not None, timeout=60000)
    assert dialog.table.rowCount() == len(gpus.CATALOG) - 1
    fits = [dialog.table.item(i, 2).text() for i in range(dialog.table.rowCount())]
    assert all(f in ("fits", "does not fit") for f in fits)
    row = next(i for i in range(dialog.table.rowCount())
               if dialog.table.item(i, 0).data(0x0100) == "l4")
    dialog.table.selectRow(row)
    dialog.use_button.click()
    assert w.state.profile.gpu == "l4"


def test_best_settings_fills_a_new_profile(qtbot, window):
    w = window
    w.state.update(target="cuda", gpu="h100-sxm")
    before = len(w.state.entries)
    dialog = w.show_best_settings()
    qtbot.waitUntil(lambda: dialog.result is not None, timeout=60000)
    assert dialog.table.rowCount() >= 1
    best = dialog.result.candidates[0]
    dialog.new_button.click()
    assert len(w.state.entries) == before + 1
    new = w.state.profile
    assert new.name.endswith("(fastest)")
    assert (new.batch, new.precision) == (best.profile.batch, best.profile.precision)
