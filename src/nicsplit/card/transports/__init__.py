"""Transports from the splitter filter to the card (see `base` for the
interface and the list of transports)."""

from nicsplit.card.transports.base import CardEndpoint, SplitterTransport, TransportUnavailable

__all__ = ["CardEndpoint", "SplitterTransport", "TransportUnavailable"]
