"""How fast the fleet console's page follows a busy fleet: N simulated devices from the load-test
tool, ``edge-voice fleet console``, and the page in headless Chromium, measured.

    python -m edge.devtools.console_load --devices 200 --duration 60 [--json FILE] [--screenshot FILE]

It starts its own Mosquitto on a loopback port, the console (a subprocess, as an operator would
run it), the simulated devices (``edge.fleet.simulate``: the real MQTT bridge, kiosk-like turns
every ``--turn-interval`` seconds per device) and Chromium (Debian's ``chromium`` and
``chromium-driver``, through Selenium: ``pip install 'edge-voice[test]'``). Once the page shows
every device it lets the fleet run for ``--duration`` seconds and collects what the page itself
records for each event it applies: when the event happened on the device (its ``time``), when
the console received it, when the page received it and when the page's DOM had it (after the
update was applied). Device and page run on one machine, so one clock. Then a command is sent
from the page ``--commands`` times (click to answer shown). Prints p50/p90/p99/max of each
stretch, the share of events on the page within 1 s, the resyncs (a page that fell behind) and
the CPU of the console and of the browser.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge.errors import EdgeError, MissingDependency
from edge.fleet.loadtest import Broker, Tracked
from edge.fleet.simulate import WorkerProcess, raise_fd_limit, start_workers

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
          "--disable-sync", "--disable-breakpad", "--disable-default-apps", "--disable-extensions",
          "--disable-features=Translate,MediaRouter,OptimizationHints", "--password-store=basic",
          "--hide-scrollbars", "--force-device-scale-factor=1", "--remote-debugging-address=127.0.0.1",
          "--remote-debugging-port=0", "--window-size=1280,860")
_LISTENING = re.compile(r"DevTools listening on ws://([0-9.]+):(\d+)/")


def _rank(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


def stats(values: Sequence[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": _rank(values, 50), "p90": _rank(values, 90), "p99": _rank(values, 99),
            "max": max(values) if values else None}


def _fmt(s: dict[str, Any]) -> str:
    if not s["n"]:
        return "no samples"
    return f"p50 {s['p50']:.0f} ms, p90 {s['p90']:.0f} ms, p99 {s['p99']:.0f} ms, max {s['max']:.0f} ms (n={s['n']})"


class Chromium:
    """Headless Chromium started by PID, with chromedriver attached to its DevTools port."""

    def __init__(self, workdir: Path) -> None:
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            raise MissingDependency.for_module("selenium", "test") from None
        if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
            raise EdgeError("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver",
                            code="console.load")
        profile = workdir / "chromium-profile"
        profile.mkdir(parents=True)
        self.log = open(workdir / "chromium.log", "a", encoding="utf-8")
        self.proc = subprocess.Popen([CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        self.driver: Any = None
        self.service: Any = None
        try:
            address = self._address()
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            options.debugger_address = address
            self.service = Service(executable_path=CHROMEDRIVER, log_output=str(workdir / "chromedriver.log"))
            self.driver = webdriver.Chrome(service=self.service, options=options)
            self.driver.set_script_timeout(60)
        except BaseException:
            self.close()
            raise

    def _address(self, timeout: float = 60.0) -> str:
        found: list[str] = []
        ready = threading.Event()
        stderr = self.proc.stderr
        assert stderr is not None

        def read() -> None:
            for line in stderr:
                self.log.write(line)
                m = _LISTENING.search(line)
                if m and not found:
                    found.append(f"{m.group(1)}:{m.group(2)}")
                    ready.set()
            ready.set()

        threading.Thread(target=read, name="chromium-stderr", daemon=True).start()
        if not ready.wait(timeout) or not found:
            raise EdgeError(f"chromium (pid {self.proc.pid}) did not open DevTools", code="console.load")
        return found[0]

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, expression: str, timeout: float) -> bool:
        """True once ``expression`` holds in the page (checked on every DOM change)."""
        script = ("const [ms, done] = arguments; const test = () => { try { return Boolean(EXPR); } "
                  "catch (e) { return false; } }; if (test()) { done(true); return; } let over = false; "
                  "const end = (v) => { if (!over) { over = true; o.disconnect(); clearTimeout(t); done(v); } }; "
                  "const o = new MutationObserver(() => { if (test()) end(true); }); "
                  "o.observe(document, {subtree: true, childList: true, attributes: true, characterData: true}); "
                  "const t = setTimeout(() => end(test()), ms);").replace("EXPR", f"({expression})")
        return bool(self.driver.execute_async_script(script, int(timeout * 1000)))

    def close(self) -> None:
        driver, self.driver = self.driver, None
        if driver is not None:
            try:
                driver.quit()
            except Exception:  # the browser may be gone; it is stopped by PID below
                pass
        proc = getattr(self.service, "process", None)
        for p in (proc, self.proc):
            if isinstance(p, subprocess.Popen) and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.log.close()


def _pids_under(root: int) -> list[int]:
    """``root`` and its descendants (Chromium's renderer and GPU processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def run(opts: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    work = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="edge-console-load-"))
    work.mkdir(parents=True, exist_ok=True)
    broker = Broker("broker", work)
    workers: list[WorkerProcess] = []
    console: subprocess.Popen | None = None
    browser: Chromium | None = None
    console_log = open(work / "console.log", "a", encoding="utf-8")
    token = secrets.token_urlsafe(24)
    result: dict[str, Any] = {"devices": opts.devices, "turn_interval_s": opts.turn_interval,
                              "duration_s": opts.duration}
    try:
        broker.start()
        env = dict(os.environ, EDGE_VOICE_CONSOLE_TOKEN=token)
        console = subprocess.Popen([sys.executable, "-m", "edge", "fleet", "console", "--listen", "127.0.0.1:0",
                                    "--host", "127.0.0.1", "--port", str(broker.port), "--log-level", "info"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, env=env)
        assert console.stderr is not None
        first = console.stderr.readline()
        console_log.write(first)
        if not first.startswith("console: http"):
            raise EdgeError(f"the console did not start: {first.strip()}", code="console.load")
        url = first.split()[1]
        stderr = console.stderr
        threading.Thread(target=lambda: [console_log.write(line) for line in stderr], daemon=True).start()
        console_cpu = Tracked("console")
        console_cpu.add(console.pid)
        t0 = time.monotonic()
        workers = start_workers(devices=opts.devices, processes=opts.processes, host="127.0.0.1", port=broker.port,
                                prefix="edge", state_dir=work / "devices", log_dir=work)
        for w in workers:
            w.wait_for("ready", 120)
        browser = Chromium(work)
        browser.driver.get(url + "login")
        browser.driver.find_element("css selector", "#token").send_keys(token)
        browser.driver.find_element("css selector", "form button[type=submit]").click()
        if not browser.wait(f"window.edgeConsole && window.edgeConsole.devices >= {opts.devices} && "
                            f"document.querySelectorAll('.tile[data-online=\"yes\"]').length >= {opts.devices}", 120):
            raise EdgeError(f"the page did not show {opts.devices} devices online", code="console.load")
        result["all_online_on_page_s"] = round(time.monotonic() - t0, 2)
        print(f"{opts.devices} devices online on the page {result['all_online_on_page_s']} s after their processes "
              "started", flush=True)
        browser_cpu = Tracked("browser")
        for pid in _pids_under(browser.proc.pid):
            browser_cpu.add(pid, from_now=True)
        c0, b0 = console_cpu.sample(), browser_cpu.sample()
        for w in workers:
            w.send(f"start {opts.turn_interval}")
        browser.js("window.edgeConsole.take()")  # from here on
        marks: list[list[float]] = []
        started = time.monotonic()
        while time.monotonic() - started < opts.duration:
            time.sleep(min(5.0, max(0.0, opts.duration - (time.monotonic() - started))))
            marks += browser.js("return window.edgeConsole.take()")
        elapsed = time.monotonic() - started
        cpu = {"console": round(100 * (console_cpu.sample() - c0) / elapsed, 1),
               "browser": round(100 * (browser_cpu.sample() - b0) / elapsed, 1)}
        total = [m[3] - m[0] for m in marks]
        result["events_on_page"] = len(marks)
        result["events_per_s"] = round(len(marks) / elapsed, 1)
        result["event_to_page_ms"] = stats(total)
        result["event_to_console_ms"] = stats([m[1] - m[0] for m in marks if m[1]])
        result["console_to_page_ms"] = stats([m[3] - m[1] for m in marks if m[1]])
        result["page_receive_to_shown_ms"] = stats([m[3] - m[2] for m in marks])
        result["within_1s"] = round(sum(1 for v in total if v <= 1000) / len(total), 4) if total else None
        result["cpu_percent_of_a_core"] = cpu
        if opts.screenshot:
            first_id = browser.js("return document.querySelector('.tile').dataset.device")
            browser.driver.find_element("css selector", f'.tile[data-device="{first_id}"]').click()
            browser.wait("document.querySelector('#d-turns tr td.num')", 10)
        result["command_round_trip_ms"] = stats(_commands(browser, opts.commands))
        if opts.screenshot:
            time.sleep(1.0)  # one more frame of live updates behind the panel
            browser.driver.save_screenshot(opts.screenshot)
        tick = browser.js("return window.edgeConsole.lastTick") or {}
        result["console_pages"] = tick.get("pages")  # dropped/resyncs: a page that fell behind
        result["console_counters"] = tick.get("counters")
        for w in workers:
            w.send("stop")
    finally:
        if browser is not None:
            browser.close()
        for w in workers:
            w.quit(60)
        if console is not None and console.poll() is None:
            console.terminate()
            try:
                console.wait(20)
            except subprocess.TimeoutExpired:
                console.kill()
                console.wait()
        broker.stop()
        console_log.close()
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _commands(browser: Chromium, rounds: int) -> list[float]:
    """Click "Listen" on the open device (or the first one) and time it until the answer shows."""
    if not rounds:
        return []
    if browser.js("return document.querySelector('#details').hidden"):
        first_id = browser.js("return document.querySelector('.tile').dataset.device")
        browser.driver.find_element("css selector", f'.tile[data-device="{first_id}"]').click()
    out = []
    for _ in range(rounds):
        t0 = time.monotonic()
        browser.js("document.querySelector('#d-actions button[data-command=\"listen\"]').click()")
        ok = browser.wait("document.querySelector('#d-answer').dataset.outcome === 'answered' && "
                          "document.querySelector('#d-answer-line').textContent.includes('answered')", 20)
        if ok:
            out.append((time.monotonic() - t0) * 1000)
        browser.js("document.querySelector('#d-answer').dataset.outcome = ''")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge.devtools.console_load",
                                 description="Measure how fast the fleet console's page follows N simulated devices.")
    ap.add_argument("--devices", type=int, default=200, metavar="N")
    ap.add_argument("--processes", type=int, default=0, metavar="P", help="device processes (default 1 per 125)")
    ap.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds measured (60)")
    ap.add_argument("--turn-interval", type=float, default=20.0, metavar="S",
                    help="a turn every S s per device, 7 events each (20)")
    ap.add_argument("--commands", type=int, default=10, metavar="K", help="commands sent from the page (10)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--screenshot", metavar="FILE", help="save the page (a device's details open) as PNG")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep its logs")
    opts = ap.parse_args(argv)
    if opts.devices < 1 or opts.duration <= 0 or opts.turn_interval <= 0 or opts.commands < 0:
        print("edge-voice: error: --devices, --duration and --turn-interval must be positive", file=sys.stderr)
        return 1
    try:
        result = run(opts)
    except EdgeError as err:
        print(f"edge-voice: error: {err.message}", file=sys.stderr)
        return 1
    print(f"{result['events_on_page']} events on the page in {opts.duration:g} s ({result['events_per_s']}/s) from "
          f"{opts.devices} devices")
    print(f"  device event -> page shows it:  {_fmt(result['event_to_page_ms'])}; "
          f"within 1 s: {100 * (result['within_1s'] or 0):.2f} %")
    print(f"  device event -> console:        {_fmt(result['event_to_console_ms'])}")
    print(f"  console -> page shows it:       {_fmt(result['console_to_page_ms'])}")
    print(f"  page receives -> shows it:      {_fmt(result['page_receive_to_shown_ms'])}")
    print(f"  command from the page, click to answer shown: {_fmt(result['command_round_trip_ms'])}")
    cpu = result["cpu_percent_of_a_core"]
    print(f"  CPU (% of one core): console {cpu['console']}, browser {cpu['browser']}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
