"""The web playground at `/`, end to end: real Chromium, real `hidream serve`, the demo checkpoint.

Each test signs in with its own key, works the page the way a person does (labels, buttons, files)
and checks what the page shows against what the API recorded. Runs are small (256x256, a few steps)
except the one whose progress is watched and then canceled, and the demo server's run with the page's
defaults (512x512, 50 steps). Screenshots of each mode, at desktop and phone widths, go to
test-artifacts/screenshots/.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from hidream.rules import GUIDANCE_RULE

from browser_util import DESKTOP, PHONE, Server, su

pytestmark = pytest.mark.timeout(300)

MODEL = "hidream-o1-image"
RUN_TIMEOUT = 120_000  # ms: a generous ceiling for a small run on a busy 2-core machine, not a threshold
# ms: a run with the demo model's suggested size (256x256) and the default 50 steps takes seconds here;
# one at the default size (2304x1728) takes minutes
DEMO_RUN_TIMEOUT = 60_000


# --- helpers ------------------------------------------------------------------------------------------------


def picture(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG with a gradient and some noise (something a person could recognise as their photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // (width - 1), y * 255 // (height - 1),
                    rng.integers(0, 256, (height, width))], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def sign_in(page: Page, server: Server, key: str) -> None:
    page.goto(server.url + "/")
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#key-panel")).to_be_hidden()


def small_run(page: Page, prompt: str, steps: int = 2, size: tuple[int, int] = (256, 256)) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("radio", name=re.compile("^Custom")).check()
    page.get_by_label("Width", exact=True).fill(str(size[0]))
    page.get_by_label("Height", exact=True).fill(str(size[1]))
    page.get_by_label("Steps", exact=True).fill(str(steps))


def generate(page: Page) -> None:
    page.locator("#generate").click()


def wait_result(page: Page, timeout: float = RUN_TIMEOUT) -> None:
    """Until the run ended with an image on the stage (fails at once if the run failed)."""
    done = page.locator("#result-actions:not([hidden]), #result-error:not(:empty)")
    expect(done.first).to_be_visible(timeout=timeout)
    assert page.locator("#result-error").inner_text() == "", page.locator("#result-error").inner_text()
    expect(page.locator("#result-image")).to_be_visible()
    page.wait_for_function("() => { const i = document.getElementById('result-image');"
                           " return i.complete && i.naturalWidth > 0; }")


def natural_size(page: Page) -> tuple[int, int]:
    return tuple(page.eval_on_selector("#result-image", "i => [i.naturalWidth, i.naturalHeight]"))


def resize(page: Page, size: dict[str, int]) -> None:
    """A new window size, once the page has been laid out and painted at it."""
    page.set_viewport_size(size)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def shoot(page: Page, directory: Path, name: str) -> None:
    """`name`-desktop.png and `name`-phone.png, whole page, scrolled to the top (and the desktop window)."""
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=directory / f"{name}-desktop.png", full_page=True)
    page.screenshot(path=directory / f"{name}-desktop-screen.png")  # what a 1280x900 window shows
    resize(page, PHONE)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=directory / f"{name}-phone.png", full_page=True)
    # nothing spills sideways on a phone
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{name}: the page is {overflow} px wider than a phone's screen"
    resize(page, DESKTOP)


def accessibility_problems(page: Page) -> list[str]:
    """Controls without a label, buttons and links without a name, images without alt, and ARIA
    references to ids that do not exist: what a screen reader would stumble on."""
    return page.evaluate("""() => {
        const bad = [];
        const show = (el) => el.id ? `#${el.id}` : el.outerHTML.slice(0, 100);
        for (const el of document.querySelectorAll("input, select, textarea")) {
            if (el.type === "hidden" || el.getAttribute("aria-hidden") === "true") continue;
            if (!(el.labels?.length || el.getAttribute("aria-label") || el.getAttribute("aria-labelledby"))) {
                bad.push(`no label: ${show(el)}`);
            }
        }
        for (const el of document.querySelectorAll("button, a[href]")) {
            if (!(el.textContent.trim() || el.getAttribute("aria-label") || el.getAttribute("aria-labelledby"))) {
                bad.push(`no name: ${show(el)}`);
            }
        }
        for (const img of document.querySelectorAll("img")) {
            if (!img.hasAttribute("alt")) bad.push(`no alt: ${show(img)}`);
        }
        for (const el of document.querySelectorAll("[aria-describedby], [aria-labelledby], [aria-controls]")) {
            for (const attr of ["aria-describedby", "aria-labelledby", "aria-controls"]) {
                for (const id of (el.getAttribute(attr) || "").split(/\\s+/).filter(Boolean)) {
                    if (!document.getElementById(id)) bad.push(`${attr} names no element: ${id} on ${show(el)}`);
                }
            }
        }
        return bad;
    }""")


def predictions(server: Server, key: str) -> list[dict]:
    with su.client(server.url, key) as c:
        return su.ok(c.get("/api/v1/predictions", params={"limit": 100}))["items"]


def drop_files(page: Page, selector: str, files: dict[str, bytes]) -> None:
    """Drops `files` on `selector` as a person dragging them from their file manager would."""
    payload = [[name, base64.b64encode(data).decode()] for name, data in files.items()]
    transfer = page.evaluate_handle("""files => {
        const dt = new DataTransfer();
        for (const [name, b64] of files) {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            dt.items.add(new File([bytes], name, { type: "image/png" }));
        }
        return dt;
    }""", payload)
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event(selector, event, {"dataTransfer": transfer})


# --- tests --------------------------------------------------------------------------------------------------


def test_key_then_text_to_image_download_and_reuse(page: Page, server: Server, key: str, screenshots: Path,
                                                  tmp_path: Path) -> None:
    page.goto(server.url + "/")
    expect(page.get_by_label("API key", exact=True)).to_be_focused()
    page.screenshot(path=screenshots / "key-desktop.png")

    # a wrong key: its error next to the key field, and the form stays closed
    page.get_by_label("API key", exact=True).fill("hd-not-a-key")
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#api-key-error")).to_contain_text("invalid or revoked API key")
    expect(page.get_by_label("API key", exact=True)).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#app")).to_be_hidden()

    sign_in(page, server, key)
    # every parameter's range and default come from GET /api/v1/models; price and usage are in view
    with su.client(server.url, key) as c:
        model = su.ok(c.get("/api/v1/models"))[0]
    params = model["parameters"]
    expect(page.locator("#price")).to_have_text(f"${model['price_per_image_usd']}")
    expect(page.locator("#usage")).to_have_text("0 images, $0.00")
    steps = page.get_by_label("Steps", exact=True)
    expect(steps).to_have_value(str(params["num_inference_steps"]["default"]))
    expect(steps).to_have_attribute("min", str(params["num_inference_steps"]["minimum"]))
    expect(steps).to_have_attribute("max", str(params["num_inference_steps"]["maximum"]))
    expect(page.get_by_label("Guidance", exact=True)).to_have_value(f"{params['guidance_scale']['default']:g}")
    expect(page.get_by_label("Format", exact=True)).to_have_value(params["output_format"]["default"])
    assert page.locator("#format option").all_inner_texts() == [f.upper() for f in params["output_format"]["enum"]]
    # a checkpoint given as HIDREAM_MODEL is not the demo: the contract's default size, no demo note
    assert (model["demo"], model["suggested"]) == (False, {}), model
    expect(page.locator("#demo-note")).to_be_hidden()
    expect(page.get_by_role("radio", name=re.compile("^Landscape 4:3"))).to_be_checked()
    for name in params["image_size"]["presets"]:
        expect(page.locator(f"#size-{name}")).to_have_count(1)
    expect(page.locator("#size-summary")).to_have_text("2304 × 1728 pixels, 4.0 megapixels")
    expect(page.get_by_label("Keep the reference's aspect ratio")).to_be_hidden()  # no reference in text mode

    small_run(page, "a lighthouse on a cliff at dusk")
    expect(page.locator("#size-summary")).to_have_text("256 × 256 pixels, 0.07 megapixels")
    page.get_by_label("Format", exact=True).select_option("webp")
    generate(page)
    wait_result(page)
    assert natural_size(page) == (256, 256)
    expect(page.locator("#usage")).to_have_text(f"1 image, ${model['price_per_image_usd']}")

    [pred] = predictions(server, key)
    assert pred["status"] == "completed" and pred["input"]["mode"] == "text-to-image", pred
    assert pred["input"]["output_format"] == "webp" and pred["input"]["num_inference_steps"] == 2
    expect(page.locator("#result-meta")).to_contain_text(str(pred["input"]["seed"]))

    # download: the image in the chosen format
    download_link = page.get_by_role("link", name="Download WEBP")
    with page.expect_download() as info:
        download_link.click()
    download = info.value
    assert download.suggested_filename == f"hidream-{pred['id'][:8]}.webp"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    img = Image.open(saved)
    assert img.format == "WEBP" and img.size == (256, 256)
    assert accessibility_problems(page) == []
    shoot(page, screenshots, "text-to-image")

    # seed: random by default; "reuse last" puts the seed of the last result in the field
    expect(page.get_by_label("Seed", exact=True)).to_be_disabled()
    page.get_by_role("button", name=re.compile("^Reuse last")).click()
    expect(page.get_by_label("Random")).not_to_be_checked()
    expect(page.get_by_label("Seed", exact=True)).to_have_value(str(pred["input"]["seed"]))

    # "use as reference": the result becomes the one reference of an edit, uploaded again for this key
    page.get_by_role("button", name="Use as reference").click()
    expect(page.get_by_role("radio", name="Edit")).to_be_checked()
    expect(page.locator("#refs li")).to_have_count(1)
    expect(page.locator("#refs li.ready")).to_have_count(1, timeout=30_000)
    expect(page.get_by_label("Prompt", exact=True)).to_be_focused()
    expect(page.get_by_label("Keep the reference's aspect ratio")).to_be_visible()

    # the key is kept in this browser: a reload goes straight to the form; "change key" asks again
    page.reload()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#key-panel")).to_be_hidden()
    expect(page.locator("#usage")).to_have_text(f"1 image, ${model['price_per_image_usd']}")
    page.get_by_role("button", name=re.compile("^Change key")).click()
    expect(page.get_by_label("API key", exact=True)).to_be_focused()
    page.get_by_role("button", name="Keep the current key").click()
    expect(page.locator("#key-panel")).to_be_hidden()


def test_native_size_shows_and_sends_the_size_it_makes(page: Page, server: Server, key: str) -> None:
    sign_in(page, server, key)
    native = page.get_by_label("Native size", exact=True)
    expect(native).to_be_visible()
    expect(native).not_to_be_checked()
    small_run(page, "a lighthouse", steps=1, size=(512, 224))
    expect(page.locator("#size-summary")).to_have_text("512 × 224 pixels, 0.1 megapixels")
    native.check()  # 512/224: nearest the native 3104x1312
    expect(page.locator("#size-summary")).to_have_text(
        "3104 × 1312 pixels, 4.1 megapixels (the native size nearest the one chosen)")
    page.get_by_label("Guidance", exact=True).fill("1")
    generate(page)
    wait_result(page)
    assert natural_size(page) == (3104, 1312)
    pred = predictions(server, key)[0]
    assert pred["input"]["snap_to_native"] is True and pred["input"]["image_size"] == "512x224", pred["input"]
    native.uncheck()
    expect(page.locator("#size-summary")).to_have_text("512 × 224 pixels, 0.1 megapixels")


def test_seam_smoothing_and_the_step_cache_are_one_switch_each(page: Page, server: Server, key: str) -> None:
    sign_in(page, server, key)
    seams = page.get_by_label("Smooth patch seams", exact=True)
    cache = page.get_by_label("Faster steps (step cache)", exact=True)
    expect(seams).not_to_be_checked()
    expect(cache).not_to_be_checked()
    seams.check()
    cache.check()
    small_run(page, "a lighthouse", steps=5)
    generate(page)
    wait_result(page)
    pred = predictions(server, key)[0]
    assert pred["input"]["seam_smoothing"] == {"start": 0.8, "end": 1.0, "passes": 2}, pred["input"]
    assert pred["input"]["cache"] == "fast", pred["input"]
    expect(page.locator("#result-meta")).to_contain_text("2 passes")
    expect(page.locator("#result-meta")).to_contain_text("Step cache")
    cache.uncheck()  # off is the default: nothing is sent, nothing stored
    generate(page)
    expect(page.locator("#result-meta")).not_to_contain_text("Step cache", timeout=60_000)
    wait_result(page)
    assert "cache" not in predictions(server, key)[0]["input"]


def test_refine_sends_refine_prompt_and_shows_what_was_drawn(page: Page, server: Server, key: str) -> None:
    sign_in(page, server, key)
    refine = page.get_by_label("Refine the prompt", exact=True)
    expect(refine).to_be_visible()
    refine.check()
    small_run(page, "a lighthouse", steps=1)
    generate(page)
    wait_result(page)
    expect(page.locator("#result-meta")).to_contain_text("Refined prompt")
    expect(page.locator("#result-meta")).to_contain_text("Refined: a lighthouse, in soft morning light")
    pred = predictions(server, key)[0]
    assert pred["input"]["prompt"] == "a lighthouse" and pred["input"]["refine_prompt"] is True, pred["input"]
    assert pred["input"]["refined_prompt"] == "Refined: a lighthouse, in soft morning light"
    # a refiner that fails: the image still comes, and the result says why the prompt was used as given
    page.get_by_label("Prompt", exact=True).fill("a lighthouse [500]")
    generate(page)
    expect(page.locator("#result-meta")).to_contain_text("the refiner answered HTTP 500", timeout=60_000)
    wait_result(page)
    assert "refined_prompt" not in predictions(server, key)[0]["input"]


def test_progress_previews_eta_and_cancel(page: Page, server: Server, key: str, screenshots: Path) -> None:
    sign_in(page, server, key)
    # long enough to be watched (100 steps at 1024x1024 on the CPU), then canceled
    small_run(page, "a slow one, to watch", steps=100, size=(1024, 1024))
    generate(page)
    expect(page.locator("#generate")).to_be_disabled()
    detail = page.locator("#run-detail")
    expect(detail).to_have_text(re.compile(r"^Step \d+ of 100 · (about \d+ (min \d+ )?s left|less than a second left"
                                           r"|estimating the time left)$"), timeout=RUN_TIMEOUT)
    # the stream's ETA: a figure once the server has one
    expect(detail).to_have_text(re.compile(r"(about \d+ (min \d+ )?s|less than a second) left$"), timeout=RUN_TIMEOUT)
    expect(page.locator("#run-status")).to_have_text("Generating…")
    value, maximum = page.eval_on_selector("#run-progress", "p => [p.value, p.max]")
    assert maximum == 100 and 1 <= value <= 100, (value, maximum)
    # a preview from the stream on the stage
    expect(page.locator("#stage")).to_have_class(re.compile(r"\bpreviewing\b"), timeout=RUN_TIMEOUT)
    expect(page.locator("#result-image")).to_have_attribute("src", re.compile(r"^data:image/jpeg;base64,"))
    expect(page.locator("#result-caption")).to_have_text(re.compile(r"^Preview at step \d+$"))
    page.screenshot(path=screenshots / "progress-desktop.png")
    resize(page, PHONE)
    page.locator("#run").scroll_into_view_if_needed()
    page.screenshot(path=screenshots / "progress-phone.png")
    resize(page, DESKTOP)

    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#result-error")).to_have_text("Canceled. Nothing was charged.", timeout=RUN_TIMEOUT)
    expect(page.locator("#run")).to_be_hidden()
    expect(page.locator("#generate")).to_be_enabled()
    [pred] = predictions(server, key)
    assert pred["status"] == "failed" and pred["error"] == "canceled", pred
    with su.client(server.url, key) as c:
        assert su.ok(c.get("/api/v1/usage"))["images"] == 0
    expect(page.locator("#history-list li")).to_have_count(1)
    expect(page.locator("#history-list li")).to_contain_text("canceled")


def test_edit_with_an_uploaded_reference(page: Page, server: Server, key: str, screenshots: Path,
                                         tmp_path: Path) -> None:
    sign_in(page, server, key)
    page.get_by_role("radio", name="Edit").check()
    small_run(page, "make the sky stormy")

    # no reference yet: the page says so next to the references, and nothing is sent
    generate(page)
    expect(page.locator("#refs-error")).to_have_text(
        "reference_image_urls: edit takes exactly one reference image (got 0)")
    assert predictions(server, key) == []

    photo = tmp_path / "photo.png"
    photo.write_bytes(picture(320, 240))
    page.get_by_label("Choose an image…").set_input_files(photo)
    expect(page.locator("#refs li.ready")).to_have_count(1, timeout=30_000)
    expect(page.locator("#refs img")).to_have_attribute("alt", "Reference 1: photo.png")
    expect(page.locator("#refs-error")).to_have_text("")
    # one reference: the aspect option appears; checking it hands the size over to the reference
    keep = page.get_by_label("Keep the reference's aspect ratio")
    expect(keep).to_be_visible()
    keep.check()
    expect(page.get_by_label("Width", exact=True)).to_be_disabled()
    keep.uncheck()
    expect(page.get_by_label("Width", exact=True)).to_be_enabled()

    generate(page)
    wait_result(page)
    assert natural_size(page) == (256, 256)
    [pred] = predictions(server, key)
    assert pred["input"]["mode"] == "edit" and pred["input"]["keep_original_aspect"] is False, pred["input"]
    [ref] = pred["input"]["reference_image_urls"]
    assert ref.startswith(server.url + "/files/uploads/"), ref
    assert httpx.get(ref, timeout=30).content == photo.read_bytes()  # the file as uploaded
    expect(page.locator("#result-meta")).to_contain_text("Edit")
    shoot(page, screenshots, "edit")


def test_layout_boxes_one_per_reference(page: Page, server: Server, key: str) -> None:
    sign_in(page, server, key)
    expect(page.locator("#layout-field")).to_be_hidden()  # text to image: no references, no layout
    page.get_by_role("radio", name="Personalize").check()
    drop_files(page, "#dropzone", {"a.png": picture(200, 200, seed=1), "b.png": picture(240, 160, seed=2)})
    expect(page.locator("#refs li.ready")).to_have_count(2, timeout=30_000)
    expect(page.locator("#layout-field")).to_be_visible()
    small_run(page, "the two side by side", steps=1)
    page.get_by_label("Reference 1", exact=True).fill("0, 0, 0.5, 1")
    generate(page)  # half filled: refused in the page, at the box that is missing
    expect(page.locator("#layout-error")).to_contain_text("reference 2 needs a box of four numbers")
    expect(page.get_by_label("Reference 2", exact=True)).to_be_focused()
    page.get_by_label("Reference 2", exact=True).fill("0.5, 0, 1.5, 1")
    generate(page)  # the server's rule, at its box
    expect(page.locator("#layout-error")).to_contain_text("layout_boxes[1]: must be [x1, y1, x2, y2]")
    expect(page.get_by_label("Reference 2", exact=True)).to_have_attribute("aria-invalid", "true")
    page.get_by_label("Reference 2", exact=True).fill("0.5 0 1 1")
    generate(page)
    wait_result(page)
    pred = predictions(server, key)[0]
    assert pred["input"]["layout_boxes"] == [[0, 0, 0.5, 1], [0.5, 0, 1, 1]], pred["input"]
    assert accessibility_problems(page) == []
    # reopened after a reload, the run brings its boxes back with its references
    page.reload()
    page.get_by_role("button", name="Reopen: the two side by side", exact=True).click()
    expect(page.get_by_label("Reference 1", exact=True)).to_have_value("0, 0, 0.5, 1")
    expect(page.get_by_label("Reference 2", exact=True)).to_have_value("0.5, 0, 1, 1")


def test_personalize_drop_reorder_remove(page: Page, server: Server, key: str, screenshots: Path,
                                         tmp_path: Path) -> None:
    sign_in(page, server, key)
    page.get_by_role("radio", name="Personalize").check()
    first, second, third = picture(200, 200, seed=1), picture(240, 160, seed=2), picture(160, 240, seed=3)
    drop_files(page, "#dropzone", {"first.png": first, "second.png": second})
    expect(page.locator("#refs li.ready")).to_have_count(2, timeout=30_000)
    alts = page.locator("#refs img")
    assert [a.get_attribute("alt") for a in alts.all()] == ["Reference 1: first.png", "Reference 2: second.png"]
    expect(page.get_by_label("Keep the reference's aspect ratio")).to_be_hidden()  # only with exactly one

    # reorder with the keyboard: focus stays on the moved image's button
    page.get_by_role("button", name="Move reference 1 (first.png) later").focus()
    page.keyboard.press("Enter")
    assert [a.get_attribute("alt") for a in alts.all()] == ["Reference 1: second.png", "Reference 2: first.png"]
    # it is last now: "later" is disabled, so the focus is on "earlier"
    expect(page.get_by_role("button", name="Move reference 2 (first.png) earlier")).to_be_focused()

    # a third through the file picker, then removed again
    extra = tmp_path / "third.png"
    extra.write_bytes(third)
    page.get_by_label("Choose images…").set_input_files(extra)
    expect(page.locator("#refs li.ready")).to_have_count(3, timeout=30_000)
    page.get_by_role("button", name="Remove reference 3 (third.png)").click()
    expect(page.locator("#refs li")).to_have_count(2)

    small_run(page, "the two of them having tea in a garden")
    generate(page)
    wait_result(page)
    [pred] = predictions(server, key)
    assert pred["input"]["mode"] == "personalization", pred["input"]
    got = [httpx.get(u, timeout=30).content for u in pred["input"]["reference_image_urls"]]
    assert got == [second, first]  # in the order shown
    assert accessibility_problems(page) == []
    expect(page.locator("#result-meta")).to_contain_text("Personalize")
    shoot(page, screenshots, "personalize")


def test_invalid_values_show_the_servers_error_at_their_field(page: Page, server: Server, key: str,
                                                              screenshots: Path) -> None:
    sign_in(page, server, key)
    small_run(page, "a red fox in fresh snow")
    # below the input's minimum, as a script or a pasted value can do: the server's rule, at its field
    page.eval_on_selector("#steps", "el => { el.value = '0'; }")
    generate(page)
    steps = page.get_by_label("Steps", exact=True)
    expect(page.locator("#steps-error")).to_have_text("num_inference_steps: must be an integer from 1 to 100 (got 0)")
    expect(steps).to_have_attribute("aria-invalid", "true")
    assert "steps-error" in steps.get_attribute("aria-describedby").split()
    expect(steps).to_be_focused()
    expect(page.locator("#form-error")).to_have_text("")
    expect(page.locator("#generate")).to_be_enabled()
    assert accessibility_problems(page) == []
    page.screenshot(path=screenshots / "error-desktop.png")
    # editing the field clears its error
    steps.fill("2")
    expect(page.locator("#steps-error")).to_have_text("")
    expect(steps).not_to_have_attribute("aria-invalid", "true")

    # a custom size under the smallest side (64 pixels; 32 stays 32 when rounded to a multiple of 32)
    page.get_by_label("Width", exact=True).fill("32")
    page.get_by_label("Height", exact=True).fill("32")
    generate(page)
    expect(page.locator("#size-error")).to_have_text(re.compile(r"^image_size: must be one of square_hd, "))
    expect(page.get_by_label("Width", exact=True)).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Width", exact=True)).to_be_focused()
    resize(page, PHONE)
    page.get_by_label("Width", exact=True).scroll_into_view_if_needed()
    page.screenshot(path=screenshots / "error-phone.png")
    resize(page, DESKTOP)

    # guidance above its maximum, and the prompt left empty
    page.get_by_label("Width", exact=True).fill("256")
    page.get_by_label("Height", exact=True).fill("256")
    page.eval_on_selector("#guidance", "el => { el.value = '50'; }")
    generate(page)
    expect(page.locator("#guidance-error")).to_have_text(f"guidance_scale: {GUIDANCE_RULE} (got 50)")
    page.get_by_label("Guidance", exact=True).fill("5")
    page.get_by_label("Prompt", exact=True).fill("")
    generate(page)
    expect(page.locator("#prompt-error")).to_have_text(re.compile(r"^prompt: "))
    expect(page.get_by_label("Prompt", exact=True)).to_be_focused()
    assert predictions(server, key) == []  # a rejected request leaves nothing behind


def test_runs_made_through_other_providers_apis_are_in_the_history(page: Page, server: Server, key: str) -> None:
    with su.client(server.url, key) as c:
        made = su.ok(c.post("/api/v3/wavespeed-ai/hidream-o1-image/text-to-image", json={
            "prompt": "made through wavespeed", "size": "256*256", "num_inference_steps": 1}))
        su.poll(c, f"/api/v1/model/prediction/{made['id']}")
        r = c.post("/v1/models/hidream-ai/hidream-o1-image/predictions", headers={"Prefer": "wait"},
                   json={"input": {"prompt": "made through replicate", "width": 256, "height": 256,
                                   "num_inference_steps": 1}})
        assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
    sign_in(page, server, key)
    cards = page.locator("#history-list > li")
    expect(cards.first).to_contain_text("made through replicate")
    expect(cards.nth(1)).to_contain_text("made through wavespeed")
    page.get_by_role("button", name="Reopen: made through wavespeed", exact=True).click()
    expect(page.locator("#result-meta")).to_contain_text("WaveSpeed's API")
    page.get_by_role("button", name="Reopen: made through replicate", exact=True).click()
    expect(page.locator("#result-meta")).to_contain_text("Replicate's API")


def test_history_pages_and_reopens(page: Page, server: Server, key: str, screenshots: Path) -> None:
    # 13 runs (one more than a page of the gallery), made through the API
    with su.client(server.url, key) as c:
        made = [su.ok(c.post("/api/v1/model/generateImage", json={
            "model": MODEL, "prompt": f"history run {i}", "image_size": "256x256", "num_inference_steps": 1,
            "seed": 100 + i, "output_format": "jpeg" if i == 3 else "png", "num_images": 2 if i == 3 else 1}))
                for i in range(13)]
        for pred in made:
            su.poll(c, pred["urls"]["get"])

    sign_in(page, server, key)
    cards = page.locator("#history-list > li")
    expect(cards).to_have_count(12)
    expect(cards.first).to_contain_text("history run 12")  # newest first
    expect(cards.first.locator("img")).to_be_visible()
    page.get_by_role("button", name="Load more").click()
    expect(cards).to_have_count(13)
    expect(cards.last).to_contain_text("history run 0")
    expect(page.get_by_role("button", name="Load more")).to_be_hidden()
    assert accessibility_problems(page) == []
    shoot(page, screenshots, "history")

    # reopening a run restores its parameters and shows its image
    page.get_by_role("button", name="Reopen: history run 3", exact=True).click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("history run 3")
    expect(page.get_by_label("Prompt", exact=True)).to_be_focused()
    expect(page.get_by_label("Steps", exact=True)).to_have_value("1")
    expect(page.get_by_label("Format", exact=True)).to_have_value("jpeg")
    expect(page.get_by_label("Seed", exact=True)).to_have_value("103")
    expect(page.get_by_role("radio", name=re.compile("^Custom"))).to_be_checked()
    expect(page.get_by_label("Width", exact=True)).to_have_value("256")
    expect(page.get_by_label("Images", exact=True)).to_have_value("2")
    wait_result(page)
    assert natural_size(page) == (256, 256)
    # two images: a thumbnail each; the one chosen is the one shown and downloaded
    pred = next(p for p in made if p["input"]["prompt"] == "history run 3")
    thumbs = page.get_by_role("group", name="Images of this request").get_by_role("button")
    expect(thumbs).to_have_count(2)
    expect(thumbs.first).to_have_attribute("aria-pressed", "true")
    page.get_by_role("button", name="Image 2 of 2").click()
    expect(thumbs.last).to_have_attribute("aria-pressed", "true")
    download = page.get_by_role("link", name="Download JPEG")
    expect(download).to_have_attribute("download", f"hidream-{pred['id'][:8]}-2.jpg")
    expect(page.locator("#result-image")).to_have_attribute("alt", re.compile(r"^Generated image 2 of 2 for the prompt"))


def test_without_the_stream_route_it_polls(page: Page, server: Server, key: str) -> None:
    """A server without the progress stream (404 there, as before it existed): the page polls instead."""
    streams, polls = [], []
    page.route(re.compile(r"/api/v1/model/prediction/[^/]+/stream"), lambda route: (
        streams.append(route.request.url),
        route.fulfill(status=404, content_type="application/json",
                      body='{"code": 404, "message": "Not Found", "data": null}')))
    page.on("request", lambda r: polls.append(r.url) if re.search(r"/prediction/[0-9a-f]+$", r.url) else None)
    sign_in(page, server, key)
    small_run(page, "a quiet harbour", steps=3)
    generate(page)
    wait_result(page)
    assert streams and polls, (streams, polls)
    assert natural_size(page) == (256, 256)
    [pred] = predictions(server, key)
    assert pred["status"] == "completed"
    expect(page.locator("#result-meta")).to_contain_text(str(pred["input"]["seed"]))


def test_the_demo_model_says_what_it_knows_and_draws_an_example(page: Page, demo_server: Server,
                                                                screenshots: Path) -> None:
    """No model configured: the server runs the shipped demo model. The page says what it knows, starts from
    its size instead of the default 4-megapixel one, and offers example prompts; clicking "a red circle on a
    blue background" and generating at seed 3 with every other default gives red on blue."""
    from hidream import world

    key = demo_server.new_key("demo")
    with su.client(demo_server.url, key) as c:
        [model] = su.ok(c.get("/api/v1/models"))
    assert model["demo"] is True and model["suggested"] == {"image_size": {"width": 256, "height": 256}}, model
    assert model["demo_world"]["colours"] == list(world.COLOURS), model["demo_world"]
    params = model["parameters"]
    sign_in(page, demo_server, key)

    note = page.get_by_role("note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("Demo model.")
    expect(note).to_contain_text("Real images need the official HiDream-O1-Image weights.")
    expect(note).to_contain_text("Shapes: circle, square, triangle, diamond.")
    expect(page.get_by_role("radio", name=re.compile("^Custom"))).to_be_checked()
    expect(page.get_by_label("Width", exact=True)).to_have_value("256")
    expect(page.get_by_label("Height", exact=True)).to_have_value("256")
    # the size only: every other field keeps the contract's default
    expect(page.get_by_label("Steps", exact=True)).to_have_value(str(params["num_inference_steps"]["default"]))
    expect(page.get_by_label("Guidance", exact=True)).to_have_value(f"{params['guidance_scale']['default']:g}")
    expect(page.get_by_label("Format", exact=True)).to_have_value(params["output_format"]["default"])

    # an edit example switches to the edit mode (its reference is still the user's to give)
    page.get_by_role("button", name="Edit: make the circle green").click()
    expect(page.get_by_role("radio", name="Edit")).to_be_checked()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("make the circle green")
    page.get_by_role("button", name="Text to image: a red circle on a blue background").click()
    expect(page.get_by_role("radio", name="Text to image")).to_be_checked()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red circle on a blue background")
    assert accessibility_problems(page) == []
    page.get_by_label("Random", exact=True).uncheck()  # a fixed seed, so the run is the same on every machine
    page.get_by_label("Seed", exact=True).fill("3")
    generate(page)
    wait_result(page, timeout=DEMO_RUN_TIMEOUT)
    assert natural_size(page) == (256, 256)
    shoot(page, screenshots, "demo")
    [pred] = predictions(demo_server, key)
    assert pred["status"] == "completed", pred
    assert pred["input"]["num_inference_steps"] == params["num_inference_steps"]["default"], pred["input"]
    with su.client(demo_server.url, key) as c:
        drawn = c.get(pred["outputs"][0])
    assert drawn.status_code == 200
    reading = world.read(Image.open(io.BytesIO(drawn.content)))
    assert (reading.background, reading.colour) == ("blue", "red"), reading  # its shapes are not learnt yet


def test_the_lora_picker_sends_each_rows_file_and_scale(page: Page, server: Server, key: str,
                                                        screenshots: Path) -> None:
    """The server serves LoRAs: rows of a file and a scale go out as `loras`, come back in the prediction's
    input, and a bad scale's error shows at its row. With none served, there is no picker."""
    sign_in(page, server, key)
    expect(page.locator("#lora-field")).to_be_visible()
    page.get_by_role("button", name="Add a LoRA").click()
    first = page.get_by_label("LoRA 1", exact=True)
    # the broken file is listed by the route with its error, and left out of the picker
    assert first.locator("option").evaluate_all("os => os.map(o => o.value)") == ["sharp.safetensors",
                                                                                  "style.safetensors"]
    first.select_option("style.safetensors")
    page.get_by_label("Scale 1", exact=True).fill("0.75")
    page.get_by_role("button", name="Add another LoRA").click()
    page.get_by_label("LoRA 2", exact=True).select_option("sharp.safetensors")
    page.get_by_label("Scale 2", exact=True).fill("-0.5")
    page.get_by_role("button", name="Add another LoRA").click()
    page.get_by_role("button", name="Remove LoRA 3").click()
    expect(page.get_by_label("LoRA 3", exact=True)).to_have_count(0)
    assert accessibility_problems(page) == []
    small_run(page, "a lighthouse with two LoRAs")
    generate(page)
    wait_result(page)
    [pred] = predictions(server, key)
    assert pred["status"] == "completed", pred
    assert pred["input"]["loras"] == [{"path": "style.safetensors", "scale": 0.75},
                                      {"path": "sharp.safetensors", "scale": -0.5}], pred["input"]
    expect(page.locator("#result-meta")).to_contain_text("style.safetensors ×0.75, sharp.safetensors ×-0.5")
    page.screenshot(path=screenshots / "loras-desktop.png", full_page=True)

    page.get_by_label("Scale 2", exact=True).fill("11")
    generate(page)
    expect(page.locator("#lora-error")).to_contain_text("loras[1].scale: must be a finite number from -10 to 10")
    expect(page.get_by_label("Scale 2", exact=True)).to_have_attribute("aria-invalid", "true")
    assert len(predictions(server, key)) == 1  # refused: nothing queued

    page.route("**/api/v1/loras", lambda route: route.fulfill(
        json={"code": 200, "message": "success", "data": []}))
    page.reload()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#lora-field")).to_be_hidden()
