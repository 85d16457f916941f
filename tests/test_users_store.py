"""store/users.py on SQLite and on a real PostgreSQL (the same contract)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from twisted.trial.unittest import SynchronousTestCase

from tests.test_store_contract import throwaway_schema_engine
from udsgateway.store import users
from udsgateway.store.engine import Database, InlineRunner, ensure_schema, make_engine
from udsgateway.store.users import Principal, UserError

if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object


class UsersContract(_Base):
    engine: Engine

    def open(self) -> None:
        self.database = Database(self.engine, InlineRunner())
        self.addCleanup(self.database.close)
        self.run_sql(ensure_schema)

    def run_sql(self, function: Any, *args: Any) -> Any:
        return self.database.transaction_now(function, *args)

    def test_users_and_tokens(self) -> None:
        self.run_sql(users.add_user, "ada", "scrypt$x", "admin", True, 1.0)
        with self.assertRaises(UserError):
            self.run_sql(users.add_user, "ada", "scrypt$y", "viewer", False, 2.0)
        # The failed insert did not spoil the transaction's connection.
        self.run_sql(users.add_user, "bo", "scrypt$z", "viewer", False, 2.0)
        with self.assertRaises(UserError):
            self.run_sql(users.add_user, "cy", "h", "root", False, 2.0)
        self.assertEqual(
            [(u["name"], u["role"], u["view_content"]) for u in self.run_sql(users.list_users)],
            [("ada", "admin", True), ("bo", "viewer", False)],
        )
        token_id = self.run_sql(users.add_token, "bo", "ci", "d" * 64, "udsgw_abc", 3.0)
        self.assertEqual(self.run_sql(users.token_principal, "d" * 64), Principal("bo", "viewer"))
        self.assertEqual(set(self.run_sql(users.token_principals)), {"d" * 64})
        self.run_sql(users.update_user, "bo", 4.0, {"role": "operator", "view_content": True})
        self.assertEqual(
            self.run_sql(users.token_principal, "d" * 64), Principal("bo", "operator", True)
        )
        self.run_sql(users.update_user, "bo", 5.0, {"disabled": True})
        self.assertIsNone(self.run_sql(users.token_principal, "d" * 64))
        self.assertIsNone(self.run_sql(users.login_record, "bo"))
        self.run_sql(users.update_user, "bo", 6.0, {"disabled": False})
        self.run_sql(users.revoke_token, token_id, 7.0)
        self.assertIsNone(self.run_sql(users.token_principal, "d" * 64))
        with self.assertRaises(UserError):
            self.run_sql(users.revoke_token, token_id, 8.0)
        [listed] = self.run_sql(users.list_tokens, "bo")
        self.assertEqual((listed["label"], listed["revoked_at"]), ("ci", 7.0))
        with self.assertRaises(UserError):
            self.run_sql(users.update_user, "nobody", 1.0, {"disabled": True})


class SQLiteUsersTests(UsersContract, SynchronousTestCase):
    def setUp(self) -> None:
        self.engine = make_engine("sqlite:///:memory:")
        self.open()


class PostgreSQLUsersTests(UsersContract, SynchronousTestCase):
    def setUp(self) -> None:
        self.engine = throwaway_schema_engine(self)
        self.open()
