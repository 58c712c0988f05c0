"""Token classification: named entities as character spans of the text (NER).

The config names the entity types (``labels: [PER, LOC, ORG, MISC]``; a BIO tag list such as
CoNLL's ``[O, B-PER, I-PER, ...]`` is read as its types). The model's head predicts a BIO
tag per sub-word token: ``O``, then ``B-`` and ``I-`` of each type (``head_labels``).

Serving: the tokenizer gives each token its character offsets and word; a word's tag is its
first token's (``aggregation: first``) or the argmax of its tokens' mean scores
(``average``); consecutive words tagged ``B-X I-X ...`` make one entity (an ``I-X`` after
anything but X starts one, as seqeval's default mode reads it). A text longer than the
model's ``max_length`` is read in overlapping windows (``window_stride`` tokens shared), each
token taken from the window where it sits furthest from an edge, so no text is cut.

Feedback is the corrected entity list, ``[{"start", "end", "label"}]`` into the text: spans
in range, non-empty, not overlapping and of known types, or 422. Training labels the first
token of each word by the first span the word overlaps (``B-`` at the span's first word) and
-100 elsewhere; evaluation reads a text as serving does (in windows, each word tagged by
``aggregation``), turns the word tags back into entities and scores them with seqeval, per
type and micro-averaged (``f1`` is what the gate compares).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

from tuneloop.core.errors import InvalidBody, InvalidValue, json_type, quoted
from tuneloop.core.evaluation import ClassMetrics, EvalMetrics
from tuneloop.core.tasks.base import ListOf, StructOf, Task, has_visible_text

IGNORE = -100  # the loss skips these positions (special tokens, padding, continuation pieces)
SPAN = StructOf((("start", "int64"), ("end", "int64"), ("label", "string")))
SCORED_SPAN = StructOf((("start", "int64"), ("end", "int64"), ("label", "string"), ("score", "float32")))


def entity_types(labels: Sequence[str]) -> list[str]:
    """The entity types a config's labels name: the labels themselves, or, for a BIO tag
    list (every label ``O``, ``B-X`` or ``I-X``), its types in order of first mention."""
    if "O" in labels and all(x == "O" or x[:2] in ("B-", "I-") for x in labels):
        types = list(dict.fromkeys(x[2:] for x in labels if x != "O"))
        if not types:
            raise ValueError(f"labels {list(labels)} name no entity type: give the types (PER, LOC, ...)")
        bad = [f"{x!r}" for x in labels if x != "O" and x[2:] in ("", "O")]
        if bad:
            raise ValueError(f"labels {', '.join(bad)} name the entity type {'O' if 'O' in types else 'empty'}: "
                             "O is no entity and a type needs a name")
        return types
    bad = [x for x in labels if x == "O" or x[:2] in ("B-", "I-")]
    if bad:
        raise ValueError(f"labels {bad} look like BIO tags: give the entity types (PER, LOC, ...) or every tag with O")
    return list(labels)


def bio_entities(words: list[tuple[int, int, str, float]]) -> list[dict[str, Any]]:
    """Entities from words in text order, each (start, end, tag, score): ``B-X`` opens one,
    ``I-X`` continues an X (or opens one after anything else), ``O`` closes. An entity's
    score is its words' mean."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for start, end, tag, score in words:
        kind = tag[2:] if tag != "O" else None
        if kind is not None and tag.startswith("I-") and current is not None and current["label"] == kind:
            current["end"], current["scores"] = end, current["scores"] + [score]
            continue
        if current is not None:
            out.append(current)
        current = {"start": start, "end": end, "label": kind, "scores": [score]} if kind else None
    if current is not None:
        out.append(current)
    return [{"start": e["start"], "end": e["end"], "label": e["label"], "score": sum(e["scores"]) / len(e["scores"])}
            for e in out]


