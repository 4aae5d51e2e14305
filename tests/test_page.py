"""The web page in a real headless browser (Debian's chromium driven by Selenium) against a real server on loopback
with the real model: sign in, add images by drop and by file picker, relabel, train, try an image, search by
clicking, label the suggestions and fix a flagged label. Each step leaves a screenshot in the test's temp dir;
the store is asked after each step whether the page really did it.

``make install-test`` installs chromium and chromium-driver where they are missing.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests
from conftest import http_door, running_server
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait


TOKEN = "page-test-token"
WAIT = 60  # seconds for one step (training and its learning curve are the slowest, a few seconds)


@pytest.fixture(scope="module")
def http(embedder, tmp_path_factory):
    with running_server(embedder, token=TOKEN, data_dir=tmp_path_factory.mktemp("page-data")) as server:
        with http_door(server) as door:
            yield door


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "the page test needs Debian's chromium and chromium-driver: run `make install-test`"
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1366,850"):  # a laptop screen
        options.add_argument(arg)
    with webdriver.Chrome(service=ChromeService(driver), options=options) as b:
        yield b


class Page:
    """The browser on the page, with a screenshot per step into ``shots``."""

    def __init__(self, browser: webdriver.Chrome, url: str, shots: Path) -> None:
        self.b, self.url, self.shots, self.step = browser, url, shots, 0
        # the page re-renders what it shows after each change: an element found a moment ago may be gone
        self.wait = WebDriverWait(browser, WAIT, ignored_exceptions=(StaleElementReferenceException,))
        shots.mkdir(exist_ok=True)

    def open(self) -> None:
        self.b.get(self.url + "/")
        self.b.execute_script("sessionStorage.clear()")
        self.b.get(self.url + "/")

    def shot(self, name: str) -> Path:
        self.step += 1
        path = self.shots / f"{self.step:02d}-{name}.png"
        assert self.b.save_screenshot(str(path))
        return path

    def find(self, css: str) -> WebElement:
        return self.b.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return self.b.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.find(css).text

    def until(self, condition, what: str) -> None:
        """Wait for ``condition``; on a timeout, fail naming ``what`` with the banner's text and a screenshot."""
        try:
            self.wait.until(lambda _: condition())
        except TimeoutException:
            banner = self.text("#banner-text") if self.find("#banner").is_displayed() else "(no error shown)"
            pytest.fail(f"waited {WAIT}s for {what}; banner: {banner}; screenshot {self.shot('timed-out')}")

    def sign_in(self, token: str) -> None:
        self.find("#token").send_keys(token)
        self.find("#sign-in").click()

    def tab(self, name: str) -> None:
        self.find(f'#tabs [data-tab="{name}"]').click()

    def tile(self, item_id: str, where: str = "#grid") -> WebElement:
        return self.find(f'{where} .tile[data-id="{item_id}"]')

    def thumbnails(self, where: str) -> int:
        return len(self.all(f"{where} img[src^='blob:']"))

    def drop(self, zone: str, paths: list[Path]) -> None:
        """Drop files on ``zone`` as a drag from the desktop does (a file input lends the browser the files)."""
        lender = self.b.execute_script("const i = document.createElement('input'); i.type = 'file'; "
                                       "i.multiple = true; document.body.append(i); return i;")
        lender.send_keys("\n".join(map(str, paths)))
        self.b.execute_script("""const [zone, lender] = arguments, files = new DataTransfer();
            for (const f of lender.files) files.items.add(f);
            zone.dispatchEvent(new DragEvent('drop', {dataTransfer: files, bubbles: true, cancelable: true}));
            lender.remove();""", self.find(zone), lender)

    def add(self, paths: list[Path], label: str, *, drop: bool) -> None:
        self.tab("add")
        field = self.find("#add-label")
        field.clear()
        field.send_keys(label)
        if drop:
            self.drop("#drop", paths)
        else:
            self.find("#files").send_keys("\n".join(map(str, paths)))
        done = f"of {len(paths)} files"
        self.until(lambda: self.text("#add-status").endswith(done)
                   and self.find("#add-progress").get_attribute("value") == str(len(paths)), "the upload ends")


