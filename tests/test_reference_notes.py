"""Every citation of the project's reference notes resolves to a heading or numbered item of `docs/reference.md`.

Citations look like "reference §2.3", "reference 5.3", "reference section 1.3-1.4", "§2.1, §2.3, §2.4",
"reference §9 item 1", "§9 items 1-2", "quirk 9.10", "reference 1.4 and 9.18", "reference §8". A key "N" needs a
heading `## N.`; a key "N.M" needs a heading `### N.M` or item M of a numbered list directly under `## N.`
("quirk 9.3" and "§9 item 3" are both the key "9.3"). Fast: text only, no torch, no training.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / 'docs' / 'reference.md'

# --- citations ---------------------------------------------------------------------------------------------------

_NUM = r'\d{1,2}(?!\d)(?:\.\d{1,2}(?!\d))?'
_ITEMS = r'(?:\s+items?\s+\d{1,2}(?!\d)(?:\s*[-–]\s*\d{1,2}(?!\d))?)?'
_REF = rf'(?:§\s?)?{_NUM}{_ITEMS}'
_SEP = r'\s*(?:,|and|&|to|[-–])\s*'
_LIST = rf'{_REF}(?:{_SEP}{_REF})*'
# what introduces a citation: "reference [notes] [section(s)|§]", a bare "§", "quirk(s)"
CITATION = re.compile(rf'(?:\breference\s+(?:notes?\s+)?(?:sections?\s+)?|(?=§)|\bquirks?\s+)(?P<list>{_LIST})', re.I)
_PART = re.compile(rf'(?P<sep>{_SEP})?(?:§\s?)?(?P<num>{_NUM})'
                   r'(?:\s+items?\s+(?P<i1>\d{1,2})(?:\s*[-–]\s*(?P<i2>\d{1,2}))?)?')


def _split(key):
    major, _, minor = key.partition('.')
    return int(major), (int(minor) if minor else None)


def _range(a, b):
    "Keys from `a` to `b` inclusive ('1.3'-'1.4', '2'-'3'); just both ends when they are not comparable."
    (ma, na), (mb, nb) = _split(a), _split(b)
    if na is None and nb is None and ma <= mb:
        return [str(m) for m in range(ma, mb + 1)]
    if na is not None and nb is not None and ma == mb and na <= nb:
        return [f'{ma}.{n}' for n in range(na, nb + 1)]
    return [a, b]


def parse_citation_list(text):
    "The keys of one citation list: '§9 items 1-2' -> ['9.1', '9.2'], '1.3-1.4' -> ['1.3', '1.4']."
    keys = []
    for m in _PART.finditer(text):
        num, i1, i2, sep = m['num'], m['i1'], m['i2'], (m['sep'] or '').strip()
        if i1:                                                       # "§9 item 3", "§9 items 1-2"
            new = [f'{num}.{i}' for i in range(int(i1), int(i2 or i1) + 1)]
        elif sep in ('-', '–', 'to') and keys:                        # "1.3-1.4", "2 to 3"
            new = _range(keys.pop(), num)
        else:
            new = [num]
        keys.extend(new)
    return keys


def citations(text):
    "(key, citing snippet) for every citation of the reference notes in `text`."
    out = []
    for m in CITATION.finditer(text):
        snippet = ' '.join(text[max(0, m.start() - 40):m.end() + 10].split())
        out.extend((k, snippet) for k in parse_citation_list(m['list']))
    return out


# --- the notes' anchors ------------------------------------------------------------------------------------------

_HEADING = re.compile(r'^(#{1,6})\s+(\d{1,2}(?:\.\d{1,2})?)(?=[.\s])')
_ITEM = re.compile(r'^(\d{1,2})\.\s')


def anchors(markdown):
    """Map key -> its text for every numbered heading ('8', '2.3', '9.10') and every numbered item of a list that
    sits directly under a `## N.` heading, before any subsection ('11.2'). Fenced blocks are skipped."""
    found, dup = {}, []
    section, in_sub, fenced, current = None, False, False, None
    for line in markdown.splitlines():
        if line.lstrip().startswith('```'):
            fenced = not fenced
        if fenced:
            if current: found[current].append(line)
            continue
        h = _HEADING.match(line)
        if h:
            key = h[2]
            if key in found: dup.append(key)
            if '.' in key:
                in_sub = True
            else:
                section, in_sub = key, False
            found[key], current = [line], key
            continue
        if line.startswith('#'):                                     # an unnumbered heading ends the section
            section, in_sub, current = None, False, None
            continue
        i = _ITEM.match(line)
        if i and section is not None and not in_sub:
            key = f'{section}.{i[1]}'
            if key in found: dup.append(key)
            found[key], current = [line], key
            continue
        if current:
            found[current].append(line)
    assert not dup, f'numbers used twice in the notes: {dup}'
    return {k: '\n'.join(v) for k, v in found.items()}


def section_text(notes, key):
    "The text of a whole top-level section or subsection, subsections and items included."
    return '\n'.join(v for k, v in notes.items() if k == key or k.startswith(key + '.'))


def dangling(text, notes):
    "The citations in `text` that resolve to no anchor of `notes`."
    return [(k, s) for k, s in citations(text) if k not in notes]


# --- the repository's texts --------------------------------------------------------------------------------------

def _sources():
    "(path, text): Markdown files, notebook cell sources (markdown and code, no outputs) and the library's modules."
    paths = [*ROOT.glob('*.md'), *ROOT.glob('docs/*.md'), *ROOT.glob('data/*.md'), *ROOT.glob('nbs/*.ipynb'),
             *ROOT.glob('declip/*.py')]
    for p in sorted(paths):
        if p.suffix == '.ipynb':
            cells = json.loads(p.read_text(encoding='utf-8'))['cells']
            text = '\n\n'.join(c['source'] if isinstance(c['source'], str) else ''.join(c['source']) for c in cells)
        else:
            text = p.read_text(encoding='utf-8')
        yield p.relative_to(ROOT).as_posix(), text


@pytest.fixture(scope='module')
def notes():
    assert REFERENCE.is_file(), 'docs/reference.md (the reference notes) is missing'
    return anchors(REFERENCE.read_text(encoding='utf-8'))


def test_notes_structure(notes):
    "Sections 0-12 all exist; section 9 numbers its quirks 9.1, 9.2, ... without gaps; no 'N.M' is ambiguous."
    assert {str(n) for n in range(13)} <= set(notes)
    quirks = sorted(_split(k)[1] for k in notes if k.startswith('9.'))
    assert quirks == list(range(1, len(quirks) + 1)) and len(quirks) >= 18
    for s in {k.split('.')[0] for k in notes}:
        subs = [k for k in notes if k.startswith(s + '.')]
        has_heading = any(_HEADING.match(notes[k]) for k in subs)
        has_item = any(_ITEM.match(notes[k]) for k in subs)
        assert not (has_heading and has_item), f'section {s} numbers both subsections and list items'


# What a citing sentence relies on, for the citations the code and notebooks lean on most: the cited part of the
# notes must still say it (guards against renumbering).
EXPECTED = {
    '1.1': ['causal', 'text_projection'], '1.2': ['49406', '49,409', 'truncated'], '1.4': ['frozen', 'patch'],
    '2.2': ['SimSiam', '1024'], '2.3': ['mask_tokens.py', '0.15', 'EDA caption'], '2.4': ['MOCOV2', 'EDA'],
    '2.5': ['FIFO', '65536'], '3': ['ONECROP', '#28'], '4': ['AdamW', 'warmup_lr', 'Weight-decay'],
    '5.1': ['label_name', 'ONECROP'], '5.2': ['prompt80'], '5.3': ['FILIP', 'global features'],
    '5.4': ['11 datasets', 'pre-projection'], '5.5': ['no retrieval'], '6.1': ['SimCLR', 'ln_post(CLS)'],
    '6.2': ['top_k=16', 'padding'], '8': ['ablation'], '8.2': ['60.4', '59.6', '7.1×', '56M'],
    '9.1': ['EDA', 'model.forward'], '9.2': ['single word'], '9.3': ['MLM-masked', 'contrastive', 'causal'],
    '9.4': ['FILIP', 'padding'], '9.5': ['top-k', '2022-05-20'], '9.6': ['SLIP', 'FILIP', 'max-100'],
    '9.10': ['bank', 'random', 'checkpoints'], '9.11': ['in_proj_bias'], '9.18': ['patch embedding', 'frozen'],
    '10': ['Fini'],
}


@pytest.mark.parametrize('key', sorted(EXPECTED))
def test_cited_parts_say_what_is_relied_on(notes, key):
    text = section_text(notes, key)
    assert text, f'{key} is not in the notes'
    missing = [w for w in EXPECTED[key] if w not in text]
    assert not missing, f'reference {key} no longer mentions {missing}'


def test_every_citation_resolves(notes):
    found, bad = 0, []
    for path, text in _sources():
        cites = citations(text)
        found += len(cites)
        bad += [f'{path}: {k!r} in "{s}"' for k, s in dangling(text, notes)]
    assert found >= 30, f'only {found} citations found: is the citation pattern still right?'
    assert not bad, 'citations that resolve to nothing in docs/reference.md:\n' + '\n'.join(bad)


# --- the checker checks itself -----------------------------------------------------------------------------------

TOY_NOTES = """# Toy notes
## 1. One
### 1.1 First
```
## 7. not a heading inside a fence
```
## 2. Two
## 9. Quirks
### 9.1 A quirk
### 9.2 Another
## 11. Questions
1. first
2. second
"""


def test_parser_on_known_forms():
    assert parse_citation_list('§9 items 1-2') == ['9.1', '9.2']
    assert parse_citation_list('1.3-1.4') == ['1.3', '1.4']
    assert parse_citation_list('§2.1, §2.3, §2.4') == ['2.1', '2.3', '2.4']
    keys = [k for k, _ in citations('used for every ViT run, reference 1.4 and\n  9.18); see reference section 4, '
                                    'quirk 9.10, (reference §8.2). Reference check: none; a reference 2022 run')]
    assert keys == ['1.4', '9.18', '4', '9.10', '8.2']
    notes = anchors(TOY_NOTES)
    assert set(notes) == {'1', '1.1', '2', '9', '9.1', '9.2', '11', '11.1', '11.2'}


def test_a_dangling_citation_fails():
    notes = anchors(TOY_NOTES)
    ok = 'see reference §1.1, quirk 9.2, §9 items 1-2, reference section 2 and §11 item 2'
    assert dangling(ok, notes) == []
    bad = 'see reference §1.2, quirk 9.3, §9 item 10, reference 7 and §11 items 2-3'
    assert [k for k, _ in dangling(bad, notes)] == ['1.2', '9.3', '9.10', '7', '11.3']
    with pytest.raises(AssertionError):
        assert not dangling(bad, notes)
