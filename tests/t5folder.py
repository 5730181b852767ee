"""A random T5 encoder saved as a local folder, read by `parti.text.load_t5` as a hub T5 checkpoint is."""

import io
from pathlib import Path

import torch


def save_random_t5(folder: Path, sentences: list[str], *, vocab_size: int, d_model: int, num_layers: int,
                   d_kv: int) -> Path:
    """A SentencePiece vocabulary trained on `sentences`, and a T5 encoder of that size with random weights."""
    import sentencepiece as spm
    import transformers
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    # transformers 5's T5Tokenizer is backed by `tokenizers`; building it from (piece, score) pairs needs no
    # protobuf (converting an spiece.model file does). save_pretrained writes tokenizer.json.
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    else:  # transformers 4 (Colab's older runtimes): the sentencepiece-backed tokenizer reads spiece.model
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spiece.model").write_bytes(buf.getvalue())
        tokenizer = T5Tokenizer(vocab_file=str(folder / "spiece.model"), extra_ids=0)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, num_layers=num_layers, num_heads=2, d_ff=64,
                      d_kv=d_kv, dropout_rate=0.0)
    T5EncoderModel(config).save_pretrained(folder)
    return folder
