"""The memorisation audit flags a generator that copies its training images and passes one that does not.

Fast tests: the arithmetic on planted distances, the code-space shortlist against brute force, the whole
audit with stand-in pipelines (one returns training images, one fresh faces) and the grid's output guard,
and `evaluate_generator --audit` on an untrained run with a code cache. The slow test trains two tiny
generators: one on 18 faces for many epochs (it memorises them), one on 297 faces for the same steps.

Faces come from a folder of distinct synthetic faces (every (attribute) combination at most once): the
synthetic data set itself has only 2,304 different faces, so a held-out face there often equals a training
face and the audit would rightly say "inconclusive".
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from parti import audit, synthetic
from parti.audit import (AUDIT_GRID_NAME, TrainingPool, audit_grid_path, audit_scores, chance_below, check_audit_grid,
                         memorisation_audit, nearest, token_shortlist, write_audit_grid)
from parti.data import to_tensor
from parti.errors import PartiError
from parti.runs import EXIF_SOFTWARE, IMAGE_MARK

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SIZE = 32
COMBOS = [dict(zip(synthetic.ATTRIBUTES, v)) for v in itertools.product(*synthetic.ATTRIBUTES.values())]
random.Random(0).shuffle(COMBOS)  # distinct faces: slices of this list never share a face


class Pooled(nn.Module):
    """A cheap stand-in for the FID Inception: 8x8 average-pooled pixels, (B, 192)."""

    def forward(self, images):
        return nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def faces(combos: list[dict], name: str) -> list[dict]:
    """Items as a data source gives them: image (3, S, S) in [-1, 1], caption, index."""
    rng = random.Random(name)
    return [{"image": to_tensor(synthetic.render_face(a, SIZE), SIZE), "caption": synthetic.make_caption(a, rng),
             "index": i} for i, a in enumerate(combos)]


def write_folder(folder: Path, items: list[dict]) -> Path:
    """A folder data source: NAME.png with its caption in NAME.txt (the last 10% are its val split)."""
    folder.mkdir(parents=True)
    for item in items:
        pixels = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{item['index']:04d}.png")
        (folder / f"{item['index']:04d}.txt").write_text(item["caption"])
    return folder


# ---- the arithmetic ------------------------------------------------------------------------------------------

def test_copies_of_training_images_are_flagged_and_fresh_images_are_not():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    held = torch.randn(32, 16, generator=gen, dtype=torch.float64)  # fresh points: as novel as can be
    fresh = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    copies = torch.cat([train[:8] + 1e-3 * torch.randn(8, 16, generator=gen, dtype=torch.float64), fresh[8:]])
    kind = torch.arange(32) < 16  # the first half from training captions
    held_d, _ = nearest(held, train)

    flagged = audit_scores(nearest(copies, train)[0], held_d, train_prompt=kind)
    assert flagged["audit.verdict"] == "memorisation suspected"
    assert flagged["audit.share_below.train_captions"] == 0.5 and flagged["audit.share_below.held_out_captions"] == 0
    assert flagged["audit.share_below.all"] == 0.25 and flagged["audit.p_value.all"] == chance_below(8, 32, 32)
    assert flagged["audit.threshold"] == pytest.approx(float(held_d.min()))

    passed = audit_scores(nearest(fresh, train)[0], held_d, train_prompt=kind)
    assert passed["audit.verdict"] == "no memorisation found" and passed["audit.share_below.all"] <= 2 / 32
    assert passed["audit.held_out_distance.q00"] == flagged["audit.threshold"]
    assert passed["audit.generated_distance.q50"] > flagged["audit.generated_distance.q05"]

    # A held-out image that equals a training image: nothing can be closer, the audit cannot tell.
    held_d[3] = 0.0
    assert audit_scores(torch.zeros(32), held_d, train_prompt=kind)["audit.verdict"].startswith("inconclusive")


def test_chance_below_is_the_exchangeable_probability():
    assert chance_below(0, 64, 64) == 1.0 and chance_below(1, 64, 64) == 0.5
    assert chance_below(7, 64, 64) == pytest.approx(0.0066, abs=1e-4)  # the docstring's 0.7%
    # By simulation: k of n generated below all m held-out when all n + m are exchangeable.
    gen = torch.Generator().manual_seed(1)
    trials = torch.rand(20000, 10, generator=gen)  # 4 generated, 6 held-out per trial
    below = (trials[:, :4] < trials[:, 4:].min(1, keepdim=True).values).sum(1)
    assert float((below >= 2).double().mean()) == pytest.approx(chance_below(2, 4, 6), abs=0.01)


def test_token_shortlist_finds_the_codes_that_agree_most(monkeypatch):
    monkeypatch.setattr(audit, "CODE_CHUNK", 7)  # several chunks, the best rows spread over them
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (50, 12), generator=gen)
    query = codes[[3, 20, 41]].clone()
    query[0, :3] = 9  # still closest to row 3, with 9 of 12 positions
    got = token_shortlist(query, codes, 5)
    agree = (query[:, None] == codes[None]).sum(-1)  # brute force, (3, 50)
    assert got[:, 0].tolist() == [3, 20, 41]
    for row in range(3):  # the 5 best agreement counts, whichever rows tie
        best = agree[row].sort(descending=True).values[:5].tolist()
        assert sorted(agree[row, got[row]].tolist(), reverse=True) == best
    assert token_shortlist(query, codes[:2], 5).shape == (3, 2)


# ---- the audit with stand-in pipelines -------------------------------------------------------------------------

class CodePipeline:
    """Stands in for `Pipeline`: `draw(prompt, i)` gives each image's codes (T,); a real tokenizer decodes them."""

    def __init__(self, tokenizer, draw):
        self.tokenizer, self.draw, self.device = tokenizer, draw, torch.device("cpu")

    def __call__(self, prompts, sampling=None, *, seed=0, batch_size=64, return_codes=False):
        codes = torch.stack([self.draw(p, i) for i, p in enumerate(prompts)])
        g = self.tokenizer.config.grid_size
        return SimpleNamespace(images=self.tokenizer.decode(codes).clamp(-1, 1), codes=codes.reshape(-1, g, g))


