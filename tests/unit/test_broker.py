"""The broker contract; every broker implementation must pass it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rooms.broker import Broker, Envelope, open_broker

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory://"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    async with open_broker(request.param) as b:
        yield b


async def test_subscribers_get_envelopes_in_publish_order(broker: Broker) -> None:
    """Each subscriber of a topic receives every envelope, in order."""
    got_a: list[Envelope] = []
    got_b: list[Envelope] = []
    async with (
        broker.subscribe("room:1", got_a.append),
        broker.subscribe("room:1", got_b.append),
    ):
        for i in range(5):
            await broker.publish("room:1", Envelope(text=f"m{i}", seq=i))
    assert [e.text for e in got_a] == [f"m{i}" for i in range(5)]
    assert got_a == got_b


async def test_topics_are_separate_and_unsubscribe_stops_delivery(
    broker: Broker,
) -> None:
    """Nothing crosses topics; after the block ends nothing more arrives."""
    got: list[Envelope] = []
    async with broker.subscribe("room:1", got.append):
        await broker.publish("room:2", Envelope(text="elsewhere"))
        await broker.publish("room:1", Envelope(text="here"))
    await broker.publish("room:1", Envelope(text="after"))
    assert [e.text for e in got] == ["here"]


async def test_a_failing_subscriber_does_not_starve_others(broker: Broker) -> None:
    """One subscriber's exception does not stop delivery to the next."""
    got: list[Envelope] = []

    def broken(envelope: Envelope) -> None:
        raise RuntimeError("subscriber bug")

    async with broker.subscribe("t", broken), broker.subscribe("t", got.append):
        await broker.publish("t", Envelope(text="x", control="revoke", user_id=3))
    assert got == [Envelope(text="x", control="revoke", user_id=3)]


async def test_ping_and_unknown_scheme(broker: Broker) -> None:
    """A working broker answers ping; an unknown URL scheme is a clear error."""
    await broker.ping()
    with pytest.raises(ValueError, match="unsupported"):
        async with open_broker("amqp://nowhere"):
            pass
