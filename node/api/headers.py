"""Security headers on every HTTP response (pure ASGI, so streaming is untouched).

- Content-Security-Policy: scripts, styles and everything else only from this
  origin, never inline (no 'unsafe-inline'), no plugins, and no framing
  (frame-ancestors 'none', with X-Frame-Options DENY for older browsers);
- X-Content-Type-Options: nosniff; Referrer-Policy: no-referrer (FHIR search
  URLs carry patient identifiers);
- Cache-Control: no-store on everything except the UI's static files, which
  carry no patient data: any API answer may (a route may send a stricter
  value, as the reading app's images do: "private, no-store");
- Strict-Transport-Security when Carina is served over HTTPS.
"""
from __future__ import annotations

from starlette.datastructures import MutableHeaders

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

# Paths whose responses carry no patient data and may be cached (revalidated).
CACHEABLE_PREFIXES = ("/ui/",)


class SecurityHeaders:
    def __init__(self, app, *, https: bool, hsts_max_age: int = 31536000):
        self.app = app
        self.fixed = {
            "content-security-policy": CSP,
            "x-content-type-options": "nosniff",
            "x-frame-options": "DENY",
            "referrer-policy": "no-referrer",
            "cross-origin-opener-policy": "same-origin",
            "cross-origin-resource-policy": "same-origin",
        }
        if https:
            self.fixed["strict-transport-security"] = f"max-age={hsts_max_age}; includeSubDomains"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cacheable = scope["path"].startswith(CACHEABLE_PREFIXES)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.fixed.items():
                    headers[name] = value
                if cacheable:
                    headers["cache-control"] = "no-cache"
                else:
                    # A route may say more (images: "private, no-store"), never less.
                    if "no-store" not in headers.get("cache-control", ""):
                        headers["cache-control"] = "no-store"
                    headers["pragma"] = "no-cache"
            await send(message)

        await self.app(scope, receive, with_headers)
