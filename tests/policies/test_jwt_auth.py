"""Bearer JWTs checked against a JWK set: which keys count, which algorithms each accepts, what a token maps to."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.jwt_auth import MAX_GROUPS, KeySet, TokenRejected, TokenVerifier
from policies.loader import PolicyError, parse_policy
from policies.schema import JwtConfig, UserConfig
from tests.fakes.identity_provider import AUDIENCE, ISSUER, IdentityProvider, claims, ec_key, forged, rsa_key

CONFIG = JwtConfig(jwks_url="https://idp.example.com/jwks", issuer=ISSUER, audience=AUDIENCE)


def _keys(provider: IdentityProvider, config: JwtConfig = CONFIG) -> KeySet:
    return KeySet.from_jwks({"keys": [key.jwk() for key in provider.keys]}, list(config.algorithms))


def _check(verifier: TokenVerifier, token: str, keys: KeySet):
    kid, alg = verifier.signing_key_id(token)
    return verifier.verify(token, kid, alg, keys)


def _reason(verifier: TokenVerifier, token: str, keys: KeySet) -> str:
    with pytest.raises(TokenRejected) as info:
        _check(verifier, token, keys)
    return info.value.reason


def test_only_asymmetric_signing_keys_with_an_id_are_kept() -> None:
    rsa, ec = rsa_key("rsa"), ec_key("ec")
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key("x").private))
    document = {"keys": [
        rsa.jwk(), ec.jwk(),
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"},
        {**private, "kid": "leaked-private"},
        {**rsa_key("enc").jwk(), "use": "enc"},
        {**rsa_key("no-kid").jwk(), "kid": None},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        {"kty": "EC", "kid": "odd-curve", "crv": ["P-256"], "x": [], "y": {}},
        {"kty": "RSA", "kid": "huge", "n": base64.urlsafe_b64encode(b"\xff" * 2048).decode().rstrip("="), "e": "AQAB"},
        "not a key",
    ]}
    keys = KeySet.from_jwks(document, list(CONFIG.algorithms))

    assert keys.kids == {"rsa", "ec"}
    with pytest.raises(ValueError, match="no usable signing key"):
        KeySet.from_jwks({"keys": document["keys"][2:]}, list(CONFIG.algorithms))
    for not_a_set in ([], {"keys": "x"}, "jwks"):
        with pytest.raises(ValueError, match="not a JWK set"):
            KeySet.from_jwks(not_a_set, list(CONFIG.algorithms))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["kty", "kid", "crv", "alg", "use", "n", "e", "x", "y", "d"]) | st.text(max_size=4), inner,
        max_size=8),
    max_leaves=24)
_JWK_VALUES = {"kty": st.sampled_from(["RSA", "EC", "OKP", "oct"]), "crv": st.sampled_from(["P-256", "Ed25519", "X"]),
               "alg": st.sampled_from(["RS256", "ES256", "EdDSA", "HS256", "none"]), "kid": st.text(max_size=4)}


@given(st.lists(_JSON | st.fixed_dictionaries({}, optional={**_JWK_VALUES, "n": _JSON, "x": _JSON}), max_size=4))
def test_whatever_the_key_endpoint_sends_is_a_key_set_or_a_value_error(keys: list) -> None:
    try:
        found = KeySet.from_jwks({"keys": keys}, list(CONFIG.algorithms))
    except ValueError:
        return
    assert all(alg in CONFIG.algorithms for _, alg in found.by_kid_and_alg)


_CLIENT_KEYS = _keys(IdentityProvider())


@given(st.text(max_size=200) | st.builds(lambda header, rest: "eyJ" + header + "." + rest, st.text(max_size=40),
                                         st.text(max_size=40)))
def test_whatever_a_client_sends_as_a_token_is_refused_by_reason(token: str) -> None:
    with pytest.raises(TokenRejected):
        _check(TokenVerifier(CONFIG, {}), token, _CLIENT_KEYS)


def test_a_key_verifies_only_the_algorithms_it_may_sign_with() -> None:
    declared, undeclared = rsa_key("declared", "RS256"), rsa_key("undeclared", declare_alg=False)
    provider = IdentityProvider(keys=[declared, undeclared, ec_key("ec")])
    keys, verifier = _keys(provider), TokenVerifier(CONFIG, {})

    for alg in ("RS256", "RS384", "PS256", "PS512"):
        assert _check(verifier, provider.token(kid="undeclared", alg=alg), keys).user == "carol"
    assert _reason(verifier, provider.token(kid="declared", alg="PS256"), keys) == "algorithm"
    assert _check(verifier, provider.token(kid="ec"), keys).user == "carol"
    # An EC token naming the RSA key; the same EC key id, published by someone else; RSA switched off in the policy.
    naming_rsa = jwt.encode(claims(), provider.key("ec").private, algorithm="ES256", headers={"kid": "declared"})
    assert _reason(verifier, naming_rsa, keys) == "algorithm"
    assert _reason(verifier, IdentityProvider(keys=[ec_key("ec")]).token(kid="ec"), keys) == "signature"
    only_ec = CONFIG.model_copy(update={"algorithms": ["ES256"]})
    ec_verifier = TokenVerifier(only_ec, {})
    assert _reason(ec_verifier, provider.token(kid="declared"), _keys(provider, only_ec)) == "algorithm"


def test_forged_tokens_are_refused_before_any_key_is_used() -> None:
    provider = IdentityProvider()
    verifier = TokenVerifier(CONFIG, {})
    pem = provider.key("rsa-1").public_pem()

    for header, secret in (({"alg": "none", "kid": "rsa-1"}, None), ({"alg": "HS256", "kid": "rsa-1"}, pem),
                           ({"alg": "HS512", "kid": "rsa-1"}, pem), ({"kid": "rsa-1"}, None)):
        with pytest.raises(TokenRejected) as info:
            verifier.signing_key_id(forged({**header, "typ": "JWT"}, claims(), secret))
        assert info.value.reason == "algorithm", header
    with pytest.raises(TokenRejected) as info:
        verifier.signing_key_id(forged({"alg": "RS256"}, claims(), None))
    assert info.value.reason == "malformed" and "kid" in info.value.detail
    for junk in ("eyJ.eyJ.", "eyJhbGciOiJSUzI1NiJ9.@@@.x", "eyJ" + "A" * 20_000 + ".a.b"):
        with pytest.raises(TokenRejected) as info:
            verifier.signing_key_id(junk)
        assert info.value.reason == "malformed"


@pytest.mark.parametrize(("extra", "reason"), [
    ({"lifetime_s": -120}, "expired"),
    ({"nbf": 4_000_000_000}, "not_yet_valid"),
    ({"aud": "someone-else"}, "audience"),
    ({"iss": "https://evil.example.com"}, "issuer"),
    ({"exp": None}, "claims"),
    ({"sub": ""}, "claims"),
    ({"sub": "x" * 300}, "claims"),
    ({"groups": ["ml-team", 7]}, "claims"),
    ({"groups": {"ml-team": True}}, "claims"),
    ({"groups": [f"g{i}" for i in range(MAX_GROUPS + 1)]}, "claims"),
])
def test_claims_that_do_not_hold_are_refused_with_their_reason(extra: dict, reason: str) -> None:
    provider = IdentityProvider()
    lifetime = extra.pop("lifetime_s", 600)
    drop = [name for name, value in extra.items() if value is None]
    payload = {**claims("carol", ["ml-team"]), **{k: v for k, v in extra.items() if v is not None}}
    payload["exp"] = payload["iat"] + lifetime
    for name in drop:
        del payload[name]
    token = jwt.encode(payload, provider.key("rsa-1").private, algorithm="RS256", headers={"kid": "rsa-1"})

    assert _reason(TokenVerifier(CONFIG, {}), token, _keys(provider)) == reason


def test_a_little_clock_skew_is_tolerated() -> None:
    provider = IdentityProvider()
    late = provider.token("carol", lifetime_s=-10)
    assert _check(TokenVerifier(CONFIG, {}), late, _keys(provider)).user == "carol"
    strict = CONFIG.model_copy(update={"leeway_s": 0})
    assert _reason(TokenVerifier(strict, {}), late, _keys(provider)) == "expired"


def test_the_claims_become_a_principal_with_the_users_own_groups_added() -> None:
    provider = IdentityProvider()
    nested = CONFIG.model_copy(update={"user_claim": "email", "groups_claim": "realm_access.roles"})
    verifier = TokenVerifier(nested, {"ada@corp.example": UserConfig(groups=["platform"])})
    token = provider.token("ignored-sub", email="ada@corp.example", realm_access={"roles": ["ml-team", "platform"]})

    principal = _check(verifier, token, _keys(provider))
    assert (principal.user, principal.groups, principal.key_id) == ("ada@corp.example", ("ml-team", "platform"),
                                                                   "jwt:ada@corp.example")
    one_group = provider.token("x", email="bo@corp.example", realm_access={"roles": "ml-team"})
    assert _check(verifier, one_group, _keys(provider)).groups == ("ml-team",)
    no_groups = provider.token("x", email="ada@corp.example")
    assert _check(verifier, no_groups, _keys(provider)).groups == ("platform",)


def test_a_verified_token_is_remembered_until_it_expires_or_the_keys_change() -> None:
    provider = IdentityProvider()
    keys, verifier = _keys(provider), TokenVerifier(CONFIG, {})
    token, short = provider.token("carol"), provider.token("carol", lifetime_s=-5)

    assert verifier.remembered(token, keys) is None
    principal = _check(verifier, token, keys)
    assert verifier.remembered(token, keys) is principal
    assert verifier.remembered(token, _keys(provider)) is None, "keys fetched again are checked again"
    _check(verifier, short, keys)
    assert verifier.remembered(short, keys) is None, "a token past its exp is never taken from memory"


def test_a_policy_with_a_broken_auth_block_names_each_place() -> None:
    text = """version: 1
auth:
  jwt:
    jwks_url: idp.example.com/jwks
    audience: []
    algorithms: [HS256]
    leeway_s: 3600
"""
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    report = info.value.format()
    for place in ("p.yaml:4: auth.jwt.jwks_url", "auth.jwt.issuer", "p.yaml:5: auth.jwt.audience",
                  "p.yaml:6: auth.jwt.algorithms[0]", "p.yaml:7: auth.jwt.leeway_s"):
        assert place in report, report
