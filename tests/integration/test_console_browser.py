"""The web console in a real browser: Debian's Chromium, headless, driven by Playwright.

One gateway process (listeners on port 0, the admin service and its console
on port 0 too) with two test receivers: one answers AA, the other AR (a
NAKing partner, so its deliveries are held). Users are added with the
command line, as an operator would. With UDSGATEWAY_SCREENSHOTS=1 the tests
also write the screenshots of docs/console.md (docs/console/*.png).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    HOST,
    REPO,
    UDSGATEWAY,
    GatewayProcess,
    LoggedProcess,
    query,
    send_mllp,
)
from udsgateway.admin import auth
from udsgateway.cli.main import open_database
from udsgateway.config import load_config
from udsgateway.store import users
from udsgateway.testing.admin import TEST_SCRYPT_N

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = os.environ.get("UDSGATEWAY_SCREENSHOTS") == "1"
SHOTS = REPO / "docs" / "console"
TIMEOUT_MS = 30_000
#: Seconds a gateway or receiver may take to listen: generous, for a busy machine.
STARTUP = 90.0

PASSWORDS = {
    "admin": "admin password 1",
    "operator": "operator password 1",
    "viewer": "viewer password 1",
}

SIU_SAMPLE = (
    "MSH|^~\\&|SCHED|CLINIC|APPID|FLOWID|202401021000||SIU^S12|SIU00001|P|2.5\n"
    "SCH|APT7001|FILL7001|||||Checkup|NORMAL|30|min\n"
    "PID|1||MRN7001^^^CLINIC||Tester^Alice||19900101|F\n"
)

FLOW_FILE = """\
app_id = "APPBROWSER0001"
name = "Browser test app"
tenant = "demo"

[[flows]]
flow_id = "FLWBROWSERA04X"
name = "Registrations"
[flows.trigger]
message_type = "ADT^A04"
sample = '''
MSH|^~\\&|HIS|HOSP|APPBROWSER0001|FLWBROWSERA04X|202401011230||ADT^A04|S1|P|2.5
PID|1||MRN0^^^HOSP||Sample^Sam
'''
[[flows.actions]]
name = "to_partner"
host = "127.0.0.1"
port = {ok_port}
message_type = "ADT^A04"
template = '''
MSH|^~\\&|GW|DEMO|P|P|{{{{ now }}}}||ADT^A04|{{{{ control_id }}}}|P|2.5
PID|1||{{{{ msg["PID-3.1"] }}}}
'''

