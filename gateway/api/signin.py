"""Bearer JWTs from the identity provider: its signing keys fetched with aiohttp (never a blocking call on the
event loop), refreshed in the background and at once for a key not yet known, at most once per
`jwks_min_refetch_s`, so a flood of made-up key ids cannot make the gateway hammer the provider.

A request waits on at most one fetch, bounded by `jwks_timeout_s`, and only when its token names a key the gateway
does not hold; every other request is a dict lookup (a token seen before) or one signature check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import Counter

from gateway.compiled import CompiledPolicy
from gateway.errors import GatewayError
from policies.jwt_auth import KeySet, TokenRejected, TokenVerifier
from policies.keys import Principal
from policies.schema import JwtConfig

log = logging.getLogger("lockgate.auth")

MAX_JWKS_BYTES = 1024 * 1024
_MAX_REDIRECTS = 3
JWKS_FETCHES = Counter("lockgate_jwks_fetches", "Fetches of the identity provider's signing keys, by outcome "
                       "(changed, unchanged, failed)", ["outcome"])


def rejected(exc: TokenRejected) -> GatewayError:
    # RFC 6750's challenge; the description is a quoted string, so it keeps to printable ASCII without quotes.
    described = "".join(c for c in exc.detail if c.isascii() and c.isprintable() and c not in '"\\')
    return GatewayError(401, f"The bearer token was rejected: {exc.detail}.", "invalid_request_error",
                        f"token_{exc.reason}",
                        headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{described}"'})


def keys_unavailable() -> GatewayError:
    return GatewayError(503, "The identity provider's signing keys could not be fetched, so the bearer token cannot "
                        "be checked; try again shortly.", "api_error", "identity_provider_unavailable")


class JwksSource:
    """One JWKS URL's keys: fetched at start, every `jwks_refresh_s`, and for an unknown key id (rate-limited)."""

    def __init__(self, config: JwtConfig) -> None:
        self.url = config.jwks_url
        self.keys: KeySet | None = None
        self._algorithms = list(config.algorithms)
        self._timeout = aiohttp.ClientTimeout(total=config.jwks_timeout_s)
        self._refresh_s = config.jwks_refresh_s
        self._min_refetch_s = config.jwks_min_refetch_s
        self._document: object = None
        self._session: aiohttp.ClientSession | None = None
        self._fetching: asyncio.Task[None] | None = None
        self._last_refetch = -float("inf")
        self._refresher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._begin_fetch()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def settled(self, wait_s: float) -> None:
        """Waits (up to `wait_s`) for the fetch under way, if one is."""
        if self._fetching is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._fetching), wait_s)

    async def close(self) -> None:
        for task in (self._refresher, self._fetching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()

    async def keys_for_unknown_kid(self) -> KeySet | None:
        """The keys after one fetch, unless an unknown key id already made one within `jwks_min_refetch_s`; callers
        at the same time share the fetch under way."""
        fetch = self._fetching
        if fetch is None:
            now = time.monotonic()
            if now - self._last_refetch < self._min_refetch_s:
                return self.keys
            self._last_refetch = now
            fetch = self._begin_fetch()
        # Shielded: a client that goes away does not cancel the fetch other requests are waiting on.
        await asyncio.shield(fetch)
        return self.keys

    def _begin_fetch(self) -> asyncio.Task[None]:
        self._fetching = asyncio.get_running_loop().create_task(self._fetch())
        return self._fetching

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await asyncio.shield(self._fetching or self._begin_fetch())

    async def _fetch(self) -> None:
        try:
            document = orjson.loads(await self._download())
            if document == self._document:
                JWKS_FETCHES.labels("unchanged").inc()
                return
            self.keys = KeySet.from_jwks(document, self._algorithms)
            self._document = document
            JWKS_FETCHES.labels("changed").inc()
            log.info("%d signing key(s) from %s", len(self.keys.kids), self.url)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            JWKS_FETCHES.labels("failed").inc()
            # orjson's decode error is a ValueError, like every problem KeySet.from_jwks finds.
            held = f"still using the {len(self.keys.kids)} key(s) fetched before" if self.keys else "no key is held"
            log.error("the identity provider's keys could not be fetched from %s (%s): %s", self.url,
                      str(exc) or type(exc).__name__, held)
        finally:
            self._fetching = None

    async def _download(self) -> bytes:
        assert self._session is not None
        async with self._session.get(self.url, max_redirects=_MAX_REDIRECTS,
                                     headers={"Accept": "application/json"}) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            if (response.content_length or 0) > MAX_JWKS_BYTES:
                raise ValueError(f"the answer is larger than {MAX_JWKS_BYTES} bytes")
            body = bytearray()
            async for chunk in response.content.iter_chunked(65_536):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"the answer is larger than {MAX_JWKS_BYTES} bytes")
            return bytes(body)


def _source_settings(config: JwtConfig) -> tuple[object, ...]:
    return (config.jwks_url, tuple(config.algorithms), config.jwks_timeout_s, config.jwks_refresh_s,
            config.jwks_min_refetch_s)


class SignIn:
    """JWT sign-in for whichever policy version a request runs under: one verifier per version (it holds that
    version's users), one key source kept across versions while its settings do not change."""

    def __init__(self) -> None:
        self.source: JwksSource | None = None
        self._settings: tuple[object, ...] = ()
        self._policy: CompiledPolicy | None = None
        self._verifier: TokenVerifier | None = None
        self._retired: set[asyncio.Task[None]] = set()

    async def prepare(self, policy: CompiledPolicy, wait_s: float) -> None:
        """Builds the sign-in of `policy` and waits (up to `wait_s`) for its first keys, so the first requests do not."""
        self._for(policy)
        if self.source is not None:
            await self.source.settled(wait_s)

    async def authenticate(self, token: str, policy: CompiledPolicy) -> Principal:
        verifier = self._verifier if policy is self._policy else self._for(policy)
        source = self.source
        assert verifier is not None and source is not None
        keys = source.keys
        principal = verifier.remembered(token, keys)
        if principal is not None:
            return principal
        try:
            kid, alg = verifier.signing_key_id(token)
            if keys is None or kid not in keys.kids:
                keys = await source.keys_for_unknown_kid()
                if keys is None:
                    raise keys_unavailable()
            return verifier.verify(token, kid, alg, keys)
        except TokenRejected as exc:
            raise rejected(exc) from None

    def _for(self, policy: CompiledPolicy) -> TokenVerifier | None:
        config = policy.loaded.policy.auth.jwt
        self._policy = policy
        self._verifier = None if config is None else TokenVerifier(config, policy.loaded.policy.users)
        settings = () if config is None else _source_settings(config)
        if settings != self._settings:
            if self.source is not None:
                self._retire(self.source)
            self.source = None if config is None else JwksSource(config)
            if self.source is not None:
                self.source.start()
            self._settings = settings
        return self._verifier

    def _retire(self, source: JwksSource) -> None:
        task = asyncio.get_running_loop().create_task(source.close())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def close(self) -> None:
        if self.source is not None:
            await self.source.close()
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)


SIGN_IN: web.AppKey[SignIn] = web.AppKey("sign_in", SignIn)