class Store:
    """The server's answer: what the page really did."""

    def __init__(self, url: str) -> None:
        self.url, self.headers = url, {"Authorization": f"Bearer {TOKEN}"}

    def labels(self, collection: str) -> dict[str, str | None]:
        r = requests.get(f"{self.url}/v1/collections/{collection}/items", params={"limit": 1000},
                         headers=self.headers, timeout=60)
        assert r.status_code == 200, r.text
        return {i["id"]: i["label"] for i in r.json()["items"]}


@pytest.fixture(scope="module")
def files(digit_images, tmp_path_factory) -> dict[str, list[Path]]:
    """15 zeros and 15 ones to label, 10 sevens without a label, a zero kept back to try, and a text file."""
    images, labels = digit_images
    folder = tmp_path_factory.mktemp("page-files")
    out: dict[str, list[Path]] = {"0": [], "1": [], "7": []}
    for data, label in zip(images, labels):
        path = folder / f"d{label}-{len(out[label]):02d}.jpg"
        path.write_bytes(data)
        out[label].append(path)
    (folder / "notes.txt").write_text("not an image")
    return {"zero": out["0"][:15], "one": out["1"][:15], "none": out["7"][:10], "try": out["0"][15:16],
            "text": [folder / "notes.txt"]}


def test_a_bad_token_shows_a_clear_message_and_is_not_kept(browser, http, tmp_path):
    page = Page(browser, http.url, tmp_path / "shots")
    page.open()
    page.until(lambda: page.find("#banner").is_displayed(), "the page asks to sign in")
    assert "Sign in: enter the server's token" in page.text("#banner-text")
    page.sign_in("not-the-token")
    page.until(lambda: "refused the token" in page.text("#banner-text"), "the refusal is shown")
    assert "wrong token, or an unknown or revoked key" in page.text("#banner-text")
    page.shot("bad-token")
    assert browser.execute_script("return sessionStorage.length") == 0


