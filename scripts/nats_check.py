"""A NATS client from PyPI (nats-py) on the busbar bus: publish/subscribe with wildcards, a queue
group, request/reply, no responders, headers, auto-unsubscribe, and a native busbar responder
answering a Python request. Exits non-zero on the first failed check.

    python3 scripts/nats_check.py [nats://127.0.0.1:4222] [native-responder-topic]

The second argument names a topic a native `busbar reply` serves (scripts/nats-py-check.sh starts
one); without it that check is skipped.
"""

import asyncio
import sys

import nats
from nats.errors import NoRespondersError

URL = sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"
NATIVE_TOPIC = sys.argv[2] if len(sys.argv) > 2 else None


async def main() -> None:
    nc = await nats.connect(URL, name="nats-py check")
    other = await nats.connect(URL)
    print(f"connected to {nc.connected_url.netloc} (server {nc._server_info.get('server_name')})")

    # Publish / subscribe with both wildcards.
    star = await nc.subscribe("py.*")
    rest = await nc.subscribe("py.>")
    await nc.flush()
    await other.publish("py.one", b"1")
    await other.publish("py.two.deep", b"2")
    await other.flush()
    assert (await star.next_msg(timeout=5)).data == b"1"
    assert [(await rest.next_msg(timeout=5)).subject for _ in range(2)] == ["py.one", "py.two.deep"]
    print("ok  pub/sub with * and > wildcards")

    # A queue group: each message to one member.
    members = [await c.subscribe("py.jobs", queue="workers") for c in (nc, other)]
    await nc.flush()
    await other.flush()
    for i in range(20):
        await nc.publish("py.jobs", str(i).encode())
    await nc.flush()
    got = []
    for m in members:
        while True:
            try:
                got.append((await m.next_msg(timeout=0.5)).data)
            except nats.errors.TimeoutError:
                break
    assert sorted(got, key=int) == [str(i).encode() for i in range(20)], got
    print("ok  queue group: each of 20 messages once")

    # Request / reply between two NATS clients.
    async def double(msg):
        await msg.respond(str(int(msg.data) * 2).encode())

    await other.subscribe("py.double", cb=double)
    await other.flush()
    assert (await nc.request("py.double", b"21", timeout=5)).data == b"42"
    print("ok  request/reply")

    # No responders, at once.
    try:
        await nc.request("nobody.home", b"?", timeout=30)
        raise AssertionError("expected no responders")
    except NoRespondersError:
        print("ok  no responders (503)")

    # Headers travel both ways.
    hdr = await nc.subscribe("py.headers")
    await nc.flush()
    await other.publish("py.headers", b"h", headers={"Trace": "abc"})
    m = await hdr.next_msg(timeout=5)
    assert m.headers and m.headers.get("Trace") == "abc", m.headers
    print("ok  headers")

    # Auto-unsubscribe after 2 messages.
    limited = await nc.subscribe("py.limited")
    await limited.unsubscribe(limit=2)
    await nc.flush()
    for i in range(5):
        await other.publish("py.limited", str(i).encode())
    await other.flush()
    got = [(await limited.next_msg(timeout=5)).data for _ in range(2)]
    try:
        extra = await limited.next_msg(timeout=0.5)
        raise AssertionError(f"a third message arrived: {extra.data}")
    except (nats.errors.TimeoutError, nats.errors.BadSubscriptionError):
        pass
    assert got == [b"0", b"1"], got
    print("ok  UNSUB max_msgs")

    if NATIVE_TOPIC:
        reply = await nc.request(NATIVE_TOPIC, b"from python", timeout=5)
        print(f"ok  a native busbar responder answered: {reply.data.decode()!r}")

    # close, not drain: the iterator-style subscriptions above hold messages nobody reads.
    await nc.close()
    await other.close()
    print("all NATS checks passed")


asyncio.run(main())
