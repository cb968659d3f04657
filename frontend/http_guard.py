"""What every HTTP request passes before the OpenAI API sees it (frontend process, issue 6).

An ASGI middleware around the FastAPI app (`http_api.py`), as in vLLM's API server:
- `--api-key`: every `/v1/*` request needs `Authorization: Bearer <key>`, else 401; `/health` and
  `/metrics` stay open, so probes and scrapers need no secret;
- `max_request_body_mb`: a larger declared `Content-Length` gets 413 before anything is read; a
  body without one (chunked) is counted as it arrives and cut off with 413 once past the cap;
- every request is counted by route and status (`mm_runtime_http_requests_total`).
Also the OpenAI error object every error response of the API carries.
"""

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from mm_runtime.frontend.metrics import FrontendMetrics
from mm_runtime.shared.errors import MMRuntimeError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# Route labels of the request counter; any other path counts as "other", so a scanner probing
# random paths cannot grow the metric without bound.
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def error_body(
    error: MMRuntimeError | None, status: int = 500, message: str = "", code: str = ""
) -> dict[str, object]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    if error is not None:
        status, message, code = error.http_status, error.message, error.code
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class BodyTooLarge(HTTPException):
    """Raised from `receive` inside the app, whose HTTPException handler answers 413 (FastAPI
    re-raises HTTPExceptions met while reading a body instead of turning them into a 400)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is over {max_bytes} bytes (max_request_body_mb)")


class HttpGuard:
    def __init__(
        self, app: Asgi, api_key: str | None, max_body_bytes: int, metrics: FrontendMetrics
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = [500]  # what the response started with; 500 if it never did

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counted_send)
        finally:
            route = path if path in ROUTES else "other"
            self.metrics.http_requests.labels(route, str(status[0])).inc()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"].startswith("/v1/") and not self._authorized(headers):
            message = "a valid API key is needed: send the header 'Authorization: Bearer <key>'"
            await _send_error(send, 401, message, "invalid_api_key")
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            error = BodyTooLarge(self.max_body_bytes)
            await _send_error(send, 413, error.detail, "request_too_large")
            return
        num_bytes = 0

        async def capped_receive() -> Message:
            nonlocal num_bytes
            message = await receive()
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                if num_bytes > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, capped_receive, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        # Constant time, so response timing does not reveal how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(None, status, message, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
