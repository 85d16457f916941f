"""The admin HTTP API: authentication before the body, roles, limits, sessions, users, tokens."""

from __future__ import annotations

import re

from sqlalchemy import select
from twisted.trial.unittest import TestCase

from udsgateway.admin import auth
from udsgateway.admin.http import HTTPError, check_schema
from udsgateway.admin.sessions import COOKIE_NAME
from udsgateway.store import schema, users
from udsgateway.testing.admin import AdminClient, Response


def fill_path(path: str) -> str:
    """A route's path with each parameter filled in."""
    values = {"name": "vera", "destination": "127.0.0.1:9"}
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "999"), path)


def audit_rows(client: AdminClient) -> list[tuple[str, str, str]]:
    def read(connection: object) -> list[tuple[str, str, str]]:
        a = schema.audit.c
        rows = connection.execute(select(a.who, a.action, a.target).order_by(a.id))  # type: ignore[attr-defined]
        return [tuple(row) for row in rows]

    return client.database.transaction_now(read)


class Fixture(TestCase):
    def setUp(self) -> None:
        self.client = AdminClient(with_operations=True)
        self.viewer = self.client.add_user("vera", "viewer")
        self.operator = self.client.add_user("otto", "operator")
        self.admin = self.client.add_user("ada", "admin")
        self.reader = self.client.add_user("carla", "viewer", view_content=True)

    def login(self, name: str = "vera", password: str = "correct horse") -> tuple[str, str]:
        reply = self.client.request(
            "POST", "/api/v1/session", {"user": name, "password": password}
        )
        self.assertEqual(reply.status, 200, reply.body)
        cookie = reply.header("set-cookie") or ""
        return cookie.split(";")[0], reply.json["csrf_token"]


class HealthTests(Fixture):
    def test_healthz_needs_no_credentials(self) -> None:
        reply = self.client.request("GET", "/healthz")
        self.assertEqual((reply.status, reply.json), (200, {"status": "alive"}))

    def test_readyz_without_a_gateway_checks_the_database(self) -> None:
        reply = self.client.request("GET", "/readyz")
        self.assertEqual((reply.status, reply.json), (200, {"status": "ready"}))

    def test_readyz_not_ready_says_nothing_more(self) -> None:
        class NotAccepting:
            accepting = False

        self.client.api.gateway = NotAccepting()
        reply = self.client.request("GET", "/readyz")
        self.assertEqual((reply.status, reply.json), (503, {"status": "not ready"}))

    def test_security_headers_on_every_answer(self) -> None:
        for reply in (
            self.client.request("GET", "/healthz"),
            self.client.request("GET", "/api/v1/me"),
            self.client.request("POST", "/api/v1/users", raw_body=b"x" * 10),
        ):
            self.assertEqual(reply.header("x-frame-options"), "DENY")
            self.assertEqual(reply.header("x-content-type-options"), "nosniff")
            self.assertIn("frame-ancestors 'none'", reply.header("content-security-policy") or "")
            self.assertEqual(reply.header("cache-control"), "no-store")


