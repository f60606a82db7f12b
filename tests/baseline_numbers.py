"""The estimate and CPU-measure numbers of a dozen varied profiles, for the refactor guard.

``python tests/baseline_numbers.py`` rewrites ``tests/data/baseline_numbers.json``;
``tests/test_baseline_numbers.py`` recomputes every entry and asserts identity. Only deterministic
fields are kept: bytes, breakdowns, parameter and token counts, shapes, phases (never timings,
RSS or notes, whose wording may improve).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent / "data" / "baseline_numbers.json"

#: name -> profile fields (CPU-sized: every one measures in well under a second).
PROFILES: dict[str, dict] = {
    "gpt2-train-fp32": dict(model="tiny-gpt2", batch=2, seq=32),
    "gpt2-train-bf16amp-ckpt": dict(model="tiny-gpt2", batch=2, seq=32, precision="bf16-amp",
                                    checkpointing=True, optimizer="sgd"),
    "llama-train-ckpt-every2": dict(model="tiny-llama", batch=2, seq=32, checkpointing=True,
                                    checkpoint_every=2),
    "llama-infer-local": dict(model="tiny-llama", mode="infer", batch=2, seq=64, attn="local:16"),
    "gpt2-train-prune-unstructured": dict(model="tiny-gpt2", batch=2, seq=32, prune="unstructured:0.5"),
    "llama-train-prune-heads": dict(model="tiny-llama", batch=2, seq=32, prune="heads:0.5"),
    "bert-train-prune-ffn": dict(model="tiny-bert", batch=2, seq=32, prune="ffn:0.5"),
    "gpt2-train-geglu": dict(model="tiny-gpt2", batch=2, seq=32, mlp="geglu"),
    "bert-infer-ffn-chunks": dict(model="tiny-bert", mode="infer", batch=2, seq=64, ffn_chunks=4),
    "gpt2-train-distill": dict(model="tiny-gpt2", batch=2, seq=32, distill_from="tiny-gpt2"),
    "llama-train-micro": dict(model="tiny-llama", batch=4, seq=32, micro_batches=2),
    "gpt2-train-dynamic": dict(model="tiny-gpt2", batch=4, seq=64, padding="dynamic"),
    "bert-train-bucketed": dict(model="tiny-bert", batch=4, seq=64, padding="bucketed", pad_multiple=8),
    "gpt2-train-token-budget": dict(model="tiny-gpt2", batch=4, seq=64, padding="token-budget",
                                    max_tokens=128),
    "gpt2-infer-chunk-input": dict(model="tiny-gpt2", mode="infer", batch=1, seq=256, chunk_input=64),
    "llama-train-pool": dict(model="tiny-llama", batch=2, seq=32, alloc="pool:64MiB",
                             alloc_max_split="256MiB"),
    "bert-train-expandable-cuda": dict(model="tiny-bert", batch=2, seq=32, alloc="expandable"),
}

#: Profiles measured on CPU too (all of them; the cuda-targeted one is estimate-only).
ESTIMATE_ONLY = {"bert-train-expandable-cuda"}


def _estimate_numbers(result) -> dict:
    d = result.to_dict()
    return {"method": d["method"], "peak_allocated_bytes": d["peak_allocated_bytes"],
            "peak_reserved_bytes": d["peak_reserved_bytes"],
            "device_used_bytes": d["device_used_bytes"], "breakdown": d["breakdown"],
            "params": d["params"], "peak_batch_shape": list(d["peak_batch_shape"]),
            "peak_phase": d["peak_phase"],
            "layers": [[x["name"], x["params"], x["weight_bytes"], x["activation_bytes"]]
                       for x in d["layers"]]}


def _measure_numbers(result) -> dict:
    return {"peak_allocated_bytes": result.peak_allocated_bytes, "breakdown": dict(result.breakdown),
            "params": result.params, "real_tokens": result.real_tokens,
            "padded_tokens": result.padded_tokens, "steps": result.steps, "oom": result.oom,
            "distinct_shapes": result.distinct_shapes}


def compute(name: str) -> dict:
    from engine.estimate import estimate
    from engine.measure import run_measure
    from engine.profile import Profile

    fields = PROFILES[name]
    target = "cuda" if name in ESTIMATE_ONLY else "cpu"
    profile = Profile(name=name, target=target, steps=2, **fields)
    out = {"profile": fields,
           "analytic": _estimate_numbers(estimate(profile, method="analytic")),
           "traced": _estimate_numbers(estimate(profile, method="traced"))}
    if name not in ESTIMATE_ONLY:
        out["measure"] = _measure_numbers(run_measure(profile))
    return out


def main() -> int:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    data = {name: compute(name) for name in PROFILES}
    FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE} ({len(data)} profiles)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(FIXTURE.parent.parent.parent))  # the checkout, when run as a script
    sys.exit(main())
