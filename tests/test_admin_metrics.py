"""/metrics: the udsgw_* names, and label values that never come from a message."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from udsgateway.admin.metrics import IDENTIFIER_LABELS, LABEL_ENUMS, Metrics
from udsgateway.config import TenantConfig
from udsgateway.store import schema
from udsgateway.store.engine import DELIVERY_BUCKETS, Durations
from udsgateway.testing import Gateway, hl7_message, mllp
from udsgateway.testing.admin import AdminClient

ENDPOINT = "tcp:host=127.0.0.1:port=9999"
DESTINATION = "127.0.0.1:9999"


class _Destination:
    sent = 3
    connects = 1
    _current = object()

    def __init__(self) -> None:
        self.ack_wait = Durations()
        for seconds in (0.002, 0.002, 7.0):
            self.ack_wait.observe(seconds)


class _Executor:
    rendered = 7
    failed = 1
    held = 2

    def __init__(self) -> None:
        self.flow_actions = {"FLOWA": {"rendered": 7, "failed": 1, "held": 2}}
        self.flow_executions = {"FLOWA": {"done": 5, "failed": 1, "held": 3}}


class _Dispatcher:
    queued = {ENDPOINT: 4}
    destinations = {ENDPOINT: _Destination()}
    sent = {DESTINATION: 5}
    paused = {DESTINATION: "otto"}

    def __init__(self) -> None:
        self.attempts = {
            DESTINATION: {
                "accepted": 5,
                "error": 2,
                "rejected": 1,
                "timeout": 4,
                "connect_failed": 9,
            }
        }
        self.delivery_latency = Durations(DELIVERY_BUCKETS)
        for seconds in (0.2, 42.0):
            self.delivery_latency.observe(seconds)


class _Service:
    """The parts of GatewayService the collector reads, over an in-memory tenant."""

    def __init__(self) -> None:
        self.gateway = Gateway()
        self.database = self.gateway.database
        self.factories = {"test": self.gateway.factory}
        self.ingests = {"test": self.gateway.ingest}
        self.executor = _Executor()
        self.dispatcher = _Dispatcher()
        self.committer = self.gateway.ingest._committer
        self.accepting = True


#: Text that appears only inside the messages sent: it must not reach the scrape.
SECRETS = ("CTRLSECRET", "PIDSECRET", "NAMESECRET", "SENDERSECRET")


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


class MetricsTests(TestCase):
    def setUp(self) -> None:
        self.service = _Service()
        connection = self.service.gateway.connect()
        sent = [
            mllp(
                hl7_message(
                    f"CTRLSECRET{index}",
                    sending="SENDERSECRET|Hospital",
                    segments=["PID|1||PIDSECRET^^^H||NAMESECRET^John"],
                )
            )
            for index in range(3)
        ]
        for frame in [*sent, sent[0]]:  # the last one again: a duplicate
            connection.send(frame)
        connection.send(mllp(b"MSH|^~\\&|bad"))  # rejected
        connection.send(mllp(hl7_message("CTRLSECRET9", message_type="ZZZ^Z99")))
        self.metrics = Metrics(self.service)

    def scrape(self) -> str:
        body, content_type = self.metrics.exposition()
        self.assertTrue(content_type.startswith(b"text/plain"))
        return body.decode()

    def test_names_are_udsgw(self) -> None:
        names = {family.name for family in text_string_to_metric_families(self.scrape())}
        self.assertTrue(names)
        for name in names:
            self.assertTrue(name.startswith("udsgw_"), name)
        for expected in (
            "udsgw_inbound_connections",
            "udsgw_inbound_messages",
            "udsgw_acks",
            "udsgw_queue_depth",
            "udsgw_destination_up",
            "udsgw_deliveries",
            "udsgw_oldest_pending_seconds",
        ):
            self.assertIn(expected, names)

    def test_counts(self) -> None:
        found = samples(self.scrape())
        accepted = [
            v
            for n, labels, v in found
            if n == "udsgw_inbound_messages_total"
            and labels == {"listener": "test", "outcome": "stored"}
        ]
        stats = self.service.gateway.ingest.stats
        self.assertEqual(accepted, [float(stats.stored)])
        self.assertGreaterEqual(stats.stored, 3)
        duplicate = [
            v
            for n, labels, v in found
            if n == "udsgw_inbound_messages_total" and labels["outcome"] == "duplicate"
        ]
        self.assertEqual(duplicate, [1.0])
        aa = [v for n, labels, v in found if n == "udsgw_acks_total" and labels["code"] == "AA"]
        self.assertEqual(aa, [3.0])
        replay = [
            v for n, labels, v in found if n == "udsgw_acks_total" and labels["code"] == "replay"
        ]
        self.assertEqual(replay, [1.0])
        self.assertIn(("udsgw_queue_depth", {"destination": DESTINATION}, 4.0), found)
        self.assertIn(("udsgw_destination_up", {"destination": DESTINATION}, 1.0), found)
        self.assertIn(("udsgw_delivered_total", {"destination": DESTINATION}, 5.0), found)
        self.assertIn(("udsgw_destination_paused", {"destination": DESTINATION}, 1.0), found)

    def test_proxy_refusals_by_reason(self) -> None:
        """A listener behind the PROXY protocol: its header refusals, one series per reason;
        a plain listener has none."""
        proxy_series = "udsgw_inbound_proxy_refused_connections_total"
        self.assertEqual([s for s in samples(self.scrape()) if s[0] == proxy_series], [])
        gateway = Gateway(tenant=TenantConfig(name="proxied", listen="haproxy:tcp:port=0"))
        self.service.factories["proxied"] = gateway.factory
        self.service.ingests["proxied"] = gateway.ingest
        proxy = gateway.factory.behind_proxy()
        for port in range(2):
            protocol = proxy.buildProtocol(IPv4Address("TCP", "10.9.9.9", port))
            assert protocol is not None
            protocol.makeConnection(StringTransport())
            protocol.dataReceived(b"no header\r\n")
        found = samples(self.scrape())
        series = {labels["reason"]: value for name, labels, value in found if name == proxy_series}
        self.assertEqual(
            series,
            {
                "bad_headers": 2.0,
                "header_timeouts": 0.0,
                "not_from_proxy": 0.0,
                "too_many_pending": 0.0,
            },
        )

    def test_per_flow_outcomes(self) -> None:
        """Executions per flow: routed from the ingest (each accepted message stored for
        the flow), done/failed/held from the executor; actions per flow and outcome."""
        found = samples(self.scrape())
        routed = {
            labels["flow"]: v
            for n, labels, v in found
            if n == "udsgw_flow_executions_total" and labels["outcome"] == "routed"
        }
        # Three distinct ADT^A04 messages (the duplicate is not stored again), each
        # routed to the tenant's ADT^A04 flow for MLLP.
        self.assertEqual(routed, {"FLWADTA04MLLP": 3.0})
        self.assertEqual(self.service.gateway.ingest.stats.routed["FLWADTA04MLLP"], 3)
        for outcome, value in (("done", 5.0), ("failed", 1.0), ("held", 3.0)):
            self.assertIn(
                ("udsgw_flow_executions_total", {"flow": "FLOWA", "outcome": outcome}, value),
                found,
            )
        for outcome, value in (("rendered", 7.0), ("failed", 1.0), ("held", 2.0)):
            self.assertIn(
                ("udsgw_actions_total", {"flow": "FLOWA", "outcome": outcome}, value), found
            )

    def test_outbound_attempts_by_outcome(self) -> None:
        found = samples(self.scrape())
        attempts = {
            labels["outcome"]: v
            for n, labels, v in found
            if n == "udsgw_outbound_attempts_total" and labels["destination"] == DESTINATION
        }
        self.assertEqual(
            attempts,
            {
                "accepted": 5.0,
                "error": 2.0,
                "rejected": 1.0,
                "timeout": 4.0,
                "connect_failed": 9.0,
            },
        )

    def test_an_outcome_outside_the_enum_is_not_a_label(self) -> None:
        self.service.dispatcher.attempts[DESTINATION]["CTRLSECRET1"] = 1
        self.service.executor.flow_executions["FLOWA"]["PIDSECRET"] = 1
        self.service.executor.flow_actions["FLOWA"]["PIDSECRET"] = 1
        text = self.scrape()
        self.assertNotIn("CTRLSECRET1", text)
        self.assertNotIn("PIDSECRET", text)

    def test_latency_histograms(self) -> None:
        """ACK latency per listener (every frame answered), ACK wait over all
        destinations, delivery latency from enqueue to the partner's ACK."""
        found = {(n, tuple(sorted(labels.items()))): v for n, labels, v in samples(self.scrape())}
        self.assertEqual(found[("udsgw_ack_latency_seconds_count", (("listener", "test"),))], 6)
        self.assertEqual(found[("udsgw_outbound_ack_wait_seconds_count", ())], 3)
        self.assertEqual(found[("udsgw_outbound_ack_wait_seconds_bucket", (("le", "0.0025"),))], 2)
        self.assertEqual(found[("udsgw_outbound_ack_wait_seconds_sum", ())], 7.004)
        self.assertEqual(found[("udsgw_delivery_latency_seconds_bucket", (("le", "0.5"),))], 1)
        self.assertEqual(found[("udsgw_delivery_latency_seconds_bucket", (("le", "60.0"),))], 2)
        self.assertEqual(found[("udsgw_delivery_latency_seconds_count", ())], 2)

    def test_store_commit_histogram(self) -> None:
        found = samples(self.scrape())
        groups = self.service.committer.groups
        self.assertGreater(groups, 0)
        self.assertIn(("udsgw_store_commit_seconds_count", {}, float(groups)), found)
        inf = [
            v
            for n, labels, v in found
            if n == "udsgw_store_commit_seconds_bucket" and labels.get("le") == "+Inf"
        ]
        self.assertEqual(inf, [float(groups)])

    def test_durations_buckets(self) -> None:
        from udsgateway.store.engine import Durations

        durations = Durations(bounds=(0.01, 0.1))
        for seconds in (0.005, 0.01, 0.05, 3.0):
            durations.observe(seconds)
        self.assertEqual(durations.counts, [2, 1, 1])
        self.assertAlmostEqual(durations.total, 3.065)

    def test_no_label_value_from_a_message(self) -> None:
        """Every label is a known identifier or a fixed enum; no message text anywhere."""
        self.insert_delivery()
        self.metrics.snapshot.clear()
        self.successResultOf(ensureDeferred(self.metrics.refresh(self.service.database)))
        text = self.scrape()
        for secret in SECRETS:
            self.assertNotIn(secret, text)
        routes = self.service.gateway.ingest.routes
        flows = {"FLOWA", *(flow_id for _app, flow_id in routes.by_id)}
        identifiers = {"listener": {"test"}, "destination": {DESTINATION}, "flow": flows}
        found = {name for name, _labels, _value in samples(text)}
        for name in (
            "udsgw_flow_executions_total",
            "udsgw_actions_total",
            "udsgw_outbound_attempts_total",
        ):
            self.assertIn(name, found)
        seen = 0
        for name, labels, _value in samples(text):
            for label, value in labels.items():
                seen += 1
                if label in IDENTIFIER_LABELS:
                    self.assertIn(value, identifiers[label], (name, label))
                else:
                    self.assertIn(label, LABEL_ENUMS, name)
                    self.assertIn(value, LABEL_ENUMS[label], (name, label))
        self.assertGreater(seen, 10)

    def test_the_label_check_can_fail(self) -> None:
        """A collector that put a control ID in a label would be caught."""
        self.service.dispatcher.queued = {"CTRLSECRET1": 1}
        text = self.scrape()
        self.assertIn("CTRLSECRET1", text)
        bad = [labels for n, labels, _ in samples(text) if n == "udsgw_queue_depth"]
        self.assertNotIn(bad[0]["destination"], {DESTINATION})

    def insert_delivery(self) -> None:
        def insert(connection: Any) -> None:
            connection.execute(
                schema.deliveries.insert().values(
                    lane=ENDPOINT + "+CTRLSECRET",
                    destination=ENDPOINT,
                    protocol="mllp",
                    control_id="CTRLSECRET5",
                    payload=b"PIDSECRET",
                    state="queued",
                    created_at=1_700_000_000.0,
                    updated_at=1_700_000_000.0,
                )
            )
            connection.execute(
                schema.executions.insert().values(
                    message_id=1,
                    flow_id="FLOWA",
                    state="waiting",
                    created_at=1.0,
                    updated_at=1.0,
                )
            )

        self.service.database.transaction_now(insert)

    def test_database_gauges_come_from_the_refresh_only(self) -> None:
        self.insert_delivery()
        before = samples(self.scrape())
        self.assertFalse([s for s in before if s[0] == "udsgw_deliveries"])
        self.successResultOf(ensureDeferred(self.metrics.refresh(self.service.database)))
        after = samples(self.scrape())
        self.assertIn(
            ("udsgw_deliveries", {"destination": DESTINATION, "state": "queued"}, 1.0), after
        )
        self.assertIn(("udsgw_open_executions", {"flow": "FLOWA", "state": "waiting"}, 1.0), after)

    def test_metrics_endpoint_needs_a_viewer(self) -> None:
        client = AdminClient(gateway=self.service, metrics=self.metrics)
        token = client.add_user("prom", "viewer")
        self.assertEqual(client.request("GET", "/metrics").status, 401)
        reply = client.request("GET", "/metrics", token=token)
        self.assertEqual(reply.status, 200)
        self.assertIn(b"udsgw_inbound_messages_total", reply.body)
        self.assertTrue((reply.header("content-type") or "").startswith("text/plain"))

    def test_status_endpoint(self) -> None:
        self.service.stats = lambda: {  # type: ignore[attr-defined]
            "test": {
                "listener": self.service.gateway.factory.stats,
                "ingest": self.service.gateway.ingest.stats,
                "port": "IPv4Address(...)",
            }
        }
        client = AdminClient(gateway=self.service)
        token = client.add_user("vera", "viewer")
        status = client.request("GET", "/api/v1/status", token=token).json
        self.assertTrue(status["ready"])
        self.assertEqual(
            status["tenants"]["test"]["ingest"]["stored"], self.service.gateway.ingest.stats.stored
        )
        self.assertEqual(status["destinations"], {ENDPOINT: {"open": 4}})


