"""OAuth2 client-credentials tokens: issue, verify and revoke.

Tokens are HS256 JWTs signed with a key made fresh for each sandbox process, so a token never
outlives the process that issued it. Revocation is "every token issued before now is invalid".
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

import jwt

from dicom_ingest_sandbox.errors import ApiError

SCOPES = ("upload", "metadata", "read")
ISSUER = "dicom-ingest-sandbox"
_ALGORITHM = "HS256"


def invalid_client(description: str = "client authentication failed") -> ApiError:
    """Build the 401 answer for missing or wrong client credentials.

    :param description: why authentication failed.
    """
    return ApiError(401, "invalid_client", description, {"WWW-Authenticate": 'Basic realm="sandbox"'})


def invalid_token(description: str) -> ApiError:
    """Build the 401 answer for a missing, malformed, expired or revoked bearer token.

    :param description: why the token was refused.
    """
    challenge = f'Bearer realm="sandbox", error="invalid_token", error_description="{description}"'
    return ApiError(401, "invalid_token", description, {"WWW-Authenticate": challenge})


def insufficient_scope(required: str) -> ApiError:
    """Build the 403 answer for a valid token that lacks the endpoint's scope.

    :param required: the scope the endpoint needs.
    """
    challenge = f'Bearer realm="sandbox", error="insufficient_scope", scope="{required}"'
    return ApiError(
        403,
        "insufficient_scope",
        f"this endpoint needs the {required!r} scope",
        {"WWW-Authenticate": challenge},
    )


def parse_basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """Return ``(client_id, client_secret)`` from an HTTP Basic header, or None if there is none.

    Both parts are form-decoded, as RFC 6749 section 2.3.1 asks.

    :param authorization: the ``Authorization`` header's value.
    """
    if not authorization:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise invalid_client("malformed Basic credentials") from None
    client_id, separator, client_secret = decoded.partition(":")
    if not separator:
        raise invalid_client("malformed Basic credentials")
    return unquote_plus(client_id), unquote_plus(client_secret)


def parse_bearer_token(authorization: str | None) -> str:
    """Return the bearer token from an ``Authorization`` header.

    :param authorization: the header's value.
    :raises ApiError: 401 ``invalid_token`` when the header is missing or not a bearer token.
    """
    if not authorization:
        raise invalid_token("missing bearer token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise invalid_token("the Authorization header is not a bearer token")
    return token.strip()


@dataclass(frozen=True)
class IssuedToken:
    """A freshly issued access token and what the token endpoint tells about it."""

    access_token: str = field(repr=False)
    scope: str
    expires_in: int

    def response(self) -> dict[str, str | int]:
        """Return the token endpoint's JSON document."""
        return {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": self.scope,
        }


@dataclass(frozen=True)
class TokenGrant:
    """What a verified token allows."""

    client_id: str
    scopes: frozenset[str]
    expires_at: float


class TokenService:
    """Authenticate the one configured client and issue, verify and revoke its tokens.

    :param client_id: the client id the sandbox accepts.
    :param client_secret: that client's secret.
    :param wall_clock: seconds since the epoch; replaceable in tests.
    """

    def __init__(
        self, client_id: str, client_secret: str, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self._client_id = client_id
        self._client_secret = client_secret
        self._wall_clock = wall_clock
        self._signing_key = secrets.token_bytes(32)
        self._revoked_before = 0.0

    def authenticate_client(self, client_id: str | None, client_secret: str | None) -> str:
        """Check client credentials in constant time and return the client id.

        :param client_id: the presented client id.
        :param client_secret: the presented secret.
        :raises ApiError: 401 ``invalid_client`` when either is missing or wrong.
        """
        if client_id is None or client_secret is None:
            raise invalid_client("client credentials are required (HTTP Basic or client_id/client_secret)")
        id_matches = hmac.compare_digest(client_id.encode(), self._client_id.encode())
        secret_matches = hmac.compare_digest(client_secret.encode(), self._client_secret.encode())
        if not (id_matches and secret_matches):
            raise invalid_client()
        return client_id

    @staticmethod
    def granted_scopes(requested: str | None) -> tuple[str, ...]:
        """Return the scopes to grant for a ``scope`` parameter (all of them when absent or empty).

        :param requested: the space-separated ``scope`` parameter.
        :raises ApiError: 400 ``invalid_scope`` for a scope the sandbox does not know.
        """
        names = (requested or "").split()
        if not names:
            return SCOPES
        unknown = sorted(set(names) - set(SCOPES))
        if unknown:
            raise ApiError(400, "invalid_scope", f"unknown scope(s): {' '.join(unknown)}")
        return tuple(scope for scope in SCOPES if scope in names)

    def issue(self, client_id: str, scopes: tuple[str, ...], ttl_seconds: int) -> IssuedToken:
        """Issue a signed token.

        :param client_id: the authenticated client.
        :param scopes: the scopes to grant.
        :param ttl_seconds: the token's lifetime.
        """
        issued_at = self._wall_clock()
        scope = " ".join(scopes)
        claims = {
            "iss": ISSUER,
            "sub": client_id,
            "scope": scope,
            "iat": issued_at,
            "exp": issued_at + ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, self._signing_key, algorithm=_ALGORITHM)
        return IssuedToken(access_token=token, scope=scope, expires_in=ttl_seconds)

    def verify(self, authorization: str | None, required_scope: str | None) -> TokenGrant:
        """Verify a bearer token's signature, expiry, revocation and scope.

        :param authorization: the request's ``Authorization`` header.
        :param required_scope: the scope the endpoint needs; None accepts any valid token.
        :raises ApiError: 401 ``invalid_token`` or 403 ``insufficient_scope``.
        """
        token = parse_bearer_token(authorization)
        try:
            claims = jwt.decode(
                token,
                self._signing_key,
                algorithms=[_ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "scope"]},
            )
        except jwt.ExpiredSignatureError:
            raise invalid_token("the token has expired") from None
        except jwt.InvalidTokenError:
            raise invalid_token("the token is not valid") from None
        if float(claims["iat"]) < self._revoked_before:
            raise invalid_token("the token has been revoked")
        scopes = frozenset(str(claims["scope"]).split())
        if required_scope is not None and required_scope not in scopes:
            raise insufficient_scope(required_scope)
        return TokenGrant(client_id=str(claims["sub"]), scopes=scopes, expires_at=float(claims["exp"]))

    def seconds_left(self, grant: TokenGrant) -> int:
        """Return the whole seconds until a verified token expires.

        :param grant: the verified token.
        """
        return max(0, int(grant.expires_at - self._wall_clock()))

    def revoke_all(self) -> None:
        """Invalidate every token issued until now; later tokens stay valid."""
        self._revoked_before = self._wall_clock()
