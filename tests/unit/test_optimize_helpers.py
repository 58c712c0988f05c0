"""Parts of building a version's artifacts: the rows the parity check reads, and what the build keeps quiet."""

from __future__ import annotations

import pyarrow as pa

from tuneloop.core.tasks import model_task
from tuneloop.core.config import ModelConfig
from tuneloop.serving.optimize import _golden
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage


def test_parity_reads_rows_spread_over_a_golden_set_sorted_by_label(tmp_path):
    """A 10,000-row golden file sorted by label, cut at its first 2,000 rows, checked one class."""
    task = model_task(ModelConfig(name="m", labels=["a", "b"]))
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    registry = Registry(Storage(str(tmp_path / "store")))
    golden = pa.table({"text": [f"t{i}" for i in range(10)], "label": ["a"] * 6 + ["b"] * 4})
    registry.publish("m", str(weights), Manifest(version="pending", model="m", parent=None, base_model="b",
                                                 task="text-classification", labels=["a", "b"]), tables={"golden": golden})
    texts, targets = _golden(registry, "m", "v1", task, 4)
    assert texts == ["t0", "t2", "t5", "t7"] and [len(v) for v in targets.values()] == [4]
    assert _golden(registry, "m", "v1", task, 100)[0] == [f"t{i}" for i in range(10)]  # all of a small set


def test_a_build_quiets_the_exporters_alone_not_the_process(caplog):
    """The root logger's level and every warning were off for the process while a build ran:
    the job's other threads' warnings went too."""
    import logging
    import warnings

    from tuneloop.serving.optimize import _quiet

    with caplog.at_level(logging.INFO), _quiet(), warnings.catch_warnings(record=True) as shown:
        logging.getLogger("tuneloop.training.launcher").warning("a job's own warning")
        logging.warning("another thread's root warning")
        logging.getLogger("torch.onnx").warning("an exporter's chatter")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
    assert "a job's own warning" in caplog.text and "another thread's root warning" in caplog.text
    assert "an exporter's chatter" not in caplog.text
    assert [str(w.message) for w in shown] == ["a library's warning"]


def test_one_text_alone_is_timed_on_the_short_texts_a_lone_text_runtime_answers():
    """Timed on every golden text, a set of long texts ranked the runtimes as they run at 191
    tokens, where int8 is slower than bf16, not at the short texts the winner would answer."""
    from types import SimpleNamespace

    from tuneloop.serving.loaded_models import LONE_MAX_TOKENS
    from tuneloop.serving.optimize import SAMPLE_TEXTS, lone_text_ms

    class Timed:  # a token a word
        def __init__(self, max_length=128, windows=False):
            self.seen: set[str] = set()
            self.max_length = max_length
            options = {"return_overflowing_tokens": True} if windows else {}
            self.task = SimpleNamespace(serving_tokenizer_options=lambda max_length: options)

        def tokenizer(self, texts, truncation, max_length):
            return {"input_ids": [text.split()[:max_length] for text in texts]}

        def predict(self, texts):
            assert len(texts) == 1
            self.seen.update(texts)

    short, long = "a few words", " ".join(["word"] * (LONE_MAX_TOKENS + 1))
    model = Timed()
    assert lone_text_ms(model, [long, short, long], 0.01) >= 0
    assert model.seen == {short}
    all_long = Timed()
    lone_text_ms(all_long, [long], 0.01)
    assert all_long.seen == set(SAMPLE_TEXTS)  # none of the golden texts is answered alone: timed on short samples
    cut_short = Timed(max_length=16)  # every text cut to 16 tokens: each one goes to the lone-text runtime
    lone_text_ms(cut_short, [long, short], 0.01)
    assert cut_short.seen == {long, short}
    in_windows = Timed(max_length=16, windows=True)  # NER: a text past 16 tokens is two windows, a batch of two
    lone_text_ms(in_windows, [long, short], 0.01)
    assert in_windows.seen == {short}
