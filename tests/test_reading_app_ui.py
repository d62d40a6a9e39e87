"""The reading web app in Debian's Chromium (Playwright drives it; no browser download),
against a real `carina serve` that delivers to Orthanc, as a radiologist and an admin
use it:

log in; the STAT study is at the top of the worklist although a routine one arrived
later; open it with the keyboard (j, Enter); switch a heatmap on (the canvas pixels
change) and change its opacity (they change again); give feedback, see it stored,
export the labelled set as CSV; upload a PNG and see its result; an admin page is
refused to the radiologist; an admin's models and system pages (the PACS probed by
C-ECHO). axe-core (tests/js, pinned), injected into each page, finds no serious or
critical accessibility violation on the worklist, viewer, upload and admin pages, at
1280 px and on a tablet. No page breaks the CSP (no inline script or style).

Screenshots are test artifacts: under the test's tmp dir and `test-artifacts/reading-app/`
(git-ignored) at the repository root.
"""
from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest

from dicom_factory import NIH_PNGS, make_dx, png_pixels, write
from inference.types import DEMO_WARNING
from ohif_js import JS, _require_node_modules
from peers import node_with_pacs, storescu, wait_until

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "reading-app"
RADIOLOGIST = ("rad", "radiologist", "a long enough passphrase")
ADMIN = ("boss", "admin", "another long passphrase")
DESKTOP = {"width": 1280, "height": 900}
TABLET = {"width": 820, "height": 1180}


