"""The web demo in a real browser: Debian's headless Chromium drives the Gradio page of a tiny checkpoint on
127.0.0.1 (types two prompts, clicks Generate, reads the grid back, checks seeds and an error message), and
the page's logic without a browser. Under CI (CI=true) a missing gradio, selenium or chromium is a failure
that says what to install; elsewhere the browser tests skip."""

import importlib
import io
import os
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from parti.errors import PartiError

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = ('pip install -e ".[test]" (gradio, selenium) and apt-get install -y chromium chromium-driver')
PROMPTS = ["red hair", "a hat"]  # short: the tiny text encoder keeps 16 bytes


def need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the web demo's browser test needs {module}: {INSTALL}")
        pytest.skip(f"{module} is not installed ({INSTALL})")


@pytest.fixture(scope="module")
def pipe(tiny_folders):
    from parti.pipeline import load_pipeline

    return load_pipeline(tiny_folders / "gen", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    need("gradio")
    from parti.app import build_app

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(pipe)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
                       quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser(server):
    need("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the web demo's browser test needs {missing}: apt-get install -y chromium chromium-driver")
        pytest.skip(f"no {missing} (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # Debian's build: nothing is downloaded
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(server)
    wait(driver, lambda d: d.find_elements("css selector", "#generate"))
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 40):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def fill(driver, selector: str, text: str) -> None:
    """Replace a field's text as a user does (select all, type), then leave it so Gradio reads the value."""
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element("css selector", selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.BACKSPACE)
    field.send_keys(text)
    field.send_keys(Keys.TAB)


def set_prompts(driver, prompts: list[str]) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("css selector", "#prompts textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys("\n".join(prompts))  # Enter in a multi-line box is a new line
    assert box.get_attribute("value") == "\n".join(prompts)


def status(driver) -> str:
    return driver.find_element("css selector", "#status").text


def gallery_sources(driver) -> list[str]:
    return [img.get_attribute("src") for img in driver.find_elements("css selector", "#gallery img")]


def generate(driver, *, seed: int, count: int, previous: list[str] | None = None) -> list[np.ndarray]:
    """Click Generate; wait for the status of this seed and a new grid of `count` images; their pixels."""
    fill(driver, "#seed input", str(seed))
    driver.find_element("css selector", "#generate").click()
    done = f"{count} images ({len(PROMPTS)} prompts x {count // len(PROMPTS)}), seed {seed},"

    seen: list = []

    def ready(d):
        # The gallery swaps its images one by one: wait until none of the previous grid's is left, and the
        # same sources show on two polls in a row.
        srcs = gallery_sources(d)
        fresh = done in status(d) and len(srcs) == count and not set(srcs) & set(previous or [])
        stable = fresh and seen[-1:] == [srcs]
        seen.append(srcs)
        return stable and srcs

    srcs = wait(driver, ready)
    from PIL import Image

    return srcs, [np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(s, timeout=10).read())).convert("RGB"))
                  for s in srcs]