@pytest.fixture(scope="module")
def small_world():
    """An untrained tiny tokenizer, 40 training faces as cached codes, 16 held-out faces, 16 fresh faces."""
    from parti.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer("tiny").eval()
    train = faces(COMBOS[:40], "train")
    codes = tok.encode(torch.stack([t["image"] for t in train])).flatten(1)
    pool = TrainingPool(size=40, codes=codes, captions=[t["caption"] for t in train], origin="test cache")
    fresh = tok.encode(torch.stack([t["image"] for t in faces(COMBOS[200:216], "fresh")])).flatten(1)
    return SimpleNamespace(tok=tok, pool=pool, held=faces(COMBOS[100:116], "held"), fresh=fresh)


def copier(world):
    by_caption = {c: world.pool.codes[i] for i, c in enumerate(world.pool.captions)}
    return CodePipeline(world.tok, lambda p, i: by_caption.get(p, world.pool.codes[i % 40]))  # copies for any prompt


def test_the_audit_flags_a_copying_generator_and_draws_its_copies(small_world, tmp_path):
    found, pairs = memorisation_audit(copier(small_world), small_world.held, small_world.pool, Pooled(),
                                      num_images=16, train_limit=40, shortlist=0, batch_size=8)
    assert found["audit.verdict"] == "memorisation suspected" and found["audit.share_below.all"] == 1.0
    assert found["audit.generated_distance.q50"] == 0.0 < found["audit.threshold"]
    assert found["audit.generated"] == found["audit.held_out"] == 16
    assert found["audit.train_images_searched"] == found["audit.train_images_featurised"] == 40
    assert pairs.shape == (2, 8, 3, SIZE, SIZE) and torch.equal(pairs[0], pairs[1])  # each copy beside its original

    grid = write_audit_grid(pairs, tmp_path / "eval_audit.png")
    with Image.open(grid) as img:
        assert img.getexif().get(EXIF_SOFTWARE) == IMAGE_MARK
        assert img.width == 8 * (SIZE + 2) + 2 and img.height > 2 * (SIZE + 2)  # 8 pairs, a title band above
    write_audit_grid(pairs, grid)  # our own picture: replaced


