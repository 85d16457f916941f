"""Flows end to end: a sender, ``twistd udsgateway`` and two ``udsgateway receive``
destinations, over real sockets, with the SQLite file.

* One message of each first-class type goes through a flow of two chained actions
  (the second built from the first's ACK); each receiver gets exactly the bytes
  expected, HL7 escapes in patient names forwarded untouched.
* kill -9 at each execution state (``UDSGATEWAY_TEST_CRASH_AT``): after the inbound
  commit, after an action's delivery was enqueued, after a destination answered but
  before that was recorded. After the restart nothing is lost, every destination
  gets every message in arrival order, and nothing twice, but for the one message
  in flight at an ``after_send`` crash (at-least-once, docs/guarantees.md "Faults").
* ``udsgateway flows import`` of a file with template errors reports every one.

The gateway listens on port 0 (its port read back from its log); each receiver on a
port reserved for it beforehand (refused until it starts), so that a destination can
be down at first and come up later on the port the flows name.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    STARTUP_TIMEOUT,
    UDSGATEWAY,
    GatewayProcess,
    LoggedProcess,
    count,
    database_path,
    msa,
    new_directory,
    query,
    refusing_port,
    send_mllp,
    start_gateway,
    udsgateway,
    write_config,
)
from udsgateway.peers.commands import split_messages
from udsgateway.testing import hl7_message

TENANT = "e2e"
APP_ID = "APPE2E0000001"
SENT_AT = "20240301090000"
#: An app variable with every HL7 delimiter: escaped where a template inserts it.
NOTE = "A|B^C&D~E\\F"
NOTE_ON_THE_WIRE = "A\\F\\B\\S\\C\\T\\D\\R\\E\\E\\F"
DELIVERY_TIMEOUT = 20.0
_POLL = 0.05

#: Message type -> (Flow ID, patient name as sent, HL7-escaped).
TYPES = {
    "ADT^A04": ("FLWE2EA04", "O\\S\\Brien^Mary"),
    "ADT^A08": ("FLWE2EA08", "D\\F\\Angelo^Luca"),
    "SIU^S12": ("FLWE2ES12", "Smith\\T\\Jones^Ann"),
    "SIU^S14": ("FLWE2ES14", "Lee\\E\\Park\\R\\Kim^Min"),
    "SIU^S15": ("FLWE2ES15", "M\\X00FC\\ller^Hans"),
}


def inbound(message_type: str, control_id: str, mrn: str, name: str) -> bytes:
    """A message from the hospital of ``message_type`` for patient ``mrn``."""
    kind, event = message_type.split("^")
    if kind == "ADT":
        lines = [
            f"EVN|{event}|{SENT_AT}",
            f"PID|1||{mrn}^^^Hospital||{name}||19800101|M|||1 Main St^^City^ST^12345",
            "NK1|1|Doe^Jane|SPOUSE",
        ]
    else:
        lines = [
            f"SCH|APT{mrn}^SCHED|APT{mrn}^SCHED|||||CHECKUP^Annual checkup|ROUTINE|30|MIN",
            f"PID|1||{mrn}^^^Hospital||{name}||19800101|M",
            "RGS|1|A",
            "AIS|1|A|CHECKUP^Annual checkup|202403101000",
        ]
    return hl7_message(control_id, message_type, sent_at=SENT_AT, segments=lines)


def first_template(message_type: str) -> str:
    """The first action: the message for the first receiver, from the trigger."""
    kind, event = message_type.split("^")
    header = (
        "MSH|^~\\&|UDSGATEWAY|E2E|FIRST|FIRSTFAC|{{ now }}||"
        f"{message_type}|{{{{ control_id }}}}|P|2.5\n"
    )
    if kind == "ADT":
        return header + (
            f'EVN|{event}|{{{{ msg["EVN-2"] }}}}\n'
            'PID|1||{{ msg["PID-3.1"] }}^^^{{ msg["PID-3.4"] }}||{{ msg["PID-5"] }}'
            '||{{ msg["PID-7"] }}|{{ msg["PID-8"] }}\n'
            'NK1|1|{{ msg["NK1-2"] }}|{{ msg["NK1-3"] }}\n'
        )
    return header + (
        'SCH|{{ msg["SCH-1"] }}|{{ msg["SCH-2"] }}|||||{{ msg["SCH-7"] }}\n'
        'PID|1||{{ msg["PID-3.1"] }}||{{ msg["PID-5"] }}\n'
        'RGS|1|{{ msg["RGS-2"] }}\n'
        'AIS|1|{{ msg["AIS-2"] }}|{{ msg["AIS-3"] }}|{{ msg["AIS-4"] }}\n'
    )


def second_template(message_type: str) -> str:
    """The second action: built from the trigger and the first receiver's ACK."""
    return (
        "MSH|^~\\&|UDSGATEWAY|E2E|SECOND|SECONDFAC|{{ now }}||"
        f"{message_type}|{{{{ control_id }}}}|P|2.5\n"
        'PID|1||{{ msg["PID-3.1"] }}||{{ msg["PID-5.1"] }}^{{ msg["PID-5.2"] }}\n'
        'ZFA|{{ actions.first["MSA-1"] }}|{{ responses[0]["MSA-2"] }}'
        '|{{ responses[0]["MSA-1"] }}|{{ app.note }}\n'
    )


