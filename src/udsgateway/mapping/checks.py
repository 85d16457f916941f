"""The checks `flows import` and the gateway's start run on a flow file's templates.

Each action's template is rendered against its trigger's sample (with the earlier
actions' names known for chained responses), so a broken template stops an import
or a start instead of failing later on live traffic.
"""

from __future__ import annotations

from collections.abc import Mapping

from udsgateway.flows import App, Flow
from udsgateway.mapping.templating import TemplateProblem, check_template


def action_problems(
    flow: Flow, variables: Mapping[str, object]
) -> list[tuple[int, TemplateProblem]]:
    """Each action's template checked against the flow's sample (the earlier actions'
    names known for chained responses): (action index, problem), in order."""
    found: list[tuple[int, TemplateProblem]] = []
    names: list[str] = []
    for step, action in enumerate(flow.actions):
        for problem in check_template(
            action.template,
            flow.trigger.sample,
            action.message_type,
            app=variables,
            action_names=names,
        ):
            found.append((step, problem))
        names.append(action.name)
    return found


def template_problems(path: str, app: App) -> list[str]:
    """Every template checked against its trigger's sample: flow, action and line."""
    problems = []
    for index, flow in enumerate(app.flows):
        if flow.actions and not flow.trigger.sample.strip():
            problems.append(
                f"{path}: flows[{index}] ({flow.name}): trigger.sample: required to check "
                "the action templates"
            )
            continue
        for step, problem in action_problems(flow, app.variables):
            action = flow.actions[step]
            problems.append(
                f"{path}: flows[{index}] ({flow.name}): actions[{step}] ({action.name}): "
                f"template line {problem.line}: {problem.message}"
            )
    return problems
