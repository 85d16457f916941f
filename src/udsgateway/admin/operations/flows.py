"""Flows: the list (what a sender needs), a flow's document, import, export, the
console's editor (save, preview), enable and disable, the variable catalogue and
renders of an action against a sample."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from attrs import evolve
from sqlalchemy import Connection
from twisted.internet.defer import Deferred, fail, succeed

from udsgateway import flowstore
from udsgateway.admin.operations.core import (
    Conflict,
    Core,
    Invalid,
    NotFound,
    OperationsError,
    as_text,
)
from udsgateway.assembly import tenant_charset
from udsgateway.flows import App, Flow, FlowFileError, app_document, parse_app, write_app
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.hl7.message import MessageParseError
from udsgateway.mapping.catalogue import variable_catalogue
from udsgateway.mapping.checks import template_problems
from udsgateway.mapping.templating import RenderError, TemplateError, compile_template
from udsgateway.outbound.render import read_trigger, render_action, sender_bytes


class FlowsOps(Core):
    """The flows as stored, their changes (audited, loaded at once) and their renders."""

    __slots__ = ()

    def _address(self, tenant: str) -> tuple[str, int]:
        live = self.addresses().get(tenant)
        if live is not None:
            return live
        config = self.tenants.get(tenant)
        return _listen_address(config.listen) if config is not None else ("", 0)

    def _flow_rows(self, apps: Sequence[App]) -> list[dict[str, Any]]:
        rows = []
        for app in apps:
            host, port = self._address(app.tenant)
            for flow in app.flows:
                rows.append(
                    {
                        "host": host,
                        "port": port,
                        "app_id": app.app_id,
                        "flow_id": flow.flow_id,
                        "tenant": app.tenant,
                        "app": app.name,
                        "name": flow.name,
                        "message_type": flow.trigger.message_type,
                        "connection": flow.trigger.connection,
                        "enabled": flow.enabled,
                        "actions": len(flow.actions),
                    }
                )
        return rows

    def flows(
        self, actor: str, via: str, tenant: str | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """Every flow: Host, Port (where a sender connects), App ID, Flow ID, tenant, name,
        message type, connection, enabled, number of actions."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        done: Deferred[Any] = self._read(flowstore.load_apps, tenant)
        done.addCallback(self._flow_rows)
        return done

    def _find_flow(self, connection: Connection, flow_id: str) -> tuple[App, Flow]:
        for app in flowstore.load_apps(connection, None):
            for flow in app.flows:
                if flow.flow_id == flow_id:
                    return app, flow
        raise NotFound(f"no flow {flow_id}")

    def flow(self, actor: str, via: str, flow_id: str) -> Deferred[dict[str, Any]]:
        """One flow as its flow file has it (trigger, actions with templates), with its
        app's ID, name and tenant, and Host and Port."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def work(connection: Connection) -> dict[str, Any]:
            app, flow = self._find_flow(connection, flow_id)
            [document] = [f for f in app_document(app)["flows"] if f["flow_id"] == flow.flow_id]
            host, port = self._address(app.tenant)
            return {
                **document,
                "app_id": app.app_id,
                "app": app.name,
                "tenant": app.tenant,
                "host": host,
                "port": port,
            }

        return self._read(work)

    def _checked_app(self, text: str, name: str) -> tuple[App | None, list[str]]:
        """The app of a flow document and every problem ``flows import`` would find."""
        try:
            app = parse_app(text, name)
        except FlowFileError as error:
            return None, list(error.problems)
        if self.tenants and app.tenant not in self.tenants:
            return app, [f"{name}: tenant: {app.tenant!r} is not configured"]
        return app, template_problems(name, app)

    def validate_flows(self, actor: str, via: str, text: str) -> Deferred[dict[str, Any]]:
        """Check a flow document (the TOML of a flow file) as ``flows import`` does,
        without saving: ``{"valid": bool, "problems": [...]}``."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        _app, problems = self._checked_app(text, "<document>")
        return succeed({"valid": not problems, "problems": problems})

    def import_flows(self, actor: str, via: str, text: str) -> Deferred[list[dict[str, Any]]]:
        """Save a flow document (the same checks as ``flows import``; Invalid with every
        problem). Returns what a sender needs per flow: Host, Port, App ID, Flow ID.
        The running gateway routes by it as soon as this answers."""
        app, problems = self._checked_app(text, "<document>")
        target = f"app {app.app_id or app.name}" if app is not None else "app (unreadable)"

        def work(connection: Connection) -> list[App]:
            if problems or app is None:
                raise Invalid("; ".join(problems))
            try:
                return [flowstore.save_app(connection, app, self.wall())]
            except ValueError as error:
                raise Conflict(str(error)) from None

        done: Deferred[Any] = self._audited(actor, via, "flows.import", target, "", work)
        done.addCallback(self._reloaded)
        done.addCallback(self._flow_rows)
        return done

    def _reloaded(self, result: Any) -> Deferred[Any]:
        """``result`` once the running gateway took the changed flows."""
        if self.reload_flows is None:
            return succeed(result)
        reloading = self.reload_flows()
        reloading.addCallback(lambda _: result)
        return reloading

    def export_flows(self, actor: str, via: str, app_id: str) -> Deferred[dict[str, Any]]:
        """An app as the text of its flow file: ``{"app_id", "text"}``."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def work(connection: Connection) -> dict[str, Any]:
            for app in flowstore.load_apps(connection, None):
                if app.app_id == app_id:
                    return {"app_id": app_id, "text": write_app(app)}
            raise NotFound(f"no app {app_id}")

        return self._read(work)

    def apps(
        self, actor: str, via: str, tenant: str | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """Every app as its flow file has it (its flows with trigger, sample and actions),
        with the Host and Port its senders connect to."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        done: Deferred[Any] = self._read(flowstore.load_apps, tenant)
        done.addCallback(lambda apps: [self._app_view(app) for app in apps])
        return done

    def _app_view(self, app: App) -> dict[str, Any]:
        host, port = self._address(app.tenant)
        return {**app_document(app), "host": host, "port": port}

    def save_flow(self, actor: str, via: str, app: App, flow: Flow) -> Deferred[dict[str, Any]]:
        """Save one flow (the console's editor): into the stored app ``app.app_id`` (its
        other flows kept), or a new app (no App ID); the flow replaces the one of its
        Flow ID, or is added (none). The checks of ``flows import`` (Invalid with every
        problem). Answers Host, Port, App ID, Flow ID and the saved ``app``; the
        running gateway routes by it as soon as this answers."""

        def work(connection: Connection) -> tuple[App, Flow]:
            stored = {a.app_id: a for a in flowstore.load_apps(connection, None)}
            base = stored.get(app.app_id, evolve(app, flows=())) if app.app_id else app
            if base.tenant != app.tenant and app.app_id:
                raise Conflict(f"app {app.app_id} belongs to tenant {base.tenant}")
            flows = list(base.flows) if app.app_id else []
            places = [i for i, f in enumerate(flows) if flow.flow_id and f.flow_id == flow.flow_id]
            if places:
                flows[places[0]] = flow
            else:
                flows.append(flow)
            merged = evolve(base, flows=tuple(flows))
            if self.tenants and merged.tenant not in self.tenants:
                raise Invalid(f"tenant: {merged.tenant!r} is not configured")
            problems = template_problems(f"app {merged.app_id or merged.name}", merged)
            if problems:
                raise Invalid("; ".join(problems))
            try:
                saved = flowstore.save_app(connection, merged, self.wall())
            except ValueError as error:
                raise Conflict(str(error)) from None
            index = places[0] if places else len(flows) - 1
            return saved, saved.flows[index]

        target = f"flow {flow.flow_id or '(new)'} app {app.app_id or '(new)'}"
        done: Deferred[Any] = self._audited(actor, via, "flow.save", target, "", work)
        done.addCallback(self._reloaded)

        def answer(found: tuple[App, Flow]) -> dict[str, Any]:
            saved, saved_flow = found
            view = self._app_view(saved)
            return {
                "host": view["host"],
                "port": view["port"],
                "app_id": saved.app_id,
                "flow_id": saved_flow.flow_id,
                "app": view,
            }

        done.addCallback(answer)
        return done

    def preview(
        self,
        actor: str,
        via: str,
        app: App,
        flow: Flow,
        step: int,
        responses: Mapping[str, str] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Render action ``step`` of a flow that is not saved (the editor's preview)
        against its sample, with fake ``responses`` of earlier actions, exactly as
        ``render`` renders a saved one. Invalid with the reason."""
        try:
            self._check(actor, via)
            return succeed(self._render(app, flow, str(step), None, responses or {}))
        except OperationsError:
            return fail()

    def set_flow_enabled(
        self, actor: str, via: str, flow_id: str, enabled: bool, reason: str = ""
    ) -> Deferred[dict[str, Any]]:
        """Enable or disable a flow (a disabled flow receives nothing: its messages are
        rejected). Conflict when it is so already."""

        def work(connection: Connection) -> list[App]:
            app, flow = self._find_flow(connection, flow_id)
            if flow.enabled == enabled:
                state = "enabled" if enabled else "disabled"
                raise Conflict(f"flow {flow_id} is {state} already")
            flows = tuple(
                evolve(f, enabled=enabled) if f.flow_id == flow_id else f for f in app.flows
            )
            return [flowstore.save_app(connection, evolve(app, flows=flows), self.wall())]

        action = "flow.enable" if enabled else "flow.disable"
        done: Deferred[Any] = self._audited(actor, via, action, f"flow {flow_id}", reason, work)
        done.addCallback(self._reloaded)
        done.addCallback(
            lambda apps: next(r for r in self._flow_rows(apps) if r["flow_id"] == flow_id)
        )
        return done

    def variables(
        self, actor: str, via: str, flow_id: str | None = None, sample: str | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """The variable catalogue (path, name, sample value, template expression) of a
        flow's sample, or of a pasted ``sample`` message."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def catalogue(text: str) -> list[dict[str, Any]]:
            if not text.strip():
                raise Invalid("the sample is empty")
            try:
                found = variable_catalogue(text)
            except MessageParseError as error:
                raise Invalid(f"the sample is not an HL7 message: {error}") from None
            return [
                {"path": v.path, "name": v.name, "sample": v.value, "template": v.expression}
                for v in found
            ]

        if sample is not None:
            try:
                return succeed(catalogue(sample))
            except OperationsError:
                return fail()
        if flow_id is None:
            return fail(Invalid("give a flow_id or a sample"))
        done: Deferred[Any] = self._read(lambda c: self._find_flow(c, flow_id)[1].trigger.sample)
        done.addCallback(catalogue)
        return done

    def render(
        self,
        actor: str,
        via: str,
        flow_id: str,
        action: str,
        message: str | None = None,
        responses: Mapping[str, str] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Render an action (by name or position) of a flow against its sample, or a
        pasted ``message``, with fake ``responses`` of earlier actions (action name ->
        message text), as ``udsgateway flows render`` does: ``{"text", "base64"}``.
        Invalid with the reason when it cannot be rendered."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def work(connection: Connection) -> tuple[App, Flow]:
            return self._find_flow(connection, flow_id)

        done: Deferred[Any] = self._read(work)
        done.addCallback(
            lambda found: self._render(found[0], found[1], action, message, responses or {})
        )
        return done

    def _render(
        self,
        app: App,
        flow: Flow,
        name: str,
        message: str | None,
        fakes: Mapping[str, str],
    ) -> dict[str, Any]:
        chosen = [
            step for step, one in enumerate(flow.actions) if one.name == name or str(step) == name
        ]
        if not chosen:
            names = ", ".join(a.name for a in flow.actions) or "none"
            raise NotFound(f"flow {flow.flow_id} has no action {name!r} (actions: {names})")
        step = chosen[0]
        earlier = [a.name for a in flow.actions[:step]]
        unknown = sorted(set(fakes) - set(earlier))
        if unknown:
            raise Invalid(
                f"responses: {', '.join(unknown)} is not an earlier action "
                f"(earlier: {', '.join(earlier) or 'none'})"
            )
        tenant = self.tenants.get(app.tenant)
        charset = tenant_charset(tenant) if tenant is not None else "latin-1"
        try:
            # A pasted message or the sample is text: encoded as a sender would send it,
            # then read exactly as the gateway reads what it receives (outbound/render).
            raw = sender_bytes(message if message is not None else flow.trigger.sample, charset)
            if not raw.strip():
                raise Invalid("no message to render from (the flow has no sample)")
            body = render_action(
                app,
                flow,
                step,
                compile_template(flow.actions[step].template),
                read_trigger(raw, charset),
                raw,
                [sender_bytes(fakes[one], "latin-1") if one in fakes else None for one in earlier],
                charset=charset,
                now=lambda: datetime.fromtimestamp(self.wall(), UTC),
                new_control_id=ControlIdSource.for_boot(self.wall()).next,
            )
        except (TemplateError, RenderError) as error:
            raise Invalid(f"action {flow.actions[step].name}: {error}") from None
        return {
            "flow_id": flow.flow_id,
            "action": flow.actions[step].name,
            "text": as_text(body),
            "base64": base64.b64encode(body).decode("ascii"),
        }


def _listen_address(endpoint: str) -> tuple[str, int]:
    """Host and port of a server endpoint string (``tcp:port=2575:interface=...``)."""
    host, port = "0.0.0.0", 0
    for index, part in enumerate(endpoint.split(":")[1:], start=1):
        if part.startswith("port=") and part[5:].isdigit():
            port = int(part[5:])
        elif part.startswith("interface="):
            host = part[10:].replace("\\", "")
        elif index == 1 and part.isdigit():
            port = int(part)
    return host, port