def expected_first(message_type: str, mrn: str, name: str) -> str:
    """What the first receiver gets, with ``{now}`` and ``{control_id}`` left open."""
    kind, event = message_type.split("^")
    header = (
        f"MSH|^~\\&|UDSGATEWAY|E2E|FIRST|FIRSTFAC|{{now}}||{message_type}|{{control_id}}|P|2.5\r"
    )
    if kind == "ADT":
        return header + (
            f"EVN|{event}|{SENT_AT}\r"
            f"PID|1||{mrn}^^^Hospital||{name}||19800101|M\r"
            "NK1|1|Doe^Jane|SPOUSE\r"
        )
    return header + (
        f"SCH|APT{mrn}^SCHED|APT{mrn}^SCHED|||||CHECKUP^Annual checkup\r"
        f"PID|1||{mrn}||{name}\r"
        "RGS|1|A\r"
        "AIS|1|A|CHECKUP^Annual checkup|202403101000\r"
    )


def expected_second(message_type: str, mrn: str, name: str, first_control_id: str) -> str:
    """What the second receiver gets, with ``{now}`` and ``{control_id}`` left open."""
    return (
        f"MSH|^~\\&|UDSGATEWAY|E2E|SECOND|SECONDFAC|{{now}}||{message_type}|{{control_id}}|P|2.5\r"
        f"PID|1||{mrn}||{name}\r"
        f"ZFA|AA|{first_control_id}|AA|{NOTE_ON_THE_WIRE}\r"
    )


