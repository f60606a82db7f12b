"""Chunked input (inference): long inputs processed in windows of W tokens, one by one.

The measured loop and the exported script run the forward on ``chunk_input``-token windows; the
estimators size one window's forward. A window may exceed no model position limit
(``engine.prepare`` checks the per-forward length).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from engine.techniques.base import AnalyticSetup, Control, Field, Technique

if TYPE_CHECKING:
    from engine.profile import Profile

EXPLANATION = (
    "Chunked input (inference) splits long inputs into windows of W tokens processed one by "
    "one, so the peak is that of a W-token forward whatever the input length, and inputs longer "
    "than the model's position limit can be processed. Tokens do not see context beyond their "
    "window, so outputs differ from a full-length forward."
)


def analytic_setup(p: "Profile", setup: AnalyticSetup) -> AnalyticSetup:
    """Inference: one forward sees one window of the input."""
    if p.mode == "train" or not p.chunk_input:
        return setup
    return replace(setup, tokens=min(p.chunk_input, setup.tokens))


TECHNIQUE = Technique(
    name="chunked_input",
    title="Chunking",
    group="chunking",
    order=51,
    fields=(Field("chunk_input", int, 0, "inference: process long inputs in windows of W tokens "
                  "(0 = off)", minimum=0, metavar="W", after="micro_batches", modes=("infer",),
                  mode_hint="windowed long inputs", mode_advice="for training use micro_batches",
                  label="input windows (tokens)"),),
    controls=(Control("chunk_input", "spin", "Input windows (inference)", field="chunk_input", low=0,
                      high=1 << 20, step=128, special="off", enabled_when=lambda p: p.mode == "infer"),),
    explanations={"chunked_input": EXPLANATION},
    summary_title=lambda p: "Chunked input",
    active=lambda p: p.chunk_input > 0,
    forward_tokens=lambda p: p.chunk_input,
    analytic_setup=analytic_setup,
)
