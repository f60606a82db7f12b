"""The app's model: the profiles, the selected one, its latest estimate and measured run.

Views take an ``AppState`` in their constructor, read from it, listen to its ``*_changed`` signals and
change it only through its methods. Profiles are autosaved (debounced) as JSON files in the
settings folder and come back on the next start, each with its measured run (a local run or one
imported from another machine: ``import_measurement``), kept beside it in ``measurements/``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from app.settings import make_settings, profiles_dir, settings_dir
from engine import profile as profile_mod
from engine.errors import BadInput
from engine.profile import Profile

GiB = 1024**3

DEFAULT_CAPACITY = 24 * GiB
#: The target panel's GPU before any is chosen or detected (a catalog key, engine.gpus).
DEFAULT_GPU = "rtx4090"
MAX_RECENT_FILES = 10


def system_memory_bytes() -> int:
    """This machine's RAM in bytes (0 when it cannot be read)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil missing or restricted: no RAM line
        pass
    try:
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def default_profile() -> Profile:
    """What `headroom` opens with: GPT-2 on the built-in sample, training for a 24 GiB GPU."""
    return Profile(name="gpt2 default", model="gpt2", target="cuda", batch=8, seq=512)


@dataclass
class ProfileEntry:
    profile: Profile
    estimate: Any = None  # EstimateResult of ``estimate_for`` (the profile before an edit, until re-estimated)
    estimate_for: Any = None  # the Profile ``estimate`` was computed for
    measured: Any = None  # MeasureResult of exactly this profile, or None
    measure_error: str = ""  # why the last run of this profile failed


def measurements_dir() -> Path:
    path = settings_dir() / "measurements"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "profile"