def flow_file(first_port: int, second_port: int) -> str:
    """One app: a flow per first-class type, each with two chained actions.

    The S15 flow's second action speaks plain TCP; the others MLLP. Backoff is
    short so that a destination that comes up is reached within a second.
    """
    lines = [
        f'app_id = "{APP_ID}"',
        'name = "End to end"',
        f'tenant = "{TENANT}"',
        "",
        "[variables]",
        f"note = {_toml(NOTE)}",
    ]
    for number, (message_type, (flow_id, name)) in enumerate(TYPES.items()):
        sample = inbound(message_type, "SAMPLE", "MRN0", name.replace("\\", "")).decode()
        lines += [
            "",
            "[[flows]]",
            f'flow_id = "{flow_id}"',
            f'name = "{message_type} end to end"',
            "[flows.trigger]",
            f'message_type = "{message_type}"',
            f"sample = '''\n{sample.replace(chr(13), chr(10))}'''",
        ]
        for action_name, port, template, protocol in (
            ("first", first_port, first_template(message_type), "mllp"),
            (
                "second",
                second_port,
                second_template(message_type),
                "tcp" if number == 4 else "mllp",
            ),
        ):
            lines += [
                "",
                "[[flows.actions]]",
                f'name = "{action_name}"',
                'host = "127.0.0.1"',
                f"port = {port}",
                f'protocol = "{protocol}"',
                f'message_type = "{message_type}"',
                "connect_timeout = 2",
                "backoff_initial = 0.2",
                "backoff_max = 1",
                f"template = '''\n{template}'''",
            ]
    return "\n".join(lines) + "\n"


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wait_until(
    done: Callable[[], bool],
    what: str,
    timeout: float = DELIVERY_TIMEOUT,
    log: Callable[[], str] = str,
) -> None:
    """Poll ``done()`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{log()}")
        time.sleep(_POLL)


# -- destinations: ``udsgateway receive`` processes


@define
class Receiver:
    """A ``udsgateway receive --output FILE`` process: a destination that ACKs (AA).

    Its port is reserved when it is made (``refusing_port``: connections are
    refused, as by a destination that is down) and handed over to the process
    once it listens.
    """

    directory: Path
    port: int = field(init=False)
    _placeholder: socket.socket | None = field(init=False, repr=False)
    _child: LoggedProcess = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._placeholder = refusing_port()
        self.port = self._placeholder.getsockname()[1]
        self._child = LoggedProcess(self.directory / f"receive-{self.port}.log")

    @property
    def output(self) -> Path:
        return self.directory / f"received-{self.port}.hl7"

    def start(self) -> None:
        """Start listening (``wait_ready`` waits for it)."""
        argv = [str(UDSGATEWAY), "receive", "--port", str(self.port), "--output", str(self.output)]
        self._child.spawn(argv, self.directory, os.environ)

    def wait_ready(self) -> None:
        """Wait for "listening on"; fail if the process exits first or at the deadline."""
        process = self._child.started()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        marker = f"listening on 127.0.0.1:{self.port}"
        while marker not in self.log_text():
            if process.poll() is not None or time.monotonic() >= deadline:
                raise AssertionError(f"receiver on {self.port} did not start:\n{self.log_text()}")
            self._child.pause()
        self._release()

    def _release(self) -> None:
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def messages(self) -> list[bytes]:
        """Every message received so far, in order, with its CR segment separators."""
        try:
            data = self.output.read_bytes()
        except FileNotFoundError:
            return []
        # Only whole records: the receiver appends each one with its final LF.
        return split_messages(data[: data.rfind(b"\n") + 1])

    def stop(self) -> None:
        """Stop the process (SIGTERM) and free the port: always safe to call."""
        self._child.stop(signal.SIGTERM)
        self._release()

    def log_text(self) -> str:
        return self._child.log_text()


def start_all(
    test: SynchronousTestCase,
    receivers: Sequence[Receiver],
    config: Path,
    crash_at: str = "",
) -> GatewayProcess:
    """Start the receivers and the gateway at once (process start-up dominates these
    tests), then wait until every one listens; all are stopped in the test's cleanup.
    The gateway's ``port`` is the one it bound."""
    for receiver in receivers:
        test.addCleanup(receiver.stop)
        receiver.start()
    gateway = start_gateway(test, config, crash_at=crash_at, wait=False)
    for receiver in receivers:
        receiver.wait_ready()
    gateway.wait_ready()
    return gateway


# -- reading what happened


def fields(message: bytes, name: str) -> list[str]:
    """The fields of the first ``name`` segment (index 0 is the name)."""
    for line in message.decode("latin-1").split("\r"):
        if line.startswith(name + "|"):
            return line.split("|")
    raise AssertionError(f"no {name} segment in {message!r}")


def patients(messages: Sequence[bytes]) -> list[str]:
    """PID-3.1 of each message."""
    return [fields(message, "PID")[3].split("^")[0] for message in messages]


def deliveries(database: Path) -> list[dict[str, Any]]:
    """Every delivery, with its trigger's MSH-10 and flow, in enqueue order."""
    return query(
        database,
        "SELECT d.id, d.step, d.control_id, d.payload, d.state, d.attempts,"
        " e.flow_id, m.control_id AS trigger"
        " FROM deliveries d JOIN executions e ON e.id = d.execution_id"
        " JOIN messages m ON m.id = e.message_id ORDER BY d.id",
    )


def unfinished(database: Path) -> int:
    """Executions not done yet (pending, waiting or failed)."""
    return count(database, "SELECT count(*) FROM executions WHERE state != 'done'")


#: MSH-10 of the crash tests' messages, in sending order.
MESSAGES = tuple(f"CRASH{n:04d}" for n in range(1, 7))


def states(database: Path) -> list[tuple[str, str]]:
    """(trigger MSH-10, state) of every execution, in creation order."""
    return [
        (row["control_id"], row["state"])
        for row in query(
            database,
            "SELECT m.control_id, e.state FROM executions e"
            " JOIN messages m ON m.id = e.message_id ORDER BY e.id",
        )
    ]


def open_deliveries(database: Path) -> list[str]:
    """Trigger MSH-10 of every queued or held delivery, in enqueue order."""
    return [str(row["trigger"]) for row in deliveries(database) if row["state"] != "delivered"]


