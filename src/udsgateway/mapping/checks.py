"""The checks `flows import` and the gateway's start run on a flow file's templates.

Each action's template is rendered against its trigger's sample (with the earlier
actions' names known for chained responses), so a broken template stops an import
or a start instead of failing later on live traffic.
"""

from __future__ import annotations

from udsgateway.flows import App
from udsgateway.mapping.templating import check_template


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
        names: list[str] = []
        for step, action in enumerate(flow.actions):
            for problem in check_template(
                action.template,
                flow.trigger.sample,
                action.message_type,
                app=app.variables,
                action_names=names,
            ):
                problems.append(
                    f"{path}: flows[{index}] ({flow.name}): actions[{step}] ({action.name}): "
                    f"template line {problem.line}: {problem.message}"
                )
            names.append(action.name)
    return problems