def test_the_audit_passes_a_generator_of_fresh_faces(small_world):
    fresh = CodePipeline(small_world.tok, lambda p, i: small_world.fresh[i])
    found, _ = memorisation_audit(fresh, small_world.held, small_world.pool, Pooled(), num_images=16,
                                  train_limit=40, shortlist=0, batch_size=8)
    assert found["audit.verdict"] == "no memorisation found", found
    assert found["audit.generated_distance.q00"] > 0.0


def test_the_code_shortlist_finds_copies_outside_the_featurised_subset(small_world):
    # Two training images featurised at random, plus each image's best code match among all 40.
    found, pairs = memorisation_audit(copier(small_world), small_world.held, small_world.pool, Pooled(),
                                      num_images=16, train_limit=2, shortlist=1, batch_size=8)
    assert found["audit.train_images_searched"] == 40 and found["audit.train_images_featurised"] < 40
    assert found["audit.verdict"] == "memorisation suspected" and torch.equal(pairs[0], pairs[1])
    found, _ = memorisation_audit(copier(small_world), small_world.held, small_world.pool, Pooled(),
                                  num_images=16, train_limit=2, shortlist=0, batch_size=8)
    assert found["audit.train_images_searched"] == 2  # without it most copies go unnoticed
    assert found["audit.share_below.all"] < 1.0


def test_the_grid_never_overwrites_what_is_not_ours(tmp_path):
    foreign = tmp_path / "results_audit.png"
    Image.new("RGB", (4, 4)).save(foreign)  # someone's picture, not marked as parti's
    assert audit_grid_path(tmp_path / "results.json") == foreign
    with pytest.raises(PartiError, match="not an image parti wrote"):
        check_audit_grid(foreign)
    gen = tmp_path / "gen"  # a generator folder, as the output guard recognises one
    gen.mkdir()
    (gen / "config.json").write_text(json.dumps({"kind": "generator"}))
    assert check_audit_grid(gen / AUDIT_GRID_NAME) == gen / AUDIT_GRID_NAME  # its slot there, beside eval.json
    with pytest.raises(PartiError, match="inside the generator folder"):
        check_audit_grid(gen / "model_audit.png")


def test_without_a_code_cache_the_training_images_are_read_again(small_world, tmp_path):
    from parti.audit import training_pool

    data = write_folder(tmp_path / "faces", faces(COMBOS[:20], "train"))  # 18 train, 2 val
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "generator", "data": str(data)}))
    pool = training_pool(run, image_size=SIZE)
    assert pool.size == 18 and pool.codes is None and pool.caption(3) == (data / "0003.txt").read_text()
    images = pool.images([0, 5], small_world.tok)  # through the tokenizer, as cached codes would be
    want = small_world.tok.decode(small_world.tok.encode(torch.stack([pool.source[i]["image"] for i in (0, 5)])))
    assert torch.equal(images, want.clamp(-1, 1))
    (run / "config.json").write_text(json.dumps({"kind": "generator"}))
    with pytest.raises(PartiError, match="names no training data"):
        training_pool(run, image_size=SIZE)


# ---- evaluate_generator --audit ------------------------------------------------------------------------------

def make_run(root: Path, *, train_faces: int, steps: int | None) -> Path:
    """A generator run whose code cache holds `train_faces` distinct faces: trained for `steps` (train_generator),
    or (None) assembled untrained, exactly as training exports it."""
    from parti.cache import encode_dataset
    from parti.tokenizer import build_tokenizer, save_tokenizer

    torch.manual_seed(0)
    save_tokenizer(build_tokenizer("tiny"), root / "tok")
    data = write_folder(root / "faces", faces(COMBOS[:train_faces], "train"))
    encode_dataset(data=str(data), tokenizer=root / "tok", out=root / "cache", device="cpu", progress=False)
    if steps is not None:
        from parti.train_generator import GeneratorTrainConfig, train_generator

        return train_generator(GeneratorTrainConfig(
            data=str(root / "cache"), tokenizer=str(root / "tok"), out=str(root / "run"), steps=steps, preset="tiny",
            text_preset="tiny", text_tokenizer="bytes", batch_size=8, lr=5e-3, warmup_steps=5, weight_decay=0.0,
            val_batches=1, sample_every=10_000, save_every=10_000, log_every=50, cpu=True, mixed_precision="no",
            progress=False))
    from parti import text
    from parti.generator import build_generator, save_generator
    from parti.tokenizer import load_tokenizer

    run, tok = root / "run", load_tokenizer(root / "tok")
    save_tokenizer(tok, run / "tokenizer")
    encoder = text.build_text_encoder("trainable", config=text.TEXT_ENCODER_PRESETS["tiny"])
    text.save_text_encoder(encoder, run / "text_encoder")
    save_generator(build_generator("tiny", num_codes=256, grid_size=tok.config.grid_size, text_dim=encoder.dim), run,
                   extra={"tokenizer_fingerprint": tok.fingerprint(), "text_encoder": encoder.identity(),
                          "data": str(root / "cache")})
    return run