def send_all(port: int, messages: Mapping[str, bytes]) -> list[str]:
    """Send each message (MLLP, one connection each), in order, until one gets no
    ACK (the gateway died); return the MSH-10 of those not acknowledged."""
    unanswered = list(messages)
    for control_id, message in messages.items():
        try:
            ack = send_mllp(port, message)
        except OSError:
            break
        if ack is None:
            break
        assert msa(ack) == ("AA", control_id), ack
        unanswered.remove(control_id)
    return unanswered


class FlowsEndToEndTests(SynchronousTestCase):
    """Every first-class message type through two chained actions."""

    def test_five_types_two_chained_actions(self) -> None:
        """Each receiver gets exactly the expected bytes for each type: escaped patient
        names forwarded byte for byte, the app variable escaped, and the second
        message carrying the first receiver's MSA-1 and MSA-2; MSH-7 is a timestamp
        and MSH-10 the control ID stored with the delivery."""
        directory = new_directory(self)
        first, second = Receiver(directory), Receiver(directory)
        self.addCleanup(first.stop)
        self.addCleanup(second.stop)
        flows = directory / "e2e.toml"
        flows.write_text(flow_file(first.port, second.port), encoding="utf-8")
        config = write_config(directory, {TENANT: 0}, {TENANT: [flows]})
        database = database_path(directory)
        gateway = start_all(self, [first, second], config)

        sent = {}
        for number, (message_type, (_flow_id, name)) in enumerate(TYPES.items(), start=1):
            control_id, mrn = f"E2E{number:05d}", f"MRN{number}"
            sent[control_id] = (message_type, mrn, name)
            ack = send_mllp(gateway.port, inbound(message_type, control_id, mrn, name))
            assert ack is not None, gateway.log_text()
            self.assertEqual(msa(ack), ("AA", control_id))
        wait_until(
            lambda: len(first.messages()) == 5 and len(second.messages()) == 5,
            "five messages at each receiver",
            log=gateway.log_text,
        )
        wait_until(lambda: unfinished(database) == 0, "every execution done", log=gateway.log_text)

        rows = deliveries(database)
        self.assertEqual(len(rows), 10)
        self.assertEqual({(row["state"], row["attempts"]) for row in rows}, {("delivered", 1)})
        by_control_id = {row["control_id"]: row for row in rows}
        first_of = {row["trigger"]: row["control_id"] for row in rows if row["step"] == 0}
        for receiver, step in ((first, 0), (second, 1)):
            received = receiver.messages()
            self.assertEqual(len(received), 5)
            for message in received:
                msh = fields(message, "MSH")
                now, control_id = msh[6], msh[9]
                self.assertRegex(now, r"^\d{14}$")
                row = by_control_id[control_id]
                self.assertEqual(row["step"], step)
                trigger = str(row["trigger"])
                message_type, mrn, name = sent[trigger]
                self.assertEqual(row["flow_id"], TYPES[message_type][0])
                if step == 0:
                    template = expected_first(message_type, mrn, name)
                else:
                    template = expected_second(message_type, mrn, name, first_of[trigger])
                expected = template.format(now=now, control_id=control_id).encode("latin-1")
                self.assertEqual(message, expected)
                # The stored payload is what went out, CR for CR.
                self.assertEqual(row["payload"], expected)


