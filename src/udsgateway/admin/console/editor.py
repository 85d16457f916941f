"""The flow editor's own checks: what the form must have before a flow is saved.

Everything the editor reads or writes goes through the operations facade
(``admin.operations.Operations``: the catalogue, the preview, the save); this
module only turns a form's flow into problems an editor can show beside each
action, with the template line (the facade's ``save_flow`` runs the checks of
``flows import`` again, for every caller).
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import frozen

from udsgateway.flows import Flow, Trigger
from udsgateway.mapping.checks import action_problems

#: The trigger types offered first in the flow editor (any other may be typed).
FIRST_CLASS_TYPES = ("ADT^A04", "ADT^A08", "SIU^S12", "SIU^S14", "SIU^S15")


@frozen
class Problem:
    """A problem found when checking a flow: where, which template line, what."""

    where: str
    line: int | None
    message: str


def check(app_variables: Mapping[str, str], flow: Flow) -> list[Problem]:
    """The checks of ``flows import``, per action, with template lines, and what the
    form must have (names, a port, the message types)."""
    problems: list[Problem] = []
    if not flow.name.strip():
        problems.append(Problem("flow name", None, "a flow needs a name"))
    if not flow.trigger.message_type.strip():
        problems.append(Problem("trigger", None, "pick the trigger's message type"))
    if flow.actions and not flow.trigger.sample.strip():
        problems.append(Problem("sample", None, "paste a sample to check the templates"))
        return problems
    for step, action in enumerate(flow.actions):
        where = f"action {step + 1} ({action.name})"
        if not action.name.strip():
            problems.append(Problem(where, None, "an action needs a name"))
        if not action.host.strip() or not 0 < action.port < 65536:
            problems.append(Problem(where, None, "host and a port from 1 to 65535"))
        if not action.message_type.strip():
            problems.append(Problem(where, None, "the outbound message type is required"))
    if any(not action.message_type.strip() for action in flow.actions):
        return problems
    for step, found in action_problems(flow, app_variables):
        where = f"action {step + 1} ({flow.actions[step].name})"
        problems.append(Problem(where, found.line, found.message))
    return problems


def new_flow(message_type: str = "SIU^S12") -> Flow:
    """An empty flow for the editor."""
    return Flow(name="", trigger=Trigger(message_type=message_type))