def tagged_tokens(tokens: list[str], tags: list[str], types: list[str]) -> dict[str, Any]:
    """A sentence given as tokens with BIO tags (CoNLL's layout) as text and entity spans:
    the tokens joined by single spaces, each entity from its B- (or stray I-) token to the
    last I- of the same type."""
    if len(tokens) != len(tags):
        raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags")
    plain = sorted({t for t in tags if t != "O" and t[:2] not in ("B-", "I-")})
    if plain:  # cut as BIO tags, a plain "LOC" read as type "C", said to be outside [PER, LOC]
        raise ValueError(f"tags {plain} are not BIO tags: each tag is O, B-<type> or I-<type> "
                         f"(the model's types: {types})")
    unknown = sorted({t[2:] for t in tags if t != "O" and t[2:] not in types})
    if unknown:
        raise ValueError(f"tags of types {unknown} outside the model's types {types}")
    words, at = [], 0
    for token, tag in zip(tokens, tags, strict=True):
        words.append((at, at + len(token), tag, 1.0))
        at += len(token) + 1
    return {"text": " ".join(tokens),
            "entities": [{k: e[k] for k in ("start", "end", "label")} for e in bio_entities(words)]}


def _through_marks(text: str, end: int) -> int:
    """A word's end moved past the marks that follow it: an uncased tokenizer strips every
    nonspacing mark (category Mn), so the token of "cafe\u0301" ended before its accent and
    the entity cut "café". ``combining()`` is 0 for many Mn marks (Devanagari vowel signs and
    anusvara, the emoji variation selector): "बेंगलुरु" lost its last sign."""
    while end < len(text) and (unicodedata.category(text[end]) == "Mn" or unicodedata.combining(text[end])):
        end += 1
    return end


def _trimmed(text: str):
    """An entity's span without the whitespace at its edges, and its text. A byte-level BPE
    (GPT-2's) or SentencePiece tokenizer (DeBERTa's) gives a word its leading space: every
    entity past the first word began with one, and the same span sent back as feedback was
    refused ("begins or ends with whitespace")."""
    def trim(e: dict[str, Any]) -> dict[str, Any]:
        covered = text[e["start"]:e["end"]]
        start = e["start"] + len(covered) - len(covered.lstrip())
        end = max(start, e["end"] - (len(covered) - len(covered.rstrip())))
        return {**e, "start": start, "end": end, "text": text[start:end]}
    return trim


def _tokens_of_text(encoding: dict[str, list], windows: list[int]) -> list[tuple[int, int, int, int, int]]:
    """One text's tokens from its ``windows`` (rows of the encoding): (word, start, end,
    window, position), each token once, from the window where it is furthest from an edge."""
    best: dict[tuple[int, int], tuple[int, tuple[int, int, int, int, int]]] = {}
    for w in windows:
        words = encoding["word_ids"][w]
        content = [j for j, word in enumerate(words) if word is not None]
        if not content:
            continue
        first, last = content[0], content[-1]
        previous = None
        for j in content:
            start, end = encoding["offset_mapping"][w][j]
            if end <= start or (start, end) == previous:
                # A token of no characters (some tokenizers' word-start markers), or a later
                # piece of one character (a byte-level BPE splits "М" or an emoji in several
                # tokens of the same offsets): the first piece is the one training labels.
                continue
            previous = (start, end)
            centre = min(j - first, last - j)
            if (start, end) not in best or centre > best[(start, end)][0]:
                best[(start, end)] = (centre, (words[j], start, end, w, j))
    return sorted((t for _, t in best.values()), key=lambda t: t[1])


