"""headroom calibrate: a one-line refusal without CUDA; a device entry the estimators then use."""

from __future__ import annotations

import json

import pytest

from _cli import run_cli
from engine.estimate import device, estimate

MiB = 1 << 20


def _entry(**changes):
    entry = {"name": "testgpu", "device_name": "Test GPU", "context_bytes": 900 * MiB,
             "cublas_workspace_bytes": 16 * MiB, "workspace_handles_train": 2, "workspace_handles_infer": 1,
             "expandable_small_page": 2 * MiB, "expandable_large_page": 20 * MiB,
             "capacity_bytes": 48 * 1024 * MiB, "context_train_extra_bytes": 100 * MiB,
             "context_half_bytes": 10 * MiB}
    entry.update(changes)
    return entry


def test_without_cuda_calibrate_is_one_line_and_exit_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run_cli(["calibrate", "--json"])
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "calibrate needs a CUDA GPU" in err


def test_an_entry_in_the_devices_folder_is_what_the_estimate_uses(tmp_path):
    from engine.calibrate import devices_dir, write_entry
    from engine.profile import Profile

    path = write_entry(_entry(name="l4"))
    assert path == devices_dir() / "l4.json" and str(tmp_path) in str(path)  # the test's config dir
    base = dict(model="tiny-gpt2", target="cuda", batch=2, seq=32, gpu="l4")
    for mode, precision, context in (("train", "fp32", 1000 * MiB), ("infer", "fp32", 900 * MiB),
                                     ("train", "bf16-amp", 1020 * MiB)):
        r = estimate(Profile(**base, mode=mode, precision=precision), method="analytic")
        assert r.device_used_bytes - r.peak_reserved_bytes == context
    traced = estimate(Profile(**base), method="traced")
    (devices_dir() / "l4.json").unlink()  # the catalog's L4 again
    catalog = estimate(Profile(**base), method="traced")
    c = device.DEVICES["l4"]
    # the workspaces (2 x 16 MiB in the entry) are allocated through the caching allocator
    assert catalog.peak_allocated_bytes - traced.peak_allocated_bytes == 2 * (c.cublas_workspace_bytes - 16 * MiB)
    assert catalog.device_used_bytes - catalog.peak_reserved_bytes == \
        c.context_bytes + c.context_train_extra_bytes != 1000 * MiB


def test_a_damaged_or_foreign_entry_leaves_the_catalog_constants(tmp_path):
    from engine.calibrate import devices_dir

    devices_dir().mkdir(parents=True, exist_ok=True)
    (devices_dir() / "h200.json").write_text("{not json")
    (devices_dir() / "l4.json").write_text(json.dumps(_entry(context_bytes="lots")))
    assert device.constants("cuda", "h200") == device.DEVICES["h200"]
    assert device.constants("cuda", "l4") == device.DEVICES["l4"]
    (devices_dir() / "h200.json").write_text(json.dumps(_entry(name="h200")))
    assert device.constants("cuda", "h200").context_bytes == 900 * MiB
    assert device.constants("cpu", "h200") == device.DEVICES["cpu"]


def test_the_entry_is_named_by_the_gpu_catalog():
    from engine.calibrate import entry_name

    assert entry_name("NVIDIA H200", 150_000_000_000) == "h200"
    assert entry_name("NVIDIA Foo 9000") == "nvidia-foo-9000"


@pytest.mark.gpu
def test_calibrate_on_this_gpu_writes_an_entry(tmp_path):
    out = tmp_path / "gpu.json"
    code, stdout, err = run_cli(["calibrate", "--json", "--output", out])
    assert code == 0, err
    entry = json.loads(out.read_text())
    assert json.loads(stdout.strip().splitlines()[-1])["output"] == str(out)
    assert 100 * MiB < entry["context_bytes"] < 4096 * MiB
    assert entry["cublas_workspace_bytes"] > 0 and entry["workspace_handles_train"] in (1, 2)
    assert entry["capacity_bytes"] > 1024 * MiB
