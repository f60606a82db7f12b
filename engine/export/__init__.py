"""Export: a profile as a standalone script (torch + transformers only), as JSON, as a summary.

    text = export_script(profile)                  # python train.py --steps 3 --device cuda
    text = export_profile_json(profile)            # the profile file itself
    text = export_summary_markdown(profile, estimate, measured)
"""

from engine.export.script import export_script
from engine.export.summary import export_profile_json, export_summary_markdown

__all__ = ["export_profile_json", "export_script", "export_summary_markdown"]
