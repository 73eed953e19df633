"""Bank accounts with event sourcing and CQRS, on the Mesh event store.

Write side: each account is an aggregate whose state is rebuilt from its
stream ``account-<id>`` (AccountOpened, MoneyDeposited, MoneyWithdrawn). A
command reads the stream, checks the business rules against that state (no
overdraft), and appends its events with the EXACT version it read, so two
concurrent commands cannot both pass a check made on the same state: the
second gets WrongExpectedVersionError, re-reads and decides again.

Read side: a ProjectionRunner follows the category ``account-`` and keeps a
``balances`` table in sqlite, committed together with its checkpoint, so each
event counts exactly once even across restarts. The read model lags the
streams by a moment (eventual consistency); the streams are the truth.

Transfers touch two streams, so they are not atomic: a saga debits the source,
then credits the destination, and if the credit is refused (no such account)
refunds the source with a compensating event. Event ids derived from the
transfer id make every step idempotent: running a transfer again with the same
id (after a crash between the steps) finishes it without paying twice.

    python -m clients.examples.bank --etcd 127.0.0.1:2379 --cluster mesh
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from clients import (
    NO_STREAM,
    Mesh,
    NewEvent,
    ProjectionRunner,
    RecordedEvent,
    SqliteCheckpointStore,
    WrongExpectedVersionError,
)

CATEGORY = "account-"


def stream_of(account_id: str) -> str:
    return f"{CATEGORY}{account_id}"


class BankError(Exception):
    """A command refused by the business rules."""


class AccountExists(BankError):
    pass


class AccountNotFound(BankError):
    pass


class InsufficientFunds(BankError):
    pass


# -- write side: the aggregate and its commands ---------------------------------------


@dataclass
class Account:
    """An account's state, rebuilt from its events. Amounts are in cents."""

    id: str
    version: int = 0
    opened: bool = False
    owner: str = ""
    balance: int = 0
    seen: set[str] = field(default_factory=set)
    """Ids of the events applied, to recognise a step already taken."""

    def apply(self, event: RecordedEvent) -> None:
        data = event.json()
        if event.type == "AccountOpened":
            self.opened, self.owner = True, data["owner"]
        elif event.type == "MoneyDeposited":
            self.balance += data["amount"]
        elif event.type == "MoneyWithdrawn":
            self.balance -= data["amount"]
        self.version = event.version
        self.seen.add(event.id)


Decision = Callable[[Account], list[NewEvent]]


class Bank:
    """The command side: every command is read, decide, append-if-unchanged."""

    def __init__(self, mesh: Mesh, attempts: int = 20) -> None:
        self.mesh = mesh
        self.attempts = attempts

    async def load(self, account_id: str) -> Account:
        account = Account(account_id)
        async for event in self.mesh.events.read_stream(stream_of(account_id)):
            account.apply(event)
        return account

    async def _execute(self, account_id: str, decide: Decision) -> Account:
        """Run ``decide`` on the current state and append its events, expecting the
        version it saw; on a concurrent change, start over."""
        for attempt in range(self.attempts):
            account = await self.load(account_id)
            events = decide(account)  # raises BankError to refuse
            if not events:  # nothing to do (a repeated step)
                return account
            try:
                await self.mesh.events.append(stream_of(account_id), events,
                                              account.version or NO_STREAM)
                return account
            except WrongExpectedVersionError:
                await asyncio.sleep(random.uniform(0, 0.01 * 2**min(attempt, 5)))
        raise BankError(f"account {account_id}: too much contention, gave up")

    async def open_account(self, account_id: str, owner: str) -> None:
        def decide(account: Account) -> list[NewEvent]:
            if account.opened:
                raise AccountExists(account_id)
            return [NewEvent("AccountOpened", {"owner": owner})]

        await self._execute(account_id, decide)

    async def deposit(self, account_id: str, amount: int, *, event_id: str | None = None,
                      **details: Any) -> None:
        """Credit ``amount``; ``event_id`` makes a repeated command a no-op."""
        _positive(amount)
        eid = event_id or str(uuid.uuid4())

        def decide(account: Account) -> list[NewEvent]:
            if not account.opened:
                raise AccountNotFound(account_id)
            if eid in account.seen:
                return []
            return [NewEvent("MoneyDeposited", {"amount": amount, **details}, id=eid)]

        await self._execute(account_id, decide)

    async def withdraw(self, account_id: str, amount: int, *, event_id: str | None = None,
                       **details: Any) -> None:
        """Debit ``amount`` unless that would overdraw the account."""
        _positive(amount)
        eid = event_id or str(uuid.uuid4())

        def decide(account: Account) -> list[NewEvent]:
            if not account.opened:
                raise AccountNotFound(account_id)
            if eid in account.seen:
                return []
            if account.balance < amount:
                raise InsufficientFunds(
                    f"account {account_id}: balance {account.balance}, asked {amount}")
            return [NewEvent("MoneyWithdrawn", {"amount": amount, **details}, id=eid)]

        await self._execute(account_id, decide)

    async def transfer(self, source: str, target: str, amount: int,
                       transfer_id: str | None = None) -> str:
        """Move ``amount`` from ``source`` to ``target`` (a saga: debit, credit, or
        refund). Returns the transfer id; call again with it to finish a transfer
        interrupted between its steps."""
        tid = transfer_id or str(uuid.uuid4())
        await self.withdraw(source, amount, event_id=f"{tid}:debit", transfer=tid, to=target)
        try:
            await self.deposit(target, amount, event_id=f"{tid}:credit", transfer=tid,
                               source=source)
        except AccountNotFound:
            await self.deposit(source, amount, event_id=f"{tid}:refund", transfer=tid,
                               refund=True)
            raise
        return tid


