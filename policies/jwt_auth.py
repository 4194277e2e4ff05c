"""Sign-in with the identity provider: bearer JWTs checked against the signing keys it publishes (a JWKS).

Only asymmetric algorithms pass, and each key only with the algorithms its type allows (just its declared `alg`
when it declares one): neither `alg: none` nor an HMAC whose secret is a public key can verify. The user and groups
claims become a Principal like a key's, so `users` and `bindings` apply to them. A verified token is kept until it
expires, so a client sending the same token again costs a dict lookup, not a signature check.

Fetching the keys is the gateway's part (gateway/auth.py); everything here is pure and synchronous.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from policies.keys import Principal
from policies.schema import JwtConfig, UserConfig

if TYPE_CHECKING:
    # PyJWT and the cryptography under it take ~0.1 s to import: only a policy with `auth.jwt` pays for them.
    import jwt
    from jwt.exceptions import PyJWTError
    from jwt.types import Options

# The bounds below hold against a misconfigured provider or a hostile key endpoint, not against the token's signer.
MAX_JWKS_KEYS = 100
# RSA verification slows with the square of the modulus: 8192 bits is already ~16x the 2048 providers use.
MAX_RSA_BITS = 8192
MAX_CACHED_TOKENS = 10_000
MAX_GROUPS = 256
MAX_NAME_CHARS = 256
MAX_TOKEN_CHARS = 16_384
JWT_KEY_PREFIX = "jwt:"

_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = ("Ed25519", "Ed448")
# Algorithm names worth repeating to the client; anything else the token's header holds is never echoed.
_NAMED = frozenset({"none", "HS256", "HS384", "HS512", *_RSA, *_EC_CURVES.values(), "EdDSA"})
_REQUIRED_CLAIMS = ("exp", "iss", "aud")

REASONS: dict[str, str] = {
    "expired": "it has expired",
    "not_yet_valid": "it is not valid yet",
    "signature": "its signature does not verify",
    "issuer": "it was not issued by the configured issuer",
    "audience": "it is not meant for this gateway (audience)",
    "unknown_key": "it is signed by a key the identity provider does not publish",
    "algorithm": "its signing algorithm is not accepted",
    "malformed": "it is not a well-formed JWT",
    "claims": "its claims do not name a user and groups",
}


class TokenRejected(Exception):
    """Why a bearer JWT is refused; `reason` is a key of REASONS, `detail` a sentence safe to show the client."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        self.reason = reason
        self.detail = detail or REASONS[reason]
        super().__init__(self.detail)


def _key_algorithms(jwk: dict, accepted: frozenset[str]) -> list[str]:
    kty, declared, curve = jwk.get("kty"), jwk.get("alg"), jwk.get("crv")
    curve = curve if isinstance(curve, str) else None
    if kty == "RSA":
        fitting: tuple[str, ...] = _RSA
    elif kty == "EC" and curve in _EC_CURVES:
        fitting = (_EC_CURVES[curve],)
    elif kty == "OKP" and curve in _OKP_CURVES:
        fitting = ("EdDSA",)
    else:
        return []
    return [alg for alg in fitting if alg in accepted and declared in (None, alg)]


@dataclass(frozen=True, slots=True)
class KeySet:
    """The provider's usable signing keys, each bound to every algorithm it may verify."""

    by_kid_and_alg: dict[tuple[str, str], jwt.PyJWK]
    kids: frozenset[str]

    @classmethod
    def from_jwks(cls, document: object, algorithms: list[str]) -> KeySet:
        """Raises ValueError when `document` is not a JWKS holding at least one usable signing key."""
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise ValueError("the document is not a JWK set (an object with a 'keys' array)")
        import jwt
        from jwt.exceptions import PyJWTError

        accepted = frozenset(algorithms)
        bound: dict[tuple[str, str], jwt.PyJWK] = {}
        for jwk in keys[:MAX_JWKS_KEYS]:
            # A key holding a private part ("d") is a leak, not a verification key; one meant for encryption is not ours.
            if not isinstance(jwk, dict) or "d" in jwk or jwk.get("use") not in (None, "sig"):
                continue
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid:
                continue
            for alg in _key_algorithms(jwk, accepted):
                try:
                    key = jwt.PyJWK(jwk, alg)
                except (PyJWTError, KeyError, TypeError, ValueError):
                    continue
                if getattr(key.key, "key_size", 0) <= MAX_RSA_BITS:
                    bound[(kid, alg)] = key
        if not bound:
            raise ValueError(f"the JWK set holds no usable signing key for {', '.join(algorithms)}")
        return cls(bound, frozenset(kid for kid, _ in bound))

    def key_for(self, kid: str, alg: str) -> jwt.PyJWK | None:
        return self.by_kid_and_alg.get((kid, alg))


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    expires: float
    keys: KeySet


def _claim(claims: Mapping[str, object], path: tuple[str, ...]) -> object:
    value: object = claims
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _is_name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS and value.isprintable()


