"""The web console served from memory: pages, roles, CSRF, audit, flow editor.

A whole gateway runs in memory (``FlowGateway``, on a fake clock) and the
console answers over ``StringTransport`` (``ConsoleClient``): no reactor,
no sockets. The browser tests (tests/integration/test_console_browser.py)
drive the same pages in Chromium against a real gateway process.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from udsgateway.admin.console.web import CSP, hl7_lines, sparkline
from udsgateway.store import schema
from udsgateway.testing import hl7_message
from udsgateway.testing.console import ConsoleClient, Response
from udsgateway.testing.flows import FlowGateway, action, answer_with, app, flow

SIU_SAMPLE = (
    "MSH|^~\\&|SCHED|CLINIC|LSQ|LEADSQ|202401021000||SIU^S12|SIU00001|P|2.5\n"
    "SCH|APT1001|FILL9|||||Checkup|NORMAL|30|min\n"
    "PID|1||MRN4242^^^CLINIC||Tester^Alice||19900101|F\n"
)

TEMPLATE = (
    "MSH|^~\\&|GW|DEMO|PARTNER|FAC|{{ now }}||SIU^S12|{{ control_id }}|P|2.5\n"
    'SCH|{{ msg["SCH-1"] }}\n'
    'PID|1||{{ msg["PID-3.1"] }}\n'
)


def siu_app() -> object:
    return app(
        flow("Appointments", "SIU^S12", [action("to_partner", 2700, "SIU^S12", TEMPLATE)]),
    )


def message_to(flow_id: str, control_id: str, mrn: str = "MRN4242") -> bytes:
    return (
        f"MSH|^~\\&|SCHED|CLINIC|APPFLOWTEST|{flow_id}|202401021000||SIU^S12|{control_id}|P|2.5\r"
        f"SCH|APT1001|FILL9\rPID|1||{mrn}^^^CLINIC||Tester^Alice\r"
    ).encode()


class ConsoleTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.running = FlowGateway((siu_app(),))  # type: ignore[arg-type]
        self.addCleanup(self.running.stop)
        self.flow_id = "FLWAPPOINTMENTS"
        self.client = self.fresh_client()

    def fresh_client(self) -> ConsoleClient:
        return ConsoleClient.over(
            self.running.database,
            self.running.clock,
            dispatcher=self.running.outbound.dispatcher,
            executor=self.running.executor,
        )

    def send(self, control_id: str, mrn: str = "MRN4242", held: bool = False) -> None:
        self.running.send(message_to(self.flow_id, control_id, mrn))
        if held:
            # A held delivery keeps its execution waiting: run until it is held.
            self.running.run_until(
                lambda: any(d["state"] == "held" for d in self.running.rows(schema.deliveries))
            )
        else:
            self.running.settle()

    def audit_actions(self) -> list[str]:
        return [row["action"] for row in self.running.rows(schema.audit)]


def _text(response: Response) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", response.body))


class LoginTests(ConsoleTestCase):
    def test_pages_need_a_login(self) -> None:
        response = self.client.get("/console/")
        self.assertEqual(response.status, 303)
        self.assertEqual(response.header("location"), "/console/login")

    def test_login_and_logout(self) -> None:
        self.client.login("viewer")
        page = self.client.get("/console/")
        self.assertEqual(page.status, 200)
        self.assertIn("viewer (viewer)", _text(page))
        self.assertIn("console.login", self.audit_actions())
        out = self.client.post("/console/logout")
        self.assertEqual(out.status, 303)
        self.assertEqual(self.client.get("/console/").status, 303)

    def test_wrong_password(self) -> None:
        response = self.client.login("viewer", "nope")
        self.assertEqual(response.status, 401)
        self.assertIn("Wrong user name or password", response.body)
        self.assertNotIn("udsgw_session", self.client.cookies)

    def test_lockout_after_failures(self) -> None:
        for _ in range(5):
            self.client.login("viewer", "nope")
        response = self.client.login("viewer")
        self.assertEqual(response.status, 429)

    def test_session_cookie_flags(self) -> None:
        self.client.get("/console/login")
        response = self.client.request(
            "POST", "/console/login", {"name": "viewer", "password": "viewerviewer"}
        )
        cookie = response.header("set-cookie") or ""
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=Strict", cookie)

    def test_static_files(self) -> None:
        htmx = self.client.get("/console/static/htmx.min.js")
        self.assertEqual(htmx.status, 200)
        self.assertEqual(htmx.header("content-type"), "text/javascript; charset=utf-8")
        self.assertIn("htmx", htmx.body)
        self.assertEqual(self.client.get("/console/static/console.css").status, 200)
        self.assertIn("Zero-Clause BSD", self.client.get("/console/static/htmx-license.txt").body)
        self.assertEqual(self.client.get("/console/static/../web.py").status, 404)
        self.assertEqual(self.client.get("/console/static/missing.js").status, 404)

    def test_security_headers(self) -> None:
        response = self.client.get("/console/login")
        self.assertEqual(response.header("content-security-policy"), CSP)
        self.assertIn("script-src 'self'", CSP)
        self.assertNotIn("unsafe-inline", CSP)
        self.assertEqual(response.header("x-frame-options"), "DENY")
        self.assertNotIn("<script>", response.body)
        self.assertNotIn(" style=", response.body)


class CrossSiteTests(ConsoleTestCase):
    def test_post_from_another_origin_is_refused(self) -> None:
        self.client.login("operator")
        response = self.client.post("/console/logout", origin="http://evil.example")
        self.assertEqual(response.status, 403)
        self.assertIn("cross-site", response.body)
        self.assertEqual(self.client.get("/console/").status, 200)

    def test_post_without_form_token_is_refused(self) -> None:
        self.client.login("operator")
        response = self.client.request("POST", "/console/logout", {})
        self.assertEqual(response.status, 403)
        self.assertIn("form token", response.body)

    def test_post_without_origin_is_refused(self) -> None:
        self.client.login("operator")
        response = self.client.post("/console/logout", origin=None)
        self.assertEqual(response.status, 403)

    def test_login_from_another_origin_is_refused(self) -> None:
        response = self.client.request(
            "POST",
            "/console/login",
            {"name": "viewer", "password": "viewerviewer"},
            origin="http://evil.example",
        )
        self.assertEqual(response.status, 403)


class DashboardTests(ConsoleTestCase):
    def test_counts_per_flow_and_destination(self) -> None:
        self.send("C1")
        self.send("C2")
        self.client.login("viewer")
        page = self.client.get("/console/dashboard/panel")
        row = re.search(r'data-flow="FLWAPPOINTMENTS".*?</tr>', page.body, re.S)
        assert row is not None
        self.assertIn('data-col="received">2<', row.group(0))
        self.assertIn('data-col="done">2<', row.group(0))
        self.assertIn('data-col="delivered">2<', page.body)
        self.assertIn("<svg", row.group(0))
        self.assertIn("2 executions in the last hour", row.group(0))

    def test_destination_down_is_a_problem(self) -> None:
        self.running.peer(2700).accepting = False
        self.running.send(message_to(self.flow_id, "D1"))
        self.running.clock.advance(5)
        self.client.login("viewer")
        panel = self.client.get("/console/dashboard/panel")
        destinations = panel.body.split('id="destinations-table"')[1]
        self.assertIn('<tr class="problem">', destinations)
        self.assertIn('class="conn-down">down<', destinations)
        self.running.peer(2700).accepting = True
        self.running.settle()
        panel = self.client.get("/console/dashboard/panel")
        self.assertNotIn("conn-down", panel.body)

    def test_destinations_of_flows_listed_before_any_delivery(self) -> None:
        from datetime import UTC, datetime

        self.client.login("viewer")
        panel = self.client.get("/console/dashboard/panel")
        destinations = panel.body.split('id="destinations-table"')[1]
        self.assertIn(">127.0.0.1:2700</a>", destinations)
        self.assertIn('class="conn-idle">idle<', destinations)
        now = datetime.fromtimestamp(self.running.clock.seconds(), UTC)
        self.assertIn(f"Updated {now:%Y-%m-%d %H:%M:%S} UTC", panel.body)
        # The queue page offers it for a pause.
        operator = self.fresh_client()
        operator.login("operator")
        queues = operator.get("/console/queues")
        self.assertIn('<option value="127.0.0.1:2700">', queues.body)

    def test_self_refreshes(self) -> None:
        self.client.login("viewer")
        page = self.client.get("/console/")
        self.assertIn('hx-get="/console/dashboard/panel"', page.body)
        self.assertIn('hx-trigger="every 5s"', page.body)

    def test_held_destination_listed_first_as_a_problem(self) -> None:
        self.running.peer(2700).script = answer_with("AR")
        self.send("C1", held=True)
        self.client.login("viewer")
        page = self.client.get("/console/dashboard/panel")
        destinations = page.body.split('id="destinations-table"')[1]
        self.assertIn('<tr class="problem">', destinations)
        self.assertIn('data-col="held">1<', destinations)


class MessageTests(ConsoleTestCase):
    def test_search_by_pid3_is_a_post_and_opens_the_timeline(self) -> None:
        self.send("C1", mrn="MRN1")
        self.send("C2", mrn="MRN2")
        self.client.login("viewer")
        results = self.client.post("/console/messages", {"pid3": "MRN2"})
        self.assertEqual(results.status, 200)
        ids = re.findall(r'href="/console/messages/(\d+)"', results.body)
        self.assertEqual(len(ids), 1)
        self.assertIn("C2", results.body)
        self.assertNotIn(">C1<", results.body)
        # The shareable link leaves the patient ID out.
        self.assertNotIn("pid3=", results.body)
        # A PID-3 in a URL is ignored: it never filters.
        via_url = self.client.get("/console/messages?pid3=MRN2")
        self.assertEqual(len(re.findall(r'href="/console/messages/(\d+)"', via_url.body)), 2)
        detail = self.client.get(f"/console/messages/{ids[0]}")
        self.assertIn("<title>Message", detail.body)
        self.assertNotIn("MRN2", detail.body)  # no content before "show content"
        timeline = detail.body.split('id="timeline"')[1].split("</ol>")[0]
        self.assertIn("received", timeline)
        self.assertIn("delivered", timeline)

    def test_search_by_appointment(self) -> None:
        self.send("C1")
        self.client.login("viewer")
        found = self.client.post("/console/messages", {"sch1": "APT1001"})
        self.assertEqual(re.findall(r"<td>(C\d)</td>", found.body), ["C1"])
        none = self.client.post("/console/messages", {"sch1": "APT9999"})
        self.assertIn("No messages match", none.body)

    def test_search_by_control_id_newest_first(self) -> None:
        for control_id in ("A1", "A2", "A3"):
            self.send(control_id)
        self.client.login("viewer")
        results = self.client.get("/console/messages")
        order = re.findall(r"<td>(A\d)</td>", results.body)
        self.assertEqual(order, ["A3", "A2", "A1"])
        one = self.client.get("/console/messages?control_id=A2")
        self.assertEqual(re.findall(r"<td>(A\d)</td>", one.body), ["A2"])

    def test_content_is_audited_and_shown_with_positions(self) -> None:
        self.send("C1")
        self.client.login("admin")
        (message,) = self.running.messages()
        before = self.audit_actions().count("message.content")
        page = self.client.post(f"/console/messages/{message.id}/content")
        self.assertEqual(page.status, 200)
        self.assertIn('title="PID-3 (PID-3.1, PID-3.4)"', page.body)
        # MSH-1 is the field separator itself: shown once, as in the message.
        shown = re.sub(r"<[^>]+>", "", page.body)
        self.assertIn("MSH|^~\\&amp;|SCHED|CLINIC|", shown)
        self.assertIn("MRN4242", page.body)
        self.assertEqual(self.audit_actions().count("message.content"), before + 1)
        audit = self.running.rows(schema.audit)[-1]
        self.assertEqual((audit["who"], audit["target"]), ("admin", f"message {message.id}"))

    def test_replay_the_searched_messages_after_confirming_the_count(self) -> None:
        """The message browser replays what the current filters find: it counts them
        first, replays only that count (a changed set is refused), and audits it."""
        self.send("R1", mrn="MRN1")
        self.send("R2", mrn="MRN2")
        self.send("R3", mrn="MRN1")
        self.client.login("operator")
        page = self.client.post("/console/messages", {"pid3": "MRN1"})
        self.assertIn("/console/messages/replay", page.body)
        counted = self.client.post(
            "/console/messages/replay", {"pid3": "MRN1", "reason": "partner lost them"}
        )
        self.assertEqual(counted.status, 200)
        self.assertIn("<strong>2</strong> accepted messages", counted.body)
        # The confirmation carries the filters in the form, never in its address.
        self.assertIn('name="pid3" value="MRN1"', counted.body)
        self.assertIn('name="count" value="2"', counted.body)
        self.assertEqual(len(self.running.rows(schema.executions)), 3)  # nothing ran yet
        self.send("R4", mrn="MRN1")  # the set grows between the count and the confirmation
        stale = self.client.post(
            "/console/messages/replay",
            {"pid3": "MRN1", "reason": "partner lost them", "confirm": "yes", "count": "2"},
        )
        self.assertEqual(stale.status, 409)
        self.assertIn("3 messages match now, not 2", stale.body)
        self.assertEqual(len(self.running.rows(schema.executions)), 4)
        done = self.client.post(
            "/console/messages/replay",
            {"pid3": "MRN1", "reason": "partner lost them", "confirm": "yes", "count": "3"},
        )
        self.assertEqual(done.status, 303)
        self.assertEqual(done.header("location"), "/console/messages?done=replay+3+messages")
        self.running.settle()
        self.assertEqual(len(self.running.rows(schema.executions)), 7)
        self.assertEqual(len(self.running.peer(2700).received), 7)
        replays = [r for r in self.running.rows(schema.audit) if r["action"] == "message.replay"]
        self.assertEqual(
            [r["result"] for r in replays], ["refused: 3 messages match now, not 2", "ok"]
        )
        self.assertEqual(replays[-1]["who"], "operator")
        self.assertEqual(replays[-1]["reason"], "partner lost them")
        self.assertNotIn("MRN1", replays[-1]["target"])  # a patient ID is not audited
        self.assertIn("pid3=(given)", replays[-1]["target"])

    def test_viewer_cannot_replay_messages(self) -> None:
        self.send("V1")
        self.client.login("viewer")
        page = self.client.get("/console/messages")
        self.assertNotIn("/console/messages/replay", page.body)
        refused = self.client.post(
            "/console/messages/replay",
            {"reason": "r", "confirm": "yes", "count": "1"},
        )
        self.assertEqual(refused.status, 403)
        self.assertEqual(len(self.running.rows(schema.executions)), 1)

    def test_viewer_cannot_see_content(self) -> None:
        self.send("C1")
        self.client.login("viewer")
        (message,) = self.running.messages()
        detail = self.client.get(f"/console/messages/{message.id}")
        self.assertNotIn("Show content", detail.body)
        refused = self.client.post(f"/console/messages/{message.id}/content")
        self.assertEqual(refused.status, 403)
        self.assertNotIn("MRN4242", refused.body)
        self.assertNotIn("message.content", self.audit_actions())


class QueueTests(ConsoleTestCase):
    def hold_one(self) -> int:
        self.running.peer(2700).script = answer_with("AR")
        self.send("C1", held=True)
        (delivery,) = self.running.rows(schema.deliveries)
        self.assertEqual(delivery["state"], "held")
        return int(delivery["id"])

    def test_held_delivery_shows_why_and_is_released(self) -> None:
        delivery_id = self.hold_one()
        self.client.login("operator")
        page = self.client.get("/console/queues")
        self.assertIn("held: AR from destination", page.body)
        self.running.peer(2700).script = answer_with("AA")
        done = self.client.post(f"/console/queues/{delivery_id}/release", {"reason": "fixed"})
        self.assertEqual(done.status, 303)
        self.running.settle()
        (delivery,) = self.running.rows(schema.deliveries)
        self.assertEqual(delivery["state"], "delivered")
        audit = self.running.rows(schema.audit)[-1]
        self.assertEqual(
            (audit["who"], audit["action"], audit["reason"]),
            ("operator", "delivery.release", "fixed"),
        )

    def test_pause_keeps_queueing_then_resume_sends(self) -> None:
        self.client.login("operator")
        refused = self.client.post("/console/queues/pause", {"address": "127.0.0.1:2700"})
        self.assertEqual(refused.status, 400)  # a pause needs a reason
        done = self.client.post(
            "/console/queues/pause", {"address": "127.0.0.1:2700", "reason": "partner upgrade"}
        )
        self.assertEqual(done.status, 303)
        self.running.send(message_to(self.flow_id, "P1"))
        self.running.clock.advance(60)
        (delivery,) = self.running.rows(schema.deliveries)
        self.assertEqual(delivery["state"], "queued")
        self.assertEqual(self.running.peer(2700).received, [])
        page = self.client.get("/console/queues")
        self.assertIn("paused by operator", page.body)
        panel = self.client.get("/console/dashboard/panel")
        self.assertIn('data-col="paused">paused by operator<', panel.body)
        self.client.post("/console/queues/resume", {"address": "127.0.0.1:2700", "reason": ""})
        self.running.settle()
        self.assertEqual(self.running.rows(schema.deliveries)[0]["state"], "delivered")
        actions = [(r["action"], r["via"]) for r in self.running.rows(schema.audit)]
        self.assertIn(("destination.pause", "api"), actions)
        self.assertIn(("destination.resume", "api"), actions)

    def test_release_needs_a_reason(self) -> None:
        delivery_id = self.hold_one()
        self.client.login("operator")
        refused = self.client.post(f"/console/queues/{delivery_id}/release", {"reason": ""})
        self.assertEqual(refused.status, 400)

    def test_viewer_cannot_act(self) -> None:
        delivery_id = self.hold_one()
        self.client.login("viewer")
        page = self.client.get("/console/queues")
        self.assertNotIn("/release", page.body)
        refused = self.client.post(f"/console/queues/{delivery_id}/release", {"reason": "x"})
        self.assertEqual(refused.status, 403)
        (delivery,) = self.running.rows(schema.deliveries)
        self.assertEqual(delivery["state"], "held")

    def test_skip_then_replay_after_count_confirmation(self) -> None:
        delivery_id = self.hold_one()
        self.client.login("operator")
        self.client.post(f"/console/queues/{delivery_id}/skip", {"reason": "later"})
        self.assertEqual(self.running.rows(schema.deliveries)[0]["state"], "skipped")
        endpoint = "127.0.0.1:2700"  # the destination's address, as the page offers it
        confirm = self.client.post(
            "/console/queues/replay", {"destination": endpoint, "state": "skipped", "reason": "r"}
        )
        self.assertIn("<strong>1</strong> skipped deliveries", confirm.body)
        self.assertEqual(self.running.rows(schema.deliveries)[0]["state"], "skipped")
        self.running.peer(2700).script = answer_with("AA")
        stale = self.client.post(
            "/console/queues/replay",
            {
                "destination": endpoint,
                "state": "skipped",
                "reason": "r",
                "confirm": "yes",
                "count": "2",
            },
        )
        self.assertEqual(stale.status, 409)
        done = self.client.post(
            "/console/queues/replay",
            {
                "destination": endpoint,
                "state": "skipped",
                "reason": "r",
                "confirm": "yes",
                "count": "1",
            },
        )
        self.assertEqual(done.status, 303)
        self.running.run_until(
            lambda: self.running.rows(schema.deliveries)[0]["state"] == "delivered"
        )
        self.assertEqual(len(self.running.peer(2700).received), 2)
        audited = [(r["action"], r["who"], r["via"]) for r in self.running.rows(schema.audit)]
        self.assertIn(("deliveries.replay", "operator", "api"), audited)
        self.assertIn(("delivery.replay", "operator", "api"), audited)

    def test_replay_of_an_unknown_state_is_refused(self) -> None:
        self.client.login("operator")
        refused = self.client.post(
            "/console/queues/replay",
            {"destination": "127.0.0.1:2700", "state": "queued", "reason": "r"},
        )
        self.assertEqual(refused.status, 400)
        self.assertIn("state: expected one of skipped, delivered", refused.body)


class FlowEditorTests(ConsoleTestCase):
    def editor_form(self, **overrides: str | list[str]) -> dict[str, str | list[str]]:
        form: dict[str, str | list[str]] = {
            "tenant": "test",
            "app_id": "",
            "app_name": "Console app",
            "flow_name": "New SIU",
            "message_type": "SIU^S12",
            "connection": "mllp",
            "enabled": "on",
            "sample": SIU_SAMPLE,
            "action_name": ["to_crm"],
            "action_host": ["127.0.0.1"],
            "action_port": ["2701"],
            "action_protocol": ["mllp"],
            "action_type": ["SIU^S12"],
            "action_ordering_key": [""],
            "action_template": [TEMPLATE],
            "fake_response": [""],
        }
        form.update(overrides)
        return form

    def test_catalogue_of_a_pasted_sample(self) -> None:
        self.client.login("admin")
        page = self.client.post("/console/flows/catalogue", {"sample": SIU_SAMPLE})
        self.assertIn('data-insert="{{ msg[&#34;PID-3.1&#34;] }}"', page.body)
        self.assertIn("MRN4242", page.body)

    def test_preview_renders_against_the_sample(self) -> None:
        self.client.login("admin")
        page = self.client.post("/console/flows/preview", {**self.editor_form(), "step": "0"})
        self.assertIn("SCH|APT1001", page.body)
        self.assertIn("PID|1||MRN4242", page.body)

    def test_preview_of_a_chained_action_uses_the_fake_response(self) -> None:
        self.client.login("admin")
        second = TEMPLATE + 'NTE|1||CRM id {{ actions.to_crm["MSA-3"] }}\n'
        form = self.editor_form(
            action_name=["to_crm", "follow_up"],
            action_host=["127.0.0.1", "127.0.0.1"],
            action_port=["2701", "2702"],
            action_protocol=["mllp", "mllp"],
            action_type=["SIU^S12", "SIU^S12"],
            action_ordering_key=["", ""],
            action_template=[TEMPLATE, second],
            fake_response=[
                "MSH|^~\\&|CRM|CRM|GW|DEMO|20240101||ACK^S12|R1|P|2.5\nMSA|AA|X1|CRM-77\n",
                "",
            ],
        )
        page = self.client.post("/console/flows/preview", {**form, "step": "1"})
        self.assertIn("NTE|1||CRM id CRM-77", page.body)
        form["fake_response"] = ["", ""]
        empty = self.client.post("/console/flows/preview", {**form, "step": "1"})
        self.assertNotIn("CRM-77", empty.body)

    def test_validation_errors_carry_the_template_line(self) -> None:
        self.client.login("admin")
        broken = TEMPLATE + "{% if %}\n"
        page = self.client.post(
            "/console/flows/editor",
            self.editor_form(intent="save", action_template=[broken]),
        )
        self.assertEqual(page.status, 422)
        self.assertIn("template line 4", page.body)
        self.assertEqual(len(self.client.get("/console/flows").body.split("<code>FLW")) - 1, 1)

    def test_save_shows_what_the_sender_needs_and_routes(self) -> None:
        self.client.login("admin")
        page = self.client.post("/console/flows/editor", self.editor_form(intent="save"))
        self.assertEqual(page.status, 200)
        found = dict(re.findall(r'data-testid="(host|port|app_id|flow_id)">([^<]*)<', page.body))
        self.assertEqual((found["host"], found["port"]), ("0.0.0.0", "2575"))
        self.assertTrue(found["app_id"].startswith("APP"))
        self.assertTrue(found["flow_id"].startswith("FLW"))
        self.assertIn("flow.save", self.audit_actions())
        export = self.client.get(f"/console/flows/export/{found['app_id']}")
        self.assertIn(f'flow_id = "{found["flow_id"]}"', export.body)
        self.assertIn("SCH|APT1001", export.body)

    def test_operator_disables_and_enables_a_flow(self) -> None:
        self.client.login("operator")
        page = self.client.get("/console/flows")
        self.assertIn("Disable Appointments", page.body)
        self.assertNotIn("New flow", page.body)  # creating flows is for admins
        done = self.client.post(f"/console/flows/{self.flow_id}/disable", {"reason": "moving"})
        self.assertEqual(done.status, 303)
        self.assertIn("Enable Appointments", self.client.get("/console/flows").body)
        again = self.client.post(f"/console/flows/{self.flow_id}/disable")
        self.assertEqual(again.status, 409)
        self.client.post(f"/console/flows/{self.flow_id}/enable")
        actions = [r["action"] for r in self.running.rows(schema.audit)]
        self.assertEqual(actions[-2:], ["flow.disable", "flow.enable"])
        viewer = self.fresh_client()
        viewer.login("viewer")
        self.assertNotIn("Disable Appointments", viewer.get("/console/flows").body)
        refused = viewer.post(f"/console/flows/{self.flow_id}/disable")
        self.assertEqual(refused.status, 403)

    def test_edit_an_existing_flow_keeps_its_ids(self) -> None:
        self.client.login("admin")
        page = self.client.get(f"/console/flows/{self.flow_id}")
        self.assertIn(f'name="flow_id" value="{self.flow_id}"', page.body)
        self.assertIn('value="APPFLOWTEST" selected', page.body)
        changed = TEMPLATE + "NTE|1||edited in the console\n"
        saved = self.client.post(
            "/console/flows/editor",
            self.editor_form(
                intent="save",
                flow_id=self.flow_id,
                app_id="APPFLOWTEST",
                flow_name="Appointments",
                action_port=["2700"],
                action_template=[changed],
            ),
        )
        self.assertIn(f'data-testid="flow_id">{self.flow_id}<', saved.body)
        self.assertIn('data-testid="app_id">APPFLOWTEST<', saved.body)
        (row,) = self.running.rows(schema.flows)
        self.assertIn("edited in the console", row["actions"])

    def test_viewer_cannot_save(self) -> None:
        self.client.login("viewer")
        refused = self.client.post("/console/flows/editor", self.editor_form(intent="save"))
        self.assertEqual(refused.status, 403)

    def test_add_action(self) -> None:
        self.client.login("admin")
        page = self.client.post("/console/flows/editor", self.editor_form(intent="add_action"))
        self.assertIn("Action 2", page.body)


class LogAndAuditTests(ConsoleTestCase):
    def test_log_newest_first_and_tail(self) -> None:
        self.send("C1")
        self.client.login("viewer")
        page = self.client.get("/console/logs")
        ids = [int(x) for x in re.findall(r'data-log="(\d+)"', page.body)]
        self.assertEqual(ids, sorted(ids, reverse=True))
        tail = self.client.get(f"/console/logs/tail?after={ids[0]}")
        self.assertEqual(re.findall(r'data-log="(\d+)"', tail.body), [])
        self.send("C2")
        tail = self.client.get(f"/console/logs/tail?after={ids[0]}")
        new = [int(x) for x in re.findall(r'data-log="(\d+)"', tail.body)]
        self.assertTrue(new and min(new) > ids[0])
        self.assertIn(f"after={max(new)}", tail.body)

    def test_audit_and_users_are_admin_only(self) -> None:
        self.client.login("operator")
        self.assertEqual(self.client.get("/console/audit").status, 403)
        self.assertEqual(self.client.get("/console/users").status, 403)
        admin = self.fresh_client()
        admin.login("admin")
        self.assertIn("console.login", admin.get("/console/audit").body)
        self.assertIn("<td>viewer</td>", admin.get("/console/users").body)


class RenderingTests(SynchronousTestCase):
    def test_hl7_lines_positions(self) -> None:
        raw = hl7_message("ADT^A04", "X1").replace(b"\n", b"\r") + b"\rPID|1||123^^^H||Doe^J"
        lines = hl7_lines(raw)
        self.assertEqual(lines[0][1], ("|", "MSH-1 field separator"))
        self.assertEqual(lines[0][2][1], "MSH-2")
        pid = lines[-1]
        self.assertEqual(pid[5], ("Doe^J", "PID-5 (PID-5.1, PID-5.2)"))

    def test_sparkline_has_no_script(self) -> None:
        svg = str(sparkline([0, 1, 2]))
        self.assertTrue(svg.startswith("<svg"))
        self.assertNotIn("script", svg)
        self.assertIn("3 executions", svg)


class MountTests(SynchronousTestCase):
    """The console beside the JSON API in the admin service's site."""

    def setUp(self) -> None:
        from types import SimpleNamespace

        from udsgateway.admin.console.mount import ConsoleSite, console_for
        from udsgateway.config import GatewayConfig, TenantConfig
        from udsgateway.testing.admin import AdminClient

        config = GatewayConfig(
            path="<memory>",
            database="sqlite:///:memory:",
            tenants=(TenantConfig(name="test", listen="tcp:port=2575"),),
        )
        self.admin = AdminClient()
        from twisted.internet.address import IPv4Address

        # A listener on a configured port 0: the flows show the port it opened.
        listener = SimpleNamespace(address=IPv4Address("TCP", "127.0.0.1", 43210))
        gateway = SimpleNamespace(config=config, dispatcher=None, listeners={"test": listener})
        self.admin.site = ConsoleSite(
            self.admin.api.app(), console_for(self.admin.api, gateway), reactor=self.admin.clock
        )
        self.admin.add_user("ops", "operator", password="ops password")

    def form_post(self, path: str, form: str, cookie: str = "") -> object:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": "http://admin.test",
        }
        if cookie:
            headers["Cookie"] = cookie
        return self.admin.request("POST", path, raw_body=form.encode(), headers=headers)

    def test_console_login_with_a_database_user_and_the_api_session(self) -> None:
        page = self.admin.request("GET", "/console/login")
        self.assertEqual(page.status, 200)
        self.assertIn(b"<form", page.body)
        wrong = self.form_post("/console/login", "name=ops&password=nope")
        self.assertEqual(wrong.status, 401)  # type: ignore[attr-defined]
        done = self.form_post("/console/login", "name=ops&password=ops+password")
        self.assertEqual(done.status, 303)  # type: ignore[attr-defined]
        cookie = done.header("set-cookie").split(";")[0]  # type: ignore[attr-defined]
        dashboard = self.admin.request("GET", "/console/", headers={"Cookie": cookie})
        self.assertEqual(dashboard.status, 200)
        self.assertIn(b"ops (operator)", dashboard.body)
        # The same session works for the JSON API.
        me = self.admin.request("GET", "/api/v1/me", headers={"Cookie": cookie})
        self.assertEqual(me.status, 200)

    def test_flows_show_the_port_the_listener_opened(self) -> None:
        from udsgateway import flowstore as store
        from udsgateway.testing.flows import app as make_app
        from udsgateway.testing.flows import flow as make_flow

        one = make_app(make_flow("Registrations", "ADT^A04", []))
        self.admin.database.transaction_now(store.save_app, one, 0.0)
        done = self.form_post("/console/login", "name=ops&password=ops+password")
        cookie = done.header("set-cookie").split(";")[0]  # type: ignore[attr-defined]
        flows = self.admin.request("GET", "/console/flows", headers={"Cookie": cookie})
        self.assertIn(b"<td>43210</td>", flows.body)

    def test_api_still_gated(self) -> None:
        refused = self.admin.request("GET", "/api/v1/status")
        self.assertEqual(refused.status, 401)
        too_big = self.admin.request(
            "POST",
            "/console/login",
            raw_body=b"x" * (1024 * 1024 + 1),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(too_big.status, 413)
