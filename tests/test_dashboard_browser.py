"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) against codexlb in front of the fake upstream, all
on loopback. Skipped, with the reason, where Chromium or its driver is missing
(``.ci/run`` installs them).

Selenium blocks, and both servers run in the test's event loop: every browser step runs in a
thread (``Page``), so the loop keeps serving while the browser waits.

The screenshots (laptop 1366x900 in light, phone 390x844 in dark) are written to the test's
temporary folder, or to ``$CODEXLB_SCREENSHOTS`` when set; ``docs/`` holds a copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from codexlb import dashboard
from codexlb.testing.fake_upstream import Fault
from tests.harness import (
    ADMIN_KEY,
    CLIENT_KEYS,
    CODEX_PATH,
    SECRETS,
    Balancer,
    Fake,
    auth,
    make_config,
    serve,
    stream_turn,
    user_message,
)
from tests.test_status import secrets_of, status_config

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - the dev extras install it
    webdriver = None  # type: ignore[assignment]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
)
LAPTOP = (1366, 900)
PHONE = (390, 844)
WAIT_SECONDS = 15.0

CHART_FITS = (
    "const chart = document.getElementById('chart'), svg = chart.querySelector('svg');"
    "return !svg || Math.abs(svg.viewBox.baseVal.width - chart.clientWidth) < 1;"
)

T = TypeVar("T")

pytestmark = pytest.mark.timeout(180)


def _skip_reason() -> str | None:
    if webdriver is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    if CHROMIUM is None:
        return "Chromium is not installed (apt-get install chromium chromium-driver)"
    if CHROMEDRIVER is None:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    return None


def _start_chromium() -> WebDriver:
    assert CHROMIUM is not None
    assert CHROMEDRIVER is not None
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # containers run tests as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
        "--lang=en-GB",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