class TokenClassification(Task):
    name = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    gate_metric = "f1"
    tokenizer_options = {"return_offsets_mapping": True}
    needs_word_ids = True
    options = ("aggregation", "window_stride")
    reads_rows = True  # CoNLL files give tokens and tags; spans are checked row by row
    prediction_columns = {"entities": ListOf(SCORED_SPAN)}
    feedback_fields = ("entities",)
    feedback_columns = {"predicted_entities": ListOf(SPAN), "entities": ListOf(SPAN)}
    target_columns = ("entities",)
    # Each entity as three numbers, start, end and type index, one after the other: a flat
    # int64 list column, the plainest Arrow type for the workers' tables and trained_on.
    training_columns = {"spans": ListOf("int64")}

    def __init__(self, labels: Sequence[str], aggregation: str = "first", window_stride: int | None = None):
        super().__init__(labels)
        if aggregation not in ("first", "average"):
            raise ValueError(f"aggregation must be 'first' or 'average', got {aggregation!r}")
        self.types = entity_types(labels)
        self.aggregation = aggregation
        self.window_stride = window_stride

    def label_names(self) -> list[str]:
        return self.types  # however the config wrote them (types, or their BIO tags): PER, not B-PER

    def head_labels(self) -> list[str]:
        return ["O"] + [f"{p}-{t}" for t in self.types for p in ("B", "I")]

    def serving_tokenizer_options(self, max_length: int) -> dict[str, Any]:
        """Windows over long texts: each shares ``window_stride`` tokens (default a quarter
        of ``max_length``) with the one before."""
        stride = self.window_stride if self.window_stride is not None else max_length // 4
        return {**self.tokenizer_options, "return_overflowing_tokens": True,
                "stride": max(0, min(stride, max_length // 2))}

    def window_rows(self, tokenizer: Any, rows: dict[str, list], max_length: int) -> dict[str, list]:
        """A text longer than ``max_length`` tokens as a row per serving window: the text from
        the window's first token to its last, its spans shifted there (those that overlap it;
        one begun before it keeps its start before 0, so its words there tag I-). A training
        step then holds ``batch_size`` windows, as many as it held texts: with every window
        of a batch's texts in one step, a long seed document made one step of hundreds."""
        texts = [str(t) for t in rows["text"]]
        if not texts:
            return rows
        enc = tokenizer(texts, truncation=True, max_length=max_length, **self.serving_tokenizer_options(max_length))
        windows: dict[int, list[tuple[int, int]]] = {}
        for w, t in enumerate(enc["overflow_to_sample_mapping"]):
            content = [(a, b) for a, b in enc["offset_mapping"][w] if b > a]
            if content:
                windows.setdefault(int(t), []).append((content[0][0], max(b for _, b in content)))
        if all(len(windows.get(t, ())) <= 1 for t in range(len(texts))):
            return rows  # every text fits one window: the rows as they are
        out: dict[str, list] = {k: [] for k in rows}
        for t, text in enumerate(texts):
            ranges = windows.get(t, [])
            for a, b in ranges if len(ranges) > 1 else [(None, None)]:  # a text of one window: as it is
                for k, column in rows.items():
                    out[k].append(column[t])
                if a is not None:
                    out["text"][-1] = text[a:b]
                    out["spans"][-1] = [x for s, e, y in _triples(rows["spans"][t]) if s < b and e > a
                                        for x in (s - a, e - a, y)]
        return out

    # -- serving -----------------------------------------------------------------------
    def answers(self, texts, scores, head, encoding) -> list[dict[str, Any]]:
        out = []
        for text, words in zip(texts, self._words(len(texts), encoding, scores), strict=True):
            tagged = []
            for start, end, probs in words:
                best = max(range(len(head)), key=probs.__getitem__)
                tagged.append((start, _through_marks(text, end), head[best], probs[best]))
            out.append({"entities": [e for e in map(_trimmed(text), bio_entities(tagged)) if e["start"] < e["end"]]})
        return out

    def _words(self, n_texts: int, encoding: dict[str, list], scores: list) -> list[list[tuple[int, int, list]]]:
        """Per text, its words in text order as (start, end, scores): each token read once
        from the window where it sits furthest from an edge, and a word's scores its first
        token's (``aggregation: first``) or its tokens' mean (``average``)."""
        rows = encoding.get("overflow_to_sample_mapping") or list(range(n_texts))
        windows: dict[int, list[int]] = {}
        for w, t in enumerate(rows):
            windows.setdefault(int(t), []).append(w)
        out = []
        for t in range(n_texts):
            by_word: dict[int, list[tuple[int, int, list[float]]]] = {}
            for word, start, end, w, j in _tokens_of_text(encoding, windows.get(t, [])):
                by_word.setdefault(word, []).append((start, end, scores[w][j]))
            words = []
            for tokens in by_word.values():
                probs = tokens[0][2] if self.aggregation == "first" else \
                    [sum(p[k] for _, _, p in tokens) / len(tokens) for k in range(len(tokens[0][2]))]
                words.append((tokens[0][0], tokens[-1][1], probs))
            out.append(sorted(words, key=lambda w: w[:2]))
        return out

    def prediction_record(self, answer: dict[str, Any]) -> dict[str, Any]:
        return {"entities": [{k: e[k] for k in ("start", "end", "label", "score")} for e in answer["entities"]]}

    # -- feedback ----------------------------------------------------------------------
    def check_feedback_fields(self, fields: dict[str, Any]) -> None:
        super().check_feedback_fields(fields)
        entities = fields["entities"]
        if not isinstance(entities, list):
            raise InvalidBody(f'"entities" must be a list of {{"start", "end", "label"}}, not {json_type(entities)}')
        for i, e in enumerate(entities):
            if not isinstance(e, dict) or not {"start", "end", "label"} <= set(e) or set(e) - {"start", "end", "label",
                                                                                               "text", "score"}:
                # "text" and "score" as a prediction gives them: its entities can be sent back as they are.
                raise InvalidBody(f'entities[{i}] must be {{"start", "end", "label"}}, and optionally "text" and '
                                  f'"score" as a prediction gives them, got {quoted(e)}')
            if any(type(e[k]) is not int for k in ("start", "end")) or not isinstance(e["label"], str):
                raise InvalidBody(f"entities[{i}]: start and end must be integers and label a string, got {quoted(e)}")

    def feedback_target(self, model: str, fields: dict[str, Any], text: str) -> dict[str, Any]:
        try:
            # Not quoting the text: feedback by prediction id checks spans against a text another
            # client sent, which an error would otherwise hand to whoever holds the id.
            return {"entities": self._checked_spans(fields["entities"], text, quote=False)}
        except ValueError as e:
            raise InvalidValue(f"model {model!r}: {e}") from None

    def _checked_spans(self, entities: list[dict[str, Any]], text: str, quote: bool = True) -> list[dict[str, Any]]:
        """``entities`` in text order as {start, end, label}, or ValueError: a type the model
        does not know, a span outside the text or empty, an echoed ``text`` that is not the
        text there, a span of whitespace or with whitespace at an edge, or two spans that overlap."""
        entities = [{**e, "label": self.spelled_as_configured(e["label"], self.types)} for e in entities]
        for e in entities:
            where = f"entity {e['start']}..{e['end']} ({e['label']})"
            if e["label"] not in self.types:
                raise ValueError(f"{where}: unknown type; the model knows {self.types}")
            if not 0 <= e["start"] < e["end"] <= len(text):
                raise ValueError(f"{where}: not a span of the text, which has {len(text)} characters")
            covered = text[e["start"]:e["end"]]
            shown = f" {covered!r}" if quote else ""
            if e.get("text") is not None and e["text"] != covered:
                raise ValueError(f"{where}: says {e['text']!r} but the text there is not that"
                                 + (f": it is {covered!r}" if quote else ""))
            if not has_visible_text(covered):
                raise ValueError(f"{where}: covers only whitespace, control or format characters")
            if covered != covered.strip():  # a word it does not cover would count as missed for good
                start = e["start"] + len(covered) - len(covered.lstrip())
                raise ValueError(f"{where}:{shown} begins or ends with whitespace; the entity is "
                                 f"{start}..{start + len(covered.strip())}")
        spans = sorted(({"start": e["start"], "end": e["end"], "label": e["label"]} for e in entities),
                       key=lambda e: (e["start"], e["end"]))
        for a, b in zip(spans, spans[1:]):
            if b["start"] < a["end"]:
                raise ValueError(f"entities {a['start']}..{a['end']} and {b['start']}..{b['end']} overlap")
        return spans

    def predicted(self, served: dict[str, Any]) -> dict[str, Any]:
        return {"predicted_entities": [{k: e[k] for k in ("start", "end", "label")} for e in served["entities"]]}

    def feedback_labels(self, row: dict[str, Any]) -> list[str]:
        return [e["label"] for e in row["entities"]] or ["O"]

    def agrees(self, row: dict[str, Any]) -> bool:
        def key(spans):
            return sorted((e["start"], e["end"], e["label"]) for e in spans or [])
        return row.get("predicted_entities") is not None and key(row["entities"]) == key(row["predicted_entities"])

    def label_outcomes(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        """Per entity: served and in the corrected list (right), served only (wrong), the
        user's only (missed), by its type."""
        if row.get("predicted_entities") is None:
            return []
        served = {(e["start"], e["end"], e["label"]) for e in row["predicted_entities"]}
        said = {(e["start"], e["end"], e["label"]) for e in row["entities"] or []}
        return sorted([(e[2], "right") for e in served & said] + [(e[2], "wrong") for e in served - said]
                      + [(e[2], "missed") for e in said - served])

    # -- training ----------------------------------------------------------------------
    def dataset_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """``{"text", "entities": [{"start", "end", "label"}]}``, or CoNLL's ``{"tokens",
        "tags"}`` (BIO tags per token; the text is the tokens joined by spaces)."""
        if row.get("tokens") is not None and row.get("tags") is not None:
            tokens, tags = row["tokens"], row["tags"]
            if not isinstance(tokens, list) or any(not isinstance(t, str) for t in tokens):
                raise ValueError(f'"tokens" must be a list of strings, got {str(tokens)[:200]}')
            if isinstance(tags, list) and tags and all(type(t) is int for t in tags):
                tags = self._tag_names(tags)
            if not isinstance(tags, list) or any(not isinstance(t, str) for t in tags):
                raise ValueError(f'"tags" must be a list of BIO tags (or of their ids), got {str(tags)[:200]}')
            tags = [t[:2] + self.spelled_as_configured(t[2:], self.types) if t[:2] in ("B-", "I-") else t
                    for t in tags]
            row = tagged_tokens(tokens, tags, self.types)
            return {"text": row["text"], "entities": self._checked_spans(row["entities"], row["text"])}
        if not isinstance(row.get("text"), str) or not isinstance(row.get("entities"), list):
            # Which one, and what it held: a JSONL row without "entities" read as null, and the
            # message named keys the row seemed to have ("got keys ['entities', 'text']").
            found = {k: json_type(row.get(k)) for k in ("text", "entities")}
            raise ValueError('a row needs "text" (a string) and "entities" (a list, [] for none), or "tokens" and '
                             f'"tags"; got text: {found["text"]}, entities: {found["entities"]}')
        for e in row["entities"]:
            if not isinstance(e, dict) or any(type(e.get(k)) is not int for k in ("start", "end")) \
                    or not isinstance(e.get("label"), str):
                raise ValueError(f'each entity needs integer "start", "end" and a "label", got {e!r}')
        return {"text": row["text"], "entities": self._checked_spans(row["entities"], row["text"])}

    def _tag_names(self, ids: list[int]) -> list[str]:
        """Tags given as ids (Hugging Face's ``conll2003`` ``ner_tags``): the config's labels,
        written as BIO tags in the ids' order, name them."""
        if "O" not in self.labels:
            raise ValueError(f"tags given as numbers need the model's labels written as BIO tags in the numbers' "
                             f"order (O, B-PER, I-PER, ...), not the entity types {self.labels}")
        bad = sorted({t for t in ids if not 0 <= t < len(self.labels)})
        if bad:
            raise ValueError(f"tag ids {bad[:10]} are not ids of the model's {len(self.labels)} labels")
        return [self.labels[t] for t in ids]

    def training_targets(self, columns: dict[str, list]) -> dict[str, list]:
        index = {t: i for i, t in enumerate(self.types)}
        unknown = sorted({e["label"] for spans in columns["entities"] for e in spans or [] if e["label"] not in index})
        if unknown:
            raise ValueError(f"rows have entity types {unknown} outside the model's types {self.types}")
        return {"spans": [[v for e in spans or [] for v in (e["start"], e["end"], index[e["label"]])]
                          for spans in columns["entities"]]}

    def stratum(self, targets: dict[str, Any]) -> str:
        """Rows are sampled by the set of types they mention ('' for none)."""
        return ",".join(sorted({e["label"] for e in targets["entities"] or []}))

    def batch_targets(self, batch: dict[str, list], encoding: dict[str, list]) -> list[list[int]]:
        out = []
        for row, spans in enumerate(batch["spans"]):
            triples = _triples(spans)
            words, offsets = encoding["word_ids"][row], encoding["offset_mapping"][row]
            extent: dict[int, tuple[int, int]] = {}  # word -> its tokens' first start and last end
            for word, (start, end) in zip(words, offsets, strict=True):
                if word is not None and end > start:
                    first, last = extent.get(word, (start, end))
                    extent[word] = (min(first, start), max(last, end))
            tags, previous_word, previous_span = [], None, None
            for word, (start, end) in zip(words, offsets, strict=True):
                if word is None or word == previous_word or end <= start:
                    tags.append(IGNORE)  # special, padding, or a word's continuation piece
                    continue
                span = _span_of(triples, *extent[word])
                if previous_word is None and span is not None and span[0] < extent[word][0]:
                    previous_span = span  # a window that begins inside an entity: I- here, as in the text
                previous_word = word
                tags.append(_tag_id(span, previous_span))
                previous_span = span
            out.append(tags)
        return out

    def evaluated(self, batch: dict[str, list], encoding: dict[str, list], scores: list) -> tuple[list, list]:
        """Per text, the tags of every word, read over all of its windows as serving reads it
        (a text cut at ``max_length`` lost its later words from the truth and the answer alike,
        and a model right in the first window alone scored F1 1.0)."""
        y_true, y_pred = [], []
        for spans, words in zip(batch["spans"], self._words(len(batch["spans"]), encoding, scores), strict=True):
            triples, truth, previous_span = _triples(spans), [], None
            for start, end, _ in words:
                span = _span_of(triples, start, end)
                truth.append(_tag_id(span, previous_span))
                previous_span = span
            y_true.append(truth)
            y_pred.append([max(range(len(p)), key=p.__getitem__) for _, _, p in words])
        return y_true, y_pred

    def predictions(self, scores: list, encoding: dict[str, list]) -> list[list[int]]:
        """The model's tag at each position ``batch_targets`` labels, IGNORE elsewhere."""
        out = []
        for row, token_scores in enumerate(scores):
            words, previous_word, kept = encoding["word_ids"][row], None, []
            for j, (word, (start, end)) in enumerate(zip(words, encoding["offset_mapping"][row], strict=True)):
                if word is None or word == previous_word or end <= start:
                    kept.append(IGNORE)
                    continue
                previous_word = word
                kept.append(max(range(len(token_scores[j])), key=token_scores[j].__getitem__))
            out.append(kept)
        return out

    def answered_right(self, target: list[int], predicted: list[int]) -> bool:
        """The same entities, as serving decodes them: ``I-PER I-PER`` is ``B-PER I-PER``."""
        head = self.head_labels()
        pairs = [(t, p) for t, p in zip(target, predicted, strict=True) if t != IGNORE]
        return tag_entities([head[t] for t, _ in pairs]) == tag_entities([head[p] for _, p in pairs])

    def metrics(self, y_true: list, y_pred: list) -> EvalMetrics:
        return entity_metrics(y_true, y_pred, self.head_labels(), self.types)


def _triples(spans: list[int]) -> list[tuple[int, int, int]]:
    """A row's flat ``spans`` column as (start, end, type index) triples."""
    return [(int(spans[k]), int(spans[k + 1]), int(spans[k + 2])) for k in range(0, len(spans), 3)]


def _span_of(triples: list[tuple[int, int, int]], start: int, end: int) -> tuple[int, int, int] | None:
    """The first span a word (``start``..``end``, all of its tokens) overlaps. By its first
    token's start alone, "Smith" in "JohnSmith" or "15" in "iPhone15" matched no word, and
    a user's entity trained as O."""
    return next(((s, e, t) for s, e, t in triples if s < end and start < e), None)


def _tag_id(span: tuple[int, int, int] | None, previous_span: tuple[int, int, int] | None) -> int:
    """A word's tag id in ``head_labels`` order: O, or B- at a span's first word and I- after
    a word of the same span."""
    return 0 if span is None else 1 + 2 * span[2] + (span == previous_span)


def tag_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """The entities of a BIO tag sequence, (type, first word, last word), read as seqeval
    and serving read them (an ``I-`` after another type or ``O`` begins an entity)."""
    from seqeval.metrics.sequence_labeling import get_entities

    return get_entities(tags)


def entity_metrics(y_true: list[list[int]], y_pred: list[list[int]], head: list[str], types: list[str]) -> EvalMetrics:
    """Entity-level precision, recall and F1 (seqeval's default, CoNLL-style), micro-averaged
    over entities (``precision``, ``recall``, ``f1``) and per type (``per_class``).
    ``accuracy`` is the share of texts whose entities were all found, and nothing else: what
    a user's feedback agreeing with a prediction means (``agrees``), so online accuracy and
    the accuracy-drop trigger compare like with like; ``tag_accuracy`` is per word, and
    ``confusion`` counts words by true and predicted tag (``head`` order), so the gate's
    sanity check sees a model that collapsed to tagging everything O."""
    from seqeval.metrics import classification_report

    true_tags, pred_tags, right, words, exact = [], [], 0, 0, 0
    confusion = [[0] * len(head) for _ in head]
    for t_row, p_row in zip(y_true, y_pred, strict=True):
        pairs = [(t, p) for t, p in zip(t_row, p_row, strict=True) if t != IGNORE]
        for t, p in pairs:
            confusion[t][p] += 1
        true_tags.append([head[t] for t, _ in pairs])
        pred_tags.append([head[p] for _, p in pairs])
        right += sum(t == p for t, p in pairs)
        words += len(pairs)
        exact += tag_entities(true_tags[-1]) == tag_entities(pred_tags[-1])
    if not words:
        return EvalMetrics(accuracy=0.0, precision=0.0, recall=0.0, f1=0.0, eval_rows=len(y_true), confusion=confusion)
    report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    # No entity in the truth: all three are the share of texts where none was predicted
    # (1.0 when none was). seqeval's 0 scored a production with one stray entity as low as a
    # candidate tagging every word, and the gate passed it.
    if not any(map(tag_entities, true_tags)):
        micro = {"precision": exact / len(y_true), "recall": exact / len(y_true), "f1-score": exact / len(y_true)}
    else:
        micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    per_type = {t: ClassMetrics(precision=report[t]["precision"], recall=report[t]["recall"],
                                f1=report[t]["f1-score"], support=int(report[t]["support"]))
                for t in types if t in report}
    return EvalMetrics(accuracy=exact / len(y_true), precision=micro["precision"], recall=micro["recall"],
                       f1=micro["f1-score"], eval_rows=len(y_true), per_class=per_type, confusion=confusion,
                       tag_accuracy=right / words)