def _positive(amount: int) -> None:
    if amount <= 0:
        raise BankError(f"amount must be positive, got {amount}")


# -- read side: the balances projection ---------------------------------------------


def create_tables(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, "
                 "owner TEXT NOT NULL, balance INTEGER NOT NULL, events INTEGER NOT NULL)")


def project(conn: sqlite3.Connection, event: RecordedEvent) -> None:
    """Apply one account event to the ``balances`` table (in the runner's transaction)."""
    account = event.stream.removeprefix(CATEGORY)
    data = event.json()
    if event.type == "AccountOpened":
        conn.execute("INSERT INTO balances VALUES (?, ?, 0, 1)", (account, data["owner"]))
        return
    sign = {"MoneyDeposited": 1, "MoneyWithdrawn": -1}.get(event.type, 0)
    conn.execute("UPDATE balances SET balance = balance + ?, events = events + 1 "
                 "WHERE account = ?", (sign * data.get("amount", 0), account))


def balances_projection(mesh: Mesh, store: SqliteCheckpointStore) -> ProjectionRunner:
    return ProjectionRunner(mesh, "balances", project, category=CATEGORY, store=store,
                            setup=create_tables)


async def read_balances(store: SqliteCheckpointStore,
                        accounts: list[str]) -> dict[str, int]:
    marks = ",".join("?" * len(accounts))
    rows = await store.query(
        f"SELECT account, balance FROM balances WHERE account IN ({marks})", accounts)
    return {cast(str, account): cast(int, balance) for account, balance in rows}


# -- the demo ---------------------------------------------------------------------------


async def demo(mesh: Mesh, db: Path) -> dict[str, int]:
    run = uuid.uuid4().hex[:6]
    alice, bob, carol = f"alice-{run}", f"bob-{run}", f"carol-{run}"
    bank = Bank(mesh)
    for account, owner in ((alice, "Alice"), (bob, "Bob"), (carol, "Carol")):
        await bank.open_account(account, owner)
    await bank.deposit(alice, 100_00)
    await bank.withdraw(alice, 30_00)
    await bank.transfer(alice, bob, 50_00)
    try:
        await bank.withdraw(bob, 1_000_00)
    except InsufficientFunds as exc:
        print(f"refused: {exc}")
    try:
        await bank.transfer(bob, f"nobody-{run}", 10_00)
    except AccountNotFound:
        print("refused: no such account (the debit was refunded)")
    # Ten concurrent deposits and ten concurrent withdrawals on one account: the
    # exact expected version serialises them; none is lost, none overdraws.
    await bank.deposit(carol, 50_00)
    outcomes = await asyncio.gather(
        *(bank.deposit(carol, 1_00) for _ in range(10)),
        *(bank.withdraw(carol, 10_00) for _ in range(10)), return_exceptions=True)
    refused = sum(isinstance(o, InsufficientFunds) for o in outcomes)
    print(f"carol: 20 concurrent commands, {refused} withdrawal(s) refused for lack of funds")

    store = SqliteCheckpointStore(db)
    try:
        applied = await balances_projection(mesh, store).run_until_caught_up()
        print(f"projection applied {applied} event(s) into {db}")
        balances = await read_balances(store, [alice, bob, carol])
    finally:
        await store.close()
    for account in (alice, bob, carol):
        truth = (await bank.load(account)).balance
        print(f"{account:>14}: {balances[account] / 100:>8.2f}  (from its stream: "
              f"{truth / 100:.2f})")
    return balances


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--etcd", help="etcd endpoints (default $MESH_ETCD_ENDPOINTS)")
    parser.add_argument("--cluster", help="cluster name (default $MESH_CLUSTER or mesh)")
    parser.add_argument("--db", type=Path, help="read model file (default: a temp file)")
    args = parser.parse_args(argv)
    db = args.db or Path(tempfile.mkdtemp(prefix="mesh-bank-")) / "balances.db"

    async def run() -> None:
        async with Mesh(etcd=args.etcd, cluster=args.cluster) as mesh:
            await demo(mesh, db)

    asyncio.run(run())


if __name__ == "__main__":
    main()
