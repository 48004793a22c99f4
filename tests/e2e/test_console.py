"""The web console in a real browser: Debian's headless Chromium driven through its WebDriver
(chromium-driver) by selenium, against a real server (local runtime) and a sandbox made with the SDK.

A person logs in with the API key, sees the sandbox in the list, opens it, renews it, opens its
terminal, types a command and reads its output from the screen, resizes; reads its endpoints (a
signed one that works without the key), its events and its log. The abuse side: no page, list or
terminal without the key (or with a wrong one); a call that changes something needs the CSRF token
and this server's Origin; a sandbox's entrypoint, terminal output and log lines that look like HTML
stay text (no element, no script run); neither the API key nor execd's token is in the page.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import websockets
from opensandbox import SandboxSync
from opensandbox.config.connection_sync import ConnectionConfigSync
from opensandbox.models.execd import RunCommandOpts
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from harness.ports import free_port
from harness.server_process import ServerProcess, running_server
from opensandbox_platform.server.console.routes import VENDOR

KEY = "console-key"
# What a hostile sandbox puts where the console shows it: it must stay text.
INJECTION = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
# What a command appends to this file the sandbox's entrypoint prints: its log (diagnostics/logs).
LOG_FILE = "/tmp/console-log"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
T = TypeVar("T")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver (tools/setup.sh test)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, runtime_name: str) -> Iterator[ServerProcess]:
    assert (VENDOR / "xterm.js").is_file(), "xterm.js is not vendored: run tools/vendor-console.sh"
    with running_server(tmp_path_factory.mktemp(f"console-{runtime_name}"), api_key=KEY, runtime=runtime_name) as srv:
        yield srv


@pytest.fixture(scope="module")
def sandbox(server: ServerProcess) -> Iterator[SandboxSync]:
    sandbox = SandboxSync.create(
        server.image,
        connection_config=ConnectionConfigSync(
            domain=server.domain, protocol="http", api_key=KEY, request_timeout=timedelta(seconds=120)
        ),
        # (metadata must be label values: a sandbox's own free text is its entrypoint)
        entrypoint=["sh", "-c", f"printf '%s\\n' '{INJECTION}'; touch {LOG_FILE}; exec tail -f {LOG_FILE}"],
        metadata={"owner": "console-test"},
        timeout=timedelta(minutes=20),
    )
    yield sandbox
    sandbox.kill()
    sandbox.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, server: ServerProcess) -> Iterator[WebDriver]:
    """A fresh browser (no cookie) per server."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or a driver
    options = Options()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--window-size=1280,900", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, condition: Callable[[WebDriver], T], timeout: float = 20) -> T:
    # (an element the page re-renders meanwhile, as its 5 s refresh does, is looked up again)
    return WebDriverWait(driver, timeout, 0.2, ignored_exceptions=[StaleElementReferenceException]).until(condition)


def screen(driver: WebDriver) -> str:
    """The terminal's screen as xterm.js draws it (its DOM renderer's rows)."""
    text: str = driver.execute_script("return document.querySelector('#terminal .xterm-rows').innerText")
    return text


