"""Notes an estimate adds when a switched-on technique changes nothing for this profile.

Each rule is a fact of the profile and its model that the estimators already know: the user
asked for a technique, and the estimate should say so rather than show identical bars in silence.
"""

from __future__ import annotations

from engine.profile import Profile


def no_effect_notes(profile: Profile, shapes: list[tuple[int, int]]) -> list[str]:
    """One line per technique that has no effect on this profile (``shapes``: the (B, T) batch
    shapes the estimate considered)."""
    notes: list[str] = []
    if profile.mlp == "geglu":
        from engine.estimate.analytic import arch_of

        if arch_of(profile.replace(mlp="default")).gated:
            notes.append(f"GeGLU: {profile.model}'s feed-forward is already gated; only its activation "
                         "changes (SiLU to GELU): shapes and memory are unchanged")
    if profile.ffn_chunks > 1 and profile.mode == "train" and not profile.checkpointing:
        notes.append(f"feed-forward chunks ({profile.ffn_chunks}) in training without checkpointing: "
                     "autograd still keeps every chunk's intermediates for backward, so activations "
                     "are unchanged (at most one chunk's temporaries are saved)")
    window = profile.local_window
    longest = max((t for _b, t in shapes), default=0)
    if profile.mode != "train" and profile.chunk_input:
        longest = min(longest, profile.chunk_input)  # inference sees one window at a time
    if window and longest and window >= longest:
        notes.append(f"local attention window {window} is at least the longest batch ({longest} tokens): "
                     "every token sees the whole sequence, as with dense attention; nothing is saved")
    return notes