@pytest.fixture(scope="module")
def held_out_folder(tmp_path_factory) -> Path:
    """160 faces no training set here holds: the last 16 are the val split the evaluation reads."""
    return write_folder(tmp_path_factory.mktemp("held") / "faces", faces(COMBOS[1000:1160], "held"))


def audited(run: Path, held: Path, out: Path, **options):
    from parti.evaluate import GeneratorEvalConfig, evaluate_generator
    from parti.sampling import SamplingParams

    cfg = GeneratorEvalConfig(checkpoint=str(run), data=str(held), num_images=4, batch_size=16, download=False,
                              audit=True, out=str(out), sampling=SamplingParams(guidance_scale=1.0), **options)
    return evaluate_generator(cfg, inception=Pooled())


def test_evaluate_generator_audits_against_the_runs_code_cache_and_the_card_shows_it(tmp_path, held_out_folder):
    from parti.evaluate import GeneratorEvalConfig, evaluate_generator, format_table, write_results
    from parti.push import prepare_upload

    run = make_run(tmp_path, train_faces=30, steps=None)
    result = audited(run, held_out_folder, run / "eval.json", audit_images=4)
    assert result["audit.train_images"] == 27 and result["audit.generated"] == 4  # 90% of 30 faces are train
    assert result["audit.verdict"] == "no memorisation found" and "audit" not in result["errors"]
    assert result["audit.grid"] == AUDIT_GRID_NAME and (run / AUDIT_GRID_NAME).is_file()  # beside eval.json
    assert {"val_loss", "fid", "clip_score", "num_generated"} <= set(result)  # the other results stay
    table = format_table(result)
    assert "audit.verdict" in table and "no memorisation found" in table
    write_results(run / "eval.json", result)

    card = (prepare_upload(run, tmp_path / "up") / "README.md").read_text()
    assert (tmp_path / "up" / AUDIT_GRID_NAME).read_bytes() == (run / AUDIT_GRID_NAME).read_bytes()
    assert f"![memorisation audit]({AUDIT_GRID_NAME})" in card and "audit.verdict" in card
    secret = tmp_path / "secret.png"
    (run / AUDIT_GRID_NAME).rename(secret)
    (run / AUDIT_GRID_NAME).symlink_to(secret)  # a symlink in a run folder is never published
    card = (prepare_upload(run, tmp_path / "up2") / "README.md").read_text()
    assert not (tmp_path / "up2" / AUDIT_GRID_NAME).exists() and "memorisation audit]" not in card

    without = evaluate_generator(GeneratorEvalConfig(checkpoint=str(run), data=str(held_out_folder), num_images=2,
                                                     download=False, audit=True, out=str(tmp_path / "b.json")))
    assert "FID Inception" in without["errors"]["audit"] and not any(k.startswith("audit.") for k in without)


@pytest.mark.slow
def test_an_overfit_generator_is_flagged_and_one_trained_on_more_faces_is_not(tmp_path, held_out_folder):
    """18 faces x 130 epochs: the training loss ends near 0.006 nats a code and most samples reproduce training
    faces; 297 faces x 8 epochs: no copies. The same steps, tokenizer and held-out faces; no guidance."""
    verdicts = {}
    for name, n in (("overfit", 20), ("more_faces", 330)):  # 90% of them are the training split
        run = make_run(tmp_path / name, train_faces=n, steps=300)
        result = audited(run, held_out_folder, tmp_path / f"{name}.json", audit_images=16)
        verdicts[name] = result["audit.verdict"]
        assert (tmp_path / f"{name}_audit.png").is_file()
    assert verdicts == {"overfit": "memorisation suspected", "more_faces": "no memorisation found"}