class Page:
    """The browser, one blocking step at a time in a worker thread."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver

    async def do(self, step: Callable[[WebDriver], T]) -> T:
        return await asyncio.to_thread(step, self.driver)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.do(lambda d: d.execute_script(script, *args))

    async def until(self, check: Callable[[WebDriver], Any], what: str) -> Any:
        """Wait until ``check`` holds, as the page refreshes itself."""

        def wait(driver: WebDriver) -> Any:
            try:
                return WebDriverWait(
                    driver,
                    WAIT_SECONDS,
                    poll_frequency=0.1,
                    ignored_exceptions=(StaleElementReferenceException,),  # a refresh replaced it
                ).until(check)
            except TimeoutException:
                raise AssertionError(f"the page never showed {what}") from None

        return await self.do(wait)

    async def view(self, name: str) -> None:
        await self.until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-view") == name,
            f"the {name} view",
        )

    async def log_in(self, key: str) -> None:
        def step(driver: WebDriver) -> None:
            field = driver.find_element(By.ID, "admin-key")
            field.clear()
            field.send_keys(key)
            driver.find_element(By.CSS_SELECTOR, "#login-form button").click()

        await self.do(step)

    async def cdp(self, command: str, params: dict[str, Any]) -> None:
        await self.do(lambda d: d.execute_cdp_cmd(command, params))

    async def color_scheme(self, scheme: str) -> None:
        features = [{"name": "prefers-color-scheme", "value": scheme}]
        await self.cdp("Emulation.setEmulatedMedia", {"features": features})

    async def refreshes(self) -> int:
        return int(await self.js("return Number(document.body.dataset.refreshes || 0)"))

    async def next_refresh(self) -> None:
        seen = await self.refreshes()
        await self.until(
            lambda d: (
                int(d.execute_script("return Number(document.body.dataset.refreshes)")) > seen
            ),
            "another refresh",
        )

    async def choose(self, filter_name: str, value: str) -> None:
        await self.until(
            lambda d: d.find_elements(
                By.CSS_SELECTOR, f"#filter-{filter_name} option[value='{value}']"
            ),
            f"{value!r} among the {filter_name} filter's choices",
        )
        await self.do(
            lambda d: Select(d.find_element(By.ID, f"filter-{filter_name}")).select_by_value(value)
        )

    async def screenshot(self, path: Path, size: tuple[int, int], *, dark: bool) -> None:
        """The whole page at ``size``'s width (``size``'s height as the viewport)."""

        def shoot(driver: WebDriver) -> None:
            driver.execute_cdp_cmd(
                "Emulation.setEmulatedMedia",
                {
                    "features": [
                        {"name": "prefers-color-scheme", "value": "dark" if dark else "light"}
                    ]
                },
            )
            metrics = {
                "width": size[0],
                "height": size[1],
                "deviceScaleFactor": 1,
                "mobile": size[0] < 600,
            }
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.05).until(
                lambda d: d.execute_script(CHART_FITS), "the chart redrawn at the new width"
            )
            height = int(driver.execute_script("return document.documentElement.scrollHeight"))
            metrics["height"] = max(size[1], height)
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            path.write_bytes(driver.get_screenshot_as_png())
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

        await self.do(shoot)
        await self.js("return document.body.offsetHeight")  # let layout settle back


def shown(driver: WebDriver, field: str) -> list[str]:
    """The ``field`` (key, account, status) of each row the recent list shows."""
    values: list[str] = driver.execute_script(
        "return Array.from(document.querySelectorAll('#requests tbody tr[data-status]'))"
        f".map(r => r.dataset.{field})"
    )
    return values


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    driver = await asyncio.to_thread(_start_chromium)
    try:
        yield Page(driver)
    finally:
        await asyncio.to_thread(driver.quit)


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CODEXLB_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def test_the_dashboard_in_chromium(
    page: Page,
    fake: Fake,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    screenshots: Path,
) -> None:
    data = status_config(fake, tmp_path)
    for account, used in (("a", 35.0), ("b", 72.0), ("c", 93.0)):
        fake.set_usage(account, used)
    async with serve(make_config(data, tmp_path)) as lb:
        for n, client in enumerate(["alice", "bob", "alice"]):  # usage learned from each
            turn = await stream_turn(
                http, lb.url, {"input": [user_message(f"warm {n}")]}, client=client
            )
            assert turn.status == 200

        await page.do(lambda d: d.get(lb.url + "/dashboard"))
        await page.view("login")
        await page.log_in("not-the-key")
        await page.until(
            lambda d: "not the admin key" in d.find_element(By.ID, "login-error").text,
            "the wrong key refused",
        )
        await page.log_in(ADMIN_KEY)
        await page.view("board")
        assert await page.js("return document.cookie") == ""  # HttpOnly
        assert await page.js("return document.getElementById('admin-key').value") == ""
        assert await page.js("return localStorage.length + sessionStorage.length") == 0

        # The accounts and their bars, the figure written beside each.
        await page.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".account")) == 5, "cards")
        names = await page.js(
            "return Array.from(document.querySelectorAll('#accounts .account'))"
            ".map(c => c.dataset.name)"
        )
        assert names == list("abcpr")
        bars = await page.js(
            "return Array.from(document.querySelectorAll('.account')).map(c => ["
            " c.dataset.name,"
            " Array.from(c.querySelectorAll('.window')).map(w => [w.dataset.window,"
            "  w.querySelector('.pct').textContent, w.querySelector('.fill').style.width,"
            "  w.querySelector('.bar').getBoundingClientRect().width > 50])])"
        )
        widths = {name: windows for name, windows in bars}
        for name, windows in widths.items():
            assert [w[0] for w in windows] == ["primary", "secondary"], name
            assert all(w[3] for w in windows), f"{name}: a bar too narrow to see"
        served = {r.account for r in fake.received}
        for name, used in (("a", 35), ("b", 72), ("c", 93)):
            if name in served:
                assert widths[name][0][1:3] == [f"{used}%", f"{used}%"]
        assert widths["p"][0][1:3] == ["0%", "0%"]
        reset_text = await page.js(
            "return document.querySelector('.account .window .reset').textContent"
        )
        assert reset_text.startswith("resets ") or "not known" in reset_text

        # A request made a moment ago appears; an account just rate limited says so.
        fake.script(Fault.status(429, error_code="usage_limit_reached", resets_in=900))
        before = len(fake.received)
        turn = await stream_turn(http, lb.url, {"input": [user_message("now")]}, client="bob")
        assert turn.status == 200
        limited, took_over = (str(r.account) for r in fake.received[before : before + 2])
        bad_body = {**auth("alice"), "Content-Type": "application/json"}
        async with http.post(lb.url + CODEX_PATH, data=b"{oops", headers=bad_body) as response:
            assert response.status == 400
        await page.until(
            lambda d: d.find_elements(
                By.CSS_SELECTOR, f"#requests tr[data-key='bob'][data-account='{took_over}']"
            ),
            "the request made a moment before",
        )
        await page.until(
            lambda d: (
                d.find_element(
                    By.CSS_SELECTOR, f".account[data-name='{limited}'] [data-field='state']"
                ).text
                == "rate limited"
            ),
            f"account {limited} marked rate limited",
        )
        cooldown = await page.js(
            f"return document.querySelector(\".account[data-name='{limited}'] "
            "[data-field='cooldown']\").textContent"
        )
        assert cooldown.startswith("until ")
        assert "(in 1" in cooldown  # about 15 minutes
        hour = await page.js(
            f"return document.querySelector(\".account[data-name='{limited}'] "
            "[data-field='hour']\").textContent"
        )
        assert hour.endswith("1 failed")
        assert (
            int(await page.js("return Number(document.getElementById('chart').dataset.total)")) == 5
        )
        assert await page.js("return document.querySelectorAll('#chart svg rect').length") >= 2
        keys = await page.js(
            "return Array.from(document.querySelectorAll('#keys tbody tr'))"
            ".map(r => Array.from(r.cells).slice(0, 2).map(c => c.textContent))"
        )
        assert keys == [["alice", "3"], ["bob", "2"]]

        # Filters: by key, by account, by status.
        await page.choose("key", "bob")
        await page.until(lambda d: shown(d, "key") == ["bob", "bob"], "only bob's requests")
        await page.choose("key", "")
        await page.choose("status", "4xx")
        await page.until(lambda d: shown(d, "status") == ["400"], "only the refused request")
        await page.choose("status", "")
        await page.choose("account", took_over)
        await page.until(
            lambda d: set(shown(d, "account")) == {took_over}, f"only {took_over}'s requests"
        )
        await page.choose("account", "")
        await page.until(lambda d: len(shown(d, "status")) == 5, "all five requests")

        # Refreshing moves nothing.
        boxes = (
            "return Array.from(document.querySelectorAll('.panel, .account, #chart, .bar'))"
            ".map(e => { const r = e.getBoundingClientRect();"
            " return [r.x, r.y, r.width, r.height].map(Math.round); })"
        )
        before_refresh = await page.js(boxes)
        await page.next_refresh()
        await page.next_refresh()
        assert await page.js(boxes) == before_refresh

        # Light on a laptop, dark on a phone; both fit their width.
        await page.screenshot(screenshots / "dashboard-laptop.png", LAPTOP, dark=False)
        await page.screenshot(screenshots / "dashboard-phone.png", PHONE, dark=True)
        for name, size in (("dashboard-laptop.png", LAPTOP), ("dashboard-phone.png", PHONE)):
            header = (screenshots / name).read_bytes()[:24]
            assert header[:8] == b"\x89PNG\r\n\x1a\n"
            assert int.from_bytes(header[16:20], "big") == size[0]
        print(f"screenshots in {screenshots}")
        await page.cdp(
            "Emulation.setDeviceMetricsOverride",
            {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 1, "mobile": True},
        )
        overflow = await page.js(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, "the phone layout scrolls sideways"
        background = "return getComputedStyle(document.body).backgroundColor"
        await page.color_scheme("dark")
        dark = await page.js(background)
        await page.color_scheme("light")
        assert await page.js(background) != dark
        await page.cdp("Emulation.clearDeviceMetricsOverride", {})

        # Nothing on the page or in what it reads carries a token or a key.
        texts = [await page.do(lambda d: d.page_source)]
        texts += await page.js(
            "const paths = arguments[0];"
            "return Promise.all(paths.map(p => fetch(p).then(r => r.text())));",
            ["/admin/overview", "/admin/requests?limit=500", "/dashboard/dashboard.js"],
        )
        assert all(text for text in texts)
        for secret in {*secrets_of(data), *SECRETS, *CLIENT_KEYS.values()}:
            for text in texts:
                assert secret not in text

        # Logging out ends the session on the server too.
        await page.do(lambda d: d.find_element(By.ID, "logout").click())
        await page.view("login")
        status = await page.js("return fetch('/admin/overview').then(r => r.status)")
        assert status == 401

        # Wrong keys are refused, then the address is refused for a while.
        for n in range(dashboard.LOGIN_FAILURES):
            await page.log_in(f"guess-{n}")
            await page.until(
                lambda d: (
                    d.find_element(By.TAG_NAME, "body").get_attribute("data-login-status") == "401"
                    and "not the admin key" in d.find_element(By.ID, "login-error").text
                ),
                f"wrong key {n + 1} refused",
            )
            await page.js("document.body.dataset.loginStatus = ''")
        await page.log_in(ADMIN_KEY)
        message = await page.until(
            lambda d: (
                d.find_element(By.TAG_NAME, "body").get_attribute("data-login-status") == "429"
                and d.find_element(By.ID, "login-error").text
            ),
            "the address refused",
        )
        assert message.startswith("Too many wrong keys from this address: try again in ")
        await page.view("login")


async def test_the_dashboard_says_when_codexlb_is_unreachable(
    page: Page, fake: Fake, tmp_path: Path
) -> None:
    data = status_config(fake, tmp_path)
    async with AsyncExitStack() as stack:
        lb: Balancer = await stack.enter_async_context(serve(make_config(data, tmp_path)))
        await page.do(lambda d: d.get(lb.url + "/dashboard"))
        await page.view("login")
        await page.log_in(ADMIN_KEY)
        await page.view("board")
        assert await page.js("return document.getElementById('unreachable').hidden") is True
        await page.next_refresh()
    # codexlb stopped
    await page.until(
        lambda d: d.find_element(By.ID, "unreachable").is_displayed(), "the unreachable banner"
    )
    banner = await page.do(lambda d: d.find_element(By.ID, "unreachable").text)
    assert banner.startswith("codexlb is unreachable")
    assert await page.js("return document.body.dataset.stale") == "true"
    # The figures from before stay on the page, dimmed.
    assert await page.js("return document.querySelectorAll('.account').length") == 5
    assert json.loads(await page.js("return JSON.stringify(document.body.dataset.view)")) == "board"
