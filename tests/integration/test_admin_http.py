"""The admin API in a real gateway process: twistd's wiring, a real socket, the wire.

A user and a token in the database, the gateway started with ``[admin]`` on
port 0 (read back from its log), then HTTP requests over TCP.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    HOST,
    database_path,
    new_directory,
    sample_message,
    send_mllp,
    start_gateway,
    write_config,
)
from udsgateway.admin import auth
from udsgateway.store import users
from udsgateway.store.engine import Database, InlineRunner, ensure_schema, make_engine

_ADMIN_LISTENING = re.compile(r"admin API listening on .*port=(\d+)")


def _get(url: str, token: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


class AdminProcessTests(SynchronousTestCase):
    def test_admin_api_in_a_running_gateway(self) -> None:
        directory = new_directory(self)
        config = write_config(directory, {"demo": 0})
        with config.open("a", encoding="utf-8") as file:
            file.write(
                "\n[admin]\nenabled = true\n"
                f'listen = "tcp:port=0:interface={HOST}"\nrefresh_interval = 0.5\n'
            )
        # The user and token as `udsgateway users add` / `tokens create` make them
        # (those commands are tested in process: each start costs seconds here).
        database = Database(make_engine(f"sqlite:///{database_path(directory)}"), InlineRunner())
        database.transaction_now(ensure_schema)
        hashed = auth.hash_password("operator password", 2**10)
        database.transaction_now(users.add_user, "ops", hashed, "operator", False, time.time())
        token = auth.new_token()
        digest = auth.token_digest(token)
        database.transaction_now(users.add_token, "ops", "", digest, token[:12], time.time())

        gateway = start_gateway(self, config)
        port = self._admin_port(gateway)
        base = f"http://{HOST}:{port}"

        self.assertEqual(_get(base + "/healthz")[0], 200)
        self._wait_ready(base)
        status, body, headers = _get(base + "/api/v1/status", token)
        self.assertEqual(status, 200, body)
        self.assertIn("demo", json.loads(body)["tenants"])
        self.assertEqual(headers.get("X-Frame-Options"), "DENY")

        # A message in: counted in the status and the metrics.
        reply = send_mllp(gateway.port, sample_message("ADMINIT1"))
        self.assertIn(b"MSA|A", reply or b"")
        status, body, _ = _get(base + "/metrics", token)
        self.assertEqual(status, 200)
        self.assertIn(b'udsgw_inbound_messages_total{listener="demo",outcome="stored"} 1.0', body)
        self.assertEqual(_get(base + "/metrics")[0], 401)

        # On the wire: a request without credentials is answered before its body.
        with socket.create_connection((HOST, port), timeout=10) as raw:
            raw.sendall(
                b"POST /api/v1/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000\r\n\r\n"
            )
            answer = raw.recv(65536)
            self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:60])
            raw.settimeout(10)
            self.assertEqual(raw.recv(65536), b"")  # and the connection is closed

        # Revoked by another process (the command line): refused at once.
        self.assertEqual(_get(base + "/api/v1/me", token)[0], 200)
        database.transaction_now(users.revoke_token, 1, time.time())
        self.assertEqual(_get(base + "/api/v1/me", token)[0], 401)
        database.close()

    def _admin_port(self, gateway: Any) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = _ADMIN_LISTENING.search(gateway.log_text())
            if found:
                return int(found.group(1))
            time.sleep(0.05)
        raise AssertionError("admin API not listening; log:\n" + gateway.log_text())

    def _wait_ready(self, base: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _get(base + "/readyz")[0] == 200:
                return
            time.sleep(0.05)
        raise AssertionError("gateway not ready")
