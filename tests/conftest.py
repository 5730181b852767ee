"""Test setup: offline hubs, temporary caches, small thread count. Set before anything imports them."""

import os
import tempfile

_tmp = tempfile.mkdtemp(prefix="parti-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_tmp, "hf")
os.environ["PARTI_HOME"] = os.path.join(_tmp, "parti")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

import dataclasses  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny models gain nothing from threads, and on shared cores two spinning threads cost 10x. Module
    scope: it must also cover the module's fixtures (bit-equal runs need the same thread count).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """Untrained tiny models saved as parti saves them: tok/, gen/ (with tokenizer/ and a byte-level
    text_encoder/ of max_length 16). Read-only: copy a folder before changing it."""
    from parti.generator import build_generator, save_generator
    from parti.text import TEXT_ENCODER_PRESETS, ByteTokenizer, TrainableTextEncoder, save_text_encoder
    from parti.tokenizer import build_tokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = build_tokenizer("tiny")
    save_tokenizer(tok, root / "tok")
    config = dataclasses.replace(TEXT_ENCODER_PRESETS["tiny"], tokenizer="bytes", vocab_size=ByteTokenizer.vocab_size,
                                 max_length=16)
    encoder = TrainableTextEncoder(config)
    save_text_encoder(encoder, root / "gen" / "text_encoder")
    save_tokenizer(tok, root / "gen" / "tokenizer")
    save_generator(build_generator("tiny", text_dim=encoder.dim), root / "gen",
                   extra={"tokenizer_fingerprint": tok.fingerprint(), "text_encoder": encoder.identity()})
    return root


def tiny_code_cache(root, *, train_faces: int) -> dict:
    """An untrained tiny tokenizer (seed 0) in ROOT/tok and a code cache of `train_faces` train and 24 val
    synthetic faces in ROOT/cache: the data and tokenizer options of a tiny generator run."""
    from parti.cache import encode_dataset
    from parti.tokenizer import build_tokenizer, save_tokenizer

    torch.manual_seed(0)
    save_tokenizer(build_tokenizer("tiny"), root / "tok")
    encode_dataset(data="synthetic", tokenizer=root / "tok", out=root / "cache", synthetic_length=train_faces,
                   max_items=24, batch_size=24, device="cpu", progress=False)
    return {"data": str(root / "cache"), "tokenizer": str(root / "tok")}
