"""Target panel: the device the run is for and the memory it must fit in.

CUDA: the GPU the profile is planned for (``Profile.gpu``), from the engine's GPU catalog
(``engine.gpus``: memory as the driver reports it, rates for the speed estimate), detected (NVML,
``nvidia-smi``, or torch.cuda) off the GUI thread and preselected, or custom (a capacity you type). CPU: this machine's RAM, or a simulated capacity that a CPU run
enforces (``memory_cap_bytes``: the run ends out of memory when live tensors would pass it).
"""

from __future__ import annotations

import shutil
import subprocess

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QLabel

from app.state import DEFAULT_GPU, AppState, system_memory_bytes
from app.widgets.common import ByteSizeSpinBox, note_label
from app.worker import TaskRunner
from engine import gpus
from engine.units import format_bytes

GiB = 1024**3
MiB = 1024**2
_CUSTOM = "Custom…"
_DETECTED = "Detected: "


def _nvml() -> tuple[str, int] | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(handle)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        finally:
            pynvml.nvmlShutdown()
        return (name.decode() if isinstance(name, bytes) else str(name)), int(total)
    except Exception:  # noqa: BLE001 - no driver, no GPU
        return None


def _nvidia_smi() -> tuple[str, int] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        name, total_mib = out.splitlines()[0].rsplit(",", 1)
        return name.strip(), int(float(total_mib)) * MiB
    except Exception:  # noqa: BLE001 - driver missing or odd output
        return None


def _torch_cuda() -> tuple[str, int] | None:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.name, int(props.total_memory)
    except Exception:  # noqa: BLE001
        pass
    return None


def catalog_label(gpu) -> str:
    """The list's text for a catalog GPU: its name and the memory the driver reports. The
    marketing size in the name ("(24 GB)") and the "GeForce" brand are left out: the chosen item
    sets the combo's width (common.fit_current_text), and the column must stay narrow."""
    import re

    name = re.sub(r"\s*\(\d+ GB\)", "", gpu.name).replace("GeForce ", "")
    return f"{name} · {gpu.memory_mib / 1024:.1f} GiB"


def detect_gpu() -> tuple[str, int, str] | None:
    """(name, total bytes, how) of GPU 0, or None without one.

    NVML and nvidia-smi first: they read the driver without creating a CUDA context in this
    process (a context would take memory on the very GPU being planned for). torch.cuda last.
    Slow (imports, a subprocess): call it off the GUI thread.
    """
    for how, probe in (("NVML", _nvml), ("nvidia-smi", _nvidia_smi), ("torch.cuda", _torch_cuda)):
        found = probe()
        if found:
            return found[0], found[1], how
    return None


