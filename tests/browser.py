"""Headless Chromium for the tests (Debian's ``chromium``), started by PID and driven by Selenium.

Chromium is started here, not by chromedriver: it listens for DevTools on a loopback port it
picks itself (announced on its stderr), and chromedriver (``chromium-driver``) attaches to it.
``close()`` ends the WebDriver session, then Chromium and chromedriver by their PIDs. Each
browser gets a fresh profile directory and never reaches for the network on its own (the
background-networking flags; without them it keeps trying Google's services).

``wait_for(js)`` waits, inside the page, for a JavaScript expression to become true: it is
checked at once and after every change of the DOM (a MutationObserver), not by polling.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from procs import stop_process

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-breakpad", "--disable-default-apps", "--disable-extensions",
         "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
         "--password-store=basic", "--hide-scrollbars", "--force-device-scale-factor=1",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")
_LISTENING = re.compile(r"DevTools listening on ws://([0-9.]+):(\d+)/")

# Resolves when the expression is true (checked now and on every DOM change), or with false
# when the time is up. arguments: timeout in ms, callback. The expression is put into the script
# itself: the page's Content-Security-Policy forbids eval().
_WAIT_JS = """
const [ms, done] = arguments;
const test = () => { try { return Boolean(%s); } catch (e) { return false; } };
if (test()) { done(true); return; }
let finished = false;
const end = (value) => { if (!finished) { finished = true; observer.disconnect(); clearTimeout(timer); done(value); } };
const observer = new MutationObserver(() => { if (test()) end(true); });
observer.observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
const timer = setTimeout(() => end(test()), ms);
"""


class Browser:
    def __init__(self, workdir: Path, *, width: int = 1280, height: int = 860) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.workdir = Path(workdir)
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=False)  # a fresh profile, always
        self.log_path = self.workdir / "chromium.log"
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        self.driver: Any = None
        self.service: Any = None
        try:
            address = self._devtools_address(60.0)
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            options.debugger_address = address
            self.service = Service(executable_path=CHROMEDRIVER, log_output=str(self.workdir / "chromedriver.log"))
            self.driver = webdriver.Chrome(service=self.service, options=options)
            self.driver.set_script_timeout(120)
            self.driver.set_page_load_timeout(30)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _devtools_address(self, timeout: float) -> str:
        """Read Chromium's stderr until it names its DevTools port; keep the rest in the log."""
        assert self.proc.stderr is not None
        found: list[str] = []
        ready = threading.Event()
        stderr = self.proc.stderr

        def read() -> None:
            with open(self.log_path, "a", encoding="utf-8") as log:
                for line in stderr:
                    log.write(line)
                    log.flush()
                    m = _LISTENING.search(line)
                    if m and not found:
                        found.append(f"{m.group(1)}:{m.group(2)}")
                        ready.set()
            ready.set()  # it ended

        threading.Thread(target=read, name="chromium-stderr", daemon=True).start()
        if not ready.wait(timeout) or not found:
            raise RuntimeError(f"chromium (pid {self.proc.pid}) did not open DevTools within {timeout:g} s: "
                               f"{self.log()[-2000:]}")
        return found[0]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- the page ----------------------------------------------------------------------------
    def get(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait_for(self, expression: str, timeout: float = 10.0) -> float:
        """Seconds it took for ``expression`` to be true in the page; AssertionError at the timeout."""
        t0 = time.monotonic()
        ok = self.driver.execute_async_script(_WAIT_JS.replace("%s", f"({expression})"), int(timeout * 1000))
        took = time.monotonic() - t0
        if not ok:
            raise AssertionError(f"not true in the page within {timeout:g} s: {expression}\n"
                                 f"page text: {self.text()[:1500]}")
        return took

    def text(self, selector: str = "body") -> str:
        return str(self.js("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", selector))

    def click(self, selector: str, timeout: float = 5.0) -> None:
        """Click ``selector`` as a person would: where it is once the live page holds still. A
        page that is still rendering may move the element between the scroll and the click (the
        click then lands on what took its place); that click is tried again, up to ``timeout``."""
        from selenium.common.exceptions import ElementClickInterceptedException
        from selenium.webdriver.common.by import By

        deadline = time.monotonic() + timeout
        while True:
            element = self.driver.find_element(By.CSS_SELECTOR, selector)
            self.js("arguments[0].scrollIntoView({block: 'center'})", element)
            try:
                element.click()
                return
            except ElementClickInterceptedException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def type(self, selector: str, text: str, *, clear: bool = True) -> None:
        from selenium.webdriver.common.by import By

        element = self.driver.find_element(By.CSS_SELECTOR, selector)
        if clear:
            element.clear()
        element.send_keys(text)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            raise AssertionError(f"no screenshot written to {path}")
        return path

    def emulate_phone(self, width: int = 390, height: int = 844) -> None:
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})

    def emulate_laptop(self) -> None:
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    def cookies(self) -> list[dict[str, Any]]:
        return list(self.driver.get_cookies())

    def delete_cookies(self) -> None:
        self.driver.delete_all_cookies()

    # -- stopping ----------------------------------------------------------------------------
    def close(self) -> None:
        driver, self.driver = self.driver, None
        if driver is not None:
            try:
                driver.quit()  # attached by debugger address: ends the session and chromedriver
            except Exception:  # the browser may be gone already; stop it by PID below
                pass
        service, self.service = self.service, None
        proc = getattr(service, "process", None) if service is not None else None
        if isinstance(proc, subprocess.Popen):
            stop_process(proc, 5)
        stop_process(self.proc, 10)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