def type_in_terminal(driver: WebDriver, line: str) -> None:
    driver.find_element(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea").send_keys(line + "\n")


def log_in(driver: WebDriver, server: ServerProcess, key: str) -> None:
    driver.get(f"{server.url}/console")
    wait(driver, lambda d: d.current_url.endswith("/console/login"))
    field = driver.find_element(By.ID, "api_key")
    field.send_keys(key)
    driver.find_element(By.ID, "login").click()


def cookie_of(server: ServerProcess) -> str:
    """A console session of its own (a login without a browser)."""
    with httpx.Client(base_url=server.url) as client:
        assert client.post("/console/login", data={"api_key": KEY}).status_code in (200, 303)
        return str(client.cookies["osb_console"])


def ensure_logged_in(driver: WebDriver, server: ServerProcess) -> None:
    if driver.get_cookie("osb_console") is None:
        log_in(driver, server, KEY)
        wait(driver, lambda d: d.get_cookie("osb_console"))


def shot(driver: WebDriver, name: str) -> None:
    """Screenshots go to $OSB_CONSOLE_SCREENSHOTS (the README's are made so), else nowhere."""
    folder = os.environ.get("OSB_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def fetch(driver: WebDriver, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
    """A fetch from the console's page (its cookie, its origin): {status, body}."""
    return driver.execute_async_script(
        """const [path, method, headers, done] = arguments;
        fetch(path, {method, headers, credentials: "same-origin", body: method === "GET" ? undefined : "{}"})
          .then(async r => done({status: r.status, body: await r.text()}))
          .catch(e => done({status: 0, body: String(e)}));""",
        path,
        method,
        headers or {},
    )


def test_nothing_without_the_key(server: ServerProcess, sandbox: SandboxSync) -> None:
    with httpx.Client(base_url=server.url, follow_redirects=False) as client:
        page = client.get("/console")
        assert page.status_code == 303 and page.headers["location"] == "/console/login"
        assert sandbox.id not in page.text
        for path in ("/console/api/sandboxes", f"/console/api/sandboxes/{sandbox.id}", "/console/api/session"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.json()["code"] == "MISSING_API_KEY", path
        wrong = client.post("/console/login", data={"api_key": "not-the-key"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        client.cookies.set("osb_console", "9999999999.00.forged")
        assert client.get("/console/api/sandboxes").status_code == 401
        login = client.get("/console/login")
        assert "script-src 'self'" in login.headers["content-security-policy"]
        assert "unsafe-inline" not in login.headers["content-security-policy"].split("script-src")[1].split(";")[0]


async def test_no_terminal_without_the_cookie(server: ServerProcess, sandbox: SandboxSync) -> None:
    url = f"ws://{server.domain}/console/api/sandboxes/{sandbox.id}/terminal"
    with pytest.raises(websockets.InvalidStatus):  # refused before the handshake completes
        async with websockets.connect(url, additional_headers={"OPEN-SANDBOX-API-KEY": KEY}):
            pass


def test_a_wrong_key_is_refused_in_the_browser(browser: WebDriver, server: ServerProcess) -> None:
    log_in(browser, server, "wrong")
    message = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "p.error"))
    assert message.text == "Wrong API key."
    assert browser.get_cookie("osb_console") is None


def test_the_console_shows_the_sandbox_and_a_working_terminal(
    browser: WebDriver, server: ServerProcess, sandbox: SandboxSync
) -> None:
    log_in(browser, server, KEY)
    cookie = wait(browser, lambda d: d.get_cookie("osb_console"))
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["secure"]
    assert KEY not in cookie["value"] and KEY not in browser.current_url
    row = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-id="{sandbox.id}"]'))
    assert "Running" in row.text and "owner=console-test" in row.text
    shot(browser, "console-list.png")

    row.find_element(By.TAG_NAME, "a").click()
    wait(browser, lambda d: d.find_element(By.ID, "sandbox-state").text == "Running")
    assert INJECTION in browser.find_element(By.ID, "details").text  # the hostile entrypoint, as text
    before = browser.find_element(By.ID, "sandbox-expires").text
    browser.find_element(By.ID, "renew-1h").click()
    wait(browser, lambda d: d.find_element(By.ID, "sandbox-message").text.startswith("Renewed"))
    wait(browser, lambda d: d.find_element(By.ID, "sandbox-expires").text != before)
    remaining = sandbox.get_info().expires_at.timestamp() - time.time()  # type: ignore[union-attr]
    assert 3500 < remaining <= 3600

    browser.find_element(By.ID, "open-terminal").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea"))
    type_in_terminal(browser, "echo hi-$((6*7))")
    wait(browser, lambda d: "hi-42" in screen(d))
    # A sandbox's output that looks like HTML is drawn as text by the terminal.
    type_in_terminal(browser, f"printf '%s\\n' '{INJECTION}'")
    wait(browser, lambda d: "window.__pwned=2</script>" in screen(d))
    shot(browser, "console-sandbox.png")
    # The window shrinks: the terminal fits itself and tells the shell its new size.
    browser.set_window_size(900, 700)
    fitted = "const t = window.consoleTerminal; return t.cols < 100 && [t.rows, t.cols]"
    size = wait(browser, lambda d: d.execute_script(fitted))
    type_in_terminal(browser, "stty size")
    wait(browser, lambda d: f"{size[0]} {size[1]}" in screen(d))

    assert browser.execute_script("return window.__pwned === undefined && document.images.length === 0")
    assert not browser.find_elements(By.CSS_SELECTOR, "#view script, #view img")


def test_files_and_resources_of_the_sandbox(
    browser: WebDriver, server: ServerProcess, sandbox: SandboxSync, tmp_path: Path
) -> None:
    ensure_logged_in(browser, server)
    hostile_name = '<img src=x onerror="window.__pwned=3">'
    sandbox.files.write_file(f"/tmp/{hostile_name}", "<html><script>window.__pwned=4</script></html>")
    browser.get(f"{server.url}/console/#/sandbox/{sandbox.id}")
    wait(browser, lambda d: d.find_element(By.ID, "resources-text").text.startswith("CPU (blue) "))
    path = browser.find_element(By.ID, "files-path")
    path.clear()
    path.send_keys("/tmp")
    browser.find_element(By.ID, "files-go").click()
    row = wait(
        browser,
        lambda d: d.find_element(
            By.CSS_SELECTOR, f'tr[data-path="/tmp/{hostile_name.replace(chr(34), chr(92) + chr(34))}"]'
        ),
    )
    assert hostile_name in row.text
    link = row.find_element(By.CSS_SELECTOR, "a.file").get_attribute("href")
    got = fetch(browser, str(link))
    assert got["status"] == 200 and got["body"] == "<html><script>window.__pwned=4</script></html>"
    cookie = browser.get_cookie("osb_console")["value"]  # type: ignore[index]
    with httpx.Client(base_url=server.url, cookies={"osb_console": cookie}) as client:
        head = client.get(str(link)).headers
    assert head["content-type"] == "application/octet-stream" and head["content-disposition"].startswith("attachment;")

    local = tmp_path / "from-the-browser.txt"
    local.write_text("uploaded through the console\n")
    browser.find_element(By.ID, "upload-file").send_keys(str(local))
    browser.find_element(By.ID, "upload").click()
    wait(browser, lambda d: d.find_element(By.ID, "sandbox-message").text == "Uploaded /tmp/from-the-browser.txt")
    assert sandbox.files.read_file("/tmp/from-the-browser.txt") == "uploaded through the console\n"
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-path="/tmp/from-the-browser.txt"]'))
    shot(browser, "console-files.png")
    assert browser.execute_script("return window.__pwned === undefined && document.images.length === 0")


def test_endpoints_and_diagnostics_of_the_sandbox(
    browser: WebDriver, server: ServerProcess, sandbox: SandboxSync
) -> None:
    ensure_logged_in(browser, server)
    execd = sandbox.get_endpoint(44772)  # the SDK's answer: execd's address, and its access token
    assert execd.headers
    browser.get(f"{server.url}/console/#/sandbox/{sandbox.id}")
    direct = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-port="44772"][data-route="direct"]'))
    assert execd.endpoint in direct.text and all(f"{name}: (value not shown)" in direct.text for name in execd.headers)
    proxied = browser.find_element(By.CSS_SELECTOR, 'tr[data-port="44772"][data-route="server"]')
    assert f"{server.domain}/sandboxes/{sandbox.id}/proxy/44772" in proxied.text
    Select(browser.find_element(By.ID, "endpoint-signed")).select_by_value("900")
    browser.find_element(By.ID, "endpoint-resolve").click()
    signed = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-port="44772"][data-route="signed"]'))
    url = signed.find_element(By.CSS_SELECTOR, "td.endpoint").text
    assert url.startswith(f"{server.domain}/sandboxes/{sandbox.id}/signed/44772/") and "valid until" in signed.text
    assert httpx.get(f"http://{url}/ping", timeout=30).status_code == 200  # a real signed URL: no key needed

    # Events and the log, read on demand: the entrypoint's hostile line is text, a command's output
    # appears after Refresh.
    wait(browser, lambda d: "Created: image" in d.find_element(By.ID, "events").text)
    wait(browser, lambda d: INJECTION in d.find_element(By.ID, "logs").text)
    sandbox.commands.run(f"echo console-log-$((6*7)) >> {LOG_FILE}")

    def refreshed(driver: WebDriver) -> bool:  # (tail -f and the engine's log take a moment)
        if "console-log-42" in driver.find_element(By.ID, "logs").text:
            return True
        driver.find_element(By.ID, "diagnostics-refresh").click()
        return False

    WebDriverWait(browser, 30, poll_frequency=1).until(refreshed)
    assert not browser.find_elements(By.CSS_SELECTOR, "#logs *, #events *")
    browser.set_window_size(1280, 900)
    browser.execute_script("document.getElementById('endpoints-heading').scrollIntoView()")
    shot(browser, "console-diagnostics.png")

    page = browser.page_source
    assert KEY not in page and all(value not in page for value in execd.headers.values())
    assert browser.execute_script("return window.__pwned === undefined && document.images.length === 0")


