"""nicsplit.core.catalog: the vdisk catalog's codec and read-only view,
read from what the host's datastore writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from nicsplit.card.process import DatastoreCatalog
from nicsplit.core.catalog import CatalogReader, CorruptDatastore, DatastoreError, encode, open_catalog, parse
from nicsplit.host.datastore import Datastore

MiB = 1 << 20


@pytest.fixture
def ds(tmp_path: Path) -> Datastore:
    d = Datastore.create(tmp_path / "ds", volume_size=8 << 20, extent_size=1 << 20)
    d.create_vdisk("a", MiB, extra={"cg": "g1"})
    d.create_vdisk("b", 2 * MiB)
    d.create_vdisk("c", 3 * MiB, extra={"cg": "g1"})
    return d


def test_reader_sees_what_the_datastore_writes(ds: Datastore):
    r = open_catalog(ds.path)
    assert [(v.id, v.name, v.size, v.cg) for v in r.vdisks()] == \
        [(1, "a", MiB, "g1"), (2, "b", 2 * MiB, None), (3, "c", 3 * MiB, "g1")]
    assert [v.name for v in r.cg_members("g1")] == ["a", "c"]
    assert r.get("b") == ds.get_vdisk("b") and r.get("zz") is None
    assert not r.refresh()  # unchanged file: not read again
    ds.update_vdisk("b", extra={"cg": "g1"})
    assert r.refresh()
    assert [v.name for v in r.cg_members("g1")] == ["a", "b", "c"]


def test_codec_round_trips_and_refuses_damage(ds: Datastore):
    r = CatalogReader(ds.path)
    cat, _ = r.read()
    assert parse(encode(cat).decode(), "x") == cat
    assert encode(cat) == Path(r.path).read_bytes()  # the writer uses the same codec
    with pytest.raises(CorruptDatastore):
        parse('{"format": 2}', "x")
    with pytest.raises(CorruptDatastore):
        parse(encode(cat).decode().replace('"next_id": 4', '"next_id": 2'), "x")


def test_no_catalog_is_one_clear_error(tmp_path: Path):
    with pytest.raises(DatastoreError, match="missing catalog.json"):
        open_catalog(tmp_path)


def test_card_catalog_groups_by_cg_and_follows_changes(ds: Datastore):
    c = DatastoreCatalog(Path(ds.path))
    assert c.lookup(1) == ("g1", "a", MiB) and c.lookup(2) == ("b", "b", 2 * MiB)  # no CG: its own group
    assert c.cg_names() == ("g1", "b")
    ds.create_vdisk("d", MiB, extra={"cg": "g2"})
    assert c.lookup(4) is None
    c.refresh()
    assert c.lookup(4) == ("g2", "d", MiB)


def test_card_catalog_without_a_file_is_empty(tmp_path: Path):
    c = DatastoreCatalog(tmp_path)
    assert c.lookup(1) is None and c.cg_names() == ()
