"""Placeholder replaced below."""
from engine.profile import Profile, dumps


def export_profile_json(profile: Profile) -> str:
    return dumps(profile)


def export_summary_markdown(profile, estimate=None, measured=None) -> str:
    return ""
