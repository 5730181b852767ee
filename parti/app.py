"""The web demo: a Gradio page over a loaded pipeline (prompts, sampling settings, Generate, a grid of images).

`build_app(pipe)` returns the `gr.Blocks` and `launch` serves it; `parti serve --checkpoint DIR_OR_REPO`
(settings: `ServeConfig`) loads a pipeline and launches it, and a Hugging Face Space's app.py does the same in
three lines (docs/hub_and_app.md). The sampling settings are validated by `SamplingParams`, so the page shows
the CLI's one-line messages. Gradio is an optional extra (`pip install -e ".[app]"`) imported only inside
`build_app` and `require_gradio`.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

from parti.errors import PartiError
from parti.pipeline import LoadOptions
from parti.plots import to_pil
from parti.sampling import SamplingParams
from parti.settings import check_settings, setting
from parti.text import TruncationWarning

INSTALL_HINT = 'the web demo needs gradio: pip install -e ".[app]" (or pip install gradio)'
MAX_IMAGES = 64  # per click: keeps one request on a shared Space from holding the model for minutes
MAX_PROMPT_CHARS = 1000  # per prompt: ten times the longest caption; a 50 MB one never reaches the sampler
EXAMPLE_PROMPTS = "a smiling woman with long blonde hair on a green background\n" \
                  "a man with short black hair and glasses on a blue background"


def run_pipeline(pipe, prompts: list[str], *, params: SamplingParams, num_images: int, seed: int):
    """The one place the app calls the pipeline."""
    return pipe(prompts, params, num_images_per_prompt=num_images, seed=seed)


def parse_request(prompt_text: str, num_images: float, guidance_scale: float, temperature: float,
                  top_k: str | float | None, top_p: str | float | None, seed: float | None
                  ) -> tuple[list[str], SamplingParams, int, int]:
    """The page's raw values -> (prompts, params, images per prompt, seed); a PartiError says what to fix."""
    if not isinstance(prompt_text, (str, type(None))) or len(prompt_text or "") > MAX_IMAGES * (MAX_PROMPT_CHARS + 1):
        raise PartiError(f"the prompts are too long; give at most {MAX_IMAGES} prompts of {MAX_PROMPT_CHARS} "
                         f"characters each, one a line")
    prompts = [line.strip() for line in (prompt_text or "").splitlines() if line.strip()]
    if not prompts:
        raise PartiError("no prompts given; type at least one prompt, one a line")
    if max(len(p) for p in prompts) > MAX_PROMPT_CHARS:
        raise PartiError(f"a prompt has {max(len(p) for p in prompts):,} characters; give at most "
                         f"{MAX_PROMPT_CHARS} a prompt (the text encoder reads 128 tokens)")
    if seed is None:
        raise PartiError("seed is empty; give a whole number (the same seed gives the same images)")
    top_k, top_p = _optional_number("top_k", top_k), _optional_number("top_p", top_p)
    for name, value in (("number of images", num_images), ("seed", seed), ("guidance scale", guidance_scale),
                        ("temperature", temperature)):  # NaN, inf, empty or text from the form: one line
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PartiError(f"{name} must be a finite number, got {value!r}")
    for name, value in (("number of images", num_images), ("seed", seed), ("top_k", top_k)):
        if value is not None and float(value) != int(value):
            raise PartiError(f"{name} must be a whole number, got {value}")
    params = SamplingParams(guidance_scale=float(guidance_scale), temperature=float(temperature),
                            top_k=None if top_k is None else int(top_k), top_p=top_p)
    n = int(num_images)
    if n < 1 or n * len(prompts) > MAX_IMAGES:
        raise PartiError(f"asked for {n} images for each of {len(prompts)} prompts; give 1 or more, "
                         f"at most {MAX_IMAGES} images in all")
    return prompts, params, n, int(seed)


def _optional_number(name: str, value: str | float | None) -> float | None:
    """A text box's value: empty -> None (off), else a number."""
    if value is None or isinstance(value, (int, float)):
        return value
    if not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise PartiError(f"{name} must be a number or empty (off), got {value!r}")
    return number


