"""The report in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
installs) opens the page built from the small run of conftest.chain and must find every
section, decode every image and log no console error; the screenshot is kept in tmp_path."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from curate.report.build import SECTIONS, build_report
from curate.report.context import ReportConfig

REPO = Path(__file__).resolve().parents[3]


def _browser_module():
    spec = importlib.util.spec_from_file_location("report_browser", REPO / "scripts" / "report_browser.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


browser = _browser_module()
NO_BROWSER = ("no Chromium on PATH (looked for chromium, chromium-browser, google-chrome): "
              "`apt-get install -y --no-install-recommends chromium` (.ci/run does this)")
if browser.find_chromium() is None and os.environ.get("TESSERA_REQUIRE_BROWSER"):
    raise RuntimeError(NO_BROWSER + "; TESSERA_REQUIRE_BROWSER is set, so this is an error, not a skip")
needs_chromium = pytest.mark.skipif(browser.find_chromium() is None, reason=NO_BROWSER)


@needs_chromium
def test_report_renders_in_chromium(chain, tmp_path) -> None:
    page = tmp_path / "report.html"
    build_report(ReportConfig(), [chain["root"]], page)
    shot = tmp_path / "report.png"
    seen = browser.check_page(page, screenshot=shot)
    assert seen["errors"] == []
    assert seen["sections"] == [sid for sid, _, _ in SECTIONS]
    assert len(seen["images"]) >= 30  # plots, contact sheets, groups, check PNGs, sample grids
    assert [i for i in seen["images"] if i["width"] <= 0 or i["height"] <= 0] == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


@needs_chromium
def test_the_browser_check_catches_a_broken_page(tmp_path) -> None:
    """The checker itself can fail: an undecodable image, a console error and an external
    request are all reported (so a passing report test means something)."""
    page = tmp_path / "bad.html"
    page.write_text('<html><body><section data-section="x"></section>'
                    '<img alt="broken" src="data:image/png;base64,AAAA">'
                    '<img alt="remote" src="http://127.0.0.1:9/x.png">'
                    '<script>console.error("boom")</script></body></html>')
    seen = browser.check_page(page)
    assert seen["sections"] == ["x"]
    assert {i["alt"] for i in seen["images"] if i["width"] == 0} == {"broken", "remote"}
    assert any("boom" in e for e in seen["errors"]) and any("127.0.0.1:9" in e for e in seen["errors"])
