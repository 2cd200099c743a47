"""The gateway's root resource: the two hot routes, basic auth, and everything else to Klein.

``/function/`` goes to the proxy and ``/async-function/`` to the async calls as direct
routes (:class:`~txfaas.web.server.Route`: no walk of the tree, their own body limits); TRACE
and CONNECT are refused on any path; the rest is the Klein app's, behind basic auth.
"""

from __future__ import annotations

import hmac
from typing import Any

import attrs
from twisted.web import resource, server

from txfaas.gateway.answers import text
from txfaas.gateway.app import GatewayApp
from txfaas.gateway.proxy import PROXIED_METHODS, REFUSED_METHODS
from txfaas.gateway.web import SYSTEM_BODY_LIMIT
from txfaas.web.server import LimitedSite, Route


class RefusedMethod(resource.Resource):
    """405 for TRACE and CONNECT, whatever the path."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"Allow", PROXIED_METHODS)
        return text(request, 405, f"{request.method.decode('latin-1')} is not allowed here")


class Unauthorized(resource.Resource):
    """401 asking for basic auth."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"WWW-Authenticate", b'Basic realm="Restricted"')
        return text(request, 401, "authentication required")


@attrs.frozen
class BasicAuth:
    user: str
    password: str

    def check(self, request: server.Request) -> bool:
        """Both user and password compared in constant time."""
        given_user = request.getUser() or b""
        given_password = request.getPassword() or b""
        user_ok = hmac.compare_digest(given_user, self.user.encode())
        password_ok = hmac.compare_digest(given_password, self.password.encode())
        return user_ok & password_ok


class GatewayRoot(resource.Resource):
    """Routes by the first path segment.

    With basic auth on, every path needs it except the open ones (deny by default): a
    protected route must not be reachable by another spelling (``//system/...``,
    ``/%2Fsystem/...``) that routes to the same Klein handler.
    """

    _OPEN = frozenset({b"function", b"async-function", b"healthz"})

    def __init__(
        self,
        proxy: resource.IResource,
        app: GatewayApp,
        auth: BasicAuth | None,
        *,
        max_body: int | None = None,
        max_async_body: int | None = None,
    ) -> None:
        super().__init__()
        self._app = app.resource()
        self._auth = auth
        self._unauthorized = Unauthorized()
        self._refused = RefusedMethod()
        #: The hot routes and their body limits (everything else: SYSTEM_BODY_LIMIT).
        self.routes = {
            b"function": Route(b"function", proxy, max_body or None),
            b"async-function": Route(b"async-function", app.accept_resource(), max_async_body or None),
        }

    def site(self, clock: Any, **settings: Any) -> LimitedSite:
        """The site that serves this root: one route decision per request (:meth:`LimitedSite.route`)
        gives both the leaf and the body limit, and the hot routes skip the walk of the tree."""
        return LimitedSite(self, clock, body_limit=SYSTEM_BODY_LIMIT, routes=self.routes, **settings)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.IResource:
        if request.method in REFUSED_METHODS:
            return self._refused
        route = self.routes.get(path)  # the decision LimitedSite.route makes, on the same segment
        if route is not None and route.leaf is not None:
            return route.leaf
        if self._auth is not None and path not in self._OPEN and not self._auth.check(request):
            return self._unauthorized
        # Hand the whole path to Klein.
        assert request.postpath is not None and request.prepath is not None  # set by Site
        request.postpath.insert(0, request.prepath.pop())
        return self._app

    def render(self, request: server.Request) -> Any:
        return self._app.render(request)