class CrashTests(SynchronousTestCase):
    """kill -9 at each execution state, then a restart: G1 and G2 across crashes."""

    def setup(self) -> tuple[Path, Path, Receiver, Receiver]:
        """Configuration and database for a gateway on any free port whose actions
        go to the first and the second receiver (not started yet)."""
        directory = new_directory(self)
        first, second = Receiver(directory), Receiver(directory)
        self.addCleanup(first.stop)
        self.addCleanup(second.stop)
        flows = directory / "e2e.toml"
        flows.write_text(flow_file(first.port, second.port), encoding="utf-8")
        config = write_config(directory, {TENANT: 0}, {TENANT: [flows]})
        return config, database_path(directory), first, second

    def registrations(self, numbers: range) -> dict[str, bytes]:
        """ADT^A04 messages for patients MRN<n>, by MSH-10."""
        return {
            f"CRASH{n:04d}": inbound("ADT^A04", f"CRASH{n:04d}", f"MRN{n}", "Doe^John")
            for n in numbers
        }

    def crash_and_recover(
        self,
        crash_at: str,
        first_up_before: bool,
        expected_first: list[str],
        at_the_crash: Callable[[Path, list[str], Receiver], None],
    ) -> None:
        """Run five registrations through a gateway that kills itself at ``crash_at``
        (with the first receiver running if ``first_up_before``, the second down),
        restart it with both receivers, resend what was not acknowledged, send a
        sixth; then check that each receiver got the messages in order, the first
        receiver exactly ``expected_first`` (PID-3.1 values), the second each once.

        ``at_the_crash(database, unanswered, first)`` checks the store the crash left.
        """
        config, database, first, second = self.setup()
        messages = self.registrations(range(1, 6))

        up = [first] if first_up_before else []
        crashing = start_all(self, up, config, crash_at=crash_at)
        unanswered = send_all(crashing.port, messages)
        self.assertEqual(crashing.wait_exit(), -signal.SIGKILL, crashing.log_text())
        at_the_crash(database, unanswered, first)

        down = [receiver for receiver in (first, second) if receiver not in up]
        restarted = start_all(self, down, config)
        later = self.registrations(range(6, 7))
        resend = {control_id: messages[control_id] for control_id in unanswered}
        self.assertEqual(send_all(restarted.port, {**resend, **later}), [], restarted.log_text())

        everyone = [f"MRN{n}" for n in range(1, 7)]
        wait_until(
            lambda: (
                len(first.messages()) >= len(expected_first)
                and len(second.messages()) >= len(everyone)
            ),
            "every message at both receivers",
            log=restarted.log_text,
        )
        wait_until(
            lambda: unfinished(database) == 0, "every execution done", log=restarted.log_text
        )

        self.assertEqual(patients(first.messages()), expected_first)
        self.assertEqual(patients(second.messages()), everyone)
        # Each message was received and processed once: resends were replays.
        self.assertEqual(count(database, "SELECT count(*) FROM logs WHERE event = 'received'"), 6)
        self.assertEqual(count(database, "SELECT count(*) FROM messages"), 6)
        self.assertEqual(count(database, "SELECT count(*) FROM executions"), 6)
        rows = deliveries(database)
        self.assertEqual([row["state"] for row in rows], ["delivered"] * 12)
        # Arrival order per action (G2): the deliveries of each step in message order.
        for step in (0, 1):
            self.assertEqual(
                [row["trigger"] for row in rows if row["step"] == step],
                [f"CRASH{n:04d}" for n in range(1, 7)],
            )

    def test_killed_after_commit_before_the_executor_ran(self) -> None:
        """kill -9 once the 4th message is committed, before it is answered or the
        executor ran (the first receiver down: the three before it wait in the queue).
        Its first action was enqueued in that commit (the fold) or waits for the
        executor. After the restart the queue and any pending execution resume in
        arrival order; the resent 4th message is a replay; nobody gets anything twice."""

        def at_the_crash(database: Path, unanswered: list[str], _first: Receiver) -> None:
            self.assertEqual(unanswered, ["CRASH0004", "CRASH0005"])
            found = states(database)
            # Each of the four waits on the receiver that is down (its first action
            # enqueued) or is pending (not yet picked up by the executor).
            self.assertEqual([trigger for trigger, _state in found], list(MESSAGES[:4]))
            self.assertLessEqual({state for _trigger, state in found}, {"pending", "waiting"})
            self.assertEqual(
                count(database, "SELECT count(*) FROM deliveries"),
                [state for _trigger, state in found].count("waiting"),
            )
            self.assertEqual(
                count(database, "SELECT count(*) FROM deliveries WHERE state = 'delivered'"), 0
            )

        self.crash_and_recover(
            "after_commit:4",
            first_up_before=False,
            expected_first=[f"MRN{n}" for n in range(1, 7)],
            at_the_crash=at_the_crash,
        )

    def test_killed_after_enqueue_before_sending(self) -> None:
        """kill -9 once the 4th delivery is committed (its execution waiting), before
        its lane sends it (the first receiver down). After the restart every delivery
        goes out in order, each once."""

        def at_the_crash(database: Path, unanswered: list[str], _first: Receiver) -> None:
            self.assertIn(unanswered, ([], ["CRASH0005"], ["CRASH0004", "CRASH0005"]))
            self.assertEqual(
                states(database)[:4],
                [(f"CRASH{n:04d}", "waiting") for n in range(1, 5)],
            )
            self.assertEqual(open_deliveries(database)[:4], [f"CRASH{n:04d}" for n in range(1, 5)])

        self.crash_and_recover(
            "after_enqueue:4",
            first_up_before=False,
            expected_first=[f"MRN{n}" for n in range(1, 7)],
            at_the_crash=at_the_crash,
        )

    def test_killed_after_send_before_the_ack_was_recorded(self) -> None:
        """kill -9 once the first receiver answered the 3rd message, before the answer
        was recorded (the second receiver down). The 3rd message is the one in flight:
        after the restart it is sent again (the documented at-least-once case), first,
        and nothing else twice; the second receiver gets everything once, in order."""

        def at_the_crash(database: Path, unanswered: list[str], first: Receiver) -> None:
            received = first.messages()
            self.assertEqual(patients(received), ["MRN1", "MRN2", "MRN3"])
            first_steps = [
                (row["trigger"], row["state"]) for row in deliveries(database) if row["step"] == 0
            ]
            self.assertEqual(
                first_steps[:3],
                [("CRASH0001", "delivered"), ("CRASH0002", "delivered"), ("CRASH0003", "queued")],
            )

        self.crash_and_recover(
            "after_send:3",
            first_up_before=True,
            expected_first=["MRN1", "MRN2", "MRN3", "MRN3", "MRN4", "MRN5", "MRN6"],
            at_the_crash=at_the_crash,
        )


