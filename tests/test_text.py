"""Text encoders: a tiny local T5 (no hub), both tokenizers, and the trainable encoder's save/load."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from parti.errors import PartiError
from t5folder import save_random_t5
from parti.text import (
    TEXT_ENCODER_PRESETS,
    ByteTokenizer,
    FrozenT5,
    SentencePieceTokenizer,
    TextEncoder,
    TextEncoderConfig,
    TrainableTextEncoder,
    TruncationWarning,
    build_text_encoder,
    load_t5,
    load_text_encoder,
    save_text_encoder,
    train_sentencepiece,
)

WORDS = ("a the smiling woman man with blond brown red black hair glasses beard old young girl boy lipstick hat "
         "earrings wearing looking at camera curly straight short long face eyes").split()


def make_captions(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No network, and an empty private cache: hub names can only fail."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    """A folder that `AutoTokenizer` / `T5EncoderModel.from_pretrained` read like a hub T5 checkpoint."""
    return save_random_t5(tmp_path_factory.mktemp("tiny_t5"), make_captions(), vocab_size=80, d_model=32,
                          num_layers=2, d_kv=16)


# ---------------------------------------------------------------------------------------------- frozen T5


def test_load_t5_encodes_masks_and_is_frozen(tiny_t5_dir):
    enc = load_t5(str(tiny_t5_dir), max_length=32)
    assert isinstance(enc, FrozenT5) and isinstance(enc, TextEncoder) and not enc.trainable
    prompts = ["a smiling woman with blond hair", "", "an old man"]
    emb, mask = enc.encode(prompts)
    lengths = [len(enc.tokenizer(p)["input_ids"]) for p in prompts]  # includes eos
    assert emb.shape == (3, max(lengths), 32) and emb.dtype == torch.float32 and enc.dim == 32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    assert torch.all(emb[~mask] == 0)  # padding zeroed
    assert not emb.requires_grad and all(not p.requires_grad for p in enc.model.parameters())
    assert not enc.model.training
    emb2, _ = enc.encode(prompts)
    assert torch.equal(emb, emb2)  # deterministic
    alone, _ = enc.encode(prompts[2:])  # padding does not leak into real positions
    torch.testing.assert_close(alone[0], emb[2, : lengths[2]], atol=1e-5, rtol=1e-5)
    ident = enc.identity()
    assert ident == load_t5(str(tiny_t5_dir), max_length=32).identity() and json.dumps(ident)
    assert ident["dim"] == 32 and len(ident["fingerprint"]) == 16 and ident["name"] == tiny_t5_dir.name


def test_load_t5_truncation_warns_with_count(tiny_t5_dir):
    enc = load_t5(str(tiny_t5_dir), max_length=6)
    long = "a smiling woman with blond hair and glasses looking at the camera"
    with pytest.warns(TruncationWarning, match="2 of 3 prompts"):
        emb, mask = enc.encode([long, "a man", long])
    assert mask.shape == (3, 6) and mask[0].all()
    eos = enc.tokenizer.eos_token_id
    assert enc.tokenizer(long)["input_ids"][-1] == eos
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)  # short prompts: no warning
        assert enc.encode(["a man"])[0].shape[1] <= 6


def test_long_prompts_are_cut_to_a_byte_bound_before_tokenizing(tiny_t5_dir, spm_path):
    """Hostile input (issue 28): a 5 MB prompt reaches no tokenizer whole. It is cut to MAX_TEXT_BYTES first
    (at a character boundary), then to max_length tokens, and counted as cut either way."""
    from parti.text import MAX_TEXT_BYTES, clip_text

    enc = load_t5(str(tiny_t5_dir), max_length=8)
    seen: list[int] = []

    class Spy:  # what the T5 tokenizer is given
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, texts, **kwargs):
            seen.extend(len(t.encode("utf-8")) for t in texts)
            return self.tok(texts, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    enc.tokenizer = Spy(enc.tokenizer)
    huge = "smiling woman with glasses " * 200_000  # 5.4 MB
    with pytest.warns(TruncationWarning, match="1 of 2 prompts"):
        _, mask = enc.encode([huge, "a man"])
    assert max(seen) <= MAX_TEXT_BYTES and mask.shape == (2, 8)
    for tok in (ByteTokenizer(max_length=16), SentencePieceTokenizer(spm_path, max_length=16)):
        with pytest.warns(TruncationWarning, match="1 of 1 prompts"):
            ids, _ = tok([huge])
        assert ids.shape == (1, 16) and ids[0, -1] == tok.eos_id
    with pytest.warns(TruncationWarning, match="1 of 1 prompts"):  # cut by bytes, not by tokens: still said
        ids, _ = ByteTokenizer(max_length=20_000)(["a" * 10_000])
    assert ids.shape == (1, MAX_TEXT_BYTES + 1)
    accents = "é" * 10_000  # 2 bytes a character: the cut never splits one
    assert clip_text(accents) == "é" * (MAX_TEXT_BYTES // 2) and clip_text("short") == "short"
    assert clip_text("🙂" * 5000).encode() == ("🙂" * (MAX_TEXT_BYTES // 4)).encode()


def test_a_deleted_text_encoder_record_is_not_called_a_t5():
    """A trained run's config.json without its 'text_encoder' entry names its source 'trainable': that is no T5
    to look up on the Hub, and the message says what is missing."""
    with pytest.raises(PartiError, match="does not record its text encoder"):
        load_t5("trainable")


def test_load_t5_missing_is_one_line_parti_error(tmp_path):
    with pytest.raises(PartiError, match="offline") as err:
        load_t5("t5-parti-test-does-not-exist")
    assert "\n" not in str(err.value) and "--text-encoder" in str(err.value)
    with pytest.raises(PartiError, match="does not exist"):
        load_t5(str(tmp_path / "missing_folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PartiError, match="could not load T5"):
        load_t5(str(tmp_path / "empty"))
    with pytest.raises(PartiError):
        build_text_encoder("t5-parti-test-does-not-exist")


def test_build_text_encoder_loads_t5_folder(tiny_t5_dir):
    enc = build_text_encoder(str(tiny_t5_dir), max_length=16)
    assert isinstance(enc, FrozenT5) and enc.max_length == 16


# ---------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_padding_and_unicode():
    tok = ByteTokenizer(max_length=64)
    texts = ["hi", "", "café 😀 ñ", "A Smiling Woman"]
    ids, mask = tok(texts)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    assert int(ids.max()) < tok.vocab_size and int(ids.min()) >= 0
    assert mask.sum(1).tolist() == [len(t.encode()) + 1 for t in texts]  # bytes + eos
    assert torch.all(ids[~mask] == tok.pad_id) and ids[1, 0] == tok.eos_id  # "" -> [eos]
    assert [tok.decode(row[m]) for row, m in zip(ids, mask)] == texts


def test_byte_tokenizer_truncation_warns_and_keeps_eos():
    tok = ByteTokenizer(max_length=8)
    with pytest.warns(TruncationWarning, match="1 of 2 prompts"):
        ids, mask = tok(["a long prompt here", "ok"])
    assert ids.shape == (2, 8) and ids[0, -1] == tok.eos_id and tok.decode(ids[0]) == "a long "
    with pytest.raises(PartiError):
        tok("not a list")


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return train_sentencepiece(make_captions(), tmp_path_factory.mktemp("spm"), vocab_size=400)


def test_sentencepiece_train_is_deterministic_and_round_trips(spm_path, tmp_path):
    again = train_sentencepiece(make_captions(), tmp_path, vocab_size=400)
    assert again.read_bytes() == spm_path.read_bytes()
    tok = SentencePieceTokenizer(spm_path, max_length=64)
    texts = ["A Smiling Woman with blond hair", "", "café 😀 ñ"]
    ids, mask = tok(texts)
    assert int(ids.max()) < tok.vocab_size <= 400
    assert torch.all(ids[~mask] == tok.pad_id) and ids[1, 0] == tok.eos_id and mask[1].sum() == 1
    assert (ids[mask] == 2).sum() == 0  # byte fallback: no <unk> even for unseen characters
    decoded = [tok.decode(row[m]) for row, m in zip(ids, mask)]
    assert decoded == [t.lower() for t in texts]  # lower-cased normalisation


def test_sentencepiece_truncation_and_bad_vocab(spm_path):
    tok = SentencePieceTokenizer(spm_path, max_length=4)
    with pytest.warns(TruncationWarning, match="1 of 2 prompts"):
        ids, mask = tok(["a smiling woman with blond hair and glasses", "a man"])
    assert ids.shape[1] == 4 and ids[0, -1] == tok.eos_id
    with pytest.raises(PartiError, match="vocab_size"):
        train_sentencepiece(make_captions(), spm_path.parent / "small", vocab_size=50)  # < 256 byte pieces
    with pytest.raises(PartiError, match="captions"):
        train_sentencepiece([], spm_path.parent / "none")
    big = train_sentencepiece(make_captions(50), spm_path.parent / "big", vocab_size=5000)  # soft limit
    assert SentencePieceTokenizer(big).vocab_size < 5000


def test_phrase_pieces_make_negations_one_token_on_the_synthetic_captions(tmp_path):
    """Word pieces give "glasses and no hat" and "no glasses and a hat" nearly the same tokens (a bag that
    differs by "a"), and a one-layer encoder mixes them up; phrase pieces make each negation a token."""
    import collections

    from parti import synthetic

    rng = random.Random(0)
    captions = [synthetic.make_caption(synthetic.sample_attributes(rng), rng) for _ in range(3000)]
    words = SentencePieceTokenizer(train_sentencepiece(captions, tmp_path / "words", vocab_size=1000))
    phrases = SentencePieceTokenizer(train_sentencepiece(captions, tmp_path / "phrases", vocab_size=1000,
                                                         phrases=True))
    base = dict(expression="smiling", hair_length="short", hair_color="red", skin_tone="tan",
                background_color="blue")
    one, other = (synthetic.describe({**base, "glasses": g, "hat": not g}) for g in (True, False))

    def pieces(tok, text):
        return [tok.sp.id_to_piece(i) for i in tok.sp.encode(text)]

    assert "▁no" in pieces(words, one) and any(p.startswith("▁no▁hat") for p in pieces(phrases, one))
    assert any(p.startswith("▁no▁glasses") for p in pieces(phrases, other))
    bag = lambda tok, text: collections.Counter(pieces(tok, text))
    assert sum((bag(words, one) - bag(words, other)).values()) == 0  # "one" is "other" less a word
    assert sum((bag(phrases, one) - bag(phrases, other)).values()) >= 2  # its own negation and its own "glasses"
    n_words, n_phrases = (sum(len(tok.sp.encode(c)) for c in captions) for tok in (words, phrases))
    assert n_phrases < 0.75 * n_words, (n_phrases, n_words)  # fewer tokens for the encoder and cross-attention
    again = train_sentencepiece(captions, tmp_path / "again", vocab_size=1000, phrases=True)
    assert again.read_bytes() == (tmp_path / "phrases" / "spm.model").read_bytes()


# ---------------------------------------------------------------------------------------------- trainable


def tiny_config(**changes) -> TextEncoderConfig:
    import dataclasses

    return dataclasses.replace(TEXT_ENCODER_PRESETS["tiny"], **changes)


def test_trainable_shapes_grads_and_mask():
    torch.manual_seed(0)
    enc = TrainableTextEncoder(tiny_config())
    assert isinstance(enc, TextEncoder) and enc.trainable and enc.dim == 64
    states, mask = enc.encode(["a smiling woman", "", "an old man with a beard"])
    assert states.shape == (3, mask.shape[1], 64) and mask.sum(1).tolist() == [16, 1, 24]
    assert torch.all(states[~mask] == 0)
    states.pow(2).mean().backward()
    grad = enc.t5.shared.weight.grad
    assert grad is not None and grad[ord("s") + 2].abs().sum() > 0 and grad[200].abs().sum() == 0
    enc.eval()
    with torch.no_grad():  # real positions do not see padding
        alone, m = enc.encode(["a smiling woman"])
        padded, _ = enc.encode(["a smiling woman", "an old man with a beard and glasses"])
    torch.testing.assert_close(padded[0, : m.shape[1]], alone[0], atol=1e-5, rtol=1e-5)
    ids, mask = enc.tokenize(["a smiling woman"])
    torch.testing.assert_close(enc.encode_ids(ids, mask)[0], alone)  # with grads: another sdpa kernel


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_trainable_save_load_identical(kind, tmp_path):
    torch.manual_seed(0)
    captions = make_captions() if kind == "sentencepiece" else None
    config = tiny_config(tokenizer=kind, vocab_size=400 if kind == "sentencepiece" else ByteTokenizer.vocab_size)
    enc = build_text_encoder("trainable", captions=captions, config=config).eval()
    folder = save_text_encoder(enc, tmp_path / "text")
    assert (folder / "spm.model").exists() == (kind == "sentencepiece")
    loaded = load_text_encoder(folder).eval()
    assert loaded.config == enc.config and loaded.identity() == enc.identity()
    prompts = ["a smiling woman with blond hair 😀", ""]
    with torch.no_grad():
        assert torch.equal(enc.encode(prompts)[0], loaded.encode(prompts)[0])


def test_load_text_encoder_rejects_tampering(tmp_path):
    enc = TrainableTextEncoder(tiny_config())
    folder = save_text_encoder(enc, tmp_path / "text")
    data = json.loads((folder / "config.json").read_text())
    data["config"]["n_layers"] = 3
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(PartiError, match="unknown config keys"):
        load_text_encoder(folder)
    with pytest.raises(PartiError):
        load_text_encoder(tmp_path / "nowhere")


def test_configs_and_build_defaults(tmp_path):
    with pytest.raises(PartiError):
        TextEncoderConfig(tokenizer="words")
    with pytest.raises(PartiError):
        TextEncoderConfig(d_model=30, num_heads=4)
    assert set(TEXT_ENCODER_PRESETS) >= {"tiny", "small", "base"}
    enc = build_text_encoder("trainable", config=tiny_config())
    assert enc.config.tokenizer == "bytes"
    enc = build_text_encoder("trainable", captions=make_captions(), out_dir=tmp_path,
                             config=tiny_config(tokenizer="sentencepiece", vocab_size=2000))
    assert (tmp_path / "spm.model").exists() and enc.config.vocab_size == enc.tokenizer.vocab_size < 2000
    with pytest.raises(PartiError, match="captions"):
        build_text_encoder("trainable", config=tiny_config(tokenizer="sentencepiece", vocab_size=400))


def test_t5_precision_is_passed_as_each_transformers_spells_it(monkeypatch):
    """transformers 4.53 (Colab's 2025.07 runtime) refuses from_pretrained(dtype=) with a TypeError: torch_dtype."""
    import transformers

    from parti.text import _dtype_argument

    monkeypatch.setattr(transformers, "__version__", "4.53.2")
    assert _dtype_argument(torch.float16) == {"torch_dtype": torch.float16}
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    assert _dtype_argument(torch.float16) == {"dtype": torch.float16}
