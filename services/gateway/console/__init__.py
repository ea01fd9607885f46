"""The web console, served by the gateway on its HTTP port at `/ui/` (`/` redirects there).

    GET  /ui/                      the console (its login form when not logged in)
    GET  /ui/static/<file>         its HTML, JavaScript and CSS (static/, no CDN, no build step)
    POST /ui/login                 access key + secret (a form) -> the cookie
    GET  /login?code=...           a `cloudml console` link (services.gateway.pages) -> the cookie
    POST /ui/logout
    GET|POST /ui/api/...           JSON for the pages (console.api)

Login: the cookie `cloudml_page` (HttpOnly, SameSite=Strict, Path=/ui/)
carries an ordinary platform token for the access key that logged in (1 h),
so revoking the key ends the session. No token or code is ever in a URL
after login.

Authorization: every JSON endpoint verifies the cookie's token (signature,
expiry, revoked key) and then calls the owning service's gRPC API with that
token as its Bearer token, so a tenant sees exactly what the APIs show it
(another tenant's job: 404) and an admin may pass `?tenant=` to look at any
tenant.

CSRF: state-changing calls (cancel, predict, a TensorBoard login link,
logout) are POSTs that must carry `Origin` equal to the console's own origin
and `X-CSRF-Token`, a value derived from the cookie's token that only a page
of this origin can read (`GET /ui/api/session`); the login form checks
`Origin` too. Responses carry a strict Content-Security-Policy (no inline
script, nothing from another origin, no framing).
"""
from services.gateway.console.app import Console

__all__ = ["Console"]
