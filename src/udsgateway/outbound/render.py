"""One action's outbound body, rendered from its trigger: the executor's render.

The executor renders every action through ``render_action``, and so does
``udsgateway flows render``: both read the trigger message the way the
gateway reads what a sender sent (its MSH-18, else the tenant's
``default_charset``), both hand the earlier actions' responses to the
template the same way (an unreadable or missing response is an empty one),
and both encode the result by its MSH-18, else the tenant's charset. So the
command line shows the bytes a destination would get.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime

from udsgateway.flows import App, Flow
from udsgateway.hl7.header import codec_for
from udsgateway.hl7.message import Message, MessageParseError, parse_message
from udsgateway.mapping.templating import (
    ActionResponse,
    RenderError,
    Template,
    TemplateData,
    render_body,
)

#: Segment separators a hand-written message may use (the gateway stores CR).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def read_trigger(raw: bytes, charset: str) -> Message:
    """The trigger message, parsed whole, decoded by its MSH-18, else ``charset``.

    Raises ``RenderError`` when the message cannot be read.
    """
    try:
        return parse_message(raw, default_charset=charset)
    except MessageParseError as error:
        raise RenderError(f"trigger message unreadable: {error.reason}") from None


def sender_bytes(text: str, charset: str) -> bytes:
    """A message written as text (a flow's sample), as a sender would send it.

    Segments end with CR; the bytes are encoded by the message's MSH-18, else
    ``charset`` (the tenant's ``default_charset`` codec). Raises ``RenderError``
    when MSH-18 names an unknown character set or the text does not fit in it.
    """
    lines = [line for line in _LINE_BREAK.split(text.lstrip("\ufeff")) if line.strip()]
    declared = ""
    if lines and lines[0].startswith("MSH") and len(lines[0]) > 3:
        fields = lines[0].split(lines[0][3])
        if len(fields) > 17:
            declared = fields[17]
            if len(fields[1]) > 1:
                declared = declared.split(fields[1][1])[0]  # first repetition
    codec = codec_for(declared, charset)
    if codec is None:
        raise RenderError("MSH-18 names a character set we do not know")
    try:
        return "".join(line + "\r" for line in lines).encode(codec)
    except UnicodeEncodeError as error:
        raise RenderError(
            f"the message has characters that {codec} cannot encode (at character {error.start})"
        ) from None


def read_responses(flow: Flow, responses: Sequence[bytes | None]) -> tuple[ActionResponse, ...]:
    """The earlier actions' responses as templates see them, one per earlier action.

    A response missing, empty or unreadable is given to the template as none
    (its fields render empty). Responses are read as Latin-1 unless their MSH-18
    says otherwise: a destination's reply is never decoded with a sender's charset.
    """
    parsed = []
    for index, response in enumerate(responses):
        reply = None
        if response:
            try:
                reply = parse_message(response, default_charset="latin-1")
            except MessageParseError:
                reply = None
        parsed.append(ActionResponse(flow.actions[index].name, reply))
    return tuple(parsed)


def render_action(
    app: App,
    flow: Flow,
    step: int,
    template: Template,
    trigger: Message,
    raw: bytes,
    responses: Sequence[bytes | None],
    *,
    charset: str,
    now: Callable[[], datetime],
    new_control_id: Callable[[], str],
) -> bytes:
    """The body of action ``step`` of ``flow`` for the trigger ``raw`` (parsed: ``trigger``).

    ``responses`` are the earlier actions' responses, in order (None: none yet).
    ``charset`` is the tenant's codec for messages without MSH-18. Raises
    ``RenderError`` when the action cannot be rendered.
    """
    action = flow.actions[step]
    data = TemplateData(trigger, read_responses(flow, responses), dict(app.variables))
    return render_body(
        template,
        data,
        message_type=action.message_type,
        now=now,
        new_control_id=new_control_id,
        default_charset=charset,
        raw=raw,
    )
