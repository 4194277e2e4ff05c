"""A fake identity provider: signing keys the test makes, a JWKS endpoint that counts its fetches, and tokens.

Tokens are signed with PyJWT, except the forged ones (`alg: none`, HS256 keyed with the public key), which PyJWT
refuses to make and are assembled by hand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

ISSUER = "https://idp.example.com/realms/corp"
AUDIENCE = "lockgate"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class SigningKey:
    kid: str
    private: PrivateKeyTypes
    alg: str
    declare_alg: bool = True

    def jwk(self) -> dict:
        public = self.private.public_key()
        algorithm = jwt.algorithms.RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else jwt.algorithms.ECAlgorithm
        jwk = json.loads(algorithm.to_jwk(public))
        jwk.update({"kid": self.kid, "use": "sig"})
        if self.declare_alg:
            jwk["alg"] = self.alg
        return jwk

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)


def rsa_key(kid: str, alg: str = "RS256", declare_alg: bool = True) -> SigningKey:
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), alg, declare_alg)


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")


@dataclass
class IdentityProvider:
    keys: list[SigningKey] = field(default_factory=lambda: [rsa_key("rsa-1"), ec_key("ec-1")])
    # Keys signing tokens but not (yet) published, as after a rotation the gateway has not seen.
    unpublished: list[SigningKey] = field(default_factory=list)
    fetches: int = 0
    status: int = 200

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        return app

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        return web.json_response({"keys": [key.jwk() for key in self.keys]})

    def key(self, kid: str) -> SigningKey:
        return next(key for key in [*self.keys, *self.unpublished] if key.kid == kid)

    def token(self, user: str = "carol", groups: list[str] | None = None, *, kid: str = "rsa-1", alg: str | None = None,
              lifetime_s: float = 600, **claims: object) -> str:
        key = self.key(kid)
        now = time.time()
        payload: dict[str, object] = {"iss": ISSUER, "aud": AUDIENCE, "sub": user, "iat": int(now),
                                      "exp": int(now + lifetime_s)}
        if groups is not None:
            payload["groups"] = groups
        payload.update(claims)
        return jwt.encode(payload, key.private, algorithm=alg or key.alg, headers={"kid": kid})


def forged(header: dict, payload: dict, secret: bytes | None) -> str:
    """A token PyJWT will not make: unsigned (`secret` None) or HMAC-SHA256 with `secret`."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if secret is None:
        return signing_input + "."
    return signing_input + "." + _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def claims(user: str = "carol", groups: list[str] | None = None, **extra: object) -> dict:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": user, "iat": now, "exp": now + 600,
            **({"groups": groups} if groups is not None else {}), **extra}