def test_add_label_train_try_search_and_label_next_in_the_page(browser, http, files, tmp_path):
    page, store = Page(browser, http.url, tmp_path / "shots"), Store(http.url)
    page.open()
    page.sign_in(TOKEN)
    page.until(lambda: "Signed in" in page.text("#signed"), "signed in")
    assert browser.execute_script("return Object.keys(sessionStorage)") == ["embedder.token"]

    page.find("#new-name").send_keys("digits")
    page.find("#create button").click()
    page.until(lambda: page.text("#title").startswith("digits"), "the new collection is chosen")

    # 1. add: zeros dropped, ones and the unlabelled sevens (with a text file among them) by the file picker
    page.add(files["zero"], "zero", drop=True)
    page.add(files["one"], "one", drop=False)
    page.add(files["none"] + files["text"], "", drop=False)
    assert page.text("#add-status") == "10 added, 1 failed, of 11 files"
    errors = page.text("#add-errors")
    assert "notes.txt" in errors and "not a recognised image format" in errors
    page.shot("added")
    labels = store.labels("digits")
    assert len(labels) == 40 and "notes.txt" not in labels
    assert sorted(v or "" for v in labels.values()) == [""] * 10 + ["one"] * 15 + ["zero"] * 15

    # 2. the grid: thumbnails from the kept images; relabel two zeros as "one" by keyboard (class 1 is "one")
    page.tab("items")
    page.until(lambda: page.thumbnails("#grid") == 40, "40 thumbnails")
    assert page.text("#range") == "1–40 of 40"
    page.tile("d0-00.jpg").click()
    page.tile("d0-01.jpg").click()
    assert page.text("#selection").startswith("2 selected")
    page.find("body").send_keys("1")
    page.until(lambda: "one" in page.tile("d0-01.jpg").text, "the relabelled tiles")
    page.shot("relabelled")
    labels = store.labels("digits")
    assert labels["d0-00.jpg"] == labels["d0-01.jpg"] == "one"
    Select(page.find("#filter")).select_by_value("unlabelled")
    page.until(lambda: page.text("#range") == "1–10 of 10", "the unlabelled filter")
    Select(page.find("#filter")).select_by_value("all")
    Select(page.find("#page-size")).select_by_visible_text("24")
    page.until(lambda: page.text("#range") == "1–24 of 40" and page.thumbnails("#grid") == 24, "pages of 24")
    page.find("body").send_keys(Keys.ARROW_RIGHT)
    page.until(lambda: page.text("#range") == "25–40 of 40", "the next page by key")
    assert page.find("#page-no").get_attribute("value") == "2" and page.text("#pages") == "of 2"
    page.find("#where").send_keys("exists(camera)" + Keys.ENTER)  # a metadata filter: no item has a camera
    page.until(lambda: page.text("#range") == "no items", "the metadata filter")
    page.find("#where").send_keys(Keys.CONTROL, "a", Keys.DELETE, Keys.ENTER)
    page.until(lambda: page.text("#range") == "1–24 of 40", "the filter cleared")

    # 3. train: hold-out metrics, per-class table, confusion matrix and learning curve drawn in the page
    page.tab("train")
    page.find("#train").click()
    page.until(lambda: page.all("#curve"), "the learning curve")
    assert page.text("#accuracy").startswith("Accuracy ")
    assert [r.text.split()[0] for r in page.all("#per-class tr")[1:]] == ["one", "zero"]
    assert len(page.all("#confusion td")) == 2 * 3
    assert len(page.all("#curve circle")) >= 2
    page.shot("trained")

    # 4. try it: drop a zero the collection does not hold; the head's top labels and its nearest stored images
    page.tab("try")
    page.drop("#try-drop", files["try"])
    page.until(lambda: page.all("#try-heads .prediction") and page.thumbnails("#try-hits") == 12, "the answers")
    top = page.find("#try-heads .prediction div strong").text
    assert top == "zero", page.text("#try-heads")
    neighbour = page.all("#try-hits .tile")[0].get_attribute("data-id")
    page.shot("tried")

    # 5. click a neighbour: the grid shows what is similar to it
    page.all("#try-hits .tile")[0].click()
    page.until(lambda: Select(page.find("#filter")).first_selected_option.text == f"search hits ({neighbour})",
               "the search by a click")
    page.until(lambda: page.thumbnails("#grid") == 24, "the hits' thumbnails")
    assert neighbour not in [t.get_attribute("data-id") for t in page.all("#grid .tile")]  # itself left out
    page.shot("searched")

    # 6. label next: a suggestion, labelled by clicking its class
    page.tab("next")
    page.find("#suggest").click()
    page.until(lambda: page.thumbnails("#next-current") == 1, "a suggestion")
    suggested = page.find("#next-current .tile").get_attribute("data-id")
    assert store.labels("digits")[suggested] is None
    page.shot("label-next")
    next(b for b in page.all("#next-current .classes button") if b.text.endswith("zero")).click()
    page.until(lambda: f"labelled {suggested} as zero" in page.text("#next-status"), "the label taken")
    page.until(lambda: page.find("#next-current .tile").get_attribute("data-id") != suggested, "the next one")
    assert store.labels("digits")[suggested] == "zero"

    # 7. check labels: the two zeros labelled "one" are flagged; the fix is one click
    page.tab("issues")
    page.find("#check").click()
    page.until(lambda: "flagged" in page.text("#issues-status"), "the check")
    flagged = {r.find_elements(By.TAG_NAME, "td")[1].text: r for r in page.all("#issues tr")[1:]}
    assert {"d0-00.jpg", "d0-01.jpg"} <= set(flagged), page.text("#issues")
    flagged["d0-00.jpg"].find_element(By.CSS_SELECTOR, "button.fix").click()
    page.until(lambda: "relabelled zero" in flagged["d0-00.jpg"].text, "the fix")
    page.shot("checked")
    assert store.labels("digits")["d0-00.jpg"] == "zero"
    # no script error, nothing the content security policy refused
    assert not [e for e in browser.get_log("browser") if e["source"] in ("javascript", "security")]