class EndToEndLeakTests(TestCase):
    """A whole gateway in memory: messages whose every field carries a marker go
    through ingest, the executor and the dispatcher (one destination answers AR and
    one AE, so every per-flow and per-attempt counter moves); no marker reaches the
    scrape, and every label is an identifier or a fixed value."""

    def test_per_flow_and_attempt_metrics_carry_no_message_text(self) -> None:
        from tests.test_executor import TRIGGER_ID, adt, header
        from udsgateway.store.destinations import address_of
        from udsgateway.testing.flows import FlowGateway, action, answer_with, app, flow

        running = FlowGateway(
            (
                app(
                    flow(
                        "good",
                        "ADT^A04",
                        [action("send", 2601, "ADT^A04", header("A") + TRIGGER_ID)],
                    ),
                    flow(
                        "nak",
                        "ADT^A04",
                        [action("send", 2602, "ADT^A04", header("B") + TRIGGER_ID)],
                    ),
                    flow(
                        "broken",
                        "ADT^A04",
                        [action("send", 2603, "ADT^A04", header("C") + "PID|{% if %}\n")],
                    ),
                ),
            )
        )
        self.addCleanup(running.stop)
        running.peer(2602).script = answer_with("AR", 206)
        for number in range(3):
            running.send(
                adt(
                    f"CTRLSECRET{number}",
                    family="NAMESECRET",
                    mrn="PIDSECRET",
                    street="STREETSECRET",
                    kin="KINSECRET",
                )
            )
        # Every good delivery done; the first of the AR lane held (its two followers wait).
        running.run_until(
            lambda: (
                running.executor.flow_executions.get("FLWGOOD", {}).get("done") == 3
                and running.executor.flow_executions.get("FLWNAK", {}).get("held") == 1
            )
        )

        class Service:
            factories = {"test": running.factory}
            ingests = {"test": running.ingest}
            executor = running.executor
            dispatcher = running.outbound.dispatcher
            committer = running.assembly.committer

        text = Metrics(Service()).exposition()[0].decode()
        for secret in (*SECRETS, "STREETSECRET", "KINSECRET"):
            self.assertNotIn(secret, text)
        found = samples(text)
        flows = {"FLWGOOD", "FLWNAK", "FLWBROKEN"}
        destinations = {address_of(e) for e in running.outbound.dispatcher.destinations}
        identifiers = {"listener": {"test"}, "flow": flows, "destination": destinations}
        for name, labels, _value in found:
            for label, value in labels.items():
                if label in IDENTIFIER_LABELS:
                    self.assertIn(value, identifiers[label], (name, label))
                else:
                    self.assertIn(value, LABEL_ENUMS[label], (name, label))
        by_flow = {
            (labels["flow"], labels["outcome"]): v
            for n, labels, v in found
            if n == "udsgw_flow_executions_total"
        }
        self.assertEqual(
            by_flow,
            {
                ("FLWGOOD", "routed"): 3.0,
                ("FLWGOOD", "done"): 3.0,
                ("FLWNAK", "routed"): 3.0,
                ("FLWNAK", "held"): 1.0,
                ("FLWBROKEN", "routed"): 3.0,
                ("FLWBROKEN", "held"): 3.0,
            },
        )
        attempts = {
            labels["outcome"]: v for n, labels, v in found if n == "udsgw_outbound_attempts_total"
        }
        self.assertEqual(attempts, {"accepted": 3.0, "rejected": 1.0})
