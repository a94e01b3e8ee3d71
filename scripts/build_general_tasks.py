"""python scripts/build_general_tasks.py --python-doc-deb python3.11-doc_3.11.2-6+deb12u9_all.deb

Rebuild the data of the two lm-evaluation-harness tasks shipped in ``hf_ewc/resources/lm_eval`` — the small,
offline "general ability" probes of the embedded default (whose first domain, English prose from the Python docs,
acts as its pretraining):

* ``prose_cloze.jsonl.gz`` (task ``hf_ewc_prose_cloze``, multiple choice): a sentence of English prose cut after
  about half its words; the model must pick the true ending among four, the other three being endings of other
  sentences of similar length. Chance is 0.25.
* ``prose_paragraphs.jsonl.gz`` (task ``hf_ewc_prose_ppl``, rolling log-likelihood): whole paragraphs, for word and
  byte perplexity and bits per byte.

Both come from the Python 3.11 documentation pages that the ``python_docs`` corpus did *not* draw from (held out:
no page of the evaluation data was seen in training), and every sentence and paragraph is checked not to occur in
any of the three demo corpora. Each record has a ``split`` field: ``validation`` (few-shot examples) or ``test``.
Same requirements and ``--python-doc-deb``/``--python-doc-dir`` options as ``build_corpora.py``; the output is
byte-identical for the same doc sources.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

from build_corpora import DOC_SECTIONS, doc_extract, list_files, normalise, python_doc_sources, rank, write_jsonl_gz


CORPORA = Path(__file__).resolve().parent.parent / "hf_ewc" / "resources" / "corpora"
CLOZE_ITEMS = 240
PARAGRAPHS = 120
VALIDATION = 20  # per task: the few-shot pool
SENTENCE = re.compile(r"(?<=[a-z)][.!?])\s+(?=[A-Z])")
PROSE = re.compile(r"^[A-Za-z0-9 ,;:'()\-.!?\"]+$")


def corpus_texts() -> tuple[set[str], str]:
    """The sources the python_docs corpus used, and every corpus text with whitespace collapsed (overlap check)."""
    used, texts = set(), []
    for path in sorted(CORPORA.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                texts.append(" ".join(record["text"].split()))
                if path.name.startswith("python_docs"):
                    used.add(record["source"])
    return used, "\n".join(texts)


def paragraphs(root: Path, used: set[str]) -> list[tuple[str, str]]:
    """(source, paragraph) of plain prose from the held-out pages: no code, lists, tables or headings."""
    files = list_files(root, "*.rst.txt", lambda p: p.parts[0] in DOC_SECTIONS and p.as_posix() not in used)
    out = []
    for rel in files:
        text = doc_extract(root / rel)
        if not text:
            continue
        for block in normalise(text, 1).split("\n\n"):
            lines = block.split("\n")
            if any(not line or line[0].isspace() or line.lstrip()[:1] in "*-#=+|>" for line in lines):
                continue
            flat = " ".join(block.split())
            if len(flat.split()) >= 25 and PROSE.match(flat):
                out.append((rel.as_posix(), flat))
    return out


def cloze_items(paras: list[tuple[str, str]], corpus: str) -> list[dict]:
    sentences = []
    for source, para in paras:
        for sentence in SENTENCE.split(para):
            words = sentence.split()
            if 14 <= len(words) <= 40 and sentence.endswith(".") and sentence not in corpus:
                sentences.append((source, sentence))
    sentences = sorted(set(sentences), key=lambda s: rank("cloze", *s))
    items = []
    for source, sentence in sentences:
        if len(items) == CLOZE_ITEMS:
            break
        words = sentence.split()
        cut = max(6, len(words) // 2)
        context, ending = " ".join(words[:cut]), " ".join(words[cut:])
        size = len(ending.split())
        others = [
            " ".join(s.split()[max(6, len(s.split()) // 2) :])
            for src, s in sorted(sentences, key=lambda s: rank("distractor", sentence, *s))
            if src != source
        ]
        distractors = [o for o in others if abs(len(o.split()) - size) <= max(2, size // 4) and o != ending][:3]
        if len(distractors) < 3:
            continue
        label = int(rank("label", sentence), 16) % 4
        choices = distractors[:label] + [ending] + distractors[label:]
        items.append({"context": context, "choices": choices, "label": label, "source": source})
    return items


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default=str(CORPORA.parent / "lm_eval"), help="output directory")
    parser.add_argument("--python-doc-deb", help="use this python3.11-doc .deb instead of downloading one")
    parser.add_argument("--python-doc-dir", help="use this directory of *.rst.txt doc sources (html/_sources)")
    args = parser.parse_args()
    used, corpus = corpus_texts()
    with tempfile.TemporaryDirectory(prefix="build_general_tasks_") as tmp:
        root, origin = python_doc_sources(args, Path(tmp))
        paras = paragraphs(root, used)
    held_out = sorted({s for s, _ in paras})
    cloze = cloze_items(paras, corpus)
    chosen = [
        (s, p) for s, p in sorted(paras, key=lambda sp: rank("paragraph", *sp)) if p not in corpus and len(p) <= 1500
    ][:PARAGRAPHS]
    if len(cloze) < CLOZE_ITEMS or len(chosen) < PARAGRAPHS:
        sys.exit(f"error: only {len(cloze)} cloze items and {len(chosen)} paragraphs found; is the source complete?")
    records = {
        "prose_cloze.jsonl.gz": [
            {**item, "split": "validation" if i < VALIDATION else "test"} for i, item in enumerate(cloze)
        ],
        "prose_paragraphs.jsonl.gz": [
            {"text": p, "source": s, "split": "validation" if i < VALIDATION else "test"}
            for i, (s, p) in enumerate(chosen)
        ],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in records.items():
        write_jsonl_gz(out / name, rows)
        print(f"{name}: {len(rows)} records from {len({r['source'] for r in rows})} pages ({origin})")
    print(f"held-out pages with prose: {len(held_out)} (the python_docs corpus used {len(used)})")


if __name__ == "__main__":
    main()
