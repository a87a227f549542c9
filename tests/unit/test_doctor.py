"""`nicsplit.control.doctor` checks on crafted data directories: each
broken thing is a failure (or a warning) whose fix names the file or the
setting to change; a fresh directory passes."""

from __future__ import annotations

import datetime as dt
import os
import random
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nicsplit.console.token import ensure_token
from nicsplit.control import doctor
from nicsplit.core import config as cfgmod
from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import parse_size
from nicsplit.core.layout import Layout
from nicsplit.core.pki import init_pki
from nicsplit.host.datastore import Datastore
from nicsplit.testing.damage import corrupt, make_journal


def _data(tmp_path: Path, card: str = "") -> cfgmod.Config:
    """What `nicsplit init` makes, in-process, every listen on port 0;
    ``card``: lines put at the top of the [card] table."""
    data = tmp_path / "data"
    cfgmod.write_default(data)
    text = Layout(data).config.read_text()
    for port in ("10809", "10810", "10811"):
        text = text.replace(f'listen = "127.0.0.1:{port}"', 'listen = "127.0.0.1:0"')
    Layout(data).config.write_text(text.replace("[card]\n", "[card]\n" + card, 1))
    cfg = cfgmod.load(data)
    init_pki(Layout(data).pki)
    ensure_token(Layout(data).api_token)
    Datastore.create(cfg.datastore_dir, volume_size=parse_size("1G"), extent_size=parse_size("1M")).close()
    return cfg


def _levels(results: list[dict]) -> dict[str, str]:
    worst: dict[str, str] = {}
    order = {"ok": 0, "warn": 1, "fail": 2}
    for r in results:
        if order[r["level"]] >= order[worst.get(r["check"], "ok")]:
            worst[r["check"]] = r["level"]
    return worst


def _one(results: list[dict], level: str) -> dict:
    found = [r for r in results if r["level"] == level]
    assert len(found) == 1, results
    r = found[0]
    assert set(r) == {"check", "ok", "level", "message", "fix"} and r["ok"] == (level != "fail")
    return r


def test_a_fresh_directory_passes_every_check(tmp_path):
    cfg = _data(tmp_path)
    checks = [c for c in doctor.CHECKS if c is not doctor.check_cpu] + [
        lambda c: doctor.check_cpu(c, rt_permitted=lambda: (True, "permitted"))]
    results = doctor.run_checks(cfg, checks)
    assert all(r["level"] == "ok" for r in results), [r for r in results if r["level"] != "ok"]
    assert {r["check"] for r in results} >= {"cpu", "cpu.pinning", "cpu.priority", "shm", "pki", "ports", "datastore",
                                             "pidfiles", "token"}


