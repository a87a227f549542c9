"""Transport selection drives the card (docs/operations.md "Choosing a
transport"): `Config.card_transport` picks the one card transport the vdisks
use, refuses two of them and an explicit ``[card] transport`` / ``[host]
card.transport`` that disagrees; the host's card link is of that transport
and is the only link reading the card's lost-writes log."""

from __future__ import annotations

import pytest

from nicsplit.card.transports.base import TRANSPORTS, has_card_half
from nicsplit.core.config import Config, ConfigError
from nicsplit.host.context import HostContext


def cfg(tmp_path, splitter="ring", vdisks=None, **sections) -> Config:
    raw = {"splitter": {"transport": splitter}, "vdisks": vdisks or {}, **sections}
    return Config(data=tmp_path, raw=raw)


def test_the_card_transport_is_the_one_the_vdisks_use(tmp_path):
    assert cfg(tmp_path).card_transport(["a", "b"], None, TRANSPORTS) == "ring"
    assert cfg(tmp_path).card_transport(["a", "b"], "nvme-pi", TRANSPORTS) == "nvme-pi"
    assert cfg(tmp_path, "nvme-pi").card_transport(["a"], None, TRANSPORTS) == "nvme-pi"
    # net has no card half: no card transport in use; nor with no vdisk
    assert cfg(tmp_path).card_transport(["a"], "net", TRANSPORTS) is None
    assert cfg(tmp_path).card_transport([], None, TRANSPORTS) is None
    # one vdisk on net beside nvme-pi ones: the card serves nvme-pi
    c = cfg(tmp_path, "nvme-pi", vdisks={"n": {"transport": "net"}})
    assert c.card_transport(["a", "n"], None, TRANSPORTS) == "nvme-pi"
    # an explicit [card] transport that agrees is fine
    c = cfg(tmp_path, card={"transport": "nvme-pi"})
    assert c.card_transport(["a"], "nvme-pi", TRANSPORTS) == "nvme-pi"
    assert c.default_card_transport(TRANSPORTS) == "nvme-pi"
    assert cfg(tmp_path).default_card_transport(TRANSPORTS) == "ring"
    assert has_card_half("ring") and has_card_half("nvme-pi") and not has_card_half("net")
    # shadow is a card transport like the others: selected the same ways
    assert has_card_half("shadow")
    assert cfg(tmp_path).card_transport(["a"], "shadow", TRANSPORTS) == "shadow"
    assert cfg(tmp_path, "ring", vdisks={"a": {"transport": "shadow"}}).card_transport(["a"], None, TRANSPORTS) == "shadow"
    with pytest.raises(ConfigError, match="two card transports"):
        cfg(tmp_path, "ring", vdisks={"b": {"transport": "shadow"}}).card_transport(["a", "b"], None, TRANSPORTS)


def test_two_card_transports_are_refused(tmp_path):
    c = cfg(tmp_path, "ring", vdisks={"b": {"transport": "nvme-pi"}})
    with pytest.raises(ConfigError) as e:
        c.card_transport(["a", "b"], None, TRANSPORTS)
    msg = str(e.value)
    assert "two card transports" in msg and "nvme-pi: b" in msg and "ring: a" in msg, msg
    assert "one card serves one transport" in msg


@pytest.mark.parametrize("section", ["card", "host"])
def test_an_explicit_card_transport_that_disagrees_is_refused(tmp_path, section):
    table = {"transport": "ring"} if section == "card" else {"card": {"transport": "ring"}}
    c = cfg(tmp_path, **{section: table})
    with pytest.raises(ConfigError) as e:
        c.card_transport(["a"], "nvme-pi", TRANSPORTS)
    msg = str(e.value)
    name = "[card] transport" if section == "card" else "[host] card.transport"
    assert msg.startswith(f"{name} = 'ring', but the vdisks use 'nvme-pi' (a)"), msg
    # net only: no card transport in use, nothing to disagree with
    assert c.card_transport(["a"], "net", TRANSPORTS) is None
    with pytest.raises(ConfigError, match="no card half"):
        cfg(tmp_path, card={"transport": "net"}).card_transport(["a"], None, TRANSPORTS)


def test_the_card_link_is_the_one_link_of_a_card_transport(tmp_path):
    ctx = HostContext(tmp_path, card={"transport": "ring"}, card_transport="nvme-pi")
    try:
        assert ctx.card.kind == "nvme-pi"
        assert ctx.link_for("nvme-pi") is ctx.card  # the link reading Layout.card_lost_log
        assert ctx.card._lost_log.path == ctx.layout.card_lost_log
        with pytest.raises(ValueError, match="the card serves 'nvme-pi'"):
            ctx.link_for("ring")
        assert ctx.link_for("net") is not ctx.card and ctx.link_for("net").kind == "net"
        card_links = [k for k in ctx.links if has_card_half(k)]
        assert card_links == ["nvme-pi"], ctx.links
    finally:
        ctx.close()
