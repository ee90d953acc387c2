"""The registry browser of `patchctl serve`: HTML pages, JSON twins, charts, escaping, the token — in real Chromium.

A real `python -m patchctl serve` on 127.0.0.1 over a registry holding demo-like patches
made by the real operations on the tiny BERT of conftest.py: a PEFT LoRA, two full
fine-tunes as diffs (each with an eval suite), a compressed patch, a merge found by a
coefficient search and validated (pass), the same merge failing a strict gate (kept,
untagged), and a port of a diff to another version of the base.

The browser tests drive Debian's headless Chromium (`/usr/bin/chromium` +
`/usr/bin/chromedriver`) through Selenium; they skip, naming the packages, where those
are missing. Screenshots of each page go to tests/output/ (not committed).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from patchctl import Registry
from patchctl.server import process as server_process
from patchctl.server.app import create_app
from patchctl.server.pages import CSP

OUTPUT = Path(__file__).resolve().parent / "output"
TOKEN = "browser-token-0123456789"
XSS = "<script>alert(1)</script> \"quoted\" 'single' «ünïcødé» ☃ <img src=x onerror=alert(2)>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _suite(tmp: Path, name: str, texts: list[str], labels: list[str]) -> Path:
    path = tmp / f"{name}.jsonl"
    rows = []
    for split in ("validation", "test"):
        rows += [{"text": t, "label": y, "split": split} for t, y in zip(texts, labels, strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def demo_registry(tmp_path_factory, models) -> dict:
    """Demo-like patches made by the real operations (see the module docstring)."""
    tmp = tmp_path_factory.mktemp("browser")
    root = tmp / "reg"
    animals = ["a dog barks", "a cat purrs", "a cow moos", "a lion roars", "a bird sings", "a horse neighs"]
    kinds = ["pet", "pet", "farm", "wild", "wild", "farm"]
    tools = ["a saw cuts wood", "a pen writes", "a hammer hits", "a brush paints", "a knife slices", "a spade digs"]
    uses = ["cut", "write", "hit", "paint", "cut", "dig"]
    with Registry(root) as reg:
        reg.eval_push(_suite(tmp, "animals", animals, kinds), "evals/animals:v1", task="classification",
                      base=models.base, labels=sorted(set(kinds)),
                      prompts=[f"an animal that is {k}" for k in sorted(set(kinds))], max_len=16)
        reg.eval_push(_suite(tmp, "tools", tools, uses), "evals/tools:v1", task="classification",
                      base=models.base, labels=sorted(set(uses)),
                      prompts=[f"a tool to {u}" for u in sorted(set(uses))], max_len=16)
        reg.push(models.lora, "team/lora:v1", message="a PEFT LoRA (r=4) on query/value")
        reg.push(models.finetune, "team/animals:v1", base=models.base, base_name="tiny-bert",
                 evals=["evals/animals:v1"], message="full fine-tune on animal glosses")
        reg.push(models.finetune2, "team/tools:v1", base=models.base, base_name="tiny-bert",
                 evals=["evals/tools:v1"], message="full fine-tune on tool glosses")
        reg.compress("team/animals:v1", "team/animals:v1-d10", density=0.1, message="ComPEFT ternary at 10%")
        merged = reg.merge(["team/animals:v1", "team/tools:v1"], "team/merged:v1", method="ties",
                           params={"density": 0.5}, search=True, budget=3, gate=0.0,
                           message="TIES merge, λ chosen on validation")
        failed = reg.merge(["team/animals:v1", "team/tools:v1"], "team/strict:v1", method="task_arithmetic",
                           params={"lambda": 2.0}, gate=10.0, message="must fail its gate")
        port = reg.port("team/animals:v1", models.other_base, as_ref="team/animals:v1-ported", gate=-100.0,
                        message="ported to the other base version")
        reg.inspect("team/merged:v1")  # the diagnostics the patch page shows
        reg.push(models.finetune, "xss/patch:v1", base=models.base, base_name="tiny-bert", message=XSS,
                 metadata={"note": XSS, "<key>": "</pre><b>bold</b>"})
    return {"root": root, "merged": merged.digest, "failed": failed.digest, "port": port,
            "merged_verdict": merged.validation["verdict"], "failed_verdict": failed.validation["verdict"]}


@contextlib.contextmanager
def serving(root: Path, *extra: str) -> Iterator[str]:
    with server_process.serving(root, *extra, timeout=60) as (url, _):
        yield url


@pytest.fixture(scope="module")
def served(demo_registry) -> Iterator[str]:
    with serving(demo_registry["root"]) as url:
        yield url


@pytest.fixture(scope="module")
def client(demo_registry) -> TestClient:
    return TestClient(create_app(demo_registry["root"]))


# ------------------------------------------------------------------------- pages and JSON twins (no browser)
def test_browser_pages_answer_html_with_a_strict_csp(client):
    for path in ("/", "/patches/team/merged:v1", "/validations/team/merged:v1",
                 "/compare?a=team/animals:v1&b=team/merged:v1"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:300])
        assert r.headers["content-type"].startswith("text/html")
        assert r.headers["content-security-policy"] == CSP
        assert "'unsafe-inline'" not in CSP and "default-src 'none'" in CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in r.text  # only <script src=/static/...>
        assert re.search(r"<script\b(?![^>]*\bsrc=)", r.text) is None  # no inline script
        assert " style=" not in r.text  # no inline style (CSP style-src 'self')
        twin = re.search(r'href="([^"]+)" class="json-link"', r.text).group(1).replace("&amp;", "&")
        assert twin.startswith("/api/pages/") and client.get(twin).json() is not None
        assert client.get(twin).status_code == 200, twin


def test_browser_index_json_twin_filters_sorts_and_pages(client, demo_registry):
    doc = client.get("/api/pages/index").json()
    refs = [p["ref"] for p in doc["patches"]]
    assert refs == sorted(refs)
    assert {"team/lora:v1", "team/animals:v1", "team/merged:v1", "team/animals:v1-d10",
            "team/animals:v1-ported"} <= set(refs)
    assert "team/strict:v1" not in refs  # a failed merge moves no ref
    assert not any(r.startswith("evals/") for r in refs)  # suites only with ?suites=1 or kind=suite
    by = {p["ref"]: p for p in doc["patches"]}
    assert by["team/merged:v1"]["verdict"] == demo_registry["merged_verdict"] == "pass"
    assert by["team/lora:v1"]["kind"] == "lora" and by["team/animals:v1-d10"]["kind"] == "sparse"
    assert by["team/animals:v1"]["dense_fp16_bytes"] > by["team/animals:v1-d10"]["stored_bytes"]
    def refs_of(query: str) -> list[str]:
        return [p["ref"] for p in client.get("/api/pages/index?" + query).json()["patches"]]

    assert refs_of("kind=sparse") == [r for r in refs if by[r]["kind"] == "sparse"]
    assert "team/animals:v1-d10" in refs_of("kind=sparse") and "team/lora:v1" not in refs_of("kind=sparse")
    assert refs_of("verdict=pass") == [r for r in refs if by[r]["digest"] in (demo_registry["merged"],
                                                                              demo_registry["port"].digest)]
    assert refs_of("q=ANIMALS") == [r for r in refs if "animals" in r]
    assert refs_of("kind=suite") == ["evals/animals:latest", "evals/animals:v1", "evals/tools:latest", "evals/tools:v1"]
    big = client.get("/api/pages/index?sort=stored&order=desc").json()["patches"]
    assert [p["stored_bytes"] for p in big] == sorted((p["stored_bytes"] for p in big), reverse=True)
    p1 = client.get("/api/pages/index?per_page=2&page=1").json()
    p2 = client.get("/api/pages/index?per_page=2&page=2").json()
    assert p1["pages"] == p2["pages"] == -(-doc["total"] // 2)
    assert [p["ref"] for p in p1["patches"] + p2["patches"]] == refs[:4]
    html = client.get("/?per_page=2").text
    assert 'rel="next" href="/?per_page=2&amp;page=2"' in html


def test_browser_patch_twin_has_lineage_recipe_tensors_and_history(client, demo_registry):
    doc = client.get("/api/pages/patches/team/merged:v1").json()
    assert doc["digest"] == demo_registry["merged"]
    assert [p["label"] for p in doc["lineage"]["parents"]] == ["team/animals:v1", "team/tools:v1"]
    assert all(p["edge"].startswith("merge ties") for p in doc["lineage"]["parents"])
    assert doc["recipe"]["command"].startswith("patchctl merge team/animals:v1 team/tools:v1 --method ties")
    assert doc["message"] == "TIES merge, λ chosen on validation"
    assert doc["history"][-1]["new"] == doc["digest"]
    assert doc["per_layer_metric"] == "relative"  # the base folder is known: ‖Δ‖/‖W_base‖
    assert [p["layer"] for p in doc["per_layer"]] == ["layer.0", "layer.1", "other"]
    assert len(doc["tensors"]) == client.get("/api/patches/team/merged/v1").json()["tensors"].__len__()
    parent = client.get("/api/pages/patches/team/animals:v1").json()
    kids = {c["digest"]: c for c in parent["lineage"]["children"]}
    assert demo_registry["merged"] in kids and demo_registry["failed"] in kids
    assert kids[demo_registry["failed"]]["href"] == "/patches/" + demo_registry["failed"]  # untagged: by digest
    assert any(c["edge"].startswith("compress ternary d=0.1") for c in kids.values())
    assert any(c["edge"].startswith("port λ=1") for c in kids.values())
    diag = doc["diagnostics"]  # patchctl inspect ran on it
    assert list(diag["layers"]) == [p["layer"] for p in doc["per_layer"]] and diag["summary"]["tensors"] == len(doc["tensors"])
    for p in doc["per_layer"]:  # the page's chart agrees with patchctl inspect's numbers
        assert p["relative"] == pytest.approx(diag["layers"][p["layer"]]["rel_norm"], rel=1e-5)
        assert p["delta_norm"] == pytest.approx(diag["layers"][p["layer"]]["norm"], rel=1e-5)
    html = client.get("/patches/team/merged:v1").text
    assert html.count("<tr>", html.index('id="diagnostics-table"')) >= len(diag["layers"]) + 1
    assert client.get("/api/pages/patches/team/lora:v1").json()["diagnostics"] is None
    assert client.get("/api/pages/patches/team/animals:v1-ported").json()["port_diagnostics"]
    failed = client.get("/api/pages/patches/" + demo_registry["failed"]).json()
    assert failed["verdict"] == "fail" and failed["refs"] == []


def test_browser_validations_twin_has_rows_chart_and_search(client):
    doc = client.get("/api/pages/validations/team/merged:v1").json()
    rec = next(r for r in doc["records"] if r["type"] == "merge-validation")
    assert rec["verdict"] == "pass" and {r["suite_label"] for r in rec["rows"]} == {"evals/animals:v1", "evals/tools:v1"}
    for r in rec["rows"]:
        assert r["normalized"] == pytest.approx(r["merged"] / r["alone"])
    assert rec["search"] and rec["search"][0]["coefficient"] == "lambda"
    assert rec["search"][0]["chosen"] in [p["value"] for p in rec["search"][0]["points"]]


def test_browser_port_and_compress_pages(client):
    doc = client.get("/api/pages/validations/team/animals:v1-ported").json()
    rec = next(r for r in doc["records"] if r["type"] == "port-validation")
    assert rec["chart"]["series"] == ["old_base", "old_patched", "new_base", "new_ported"]
    assert [r["suite_label"] for r in rec["rows"]] == ["evals/animals:v1"]
    html = client.get("/validations/team/animals:v1-ported").text
    assert html.count('data-series="new_ported"') == len(rec["rows"])
    sparse = client.get("/api/pages/patches/team/animals:v1-d10").json()
    assert sparse["kind"] == "sparse" and all(0 <= p["density"] <= 1 for p in sparse["per_layer"])
    numel = [math.prod(t["shape"]) for t in sparse["tensors"]]
    kept = sum(t["density"] * n for t, n in zip(sparse["tensors"], numel, strict=True)) / sum(numel)
    assert kept == pytest.approx(0.1, abs=0.01)  # global top-10 % (ComPEFT)
    assert sparse["recipe"]["command"].startswith("patchctl compress team/animals:v1 --density 0.1 --mode ternary")
    page = client.get("/patches/team/animals:v1-d10").text
    assert page.count('class="bar density"') == len(sparse["per_layer"])


def test_browser_charts_marks_are_the_data():
    from patchctl.server import charts

    svg = str(charts.bars([("a", 2.0), ("b", 4.0), ("<c>", float("nan"))], y_label="y", title="t"))
    heights = [float(h) for h in re.findall(r'<rect class="bar"[^>]* height="([0-9.]+)"', svg)]
    assert heights == [80.0, 160.0, 0.0]  # plot height 160 at the top value 4
    assert 'data-label="&lt;c&gt;"' in svg and "<c>" not in svg
    line = str(charts.curve([(0.5, 0.8), (0.1, 0.2), (1.0, 0.4)], 0.5, x_label="λ", y_label="s", title="t"))
    assert re.findall(r'data-x="([0-9.]+)"', line) == ["0.1", "0.5", "1.0"]
    assert len(re.findall(r'class="point chosen"', line)) == 1


def test_browser_without_a_known_base_charts_absolute_norms(tmp_path):
    import numpy as np

    from patchctl.registry.store.manifest import Manifest, TensorEntry

    with Registry(tmp_path / "reg") as reg:
        entries = {}
        for i, v in enumerate((3.0, 4.0)):
            data = np.full(4, v, dtype="float32").tobytes()  # ‖t‖ = 2v
            entries[f"h.{i}.w"] = TensorEntry(reg.store.put_blob(data), "float32", (4,), "raw", len(data))
        reg.commit(Manifest("diff", {"fingerprint": "sha256:" + "0" * 64, "name": "x", "revision": None}, entries),
                   "p:v1", move_latest=False)
    doc = TestClient(create_app(tmp_path / "reg")).get("/api/pages/patches/p:v1").json()
    assert doc["per_layer_metric"] == "delta_norm" and not doc["base"]["known_locally"]
    assert [(p["layer"], p["delta_norm"], p["relative"]) for p in doc["per_layer"]] == [
        ("layer.0", 6.0, None), ("layer.1", 8.0, None)]


def test_browser_compare_twin_relative_change_and_cosine(client):
    doc = client.get("/api/pages/compare?a=team/animals:v1&b=team/animals:v1").json()
    assert doc["tensors"] and all(t["relative_change"] == 0 for t in doc["tensors"])
    assert all(t["cosine"] == pytest.approx(1.0) or t["cosine"] is None for t in doc["tensors"])
    doc = client.get("/api/pages/compare?a=team/animals:v1&b=team/lora:v1").json()
    assert doc["only_in_a"] and not doc["only_in_b"]  # the LoRA touches query/value only
    assert {t["tensor"] for t in doc["tensors"]} <= {t for t in doc["only_in_a"]} | {t["tensor"] for t in doc["tensors"]}
    r = client.get("/api/pages/compare?a=team/animals:v1&b=team/animals:v1-ported")
    assert r.status_code == 400 and "different bases" in r.json()["errors"][0]["message"]


def test_browser_errors_and_bad_input(client):
    assert client.get("/patches/nobody:v1").status_code == 404
    assert "no patch named nobody:v1" in client.get("/patches/nobody:v1").text
    assert client.get("/api/pages/patches/nobody:v1").json()["errors"][0]["code"]
    assert client.get("/?sort=evil").status_code == 400
    assert client.get("/?page=0").status_code == 400
    assert client.get("/bases/nope").status_code == 400
    assert client.get("/compare?a=team/lora:v1").status_code == 400


def test_browser_escapes_user_input_in_html(client):
    html = client.get("/patches/xss/patch:v1").text
    assert "<script>alert(1)</script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "«ünïcødé» ☃" in html
    assert "</pre><b>" not in html


def test_browser_token_cookie_and_401_on_real_process(demo_registry, tmp_path):
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    with serving(demo_registry["root"], "--token-file", str(tf)) as url:
        for path in ("/", "/patches/team/merged:v1", "/api/pages/index", "/static/browser.css"):
            assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + "/?token=wrong").status_code == 401
        r = httpx.get(url + "/?kind=diff&token=" + TOKEN)
        assert r.status_code == 303 and r.headers["location"] == "/?kind=diff"
        cookie = r.headers["set-cookie"]
        assert cookie == f"patchctl_token={TOKEN}; HttpOnly; SameSite=Strict; Path=/"
        assert httpx.get(url + "/", cookies={"patchctl_token": TOKEN}).status_code == 200
        assert httpx.get(url + "/", cookies={"patchctl_token": "nope"}).status_code == 401
        ok = httpx.get(url + "/api/pages/index", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["total"] > 0
        # the API behind the same wrapper: the header as before, the cookie too, /api/health still open
        assert httpx.get(url + "/v2/_catalog", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert httpx.get(url + "/v2/_catalog", cookies={"patchctl_token": TOKEN}).status_code == 200
        assert httpx.get(url + "/v2/_catalog").status_code == 401
        assert httpx.get(url + "/api/health").status_code == 200


def test_browser_json_twins_on_real_process(served):
    r = httpx.get(served + "/api/pages/patches/team/lora:v1")
    assert r.status_code == 200 and r.json()["kind"] == "lora"
    assert "total;dur=" in r.headers["server-timing"]
    assert httpx.get(served + "/patches/team/lora:v1").headers["content-security-policy"] == CSP


# --------------------------------------------------------------------------------------- real Chromium
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium not found: apt-get install chromium chromium-driver (scripts/setup.sh does, as root)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    OUTPUT.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, name: str) -> None:
    driver.save_screenshot(str(OUTPUT / f"browser-{name}.png"))


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _bars(driver, css: str = "#per-layer svg.chart rect.bar") -> list[tuple[str, float, float, float]]:
    """(label, data-value, height, chart top) of each bar."""
    from selenium.webdriver.common.by import By

    out = []
    for el in driver.find_elements(By.CSS_SELECTOR, css):
        svg = el.find_element(By.XPATH, "./ancestor::*[local-name()='svg']")
        out.append((el.get_attribute("data-label"), float(el.get_attribute("data-value")),
                    float(el.get_attribute("height")), float(svg.get_attribute("data-top"))))
    return out


@needs_chromium
def test_browser_flow_in_chromium(browser, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 20)
    d.get(served + "/")
    wait.until(ec.presence_of_element_located((By.ID, "patches")))
    _shot(d, "index")
    twin = httpx.get(served + "/api/pages/index").json()
    shown = [a.text for a in d.find_elements(By.CSS_SELECTOR, "#patches a.ref")]
    assert shown == [p["ref"] for p in twin["patches"]]
    assert d.find_element(By.ID, "count").text.startswith(f"{twin['total']} patch versions")

    # filter by text (JS off or on, the form submits as GET)
    box = d.find_element(By.NAME, "q")
    box.clear()
    box.send_keys("merged")
    d.find_element(By.ID, "apply-filters").click()
    wait.until(ec.url_contains("q=merged"))
    assert [a.text for a in d.find_elements(By.CSS_SELECTOR, "#patches a.ref")] == ["team/merged:latest", "team/merged:v1"]
    _shot(d, "index-filtered")

    # click through to the merge
    d.find_element(By.LINK_TEXT, "team/merged:v1").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "title"), "team/merged:v1"))
    _shot(d, "patch")
    doc = httpx.get(served + "/api/pages/patches/team/merged:v1").json()
    assert d.find_element(By.ID, "message").text == doc["message"]
    assert len(d.find_elements(By.CSS_SELECTOR, "#tensor-table tbody tr")) == len(doc["tensors"])
    # the SVG chart's marks are the data: one bar per layer, value and height from the twin
    bars = _bars(d)
    assert [b[0] for b in bars] == [p["layer"] for p in doc["per_layer"]]
    for (_, value, height, top), p in zip(bars, doc["per_layer"], strict=True):
        assert value == pytest.approx(p["relative"], rel=1e-12)
        assert height == pytest.approx(160 * value / top, abs=0.01)  # plot height 220 - 14 - 46
    edge_labels = [e.text for e in d.find_elements(By.CSS_SELECTOR, "svg.lineage .edge-label")]
    assert len(edge_labels) == 2 and all(t.startswith("merge ties") for t in edge_labels)

    # follow the lineage graph (the SVG node link) to a parent, and back through its children
    d.find_element(By.CSS_SELECTOR, "svg.lineage a.node-link.parent").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "title"), "team/animals:v1"))
    _shot(d, "parent")
    kids = {a.text: a.get_attribute("href") for a in d.find_elements(By.CSS_SELECTOR, "#children a.child")}
    assert "team/merged:v1" in kids and "team/animals:v1-d10" in kids
    d.find_element(By.CSS_SELECTOR, "#children a.child[href='/patches/team/merged:v1']").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "title"), "team/merged:v1"))

    # validations: table, bar chart and search curve
    d.find_element(By.ID, "validations-link").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "title"), "Validations of"))
    _shot(d, "validations")
    vdoc = httpx.get(served + "/api/pages/validations/team/merged:v1").json()
    rec = next(r for r in vdoc["records"] if r["type"] == "merge-validation")
    assert d.find_element(By.ID, "verdict").text == "pass"
    marks = [(b.get_attribute("data-label"), b.get_attribute("data-series"), float(b.get_attribute("data-value")))
             for b in d.find_elements(By.CSS_SELECTOR, "section[data-type='merge-validation'] svg.chart rect.bar:not(.legend)")]
    want = [(label, s, v) for label, row in rec["chart"]["groups"] for s, v in row if v is not None]
    assert marks == [(label, s, pytest.approx(v, rel=1e-12)) for label, s, v in want]
    chosen = d.find_elements(By.CSS_SELECTOR, "circle.point.chosen")
    assert [float(c.get_attribute("data-x")) for c in chosen] == [c["chosen"] for c in rec["search"]]
    pts = d.find_elements(By.CSS_SELECTOR, "section[data-type='merge-validation'] circle.point")
    assert len(pts) == sum(len(c["points"]) for c in rec["search"])

    # compare with the first parent
    d.back()
    wait.until(ec.text_to_be_present_in_element((By.ID, "title"), "team/merged:v1"))
    d.find_element(By.ID, "compare-parent").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "title"), "Compare"))
    _shot(d, "compare")
    cdoc = httpx.get(served + "/api/pages/compare?a=team/animals:v1&b=team/merged:v1").json()
    assert len(d.find_elements(By.CSS_SELECTOR, "#compare-table tbody tr")) == len(cdoc["tensors"])
    rel = [float(b.get_attribute("data-value")) for b in d.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar")]
    assert rel == pytest.approx([t["relative_change"] for t in cdoc["tensors"] if t["relative_change"] is not None])

    # base page
    d.get(served + "/patches/team/lora:v1")
    d.find_element(By.ID, "base-link").click()
    wait.until(ec.presence_of_element_located((By.ID, "base-patches")))
    _shot(d, "base")
    assert "team/lora:v1" in [a.text for a in d.find_elements(By.CSS_SELECTOR, "#base-patches a.ref")]
    assert _errors(d) == []


@needs_chromium
def test_browser_script_in_message_renders_as_text(browser, served):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    d = browser
    d.get(served + "/patches/xss/patch:v1")
    _shot(d, "xss")
    with pytest.raises(NoAlertPresentException):
        d.switch_to.alert.text  # noqa: B018
    assert d.find_element(By.ID, "message").text == XSS
    assert XSS.replace("\n", " ") in d.find_element(By.ID, "metadata-json").text.replace("\\\"", '"')
    assert d.find_elements(By.CSS_SELECTOR, "main script, main img, #metadata b") == []
    assert d.execute_script("return window.__xss === undefined") is True
    assert _errors(d) == []


@needs_chromium
def test_browser_token_flow_in_chromium(browser, demo_registry, tmp_path):
    from selenium.webdriver.common.by import By

    tf = tmp_path / "token"
    tf.write_text(TOKEN)
    d = browser
    with serving(demo_registry["root"], "--token-file", str(tf)) as url:
        d.get(url + "/")
        assert "UNAUTHORIZED" in d.find_element(By.TAG_NAME, "body").text
        d.get(url + "/?token=" + TOKEN)
        assert d.current_url == url + "/"  # the token left the address bar
        assert d.find_element(By.ID, "patches")
        d.find_element(By.LINK_TEXT, "team/merged:v1").click()
        assert d.find_element(By.ID, "title").text == "team/merged:v1"
        assert d.execute_script("return document.cookie") == ""  # HttpOnly: no script sees the token
        _shot(d, "token")
    d.get("about:blank")
    d.get_log("browser")  # the 401 above logs a console error by design; drop it


def test_serve_open_prints_the_browser_url_and_opens_it(demo_registry, tmp_path):
    import os
    import subprocess
    import sys
    import time

    opened = tmp_path / "opened"
    # webbrowser runs $BROWSER with the URL: here a command that records it instead of a browser
    env = {**os.environ, "BROWSER": f"{sys.executable} -c \"import sys; open({str(opened)!r}, 'w').write(sys.argv[1])\" %s"}
    p = subprocess.Popen([sys.executable, "-m", "patchctl", "serve", "--port", "0", "--open",
                          "--registry", str(demo_registry["root"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        line = p.stdout.readline() if p.stdout else ""
        m = re.fullmatch(r"registry browser: (http://127\.0\.0\.1:(\d+)/)\n", line)
        assert m, line
        deadline = time.monotonic() + 30
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert opened.read_text() == m.group(1)
        assert "team/merged:v1" in httpx.get(m.group(1), timeout=10).text
    finally:
        p.terminate()
        p.communicate(timeout=10)
