"""Helpers of the playground tests: a real `gpt2kit serve` process, a browser tab on its page, screenshots."""
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request

import pytest

from serve_helpers import ServerProcess


def sync_playwright_or_skip():
    if shutil.which("chromium") is None:
        pytest.skip("Chromium is missing: install Debian's package with `apt-get install -y chromium` "
                    "(.ci/run does this in CI); playwright drives that executable")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is missing: `pip install playwright` (it is in the `test` extra); "
                    "do not run `playwright install`, the tests use Debian's chromium")
    return sync_playwright


def launch_chromium(p):
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # as root (CI) it needs this
    return p.chromium.launch(executable_path=shutil.which("chromium"), args=args)


# The page shows the logprobs of its own run; the test's replay of the same request differs by float32 noise (~1e-6).
TOL = 1e-4


def unstreamed(body):
    """The page's own request body, for the test to send without streaming."""
    body = dict(body, stream=False)
    body.pop("stream_options", None)
    return body


class Server:
    """A real `gpt2kit serve` (serve_helpers.ServerProcess) and the plain HTTP calls the playground tests make."""

    def __init__(self, *args):
        self.process = ServerProcess(*args)
        self.base = self.process.url

    def request(self, path, body=None, key=None):
        """(status, parsed JSON or text) of a GET (body None) or a JSON POST."""
        req = urllib.request.Request(self.base + path, method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode())
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def metric(self, suffix):
        """Sum of the /metrics samples whose name ends with `suffix` (e.g. num_requests_running)."""
        _, text = self.request("/metrics")
        found = re.finditer(rf"^\S*{re.escape(suffix)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        values = [float(m.group(1)) for m in found]
        assert values, f"/metrics has no sample named *{suffix}:\n{text[:2000]}"
        return sum(values)

    def model(self):
        _, models = self.request("/v1/models")
        return models["data"][0]

    def pause(self):
        """Freeze the server process (SIGSTOP), so that a stream is certainly still running while the page acts."""
        self.process.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.proc.send_signal(signal.SIGCONT)

    def stop(self):
        if self.process.proc.poll() is None:
            self.resume()  # a frozen process would not act on SIGTERM
        self.process.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Tab:
    """A fresh browser context (its own sessionStorage) on the server's page, recording what it requests."""

    def __init__(self, browser, server, **context_args):
        self.server = server
        self.context = browser.new_context(**context_args)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors, self.requests = [], []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r))

    def open(self, wait_models=True):
        self.page.goto(self.server.base + "/")
        if wait_models:
            self.wait_models()
        return self.page

    def wait_models(self):
        self.page.wait_for_function("document.getElementById('model').value !== ''")

    def bodies(self, path):
        """The JSON bodies the page POSTed to `path`, in order."""
        return [r.post_data_json for r in self.requests if r.method == "POST" and r.url == self.server.base + path]

    def wait_state(self):
        """Wait for the run to end; its end state: done, stopped or error."""
        self.page.wait_for_function("['done', 'stopped', 'error'].includes(document.body.dataset.state)")
        return self.page.evaluate("document.body.dataset.state")

    def close(self):
        self.context.close()
        assert not self.errors, f"the page threw: {self.errors}"


def screenshot(page, folder, name):
    """A PNG of the page, palette-reduced so the committed pictures stay small; written atomically."""
    png = page.screenshot()
    try:
        from PIL import Image
        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=96).save(buf, format="PNG", optimize=True)
        png = buf.getvalue()
    except ImportError:  # Pillow comes with matplotlib (test extra); without it the full PNG is kept
        pass
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(png)
    os.replace(tmp, folder / name)


class Firefox:
    """Debian's firefox-esr, headless, driven over its own Marionette protocol (no geckodriver, no download)."""

    PREFS = {  # a quiet profile: no first-run pages, no update or telemetry calls
        "browser.shell.checkDefaultBrowser": False, "browser.startup.homepage_override.mstone": "ignore",
        "datareporting.policy.dataSubmissionEnabled": False, "toolkit.telemetry.reportingpolicy.firstRun": False,
        "app.update.disabledForTesting": True, "network.captive-portal-service.enabled": False,
        "browser.safebrowsing.update.enabled": False, "extensions.update.enabled": False,
    }

    def __init__(self, profile_dir):
        exe = shutil.which("firefox-esr") or shutil.which("firefox")
        if exe is None:
            pytest.skip("Firefox is missing: install Debian's package with `apt-get install -y firefox-esr`")
        try:
            from marionette_driver.marionette import Marionette
        except ImportError:
            pytest.skip("marionette-driver is missing: `pip install marionette-driver` (it is in the `test` extra)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        prefs = dict(self.PREFS, **{"marionette.port": port})
        (profile_dir / "user.js").write_text("".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items()))
        self.proc = subprocess.Popen([exe, "--headless", "--marionette", "--no-remote", "--profile", str(profile_dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.client = Marionette(host="127.0.0.1", port=port, startup_timeout=120)
            self.client.start_session()
        except Exception:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self):
        return self.client

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.client.delete_session()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
