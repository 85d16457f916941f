"""What a framer emits: a frame, an oversized frame, or an overflow.

Plain classes of their own, apart from the framers (:mod:`udsgateway.wire.framing`, which
re-exports them) and from their interface (:mod:`udsgateway.wire.iframer`, which names them),
so that neither of those two imports the other.
"""

from __future__ import annotations

from typing import TypeAlias

from attrs import frozen

__all__ = ["Frame", "FrameEvent", "FrameOverflow", "OversizedFrame"]


@frozen
class Frame:
    """One complete message: the bytes exactly as received between the delimiters."""

    payload: bytes


@frozen
class OversizedFrame:
    """A complete frame larger than the maximum size; it was not buffered.

    ``head`` holds its first bytes (at most ``framing.HEAD_SIZE`` and at most the
    maximum frame size) so the caller can read MSH and answer NAK 104;
    ``size`` is the full size of the message.
    """

    head: bytes
    size: int


@frozen
class FrameOverflow:
    """Fatal: a frame grew past the drain limit without ending.

    ``size`` is how many bytes of the frame had arrived when this was noticed
    (more than the drain limit). The caller must close the connection; the
    framer ignores any further input.
    """

    size: int


FrameEvent: TypeAlias = Frame | OversizedFrame | FrameOverflow