def _cert(path: Path, days_left: float) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, path.stem)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=400))
            .not_valid_after(now + dt.timedelta(days=days_left)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_certificates_expired_fail_and_expiring_soon_warn(tmp_path):
    cfg = _data(tmp_path)
    pki = cfg.layout.pki
    _cert(pki / "old.crt", -1)
    r = _one(doctor.check_pki(cfg), "fail")
    assert "old.crt expired on" in r["message"] and str(pki / "old.crt") in r["fix"]
    (pki / "old.crt").unlink()
    _cert(pki / "soon.crt", 10)
    r = _one(doctor.check_pki(cfg), "warn")
    assert "soon.crt expires in" in r["message"] and str(pki / "soon.crt") in r["fix"]
    (pki / "soon.crt").write_text("not a certificate")
    r = _one(doctor.check_pki(cfg), "fail")
    assert "unreadable certificate" in r["message"]
    for crt in pki.glob("*.crt"):
        crt.unlink()
    r = _one(doctor.check_pki(cfg), "fail")
    assert "no certificates" in r["message"] and "nicsplit init" in r["fix"]


def test_token_mode_missing_and_short(tmp_path):
    cfg = _data(tmp_path)
    tok = cfg.layout.api_token
    os.chmod(tok, 0o644)
    r = _one(doctor.check_token(cfg), "fail")
    assert "mode 0644" in r["message"] and r["fix"] == f"chmod 600 {tok}"
    os.chmod(tok, 0o600)
    assert _one(doctor.check_token(cfg), "ok")
    tok.write_text("short\n")
    assert "too short" in _one(doctor.check_token(cfg), "fail")["message"]
    tok.unlink()
    assert "nicsplit init" in _one(doctor.check_token(cfg), "fail")["fix"]


def test_a_damaged_journal_segment_fails_naming_the_segment(tmp_path, seed):
    cfg = _data(tmp_path)
    CGCatalog(cfg.data).create("cg1")
    CGCatalog(cfg.data).create("empty")
    jd = cfg.layout.journal("cg1")
    jd.mkdir(parents=True)
    make_journal(jd, seed, sealed=False)
    levels = {r["message"].split(":")[0]: r["level"] for r in doctor.check_journals(cfg)}
    assert levels == {"cg1": "ok", "empty": "ok"}
    seg, _, _ = corrupt(jd, "record-head", random.Random(seed))
    r = _one(doctor.check_journals(cfg), "fail")
    assert r["message"].startswith("cg1: 1 damaged stretch") and str(jd / f"{seg:08d}.seg") in r["fix"], r


def test_missing_volume_files_fail_naming_them(tmp_path):
    cfg = _data(tmp_path)
    ds = Datastore.open(cfg.datastore_dir)
    ds.create_vdisk("a", 1 << 20)
    ds.close()
    assert _one(doctor.check_datastore(cfg), "ok")["message"].startswith("catalog readable: 1 vdisk(s) in 1 volume")
    vol0 = cfg.datastore_dir / "vol-0000.dsk"
    vol0.rename(cfg.datastore_dir / "vol-0001.dsk")
    r = _one(doctor.check_datastore(cfg), "fail")
    assert str(vol0) in r["message"] and str(vol0) in r["fix"]
    (cfg.datastore_dir / "vol-0001.dsk").unlink()
    r = _one(doctor.check_datastore(cfg), "fail")
    assert "1 vdisk(s) but no volume file" in r["message"] and "vol-0000.dsk" in r["fix"]
    cfg.layout.catalog.write_text("{")
    assert str(cfg.layout.catalog) in _one(doctor.check_datastore(cfg), "fail")["message"]


def test_ports_in_use_by_another_program_fail(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = _data(tmp_path)
        text = cfg.layout.config.read_text().replace('[appliance]\n', '[appliance]\nlisten = "127.0.0.1:%d"\n' % port, 1)
        cfg.layout.config.write_text(text.replace('listen = "127.0.0.1:0"', "", 2).replace(
            '[host]\n', '[host]\nlisten = "127.0.0.1:0"\n', 1))
        results = doctor.check_ports(cfgmod.load(cfg.data))
        r = _one(results, "fail")
        assert f"appliance: 127.0.0.1:{port} is in use by another program" == r["message"]
        assert "[appliance] listen" in r["fix"] and str(cfg.layout.config) in r["fix"]


def test_stale_pid_files_warn(tmp_path):
    cfg = _data(tmp_path)
    stale = cfg.layout.pid("host")
    stale.write_text("999999999")
    r = _one(doctor.check_pidfiles(cfg), "warn")
    assert str(stale) in r["message"] and f"rm {stale}" in r["fix"]


def test_cpu_pinning_priority_shm_and_tools(tmp_path):
    cfg = _data(tmp_path, 'cpus = [9999]\ntransport_options = {shm_dir = "%s", data_size = "1T"}\n' % tmp_path)
    res = doctor.check_cpu(cfg, rt_permitted=lambda: (False, "not permitted (test)"))
    assert _levels(res) == {"cpu": "ok" if len(os.sched_getaffinity(0)) > 1 else "warn", "cpu.pinning": "fail",
                            "cpu.priority": "warn"}
    pin = next(r for r in res if r["check"] == "cpu.pinning")
    assert "9999" in pin["message"] and str(cfg.layout.config) in pin["fix"]
    r = _one(doctor.check_shm(cfg), "fail")
    assert "needs 1048576 MiB" in r["message"] and str(tmp_path) in r["fix"]
    r = _one(doctor.check_tools(cfg, which=lambda t: None if t == "qemu-img" else "/usr/bin/" + t), "warn")
    assert r["message"].startswith("not installed: qemu-img") and r["fix"] == "apt-get install qemu-utils"


def test_a_check_that_raises_is_a_failure_not_a_crash(tmp_path):
    cfg = _data(tmp_path)

    def check_broken(_cfg):
        raise KeyError("boom")

    r = _one(doctor.run_checks(cfg, [check_broken]), "fail")
    assert r["check"] == "broken" and "KeyError" in r["message"]


def _with_vdisks(cfg: cfgmod.Config, tail: str, *names: str) -> cfgmod.Config:
    ds = Datastore.open(cfg.datastore_dir)
    try:
        for n in names:
            ds.create_vdisk(n, 1 << 20)
    finally:
        ds.close()
    with open(cfg.layout.config, "a") as f:
        f.write(tail)
    return cfgmod.load(cfg.data)


def test_a_net_only_deployment_skips_the_card_checks(tmp_path):
    # The card's settings here would fail (no such CPU, a 1 TiB hidden volume),
    # but with every vdisk on net no card runs: they do not apply.
    cfg = _data(tmp_path, 'cpus = [9999]\ntransport_options = {shm_dir = "%s", data_size = "1T"}\n' % tmp_path)
    cfg = _with_vdisks(cfg, '\n[vdisks.a]\ntransport = "net"\n[vdisks.b]\ntransport = "net"\n', "a", "b")
    r = _one(doctor.check_transport(cfg), "ok")
    assert r["message"] == "net: a, b; no card runs (the host ships itself)"
    assert "no card runs" in _one(doctor.check_shm(cfg), "ok")["message"]
    res = doctor.check_cpu(cfg, rt_permitted=lambda: (False, "not permitted (test)"))
    assert {r["check"] for r in res} == {"cpu", "cpu.pinning"} and all(r["level"] != "fail" for r in res), res
    # One vdisk back on the ring: a card runs, and its broken settings fail again.
    cfg = _with_vdisks(cfg, '[vdisks.c]\ntransport = "ring"\n', "c")
    assert _one(doctor.check_transport(cfg), "ok")["message"] == "net: a, b; ring: c; the card runs ring"
    assert _one(doctor.check_shm(cfg), "fail")
    assert _levels(doctor.check_cpu(cfg, rt_permitted=lambda: (True, "ok")))["cpu.pinning"] == "fail"


def test_a_transport_choice_up_would_refuse_fails(tmp_path):
    cfg = _with_vdisks(_data(tmp_path), '\n[vdisks.a]\ntransport = "nvme-pi"\n[vdisks.b]\ntransport = "ring"\n', "a", "b")
    r = _one(doctor.check_transport(cfg), "fail")
    assert "two card transports" in r["message"] and "nvme-pi: a" in r["message"] and "ring: b" in r["message"]
    assert str(cfg.layout.config) in r["fix"]
    cfg = _with_vdisks(_data(tmp_path / "x"), '\n[vdisks.a]\ntransport = "carrier-pigeon"\n', "a")
    r = _one(doctor.check_transport(cfg), "fail")
    assert "unknown transport" in r["message"] and "carrier-pigeon" in r["message"]