@pytest.fixture(scope="module")
def reading(tmp_path_factory):
    """Two studies: a STAT one (Fibrosis is made critical; the demo model finds it on this
    radiograph) pushed first, a routine one pushed after it."""
    work = tmp_path_factory.mktemp("reading-ui")
    with node_with_pacs(work, extra={"triage": {"critical_findings": ["Fibrosis"]}}) as (node, pacs):
        stat = make_dx(png_pixels(NIH_PNGS[1]), patient_id="UI-STAT-1", patient_name="Urgent^Ursula", accession="UI0001")
        routine = make_dx(png_pixels(NIH_PNGS[0]), patient_id="UI-ROUT-2", patient_name="Routine^Rita", accession="UI0002")
        for ds, name in ((stat, "stat.dcm"), (routine, "routine.dcm")):
            sent = storescu(node.dicom_port, write(ds, work / name))
            assert sent.returncode == 0, sent.stdout + sent.stderr
            uid = ds.StudyInstanceUID
            wait_until(lambda: node.api(f"/api/v1/studies/{uid}")["state"] == "done", 240, what=f"{name} done")
        for uid in (stat.StudyInstanceUID, routine.StudyInstanceUID):
            wait_until(lambda: all(d["state"] == "done" for d in node.api(f"/api/v1/studies/{uid}")["deliveries"]),
                       120, what="delivered to Orthanc")
        assert node.api(f"/api/v1/studies/{stat.StudyInstanceUID}")["priority"] == "stat"
        assert node.api(f"/api/v1/studies/{routine.StudyInstanceUID}")["priority"] == "routine"
        for name, role, password in (RADIOLOGIST, ADMIN):
            node.create_user(name, role, password)
        yield {"node": node, "stat": stat, "routine": routine, "work": work}


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright

    from peers import require_tool

    chromium = require_tool("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield browser
        finally:
            browser.close()


class Shots:
    def __init__(self, tmp_path: Path):
        self.dirs = [tmp_path, ARTIFACTS]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(self, page, name: str) -> None:
        first = self.dirs[0] / f"{name}.png"
        page.screenshot(path=str(first), full_page=True)
        shutil.copyfile(first, self.dirs[1] / f"{name}.png")


AXE_SOURCE = None


def axe(page, what: str) -> list[dict]:
    """axe-core's serious and critical violations on the page as it is now. The script is
    evaluated through the DevTools protocol, which the page's CSP does not govern."""
    global AXE_SOURCE
    if AXE_SOURCE is None:
        _require_node_modules()
        AXE_SOURCE = (JS / "node_modules" / "axe-core" / "axe.min.js").read_text()
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.evaluate(AXE_SOURCE)
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    bad = [{"id": v["id"], "impact": v["impact"], "help": v["help"], "nodes": [n["target"] for n in v["nodes"]][:5]}
           for v in result["violations"] if v["impact"] in ("serious", "critical")]
    assert result["passes"], "axe-core ran no rule"
    return [dict(b, page=what) for b in bad]


def canvas_pixels(page) -> str:
    return page.evaluate("() => document.querySelector('#viewer').toDataURL('image/png')")


def log_in(page, url: str, who: tuple[str, str, str]) -> None:
    page.fill("#username", who[0])
    page.fill("#password", who[2])
    page.click("#login-button")
    page.wait_for_url(url)


def test_radiologist_reads_gives_feedback_uploads_and_admin_pages_are_accessible(reading, browser, tmp_path):
    from playwright.sync_api import expect

    node, stat, routine = reading["node"], reading["stat"], reading["routine"]
    shots = Shots(tmp_path)
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()
    csp = []  # the CSP forbids inline scripts and styles; the app must need none
    page.on("console", lambda msg: csp.append(msg.text) if "Content Security Policy" in msg.text else None)
    violations = []

    # --- log in; the worklist, STAT first ---------------------------------------------------------------
    page.goto(node.url)
    page.wait_for_url("**/login?next=%2F")
    log_in(page, node.url + "/", RADIOLOGIST)
    expect(page.locator("#who")).to_have_text("rad (radiologist)")
    expect(page.locator("#demo-banner")).to_have_text(DEMO_WARNING)
    rows = page.locator("#rows tr.study")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_have_attribute("data-uid", stat.StudyInstanceUID)
    expect(rows.nth(0).locator(".stat-badge")).to_have_text("STAT")
    expect(rows.nth(1)).to_have_attribute("data-uid", routine.StudyInstanceUID)  # newer, but routine
    expect(rows.nth(0)).to_contain_text("URGENT, Ursula")
    expect(rows.nth(0)).to_contain_text("UI-STAT-1")
    expect(rows.nth(0).locator(".chip", has_text="Fibrosis")).to_be_visible()
    expect(rows.nth(0)).to_contain_text("delivered")
    shots.take(page, "worklist")
    violations += axe(page, "worklist")
    page.fill("#q", "rita")
    page.press("#q", "Enter")
    expect(page.locator("#rows tr.study")).to_have_count(1)
    expect(page.locator("#rows tr.study")).to_have_attribute("data-uid", routine.StudyInstanceUID)
    page.goto(node.url + "/")

    # --- open it with the keyboard ------------------------------------------------------------------------
    page.keyboard.press("j")
    expect(rows.nth(0).locator("a.open")).to_be_focused()
    page.keyboard.press("Enter")
    page.wait_for_url("**/studies/*")
    expect(page.locator("#patient")).to_have_text("URGENT, Ursula")
    expect(page.locator("#priority .stat-badge")).to_have_text("STAT")
    expect(page.locator("#demo-banner")).to_have_text(DEMO_WARNING)
    expect(page.locator("tr.finding")).to_have_count(14)
    expect(page.locator("#deliveries")).to_contain_text("pacs: done")
    for kind in ("sr", "sc", "seg", "gsps", "fhir"):
        expect(page.locator(f"#downloads a[data-kind='{kind}']").first).to_be_visible()
    canvas = page.locator("#viewer")
    expect(canvas).to_have_attribute("data-loaded", "1")
    plain = canvas_pixels(page)

    # --- a heatmap on, then more opaque: the canvas changes each time ---------------------------------------
    page.locator("tr.finding[data-label='Fibrosis'] .heatmap-toggle").check()
    expect(canvas).to_have_attribute("data-overlays", "1")
    with_heat = canvas_pixels(page)
    assert with_heat != plain
    page.focus("#opacity")
    page.keyboard.press("End")
    expect(page.locator("#opacity-value")).to_have_text("100 %")
    opaque = canvas_pixels(page)
    assert opaque != with_heat
    canvas.focus()
    page.keyboard.press("+")
    assert canvas_pixels(page) != opaque  # zoomed in
    page.keyboard.press("0")
    shots.take(page, "viewer")
    violations += axe(page, "viewer")

    # --- feedback, stored, and exported as a labelled set ---------------------------------------------------
    form = page.locator("tr.finding[data-label='Fibrosis'] .feedback-form")
    form.locator("select").select_option("disagree")
    form.locator("input[name=comment]").fill("old scarring, not fibrosis")
    form.locator("button").click()
    expect(form.locator(".saved")).to_contain_text("saved")
    study_id = page.url.rsplit("/", 1)[-1]
    stored = node.api(f"/api/v1/read/{study_id}/feedback")["feedback"]
    assert [(r["user"], r["label"], r["verdict"], r["comment"]) for r in stored] == \
        [("rad", "Fibrosis", "disagree", "old scarring, not fibrosis")]
    page.reload()
    expect(page.locator("tr.finding[data-label='Fibrosis'] select")).to_have_value("disagree")
    with page.expect_download() as download:
        page.click("#feedback-export")
    table = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [(r["sop_instance_uid"], r["Fibrosis"]) for r in table] == [(stat.SOPInstanceUID, "0")]
    shutil.copyfile(download.value.path(), tmp_path / "feedback.csv")

    # --- tablet: the viewer fits the width --------------------------------------------------------------------
    page.set_viewport_size(TABLET)
    page.reload()
    expect(canvas).to_have_attribute("data-loaded", "1")
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    shots.take(page, "viewer-tablet")
    violations += axe(page, "viewer (tablet)")
    page.set_viewport_size(DESKTOP)

    # --- upload a PNG ---------------------------------------------------------------------------------------------
    page.click("#upload-link")
    page.wait_for_url("**/upload")
    page.set_input_files("#file", str(NIH_PNGS[0]))
    page.click("#upload-button")
    expect(page.locator("#progress-text")).to_have_text("Done: 1 scored, 0 not scored.", timeout=60000)
    expect(page.locator("#results li.success")).to_contain_text(NIH_PNGS[0].name)
    expect(page.locator("#upload-findings tr.finding")).to_have_count(14)
    expect(page.locator("#upload-findings tr.finding.positive")).not_to_have_count(0)
    expect(page.locator("#upload-demo")).to_have_text(DEMO_WARNING)
    expect(page.locator("#viewer")).to_have_attribute("data-loaded", "1")
    shots.take(page, "upload")
    violations += axe(page, "upload")

    # --- an admin page is refused to a radiologist ----------------------------------------------------------
    refused = page.goto(node.url + "/admin/models")
    assert refused.status == 403
    expect(page.locator("#error-title")).to_have_text("Not allowed")
    shots.take(page, "admin-refused")

    # --- the admin's pages ------------------------------------------------------------------------------------
    page.click("#logout")
    page.wait_for_url("**/login")
    log_in(page, node.url + "/", ADMIN)
    page.click("#models-link")
    page.wait_for_url("**/admin/models")
    expect(page.locator("#active-model")).to_have_text("densenet121-res224-all@demo-seed0")
    expect(page.locator("#models tr.model.active")).to_contain_text("demo")
    shots.take(page, "admin-models")
    violations += axe(page, "admin models")
    page.click("#system-link")
    page.wait_for_url("**/admin/system")
    expect(page.locator("#health tr[data-name='pacs']")).to_have_attribute("data-ok", "true", timeout=30000)
    expect(page.locator("#health tr[data-name='pacs']")).to_contain_text("C-ECHO answered success")
    expect(page.locator("#no-dead")).to_have_text("None.")
    shots.take(page, "admin-system")
    violations += axe(page, "admin system")
    page.goto(node.url + "/")
    violations += axe(page, "worklist (admin)")
    page.set_viewport_size(TABLET)
    shots.take(page, "worklist-tablet")
    violations += axe(page, "worklist (tablet)")
    context.close()

    assert violations == []
    assert csp == []