class TokenVerifier:
    """Checks bearer JWTs for one policy version and maps them onto its users; built once per version."""

    def __init__(self, config: JwtConfig, users: Mapping[str, UserConfig]) -> None:
        self.config = config
        self._groups_of = {name: tuple(user.groups) for name, user in users.items()}
        self._user_path = tuple(config.user_claim.split("."))
        self._groups_path = tuple(config.groups_claim.split(".")) if config.groups_claim else ()
        self._accepted = frozenset(config.algorithms)
        self._options: Options = {"require": list(_REQUIRED_CLAIMS)}
        self._verified: dict[str, _Verified] = {}

    def remembered(self, token: str, keys: KeySet | None) -> Principal | None:
        """The principal of a token verified before against these same keys and not yet expired."""
        hit = self._verified.get(token)
        if hit is not None and hit.keys is keys and hit.expires > time.time():
            return hit.principal
        return None

    def signing_key_id(self, token: str) -> tuple[str, str]:
        """The (kid, alg) the token's header names, before anything is verified."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenRejected("malformed", f"it is longer than {MAX_TOKEN_CHARS} characters")
        header = _unverified_header(token)
        alg = header.get("alg")
        if alg not in self._accepted:
            named = f" ({alg})" if isinstance(alg, str) and alg in _NAMED else ""
            raise TokenRejected("algorithm", f"its signing algorithm{named} is not accepted: only "
                                f"{', '.join(self.config.algorithms)}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("malformed", "its header names no signing key (kid)")
        return kid, alg

    def verify(self, token: str, kid: str, alg: str, keys: KeySet) -> Principal:
        key = keys.key_for(kid, alg)
        if key is None:
            if kid in keys.kids:
                raise TokenRejected("algorithm", f"its signing algorithm ({alg}) does not fit the key it names")
            raise TokenRejected("unknown_key")
        import jwt
        from jwt.exceptions import MissingRequiredClaimError, PyJWTError

        config = self.config
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=config.audience, issuer=config.issuer,
                                leeway=config.leeway_s, options=self._options)
        except MissingRequiredClaimError as exc:
            reason = {"iss": "issuer", "aud": "audience"}.get(exc.claim, "claims")
            raise TokenRejected(reason, f"it has no '{exc.claim}' claim") from None
        except PyJWTError as exc:
            raise TokenRejected(_reason(exc)) from None
        principal = self._principal(claims)
        self._remember(token, _Verified(principal, float(claims["exp"]), keys))
        return principal

    def _principal(self, claims: dict) -> Principal:
        user = _claim(claims, self._user_path)
        if not _is_name(user):
            raise TokenRejected("claims", f"its '{self.config.user_claim}' claim is not a user name of at most "
                                f"{MAX_NAME_CHARS} printable characters")
        assert isinstance(user, str)
        groups = self._groups_of.get(user, ())
        claimed = _claim(claims, self._groups_path) if self._groups_path else None
        if claimed is not None:
            claimed = [claimed] if isinstance(claimed, str) else claimed
            if not isinstance(claimed, list) or len(claimed) > MAX_GROUPS or not all(map(_is_name, claimed)):
                # Never cut the list short: a group left out could be one a limit or budget applies to.
                raise TokenRejected("claims", f"its '{self.config.groups_claim}' claim is not a list of at most "
                                    f"{MAX_GROUPS} group names")
            groups = tuple(sorted({*groups, *claimed}))
        return Principal(JWT_KEY_PREFIX + user, user, groups)

    def _remember(self, token: str, verified: _Verified) -> None:
        if len(self._verified) >= MAX_CACHED_TOKENS:
            # The oldest goes first: it is the likeliest to have expired, and it costs one signature check to return.
            del self._verified[next(iter(self._verified))]
        self._verified[token] = verified


def _unverified_header(token: str) -> dict:
    """The header, read loosely and only to choose the key: PyJWT's decode reads the whole token again, strictly.
    jwt.get_unverified_header would decode every segment, and its byte-by-byte alphabet check costs more than the
    RSA verification."""
    segment = token.partition(".")[0]
    try:
        header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:
        # binascii.Error and orjson's decode error are both ValueErrors.
        raise TokenRejected("malformed") from None
    if not isinstance(header, dict):
        raise TokenRejected("malformed")
    return header


def _reason(exc: PyJWTError) -> str:
    from jwt.exceptions import (
        ExpiredSignatureError,
        ImmatureSignatureError,
        InvalidAlgorithmError,
        InvalidAudienceError,
        InvalidIssuerError,
        InvalidSignatureError,
    )

    # InvalidSignatureError is a DecodeError: it is looked at first.
    for kind, reason in ((ExpiredSignatureError, "expired"), (ImmatureSignatureError, "not_yet_valid"),
                         (InvalidAudienceError, "audience"), (InvalidIssuerError, "issuer"),
                         (InvalidSignatureError, "signature"), (InvalidAlgorithmError, "algorithm")):
        if isinstance(exc, kind):
            return reason
    return "malformed"
