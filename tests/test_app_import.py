"""Import a measurement made elsewhere onto a profile (File > Import measurement, drag and drop): it
is drawn like a local run, kept with its profile across a restart, and refused when its settings are
not the profile's or the file is not a measurement (pytest-qt, offscreen)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QDropEvent  # noqa: E402

from _cli import run_cli  # noqa: E402
from app_helpers import wait_idle  # noqa: E402

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")


@pytest.fixture(scope="module")
def measured_json(tmp_path_factory):
    """`headroom measure --json` of the tiny test profile, as a file from another machine."""
    path = tmp_path_factory.mktemp("elsewhere") / "run.json"
    code, out, err = run_cli(["measure", "--model", "tiny-gpt2", "--target", "cpu", "--batch", "2",
                              "--seq", "32", "--steps", "2", "--name", "on the GPU box", "--json"])
    assert code == 0, err
    path.write_text(out)
    return path


def test_imported_measurement_lands_on_its_profile_and_survives_a_restart(qtbot, window, measured_json):
    from app.main_window import MainWindow

    w = window
    wait_idle(qtbot, w)
    w.state.duplicate()
    w.techniques.batch.setValue(4)  # "tiny copy": another batch, so another run
    wait_idle(qtbot, w)
    assert w.state.current.profile.name == "tiny copy"
    # onto the wrong profile: refused, saying what differs; nothing changes
    assert not w.import_measurement(measured_json)
    assert w.state.current.measured is None
    text = w.message.text()
    assert text.startswith("Not imported: run.json is not a run of profile 'tiny copy'")
    assert "batch 2 in the file, 4 here" in text and "\n" not in text
    # onto its own profile (the name differs: names do not matter)
    w.profiles.list.setCurrentRow(0)
    assert w.state.profile.name == "tiny"
    assert w.import_measurement(measured_json)
    run = json.loads(measured_json.read_text())
    measured = w.state.current.measured
    assert measured.peak_allocated_bytes == run["peak_allocated_bytes"]
    assert w.state.entries[1].measured is None
    assert "Imported the run on" in w.message.text()
    # drawn like a local run: measured bars, the difference to the estimate, the note
    view = w.estimate_view
    assert view._bars["weights"].opts["height"][1] > 0
    assert "versus the estimate" in view.summary.text()
    assert "imported from run.json" in view.notes.text()
    w.close()  # saves the profiles and their measurements

    again = MainWindow()
    qtbot.addWidget(again)
    again.show()
    try:
        entries = {e.profile.name: e for e in again.state.entries}
        assert entries["tiny"].measured is not None and entries["tiny copy"].measured is None
        assert entries["tiny"].measured.peak_allocated_bytes == run["peak_allocated_bytes"]
        again.profiles.list.setCurrentRow([e.profile.name for e in again.state.entries].index("tiny"))
        assert again.estimate_view._measured is entries["tiny"].measured
    finally:
        again.shutdown()


def test_an_edit_drops_the_imported_run(qtbot, window, measured_json):
    w = window
    assert w.import_measurement(measured_json)
    w.techniques.seq.setValue(64)
    assert w.state.current.measured is None  # no longer a run of this profile


def test_a_malformed_file_is_one_line_and_changes_nothing(qtbot, window, tmp_path):
    w = window
    names = w.state.names()
    for name, text in (("broken.json", '{"peak_allocated_bytes": 5,'),
                       ("profile-like.json", json.dumps({"device": "cpu", "peak_allocated_bytes": 1})),
                       ("negative.json", json.dumps({"peak_allocated_bytes": -1, "peak_reserved_bytes": 0,
                                                     "device_used_bytes": 0}))):
        path = tmp_path / name
        path.write_text(text)
        assert not w.state.import_measurement(path)
        message = w.message.text()
        assert message.startswith(f"Cannot import {name}: ") and "\n" not in message, message
        assert w.state.current.measured is None and w.state.names() == names


def test_drop_a_result_json_on_the_window(qtbot, window, measured_json):
    w = window
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(measured_json))])
    drop = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                      Qt.KeyboardModifier.NoModifier)
    w.dropEvent(drop)
    assert w.state.names() == ["tiny"]  # not loaded as a profile
    assert w.state.current.measured is not None
    assert w.state.current.measured.peak_allocated_bytes == json.loads(measured_json.read_text())["peak_allocated_bytes"]
    assert w.import_measurement_action in w.menuBar().actions()[0].menu().actions()
