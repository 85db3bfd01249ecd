"""The approvals API: what approvers and automation call (``ostiary approvals ...`` is its client).

Rules of this module. Every caller is identified by their own OIDC token (``Authorization: Bearer``;
the web page's form carries it as a field), validated by the gateway's token validator; a refusal
says which check failed and never echoes the token. Decisions go through ``Approvals.decide``,
which checks that the caller is an approver of the request's rule in the current policy and not its
requester. A request is visible to its requester and to the approvers of its rule (``GET``); the
list shows a caller only those. ``POST /approvals`` asks ahead of time: the caller's identity must
be admitted on the connection (the grant chosen as a session would choose it), the grant must allow
the statement (guardrails first, as for a held statement), and one of the grant's approval rules
must match it.

Endpoints (JSON; errors as ``{"error": ...}``):

- ``GET /healthz`` (liveness: the process answers)
- ``GET /readyz`` (readiness for a load balancer: 503 with the reason while the gateway drains for
  shutdown or refuses sessions because its audit trail is unavailable)
- ``GET /metrics`` (Prometheus text format: sessions, logins, audit backlog, reloads)
- ``GET /approvals[?state=pending&limit=100]``
- ``GET /approvals/{id}`` (``Accept: text/html``: the web page)
- ``POST /approvals/{id}/approve`` and ``/deny``, ``{"reason": ...}`` (or the page's form)
- ``POST /approvals/{id}/view`` (the page's form: show the request to the token's holder)
- ``POST /approvals`` ``{"connection", "statement", "reason", "grant"?}`` → 201
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ostiary.admin import page
from ostiary.admin.http import HttpError, HttpLimits, HttpServer, Request, Response, server_ssl_context
from ostiary.approvals.service import Approvals
from ostiary.approvals.store import FINAL, ApprovalError
from ostiary.approvals.store import Request as ApprovalRequest
from ostiary.audit.store import StoreError
from ostiary.errors import AuthenticationFailed
from ostiary.identity import Identity, printable
from ostiary.policy.evaluate import CompiledPolicy

log = logging.getLogger("ostiary.admin")

TokenValidate = Callable[[str], Awaitable[Identity]]

STATES = ("pending", *FINAL)
MAX_REASON = 2000
MAX_TOKEN = 16 * 1024
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def request_json(req: ApprovalRequest, base_url: str) -> dict[str, Any]:
    """A request as the API shows it: the stored fields, the approval count and its page."""
    out: dict[str, Any] = msgspec.to_builtins(req)
    out["approvals"] = req.approvals
    out["url"] = f"{base_url}/approvals/{req.id}"
    return out


class AdminApi:
    """The routes. ``policy`` returns the policy in force (it changes on reload); ``validate``
    turns a bearer token into an identity or raises ``AuthenticationFailed``; ``base_url`` is
    where approvers reach this API (``admin.public_url``)."""

    def __init__(
        self,
        approvals: Approvals,
        policy: Callable[[], CompiledPolicy],
        validate: TokenValidate,
        base_url: str,
        ready: Callable[[], str | None] = lambda: None,
        metrics: Callable[[], str] | None = None,
    ) -> None:
        self.ready = ready
        self.metrics = metrics
        self.approvals = approvals
        self.policy = policy
        self.validate = validate
        self.base_url = base_url.rstrip("/")
        self.base_path = urllib.parse.urlsplit(self.base_url).path.rstrip("/")

    async def handle(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except StoreError as e:
            log.warning("admin API: %s", e)
            return Response.error(503, "the approval store is unavailable; try again")

    async def _route(self, request: Request) -> Response:
        parts = request.path.strip("/").split("/")
        method = request.method
        if parts == ["healthz"]:
            _allow(method, "GET")
            return Response.json(200, {"status": "ok"})
        if parts == ["metrics"] and self.metrics is not None:
            _allow(method, "GET")
            return Response(200, self.metrics().encode(), content_type="text/plain; version=0.0.4")
        if parts == ["readyz"]:
            _allow(method, "GET")
            why = self.ready()
            if why is not None:
                return Response.json(503, {"status": "not ready", "reason": why})
            return Response.json(200, {"status": "ready"})
        if parts[0] != "approvals" or len(parts) > 3:
            raise HttpError(404, f"no such endpoint: {printable(request.path)}")
        if len(parts) == 1:
            _allow(method, "GET", "POST")
            return await (self._list(request) if method == "GET" else self._ask(request))
        rid = parts[1]
        if not _ID.fullmatch(rid):
            raise HttpError(404, "no such approval request")
        if len(parts) == 2:
            _allow(method, "GET")
            return await self._show(request, rid)
        action = parts[2]
        if action not in ("approve", "deny", "view"):
            raise HttpError(404, f"no such endpoint: {printable(request.path)}")
        _allow(method, "POST")
        return await self._decide(request, rid, action)

    # -- identity -------------------------------------------------------------------------------

    async def _identity(self, request: Request, token: str | None = None) -> Identity:
        if token is None:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if not auth or scheme.lower() != "bearer":
                raise HttpError(
                    401,
                    "a token is required: Authorization: Bearer <your OIDC token>",
                    {"WWW-Authenticate": 'Bearer realm="ostiary"'},
                )
        token = token.strip()
        if not token:
            raise HttpError(401, "a token is required", {"WWW-Authenticate": 'Bearer realm="ostiary"'})
        invalid = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        if len(token) > MAX_TOKEN:
            raise HttpError(401, "the token is too long", invalid)
        try:
            return await self.validate(token)
        except AuthenticationFailed as e:
            log.info("admin API: token from %s refused: %s", request.peer, e.reason)
            raise HttpError(401, f"the token was refused: {e.reason}", invalid) from None

    def _is_requester(self, ident: Identity, req: ApprovalRequest) -> bool:
        return ident.name == req.requester and ident.issuer in (req.requester_issuer, "")

    def _is_approver(self, ident: Identity, req: ApprovalRequest, policy: CompiledPolicy) -> bool:
        rule = next((r for r in policy.config.approvals if r.name == req.rule), None)
        return rule is not None and bool(policy.names_of(ident).intersection(rule.approvers))

    def _may_see(self, ident: Identity, req: ApprovalRequest, policy: CompiledPolicy) -> bool:
        return self._is_requester(ident, req) or self._is_approver(ident, req, policy)

    async def _load(self, rid: str) -> ApprovalRequest:
        req: ApprovalRequest | None = await self.approvals.call(self.approvals.store.get, rid)
        if req is None:
            raise HttpError(404, f"no approval request {rid}")
        return req

    # -- endpoints ------------------------------------------------------------------------------

    async def _list(self, request: Request) -> Response:
        ident = await self._identity(request)
        state = request.query.get("state") or None
        if state == "all":
            state = None
        if state is not None and state not in STATES:
            raise HttpError(400, f"state must be one of {', '.join(STATES)} or all")
        raw_limit = request.query.get("limit", "100")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise HttpError(400, "limit must be a number from 1 to 1000")
        reqs: list[ApprovalRequest] = await self.approvals.call(
            self.approvals.store.requests, state, int(raw_limit)
        )
        policy = self.policy()
        visible = [request_json(r, self.base_url) for r in reqs if self._may_see(ident, r, policy)]
        return Response.json(200, {"requests": visible})

    async def _show(self, request: Request, rid: str) -> Response:
        html = request.wants_html()
        if html and "authorization" not in request.headers:
            # A browser following a link: the page asks for the token before it shows anything.
            return self._page(200, rid, None)
        try:
            ident = await self._identity(request)
            req = await self._load(rid)
            if not self._may_see(ident, req, self.policy()):
                raise _not_yours(ident, rid)
        except HttpError as e:
            if html:
                return self._page(e.status, rid, None, error=e.message)
            raise
        if html:
            return self._page(200, rid, req)
        return Response.json(200, request_json(req, self.base_url))

    async def _decide(self, request: Request, rid: str, action: str) -> Response:
        form = request.media_type == "application/x-www-form-urlencoded"
        try:
            if form:
                fields = request.form()
                ident = await self._identity(request, fields.get("token", ""))
            elif request.media_type in ("application/json", ""):
                # The caller first: an unauthenticated body is never parsed.
                ident = await self._identity(request)
                fields = {k: v for k, v in request.json().items() if isinstance(v, str)}
            else:
                raise HttpError(415, "send application/json (or the page's form)")
            req = await self._load(rid)
            policy = self.policy()
            if action == "view":
                if not self._may_see(ident, req, policy):
                    raise _not_yours(ident, rid)
                if form:
                    return self._page(200, rid, req)
                return Response.json(200, request_json(req, self.base_url))
            reason = _reason(fields.get("reason"))
            try:
                req = await self.approvals.decide(rid, ident, action == "approve", reason)
            except ApprovalError as e:
                # The store refuses the requester by name (whatever the issuer), like this.
                refused = ident.name == req.requester or not self._is_approver(ident, req, policy)
                raise HttpError(403 if refused else 409, str(e)) from None
        except HttpError as e:
            if form:
                return self._page(e.status, rid, None, error=e.message)
            raise
        if form:
            done = f"your {'approval' if action == 'approve' else 'denial'} is recorded"
            return self._page(200, rid, req, notice=done)
        return Response.json(200, request_json(req, self.base_url))

    async def _ask(self, request: Request) -> Response:
        """An approval asked ahead of time (a pipeline, before it connects)."""
        ident = await self._identity(request)
        body = request.json()
        connection, statement = body.get("connection"), body.get("statement")
        grant_name = body.get("grant")
        if not isinstance(connection, str) or not connection:
            raise HttpError(400, "give the connection (its name, the dbname clients use)")
        if not isinstance(statement, str) or not statement.strip():
            raise HttpError(400, "give the statement to approve")
        if grant_name is not None and not isinstance(grant_name, str):
            raise HttpError(400, "grant must be a grant's name")
        params = body.get("params", [])
        if not isinstance(params, list) or not all(v is None or isinstance(v, str) for v in params):
            raise HttpError(400, "params must be a list of strings or nulls (the values, as text, in order)")
        if len(params) > 1000 or sum(len(v or "") for v in params) > 64 * 1024:
            raise HttpError(400, "params are limited to 1000 values and 64 KiB")
        reason = _reason(body.get("reason"))
        policy = self.policy()
        # A session's admission, without refusing grants for rules only the data path enforces
        # (approval rules among them): nothing runs here, the session asks again when it starts.
        verdict = policy.admit(
            ident,
            connection,
            user=grant_name,
            peer=request.peer or None,
            now=dt.datetime.now(dt.UTC),
            enforceable_only=False,
        )
        if verdict.grant is None:
            raise HttpError(403, verdict.reason)
        grant = verdict.grant
        session = policy.compile_session(grant)
        decision = session.judge(statement)
        if not decision.allow:
            raise HttpError(403, f"grant {grant.name} refuses this statement: {decision.message}")
        rule = session.approval_rule(statement)
        if rule is None:
            raise HttpError(
                400,
                f"no approval rule of grant {grant.name} matches this statement: it runs without approval",
            )
        req = await self.approvals.request(
            rule,
            requester=ident,
            connection=connection,
            grant=grant.name,
            statement=statement,
            params=params,
            reason=reason,
            origin="ahead",
        )
        return Response.json(201, request_json(req, self.base_url), {"Location": f"/approvals/{req.id}"})

    def _page(
        self,
        status: int,
        rid: str,
        req: ApprovalRequest | None,
        *,
        error: str = "",
        notice: str = "",
    ) -> Response:
        body = page.render(rid, req, base_path=self.base_path, error=error, notice=notice)
        return Response(status, body.encode(), "text/html; charset=utf-8", dict(page.HEADERS))


def _not_yours(ident: Identity, rid: str) -> HttpError:
    return HttpError(403, f"{printable(ident.name)} is neither the requester nor an approver of {rid}")


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise HttpError(405, f"use {' or '.join(allowed)}", {"Allow": ", ".join(allowed)})


def _reason(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise HttpError(400, "give a reason (it is kept in the audit trail)")
    if len(value) > MAX_REASON:
        raise HttpError(400, f"the reason is longer than {MAX_REASON} characters")
    return value.strip()


def admin_server(
    api: AdminApi,
    host: str,
    port: int,
    *,
    cert: str | None = None,
    key: str | None = None,
    limits: HttpLimits | None = None,
) -> HttpServer:
    """The admin API's HTTP server (TLS with ``cert`` and ``key``)."""
    ctx = server_ssl_context(cert, key) if cert is not None and key is not None else None
    return HttpServer(api.handle, host, port, ssl_context=ctx, limits=limits)