class FlowsImportTests(SynchronousTestCase):
    """``udsgateway flows import`` checks every template against its trigger's sample."""

    def test_template_errors_are_all_reported(self) -> None:
        """A flow file with several template errors in several flows and actions: each
        is reported with its file, flow, action and template line; exit status 2;
        nothing is imported."""
        directory = new_directory(self)
        config = write_config(directory, {TENANT: 0})
        header = "MSH|^~\\&|UDSGATEWAY|E2E|FIRST|FIRSTFAC|{{ now }}||{type}|{{ control_id }}|P|2.5"
        adt_sample = inbound("ADT^A04", "SAMPLE", "MRN0", "Doe^John").decode().replace("\r", "\n")
        siu_sample = inbound("SIU^S12", "SAMPLE", "MRN0", "Doe^John").decode().replace("\r", "\n")
        path = directory / "broken.toml"
        path.write_text(
            f"""\
name = "Broken templates"
tenant = "{TENANT}"

[[flows]]
name = "Registration"
[flows.trigger]
message_type = "ADT^A04"
sample = '''
{adt_sample}'''

[[flows.actions]]
name = "first"
host = "127.0.0.1"
port = 26741
message_type = "ADT^A04"
template = '''
{header.replace("{type}", "ADT^A04")}
EVN|A04
PID|1||{{{{ msg["PID-5.1"] | shout }}}}
PV1|{{{{ patient.room }}}}
'''

[[flows.actions]]
name = "second"
host = "127.0.0.1"
port = 26742
message_type = "ADT^A04"
template = '''
{header.replace("{type}", "ADT^A04")}
ZFA|{{{{ actions.lookup["MSA-2"] }}}}
'''

[[flows]]
name = "Appointments"
[flows.trigger]
message_type = "SIU^S12"
sample = '''
{siu_sample}'''

[[flows.actions]]
name = "only"
host = "127.0.0.1"
port = 26741
message_type = "SIU^S12"
template = '''
{header.replace("{type}", "SIU^S14")}
SCH|{{{{ msg["SCH-1"] }}}}
'''

[[flows.actions]]
name = "unclosed"
host = "127.0.0.1"
port = 26742
message_type = "SIU^S12"
template = '''
{header.replace("{type}", "SIU^S12")}
{{% if msg["PID-5.1"] %}}
PID|1
'''
""",
            encoding="utf-8",
        )

        result = udsgateway(config, "flows", "import", path)

        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        registration = f"{path}: flows[0] (Registration)"
        appointments = f"{path}: flows[1] (Appointments)"
        self.assertEqual(
            result.stderr.splitlines(),
            [
                f"udsgateway: {registration}: actions[0] (first): template line 3: "
                "unknown filter 'shout'",
                f"{registration}: actions[0] (first): template line 4: "
                "unknown variable 'patient' "
                "(known: msg, responses, actions, app, now, control_id)",
                f"{registration}: actions[1] (second): template line 2: "
                "no earlier action is named 'lookup'",
                f"{appointments}: actions[0] (only): template line 1: "
                "MSH-9 is 'SIU^S14' but the action sends SIU^S12",
                f"{appointments}: actions[1] (unclosed): template line 3: "
                "expected tag endif, found end of expression",
            ],
        )
        listed = udsgateway(config, "flows", "list", "--json")
        self.assertEqual((listed.returncode, listed.stdout), (0, ""), listed.stderr)
