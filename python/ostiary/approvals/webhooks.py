"""Webhook notifications of approval requests and their outcomes (``admin.webhooks``).

Rules of this module: a delivery is one HTTP POST made with urllib in a worker thread (at most
``CONCURRENCY`` at once), bounded by the webhook's ``timeout``, never following redirects (a POST
that moves is refused, not replayed elsewhere). Anything but a 2xx answer raises ``WebhookError``;
the approvals service logs it and records it in the audit trail, and the hold goes on. Messages name
the webhook, never its URL (Slack's carries a secret). ``json`` sends the request as the API shows
it with its approve/deny endpoints; ``slack`` an incoming-webhook message whose statement is
truncated to ``SLACK_STATEMENT`` characters and whose text escapes Slack's control characters.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import trio

from ostiary.admin.api import request_json
from ostiary.approvals.service import Notifier
from ostiary.approvals.store import Request
from ostiary.config import Webhook
from ostiary.errors import OstiaryError

CONCURRENCY = 4  # deliveries of one webhook in flight (worker threads)
SLACK_STATEMENT = 2500  # a section's text is at most 3000 characters


class WebhookError(OstiaryError):
    """A webhook delivery failed; the message names the webhook and the cause, not the URL."""


def webhook_url(hook: Webhook) -> str:
    """The URL, read now from ``url``, ``url_env`` or ``url_file`` (rotation needs no restart)."""
    if hook.url is not None:
        return hook.url
    if hook.url_env is not None:
        value = os.environ.get(hook.url_env)
        if not value:
            raise WebhookError(f"webhook {hook.name}: environment variable {hook.url_env} is not set")
        return value.strip()
    if hook.url_file is not None:
        try:
            return Path(hook.url_file).read_text().strip()
        except OSError as e:
            raise WebhookError(f"webhook {hook.name}: cannot read {hook.url_file}: {e.strerror}") from None
    raise WebhookError(f"webhook {hook.name} has no URL")


def json_payload(event: str, req: Request, base_url: str) -> dict[str, Any]:
    page = f"{base_url}/approvals/{req.id}"
    return {
        "event": event,
        "request": request_json(req, base_url),
        "approve_url": f"{page}/approve",
        "deny_url": f"{page}/deny",
        "page_url": page,
    }


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(event: str, req: Request, base_url: str) -> dict[str, Any]:
    page = f"{base_url}/approvals/{req.id}"
    e = _slack_escape
    statement = req.statement
    if len(statement) > SLACK_STATEMENT:
        statement = statement[:SLACK_STATEMENT] + f"… ({len(req.statement)} characters)"
    # A fence inside the statement would end the code block early.
    statement = statement.replace("```", "`\u200b``")
    if event == "requested":
        headline = (
            f"Approval requested: {e(req.requester)} on {e(req.connection)} "
            f"(rule {e(req.rule)}, {req.required} approval(s) needed)"
        )
    else:
        headline = f"Approval {e(req.id)} {e(event)}: {e(req.decision_reason or event)}"
    fields = [
        f"*Request:* `{e(req.id)}`",
        f"*Identity:* {e(req.requester)}",
        f"*Connection:* {e(req.connection)}",
        f"*Grant:* {e(req.grant)}",
        f"*Rule:* {e(req.rule)}",
        f"*State:* {e(req.state)}",
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": headline}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"```{e(statement)}```"}},
    ]
    if req.reason:
        reason = {"type": "mrkdwn", "text": f"Reason: {e(req.reason)}"}
        blocks.append({"type": "context", "elements": [reason]})
    if event == "requested":
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Review and approve"},
                        "url": page,
                        "style": "primary",
                    }
                ],
            }
        )
    text = f"{headline}: {page}" if event == "requested" else headline
    return {"text": text, "blocks": blocks}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _post(hook: Webhook, body: bytes) -> None:
    url = webhook_url(hook)
    handlers: list[urllib.request.BaseHandler] = [_NoRedirects()]
    if url.startswith("https://"):
        ctx = ssl.create_default_context(cafile=hook.ca)
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "ostiary-approvals"},
    )
    try:
        with opener.open(req, timeout=hook.timeout) as resp:
            resp.read(64 * 1024)
    except urllib.error.HTTPError as e:
        raise WebhookError(f"webhook {hook.name}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", e)
        raise WebhookError(f"webhook {hook.name}: {why}") from None


class WebhookNotifier:
    """A notifier for ``Approvals.notifiers`` posting to one webhook; ``name`` names it in logs and
    the audit trail (never the URL)."""

    def __init__(self, hook: Webhook, base_url: str) -> None:
        self.hook = hook
        self.name = f"webhook {hook.name}"
        self.base_url = base_url.rstrip("/")
        self._build = slack_payload if hook.format == "slack" else json_payload
        self._limiter: trio.CapacityLimiter | None = None  # made in the trio run that first notifies

    async def __call__(self, event: str, req: Request) -> None:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(CONCURRENCY)
        body = json.dumps(self._build(event, req, self.base_url)).encode()
        await trio.to_thread.run_sync(_post, self.hook, body, limiter=self._limiter, abandon_on_cancel=True)


def webhook_notifier(hook: Webhook, base_url: str) -> Notifier:
    """The notifier of ``hook``; ``base_url`` is where links point (``admin.base_url()``)."""
    return WebhookNotifier(hook, base_url)
