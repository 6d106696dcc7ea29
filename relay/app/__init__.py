"""The composition root: one relay process built from its config (:class:`Relay`)."""

from relay.app.media import key_ring
from relay.app.process import Relay, stop_signals

__all__ = ["Relay", "key_ring", "stop_signals"]