class GateTests(Fixture):
    """Refused before the body: 401, 403, 413, 415 without reading a byte of it."""

    def send_headers_only(self, headers: str, path: str = "/api/v1/users") -> Response:
        transport, channel = self.client.send_raw(
            f"POST {path} HTTP/1.1\r\nHost: admin.test\r\n{headers}\r\n".encode()
        )
        # The body (announced, never sent) is not needed for the answer.
        reply = self.client_response(transport)
        requests = getattr(channel, "_channel", channel).requests
        self.assertTrue(requests[-1].refused)
        self.assertIsNone(requests[-1].content)  # no body buffer was even made
        return reply

    def client_response(self, transport: object) -> Response:
        from udsgateway.testing.admin import parse_response

        return parse_response(transport.value(), bool(transport.disconnecting))  # type: ignore[attr-defined]

    def test_401_without_credentials_before_the_body(self) -> None:
        reply = self.send_headers_only("Content-Type: application/json\r\nContent-Length: 500\r\n")
        self.assertEqual(reply.status, 401)
        self.assertTrue(reply.closed)
        self.assertEqual(reply.header("www-authenticate"), 'Bearer realm="udsgateway"')

    def test_401_with_an_unknown_token(self) -> None:
        reply = self.send_headers_only(
            "Authorization: Bearer udsgw_nope\r\nContent-Type: application/json\r\n"
            "Content-Length: 500\r\n"
        )
        self.assertEqual(reply.status, 401)

    def test_401_on_unknown_paths_too(self) -> None:
        self.assertEqual(self.client.request("GET", "/api/v1/nothing").status, 401)
        self.assertEqual(
            self.client.request("GET", "/api/v1/nothing", token=self.viewer).status, 404
        )

    def test_403_below_the_role_before_the_body(self) -> None:
        reply = self.send_headers_only(
            f"Authorization: Bearer {self.operator}\r\nContent-Type: application/json\r\n"
            "Content-Length: 500\r\n"
        )
        self.assertEqual(reply.status, 403)
        self.assertIn("admin role", reply.json["error"])

    def test_413_over_the_cap_before_the_body(self) -> None:
        reply = self.send_headers_only(
            f"Authorization: Bearer {self.admin}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {64 * 1024 + 1}\r\n"
        )
        self.assertEqual(reply.status, 413)

    def test_413_for_a_chunked_body_past_the_cap(self) -> None:
        chunk = b"x" * 40_000
        encoded = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        transport, _ = self.client.send_raw(
            b"POST /api/v1/users HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
            + self.admin.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + encoded * 2
        )
        reply = self.client_response(transport)
        self.assertEqual(reply.status, 413)

    def test_login_body_is_capped_small(self) -> None:
        reply = self.send_headers_only(
            "Content-Type: application/json\r\nContent-Length: 5000\r\n", path="/api/v1/session"
        )
        self.assertEqual(reply.status, 413)

    def test_415_for_a_body_that_is_not_json(self) -> None:
        reply = self.send_headers_only(
            f"Authorization: Bearer {self.admin}\r\nContent-Type: text/xml\r\n"
            "Content-Length: 50\r\n"
        )
        self.assertEqual(reply.status, 415)

    def test_expect_100_continue_is_not_granted_to_a_refused_request(self) -> None:
        transport, _ = self.client.send_raw(
            b"POST /api/v1/users HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n"
        )
        data = transport.value()
        self.assertTrue(data.startswith(b"HTTP/1.1 401 "))
        self.assertNotIn(b"100 Continue", data)