[[flows]]
flow_id = "FLWBROWSERA08X"
name = "Updates to a NAKing partner"
[flows.trigger]
message_type = "ADT^A08"
sample = '''
MSH|^~\\&|HIS|HOSP|APPBROWSER0001|FLWBROWSERA08X|202401011230||ADT^A08|S1|P|2.5
PID|1||MRN0^^^HOSP||Sample^Sam
'''
[[flows.actions]]
name = "to_naking_partner"
host = "127.0.0.1"
port = {nak_port}
message_type = "ADT^A08"
template = '''
MSH|^~\\&|GW|DEMO|P|P|{{{{ now }}}}||ADT^A08|{{{{ control_id }}}}|P|2.5
PID|1||{{{{ msg["PID-3.1"] }}}}
'''
"""


def adt(message_type: str, flow_id: str, control_id: str, mrn: str) -> bytes:
    return (
        f"MSH|^~\\&|HIS|HOSP|APPBROWSER0001|{flow_id}|202401011230||{message_type}|"
        f"{control_id}|P|2.5\rPID|1||{mrn}^^^HOSP||Person^Pat\r"
    ).encode()


class Receiver:
    """``udsgateway receive`` on a port (0: any), its port read back from its output."""

    port = 0

    def __init__(self, directory: Path, name: str, port: int = 0, *options: str) -> None:
        self.process = LoggedProcess(directory / f"receiver-{name}.log")
        self.process.spawn(
            [str(UDSGATEWAY), "receive", "--port", str(port), *options], directory, os.environ
        )

    def wait(self) -> Receiver:
        """Wait until it listens; read its port."""
        deadline = time.monotonic() + STARTUP
        while True:
            found = re.search(r"listening on [\d.]+:(\d+)", self.process.log_text())
            if found:
                self.port = int(found.group(1))
                return self
            if time.monotonic() > deadline or not self.process.running:
                raise AssertionError(f"receiver not listening: {self.process.log_text()}")
            self.process.pause()

    def stop(self) -> None:
        self.process.stop()


class _EvilPage(BaseHTTPRequestHandler):
    """Another site's page with a form aimed at the console."""

    target = ""

    def do_GET(self) -> None:
        body = (
            "<!doctype html><title>Win a prize</title>"
            f'<form method="post" action="{self.target}">'
            '<input name="reason" value="pwned"><button id="go">Claim</button></form>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class ConsoleBrowserTests(SynchronousTestCase):
    """Each test: its own gateway, receivers and browser (no state shared)."""

    def setUp(self) -> None:
        # `make test` installs it (Makefile): never skipped, a missing browser fails.
        self.assertTrue(Path(CHROMIUM).exists(), f"{CHROMIUM} missing: run `make chromium`")
        from playwright.sync_api import sync_playwright

        self.directory = Path(tempfile.mkdtemp(prefix="console-browser-")).resolve()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.ok = Receiver(self.directory, "ok")
        self.addCleanup(self.ok.stop)
        self.nak = Receiver(self.directory, "nak", 0, "--nak", "AR")
        self.addCleanup(self.nak.stop)
        self.ok.wait()
        self.nak.wait()
        flows = self.directory / "browser.toml"
        flows.write_text(FLOW_FILE.format(ok_port=self.ok.port, nak_port=self.nak.port))
        config = self.directory / "gateway.toml"
        config.write_text(
            "\n".join(
                [
                    "[gateway]",
                    f'database = "sqlite:///{self.directory / "gateway.db"}"',
                    "",
                    "[[tenants]]",
                    'name = "demo"',
                    f'listen = "tcp:port=0:interface={HOST}"',
                    f'flow_files = ["{flows}"]',
                    "",
                    "[admin]",
                    "enabled = true",
                    f'listen = "tcp:port=0:interface={HOST}"',
                ]
            )
            + "\n"
        )
        # The users, straight into the store (the command line `users add` takes
        # seconds a user on a busy machine; tests/test_admin_* cover it).
        database = open_database(load_config(str(config)))
        for name, password in PASSWORDS.items():
            database.transaction_now(
                users.add_user,
                name,
                auth.hash_password(password, TEST_SCRYPT_N),
                name,
                name == "admin",
                time.time(),
            )
        database.engine.dispose()
        self.gateway = GatewayProcess(config, 0, self.directory / "twistd.log")
        self.addCleanup(self.gateway.stop)
        self.gateway.start()
        self.gateway.wait_ready(STARTUP)
        found = self.wait_for(
            "the admin service",
            lambda: re.search(r"admin API listening on .*?port=(\d+)", self.gateway.log_text()),
        )
        self.base = f"http://{HOST}:{found.group(1)}"
        self.playwright = sync_playwright().start()
        self.addCleanup(self.playwright.stop)
        self.browser = self.playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        self.addCleanup(self.browser.close)

    # -- helpers

    def page(self, user: str | None = None) -> Any:
        context = self.browser.new_context(viewport={"width": 1280, "height": 900})
        self.addCleanup(context.close)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        # No page of the console may break its own Content-Security-Policy.
        self.addCleanup(
            lambda: self.assertEqual([e for e in errors if "Content Security" in e], [])
        )
        if user is not None:
            self.login(page, user)
        return page

    def login(self, page: Any, user: str) -> None:
        page.goto(self.base + "/console/")
        page.wait_for_url("**/console/login")
        page.get_by_label("User name").fill(user)
        page.get_by_label("Password").fill(PASSWORDS[user])
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url("**/console/")
        self.assertIn(f"{user} ({user}", page.get_by_test_id("who").inner_text())

    def shot(self, page: Any, name: str) -> None:
        if SCREENSHOTS:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def rows(self, sql: str, *parameters: Any) -> list[dict[str, Any]]:
        return query(self.directory / "gateway.db", sql, *parameters)

    def wait_for(self, what: str, check: Any, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = check()
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)

    # -- the tests

    def test_login_and_logout(self) -> None:
        page = self.page()
        page.goto(self.base + "/console/")
        page.wait_for_url("**/console/login")
        self.assertEqual(page.title(), "Log in · udsgateway console")
        page.get_by_label("User name").fill("viewer")
        page.get_by_label("Password").fill("wrong password")
        page.get_by_role("button", name="Log in").click()
        self.assertIn("Wrong user name or password", page.get_by_role("alert").inner_text())
        self.shot(page, "login")
        page.get_by_label("Password").fill(PASSWORDS["viewer"])
        page.keyboard.press("Enter")
        page.wait_for_url("**/console/")
        self.assertEqual(page.title(), "Dashboard · udsgateway console")
        page.get_by_role("button", name="Log out").click()
        page.wait_for_url("**/console/login")
        page.goto(self.base + "/console/queues")
        page.wait_for_url("**/console/login")

    def test_flow_editor_scenario(self) -> None:
        page = self.page("admin")
        logs = self.page("admin")
        page.get_by_role("link", name="Flows").click()
        page.get_by_role("link", name="New flow").click()
        page.wait_for_url("**/console/flows/new")
        page.locator("#flow_name").fill("Appointments to CRM")
        page.locator("#message_type").fill("SIU^S12")
        page.locator("#sample").fill(SIU_SAMPLE)
        # The catalogue of the pasted sample, with the sample's values.
        pid3 = page.locator("button[data-insert]", has_text=re.compile(r"^PID-3\.1$"))
        pid3.wait_for()
        self.assertIn("MRN7001", page.locator("#catalogue").inner_text())
        page.locator("#action_name_0").fill("to_crm")
        page.locator("#action_host_0").fill(HOST)
        page.locator("#action_port_0").fill(str(self.ok.port))
        page.locator("#action_type_0").fill("SIU^S12")
        template = page.locator("#template_0")
        template.click()
        template.press_sequentially(
            "MSH|^~\\&|GW|DEMO|CRM|CRM|{{ now }}||SIU^S12|{{ control_id }}|P|2.5\nSCH|"
        )
        # The variable picker inserts at the cursor of the template.
        page.locator("button[data-insert]", has_text=re.compile(r"^SCH-1$")).click()
        template.press("End")
        template.press_sequentially("\nPID|1||")
        pid3.focus()
        page.keyboard.press("Enter")  # the picker works from the keyboard too
        self.assertEqual(template.input_value().splitlines()[-1], 'PID|1||{{ msg["PID-3.1"] }}')
        preview = page.locator("#preview-0 pre.rendered")
        preview.filter(has_text="PID|1||MRN7001").wait_for()
        self.assertIn("SCH|APT7001", preview.inner_text())
        self.shot(page, "flow_editor")
        page.get_by_role("button", name="Save flow").click()
        page.get_by_test_id("flow_id").wait_for()
        sender = {
            k: page.get_by_test_id(k).inner_text() for k in ("host", "port", "app_id", "flow_id")
        }
        self.assertEqual(sender["host"], HOST)
        self.assertEqual(int(sender["port"]), self.gateway.port)
        self.shot(page, "flow_saved")

        logs.goto(self.base + f"/console/logs?flow_id={sender['flow_id']}")
        self.assertEqual(logs.locator("tr[data-log]").count(), 0)

        message = self.directory / "siu.hl7"
        message.write_text(
            SIU_SAMPLE.replace("APPID", sender["app_id"]).replace("FLOWID", sender["flow_id"])
        )
        done = subprocess.run(
            [str(UDSGATEWAY), "send", str(message), "--to", f"{sender['host']}:{sender['port']}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn(" AA ", done.stdout)
        # The live tail brings the lines in without a reload.
        logs.locator("tr[data-log]", has_text="delivered").wait_for()
        self.assertIn("received", logs.locator("#log-rows").inner_text())
        self.shot(logs, "execution_log")

        # "received" counts the message's search keys, written up to a second after
        # its ACK (docs/operations.md, message search): reload until they are there.
        row = page.locator(f'tr[data-flow="{sender["flow_id"]}"]')
        deadline = time.monotonic() + 30
        while True:
            page.goto(self.base + "/console/")
            received = row.locator('td[data-col="received"]').inner_text()
            if received != "0" or time.monotonic() > deadline:
                break
            page.wait_for_timeout(200)
        self.assertEqual(received, "1")
        self.assertEqual(row.locator('td[data-col="done"]').inner_text(), "1")
        self.shot(page, "dashboard")

    def test_hold_then_release_from_the_queue_page(self) -> None:
        ack = send_mllp(self.gateway.port, adt("ADT^A08", "FLWBROWSERA08X", "HOLD1", "MRN8001"))
        assert ack is not None and b"|AA|" in ack, ack
        self.wait_for(
            "a held delivery",
            lambda: self.rows("SELECT id FROM deliveries WHERE state = 'held'"),
        )
        page = self.page("operator")
        page.get_by_role("link", name="Queues").click()
        row = page.locator('tr[data-state="held"]')
        self.assertIn("held: AR from destination", row.locator(".why").inner_text())
        self.shot(page, "queues")
        # The partner is fixed: it answers AA from now on.
        port = self.nak.port
        self.nak.stop()
        fixed = Receiver(self.directory, "fixed", port).wait()
        self.addCleanup(fixed.stop)
        row.get_by_label(re.compile("Reason to release")).fill("partner fixed their feed")
        row.get_by_role("button", name="Release").click()
        page.get_by_role("status").filter(has_text="Done: release").wait_for()
        self.wait_for(
            "the released delivery delivered",
            lambda: self.rows(
                "SELECT id FROM deliveries WHERE state = 'delivered' AND destination LIKE ?",
                f"%port={port}:%",
            ),
        )
        (audit,) = self.rows("SELECT who, reason FROM audit WHERE action = 'delivery.release'")
        self.assertEqual(audit, {"who": "operator", "reason": "partner fixed their feed"})

    def test_find_by_pid3_and_open_the_timeline(self) -> None:
        for number, mrn in ((1, "MRN9001"), (2, "MRN9002")):
            ack = send_mllp(
                self.gateway.port, adt("ADT^A04", "FLWBROWSERA04X", f"FIND{number}", mrn)
            )
            assert ack is not None and b"|AA|" in ack, ack
        # The search keys are written after the ACK, within about a second.
        self.wait_for(
            "the search keys written",
            lambda: self.rows(
                "SELECT message_id FROM message_keys WHERE name = 'pid3' AND value = 'MRN9002'"
            ),
        )
        page = self.page("admin")
        page.get_by_role("link", name="Messages").click()
        page.get_by_label("Patient ID (PID-3)").fill("MRN9002")
        page.get_by_role("button", name="Search").click()
        results = page.locator("#results tbody tr")
        results.first.wait_for()
        self.assertEqual(results.count(), 1)
        self.assertIn("FIND2", results.inner_text())
        self.assertNotIn("MRN9002", page.url)
        self.shot(page, "messages")
        results.get_by_role("link").click()
        page.wait_for_url(re.compile(r"/console/messages/\d+$"))
        self.assertNotIn("MRN9002", page.title() + page.url)
        self.wait_for_timeline(page)
        page.get_by_role("button", name="Show content").click()
        field = page.locator('#content span.fld[title^="PID-3 "]').first
        field.wait_for()
        self.assertEqual(field.inner_text(), "MRN9002^^^HOSP")
        self.shot(page, "message")
        audit = self.rows("SELECT who FROM audit WHERE action = 'message.content'")
        self.assertIn({"who": "admin"}, audit)

    def wait_for_timeline(self, page: Any) -> None:
        for _ in range(50):
            text = page.locator("#timeline").inner_text()
            if "delivered" in text:
                self.assertIn("received", text)
                return
            time.sleep(0.2)
            page.reload()
        raise AssertionError("the timeline never showed the delivery")

    def test_viewer_cannot_see_content_or_act(self) -> None:
        ack = send_mllp(self.gateway.port, adt("ADT^A04", "FLWBROWSERA04X", "VIEW1", "MRN9101"))
        assert ack is not None
        (message,) = self.rows("SELECT id FROM messages WHERE control_id = 'VIEW1'")
        page = self.page("viewer")
        page.goto(self.base + f"/console/messages/{message['id']}")
        self.assertEqual(page.get_by_role("button", name="Show content").count(), 0)
        self.assertIn("may not view message content", page.locator("#content").inner_text())
        page.goto(self.base + "/console/queues")
        self.assertEqual(page.get_by_role("button", name="Release").count(), 0)
        self.assertEqual(page.get_by_role("button", name="Retry now").count(), 0)
        # Even a hand-made request from the viewer's own session is refused.
        token = page.locator('input[name="csrf_token"]').first.input_value()
        refused = page.request.post(
            self.base + f"/console/messages/{message['id']}/content",
            form={"csrf_token": token},
            headers={"Origin": self.base},
        )
        self.assertEqual(refused.status, 403)
        self.assertNotIn("MRN9101", refused.text())
        refused = page.request.post(
            self.base + "/console/queues/1/skip",
            form={"csrf_token": token, "reason": "x"},
            headers={"Origin": self.base},
        )
        self.assertEqual(refused.status, 403)
        page.goto(self.base + "/console/audit")
        self.assertEqual(page.title(), "Not allowed · udsgateway console")

    def test_cross_site_form_post_refused(self) -> None:
        page = self.page("operator")
        _EvilPage.target = self.base + "/console/queues/1/skip"
        server = ThreadingHTTPServer((HOST, 0), _EvilPage)
        self.addCleanup(server.server_close)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(server.shutdown)
        before = self.rows("SELECT count(*) AS n FROM audit")
        page.goto(f"http://{HOST}:{server.server_address[1]}/")
        with page.expect_navigation():
            page.locator("#go").click()
        self.assertIn("cross-site request refused", page.content())
        self.assertEqual(self.rows("SELECT count(*) AS n FROM audit"), before)