def test_changes_need_the_csrf_token_and_this_origin(
    browser: WebDriver, server: ServerProcess, sandbox: SandboxSync
) -> None:
    ensure_logged_in(browser, server)
    renew = f"/console/api/sandboxes/{sandbox.id}/renew"
    assert fetch(browser, renew, "POST", {"content-type": "application/json"})["status"] == 403
    cookie = browser.get_cookie("osb_console")["value"]  # type: ignore[index]
    with httpx.Client(base_url=server.url, cookies={"osb_console": cookie}) as client:
        session = client.get("/console/api/session").json()
        foreign = {"origin": "http://evil.example", "x-console-csrf": session["csrf"]}
        assert client.post(renew, json={"seconds": 60}, headers=foreign).status_code == 403
        own = {"origin": server.url, "x-console-csrf": session["csrf"]}
        assert client.post(renew, json={"seconds": 0}, headers=own).status_code == 400
        assert client.post(renew, json={"seconds": 120}, headers=own).status_code == 200


async def test_a_foreign_page_cannot_open_a_terminal_with_the_cookie(
    server: ServerProcess, sandbox: SandboxSync
) -> None:
    cookie = cookie_of(server)
    url = f"ws://{server.domain}/console/api/sandboxes/{sandbox.id}/terminal"
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(
            url, additional_headers={"cookie": f"osb_console={cookie}"}, origin="http://evil.example"
        ):  # type: ignore[arg-type]
            pass
    async with websockets.connect(url, additional_headers={"cookie": f"osb_console={cookie}"}) as ws:
        assert '"connected"' in str(await ws.recv())  # the same cookie from no browser page: allowed
        await ws.send(b"\x00" + b"x" * 100_000)  # one message above the 64 KiB a terminal takes
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(15):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


