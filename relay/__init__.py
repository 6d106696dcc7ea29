"""matrix-media-relay: re-serve authenticated Matrix media through signed, revocable URLs."""

__version__ = "0.1.0"
