"""The one name rule (nicsplit.core.names) and the layers that apply it."""

from __future__ import annotations

import pytest

from nicsplit.core import names
from nicsplit.core.catalog import DatastoreError, parse
from nicsplit.core.cgs import CGCatalog, CGError
from nicsplit.host.datastore import Datastore

pytestmark = pytest.mark.unit

BAD = ["", "_x", ".", "..", ".hidden", "--", "-x", "a/b", "a b", "é", "a" * 65, "cg.json", "cg.lock", None, 3]
GOOD = ["a", "A1", "web-1", "db_data", "v1.2", "x--", "a" * 64, "cg.jsonx"]


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_with_the_rule(name):
    assert not names.is_name(name)
    with pytest.raises(names.BadName, match=r"bad vdisk name .*starting with a letter or digit"):
        names.check_name(name, "vdisk")


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass(name):
    assert names.is_name(name) and names.check_name(name) == name


@pytest.mark.parametrize("name", ["_x", ".hidden", "--", "cg.json"])
def test_stored_names_of_earlier_versions_still_read(name):
    """A catalog an earlier version wrote still opens (rule 3), so the vdisk can be deleted."""
    assert names.check_name(name, stored=True) == name
    text = ('{"format": 1, "uuid": "00000000-0000-0000-0000-000000000001", "next_id": 2, "extent_size": 1048576,'
            ' "volume_size": 1073741824, "created": 1.0, "vdisks": [{"name": "%s", "uuid":'
            ' "00000000-0000-0000-0000-000000000002", "id": 1, "owner": null, "size": 4096, "block_size": 4096,'
            ' "readonly": false, "created": 1.0, "extra": {}}]}' % name)
    assert list(parse(text, "catalog.json").vdisks) == [name]


@pytest.mark.parametrize("name", ["_x", ".", "..", ".hidden", "--", "cg.lock"])
def test_cg_catalog_refuses(tmp_path, name):
    with pytest.raises(CGError, match="bad consistency group name"):
        CGCatalog(tmp_path).create(name)
    assert CGCatalog(tmp_path).list() == []


def test_datastore_refuses_bad_cg_membership(tmp_path):
    ds = Datastore.create(tmp_path / "ds")
    with pytest.raises(DatastoreError, match="bad consistency group name '_x'"):
        ds.create_vdisk("a", 4096, extra={"cg": "_x"})
    ds.create_vdisk("b", 4096)
    with pytest.raises(DatastoreError, match=r"bad consistency group name '\.\.'"):
        ds.update_vdisk("b", extra={"cg": ".."})
    with pytest.raises(DatastoreError, match="bad vdisk name '.hidden'"):
        ds.update_vdisk("b", name=".hidden")
    assert ds.get_vdisk("b").cg is None
    ds.close()
