"""Code that must not assume BERT, on tiny random models of other families: the ONNX
export (``serving/optimize.py``) run by ONNX Runtime against PyTorch, and the padding a
decoder's tokenizer lacks (``training/model_inputs.py``). No Ray."""

from __future__ import annotations

import pytest

from tuneloop.core.tasks import make_task

LABELS = ["negative", "positive"]
TEXTS = ["one", "two words", "and a third, longer text than the others"]


def _exported_matches_pytorch(path: str, out: str) -> set[str]:
    """Export ``path``, run the export on another batch size and length than its sample (both
    dimensions are dynamic), check it against PyTorch; returns the graph's input names."""
    import numpy as np
    import onnxruntime
    import torch
    import transformers

    from tuneloop.serving.optimize import export_onnx

    export_onnx(path, make_task("text-classification", LABELS), out)
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    enc = transformers.AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="np")
    got = session.run(["logits"], {k: v.astype(np.int64) for k, v in enc.items() if k in inputs})[0]
    net = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        want = net(**{k: torch.from_numpy(v) for k, v in enc.items() if k in inputs}).logits.numpy()
    assert np.allclose(got, want, atol=1e-5)
    return inputs


def test_an_export_takes_only_the_inputs_the_model_names(tmp_path):
    from tests.tiny_models import build_tiny_model

    # MiniLM's tokenizer returns token_type_ids, which DistilBERT's forward does not name.
    path = build_tiny_model(tmp_path / "m", LABELS, family="distilbert")
    inputs = _exported_matches_pytorch(path, str(tmp_path / "model.onnx"))
    assert inputs == {"input_ids", "attention_mask"}


def test_a_decoder_pads_with_its_end_token_and_its_version_serves_and_exports(tmp_path):
    import torch
    import transformers

    from tests.tiny_models import build_tiny_model
    from tuneloop.training.model_inputs import with_pad_token

    path = build_tiny_model(tmp_path / "gpt2", LABELS, family="gpt2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert tokenizer.pad_token is None
    with pytest.raises(ValueError, match="padding token"):
        tokenizer(TEXTS, padding=True)
    assert "end token '[SEP]'" in with_pad_token(tokenizer, model)
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id
    assert with_pad_token(tokenizer, model) is None  # once is enough
    # GPT-2 scores a text at its last real token, found by the pad id: padding changes nothing.
    with torch.no_grad():
        batch = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
        alone = model(**tokenizer(TEXTS[:1], return_tensors="pt")).logits
    assert torch.allclose(batch[0], alone[0], atol=1e-5)
    # Saved as a job saves a version: the padding travels with it, and the export runs.
    model.save_pretrained(tmp_path / "v1")
    tokenizer.save_pretrained(tmp_path / "v1")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "v1").pad_token == "[SEP]"
    _exported_matches_pytorch(str(tmp_path / "v1"), str(tmp_path / "model.onnx"))


def test_a_tokenizer_with_nothing_to_pad_with_is_refused_saying_so(tmp_path):
    import transformers

    from tests.tiny_models import build_tiny_model
    from tuneloop.training.model_inputs import with_pad_token

    path = build_tiny_model(tmp_path / "gpt2", LABELS, family="gpt2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.eos_token = None
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path)
    with pytest.raises(ValueError, match="neither a padding nor an end token"):
        with_pad_token(tokenizer, model)


@pytest.mark.parametrize(("family", "takes"), [("bert", 128), ("roberta", 129), ("gpt2", 128), ("modernbert", 512)])
def test_max_length_is_held_to_the_tokens_the_model_takes_and_its_version_says_so(tmp_path, family, takes):
    """Tiny models hold 128 positions (RoBERTa's 130 less the pad id's slot and the one
    before it); ModernBERT's rotary positions have no table, so the tokenizer's 512 holds."""
    import transformers

    from tests.tiny_models import build_tiny_model
    from tuneloop.serving.loaded_models import LoadedModel
    from tuneloop.training.model_inputs import fit_to_positions, with_pad_token

    path = build_tiny_model(tmp_path / "m", LABELS, family=family)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    with_pad_token(tokenizer, model)
    assert fit_to_positions(tokenizer, model, 64) == (64, None)
    length, said = fit_to_positions(tokenizer, model, 1024)
    assert length == takes and f"max_length 1024 is more than the {takes} tokens" in said
    model.save_pretrained(tmp_path / "v1")
    tokenizer.save_pretrained(tmp_path / "v1")
    # A replica configured for more reads the limit from the version and answers a long text.
    replica = LoadedModel(str(tmp_path / "v1"), "v1", make_task("text-classification", LABELS), max_length=1024)
    assert replica.max_length == takes
    answers, tokens, _ = replica.predict(["word " * 3000, "short"])
    assert len(answers) == 2 and tokens <= takes + 3


def test_a_text_without_tokens_is_rejected_not_a_server_error(tmp_path):
    """GPT-2's tokenizer adds no special tokens, so "" has none; the forward pass then failed."""
    import functools

    from tests.tiny_models import build_tiny_model
    from tuneloop.core.errors import InputRejected
    from tuneloop.core.tasks import make_task
    from tuneloop.serving.loaded_models import LoadedModel

    loaded = LoadedModel(build_tiny_model(tmp_path / "bert", LABELS), "v1", make_task("text-classification", LABELS), 32)
    real = loaded.tokenizer
    loaded.tokenizer = functools.partial(real, add_special_tokens=False)  # as GPT-2's
    assert len(loaded.predict(["fine", "good"])[0]) == 2
    for texts in ([""], ["", "good"]):  # alone, or beside others (the batcher then splits the batch)
        with pytest.raises(InputRejected, match="no tokens"):
            loaded.predict(texts)