# A page the sandbox serves: it tries to read the console's API with the logged-in user's cookie.
HOSTILE_PAGE = """<html><body><script>
fetch('/console/api/sandboxes', {credentials: 'include'})
  .then(r => r.text()).then(t => { document.title = 'READ ' + t.length; })
  .catch(() => { document.title = 'BLOCKED'; });
</script></body></html>"""


def test_a_page_the_sandbox_serves_cannot_act_as_the_console(
    browser: WebDriver, server: ServerProcess, sandbox: SandboxSync
) -> None:
    ensure_logged_in(browser, server)
    port = free_port()
    sandbox.files.write_file("/tmp/site/evil.html", HOSTILE_PAGE)
    if server.runtime == "local":  # (the jail has the host's /usr, not the server's venv: execd's python)
        serve = f"PYTHONPATH=/opt/opensandbox/site /opt/opensandbox/python/bin/python3 -m http.server {port}"
    else:
        serve = f"busybox httpd -f -p {port} -h /tmp/site"
    sandbox.commands.run(serve, opts=RunCommandOpts(background=True, working_directory="/tmp/site"))
    # A signed endpoint: reachable without the API key, on the console's own origin.
    url = sandbox.get_signed_endpoint(port, int(time.time()) + 600).endpoint
    url = url if url.startswith("http") else f"http://{url}"
    deadline = time.monotonic() + 30
    while True:  # (until the sandbox's server listens and the page's script has run)
        browser.get(f"{url}/evil.html")
        try:
            wait(browser, lambda d: d.title == "BLOCKED" or d.title.startswith("READ"), timeout=3)
            break
        except TimeoutException:
            assert time.monotonic() < deadline, browser.page_source[:500]
    assert browser.title == "BLOCKED"  # an opaque origin: no same-origin read with the cookie
