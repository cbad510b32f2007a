"""The BentoML service (services/service.py) served by `bentoml serve` on a free loopback port: /check,
/check_batch, /explain, /score, every 4xx path of bad input, the API key, health and OpenAPI, and the
web page driven in headless Chromium (what a person sees: the flagged word and its suggestion)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.conftest import serve_agreelens
from tests.models import tiny_service_project

httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")

KEY = "s3cret-key"
TEXT = "The boy likes the girl. The girls like the dog."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proj = tmp_path_factory.mktemp("service")
    tiny_service_project(proj)
    # the model named by the environment is a registry URI, but the project has no registry: the service
    # says so and serves service.fallback (tiny)
    with serve_agreelens(proj, "models:/agreelens-tiny@champion", api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server["url"], headers={"X-API-Key": KEY}, timeout=30) as c:
        yield c


def test_check_flags_the_word_and_suggests_the_other_form(client, server):
    r = client.post("/check", json={"text": TEXT})
    assert r.status_code == 200
    out = r.json()
    assert out["model"] == "tiny" and out["threshold"] == 0.0 and out["n_sites"] == 2 and out["n_errors"] == 1
    s0, s1 = out["sentences"]
    (a,) = s0["sites"]
    assert (a["word"], a["verdict"], a["suggestion"], a["kind"]) == ("likes", "error", "like", "verb")
    assert a["margin"] == pytest.approx(-4.0, abs=1e-3)
    assert a["confidence"] == pytest.approx(1 / (1 + math.exp(-abs(a["margin"]))), abs=1e-3)  # sigmoid(scale 1 x |margin - 0|)
    assert s0["text"][a["span"][0]:a["span"][1]] == "likes"
    (b,) = s1["sites"]
    assert (b["word"], b["verdict"], b["suggestion"]) == ("like", "ok", None)
    with_units = client.post("/check", json={"text": TEXT, "activations": True}).json()
    act = with_units["sentences"][0]["activations"]
    assert act["units"] == [1, 9] and len(act["c"][0]) == len(with_units["sentences"][0]["tokens"])
    log = server["log"].read_text()
    assert "no MLflow registry for models:/agreelens-tiny@champion" in log and "falling back to tiny" in log
    assert not (Path(server["project"]) / "mlflow.db").exists()


def test_batch_explain_score(client):
    r = client.post("/check_batch", json={"texts": [TEXT, "   ", "The boys likes it."]})
    assert r.status_code == 200
    a, b, c = r.json()
    assert a["n_errors"] == 1 and b == {"error": "text is empty", "status": 400} and c["n_errors"] == 1
    e = client.post("/explain", json={"text": TEXT}).json()
    assert e["site"]["word"] == "likes" and [u["unit"] for u in e["units"]] == [1, 9]
    assert [a["units"] for a in e["ablations"]] == [[1], [9], [1, 9]]
    assert e["readout"] is not None and len(e["readout"]["p_plural"]) == len(e["steps"])
    e1 = client.post("/explain", json={"text": TEXT, "site": 1}).json()
    assert e1["site"]["word"] == "like"
    pairs = [{"sentence_good": "the boys like the girl .", "sentence_bad": "the boys likes the girl .",
              "UID": "toy", "pairID": "0"},
             {"sentence_good": "the boy likes the girl .", "sentence_bad": "the boy like the girl .",
              "UID": "toy", "pairID": "1"}]
    s = client.post("/score", json={"pairs": pairs}).json()
    assert s["n"] == 2 and s["accuracy"] == 0.5 and s["groups"]["toy"]["n"] == 2


BIG = json.dumps({"text": "word " * 1500})
MANY = json.dumps({"text": "He runs. " * 60})
HUGE = b'{"text": "' + b"a" * 2_100_000 + b'"}'


@pytest.mark.parametrize("path, body, ctype, status, message", [
    ("/check", b'{"text": ""}', "application/json", 400, "empty"),
    ("/check", b'{"text": "  \\n\\t "}', "application/json", 400, "empty"),
    ("/check", b'{"text": 5}', "application/json", 400, "validation error"),
    ("/check", b'{"text": null}', "application/json", 400, "validation error"),
    ("/check", b'{}', "application/json", 400, "validation error"),
    ("/check", b'{"text": "bad', "application/json", 400, "not valid JSON"),
    ("/check", b'', "application/json", 400, "not valid JSON"),
    ("/check", b'["The boy likes it."]', "application/json", 400, "JSON object"),
    ("/check", b'\xff\xfe', "application/json", 400, "UTF-8"),
    ("/check", b'{"text": "bell \\u0007 here"}', "application/json", 400, "control character"),
    ("/check", b'{"text": "nul \\u0000"}', "application/json", 400, "control character"),
    ("/check", BIG.encode(), "application/json", 413, "limit is 5,000"),
    ("/check", MANY.encode(), "application/json", 413, "limit is 50"),
    ("/check", HUGE, "application/json", 413, "limit"),
    ("/check", b"The boy likes it.", "text/plain", 415, "JSON"),
    ("/explain", b'{"text": "Hello there."}', "application/json", 422, "no agreement site"),
    ("/explain", b'{"text": "The boy likes it.", "site": 5}', "application/json", 422, "out of range"),
    ("/explain", b'{"text": "The boy likes it.", "site": -1}', "application/json", 400, "validation error"),
    ("/explain", b'{"text": "The boy likes it.", "site": "x"}', "application/json", 400, "validation error"),
    ("/score", b'{"pairs": "x"}', "application/json", 400, "validation error"),
    ("/score", b'{"pairs": []}', "application/json", 400, "empty"),
    ("/score", b'{"pairs": [{"sentence_good": "a"}]}', "application/json", 400, "missing field"),
    ("/score", b'{"pairs": [{"sentence_good": "a", "sentence_bad": "b", "UID": "u", "pairID": 1}],'
               b' "method": "nope"}', "application/json", 400, "method"),
    ("/check_batch", b'{"texts": "x"}', "application/json", 400, "validation error"),
])
def test_bad_input_gives_a_clear_4xx(client, path, body, ctype, status, message):
    r = client.post(path, content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    data = r.json()
    assert isinstance(data, dict) and message in data["error"], data


def test_api_key_guards_posts_only(server):
    url = server["url"]
    assert httpx.post(url + "/check", json={"text": TEXT}).status_code == 401
    r = httpx.post(url + "/check", json={"text": TEXT}, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert httpx.post(url + "/check", json={"text": TEXT}, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.post(url + "/score", content=b"not json").status_code == 401  # the key is checked first
    for path in ("/", "/livez", "/readyz", "/docs.json"):
        assert httpx.get(url + path).status_code == 200, path


def test_health_metrics_openapi_and_page(server):
    url = server["url"]
    spec = httpx.get(url + "/docs.json").json()
    assert {"/check", "/check_batch", "/explain", "/score"} <= set(spec["paths"])
    # /score's pairs are the Pair model of the pair files: its fields are in the schema
    assert all(f in json.dumps(spec) for f in ("sentence_good", "pairID", "one_prefix_word_bad"))
    assert "bentoml_service" in httpx.get(url + "/metrics").text
    assert httpx.get(url + "/docs").status_code == 200
    page = httpx.get(url + "/")
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "<textarea" in html and 'id="check"' in html
    # self-contained: no external script, style sheet or font
    assert "http://" not in html and "https://" not in html and "<link" not in html and "src=" not in html


# ---------------------------------------------------------------------------------------- browser


def _chrome():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,1200"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_page_shows_the_flagged_word_and_suggestion_in_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chrome()
    try:
        browser.get(server["url"] + "/")
        browser.find_element(By.ID, "apikey").send_keys(KEY)
        box = browser.find_element(By.ID, "text")
        box.clear()
        box.send_keys(TEXT)
        browser.find_element(By.ID, "check").click()
        wait = WebDriverWait(browser, 30)
        flag = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".sentence .flag")))
        assert flag.text == "likes"
        assert browser.find_element(By.CSS_SELECTOR, ".sentence .sugg").text == "→ like"
        item = browser.find_element(By.CSS_SELECTOR, "li.flagged")
        assert item.text.startswith("likes → like")
        assert len(browser.find_elements(By.CSS_SELECTOR, ".flag")) == 1  # "like" in the 2nd sentence is fine
        assert "1 of 2 agreement site(s) flagged" in browser.find_element(By.ID, "summary").text
        # the number-unit strip: one row per unit, one coloured cell per token
        rows = browser.find_elements(By.CSS_SELECTOR, ".sentence:first-child table.units tr")
        assert [r.find_element(By.CSS_SELECTOR, "th").text for r in rows[1:]] == ["1 c", "9 c"]
        assert len(rows[1].find_elements(By.CSS_SELECTOR, "td.cell")) == 6
        # "why?" asks /explain and lists the ablations
        item.find_element(By.CSS_SELECTOR, "button").click()
        wait.until(lambda b: "ablate 1+9" in item.text)
        browser.save_screenshot(str(tmp_path / "page.png"))
        # a wrong key shows the server's error to the person
        browser.find_element(By.ID, "apikey").clear()
        browser.find_element(By.ID, "apikey").send_keys("wrong")
        browser.find_element(By.ID, "check").click()
        err = wait.until(ec.visibility_of_element_located((By.ID, "error")))
        assert "API key" in err.text
    finally:
        browser.quit()