def test_generate_in_the_browser(browser, pipe, tmp_path):
    from parti.app import run_pipeline
    from parti.plots import to_uint8
    from parti.sampling import SamplingParams

    set_prompts(browser, PROMPTS)
    fill(browser, "#num_images input[type=number]", "2")
    srcs0, seed0 = generate(browser, seed=0, count=4)
    # The page shows exactly what the pipeline makes for these prompts and seed, prompt-major.
    expected = to_uint8(run_pipeline(pipe, PROMPTS, params=SamplingParams(), num_images=2, seed=0).images)
    assert np.array_equal(np.stack(seed0), expected)
    srcs1, seed1 = generate(browser, seed=1, count=4, previous=srcs0)
    assert not np.array_equal(np.stack(seed1), np.stack(seed0))
    _, again = generate(browser, seed=0, count=4, previous=srcs1)
    assert np.array_equal(np.stack(again), np.stack(seed0))  # same seed, same images
    assert browser.find_elements("css selector", "#gallery button[aria-label='Download All']")
    shot = Path(os.environ.get("PARTI_APP_SCREENSHOT") or tmp_path / "images" / "app_screenshot.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.read_bytes().startswith(b"\x89PNG")


def test_invalid_top_p_shows_the_clis_message_in_the_page(browser):
    fill(browser, "#top_p textarea, #top_p input", "1.5")
    browser.find_element("css selector", "#generate").click()
    wait(browser, lambda d: "top_p must be in (0, 1] (or unset), got 1.5" in status(d))
    assert status(browser).startswith("Error:")
    fill(browser, "#top_p textarea, #top_p input", "")


# ----------------------------------------------------------------------------------------------------
# the page's logic, no browser


def test_settings_errors_are_the_sampling_params_messages(pipe):
    from parti.app import generate_images
    from parti.sampling import SamplingParams

    def error(**change):
        values = dict(prompt_text="a\nb", num_images=1, guidance_scale=3.0, temperature=1.0, top_k="", top_p="",
                      seed=0)
        with pytest.raises(PartiError) as info:
            generate_images(pipe, **{**values, **change})
        return str(info.value)

    with pytest.raises(PartiError) as cli:
        SamplingParams(top_p=1.5)
    assert error(top_p="1.5") == str(cli.value)
    assert error(top_k="0").startswith("top_k must be >= 1")
    assert "top_k must be a whole number" in error(top_k="2.5")
    assert "number or empty" in error(top_p="abc") and "number or empty" in error(top_k="inf")
    assert "no prompts" in error(prompt_text=" \n ")
    assert "seed is empty" in error(seed=None)
    assert "at most 64 images" in error(num_images=40)
    gallery, text = generate_images(pipe, "a\n\nb", 2, 1.0, 0.0, "5", "0.9", 3)
    assert [c for _, c in gallery] == ["a #1", "a #2", "b #1", "b #2"] and "seed 3" in text
    assert gallery[0][0].size == (32, 32) and "Note" not in text
    _, text = generate_images(pipe, "a prompt longer than sixteen bytes", 1, 3.0, 1.0, "", "", 0)
    assert "Note: 1 of 1 prompts were longer than 16 tokens" in text


def test_run_pipeline_passes_the_sampling_params_whole(pipe):
    """The page's settings reach the sampler: the same images as calling the pipeline with them."""
    from parti.app import run_pipeline
    from parti.sampling import SamplingParams

    params = SamplingParams(guidance_scale=2.0, temperature=0.5, top_k=7, top_p=0.9)
    got = run_pipeline(pipe, ["x"], params=params, num_images=2, seed=4).images
    assert (pipe(["x"], params, num_images_per_prompt=2, seed=4).images == got).all()
    assert not (pipe(["x"], SamplingParams(), num_images_per_prompt=2, seed=4).images == got).all()


def test_serve_without_gradio_says_how_to_install(monkeypatch, capsys, tiny_folders):
    import builtins

    from parti.cli import main

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio" or name.startswith("gradio."):
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    code = main(["serve", "--checkpoint", str(tiny_folders / "gen")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'pip install -e ".[app]"' in err[0]


def test_import_parti_does_not_import_gradio():
    import subprocess
    import sys

    code = "import sys, parti, parti.app, parti.hub, parti.cli; parti.cli.build_parser(); " \
           "print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False"


@pytest.mark.parametrize("version, spelling", [("6.24.0", "buttons"), ("5.31.0", "show_download_button"),
                                               ("5.50.0", "show_fullscreen_button")])
def test_the_gallery_buttons_are_spelled_for_each_gradio(version, spelling):
    """gradio 5 has no `buttons` (Colab's pinnable 2025.07-2026.04 runtimes: Run all broke on it)."""
    from parti.app import gallery_buttons

    assert spelling in gallery_buttons(version) and ("buttons" in gallery_buttons(version)) == version.startswith("6")


def test_the_installed_gradio_takes_the_gallery_buttons(pipe):
    """Whichever gradio is installed (CI also runs the Colab package sets: gradio 5 and 6), its Gallery takes
    what `gallery_buttons` gives it, and the page builds."""
    import inspect

    gr = need("gradio")
    from parti.app import build_app, gallery_buttons

    assert set(gallery_buttons(gr.__version__)) <= set(inspect.signature(gr.Gallery.__init__).parameters)
    assert build_app(pipe) is not None
