"""The dashboard in a real browser (Debian's Chromium driven by Playwright).

The "test worker" is the test posting results over the API while the page is open: the page
must pick them up through server-sent events, without a reload.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from service.client import ApiClient
from service.demo import start_server
from service.settings import Settings
from tests.conftest import zoo_spec

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("MMMO_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "service" / "web" / "docs" / "study-page.png"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Chromium is not installed (apt-get install chromium): browser tests skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def server(tmp_path, cache_dir):
    running = start_server(Settings(home=tmp_path, cache_dir=cache_dir, lease_seconds=60), port=0)
    client = ApiClient(running.url, token=running.token)
    yield running, client
    client.close()
    running.stop()


def _post_trial(client: ApiClient, spec: dict, rng: random.Random, worker: str = "test-worker") -> dict | None:
    lease = client.lease(worker)
    if lease is None:  # the budget is spent (a repeated configuration is answered from the cache)
        return None
    # two objectives that trade off, as merges of two experts do: a front with a knee
    t, slack = rng.random(), rng.uniform(0.0, 0.25)
    a, b = 0.25 + 0.65 * t - slack * rng.random(), 0.25 + 0.65 * (1 - t * t) ** 0.5 - slack * rng.random()
    keys = [f"{o['task']}:exact_match" for o in spec["objectives"]]
    return client.complete(lease["token"], dict(zip(keys, (round(a, 3), round(b, 3)), strict=True)))


def _points(page) -> int:
    return page.evaluate("() => (document.getElementById('pareto').data || [])"
                         ".filter(t => t.name !== 'open trial' && t.name !== 'selected')"
                         ".reduce((n, t) => n + t.x.length, 0)")


def _log_in(page, url: str, token: str, path: str) -> None:
    page.goto(f"{url}{path}")
    assert "/login" in page.url, "an anonymous visit must land on the login page"
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}{path}")


def test_login_live_pareto_trial_export_and_screenshot(browser, server, zoo, tmp_path):
    running, client = server
    spec = zoo_spec(zoo, trials=24) | {"name": "TIES over add + reverse"}
    study = client.create_study(spec)
    rng = random.Random(0)
    for _ in range(2):
        _post_trial(client, spec, rng)

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()

    page.goto(f"{running.url}/studies/{study['id']}")
    page.fill("#token", "mmmo_wrong-token")
    page.click("button[type=submit]")
    assert "not valid" in page.inner_text("#error"), "a wrong token shows the login page again"
    cookies = context.cookies()
    assert not any(c["name"] == "mmmo_session" for c in cookies)

    page.fill("#token", running.token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{running.url}/studies/{study['id']}")
    cookie = next(c for c in context.cookies() if c["name"] == "mmmo_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("() => document.cookie") == "", "the token is not readable from JavaScript"

    page.wait_for_function("() => document.getElementById('pareto').data")
    assert _points(page) == 2
    page.evaluate("() => { window.__sameDocument = true; }")
    _post_trial(client, spec, rng)  # the test worker reports a third trial while the page is open
    page.wait_for_function("n => (document.getElementById('pareto').data || []).filter(t => t.name !== 'selected' "
                           "&& t.name !== 'open trial').reduce((s, t) => s + t.x.length, 0) === n", arg=3,
                           timeout=20_000)
    assert page.evaluate("() => window.__sameDocument") is True, "the point must arrive without a reload"
    assert page.locator("#trials tbody tr").count() == 3

    page.click("#trials tbody tr[data-n='1']")
    assert page.inner_text("#trial-title").startswith("Trial 1")
    page.click("button[data-export=mergekit]")
    page.wait_for_function("() => document.getElementById('export').textContent.includes('merge_method')")
    exported = page.inner_text("#export")
    assert "merge_method: ties" in exported and client.export(study["id"], 1) == exported.strip() + "\n"

    while _post_trial(client, spec, rng):  # the rest of the budget: a fuller front for the picture
        pass
    page.wait_for_function("() => document.querySelectorAll('#trials tbody tr').length === 24", timeout=20_000)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.wait_for_timeout(500)
    shot = tmp_path / "study-page.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 20_000
    if os.environ.get("MMMO_UPDATE_SCREENSHOT"):  # the README's picture: MMMO_UPDATE_SCREENSHOT=1 pytest -k screenshot
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOT)
    context.close()


def test_studies_page_form_errors_and_workers_page(browser, server, zoo):
    running, client = server
    spec = zoo_spec(zoo, trials=4)
    study = client.create_study(spec)
    held = client.lease("gpu-box-7", memory="resident: base + 2 experts on cpu, 0.1 GiB of 20.0 GiB")
    context = browser.new_context()
    page = context.new_page()
    _log_in(page, running.url, running.token, "/")
    page.wait_for_selector(f"#studies tbody tr[data-id='{study['id']}']")
    assert "test study" in page.inner_text("#studies tbody")

    page.click("#new-toggle")
    page.fill("#spec", "name: broken\nbase: /no/such/model\nexperts: []\nobjectives: [{task: mmmo_add}]\n")
    page.click("#create")
    page.wait_for_selector("#spec-errors li")
    errors = page.inner_text("#spec-errors")
    assert "experts" in errors
    assert page.url == f"{running.url}/", "a refused spec keeps the form"
    assert len(client.list_studies()) == 1, "nothing stored"

    page.goto(f"{running.url}/workers")
    page.wait_for_selector("#workers tbody tr")
    row = page.inner_text("#workers tbody")
    assert "gpu-box-7" in row and "busy" in row and f"trial {held['trial_number']}" in row
    assert page.inner_text("#workers tbody .memory") == "resident: base + 2 experts on cpu, 0.1 GiB of 20.0 GiB"
    context.close()


def test_a_study_that_cannot_run_shows_why(browser, server, tiny_zoo):
    running, client = server
    study = client.create_study(zoo_spec(tiny_zoo, trials=4))
    lease = client.lease("w")
    client.fail(lease["token"], "the study's models cannot be merged: model 'add': does not look fine-tuned "
                "from the base", fatal=True)
    assert client.study(study["id"])["status"] == "failed"
    page = browser.new_context().new_page()
    _log_in(page, running.url, running.token, f"/studies/{study['id']}")
    shown = page.locator("#study-error")
    shown.wait_for(state="visible")
    assert "model 'add': does not look fine-tuned" in shown.text_content()
    assert page.locator("#cancel").is_hidden()


def test_a_study_whose_models_no_worker_can_load_shows_each_trial_s_reason(browser, server, tiny_zoo):
    running, client = server
    study = client.create_study(zoo_spec(tiny_zoo, trials=8))
    reason = "loading the models failed: SafetensorError: Error while deserializing header: incomplete metadata"
    numbers = []
    for _ in range(3):
        lease = client.lease("w")
        numbers.append(lease["trial_number"])
        client.fail(lease["token"], reason, load_failure=True)
    assert client.study(study["id"])["status"] == "failed"
    page = browser.new_context().new_page()
    _log_in(page, running.url, running.token, f"/studies/{study['id']}")
    shown = page.locator("#study-error")
    shown.wait_for(state="visible")
    assert shown.text_content() == f"This study cannot run: every worker that tried could not load the models " \
        f"(3 times): {reason}"
    for number in numbers:
        row = page.locator(f"#trials tbody tr[data-n='{number}']")
        assert row.locator("td.state-failed").text_content() == "failed"
        assert row.locator("td.error").text_content() == reason
    page.goto(f"{running.url}/")
    status = page.locator(f"#studies tbody tr[data-id='{study['id']}'] td.status-failed")
    status.wait_for()
    assert status.get_attribute("title").endswith(reason), "the studies list says why on hover"


ATTACK_PAGE = """<!doctype html><html><body>
<iframe name="sink"></iframe>
<form id="forged" method="post" target="sink" action="{api}/api/v1/studies/{sid}/cancel"></form>
<script>
window.attack = (async () => {{
  const send = (path, init) => fetch('{api}' + path,
    {{method: 'POST', credentials: 'include', mode: 'no-cors', ...init}}).catch(() => null);
  await send('/api/v1/studies/{sid}/cancel', {{}});
  await send('/api/v1/studies/yaml', {{headers: {{'Content-Type': 'text/plain'}}, body: {spec}}});
  await send('/api/v1/studies/{sid}/cancel', {{headers: {{'Content-Type': 'text/plain'}}, body: 'x'}});
  await new Promise(done => {{
    document.querySelector('iframe').onload = done;
    document.getElementById('forged').submit();
  }});
  return 'sent';
}})();
</script></body></html>"""


@pytest.fixture
def other_origin():
    """A page server on another port of 127.0.0.1: the same site as the API, another origin."""
    import http.server
    import threading

    pages: dict[str, str] = {}

    class Pages(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", pages
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def test_a_page_of_another_origin_cannot_use_the_session_but_the_dashboard_can(browser, server, tiny_zoo,
                                                                               other_origin):
    """Issue #15: a page on another port of the same host (same site, so SameSite=Strict does not
    help) posted to the API with the victim's cookie and cancelled and created studies."""
    import json

    running, client = server
    study = client.create_study(zoo_spec(tiny_zoo, trials=4))
    attacker, pages = other_origin
    pages["/"] = ATTACK_PAGE.format(api=running.url, sid=study["id"],
                                    spec=json.dumps(json.dumps(zoo_spec(tiny_zoo) | {"name": "forged"})))
    context = browser.new_context()
    page = context.new_page()
    _log_in(page, running.url, running.token, f"/studies/{study['id']}")
    session_id = next(c["value"] for c in context.cookies() if c["name"] == "mmmo_session")
    assert running.token not in session_id

    evil = context.new_page()
    evil.goto(f"{attacker}/")
    assert evil.evaluate("() => window.attack") == "sent"
    assert client.study(study["id"])["status"] == "running", "another origin's page cancelled the study"
    assert [s["name"] for s in client.list_studies()] == ["test study"], "another origin's page created a study"
    evil.close()

    page.on("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").wait_for(state="visible")
    page.click("#cancel")
    page.wait_for_function("() => document.getElementById('summary').textContent.startsWith('cancelled')")
    assert client.study(study["id"])["status"] == "cancelled"

    page.click("header .logout button")
    page.wait_for_url(f"{running.url}/login")
    replay = browser.new_context()
    replay.add_cookies([{"name": "mmmo_session", "value": session_id, "url": running.url}])
    again = replay.new_page()
    again.goto(f"{running.url}/studies/{study['id']}")
    assert "/login" in again.url, "the session ended at logout: its old cookie opens nothing"
    assert again.request.get(f"{running.url}/api/v1/studies").status == 401
    replay.close()
    context.close()
