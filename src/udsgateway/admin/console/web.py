"""The web console: server-rendered pages (Jinja2, autoescaped) and htmx fragments.

A thin view over the operations facade (``admin.operations.Operations``, shared
with the JSON API, the manhole and the command line): every read and every
action goes through it as the logged-in user, ``via`` ``api``; the console
itself holds no query. It adds the pages, the roles' checks and the sessions.

Mounted under ``/console`` by the admin service. No inline script anywhere:
the Content-Security-Policy allows scripts from this service only (htmx and
the console's own small script, both files in the package). PHI never goes
into a URL or a page title: a search by patient identifier is a POST, and a
message's content is shown only on an explicit, audited "show content".
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from attrs import evolve
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from udsgateway.admin.auth import LoginThrottle
from udsgateway.admin.console.editor import FIRST_CLASS_TYPES, Problem, check, new_flow
from udsgateway.admin.console.security import ADMIN, OPERATOR, VIEWER, Accounts
from udsgateway.admin.operations import Conflict, Invalid, NotFound, Operations
from udsgateway.admin.sessions import (
    COOKIE_NAME,
    CSRF_FIELD,
    Session,
    SessionStore,
    cross_site_problem,
    same_origin,
    session_cookie,
)
from udsgateway.flows import Action, App, Flow, Trigger
from udsgateway.store import outbox
from udsgateway.store.audit import AuditQuery
from udsgateway.store.search import Query

log = Logger()

PREFIX = "/console"

#: The console is part of the admin service: what it does is audited as ``api``.
VIA = "api"

#: Search results per page.
PAGE = 50

#: The console's Content-Security-Policy: nothing inline, nothing from elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

#: Largest request body the console reads (a flow with its sample and templates).
MAX_BODY = 1024 * 1024

_STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}


class ForbiddenError(Exception):
    """The user's role may not do this."""


class NotFoundError(Exception):
    pass


class RefusedError(Exception):
    """A request refused with a status and a message (no detail that leaks)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def when(iso: str | None) -> str:
    """A time of the facade (ISO 8601 UTC) as the pages show it: ``2026-12-07 14:00:05``."""
    if not iso:
        return ""
    return iso.replace("T", " ")[:19]


def hl7_lines(raw: bytes | str | None) -> list[list[tuple[str, str]]]:
    """A message as segments, each a list of (field text, position title).

    The title of each field names its position (``PID-5``); components are
    listed with their positions too (``PID-5.1 Doe``), for the hover.
    """
    if not raw:
        return []
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    rows: list[list[tuple[str, str]]] = []
    field_sep = "|"
    component_sep = "^"
    if text.startswith("MSH") and len(text) > 5:
        field_sep, component_sep = text[3], text[4]
    for segment in text.split("\r"):
        if not segment:
            continue
        fields = segment.split(field_sep)
        name = fields[0]
        row = [(name, name)]
        for index, value in enumerate(fields[1:], start=1):
            position = index + 1 if name == "MSH" else index
            if name == "MSH" and index == 1:
                row.append((field_sep, "MSH-1 field separator"))
                position = 2
            title = f"{name}-{position}"
            parts = value.split(component_sep)
            if len(parts) > 1 and not (name == "MSH" and position == 2):
                title += (
                    " ("
                    + ", ".join(
                        f"{name}-{position}.{i}" for i, p in enumerate(parts, start=1) if p
                    )
                    + ")"
                )
            row.append((value, title))
        rows.append(row)
    return rows


def sparkline(series: list[int], width: int = 180, height: int = 32) -> Markup:
    """A per-minute series as an inline SVG polyline (no script, no style)."""
    top = max(series) if series and max(series) > 0 else 1
    step = width / max(1, len(series) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(series)
    )
    total = sum(series)
    return Markup(
        '<svg class="spark" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        'aria-label="{label}"><title>{label}</title>'
        '<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/>'
        "</svg>"
    ).format(
        w=width,
        h=height,
        points=points,
        label=f"{total} executions in the last hour, peak {max(series, default=0)} a minute",
    )


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("udsgateway.admin.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["prefix"] = PREFIX
    env.globals["sparkline"] = sparkline
    env.globals["hl7_lines"] = hl7_lines
    env.filters["urlquote"] = lambda value: quote(str(value), safe="")
    env.filters["when"] = when
    return env


class Page:
    """One request being answered: its user, session, form and helpers."""

    def __init__(self, console: Console, request: Request) -> None:
        self.console = console
        self.request = request
        self.session: Session | None = None
        self.user: Any = None
        self._form: dict[str, list[str]] | None = None

    @property
    def method(self) -> str:
        return (self.request.method or b"GET").decode("ascii", "replace")

    def query(self, name: str, default: str = "") -> str:
        values = parse_qs(urlsplit(self.request.uri.decode("utf-8", "replace")).query)
        return values.get(name, [default])[0].strip()

    @property
    def form(self) -> dict[str, list[str]]:
        """The POST body's fields (never the query string)."""
        if self._form is None:
            self._form = {}
            if self.method == "POST" and self.request.content is not None:
                self.request.content.seek(0)
                body = self.request.content.read(MAX_BODY + 1)
                self._form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return self._form

    def field(self, name: str, default: str = "") -> str:
        return self.form.get(name, [default])[0]

    def header(self, name: str) -> str | None:
        value = self.request.getHeader(name)
        return value if value is None else str(value)

    @property
    def actor(self) -> str:
        """The logged-in user, as the facade audits them."""
        return str(self.user.name)

    def require(self, role: str) -> None:
        if not self.user.at_least(role):
            raise ForbiddenError(role)

    def render(self, template: str, **values: Any) -> bytes:
        context = {
            "user": self.user,
            "csrf_token": self.session.csrf_token if self.session else "",
            "is_operator": self.user is not None and self.user.at_least(OPERATOR),
            "is_admin": self.user is not None and self.user.at_least(ADMIN),
            "path": urlsplit(self.request.uri.decode("utf-8", "replace")).path,
            **values,
        }
        return self.console.env.get_template(template).render(**context).encode("utf-8")

    def redirect(self, location: str) -> bytes:
        self.request.setResponseCode(303)
        self.request.setHeader(b"location", location.encode("utf-8"))
        return b""


