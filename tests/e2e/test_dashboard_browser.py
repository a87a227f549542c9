"""The web dashboard in a real browser (issue 13 item 5 and its acceptance):
Debian's headless chromium driven by Selenium against ``nicsplit up``.

The page shows the protected CG and its PIT timeline with a bookmark; a
click on the bookmark and on "Export image" serves the image (the page shows
its nbd:// URIs, the API lists it, qemu-img finds it equal to production at
the bookmark, not now), and "Close" stops it. A wrong token shows the login
box, and the right one typed there opens the dashboard. Screenshots of each
step go to $NICSPLIT_ARTIFACTS (default tests/artifacts/).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from nicsplit.testing.console import api_token, console_base, curl, curl_json
from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import UpProcess, run_cli, stop_detached_servers
from nicsplit.testing.stack import wait_caught_up

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20
ARTIFACTS = Path(os.environ.get("NICSPLIT_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")
WAIT = 90  # seconds for any page condition: the box is loaded, the page polls every 2 s


def qemu_io(uri: str, cmd: str) -> None:
    p = subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, uri], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "error" not in p.stdout.lower(), f"qemu-io {cmd}: {p.stdout}{p.stderr}"


def qemu_img_compare(a: str | Path, b: str | Path) -> int:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                          capture_output=True, text=True, timeout=120).returncode


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """``nicsplit up`` with CG cg1 (vdisks a, b) and the console on a free port."""
    root = tmp_path_factory.mktemp("dash")
    data = init_data(root / "data", filters=["stats", {"name": "split", "split_timeout_us": 1_000_000}],
                     sections={"card": {"transport_options": {"data_size": "64M"}},
                               "console": {"listen": "127.0.0.1:0", "history_interval": 1}})
    run_cli(data, "cg", "create", "cg1")
    for n in ("a", "b"):
        run_cli(data, "vdisk", "create", n, "--size", str(SIZE), "--cg", "cg1")
    try:
        with UpProcess(data) as up:
            yield {"data": data, "up": up, "base": console_base(data), "token": api_token(data), "root": root}
    finally:
        stop_detached_servers(data)


@pytest.fixture
def browser(request):
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
    driver.set_page_load_timeout(60)
    shots = Shots(driver, request.node.name)
    yield driver, shots
    try:
        shots.take("final")  # the page as the test left it (on a failure: what went wrong)
        print("browser console:", *[e.get("message") for e in driver.get_log("browser")], sep="\n  ")
    finally:
        driver.quit()


class Shots:
    """Numbered screenshots of one test in the artifacts directory."""

    def __init__(self, driver: webdriver.Chrome, test: str) -> None:
        self.driver, self.n = driver, 0
        self.dir = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]", "_", test)
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("*.png"):  # this run's shots only
            old.unlink()

    def take(self, step: str) -> Path:
        self.n += 1
        p = self.dir / f"{self.n:02d}-{step}.png"
        assert self.driver.save_screenshot(str(p)), p
        return p


def wait(driver, cond, what: str, timeout: float = WAIT):
    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)) \
        .until(cond, message=f"the page did not show {what} within {timeout}s")


def cg_state(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, 'section.cg[data-cg="cg1"] .cg-head .state').text


def test_dashboard_shows_the_protected_cg_and_exports_an_image_from_its_timeline(deployment, browser, tmp_path):
    driver, shots = browser
    data, up, base, token = deployment["data"], deployment["up"], deployment["base"], deployment["token"]

    # Pattern A, bookmarked; then pattern B over it: the bookmark is not "now".
    golden = {n: bytearray(SIZE) for n in ("a", "b")}
    for n, off, length, pat in (("a", 0, 64 << 10, 0xA1), ("b", 1 << 20, 128 << 10, 0xB2)):
        qemu_io(up.uri(n), f"write -P {pat:#x} {off} {length}")
        golden[n][off:off + length] = bytes([pat]) * length
    wait_caught_up(data)
    mark = json.loads(run_cli(data, "bookmark", "cg1", "before", "--json").stdout)
    for n in ("a", "b"):
        (tmp_path / f"{n}-A.raw").write_bytes(golden[n])
    qemu_io(up.uri("a"), "write -P 0xc3 0 32k")
    wait_caught_up(data)

    driver.get(f"{base}/#token={token}")
    wait(driver, lambda d: cg_state(d) == "protected", 'cg1 as "protected"')
    assert "token" not in driver.current_url  # dropped from the address bar once read
    assert "state-protected" in driver.find_element(By.CSS_SELECTOR, 'section.cg[data-cg="cg1"] .cg-head .state').get_attribute("class")
    timeline = 'section.cg[data-cg="cg1"] svg.timeline-svg'
    wait(driver, lambda d: int(d.find_element(By.CSS_SELECTOR, timeline).get_attribute("data-pits") or 0) >= 2
         and d.find_elements(By.CSS_SELECTOR, f"{timeline} circle.pit"), "PITs on the timeline")
    flag = f'{timeline} g.bookmark-flag[data-bookmark="before"]'
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, flag), "the bookmark on the timeline")
    rows = driver.find_elements(By.CSS_SELECTOR, 'section.cg[data-cg="cg1"] table.vdisks tbody tr')
    assert {r.get_attribute("data-vdisk") for r in rows} == {"a", "b"}
    # The charts draw the console's history: an RPO line and the state strip under it.
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, 'section.cg[data-cg="cg1"] .chart.rpo polyline.rpo_seconds')
         and d.find_elements(By.CSS_SELECTOR, 'section.cg[data-cg="cg1"] .chart.rpo rect.state-strip'), "the RPO chart")
    shots.take("protected-with-timeline")

    # Pick the bookmark on the timeline, then export.
    section = 'section.cg[data-cg="cg1"]'

    def pick(d) -> bool:
        d.find_element(By.CSS_SELECTOR, f"{flag} rect").click()
        return d.find_element(By.CSS_SELECTOR, section).get_attribute("data-selected-seq") == str(mark["seq"])

    wait(driver, pick, f"seq {mark['seq']} selected")
    assert "before" in driver.find_element(By.CSS_SELECTOR, f"{section} .pit-info").text
    driver.find_element(By.CSS_SELECTOR, f"{section} button.restore").click()
    help_text = driver.find_element(By.CSS_SELECTOR, f"{section} .restore-help").text
    assert f"nicsplit restore a --seq {mark['seq']} --to " in help_text and f"restore b --seq {mark['seq']} --in-place" in help_text
    driver.find_element(By.CSS_SELECTOR, f"{section} button.export").click()
    uris_css = f"{section} .images .image code.nbd-uri"
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, uris_css)) == 2, "the image's two nbd:// URIs")
    shots.take("image-exported")
    image = driver.find_element(By.CSS_SELECTOR, f"{section} .images .image")
    image_id = image.get_attribute("data-id")
    shown = {}
    for li in image.find_elements(By.CSS_SELECTOR, "ul.exports li"):
        vd, _, uri = li.text.partition(": ")
        shown[vd] = uri
    assert set(shown) == {"a", "b"} and all(u.startswith("nbd://") for u in shown.values()), shown

    # The image is real: the API lists it at the bookmark's seq, and it holds pattern A.
    (listed,) = [i for i in curl_json(f"{base}/api/v1/images", token=token)["images"] if i["id"] == image_id]
    assert listed["seq"] == mark["seq"] and listed["cg"] == "cg1" and listed["exports"] == shown, listed
    for n in ("a", "b"):
        assert qemu_img_compare(tmp_path / f"{n}-A.raw", shown[n]) == 0, f"image of {n} differs from the bookmark"
    assert qemu_img_compare(up.uri("a"), shown["a"]) == 1  # production has moved on since

    # Close from the page.
    driver.find_element(By.CSS_SELECTOR, f'{section} button.close-image[data-id="{image_id}"]').click()
    wait(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, f"{section} .images .image"), "the image closed")
    assert image_id not in {i["id"] for i in curl_json(f"{base}/api/v1/images", token=token)["images"]}
    assert subprocess.run(["nbdinfo", "--size", shown["a"]], capture_output=True, timeout=30).returncode != 0
    shots.take("image-closed")

    # The same deployment through /metrics: protected, and real split latencies.
    fams = {f.name: f for f in text_string_to_metric_families(curl(f"{base}/metrics")[1])}
    assert [s.value for s in fams["nicsplit_cg_state"].samples if s.labels == {"cg": "cg1", "state": "protected"}] == [1.0]
    counts = {s.labels["vdisk"]: s.value for s in fams["nicsplit_split_latency_seconds"].samples
              if s.name.endswith("_count")}
    assert counts["a"] >= 2 and counts["b"] >= 1, counts  # qemu-io's writes were split


def test_a_wrong_token_shows_the_login_box_and_the_right_one_opens_the_dashboard(deployment, browser):
    driver, shots = browser
    base, token = deployment["base"], deployment["token"]
    driver.get(f"{base}/#token={'0' * 64}")
    login = driver.find_element(By.ID, "login")
    wait(driver, lambda d: login.is_displayed() and "refused" in d.find_element(By.ID, "login-msg").text,
         "the login box saying the token was refused")
    assert not driver.find_element(By.ID, "main").is_displayed()
    shots.take("wrong-token")
    box = driver.find_element(By.ID, "token-input")
    box.send_keys(token)
    driver.find_element(By.ID, "login-btn").click()
    wait(driver, lambda d: not login.is_displayed() and cg_state(d) != "", "the dashboard after signing in")
    shots.take("signed-in")
    # Log out: the login box again, and no token left in the session.
    driver.find_element(By.ID, "logout").click()
    wait(driver, lambda d: login.is_displayed(), "the login box after logging out")
    assert driver.execute_script("return sessionStorage.getItem('nicsplit.token')") is None