class BodyTests(Fixture):
    def test_400_for_invalid_json(self) -> None:
        reply = self.client.request(
            "POST",
            "/api/v1/users",
            raw_body=b'{"name": ',
            token=self.admin,
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual(reply.status, 400)
        self.assertIn("not valid JSON", reply.json["error"])

    def test_400_for_duplicate_keys_and_nan(self) -> None:
        for raw in (b'{"name": "a", "name": "b"}', b'{"name": NaN}'):
            reply = self.client.request(
                "POST",
                "/api/v1/users",
                raw_body=raw,
                token=self.admin,
                headers={"Content-Type": "application/json"},
            )
            self.assertEqual(reply.status, 400, raw)

    def test_400_names_the_schema_violation(self) -> None:
        cases = [
            ({"name": "x", "password": "longenough"}, "'role' is required"),
            ({"name": "x", "password": "longenough", "role": "root"}, "body.role: must be one of"),
            ({"name": "x", "password": "short", "role": "viewer"}, "body.password: at least 8"),
            (
                {"name": 3, "password": "longenough", "role": "viewer"},
                "body.name: expected a string",
            ),
            (
                {"name": "x", "password": "longenough", "role": "viewer", "__class__": "os"},
                "unknown field '__class__'",
            ),
            (["name"], "body: expected an object"),
        ]
        for body, message in cases:
            reply = self.client.request("POST", "/api/v1/users", body, token=self.admin)
            self.assertEqual(reply.status, 400, body)
            self.assertIn(message, reply.json["error"])

    def test_schema_checker_nested(self) -> None:
        schema_ = {
            "type": "object",
            "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}},
        }
        check_schema({"ids": [1, 2]}, schema_)
        with self.assertRaises(HTTPError) as caught:
            check_schema({"ids": [1, True]}, schema_)
        self.assertEqual(caught.exception.message, "body.ids[1]: expected an integer")
        with self.assertRaises(HTTPError):
            check_schema({"ids": [1, 2, 3]}, schema_)


class RoleTests(Fixture):
    """Each endpoint refuses the roles below it."""

    def test_every_route_refuses_the_roles_below_it(self) -> None:
        tokens = {"viewer": self.viewer, "operator": self.operator, "admin": self.admin}
        order = ["viewer", "operator", "admin"]
        checked = 0
        for route in self.client.api.routes():
            if route.role is None:
                continue
            path = fill_path(route.path)
            body: dict[str, str] | None = {} if route.schema is not None else None
            for role in order[: order.index(route.role)]:
                reply = self.client.request(route.method, path, body, token=tokens[role])
                self.assertEqual(reply.status, 403, (route.method, route.path, role))
                checked += 1
            if route.content:
                # Content needs the permission besides the role.
                reply = self.client.request(route.method, path, body, token=tokens[route.role])
                self.assertEqual(reply.status, 403, (route.method, route.path))
                self.assertIn("view_content", reply.json["error"])
                checked += 1
            token = self.reader if route.content else tokens[route.role]
            reply = self.client.request(route.method, path, body, token=token)
            self.assertNotIn(reply.status, (401, 403), (route.method, route.path))
        self.assertGreater(checked, 5)

    def test_no_credentials_means_401_everywhere_but_public_routes(self) -> None:
        for route in self.client.api.routes():
            reply = self.client.request(route.method, fill_path(route.path))
            if route.role is None:
                self.assertNotEqual(reply.status, 401, route.path)
            else:
                self.assertEqual(reply.status, 401, route.path)

    def test_disabled_user_token_refused_at_once(self) -> None:
        self.assertEqual(self.client.request("GET", "/api/v1/me", token=self.viewer).status, 200)
        self.client.database.transaction_now(users.update_user, "vera", 0.0, {"disabled": True})
        # The in-memory token list still has it: the database check refuses it.
        self.assertEqual(self.client.request("GET", "/api/v1/me", token=self.viewer).status, 401)
        self.assertEqual(self.client.request("GET", "/api/v1/me", token=self.viewer).status, 401)


class UserAndTokenTests(Fixture):
    def test_add_user_then_they_log_in(self) -> None:
        reply = self.client.request(
            "POST",
            "/api/v1/users",
            {"name": "nina", "password": "a long password", "role": "operator"},
            token=self.admin,
        )
        self.assertEqual(reply.status, 201)
        listed = self.client.request("GET", "/api/v1/users", token=self.admin).json["users"]
        nina = next(u for u in listed if u["name"] == "nina")
        self.assertEqual((nina["role"], nina["disabled"]), ("operator", False))
        self.assertNotIn("password_hash", nina)
        self.login("nina", "a long password")
        self.assertIn(("ada", "user.add", "user nina"), audit_rows(self.client))
        trail = self.client.request("GET", "/api/v1/audit?action=user.", token=self.admin).json
        [entry] = trail["entries"]
        self.assertEqual(
            (entry["via"], entry["result"], entry["reason"]), ("api", "ok", "role operator")
        )
        logins = self.client.request("GET", "/api/v1/audit?action=session.", token=self.admin)
        self.assertEqual([e["who"] for e in logins.json["entries"]], ["nina"])

    def test_add_existing_user_is_409(self) -> None:
        reply = self.client.request(
            "POST",
            "/api/v1/users",
            {"name": "vera", "password": "a long password", "role": "viewer"},
            token=self.admin,
        )
        self.assertEqual(reply.status, 409)

    def test_change_user_role_and_disable(self) -> None:
        reply = self.client.request(
            "PATCH", "/api/v1/users/vera", {"role": "operator"}, token=self.admin
        )
        self.assertEqual(reply.status, 200)
        me = self.client.request("GET", "/api/v1/me", token=self.viewer).json
        self.assertEqual(me["role"], "operator")
        self.client.request("PATCH", "/api/v1/users/vera", {"disabled": True}, token=self.admin)
        self.assertEqual(self.client.request("GET", "/api/v1/me", token=self.viewer).status, 401)
        self.assertEqual(
            self.client.request(
                "PATCH", "/api/v1/users/nobody", {"role": "admin"}, token=self.admin
            ).status,
            404,
        )

    def test_token_shown_once_stored_hashed_and_revocable(self) -> None:
        reply = self.client.request("POST", "/api/v1/tokens", {"label": "ci"}, token=self.viewer)
        self.assertEqual(reply.status, 201)
        token = reply.json["token"]
        self.assertTrue(token.startswith("udsgw_"))
        self.assertEqual(
            self.client.request("GET", "/api/v1/me", token=token).json["user"], "vera"
        )
        listed = self.client.request("GET", "/api/v1/tokens", token=self.viewer).json["tokens"]
        self.assertEqual({t["user"] for t in listed}, {"vera"})
        self.assertNotIn(token, repr(listed))
        stored = self.client.database.transaction_now(
            lambda c: [r[0] for r in c.execute(select(schema.api_tokens.c.digest))]
        )
        self.assertIn(auth.token_digest(token), stored)
        self.assertNotIn(token, stored)
        # Someone else's token: only an admin may revoke it.
        reply = self.client.request(
            "DELETE", f"/api/v1/tokens/{reply.json['id']}", token=self.operator
        )
        self.assertEqual(reply.status, 403)
        reply = self.client.request(
            "DELETE", f"/api/v1/tokens/{listed[-1]['id']}", token=self.viewer
        )
        self.assertEqual(reply.status, 200)
        self.assertEqual(self.client.request("GET", "/api/v1/me", token=token).status, 401)
        actions = [row[1] for row in audit_rows(self.client)]
        self.assertEqual(actions[-2:], ["token.create", "token.revoke"])

    def test_only_admin_creates_tokens_for_others(self) -> None:
        reply = self.client.request("POST", "/api/v1/tokens", {"user": "ada"}, token=self.operator)
        self.assertEqual(reply.status, 403)
        reply = self.client.request("POST", "/api/v1/tokens", {"user": "otto"}, token=self.admin)
        self.assertEqual((reply.status, reply.json["user"]), (201, "otto"))

    def test_change_own_password(self) -> None:
        reply = self.client.request(
            "PUT", "/api/v1/me/password", {"password": "a new password"}, token=self.viewer
        )
        self.assertEqual(reply.status, 200)
        self.login("vera", "a new password")


class SessionTests(Fixture):
    def test_login_sets_a_strict_http_only_cookie(self) -> None:
        reply = self.client.request(
            "POST", "/api/v1/session", {"user": "vera", "password": "correct horse"}
        )
        cookie = reply.header("set-cookie") or ""
        self.assertTrue(cookie.startswith(COOKIE_NAME + "="))
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
            self.assertIn(attribute, cookie)
        self.assertNotIn("Secure", cookie)

    def test_cookie_is_secure_under_tls(self) -> None:
        client = AdminClient(secure=True)
        client.add_user("vera", "viewer")
        reply = client.request(
            "POST", "/api/v1/session", {"user": "vera", "password": "correct horse"}
        )
        self.assertIn("Secure", reply.header("set-cookie") or "")

    def test_session_reads_and_with_origin_and_form_token_writes(self) -> None:
        cookie, csrf = self.login("otto")
        me = self.client.request("GET", "/api/v1/me", headers={"Cookie": cookie})
        self.assertEqual((me.status, me.json["via"]), (200, "session"))
        reply = self.client.request(
            "POST",
            "/api/v1/tokens",
            {"label": "x"},
            headers={"Cookie": cookie, "Origin": "http://admin.test", "X-CSRF-Token": csrf},
        )
        self.assertEqual(reply.status, 201)

    def test_csrf_refusals(self) -> None:
        cookie, csrf = self.login("otto")
        cases = [
            ({"Cookie": cookie, "X-CSRF-Token": csrf}, "Origin"),
            ({"Cookie": cookie, "Origin": "http://evil.test", "X-CSRF-Token": csrf}, "Origin"),
            ({"Cookie": cookie, "Origin": "https://admin.test", "X-CSRF-Token": csrf}, "Origin"),
            ({"Cookie": cookie, "Origin": "http://admin.test"}, "form token"),
            ({"Cookie": cookie, "Origin": "http://admin.test", "X-CSRF-Token": "x"}, "form token"),
        ]
        for headers, word in cases:
            reply = self.client.request("POST", "/api/v1/tokens", {}, headers=headers)
            self.assertEqual(reply.status, 403, headers)
            self.assertIn(word, reply.json["error"])
        # A Referer of this service stands in for a missing Origin.
        reply = self.client.request(
            "POST",
            "/api/v1/tokens",
            {},
            headers={
                "Cookie": cookie,
                "Referer": "http://admin.test/console",
                "X-CSRF-Token": csrf,
            },
        )
        self.assertEqual(reply.status, 201)

    def test_logout_ends_the_session(self) -> None:
        cookie, csrf = self.login()
        headers = {"Cookie": cookie, "Origin": "http://admin.test", "X-CSRF-Token": csrf}
        self.assertEqual(
            self.client.request("DELETE", "/api/v1/session", headers=headers).status, 200
        )
        self.assertEqual(
            self.client.request("GET", "/api/v1/me", headers={"Cookie": cookie}).status, 401
        )

    def test_session_times_out(self) -> None:
        cookie, _ = self.login()
        self.client.clock.advance(1801)
        self.assertEqual(
            self.client.request("GET", "/api/v1/me", headers={"Cookie": cookie}).status, 401
        )

    def test_wrong_password_and_unknown_user_look_alike(self) -> None:
        a = self.client.request("POST", "/api/v1/session", {"user": "vera", "password": "nope"})
        b = self.client.request("POST", "/api/v1/session", {"user": "nobody", "password": "nope"})
        self.assertEqual((a.status, a.json), (b.status, b.json))
        self.assertEqual(a.status, 401)
        self.assertIn(("vera", "session.login", "user vera"), audit_rows(self.client))

    def test_throttling_locks_a_name_out(self) -> None:
        for _ in range(5):
            reply = self.client.request(
                "POST", "/api/v1/session", {"user": "vera", "password": "x"}
            )
            self.assertEqual(reply.status, 401)
        # Locked: even the right password is refused, from any address.
        reply = self.client.request(
            "POST",
            "/api/v1/session",
            {"user": "vera", "password": "correct horse"},
            peer="10.0.0.9",
        )
        self.assertEqual(reply.status, 429)
        self.client.clock.advance(901)
        self.login()

    def test_throttling_locks_an_address_out(self) -> None:
        for index in range(5):
            self.client.request(
                "POST",
                "/api/v1/session",
                {"user": f"spray{index}", "password": "x"},
                peer="10.0.0.7",
            )
        reply = self.client.request(
            "POST",
            "/api/v1/session",
            {"user": "vera", "password": "correct horse"},
            peer="10.0.0.7",
        )
        self.assertEqual(reply.status, 429)
        self.login()  # from another address

    def fail_logins(self, client: AdminClient, count: int, name: str = "vera") -> None:
        for _ in range(count):
            reply = client.request("POST", "/api/v1/session", {"user": name, "password": "x"})
            self.assertEqual(reply.status, 401)

    def test_lockout_survives_a_restart(self) -> None:
        """The counts are in the database: a new API over it (a restart) keeps the lock,
        and counts on from the failures before it."""
        self.fail_logins(self.client, 5)
        restarted = AdminClient(database=self.client.database)
        reply = restarted.request(
            "POST", "/api/v1/session", {"user": "vera", "password": "correct horse"}
        )
        self.assertEqual(reply.status, 429)
        self.assertEqual(
            self.client.database.transaction_now(
                lambda c: c.execute(
                    select(schema.login_failures.c.failures).where(
                        schema.login_failures.c.kind == "name"
                    )
                ).scalar()
            ),
            5,
        )

    def test_failures_before_a_restart_count(self) -> None:
        self.fail_logins(self.client, 3)
        restarted = AdminClient(database=self.client.database)
        self.fail_logins(restarted, 2)
        reply = restarted.request(
            "POST", "/api/v1/session", {"user": "vera", "password": "correct horse"}
        )
        self.assertEqual(reply.status, 429)

    def test_nodes_share_the_counts(self) -> None:
        """Two admin services on one database (two nodes): failures at either count
        toward one lockout, and the lock holds at both."""
        other = AdminClient(database=self.client.database)
        self.fail_logins(self.client, 2)
        self.fail_logins(other, 2)
        self.fail_logins(self.client, 1)
        for client in (self.client, other):
            reply = client.request(
                "POST", "/api/v1/session", {"user": "vera", "password": "correct horse"}
            )
            self.assertEqual(reply.status, 429)

    def test_a_good_login_clears_the_name_in_the_database(self) -> None:
        self.fail_logins(self.client, 4)
        self.login()
        other = AdminClient(database=self.client.database)
        self.fail_logins(other, 4)
        other_login = other.request(
            "POST", "/api/v1/session", {"user": "vera", "password": "correct horse"}
        )
        self.assertEqual(other_login.status, 200)


class PasswordTests(TestCase):
    def test_scrypt_round_trip(self) -> None:
        stored = auth.hash_password("s3cret password", n=2**10)
        self.assertTrue(stored.startswith("scrypt$1024$8$1$"))
        self.assertTrue(auth.verify_password("s3cret password", stored))
        self.assertFalse(auth.verify_password("s3cret passwore", stored))
        self.assertFalse(auth.verify_password("anything", None))
        self.assertNotEqual(stored, auth.hash_password("s3cret password", n=2**10))


class OpenAPITests(Fixture):
    def test_every_route_is_documented(self) -> None:
        document = self.client.request("GET", "/api/v1/openapi.json").json
        self.assertEqual(document["openapi"], "3.0.3")
        documented = {
            (method.upper(), path) for path, item in document["paths"].items() for method in item
        }
        routes = {(route.method, route.path) for route in self.client.api.routes()}
        self.assertEqual(documented, routes)
        login = document["paths"]["/api/v1/session"]["post"]
        self.assertEqual(login["security"], [])
        self.assertIn("requestBody", login)

    def test_status_answer_is_described(self) -> None:
        """The status endpoint's answer, per flow (counts since start, rates) and per
        destination (attempts by outcome, rates), is in the document."""
        document = self.client.request("GET", "/api/v1/openapi.json").json
        status = document["paths"]["/api/v1/status"]["get"]["responses"]["200"]
        schema = status["content"]["application/json"]["schema"]
        flow = schema["properties"]["flows"]["additionalProperties"]
        self.assertEqual(
            flow["properties"]["since_start"]["required"], ["routed", "done", "failed", "held"]
        )
        self.assertIn("rates", flow["required"])
        destination = schema["properties"]["destinations"]["additionalProperties"]
        self.assertIn("attempts_since_start", destination["required"])
        self.assertIn(
            "connect_failed", destination["properties"]["attempts_since_start"]["description"]
        )

    def test_docs_api_md_names_every_route(self) -> None:
        from pathlib import Path

        text = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
        for route in self.client.api.routes():
            self.assertIn(f"`{route.method} {route.path}`", text)