Handler = Callable[[Page, re.Match[str]], Awaitable[bytes]]


class Console(Resource):
    """The console's resource: every path under ``/console``."""

    isLeaf = True

    def __init__(
        self,
        operations: Operations,
        accounts: Accounts,
        *,
        secure: bool = False,
        clock: Callable[[], float] = time.time,
        sessions: SessionStore | None = None,
        throttle: LoginThrottle | None = None,
        on_login: Callable[[Session, Any], None] | None = None,
        refresh_seconds: int = 5,
    ) -> None:
        super().__init__()
        self.operations = operations
        self.accounts = accounts
        self.secure = secure
        self.clock = clock
        #: Shared with the admin API: one login serves both.
        self.sessions = sessions if sessions is not None else SessionStore()
        self.throttle = throttle if throttle is not None else LoginThrottle(operations.database)
        self.on_login = on_login
        self.env = _environment()
        self.env.globals["refresh_seconds"] = refresh_seconds
        self.env.globals["first_class_types"] = FIRST_CLASS_TYPES
        self._routes: list[tuple[str, re.Pattern[str], Handler, str | None]] = []
        for method, pattern, handler, role in (
            ("GET", r"/login", self.login_form, None),
            ("POST", r"/login", self.login, None),
            ("POST", r"/logout", self.logout, VIEWER),
            ("GET", r"/", self.dashboard, VIEWER),
            ("GET", r"/dashboard/panel", self.dashboard_panel, VIEWER),
            ("GET", r"/messages", self.messages, VIEWER),
            ("POST", r"/messages", self.messages, VIEWER),
            ("GET", r"/messages/(?P<id>\d+)", self.message, VIEWER),
            ("POST", r"/messages/(?P<id>\d+)/content", self.message_content, VIEWER),
            ("POST", r"/messages/replay", self.messages_replay, OPERATOR),
            ("GET", r"/queues", self.queues, VIEWER),
            (
                "POST",
                r"/queues/(?P<id>\d+)/(?P<action>release|skip|retry|replay)",
                self.queue_act,
                OPERATOR,
            ),
            ("POST", r"/queues/replay", self.queue_replay, OPERATOR),
            ("POST", r"/queues/(?P<verb>pause|resume)", self.queue_pause, OPERATOR),
            ("GET", r"/flows", self.flows, VIEWER),
            ("GET", r"/flows/new", self.flow_new, ADMIN),
            ("GET", r"/flows/(?P<flow_id>[A-Z0-9]+)", self.flow_edit, VIEWER),
            ("POST", r"/flows/editor", self.flow_editor_post, ADMIN),
            ("POST", r"/flows/catalogue", self.flow_catalogue, ADMIN),
            ("POST", r"/flows/preview", self.flow_preview, ADMIN),
            ("GET", r"/flows/export/(?P<app_id>[A-Z0-9]+)", self.flow_export, ADMIN),
            (
                "POST",
                r"/flows/(?P<flow_id>[A-Z0-9]+)/(?P<verb>enable|disable)",
                self.flow_enable,
                OPERATOR,
            ),
            ("GET", r"/logs", self.logs, VIEWER),
            ("GET", r"/logs/tail", self.logs_tail, VIEWER),
            ("GET", r"/audit", self.audit, ADMIN),
            ("GET", r"/users", self.users, ADMIN),
            ("GET", r"/cluster", self.cluster, VIEWER),
        ):
            self._routes.append((method, re.compile(pattern + r"\Z"), handler, role))

    # -- plumbing

    def render(self, request: Request) -> bytes | int:
        for name, value in (
            (b"content-security-policy", CSP),
            (b"x-frame-options", "DENY"),
            (b"x-content-type-options", "nosniff"),
            (b"referrer-policy", "same-origin"),
            (b"cache-control", "no-store"),
        ):
            request.setHeader(name, value.encode("ascii"))
        path = urlsplit(request.uri.decode("utf-8", "replace")).path
        if path in ("", "/"):
            request.setResponseCode(303)
            request.setHeader(b"location", f"{PREFIX}/".encode())
            return b""
        if not path.startswith(PREFIX):
            return self._plain(request, 404, "not found")
        path = path[len(PREFIX) :] or "/"
        if path.startswith("/static/"):
            return self._static(request, path[len("/static/") :])
        length = request.getHeader(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return self._plain(request, 413, "request too large")
        page = Page(self, request)
        method = page.method
        allowed = []
        for route_method, pattern, handler, role in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            allowed.append(route_method)
            if route_method == method or (method == "HEAD" and route_method == "GET"):
                self._run(page, handler, match, role)
                return NOT_DONE_YET
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return self._plain(request, 405, "method not allowed")
        return self._plain(request, 404, "not found")

    def _plain(self, request: Request, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (message + "\n").encode("utf-8")

    def _static(self, request: Request, name: str) -> bytes:
        if not re.fullmatch(r"[a-z][a-z0-9.-]*\.(js|css|txt)", name):
            return self._plain(request, 404, "not found")
        resource = resources.files("udsgateway.admin.console").joinpath("static").joinpath(name)
        if not resource.is_file():
            return self._plain(request, 404, "not found")
        request.setHeader(b"content-type", _STATIC_TYPES[name[name.rindex(".") :]].encode())
        request.setHeader(b"cache-control", b"max-age=3600")
        return resource.read_bytes()

    def _run(self, page: Page, handler: Handler, match: re.Match[str], role: str | None) -> None:
        request = page.request
        done = Deferred.fromCoroutine(self._answer(page, handler, match, role))

        def finish(body: bytes) -> None:
            if not request.finished and not request._disconnected:
                if request.responseHeaders.getRawHeaders(b"content-type") is None:
                    request.setHeader(b"content-type", b"text/html; charset=utf-8")
                request.write(body)
                request.finish()

        def failed(failure: Any) -> None:
            log.failure("console page failed", failure)
            if not request.finished and not request._disconnected:
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.write(b"internal error (see the gateway's log)\n")
                request.finish()

        done.addCallbacks(finish, failed)

    async def _answer(
        self, page: Page, handler: Handler, match: re.Match[str], role: str | None
    ) -> bytes:
        request = page.request
        cookie = request.getCookie(COOKIE_NAME.encode())
        if cookie:
            page.session = self.sessions.get(cookie.decode("ascii", "replace"), self.clock())
        if page.session is not None:
            page.user = await self.accounts.current(page.session.user)
            if page.user is None:
                self.sessions.end(page.session.id)
                page.session = None
        if page.method not in ("GET", "HEAD"):
            problem = self._cross_site(page)
            if problem is not None:
                request.setResponseCode(403)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return (problem + "\n").encode()
        if role is not None and page.user is None:
            if request.getHeader(b"hx-request"):
                request.setResponseCode(401)
                request.setHeader(b"hx-redirect", f"{PREFIX}/login".encode())
                return b""
            return page.redirect(f"{PREFIX}/login")
        try:
            if role is not None:
                page.require(role)
            return await handler(page, match)
        except ForbiddenError:
            request.setResponseCode(403)
            return page.render(
                "error.html", title="Not allowed", message="Your role may not do this."
            )
        except (NotFoundError, NotFound):
            request.setResponseCode(404)
            return page.render("error.html", title="Not found", message="Nothing here.")
        except (Invalid, Conflict) as refused:
            # The facade's refusals name no message content: shown as they are.
            request.setResponseCode(400 if isinstance(refused, Invalid) else 409)
            return page.render("error.html", title="Refused", message=str(refused))
        except RefusedError as refused:
            request.setResponseCode(refused.status)
            return page.render("error.html", title="Refused", message=str(refused))

    def _cross_site(self, page: Page) -> str | None:
        """Why a state-changing request is refused as cross-site, or None."""
        host = page.header("host") or ""
        if page.session is None:
            # Logging in: no session yet, so no form token; the Origin must be ours.
            origin = page.header("origin")
            source = origin if origin is not None else page.header("referer")
            if source is None or not same_origin(source, host, self.secure):
                return "cross-site request refused: Origin is not this service"
            return None
        return cross_site_problem(
            page.request.method,
            page.header("origin"),
            page.header("referer"),
            host,
            self.secure,
            page.session,
            page.field(CSRF_FIELD) or page.header("x-csrf-token"),
        )

    # -- login

    async def login_form(self, page: Page, _: re.Match[str]) -> bytes:
        return page.render("login.html", title="Log in", error="", name="")

    async def login(self, page: Page, _: re.Match[str]) -> bytes:
        name = page.field("name").strip()
        password = page.field("password")
        address = str(getattr(page.request.getClientAddress(), "host", ""))
        if await self.throttle.locked(name, address, self.clock()):
            page.request.setResponseCode(429)
            return page.render(
                "login.html",
                title="Log in",
                error="Too many failed logins: try again later.",
                name=name,
            )
        user = await self.accounts.authenticate(name, password) if name and password else None
        if user is None:
            await self.throttle.failed(name, address, self.clock())
            await self.operations.note(
                name or "(none)", VIA, "console.login", f"user {name}", result="refused"
            )
            page.request.setResponseCode(401)
            return page.render(
                "login.html", title="Log in", error="Wrong user name or password.", name=name
            )
        await self.throttle.succeeded(name, address)
        if page.session is not None:
            self.sessions.end(page.session.id)
        session = self.sessions.create(user.name, self.clock())
        if self.on_login is not None:
            self.on_login(session, user)
        page.request.setHeader(b"set-cookie", session_cookie(session.id, self.secure))
        await self.operations.note(user.name, VIA, "console.login", f"user {user.name}")
        return page.redirect(f"{PREFIX}/")

    async def logout(self, page: Page, _: re.Match[str]) -> bytes:
        assert page.session is not None
        self.sessions.end(page.session.id)
        page.request.setHeader(b"set-cookie", session_cookie("", self.secure, max_age=0))
        return page.redirect(f"{PREFIX}/login")

    # -- dashboard

    async def _dashboard(self, page: Page) -> dict[str, Any]:
        status = await self.operations.status(page.actor, VIA, history=True)
        return dashboard_rows(status, self.operations.wall())

    async def dashboard(self, page: Page, _: re.Match[str]) -> bytes:
        status = await self._dashboard(page)
        return page.render("dashboard.html", title="Dashboard", status=status)

    async def dashboard_panel(self, page: Page, _: re.Match[str]) -> bytes:
        status = await self._dashboard(page)
        return page.render("dashboard_panel.html", status=status)

    # -- messages

    def _search(self, page: Page) -> tuple[Query, dict[str, str]]:
        """The message browser's filters: from the form of a POST, else the address
        (patient and appointment keys only ever from a POST body: never in a URL)."""
        source = page.field if page.method == "POST" else page.query
        posted = page.method == "POST"
        values = {
            "since": source("since"),
            "until": source("until"),
            "status": source("status") if source("status") in ("accepted", "rejected") else "",
            "flow_id": source("flow_id").strip(),
            "message_type": source("message_type").strip().upper(),
            "control_id": source("control_id").strip(),
            "pid3": page.field("pid3").strip() if posted else "",
            "sch1": page.field("sch1").strip() if posted else "",
            "sch2": page.field("sch2").strip() if posted else "",
        }
        keys = tuple(
            (name, values[field])
            for name, field in (
                ("msh10", "control_id"),
                ("pid3", "pid3"),
                ("sch1", "sch1"),
                ("sch2", "sch2"),
            )
            if values[field]
        )
        before = source("before")
        query = Query(
            message_type=values["message_type"] or None,
            status=values["status"] or None,
            since=_parse_time(values["since"]),
            until=_parse_time(values["until"]),
            flow_id=values["flow_id"] or None,
            keys=keys,
            before_id=int(before) if before.isdigit() else None,
            limit=PAGE,
        )
        return query, values

    async def messages(self, page: Page, _: re.Match[str]) -> bytes:
        query, values = self._search(page)
        found = await self.operations.messages(page.actor, VIA, query)
        results = found["messages"]
        flows = await self.operations.flows(page.actor, VIA)
        # A shareable link for the filters that are not PHI (PID-3 is left out).
        share = "&".join(
            f"{k}={quote(v, safe='')}"
            for k, v in values.items()
            if v and k not in ("pid3", "sch1", "sch2")
        )
        keyed = bool(values["pid3"] or values["sch1"] or values["sch2"])
        return page.render(
            "messages.html",
            title="Messages",
            results=results,
            flows=flows,
            values=values,
            share=share,
            older=found["next"] if not keyed else None,
            notice=page.query("done"),
        )

    async def messages_replay(self, page: Page, _: re.Match[str]) -> bytes:
        """Replay every accepted message the current filters find: counted first,
        replayed once that count is confirmed (refused if the set changed meanwhile)."""
        query, values = self._search(page)
        query = evolve(query, before_id=None)
        reason = page.field("reason").strip()

        def replay(count: int | None) -> Deferred[dict[str, Any]]:
            return self.operations.replay_messages(
                page.actor, VIA, query, reason, confirm_count=count
            )

        done = await self._confirmed(
            page,
            replay,
            "accepted messages match these filters and will run through their flows "
            "again, oldest first.",
            {k: v for k, v in values.items() if v},
            ("messages", "messages"),
        )
        if isinstance(done, bytes):
            return done
        return page.redirect(f"{PREFIX}/messages?done=replay+{done['replayed']}+messages")

    async def _confirmed(
        self,
        page: Page,
        replay: Callable[[int | None], Deferred[dict[str, Any]]],
        what: str,
        hidden: dict[str, str],
        names: tuple[str, str],
    ) -> bytes | dict[str, Any]:
        """A replay confirmed by count: without ``confirm`` the page that shows the
        count (``replay(None)``) and asks for it; with it, ``replay(count)``'s answer
        (the facade refuses when the set no longer has that count). ``names``: what is
        replayed, and the page to go back to."""
        reason = page.field("reason").strip()
        if page.field("confirm") != "yes":
            counted = await replay(None)
            return page.render(
                "replay_confirm.html",
                title="Confirm replay",
                count=counted["count"],
                what=what,
                action=page.request.path.decode("ascii", "replace"),
                hidden=hidden,
                noun=names[0],
                back=names[1],
                reason=reason,
            )
        count = page.field("count")
        if not count.isdigit():
            raise RefusedError(400, "Count them first.")
        if not reason:
            raise RefusedError(400, "A replay needs a reason.")
        answer: dict[str, Any] = await replay(int(count))
        return answer

    async def message(self, page: Page, match: re.Match[str]) -> bytes:
        found = await self.operations.message(page.actor, VIA, int(match["id"]))
        return page.render(
            "message.html", title=f"Message {found['id']}", message=found, content=None
        )

    async def message_content(self, page: Page, match: re.Match[str]) -> bytes:
        if not page.user.view_content:
            raise ForbiddenError("content")
        message_id = int(match["id"])
        found = await self.operations.message(page.actor, VIA, message_id)
        content = await self.operations.message_content(page.actor, VIA, message_id)
        return page.render(
            "message.html", title=f"Message {found['id']}", message=found, content=content
        )

    # -- queues

    async def queues(self, page: Page, _: re.Match[str]) -> bytes:
        waiting = await self.operations.deliveries(
            page.actor, VIA, (outbox.QUEUED, outbox.HELD), limit=1000
        )
        # With history: every flow's destination may be paused, also before it has work.
        status = await self.operations.status(page.actor, VIA, history=True)
        return page.render(
            "queues.html",
            title="Queues",
            queues=queue_sections(waiting, status["destinations"]),
            destinations=[
                {"address": address, **entry}
                for address, entry in sorted(status["destinations"].items())
            ],
            notice=page.query("done"),
        )

    async def queue_act(self, page: Page, match: re.Match[str]) -> bytes:
        action = match["action"]
        delivery_id = int(match["id"])
        reason = page.field("reason").strip()
        if action != "retry" and not reason:
            raise RefusedError(400, f"A {action} needs a reason.")
        acts = {
            "release": self.operations.release,
            "skip": self.operations.skip,
            "replay": self.operations.replay_delivery,
            "retry": self.operations.retry_now,
        }
        updated = await acts[action](page.actor, VIA, delivery_id, reason or "retry now")
        return page.redirect(f"{PREFIX}/queues?done={action}+{updated['id']}")

    async def queue_pause(self, page: Page, match: re.Match[str]) -> bytes:
        address = page.field("address").strip()
        reason = page.field("reason").strip()
        if not address:
            raise RefusedError(400, "Which destination?")
        if match["verb"] == "pause":
            if not reason:
                raise RefusedError(400, "A pause needs a reason.")
            await self.operations.pause(page.actor, VIA, address, reason)
        else:
            await self.operations.resume(page.actor, VIA, address, reason)
        return page.redirect(f"{PREFIX}/queues?done={match['verb']}+{quote(address)}")

    async def queue_replay(self, page: Page, _: re.Match[str]) -> bytes:
        destination = page.field("destination").strip()
        state = page.field("state")
        reason = page.field("reason").strip()

        def replay(count: int | None) -> Deferred[dict[str, Any]]:
            return self.operations.replay_deliveries(
                page.actor, VIA, destination, state, reason, confirm_count=count
            )

        done = await self._confirmed(
            page,
            replay,
            f"{state} deliveries to {destination} will be sent again, in their order.",
            {"destination": destination, "state": state},
            ("deliveries", "queues"),
        )
        if isinstance(done, bytes):
            return done
        return page.redirect(f"{PREFIX}/queues?done=replay+{done['replayed']}")

    # -- flows

    async def flows(self, page: Page, _: re.Match[str]) -> bytes:
        rows = await self.operations.flows(page.actor, VIA)
        apps = await self.operations.apps(page.actor, VIA)
        return page.render("flows.html", title="Flows", flows=rows, apps=apps)

    async def flow_new(self, page: Page, _: re.Match[str]) -> bytes:
        apps = await self.operations.apps(page.actor, VIA)
        flow = new_flow(page.query("type") or "SIU^S12")
        flow = evolve(flow, actions=(_blank_action(flow.trigger.message_type),))
        return await self._editor(page, apps, None, flow)

    async def flow_edit(self, page: Page, match: re.Match[str]) -> bytes:
        apps = await self.operations.apps(page.actor, VIA)
        for app in apps:
            for flow in app["flows"]:
                if flow["flow_id"] == match["flow_id"]:
                    readonly = not page.user.at_least(ADMIN)
                    return await self._editor(page, apps, app, flow, readonly=readonly)
        raise NotFoundError()

    async def _editor(
        self,
        page: Page,
        apps: list[dict[str, Any]],
        app: App | dict[str, Any] | None,
        flow: Flow | dict[str, Any],
        *,
        problems: list[Problem] | None = None,
        saved: dict[str, Any] | None = None,
        readonly: bool = False,
    ) -> bytes:
        """The editor over a flow of the form (models) or as stored (the facade's
        documents: the template reads both alike)."""
        sample = flow.trigger.sample if isinstance(flow, Flow) else flow["trigger"]["sample"]
        catalogue, sample_problem = await self._catalogue(page, sample)
        variables = (app.variables if isinstance(app, App) else app["variables"]) if app else {}
        flow_id = flow.flow_id if isinstance(flow, Flow) else flow["flow_id"]
        return page.render(
            "flow_editor.html",
            title=f"Flow {flow_id}" if flow_id else "New flow",
            apps=apps,
            app=app,
            flow=flow,
            tenants=self.tenants,
            catalogue=catalogue,
            sample_problem=sample_problem,
            problems=problems or [],
            saved=saved,
            readonly=readonly,
            app_variables=json.dumps(dict(variables), sort_keys=True),
        )

    @property
    def tenants(self) -> list[str]:
        return list(self.operations.tenants) or ["default"]

    async def _catalogue(self, page: Page, sample: str) -> tuple[list[dict[str, Any]], str]:
        """The variables of a pasted sample, or why it cannot be read."""
        if not sample.strip():
            return [], ""
        try:
            return await self.operations.variables(page.actor, VIA, sample=sample), ""
        except Invalid as error:
            return [], str(error)

    def _flow_from_form(self, page: Page) -> tuple[App, Flow]:
        form = page.form
        tenants = self.tenants
        tenant = page.field("tenant") if page.field("tenant") in tenants else tenants[0]
        app_id = page.field("app_id").strip()
        try:
            variables = json.loads(page.field("app_variables") or "{}")
            if not isinstance(variables, dict):
                raise ValueError("not a table")
        except ValueError:
            variables = {}
        app = App(
            name=page.field("app_name").strip() or "Console flows",
            tenant=tenant,
            app_id=app_id,
            variables={str(k): str(v) for k, v in variables.items()},
        )
        actions = []
        count = len(form.get("action_name", []))
        for i in range(count):

            def value(key: str, i: int = i) -> str:
                values = form.get(key, [])
                return values[i] if i < len(values) else ""

            port = value("action_port").strip()
            actions.append(
                Action(
                    name=value("action_name").strip(),
                    host=value("action_host").strip(),
                    port=int(port) if port.isdigit() else 0,
                    message_type=value("action_type").strip().upper(),
                    template=value("action_template").replace("\r\n", "\n"),
                    protocol="tcp" if value("action_protocol") == "tcp" else "mllp",
                    ordering_key=value("action_ordering_key").strip(),
                )
            )
        flow = Flow(
            name=page.field("flow_name").strip(),
            flow_id=page.field("flow_id").strip(),
            enabled=page.field("enabled", "on") == "on",
            trigger=Trigger(
                connection="tcp" if page.field("connection") == "tcp" else "mllp",
                message_type=page.field("message_type").strip().upper(),
                sample=page.field("sample").replace("\r\n", "\n"),
            ),
            actions=tuple(actions),
        )
        return app, flow

    async def flow_editor_post(self, page: Page, _: re.Match[str]) -> bytes:
        app, flow = self._flow_from_form(page)
        apps = await self.operations.apps(page.actor, VIA)
        intent = page.field("intent")
        if intent == "add_action":
            flow = evolve(flow, actions=(*flow.actions, _blank_action(flow.trigger.message_type)))
            return await self._editor(page, apps, app, flow)
        if intent.startswith("remove_action_"):
            index = int(intent.rsplit("_", 1)[1]) if intent.rsplit("_", 1)[1].isdigit() else -1
            flow = evolve(flow, actions=tuple(a for i, a in enumerate(flow.actions) if i != index))
            return await self._editor(page, apps, app, flow)
        problems = check(app.variables, flow)
        if problems or intent != "save":
            if problems:
                page.request.setResponseCode(422)
            return await self._editor(page, apps, app, flow, problems=problems)
        try:
            saved = await self.operations.save_flow(page.actor, VIA, app, flow)
        except (Invalid, Conflict) as error:
            page.request.setResponseCode(422)
            return await self._editor(
                page, apps, app, flow, problems=[Problem("flow", None, str(error))]
            )
        saved_app = saved["app"]
        [saved_flow] = [f for f in saved_app["flows"] if f["flow_id"] == saved["flow_id"]]
        return await self._editor(
            page,
            await self.operations.apps(page.actor, VIA),
            saved_app,
            saved_flow,
            saved=saved,
        )

    async def flow_catalogue(self, page: Page, _: re.Match[str]) -> bytes:
        sample = page.field("sample").replace("\r\n", "\n")
        catalogue, problem = await self._catalogue(page, sample)
        return page.render("catalogue.html", catalogue=catalogue, sample_problem=problem)

    async def flow_preview(self, page: Page, _: re.Match[str]) -> bytes:
        app, flow = self._flow_from_form(page)
        step_text = page.field("step", "0")
        step = int(step_text) if step_text.isdigit() else 0
        if not flow.actions or step >= len(flow.actions):
            return page.render("preview.html", rendered="", problem=None, step=step)
        fakes = page.form.get("fake_response", [])
        # The fake responses of the earlier actions that have one.
        responses = {
            a.name: fakes[i]
            for i, a in enumerate(flow.actions[:step])
            if i < len(fakes) and fakes[i].strip()
        }
        where = f"action {step + 1} ({flow.actions[step].name})"
        try:
            rendered = await self.operations.preview(page.actor, VIA, app, flow, step, responses)
        except (Invalid, NotFound) as error:
            problem = Problem(where, None, str(error))
            return page.render("preview.html", rendered="", problem=problem, step=step)
        return page.render("preview.html", rendered=rendered["text"], problem=None, step=step)

    async def flow_enable(self, page: Page, match: re.Match[str]) -> bytes:
        enabled = match["verb"] == "enable"
        reason = page.field("reason").strip()
        await self.operations.set_flow_enabled(page.actor, VIA, match["flow_id"], enabled, reason)
        return page.redirect(f"{PREFIX}/flows")

    async def flow_export(self, page: Page, match: re.Match[str]) -> bytes:
        found = await self.operations.export_flows(page.actor, VIA, match["app_id"])
        page.request.setHeader(b"content-type", b"application/toml; charset=utf-8")
        page.request.setHeader(
            b"content-disposition",
            f'attachment; filename="{match["app_id"].lower()}.toml"'.encode(),
        )
        await self.operations.note(page.actor, VIA, "flow.export", f"app {match['app_id']}")
        return str(found["text"]).encode("utf-8")

    # -- logs, audit, users

    def _log_filters(self, page: Page) -> dict[str, str]:
        return {
            "flow_id": page.query("flow_id"),
            "outcome": page.query("outcome"),
            "event": page.query("event"),
        }

    async def logs(self, page: Page, _: re.Match[str]) -> bytes:
        filters = self._log_filters(page)
        found = await self.operations.logs(
            page.actor,
            VIA,
            flow_id=filters["flow_id"] or None,
            status=filters["outcome"] or None,
            event=filters["event"] or None,
            limit=200,
        )
        rows = found["lines"]
        flows = await self.operations.flows(page.actor, VIA)
        return page.render(
            "logs.html",
            title="Execution log",
            rows=rows,
            filters=filters,
            flows=flows,
            after=rows[0]["id"] if rows else 0,
            tail_query="&".join(f"{k}={quote(v, safe='')}" for k, v in filters.items() if v),
        )

    async def logs_tail(self, page: Page, _: re.Match[str]) -> bytes:
        filters = self._log_filters(page)
        after_text = page.query("after")
        after = int(after_text) if after_text.isdigit() else 0
        found = await self.operations.tail(
            page.actor,
            VIA,
            after_id=after,
            flow_id=filters["flow_id"] or None,
            status=filters["outcome"] or None,
            event=filters["event"] or None,
            timeout=0,
        )
        return page.render(
            "logs_tail.html",
            new_rows=list(reversed(found["lines"])),  # newest first, at the top
            after=found["last"],
            tail_query="&".join(f"{k}={quote(v, safe='')}" for k, v in filters.items() if v),
        )

    async def audit(self, page: Page, _: re.Match[str]) -> bytes:
        found = await self.operations.audit_trail(page.actor, VIA, AuditQuery(limit=200))
        return page.render("audit.html", title="Audit log", rows=found["entries"])

    async def users(self, page: Page, _: re.Match[str]) -> bytes:
        rows = await self.accounts.users()
        return page.render("users.html", title="Users", rows=rows)

    async def cluster(self, page: Page, _: re.Match[str]) -> bytes:
        view = await self.operations.cluster(page.user.name, "api")
        return page.render("cluster.html", title="Cluster", view=view)


#: A destination waiting longer than this (seconds) is a problem on the dashboard.
SLOW = 300


def dashboard_rows(status: dict[str, Any], now: float) -> dict[str, Any]:
    """The dashboard's rows from the facade's status (``history``): flows and
    destinations, problems first."""
    minute = status["rates"].get("minute", {})
    hour = status["rates"].get("hour", {})
    flows = []
    for flow_id, entry in status["flows"].items():
        counts = entry.get("executions", {})
        series = entry.get("last_hour", [0] * 60)
        row = {
            "flow_id": flow_id,
            "name": entry.get("name") or "(deleted flow)",
            "app_id": entry.get("app_id", ""),
            "enabled": entry.get("enabled", False),
            "received": entry.get("received", 0),
            "routed": entry.get("routed", 0),
            "done": counts.get("done", 0),
            "failed": counts.get("failed", 0),
            "held": counts.get("held", 0),
            "pending": counts.get("pending", 0) + counts.get("waiting", 0),
            "per_minute": series[-1] if series else 0,
            "per_hour": sum(series),
            "series": series,
        }
        row["problem"] = bool(row["failed"] or row["held"])
        flows.append(row)
    destinations = []
    for address, entry in status["destinations"].items():
        age = entry.get("oldest_pending_age")
        rate = f"destination.{address}.delivered"
        row = {
            **entry,
            "address": address,
            "oldest_age": int(age) if age is not None else None,
            "per_minute": round(minute.get(rate, 0.0) * 60),
            "per_hour": round(hour.get(rate, 0.0) * 3600),
        }
        row["problem"] = bool(
            entry.get("held")
            or entry.get("paused")
            or entry.get("connection") == "down"
            or (age is not None and age > SLOW)
        )
        destinations.append(row)
    flows.sort(key=lambda r: (not r["problem"], r["name"]))
    destinations.sort(key=lambda r: (not r["problem"], r["address"]))
    return {"flows": flows, "destinations": destinations, "at": when(_iso_now(now))}


def queue_sections(
    waiting: list[dict[str, Any]], destinations: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The waiting deliveries by destination (each with why it waits), and each paused
    destination even when nothing waits for it."""
    sections: dict[str, dict[str, Any]] = {}
    for address, entry in destinations.items():
        if entry.get("paused"):
            sections[address] = {"address": address, "paused": entry, "deliveries": []}
    for delivery in waiting:
        address = delivery["destination"]
        # A paused destination has its section already: the others are not paused.
        section = sections.setdefault(
            address, {"address": address, "paused": None, "deliveries": []}
        )
        section["deliveries"].append(delivery)
    return [sections[address] for address in sorted(sections)]


def _iso_now(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _blank_action(message_type: str) -> Action:
    return Action(name="", host="127.0.0.1", port=0, message_type=message_type, template="")


def _parse_time(text: str) -> float | None:
    """``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM`` (UTC), as the form's inputs send them."""
    text = text.strip()
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    return None


__all__ = ["Console", "escape", "hl7_lines", "sparkline"]
