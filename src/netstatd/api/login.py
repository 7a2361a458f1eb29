"""The login page: a browser posts a token once and gets a session cookie; no script, no token kept.

The form carries the page the browser asked for (`next`, with its query string, where the UI keeps
its filters), so the UI opens where the user was going. `next` is only ever a path on this agent.
"""

from __future__ import annotations

import html

from aiohttp import web

from .access import AccessPolicy

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>netstatd: log in</title>
<link rel="icon" href="data:,">
<style>
body {{ font: 15px system-ui, sans-serif; display: grid; place-items: center; min-height: 90vh; margin: 0; }}
form {{ display: grid; gap: .6em; width: min(26em, 90vw); }}
input {{ font: inherit; padding: .4em; }}
.error {{ color: #b00020; }}
</style>
</head>
<body>
<form method="post" action="login">
  <h1>netstatd</h1>
  <label for="token">Token</label>
  <input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
  <input type="hidden" name="next" value="{next}">
  <p class="error" role="alert">{error}</p>
  <button type="submit">Log in</button>
  <p>A token from the agent's --auth-token-file (the netstatd-tokens Secret).</p>
</form>
</body>
</html>
"""


def safe_next(value: str) -> str:
    """A path on this agent to go to after logging in; anything else (another host) becomes "/"."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value or any(c < " " for c in value):
        return "/"
    return value


def login_page(next_path: str, error: str = "", status: int = 401) -> web.Response:
    body = PAGE.format(next=html.escape(safe_next(next_path)), error=html.escape(error))
    headers = {  # no script at all; the form posts to this agent only
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }
    return web.Response(text=body, status=status, content_type="text/html", headers=headers)


def add_routes(app: web.Application, policy: AccessPolicy, port: int) -> None:
    """/login (the form, and its post) and /logout, when there are tokens to log in with."""
    if policy.tokens is None or policy.sessions is None:
        return
    tokens, sessions, cookie = policy.tokens, policy.sessions, policy.session_cookie(port)

    async def show(request: web.Request) -> web.Response:
        return login_page(request.query.get("next", "/"), status=200)

    async def submit(request: web.Request) -> web.Response:
        form = await request.post()
        token, target = str(form.get("token", "")), safe_next(str(form.get("next", "/")))
        if not token or tokens.check(token) is None:
            await policy.failed(request, "invalid_token")
            return login_page(target, "That token is not valid.")
        response = web.Response(status=303, headers={"Location": target})
        response.set_cookie(
            cookie,
            sessions.issue(token),
            max_age=sessions.lifetime_s,
            httponly=True,
            samesite="Strict",
            secure=policy.tls,
            path="/",
        )
        return response

    async def logout(request: web.Request) -> web.Response:
        response = web.Response(status=303, headers={"Location": "/"})
        response.del_cookie(cookie, path="/")
        return response

    app.router.add_get("/login", show)
    app.router.add_post("/login", submit)
    app.router.add_post("/logout", logout)
