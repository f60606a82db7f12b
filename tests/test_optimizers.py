"""Optimizers: the state bytes both estimators predict equal what each optimizer really holds
after its first step (the distinct storages of its state tensors), for every optimizer that runs
here; one that cannot run is a one-line refusal of the measured run while the estimate works."""

from __future__ import annotations

import pytest
import torch

from engine import optimizers
from engine.errors import BadInput
from engine.profile import Profile

RUNNABLE = [name for name in optimizers.OPTIMIZERS if not optimizers.unavailable(name)]


def _one_step(name: str, model: torch.nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizers.make_optimizer(name, params)
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return opt, params


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_equal_what_the_optimizer_holds(name, dtype):
    from engine.models import build_model

    torch.manual_seed(0)
    model = build_model(Profile(model="tiny-gpt2", target="cpu"), "cpu").to(dtype)
    opt, params = _one_step(name, model)
    held = optimizers.held_state_bytes(opt)
    predicted = optimizers.state_bytes(name, [(tuple(p.shape), p.element_size()) for p in params],
                                       cuda=False)
    assert held > 0
    assert predicted == held


@pytest.mark.parametrize("name", RUNNABLE)
def test_estimates_equal_the_measured_state(name):
    from engine.estimate import estimate
    from engine.measure import run_measure

    profile = Profile(model="tiny-gpt2", batch=2, seq=16, target="cpu", steps=2, optimizer=name)
    measured = run_measure(profile)
    held = measured.extra["optimizer_state_bytes"]
    assert held > 0
    for method in ("analytic", "traced"):
        assert estimate(profile, method=method).optimizer_state_bytes == held, method
    assert measured.trainable_params == measured.params


def test_the_states_differ_as_the_libraries_say():
    shapes = [((4096, 64), 4), ((64,), 4)]
    adamw = optimizers.state_bytes("adamw", shapes, cuda=False)
    assert adamw == 2 * 4 * (4096 * 64 + 64) + 2 * 4  # exp_avg, exp_avg_sq, the step counters
    # on CUDA the counters stay on the host and each tensor is a 512-byte block at least
    assert optimizers.state_bytes("adamw", shapes, cuda=True) == 2 * 4 * 4096 * 64 + 2 * 512
    assert optimizers.state_bytes("sgd", shapes, cuda=False) == 4 * (4096 * 64 + 64)
    eight = optimizers.state_bytes("adamw-8bit", shapes, cuda=False)
    # uint8 states + fp32 absmax per 256 for the matrix, fp32 states for the small bias, two maps
    assert eight == 2 * 4096 * 64 + 2 * 4 * 1024 + 2 * 4 * 64 + 2 * 1024
    paged = optimizers.state_bytes("paged-adamw-8bit", [((1024, 1024), 2)], cuda=True)
    assert paged == 2 * 4 * 4096 + 2 * 1024  # the 1 MiB uint8 states are CUDA managed memory
    assert optimizers.managed_bytes("paged-adamw-8bit", [((1024, 1024), 2)], cuda=True) == 2 << 20
    # Adafactor factors a matrix: a row and a column vector (fp32), plus the RMS scalar
    assert optimizers.state_bytes("adafactor", [((300, 200), 2)], cuda=False) == (300 + 200) * 4 + 4


def test_a_missing_library_is_one_line_and_the_estimate_still_works(monkeypatch):
    from engine.estimate import estimate
    from engine.measure import run_measure

    monkeypatch.setattr(optimizers, "bitsandbytes_missing",
                        lambda quick=False: "bitsandbytes is not installed here (No module named "
                                            "'bitsandbytes')")
    profile = Profile(model="tiny-gpt2", batch=1, seq=8, target="cpu", optimizer="adamw-8bit")
    assert estimate(profile, method="analytic").optimizer_state_bytes > 0
    with pytest.raises(BadInput) as err:
        run_measure(profile)
    assert "needs bitsandbytes" in str(err.value) and "\n" not in str(err.value)
