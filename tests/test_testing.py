"""The shared test kit (``udsgateway.testing``): its doubles and its HL7 helpers."""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.testing import DestinationPeer, outbound_message


class ReprTests(SynchronousTestCase):
    """Doubles that end up in log lines have a short repr that does not grow."""

    def test_endpoint_repr_stays_short_however_much_the_peer_received(self) -> None:
        """``ClientService`` logs its endpoint's repr on every retry: after a
        thousand messages the repr of a peer's endpoint is as short as before."""
        clock = Clock()
        peer = DestinationPeer(clock)
        endpoint = peer.endpoint()
        before = repr(endpoint)
        connecting = endpoint.connect(Factory.forProtocol(Protocol))
        clock.advance(0)
        self.successResultOf(connecting)
        for number in range(1000):
            peer.current.from_gateway(b"\x0b" + outbound_message(f"M{number}") + b"\x1c\r")
        self.assertEqual(len(peer.received), 1000)
        self.assertLess(len(repr(endpoint)), 100)
        self.assertEqual(len(repr(endpoint)), len(before))
        self.assertLess(len(repr(peer)), 200)
        self.assertLess(len(repr(peer.current)), 200)