class AppState(QObject):
    profiles_changed = Signal()  # entries added, removed or renamed
    profile_renamed = Signal(str, str)  # old name, new name (before profiles_changed)
    current_changed = Signal(int)  # another profile was selected
    profile_changed = Signal(object)  # the selected profile's fields changed (the new Profile)
    estimate_changed = Signal(object)  # the selected profile's estimate (EstimateResult | None)
    measured_changed = Signal(object)  # the selected profile's measured run (MeasureResult | None)
    capacity_changed = Signal(object)  # GPU capacity in bytes (a Python int: above 2**31)
    message_changed = Signal(str, str)  # level ("info" | "warning" | "error" | ""), text
    recent_files_changed = Signal()  # the File → Open Recent list changed

    def __init__(self, profiles: list[Profile] | None = None, autosave: bool = True,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._settings = make_settings()
        self._autosave = autosave
        self._save_timer = QTimer(self)
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(400)
        self._save_timer.timeout.connect(self.save_all)
        if profiles is None:
            profiles = self._load_autosaved() if autosave else []
        if not profiles:
            profiles = [default_profile()]
        self._entries = [ProfileEntry(p) for p in self._unique(profiles)]
        if autosave:
            self._load_measurements()
        self._current = 0
        last = self._settings.value("profiles/current", "")
        for i, e in enumerate(self._entries):
            if e.profile.name == last:
                self._current = i
        self._capacity = int(self._settings.value("target/capacity_bytes", DEFAULT_CAPACITY))
        self._gpu_name = str(self._settings.value("target/gpu_name", ""))

    # ----- reading ------------------------------------------------------------------------
    @property
    def entries(self) -> list[ProfileEntry]:
        return list(self._entries)

    @property
    def current_index(self) -> int:
        return self._current

    @property
    def current(self) -> ProfileEntry:
        return self._entries[self._current]

    @property
    def profile(self) -> Profile:
        return self.current.profile

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def gpu_name(self) -> str:
        return self._gpu_name

    @property
    def settings(self):
        return self._settings

    def names(self) -> list[str]:
        return [e.profile.name for e in self._entries]

    # ----- changing -----------------------------------------------------------------------
    def update(self, **changes: Any) -> bool:
        """Change fields of the selected profile; a BadInput goes to the status area."""
        old = self.profile
        try:
            new = old.replace(**changes)
        except BadInput as exc:
            self.message_changed.emit("error", str(exc))
            return False
        if new == old:
            return True
        entry = self.current
        entry.profile = new
        if {k for k in changes if getattr(old, k) != getattr(new, k)} - {"name"}:
            entry.measured, entry.measure_error = None, ""
            self.measured_changed.emit(None)
        self.message_changed.emit("", "")
        if new.name != old.name:
            self.profile_renamed.emit(old.name, new.name)
            self.profiles_changed.emit()
        self.profile_changed.emit(new)
        self._schedule_save()
        return True

    def select(self, index: int) -> None:
        if 0 <= index < len(self._entries) and index != self._current:
            self._current = index
            self._settings.setValue("profiles/current", self.profile.name)
            self.current_changed.emit(index)
            self.profile_changed.emit(self.profile)
            self.estimate_changed.emit(self.current.estimate)
            self.measured_changed.emit(self.current.measured)

    def add(self, profile: Profile, select: bool = True) -> int:
        profile = profile.replace(name=self._unique_name(profile.name))
        self._entries.append(ProfileEntry(profile))
        self.profiles_changed.emit()
        self._schedule_save()
        if select:
            self.select(len(self._entries) - 1)
        return len(self._entries) - 1

    def new_profile(self) -> int:
        return self.add(default_profile().replace(name="new profile"))

    def duplicate(self, index: int | None = None) -> int:
        index = self._current if index is None else index
        source = self._entries[index].profile
        return self.add(source.replace(name=f"{source.name} copy"))

    def rename(self, index: int, name: str) -> bool:
        name = name.strip()
        if not name:
            self.message_changed.emit("error", "a profile needs a name")
            return False
        if name in self.names() and self._entries[index].profile.name != name:
            self.message_changed.emit("error", f"there is already a profile named {name!r}")
            return False
        entry = self._entries[index]
        old_name = entry.profile.name
        entry.profile = entry.profile.replace(name=name)
        if old_name != name:
            self.profile_renamed.emit(old_name, name)
        self.profiles_changed.emit()
        if index == self._current:
            self.profile_changed.emit(entry.profile)
        self._schedule_save()
        return True

    def delete(self, index: int) -> None:
        if len(self._entries) <= 1:
            self.message_changed.emit("warning", "the last profile cannot be deleted")
            return
        del self._entries[index]
        if self._current >= len(self._entries) or index < self._current:
            self._current = max(0, self._current - 1)
        self.profiles_changed.emit()
        # the selection moved (or its row index did): every view shows the now-current profile
        self.current_changed.emit(self._current)
        self.profile_changed.emit(self.profile)
        self.estimate_changed.emit(self.current.estimate)
        self.measured_changed.emit(self.current.measured)
        self._schedule_save()

    def load_file(self, path: str | Path) -> int:
        """Load a profile JSON as a new entry (BadInput for a bad file, shown by the caller)."""
        index = self.add(profile_mod.load(path))
        self.remember_file("profile", path)
        return index

    def save_file(self, path: str | Path, index: int | None = None) -> None:
        profile = self._entries[self._current if index is None else index].profile
        profile_mod.save(profile, path)
        self.remember_file("profile", path)

    def set_estimate(self, profile: Profile, result: Any) -> None:
        """Attach an estimate to the entry whose profile is exactly ``profile`` (else drop it)."""
        for entry in self._entries:
            if entry.profile == profile:
                entry.estimate, entry.estimate_for = result, profile
                if entry is self.current:
                    self.estimate_changed.emit(result)

    def set_measured(self, profile: Profile, result: Any, error: str = "") -> None:
        for entry in self._entries:
            if entry.profile == profile:
                entry.measured, entry.measure_error = result, error
                if entry is self.current:
                    self.measured_changed.emit(result)
        self._schedule_save()  # measurements are kept with their profiles

    def import_measurement(self, path: str | Path) -> bool:
        """Attach a measurement made elsewhere (``headroom measure --json``, an exported script's
        last JSON line) to the selected profile, drawn like a local run. Refused, with a one-line
        message saying what differs, unless its settings are the profile's; nothing changes then."""
        from engine.measurement_file import differences, read_measurement

        path = Path(path)
        try:
            result, settings = read_measurement(path)
        except BadInput as exc:
            self.message_changed.emit("error", f"Cannot import {path.name}: {exc}")
            return False
        entry = self.current
        diff = differences(entry.profile, settings, result)
        if diff:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            self.message_changed.emit("error", f"Not imported: {path.name} is not a run of profile "
                                               f"{entry.profile.name!r} ({shown})")
            return False
        where = result.device_name or result.device or "another machine"
        result = dataclasses.replace(
            result, notes=tuple(result.notes) + (f"imported from {path.name} (run on {where})",),
            extra={**result.extra, "imported_from": str(path)})
        self.set_measured(entry.profile, result)
        self.message_changed.emit("info", f"Imported the run on {where} from {path.name} onto profile "
                                          f"{entry.profile.name!r}")
        return True

    def capacity_for(self, profile: Profile | None = None) -> tuple[int, str]:
        """(bytes, label) the estimate of ``profile`` is drawn against.

        A CUDA profile: the chosen GPU. A CPU profile: its simulated capacity (``memory_cap_bytes``,
        which a CPU run enforces) or else this machine's RAM.
        """
        profile = profile or self.profile
        if profile.target == "cpu":
            if profile.memory_cap_bytes:
                return profile.memory_cap_bytes, "simulated capacity"
            ram = system_memory_bytes()
            return (ram, "this machine's RAM") if ram else (self._capacity, self._gpu_name)
        return self._capacity, self._gpu_name

    # ----- recent files (profiles and datasets), kept in QSettings ------------------------------
    def recent_files(self) -> list[tuple[str, str]]:
        """[(kind, path)], newest first; kind is "profile" or "dataset"."""
        raw = self._settings.value("recent/files", "[]")
        try:
            items = json.loads(raw) if isinstance(raw, str) else []
        except ValueError:
            items = []
        return [(k, p) for k, p in (tuple(x) for x in items if isinstance(x, list) and len(x) == 2)
                if k in ("profile", "dataset") and isinstance(p, str)][:MAX_RECENT_FILES]

    def remember_file(self, kind: str, path: str | Path) -> None:
        path = str(Path(path).resolve())
        items = [(kind, path)] + [x for x in self.recent_files() if x != (kind, path)]
        self._settings.setValue("recent/files", json.dumps([list(x) for x in items[:MAX_RECENT_FILES]]))
        self.recent_files_changed.emit()

    def forget_file(self, kind: str, path: str) -> None:
        items = [x for x in self.recent_files() if x != (kind, path)]
        self._settings.setValue("recent/files", json.dumps([list(x) for x in items]))
        self.recent_files_changed.emit()

    def set_capacity(self, capacity_bytes: int, gpu_name: str) -> None:
        if capacity_bytes != self._capacity or gpu_name != self._gpu_name:
            self._capacity, self._gpu_name = int(capacity_bytes), gpu_name
            self._settings.setValue("target/capacity_bytes", self._capacity)
            self._settings.setValue("target/gpu_name", gpu_name)
            self.capacity_changed.emit(self._capacity)

    def show_message(self, level: str, text: str) -> None:
        self.message_changed.emit(level, text)

    # ----- persistence --------------------------------------------------------------------
    def _schedule_save(self) -> None:
        if self._autosave:
            self._save_timer.start()

    def save_all(self) -> None:
        """Write every profile to the autosave folder (atomic per file), drop files of deleted ones."""
        if not self._autosave:
            return
        folder = profiles_dir()
        keep = set()
        order = []
        for i, entry in enumerate(self._entries):
            fname = f"{i:03d}-{_slug(entry.profile.name)}.json"
            profile_mod.save(entry.profile, folder / fname)
            keep.add(fname)
            order.append(entry.profile.name)
        for old in folder.glob("*.json"):
            if old.name not in keep:
                old.unlink(missing_ok=True)
        self._save_measurements()
        self._settings.setValue("profiles/last", json.dumps(order))
        self._settings.setValue("profiles/current", self.profile.name)
        self._settings.sync()

    def _save_measurements(self) -> None:
        """Each profile's measured run beside it (atomic per file), as {"profile", "measured"}."""
        from engine.profile import atomic_write_text

        folder = measurements_dir()
        keep = set()
        for i, entry in enumerate(self._entries):
            if entry.measured is None:
                continue
            fname = f"{i:03d}-{_slug(entry.profile.name)}.json"
            record = {"profile": entry.profile.to_dict(), "measured": entry.measured.to_dict()}
            atomic_write_text(folder / fname, json.dumps(record, default=str))
            keep.add(fname)
        for old in folder.glob("*.json"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def _load_measurements(self) -> None:
        """Give each autosaved profile back the measured run saved with it (exactly its settings)."""
        from engine import safe_json
        from engine.results import MeasureResult

        for path in sorted(measurements_dir().glob("*.json")):
            try:
                record = safe_json.load_file(path, "saved measurement", max_bytes=16 << 20)
                profile = profile_mod.from_dict(record["profile"])
                measured = MeasureResult.from_dict(record["measured"])
            except (BadInput, KeyError, TypeError, ValueError):
                continue  # a damaged file is skipped, not fatal
            for entry in self._entries:
                if entry.profile == profile and entry.measured is None:
                    entry.measured = measured
                    break

    def _load_autosaved(self) -> list[Profile]:
        out = []
        for path in sorted(profiles_dir().glob("*.json")):
            try:
                out.append(profile_mod.load(path))
            except BadInput:
                continue  # a damaged autosave file is skipped, not fatal
        return out

    def _unique(self, profiles: list[Profile]) -> list[Profile]:
        seen: set[str] = set()
        out = []
        for p in profiles:
            name, n = p.name, 2
            while name in seen:
                name, n = f"{p.name} ({n})", n + 1
            seen.add(name)
            out.append(p if name == p.name else p.replace(name=name))
        return out

    def _unique_name(self, name: str) -> str:
        names = set(self.names())
        if name not in names:
            return name
        n = 2
        while f"{name} {n}" in names:
            n += 1
        return f"{name} {n}"