def generate_images(pipe, prompt_text: str, num_images: float, guidance_scale: float, temperature: float,
                    top_k: str | float | None, top_p: str | float | None, seed: float | None
                    ) -> tuple[list[tuple[Any, str]], str]:
    """The Generate button without Gradio: -> ([(PIL image, caption), ...] prompt-major, status markdown)."""
    prompts, params, n, seed = parse_request(prompt_text, num_images, guidance_scale, temperature, top_k, top_p, seed)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # the text encoder says when it cut long prompts
        warnings.simplefilter("always", TruncationWarning)
        result = run_pipeline(pipe, prompts, params=params, num_images=n, seed=seed)
    images = result.images.float().cpu()  # (P * n, 3, S, S) in [-1, 1]
    gallery = [(to_pil(image), f"{prompt} #{i % n + 1}") for i, (image, prompt) in enumerate(zip(images, result.prompts))]
    status = (f"{len(gallery)} images ({len(prompts)} prompts x {n}), seed {seed}, "
              f"in {time.perf_counter() - start:.1f} s")
    cut = [str(w.message) for w in caught if issubclass(w.category, TruncationWarning)]
    return gallery, status + (f". Note: {cut[0]}" if cut else "")


def gallery_buttons(gradio_version: str) -> dict[str, Any]:
    """The gallery's download and fullscreen buttons as this gradio spells them: gradio 6 takes one `buttons`
    list; gradio 5 (Colab's 2025.07-2026.04 runtimes, which users can pin) a flag each, and no `buttons`."""
    if int(gradio_version.split(".")[0]) >= 6:
        return {"buttons": ["download", "download_all", "fullscreen"]}
    return {"show_download_button": True, "show_fullscreen_button": True}


def build_app(pipe, *, title: str = "parti: text to faces"):
    """The demo page over a loaded `Pipeline`. Errors in the settings show in the status line, one line each."""
    try:
        import gradio as gr
    except ImportError:
        raise PartiError(INSTALL_HINT) from None
    defaults = SamplingParams()

    def on_generate(prompt_text, num_images, guidance_scale, temperature, top_k, top_p, seed,
                    progress=gr.Progress()):
        progress(0, desc="sampling")
        try:
            gallery, status = generate_images(pipe, prompt_text, num_images, guidance_scale, temperature,
                                              top_k, top_p, seed)
        except PartiError as e:  # a setting to fix: keep the last grid, say what is wrong
            return gr.update(), f"**Error:** {e}"
        return gallery, status

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nA Parti-style autoregressive text-to-image model of faces "
                    f"({pipe.tokenizer.config.image_size} px). One prompt a line; each image can be downloaded.")
        with gr.Row():
            with gr.Column(scale=1):
                prompts = gr.Textbox(value=EXAMPLE_PROMPTS, lines=4, label="prompts (one a line)", elem_id="prompts")
                num_images = gr.Slider(1, 16, value=4, step=1, label="images per prompt", elem_id="num_images")
                guidance = gr.Slider(0.0, 10.0, value=defaults.guidance_scale, step=0.1,
                                     label="guidance scale (1: none)", elem_id="guidance_scale")
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                        label="temperature (0: greedy)", elem_id="temperature")
                with gr.Row():
                    # Text boxes, not gr.Number: an empty number box reads as 0, and empty here means "off".
                    top_k = gr.Textbox(value="", placeholder="off", label="top-k (empty: off)", elem_id="top_k")
                    top_p = gr.Textbox(value="", placeholder="off", label="top-p (empty: off)", elem_id="top_p")
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                gallery = gr.Gallery(label="results", columns=4, format="png", object_fit="contain",
                                     elem_id="gallery", **gallery_buttons(gr.__version__))
        button.click(on_generate, inputs=[prompts, num_images, guidance, temperature, top_k, top_p, seed],
                     outputs=[gallery, status], concurrency_limit=1)  # one sampling run holds the model at a time
    return app


@dataclass
class ServeConfig:
    """`parti serve`: the generator `load` names, served by `launch` on `host`:`port`."""

    load: LoadOptions
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(7860, "port to listen on", minimum=1, maximum=65535)
    share: bool = setting(False, "also open a public gradio.live link (Colab)")

    def __post_init__(self):
        check_settings(self)


def require_gradio() -> None:
    """A one-line PartiError when Gradio is missing: checked before a checkpoint loads, so it comes at once."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise PartiError(INSTALL_HINT) from None


def launch(pipe, *, host: str, port: int, share: bool) -> None:
    """Serve the demo page over `pipe` (one request at a time) until interrupted."""
    build_app(pipe).queue().launch(server_name=host, server_port=port, share=share)
