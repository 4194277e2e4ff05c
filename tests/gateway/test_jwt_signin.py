"""Sign-in with the identity provider: JWTs from a local JWKS endpoint, through the real `openai` SDK."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ADMIN_KEY, ALICE_KEY, policy_text, sdk
from tests.fakes.identity_provider import AUDIENCE, ISSUER, IdentityProvider, claims, forged, rsa_key

HI = [{"role": "user", "content": "hi there"}]

POLICY = """
auth:
  jwt:
    jwks_url: "{jwks}"
    issuer: "{issuer}"
    audience: [other-app, "{audience}"]
    jwks_min_refetch_s: {min_refetch}
roles:
  analyst: {{models: ["chat-*"]}}
  embedder: {{models: ["embed-*"]}}
  everything: {{models: ["*"]}}
  admin: {{admin: true}}
bindings:
  - {{user: root, role: admin}}
  - {{group: ml-team, role: analyst}}
  - {{group: data-science, role: embedder}}
  - {{user: bob, role: everything}}
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  embed-small: {{targets: [{{provider: up, model: text-embedding-3-small}}]}}
"""


@pytest.fixture
async def idp(aiohttp_server) -> tuple[IdentityProvider, TestServer]:
    provider = IdentityProvider()
    return provider, await aiohttp_server(provider.app())


@pytest.fixture
def start(make_gateway, fake_openai, idp):
    async def started(min_refetch: float = 60) -> TestServer:
        _, upstream = fake_openai
        return await make_gateway(POLICY, url=str(upstream.make_url("/v1")), jwks=str(idp[1].make_url("/jwks.json")),
                                  issuer=ISSUER, audience=AUDIENCE, min_refetch=min_refetch)

    return started


async def _chat(server: TestServer, token: str) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as session, session.post(
            server.make_url("/v1/chat/completions"), json={"model": "chat-default", "messages": HI},
            headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_a_signed_in_user_gets_the_routes_of_the_groups_the_token_claims(start, idp) -> None:
    provider, _ = idp
    server = await start()
    carol = sdk(server, provider.token("carol", ["ml-team", "visitors"]))

    assert (await carol.chat.completions.create(model="chat-default", messages=HI)).choices
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await carol.embeddings.create(model="embed-small", input="x")
    assert denied.value.code == "model_not_permitted"
    assert [m.id for m in (await carol.models.list()).data] == ["chat-default"]
    # The EC key signs as well as the RSA one; the groups of a user listed under `users` add to the token's.
    alice = sdk(server, provider.token("alice", ["ml-team"], kid="ec-1"))
    assert sorted(m.id for m in (await alice.models.list()).data) == ["chat-default", "embed-small"]
    # A user binding applies to the signed-in user of that name, with no group in the token at all.
    bob = sdk(server, provider.token("bob"))
    assert (await bob.embeddings.create(model="embed-small", input="x")).data
    # Lockgate keys keep working beside the tokens.
    assert (await sdk(server, ALICE_KEY).embeddings.create(model="embed-small", input="x")).data
    assert provider.fetches == 1, "the keys fetched at start serve every token"


async def test_a_group_the_token_does_not_claim_grants_nothing(start, idp) -> None:
    provider, _ = idp
    server = await start()
    nobody = sdk(server, provider.token("dave", ["visitors"]))
    with pytest.raises(openai.PermissionDeniedError):
        await nobody.chat.completions.create(model="chat-default", messages=HI)
    assert (await nobody.models.list()).data == []


async def test_every_rejection_is_a_401_naming_its_reason_and_never_the_token(start, idp) -> None:
    provider, _ = idp
    server = await start()
    public_pem = provider.key("rsa-1").public_pem()
    cases = {
        "token_expired": provider.token("carol", ["ml-team"], lifetime_s=-120),
        "token_audience": provider.token("carol", ["ml-team"], aud="someone-else"),
        "token_issuer": provider.token("carol", ["ml-team"], iss="https://evil.example.com"),
        "token_signature": IdentityProvider(keys=[rsa_key("rsa-1")]).token("carol", ["ml-team"]),
        "token_algorithm": forged({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims("carol", ["ml-team"]), None),
        "token_malformed": "eyJhbGciOi.not-base64!.x",
    }
    hs256 = forged({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims("carol", ["ml-team"]), public_pem)
    for code, token in [*cases.items(), ("token_algorithm", hs256)]:
        status, body, headers = await _chat(server, token)
        assert (status, body["error"]["code"], body["error"]["type"]) == (401, code, "invalid_request_error"), body
        assert token not in body["error"]["message"] and token[-20:] not in body["error"]["message"]
        assert body["error"]["message"].startswith("The bearer token was rejected: ")
        assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    status, body, _ = await _chat(server, cases["token_expired"])
    assert "expired" in body["error"]["message"]
    status, body, _ = await _chat(server, hs256)
    assert "HS256" in body["error"]["message"]
    # The SDK raises its usual exception.
    with pytest.raises(openai.AuthenticationError) as info:
        await sdk(server, cases["token_audience"]).chat.completions.create(model="chat-default", messages=HI)
    assert "audience" in info.value.message


async def test_an_unknown_key_fetches_the_keys_once_then_is_refused_without_asking_again(start, idp) -> None:
    provider, _ = idp
    provider.unpublished.append(rsa_key("rsa-unpublished"))
    server = await start()
    assert provider.fetches == 1
    stranger = provider.token("carol", ["ml-team"], kid="rsa-unpublished")

    status, body, _ = await _chat(server, stranger)
    assert (status, body["error"]["code"]) == (401, "token_unknown_key")
    assert provider.fetches == 2, "an unknown key id fetches the keys once"
    for made_up in ("kid-a", "kid-b", "kid-c"):
        provider.unpublished.append(rsa_key(made_up))
        status, body, _ = await _chat(server, provider.token("carol", kid=made_up))
        assert (status, body["error"]["code"]) == (401, "token_unknown_key")
    assert provider.fetches == 2, "within jwks_min_refetch_s no other key id makes the gateway ask again"


async def test_a_key_rotated_in_is_fetched_for_the_first_token_it_signs(start, idp) -> None:
    provider, _ = idp
    server = await start(min_refetch=1)
    rotated = rsa_key("rsa-2", "PS256", declare_alg=False)
    provider.keys.append(rotated)
    token = provider.token("carol", ["ml-team"], kid="rsa-2", alg="PS256")

    assert (await sdk(server, token).chat.completions.create(model="chat-default", messages=HI)).choices
    assert provider.fetches == 2
    # The key published without an `alg` verifies every RSA algorithm, and the verified token is then remembered.
    assert (await sdk(server, provider.token("carol", ["ml-team"], kid="rsa-2", alg="RS512")).models.list()).data
    assert (await sdk(server, token).models.list()).data
    assert provider.fetches == 2


async def test_an_unreachable_identity_provider_is_a_503_until_it_answers(start, idp) -> None:
    provider, _ = idp
    provider.status = 500
    server = await start(min_refetch=1)
    token = provider.token("carol", ["ml-team"])

    status, body, _ = await _chat(server, token)
    assert (status, body["error"]["code"]) == (503, "identity_provider_unavailable")
    assert (await sdk(server, ALICE_KEY).models.list()).data, "keys work while the identity provider is down"
    provider.status = 200
    deadline = time.monotonic() + 20
    while status != 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        status, body, _ = await _chat(server, token)
    assert status == 200, body


async def test_the_messages_door_rejects_in_anthropics_shape(start, idp) -> None:
    provider, _ = idp
    server = await start()
    expired = provider.token("carol", ["ml-team"], lifetime_s=-120)
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key=expired, max_retries=0)
    try:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.create(model="chat-default", max_tokens=16, messages=HI)
        assert info.value.body["type"] == "error" and "expired" in info.value.body["error"]["message"]
        signed_in = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), max_retries=0,
                                             api_key=provider.token("carol", ["ml-team"]))
        assert (await signed_in.messages.create(model="chat-default", max_tokens=16, messages=HI)).content
        await signed_in.close()
    finally:
        await client.close()


async def test_sign_in_follows_policy_reloads(make_gateway, policy_file, fake_openai, idp) -> None:
    provider, jwks = idp
    _, upstream = fake_openai
    urls = {"url": str(upstream.make_url("/v1")), "jwks": str(jwks.make_url("/jwks.json")), "issuer": ISSUER,
            "audience": AUDIENCE, "min_refetch": 60}
    without_auth = POLICY.replace(POLICY[:POLICY.index("roles:")], "\n")
    server = await make_gateway(without_auth, **urls)
    token = provider.token("carol", ["ml-team"])
    status, body, _ = await _chat(server, token)
    assert (status, body["error"]["code"]) == (401, "invalid_api_key"), "without `auth` a token is an unknown key"

    policy_file(policy_text(POLICY, **urls))
    async with aiohttp.ClientSession() as session, session.post(
            server.make_url("/admin/reload"), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 200 and (await resp.json())["reloaded"]
    assert (await sdk(server, token).chat.completions.create(model="chat-default", messages=HI)).choices

    policy_file(policy_text(POLICY.replace("ml-team, role: analyst", "ml-team, role: embedder"), **urls))
    async with aiohttp.ClientSession() as session, session.post(
            server.make_url("/admin/reload"), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert (await resp.json())["reloaded"]
    with pytest.raises(openai.PermissionDeniedError):
        await sdk(server, token).chat.completions.create(model="chat-default", messages=HI)
    assert provider.fetches == 1, "the keys outlive a reload that keeps their settings"
