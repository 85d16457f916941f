"""The interface of a sans-I/O framer (:mod:`udsgateway.wire.framing` implements it).

Kept apart from the framers because they are compiled with mypyc, which cannot build a
zope ``Interface`` class; :mod:`udsgateway.wire.framing` re-exports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from udsgateway.wire.frames import FrameEvent

__all__ = ["IFramer"]


class IFramer(Interface):
    """Splits one connection's inbound byte stream into messages, without I/O."""

    frame_open = Attribute(
        "True while a partial frame is pending; the protocol arms its absolute "
        "frame timer when this becomes True."
    )
    stats = Attribute("The FramerStats counters of this framer.")
    buffered_bytes = Attribute("How many bytes the framer currently holds in memory.")

    def feed(data: bytes) -> list[FrameEvent]:  # noqa: N805
        """Take the next bytes of the stream; return the events they complete, in order."""

    def flush() -> list[FrameEvent]:
        """End of stream or idle gap: emit or discard whatever is pending."""

    def reset() -> None:
        """Discard any partial frame (after a frame timeout)."""

    def encode(payload: bytes) -> bytes:  # noqa: N805
        """Wrap an outgoing message (an ACK) in this framing."""
