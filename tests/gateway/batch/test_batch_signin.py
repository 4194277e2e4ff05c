"""A batch created with an identity provider's JWT runs as that signed-in user, groups and all, and is theirs."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest

from tests.conftest import sdk
from tests.fakes.identity_provider import AUDIENCE, ISSUER, IdentityProvider
from tests.gateway.batch.conftest import chat_line, finished, result_lines, submit

POLICY = """
auth:
  jwt: {{jwks_url: "{jwks}", issuer: "{issuer}", audience: "{audience}"}}
roles:
  analyst: {{models: ["chat-*"]}}
bindings:
  - {{group: ml-team, role: analyst}}
providers:
  up: {{type: openai, base_url: "{url}"}}
routes:
  chat-default: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
  embed-chat: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
batch: {{data_dir: "{data}", poll_interval_s: 0.1}}
"""


async def test_a_signed_in_users_batch_runs_with_the_groups_of_their_token(make_gateway, fake_openai, aiohttp_server,
                                                                          tmp_path: Path) -> None:
    provider = IdentityProvider()
    idp = await aiohttp_server(provider.app())
    _, upstream = fake_openai
    server = await make_gateway(POLICY, url=str(upstream.make_url("/v1")), jwks=str(idp.make_url("/jwks.json")),
                                issuer=ISSUER, audience=AUDIENCE, data=tmp_path / "batches")
    carol = sdk(server, provider.token("carol", ["ml-team"]))
    created = await submit(carol, [chat_line("allowed", "chat-default"), chat_line("denied", "embed-chat")])
    batch = await finished(carol, created.id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    assert list(await result_lines(carol, batch.output_file_id)) == ["allowed"]
    assert (await result_lines(carol, batch.error_file_id))["denied"]["response"]["status_code"] == 403
    record = orjson.loads((tmp_path / "batches" / "batches" / batch.id / "batch.json").read_bytes())
    assert record["owner"] == {"key_id": "jwt:carol", "user": "carol", "groups": ["ml-team"]}
    dave = sdk(server, provider.token("dave", ["ml-team"]))
    with pytest.raises(openai.NotFoundError):
        await dave.batches.retrieve(batch.id)
    assert (await dave.batches.list()).data == []
