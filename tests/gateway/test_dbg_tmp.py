import asyncio, time
from tests.conftest import sdk
from tests.gateway.test_routing import SPLIT, HI

async def test_x(make_gateway, fake_openai):
    _, upstream = fake_openai
    server = await make_gateway(SPLIT, url=str(upstream.make_url("/v1")))
    client = sdk(server)
    for n in (1, 5, 10, 20):
        t = time.perf_counter()
        await asyncio.gather(*(client.chat.completions.create(model="split-70-30", messages=HI) for _ in range(n)))
        print(n, time.perf_counter() - t)
