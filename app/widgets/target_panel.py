"""Target panel: the device the run is for and the GPU's capacity (detected with torch.cuda or
NVML where present, else chosen from common GPUs, or custom)."""

from __future__ import annotations

import sys

from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox

from app.state import COMMON_GPUS, AppState
from app.widgets.common import note_label

GiB = 1024**3
_CUSTOM = "Custom…"


def detect_gpu() -> tuple[str, int] | None:
    """(name, total bytes) of GPU 0 via NVML or an already-imported torch; None without a GPU.

    torch is only asked when something else has imported it already (importing it here would stall
    the window's start by seconds).
    """
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        return (name.decode() if isinstance(name, bytes) else str(name)), int(total)
    except Exception:  # noqa: BLE001 - no NVML, no driver, no GPU: fall through
        pass
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.name, int(props.total_memory)
    except Exception:  # noqa: BLE001
        pass
    return None


class TargetPanel(QGroupBox):
    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__("Target", parent)
        self._state = state
        self.device = QComboBox()
        self.device.addItem("CUDA GPU", "cuda")
        self.device.addItem("CPU", "cpu")
        self.gpu = QComboBox()
        detected = detect_gpu()
        if detected:
            self.gpu.addItem(f"Detected: {detected[0]}", detected[1])
        for name, size in COMMON_GPUS:
            self.gpu.addItem(name, size)
        self.gpu.addItem(_CUSTOM, 0)
        self.capacity = QDoubleSpinBox()
        self.capacity.setRange(0.5, 4096)
        self.capacity.setDecimals(1)
        self.capacity.setSuffix(" GiB")
        self.capacity.setKeyboardTracking(False)
        form = QFormLayout(self)
        form.addRow("Device", self.device)
        form.addRow("GPU", self.gpu)
        form.addRow("Capacity", self.capacity)
        form.addRow(note_label("The estimate is drawn against this capacity. Measuring a CUDA "
                               "profile needs a GPU on this machine; CPU runs measure live tensor bytes."))

        i = self.gpu.findText(state.gpu_name)
        self.gpu.setCurrentIndex(i if i >= 0 else self.gpu.findText(_CUSTOM))
        self.capacity.setValue(state.capacity_bytes / GiB)
        self.capacity.setEnabled(self.gpu.currentText() == _CUSTOM)

        self.device.currentIndexChanged.connect(self._on_device_chosen)
        self.gpu.currentIndexChanged.connect(self._on_gpu_chosen)
        self.capacity.valueChanged.connect(self._on_capacity_edited)
        state.profile_changed.connect(self._on_profile_changed)
        self._on_profile_changed(state.profile)

    def _on_device_chosen(self, _index: int) -> None:
        self._state.update(target=self.device.currentData())

    def _on_gpu_chosen(self, _index: int) -> None:
        size = int(self.gpu.currentData() or 0)
        custom = self.gpu.currentText() == _CUSTOM
        self.capacity.setEnabled(custom)
        if size:
            self.capacity.blockSignals(True)
            self.capacity.setValue(size / GiB)
            self.capacity.blockSignals(False)
        self._state.set_capacity(int(self.capacity.value() * GiB), self.gpu.currentText())

    def _on_capacity_edited(self, value: float) -> None:
        self._state.set_capacity(int(value * GiB), self.gpu.currentText())

    def _on_profile_changed(self, profile) -> None:
        self.device.blockSignals(True)
        self.device.setCurrentIndex(max(0, self.device.findData(profile.target)))
        self.device.blockSignals(False)
