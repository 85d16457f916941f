"""The separators of an HL7 v2 message (:mod:`udsgateway.hl7.header` re-exports them).

Kept apart from the header parser because that module is compiled with mypyc, which
cannot build a class whose body names the class itself (``DEFAULT``).
"""

from __future__ import annotations

from typing import ClassVar

from attrs import frozen

__all__ = ["Delimiters"]


@frozen
class Delimiters:
    """The separators of one message, from MSH-1 and MSH-2.

    `truncation` is the fifth encoding character that HL7 2.7 added (`#`);
    it is empty for messages that declare only four.
    """

    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str
    truncation: str = ""

    DEFAULT: ClassVar[Delimiters]

    def encoding_characters(self) -> str:
        """MSH-2 as written by a sender using these delimiters."""
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


Delimiters.DEFAULT = Delimiters("|", "^", "~", "\\", "&")
