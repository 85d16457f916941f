"""The operations endpoints: search, detail, audited content, queue control, replay, audit."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from udsgateway.testing import Gateway, hl7_message, mllp
from udsgateway.testing.admin import AdminClient


class OperationRouteTests(TestCase):
    def setUp(self) -> None:
        self.gateway = Gateway()
        connection = self.gateway.connect()
        for index in range(3):
            connection.send(
                mllp(
                    hl7_message(
                        f"CTRL{index}", segments=[f"PID|1||PAT{index}^^^H||Synthetic^Person"]
                    )
                )
            )
        self.client = AdminClient(database=self.gateway.database, with_operations=True)
        self.viewer = self.client.add_user("vera", "viewer")
        self.reader = self.client.add_user("carla", "viewer", view_content=True)
        self.operator = self.client.add_user("otto", "operator")
        self.admin = self.client.add_user("ada", "admin")

    def search(self, body: dict[str, object], token: str | None = None) -> dict[str, object]:
        reply = self.client.request(
            "POST", "/api/v1/messages/search", body, token=token or self.viewer
        )
        self.assertEqual(reply.status, 200, reply.body)
        result: dict[str, object] = reply.json
        return result

    def test_search_by_pid3_and_page(self) -> None:
        found = self.search({"pid3": "PAT1"})
        messages = found["messages"]
        assert isinstance(messages, list)
        self.assertEqual([m["control_id"] for m in messages], ["CTRL1"])
        page = self.search({"limit": 2})
        assert isinstance(page["messages"], list)
        self.assertEqual([m["control_id"] for m in page["messages"]], ["CTRL2", "CTRL1"])
        rest = self.search({"limit": 2, "before_id": page["next"]})
        assert isinstance(rest["messages"], list)
        self.assertEqual([m["control_id"] for m in rest["messages"]], ["CTRL0"])

    def test_search_refuses_unknown_filters(self) -> None:
        reply = self.client.request(
            "POST", "/api/v1/messages/search", {"pid99": "x"}, token=self.viewer
        )
        self.assertEqual(reply.status, 400)
        self.assertIn("unknown field 'pid99'", reply.json["error"])

    def test_detail_has_no_content_and_content_is_audited(self) -> None:
        message_id = self.search({"msh10": "CTRL0"})["messages"][0]["id"]  # type: ignore[index]
        detail = self.client.request("GET", f"/api/v1/messages/{message_id}", token=self.viewer)
        self.assertEqual(detail.status, 200)
        self.assertNotIn(b"Synthetic", detail.body)
        refused = self.client.request(
            "GET", f"/api/v1/messages/{message_id}/content", token=self.viewer
        )
        self.assertEqual(refused.status, 403)
        shown = self.client.request(
            "GET", f"/api/v1/messages/{message_id}/content?part=inbound", token=self.reader
        )
        self.assertEqual(shown.status, 200)
        self.assertIn("Synthetic^Person", shown.json["text"])
        trail = self.client.request("GET", "/api/v1/audit?action=content.", token=self.admin)
        entries = trail.json["entries"]
        self.assertEqual(
            [(e["who"], e["action"], e["target"], e["via"]) for e in entries],
            [("carla", "content.inbound", f"message {message_id}", "api")],
        )
        self.assertEqual(
            self.client.request("GET", "/api/v1/messages/99999", token=self.viewer).status, 404
        )
        bad_part = self.client.request(
            "GET", f"/api/v1/messages/{message_id}/content?part=outbound", token=self.reader
        )
        self.assertEqual(bad_part.status, 400)

    def test_pause_resume_conflict_and_audit(self) -> None:
        path = "/api/v1/destinations/127.0.0.1:9999"
        reply = self.client.request(
            "POST", path + "/pause", {"reason": "partner maintenance"}, token=self.operator
        )
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.json["paused_by"], "otto")
        again = self.client.request("POST", path + "/pause", {"reason": "x"}, token=self.operator)
        self.assertEqual(again.status, 409)
        listed = self.client.request("GET", "/api/v1/destinations", token=self.viewer).json
        self.assertEqual([d["destination"] for d in listed], ["127.0.0.1:9999"])
        self.assertEqual(
            self.client.request(
                "POST", path + "/pause", {"reason": "x"}, token=self.viewer
            ).status,
            403,
        )
        self.assertEqual(
            self.client.request("POST", path + "/pause", {}, token=self.operator).status, 400
        )
        resumed = self.client.request("POST", path + "/resume", {}, token=self.operator)
        self.assertEqual(resumed.status, 200)
        trail = self.client.request("GET", "/api/v1/audit?action=destination.", token=self.admin)
        self.assertEqual(
            [(e["action"], e["result"]) for e in trail.json["entries"]],
            [
                ("destination.resume", "ok"),
                ("destination.pause", "refused: destination 127.0.0.1:9999 is paused already"),
                ("destination.pause", "ok"),
            ],
        )

    def test_replay_set_counts_then_runs(self) -> None:
        counted = self.client.request(
            "POST", "/api/v1/replays", {"query": {"message_type": "ADT^A04"}}, token=self.operator
        )
        self.assertEqual((counted.status, counted.json["count"]), (200, 3))
        wrong = self.client.request(
            "POST",
            "/api/v1/replays",
            {"query": {"message_type": "ADT^A04"}, "confirm_count": 2, "reason": "test"},
            token=self.operator,
        )
        self.assertEqual(wrong.status, 409)
        ran = self.client.request(
            "POST",
            "/api/v1/replays",
            {"query": {"message_type": "ADT^A04"}, "confirm_count": 3, "reason": "test"},
            token=self.operator,
        )
        self.assertEqual((ran.status, ran.json["replayed"]), (200, 3))

    def test_deliveries_and_unknown_ids(self) -> None:
        listed = self.client.request("GET", "/api/v1/deliveries?state=held", token=self.viewer)
        self.assertEqual((listed.status, listed.json), (200, []))
        bad = self.client.request("GET", "/api/v1/deliveries?state=nope", token=self.viewer)
        self.assertEqual(bad.status, 400)
        missing = self.client.request(
            "POST", "/api/v1/deliveries/4242/skip", {"reason": "gone"}, token=self.operator
        )
        self.assertEqual(missing.status, 404)
        self.assertEqual(
            self.client.request("GET", "/api/v1/deliveries/abc", token=self.viewer).status, 404
        )

    def test_status_through_the_facade(self) -> None:
        status = self.client.request("GET", "/api/v1/status", token=self.viewer)
        self.assertEqual(status.status, 200)
        self.assertIn("rates", status.json)


class FlowAndLogRouteTests(TestCase):
    def setUp(self) -> None:
        self.gateway = Gateway()
        self.gateway.connect().send(mllp(hl7_message("CTRL1")))
        self.client = AdminClient(database=self.gateway.database, with_operations=True)
        self.viewer = self.client.add_user("vera", "viewer")
        self.operator = self.client.add_user("otto", "operator")
        self.admin = self.client.add_user("ada", "admin")
        flows = self.client.request("GET", "/api/v1/flows", token=self.viewer)
        self.assertEqual(flows.status, 200, flows.body)
        self.flows = flows.json

    def test_list_and_detail(self) -> None:
        first = self.flows[0]
        for key in ("app_id", "flow_id"):
            self.assertIn(key, first)
        detail = self.client.request("GET", f"/api/v1/flows/{first['flow_id']}", token=self.viewer)
        self.assertEqual(detail.status, 200)
        missing = self.client.request("GET", "/api/v1/flows/NOPE", token=self.viewer)
        self.assertEqual(missing.status, 404)

    def test_export_validate_import(self) -> None:
        app_id = self.flows[0]["app_id"]
        exported = self.client.request("GET", f"/api/v1/apps/{app_id}/export", token=self.operator)
        self.assertEqual(exported.status, 200)
        text = exported.json["text"]
        valid = self.client.request(
            "POST", "/api/v1/flows/validate", {"text": text}, token=self.operator
        )
        self.assertEqual((valid.status, valid.json["valid"]), (200, True))
        broken = self.client.request(
            "POST", "/api/v1/flows/validate", {"text": "app_id = 3"}, token=self.operator
        )
        self.assertEqual((broken.status, broken.json["valid"]), (200, False))
        self.assertTrue(broken.json["problems"])
        refused = self.client.request(
            "POST", "/api/v1/flows/import", {"text": text}, token=self.operator
        )
        self.assertEqual(refused.status, 403)
        imported = self.client.request(
            "POST", "/api/v1/flows/import", {"text": text}, token=self.admin
        )
        self.assertEqual(imported.status, 200, imported.body)
        bad = self.client.request(
            "POST", "/api/v1/flows/import", {"text": "app_id = 3"}, token=self.admin
        )
        self.assertEqual(bad.status, 400)

    def test_disable_enable_conflict(self) -> None:
        flow_id = self.flows[0]["flow_id"]
        path = f"/api/v1/flows/{flow_id}"
        off = self.client.request("POST", path + "/disable", {"reason": "t"}, token=self.operator)
        self.assertEqual(off.status, 200, off.body)
        again = self.client.request("POST", path + "/disable", {}, token=self.operator)
        self.assertEqual(again.status, 409)
        on = self.client.request("POST", path + "/enable", {}, token=self.operator)
        self.assertEqual(on.status, 200)
        trail = self.client.request(
            "GET", "/api/v1/audit?target=flow%20" + flow_id, token=self.admin
        )
        self.assertEqual(
            [(e["action"], e["result"][:7]) for e in trail.json["entries"]],
            [("flow.enable", "ok"), ("flow.disable", "refused"), ("flow.disable", "ok")],
        )

    def test_render(self) -> None:
        from udsgateway import flowstore as store
        from udsgateway.flows import Action, App, Flow, Trigger

        app = App(
            name="Render test",
            tenant="test",
            app_id="APPRENDER00001",
            flows=(
                Flow(
                    name="Render",
                    flow_id="FLWRENDER00001",
                    trigger=Trigger(
                        connection="mllp",
                        message_type="ADT^A04",
                        sample="MSH|^~\\&|HIS|H|GW|GW|20240101||ADT^A04|S1|P|2.5\n"
                        "PID|1||12345^^^H||Synthetic^Alex\n",
                    ),
                    actions=(
                        Action(
                            name="first",
                            host="127.0.0.1",
                            port=9,
                            message_type="ADT^A04",
                            template="MSH|^~\\&|GW|GW|P|P|{{ now }}||ADT^A04|{{ control_id }}"
                            "|P|2.5\nPID|1||{{ msg['PID-3.1'] }}\n",
                        ),
                        Action(
                            name="second",
                            host="127.0.0.1",
                            port=9,
                            message_type="ADT^A08",
                            template="MSH|^~\\&|GW|GW|P|P|{{ now }}||ADT^A08|{{ control_id }}"
                            "|P|2.5\nZRS|{{ responses.first['MSA-1'] }}\n",
                        ),
                    ),
                ),
            ),
        )
        self.gateway.database.transaction_now(store.save_app, app, 0.0)
        path = "/api/v1/flows/FLWRENDER00001/render"
        first = self.client.request("POST", path, {"action": "first"}, token=self.operator)
        self.assertEqual(first.status, 200, first.body)
        self.assertIn("PID|1||12345", first.json["text"])
        second = self.client.request(
            "POST",
            path,
            {
                "action": "1",
                "responses": {"first": "MSH|^~\\&|P|P|GW|GW|x||ACK|1|P|2.5\rMSA|AE|1"},
            },
            token=self.operator,
        )
        self.assertIn("ZRS|AE", second.json["text"])
        pasted = self.client.request(
            "POST",
            path,
            {"action": "first", "message": "MSH|^~\\&|A|B|C|D|x||ADT^A04|9|P|2.5\rPID|1||777"},
            token=self.operator,
        )
        self.assertIn("PID|1||777", pasted.json["text"])
        bad = self.client.request(
            "POST", path, {"action": "second", "responses": {"second": "x"}}, token=self.operator
        )
        self.assertEqual(bad.status, 400)
        not_text = self.client.request(
            "POST", path, {"action": "second", "responses": {"first": 3}}, token=self.operator
        )
        self.assertEqual(not_text.status, 400)
        self.assertIn("body.responses.first: expected a string", not_text.json["error"])
        self.assertEqual(
            self.client.request("POST", path, {"action": "nope"}, token=self.operator).status, 404
        )
        self.assertEqual(
            self.client.request("POST", path, {"action": "first"}, token=self.viewer).status, 403
        )

    def test_variables(self) -> None:
        sample = hl7_message("S1").decode("latin-1")
        pasted = self.client.request(
            "POST", "/api/v1/variables", {"sample": sample}, token=self.viewer
        )
        self.assertEqual(pasted.status, 200, pasted.body)
        self.assertTrue(pasted.json)

    def test_logs_and_tail(self) -> None:
        logs = self.client.request("GET", "/api/v1/logs", token=self.viewer)
        self.assertEqual(logs.status, 200)
        start = self.client.request("GET", "/api/v1/logs/tail", token=self.viewer).json
        self.assertEqual(start["lines"], [])
        # A long poll: no answer until the timeout passes on the clock.
        transport, _ = self.client.send_raw(
            f"GET /api/v1/logs/tail?after_id={start['last']}&timeout=5 HTTP/1.1\r\n"
            f"Host: a\r\nAuthorization: Bearer {self.viewer}\r\n\r\n".encode()
        )
        self.assertEqual(transport.value(), b"")
        self.client.clock.advance(6)
        from udsgateway.testing.admin import parse_response

        reply = parse_response(transport.value(), False)
        self.assertEqual((reply.status, reply.json["lines"]), (200, []))

    def test_a_long_poll_whose_client_left_is_cancelled(self) -> None:
        start = self.client.request("GET", "/api/v1/logs/tail", token=self.viewer).json
        transport, channel = self.client.send_raw(
            f"GET /api/v1/logs/tail?after_id={start['last']}&timeout=50 HTTP/1.1\r\n"
            f"Host: a\r\nAuthorization: Bearer {self.viewer}\r\n\r\n".encode()
        )
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        channel.connectionLost(Failure(ConnectionDone()))
        self.client.clock.advance(60)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])