class TargetPanel(QGroupBox):
    def __init__(self, state: AppState, parent=None, detect: bool = True) -> None:
        super().__init__("Target", parent)
        self._state = state
        self.detected: tuple[str, int, str] | None = None
        self._ram = system_memory_bytes()

        self.device = QComboBox()
        self.device.addItem("CUDA GPU", "cuda")
        self.device.addItem("CPU (this machine)", "cpu")
        self.device.setToolTip("The device the profile's run is for (Profile.target)")
        self.gpu = QComboBox()
        self.gpu.setToolTip("The GPU you plan for (the profile's gpu): its memory is the capacity "
                            "line of the estimate, its rates the estimated tokens/s")
        for g in gpus.CATALOG.values():
            if g.key != "custom":
                self.gpu.addItem(catalog_label(g), (g.key, g.memory_bytes))
                self.gpu.setItemData(self.gpu.count() - 1, g.summary(), Qt.ItemDataRole.ToolTipRole)
        self.gpu.addItem(_CUSTOM, ("custom", 0))
        self.capacity = QDoubleSpinBox()
        self.capacity.setRange(0.5, 4096)
        self.capacity.setDecimals(1)
        self.capacity.setSuffix(" GiB")
        self.capacity.setKeyboardTracking(False)
        self.cpu_cap = ByteSizeSpinBox()  # value in MiB; takes "2 GiB", "512 MiB"
        self.cpu_cap.setRange(0.0, 1024.0 * 1024)
        self.cpu_cap.setSpecialValueText("off (RAM)")
        self.cpu_cap.setKeyboardTracking(False)
        self.cpu_cap.setToolTip("Simulated device capacity for CPU runs: the run stops with an "
                                "out-of-memory result when live tensor bytes would exceed it. "
                                "Type a size with its unit (2 GiB, 512 MiB); a bare number is MiB")
        self.detect_note = note_label("Looking for a GPU…")
        self.detect_note.setObjectName("gpu_detection")
        form = QFormLayout(self)
        form.addRow("Device", self.device)
        form.addRow("GPU", self.gpu)
        form.addRow("Capacity", self.capacity)
        self.cpu_cap_label = QLabel("CPU cap")
        form.addRow(self.cpu_cap_label, self.cpu_cap)
        form.addRow(self.detect_note)

        # the GPU chosen last time (its label), else the default catalog GPU; the capacity and the
        # profile's gpu follow the choice (the speed estimate is for that GPU, not for a default)
        i = self.gpu.findText(state.gpu_name) if state.gpu_name else -1
        if i < 0 and state.gpu_name != _CUSTOM:
            i = self._index_of(DEFAULT_GPU)
        self.gpu.setCurrentIndex(i if i >= 0 else self.gpu.findText(_CUSTOM))
        self.capacity.setValue(state.capacity_bytes / GiB)
        self.capacity.setEnabled(self.gpu.currentText() == _CUSTOM)

        self.device.currentIndexChanged.connect(self._on_device_chosen)
        self.gpu.currentIndexChanged.connect(self._on_gpu_chosen)
        self.capacity.valueChanged.connect(self._on_capacity_edited)
        self.cpu_cap.valueChanged.connect(self._on_cpu_cap_edited)
        state.profile_changed.connect(self._on_profile_changed)
        if not state.profile.gpu and self.gpu.currentText() != _CUSTOM:
            self._on_gpu_chosen(self.gpu.currentIndex())  # a profile with no GPU gets the shown one
        self._on_profile_changed(state.profile)

        self._runner = TaskRunner("gpu-detect", self)
        self._runner.result_ready.connect(self._on_detected)
        self._runner.failed.connect(lambda _m: self._on_detected(None))
        if detect:
            self._runner.start(lambda progress, should_stop: detect_gpu())
        else:
            self._on_detected(None)

    def shutdown(self) -> None:
        self._runner.shutdown()

    def _index_of(self, key: str) -> int:
        """The combo row of catalog GPU ``key`` (-1: none)."""
        for i in range(self.gpu.count()):
            if (self.gpu.itemData(i) or ("",))[0] == key:
                return i
        return -1

    # ----- handlers -------------------------------------------------------------------------
    def _on_detected(self, found) -> None:
        self.detected = found
        ram = f" RAM here: {format_bytes(self._ram)}." if self._ram else ""
        if not found:
            self.detect_note.setText("No CUDA GPU on this machine: choose the GPU you plan for." + ram)
            self.detect_note.setToolTip("Looked for one with NVML, nvidia-smi and torch.cuda. Measure CUDA "
                                        "profiles on the GPU machine (headroom measure PROFILE.json), or "
                                        "switch the device to CPU to measure here.")
            return
        name, total, how = found
        key = gpus.detect_key(name, total) or "custom"
        label = f"{_DETECTED}{name} ({total / GiB:.0f} GiB)"
        self.gpu.blockSignals(True)
        self.gpu.insertItem(0, label, (key, total))
        self.gpu.blockSignals(False)
        which = f"catalog {key}" if key != "custom" else "not in the catalog: H100-like rates"
        self.detect_note.setText(f"Detected {name}, {format_bytes(total)} (via {how}; {which})." + ram)
        # first start (nothing chosen before) or the detected GPU chosen before: use it
        chosen = self._state.settings.value("target/gpu_name", "")
        if not chosen or str(chosen).startswith(_DETECTED):
            self.gpu.setCurrentIndex(0)
        else:
            i = self.gpu.findText(str(chosen))
            self.gpu.blockSignals(True)
            self.gpu.setCurrentIndex(i if i >= 0 else 0)
            self.gpu.blockSignals(False)

    def _on_device_chosen(self, _index: int) -> None:
        self._state.update(target=self.device.currentData())

    def _on_gpu_chosen(self, _index: int) -> None:
        key, size = self.gpu.currentData() or ("custom", 0)
        custom = self.gpu.currentText() == _CUSTOM
        self.capacity.setEnabled(custom and self._state.profile.target == "cuda")
        if size:
            self.capacity.blockSignals(True)
            self.capacity.setValue(size / GiB)
            self.capacity.blockSignals(False)
        # a catalog GPU's exact size (the spin box shows it to 0.1 GiB)
        exact = int(size) if size and not custom else int(self.capacity.value() * GiB)
        self._state.set_capacity(exact, self.gpu.currentText())
        if self._state.profile.gpu != key:
            self._state.update(gpu=key)

    def _on_capacity_edited(self, value: float) -> None:
        self._state.set_capacity(int(value * GiB), self.gpu.currentText())

    def _on_cpu_cap_edited(self, value: float) -> None:
        self._state.update(memory_cap_bytes=int(value * MiB))

    def _on_profile_changed(self, profile) -> None:
        cuda = profile.target == "cuda"
        self.device.blockSignals(True)
        self.device.setCurrentIndex(max(0, self.device.findData(profile.target)))
        self.device.blockSignals(False)
        self.gpu.setEnabled(cuda)
        data = self.gpu.currentData()
        if profile.gpu and (not data or data[0] != gpus.key_for(profile.gpu)):
            # another profile's GPU: show it (and its memory as the capacity)
            key = gpus.key_for(profile.gpu)
            for i in range(self.gpu.count()):
                if (self.gpu.itemData(i) or ("",))[0] == key:
                    self.gpu.blockSignals(True)
                    self.gpu.setCurrentIndex(i)
                    self.gpu.blockSignals(False)
                    size = self.gpu.itemData(i)[1]
                    if size:
                        self._state.set_capacity(int(size), self.gpu.itemText(i))
                    break
        self.capacity.setEnabled(cuda and self.gpu.currentText() == _CUSTOM)
        self.cpu_cap.blockSignals(True)
        self.cpu_cap.setValue(profile.memory_cap_bytes / MiB)
        self.cpu_cap.blockSignals(False)
        self.cpu_cap.setEnabled(not cuda)
