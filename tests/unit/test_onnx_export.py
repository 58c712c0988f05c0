"""The ONNX export (``serving/optimize.py``) of model families other than BERT, on tiny
random models, run by ONNX Runtime against PyTorch. No Ray."""

from __future__ import annotations

import pytest

from tuneloop.core.tasks import make_task

LABELS = ["negative", "positive"]


@pytest.mark.parametrize("family", ["distilbert"])
def test_an_export_takes_only_the_inputs_the_model_names_and_answers_as_pytorch(tmp_path, family):
    import numpy as np
    import onnxruntime
    import torch
    import transformers

    from tests.tiny_models import build_tiny_model
    from tuneloop.serving.optimize import export_onnx

    # MiniLM's tokenizer returns token_type_ids, which DistilBERT's forward does not name.
    path = build_tiny_model(tmp_path / "m", LABELS, family=family)
    out = str(tmp_path / "model.onnx")
    export_onnx(path, make_task("text-classification", LABELS), out)

    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    assert "input_ids" in inputs and "attention_mask" in inputs
    assert "token_type_ids" not in inputs
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    # Another batch size and length than the export's sample: both dimensions are dynamic.
    enc = tokenizer(["one", "two words", "and a third, longer text than the others"], padding=True, return_tensors="np")
    got = session.run(["logits"], {k: v.astype(np.int64) for k, v in enc.items() if k in inputs})[0]
    net = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        want = net(**{k: torch.from_numpy(v) for k, v in enc.items() if k in inputs}).logits.numpy()
    assert np.allclose(got, want, atol=1e-5)
