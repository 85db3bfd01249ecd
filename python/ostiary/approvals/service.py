"""The gateway's approvals: holding a statement until people decide, and taking their decisions.

Theory of operation. A statement that an approval rule of the session's grant matches is judged by
the statement hook as usual (guardrails first: a refused statement is never put to approvers);
``hold`` then looks for an approval that already covers it (a grant-scoped one still valid, or a
statement-scoped one for the same text, asked ahead of time). Otherwise it creates a request in
the store, tells the waiting client with a NoticeResponse (its id and how to approve), notifies
the webhooks, and waits — the data path simply keeps not reading from that client, other sessions
are unaffected — until the request is approved, denied or expires. Decisions may be taken on any
gateway sharing the store: a waiter wakes at once for decisions taken through this gateway and
polls the store every ``POLL`` seconds for the others. Everything is recorded in the audit trail.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ostiary.approvals.store import (
    FINAL,
    NOTIFY_CHANNEL,
    ApprovalError,
    ApprovalStore,
    Request,
    new_id,
)
from ostiary.audit.log import StoreCall
from ostiary.audit.records import now_us
from ostiary.audit.store import StoreError

if TYPE_CHECKING:
    from ostiary.audit.log import AuditEvents
    from ostiary.hooks import SessionInfo
    from ostiary.identity import Identity
    from ostiary.policy.evaluate import CompiledPolicy
    from ostiary.policy.model import ApprovalRule

log = logging.getLogger("ostiary.approvals")

POLL = 1.0

Notifier = Callable[[str, Request], Awaitable[None]]


class Approvals:
    def __init__(
        self,
        store: ApprovalStore,
        gateway: str,
        policy: Callable[[], CompiledPolicy],
        audit: AuditEvents | None = None,
        approve_url: str = "",
        store_timeout: float = 5.0,
    ) -> None:
        self.store = store
        self.store_timeout = store_timeout
        self._store_lock = trio.Lock()
        self._abandoned: StoreCall | None = None
        self.gateway = gateway
        self.policy = policy
        self.audit = audit
        self.approve_url = approve_url
        self.notifiers: list[Notifier] = []
        self._changed: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        # Statements held right now: request id -> how to tell their client something.
        self.holding: dict[str, Callable[[str], object]] = {}

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs one blocking store call in a worker thread, one at a time, for at most
        ``store_timeout`` seconds (``audit.store_timeout``: the approval store is the audit
        store's database); raises ``StoreError`` when it fails or takes longer. A frozen store
        (a stopped server, a network black hole) then fails each request at once instead of
        holding statements and worker threads until TCP gives up. A call whose caller was
        cancelled (a held client went away) runs on; the next call waits for it within the same
        limit. Every store call of a running gateway goes through here."""
        async with self._store_lock:
            old = self._abandoned
            if old is not None:
                # A call abandoned at its limit gets one more store_timeout to come back (an
                # interrupted one returns in milliseconds; one still connecting, when the server
                # has just woken up, needs its handshake), then callers are refused at once.
                left = old.started + 2 * self.store_timeout - time.monotonic()
                if not old.finished.is_set() and left > 0:
                    await trio.to_thread.run_sync(old.finished.wait, left, abandon_on_cancel=True)
                if not old.finished.is_set():
                    raise StoreError(
                        f"approval store {self.store.description}: a call started "
                        f"{time.monotonic() - old.started:.0f} s ago has not returned yet"
                    )
                self._abandoned = None
            call = StoreCall(fn, args)
            limit = trio.move_on_after(self.store_timeout)
            try:
                with limit:
                    return await trio.to_thread.run_sync(call.run, abandon_on_cancel=True)
            finally:
                if not call.finished.is_set():
                    self._abandoned = call
                    if limit.cancelled_caught:  # the store's fault, not a caller gone away
                        self.store.interrupt()
            raise StoreError(
                f"approval store {self.store.description}: no answer within "
                f"{self.store_timeout:g} s (audit.store_timeout)"
            )

    def _audit(self, action: str, req: Request, **extra: Any) -> None:
        if self.audit is None:
            return
        self.audit.audit.append(
            "approval",
            session=req.session,
            identity=extra.pop("identity", req.requester),
            connection=req.connection,
            verdict={"approved": "allow", "used": "allow", "denied": "deny", "expired": "deny"}.get(
                req.state, ""
            ),
            rule=req.rule,
            data={
                "action": action,
                "request": req.id,
                "state": req.state,
                "scope": req.scope,
                "grant": req.grant,
                "requester": req.requester,
                "statement": req.statement,
                "params": req.params,
                "reason": req.reason,
                "decision_reason": req.decision_reason,
                **extra,
            },
        )

    def _wake(self, rid: str) -> None:
        ev = self._changed.pop(rid, None)
        if ev is not None:
            ev.set()

    async def _notify(self, event: str, req: Request) -> None:
        for n in self.notifiers:
            name = getattr(n, "name", type(n).__name__)
            try:
                await n(event, req)
            except Exception as e:  # a webhook never breaks a hold
                log.warning("approval %s: notification %s failed: %s", req.id, name, e)
                self._audit("notification_failed", req, event=event, notifier=name, error=str(e))
            else:
                self._audit("notified", req, event=event, notifier=name)

    def farewell(self, why: str) -> None:
        """Tells every client waiting for an approval that its wait ends (the gateway stops); the
        requests stay pending in the store."""
        for rid, notice in list(self.holding.items()):
            notice(
                f"{why}: approval request {rid} stays pending; once it is approved, run the statement "
                "again and it passes"
            )

    # -- requests ---------------------------------------------------------------------------------

    async def request(
        self,
        rule: ApprovalRule,
        *,
        requester: Identity,
        connection: str,
        grant: str,
        statement: str,
        params: list[str | None] | None = None,
        session: str = "",
        reason: str = "",
        origin: str = "inline",
    ) -> Request:
        t = now_us()
        req = Request(
            id=new_id(),
            created=t,
            expires=t + int(rule.timeout * 1_000_000),
            state="pending",
            rule=rule.name,
            connection=connection,
            grant=grant,
            requester=requester.name,
            requester_issuer=requester.issuer,
            session=session,
            statement=statement,
            params=params or [],
            scope=rule.scope,
            required=rule.required,
            reason=reason,
            origin=origin,
            gateway=self.gateway,
        )
        await self.call(self.store.create, req)
        self._audit("requested", req)
        log.info(
            "approval %s requested by %s on %s (rule %s): %s",
            req.id,
            req.requester,
            connection,
            rule.name,
            statement[:200],
        )
        if self._nursery is not None:
            self._nursery.start_soon(self._notify, "requested", req)
        return req

    async def usable(
        self,
        rule: ApprovalRule,
        requester: str,
        connection: str,
        grant: str,
        statement: str,
        params: list[str | None] | None = None,
    ) -> Request | None:
        req: Request | None = await self.call(
            self.store.find_usable, connection, grant, requester, rule.name, statement, params or []
        )
        if req is not None:
            self._audit("used", req)
        return req

    async def wait(self, rid: str, deadline: float = math.inf) -> Request:
        """Until the request is final (or ``deadline``, trio time, passes: then as it is)."""
        while True:
            req: Request | None = await self.call(self.store.get, rid)
            if req is None:
                raise ApprovalError(f"no approval request {rid}")
            if req.state in FINAL:
                return req
            if now_us() >= req.expires:
                moved = await self.call(self.store.finish, rid, "expired", "nobody decided in time")
                if moved is not None:
                    self._audit("expired", moved)
                continue
            if trio.current_time() >= deadline:
                return req
            ev = self._changed.setdefault(rid, trio.Event())
            left = min(POLL, (req.expires - now_us()) / 1e6 + 0.01, deadline - trio.current_time())
            with trio.move_on_after(max(left, 0.0)):
                await ev.wait()

    async def decide(self, rid: str, approver: Identity, approve: bool, reason: str) -> Request:
        """An approver's vote. Raises ``ApprovalError`` with the reason when it is not theirs to give."""
        req: Request | None = await self.call(self.store.get, rid)
        if req is None:
            raise ApprovalError(f"no approval request {rid}")
        policy = self.policy()
        rule = next((r for r in policy.config.approvals if r.name == req.rule), None)
        if rule is None:
            raise ApprovalError(f"request {rid}'s rule {req.rule!r} is no longer in the policy")
        names = policy.names_of(approver)
        if not names.intersection(rule.approvers):
            self._audit("vote_refused", req, identity=approver.name, why="not an approver of this rule")
            who = ", ".join(rule.approvers)
            raise ApprovalError(f"{approver.name} is not an approver of rule {rule.name} (approvers: {who})")
        try:
            req = await self.call(self.store.vote, rid, approver.name, approve, reason, rule.grant_minutes)
        except ApprovalError as e:
            self._audit("vote_refused", req, identity=approver.name, why=str(e))
            raise
        self._audit(
            "approved" if approve else "denied",
            req,
            identity=approver.name,
            approver=approver.name,
            approver_issuer=approver.issuer,
            vote_reason=reason,
        )
        log.info(
            "approval %s: %s by %s (%s)", rid, "approve" if approve else "deny", approver.name, req.state
        )
        self._wake(rid)
        if req.state in FINAL and self._nursery is not None:
            self._nursery.start_soon(self._notify, req.state, req)
        return req

    async def hold(
        self,
        info: SessionInfo,
        session_ref: str,
        rule: ApprovalRule,
        statement: str,
        notice: Callable[[str], object],
        params: list[str | None] | None = None,
    ) -> tuple[bool, str, str]:
        """Holds one statement of a live session until it is approved (an execution of a prepared
        statement comes with its ``params``: the approval binds them). Returns (allowed, message
        for a refusal, request id)."""
        ident = info.identity
        params = params or []
        found = await self.usable(rule, ident.name, info.connection, info.grant, statement, params)
        if found is not None:
            return True, "", found.id
        req = await self.request(
            rule,
            requester=ident,
            connection=info.connection,
            grant=info.grant,
            statement=statement,
            params=params,
            session=session_ref,
        )
        where = f" or at {self.approve_url}/approvals/{req.id}" if self.approve_url else ""
        asked = " ".join(statement.split())
        asked = repr(asked if len(asked) <= 120 else asked[:117] + "...")
        if params:
            shown = ", ".join(
                "NULL" if v is None else repr(v if len(v) <= 40 else v[:37] + "...") for v in params
            )
            asked += f" with parameters ({shown[:200]})"
        notice(
            f"approval required: {asked} held as request {req.id} (rule {rule.name}, "
            f"{rule.required} approval(s) from {', '.join(rule.approvers)}); approve with "
            f"`ostiary approvals approve {req.id} --reason ...`{where}; waiting up to {rule.timeout:g} s"
        )
        self.holding[req.id] = notice
        try:
            final = await self.wait(req.id)
        except BaseException:
            # The session ended (or the gateway stops) while waiting: the request stays in the store;
            # approved later, the same statement run again by the requester passes once.
            with trio.CancelScope(shield=True):
                cur = await self.call(self.store.get, req.id)
                if cur is not None:
                    self._audit("waiter_gone", cur)
            raise
        finally:
            self.holding.pop(req.id, None)
        if final.state == "approved":
            if final.scope == "statement":
                used = await self.call(self.store.finish, req.id, "used", final.decision_reason, "approved")
                if used is not None:
                    self._audit("used", used)
            return True, "", req.id
        why = final.decision_reason or final.state
        return False, f"approval {req.id} {final.state}: {why}", req.id

    def _listen(self, token: trio.lowlevel.TrioToken, stop: threading.Event) -> None:
        """A worker thread: LISTENs for decisions announced by any gateway of the fleet and wakes
        the waiters here at once (the store is also polled every ``POLL`` s, the fallback)."""
        import psycopg

        while not stop.is_set():
            try:
                with psycopg.connect(self.store.dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            log.debug("approval %s: decided through another gateway (NOTIFY)", n.payload)
                            trio.from_thread.run_sync(self._wake, n.payload, trio_token=token)
            except Exception as e:
                if not stop.is_set():
                    log.debug("approvals: LISTEN connection lost (%s); polling meanwhile", e)
                    stop.wait(1.0)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expires due requests (any gateway's), runs notifications, and with a PostgreSQL store
        listens for decisions taken through other gateways."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            stop = threading.Event()
            if self.store.dsn:
                token = trio.lowlevel.current_trio_token()
                nursery.start_soon(
                    functools.partial(
                        trio.to_thread.run_sync, self._listen, token, stop, abandon_on_cancel=True
                    )
                )
            task_status.started()
            try:
                await self._sweep(nursery)
            finally:
                stop.set()

    async def _sweep(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                for req in await self.call(self.store.expire_due):
                    self._audit("expired", req)
                    self._wake(req.id)
                    nursery.start_soon(self._notify, "expired", req)
            except Exception as e:
                log.warning("approvals: expiry sweep failed: %s", e)
            await trio.sleep(POLL)
