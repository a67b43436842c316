"""Every command in README.md and in the pages under docs/ works verbatim on a fresh clone (issues 15 and 37).

The commands are the lines of the ```bash blocks of README.md and of every docs/*.md page (backslash continuations
joined, blank lines and pure comment lines skipped), README first, then the docs pages in sorted order; a test's id
names its page and line (`README.md:L33:...`, `docs/data.md:L61:...`). Each one is, in this order of precedence:

- **marked**: its trailing comment contains `(not in CI: <reason>)` -- it needs what CI cannot have (GPUs, a
  cluster, CC3M, root, the network, another package index). Nothing is run.
- **covered by .ci/run**: CI runs it itself (the install, `nbdev_test`, `declip-reports --smoke`, ...); the test
  checks that .ci/run really contains it (`CI_COVERED`).
- **run**: verbatim, with `bash -c`, from the root of a fresh copy of the checkout (the files git tracks or would
  track, nothing git ignores: no `runs/`, no data cache), one torch thread, no GPU, in the order above, all pages
  sharing the one copy (a later command may use what an earlier one wrote, on its page or an earlier one), after the one smoke transformation of its command in `SMOKE` and the
  data preparation below. It must exit 0.
- anything else fails, naming the page, the line and the command: a new command cannot slip through unseen.

Data preparation, before a command runs:

- a data spec (`--train_data`, `--eval_data`, `--probe_data`, `-p train_data|eval_data|probe_data`) of kind csv, tsv,
  jsonl, imagefolder or wds whose path does not exist in the copy is written there, at the exact path the page
  uses: a few tiny PNGs and the CSV (the columns the spec names, else the `image_key`/`caption_key` defaults), the
  JSON lines (`filename`, `caption`), the class folders, or the shards (`KEY.png` + `KEY.txt`, with `sizes.json`);
- an `openclipart` spec without a root (or with Debian's) is pointed at the fake tree of
  `declip.openclipart.write_fake_openclipart` (`openclipart:ROOT[:k=v,...]`): fast, and the same with or without the
  Debian package;
- a checkpoint a command reads (`-p checkpoint PATH`, `declip-export PATH`) that no earlier command wrote is made by a
  tiny `declip-train` run.

The copy imports its own `declip` (PYTHONPATH), so that everything a run derives from the package's location (the
Open Clip Art cache in `data/`, `declip-reports`' checkout, `runs/study`) lies in the copy, never in the checkout.

Every relative link of these pages (`[text](path)`, images too) must name a file or folder that exists, and an
anchor into one of these pages a heading that it has (`test_relative_links_resolve`).
"""
import csv, json, os, re, shlex, shutil, subprocess, sys, tarfile, tempfile
from io import BytesIO
from pathlib import Path

import pytest

from helpers import cpu_env

ROOT = Path(__file__).resolve().parent.parent
README, CI_RUN = ROOT / 'README.md', ROOT / '.ci' / 'run'
PAGES = [README] + sorted((ROOT / 'docs').glob('*.md'))          # README first, then docs/ in sorted order
BIN = Path(sys.executable).parent
MARKER = re.compile(r'\(not in CI:\s*([^()]*(?:\([^()]*\)[^()]*)*)\)')
TIMEOUT = 600                          # seconds per command (each takes 15-60 s on the 2-core CPU)

# README command (whitespace-normalised, fullmatch) -> the line of .ci/run (regex, searched) that runs it or its smoke form
CI_COVERED = {
    r'pip install -e "\.\[dev\]"':        r'^\s*(quiet )?pip install (-q )?-e "\.\[dev\]"\s*$',
    r'nbdev_test( --n_workers \d+)?( --timing)?': r'^\s*nbdev_test\b',
    r'nbdev_clean':                        r'^\s*nbdev_clean\s*$',
    r'nbdev_export':                       r'^\s*nbdev_export\s*$',
    r'(python -m )?pytest( -q)? tests/?':  r'^\s*python -m pytest -q tests\s*$',
    r'declip-reports --smoke':             r'^\s*declip-reports --smoke\s*$',
    r'declip-reports --all':               r'^\s*declip-reports --smoke\s*$',   # the same, named explicitly
    r'python benchmarks/step\.py.*':       r'^\s*declip-reports --smoke\s*$',   # declip-reports --smoke runs it with --quick
}

# The smoke transformation, one row per kind of command segment (the parts of a command joined by `&&`):
# (segment regex, what the test does). The functions below implement each row.
TRAIN_CAPS = '--max_steps 2 --batch_size 8 --workers 0 --progress false --nn_queue_size 64'
SMOKE = [
    (r'^mkdir\b',                                     'verbatim'),
    (r'^(declip-train|declip-reports|declip-export|papermill)( .*)? (--help|-h|--help-notebook)\b.*', 'verbatim'),
    (r'^papermill nbs/evaluate\.ipynb\b',             'verbatim (the notebook has no smoke parameter); its `-p checkpoint` '
                                                      'is made first when no earlier command made it'),
    (r'^papermill nbs/\w+\.ipynb\b',                  'append `-p smoke True` (the notebook must declare `smoke`)'),
    (r'^declip-train\b',                              f'append `{TRAIN_CAPS}` (later flags win; the own ones stay)'),
    (r'^declip-reports\b(?!.*--smoke)',               'append `--smoke --out <tmp>`'),
    (r'^declip-reports\b.*--smoke',                   'verbatim (under the clone\'s runs/reports-smoke/)'),
    (r'^declip-export\b',                             'verbatim; its checkpoint is made first when no earlier command made it '
                                                      '(through `python -c` when this venv predates the script)'),
]
DATA_FLAGS = ('train_data', 'eval_data', 'probe_data')


# ---------------------------------------------------------------- the pages' commands

def fenced_blocks(text):
    "[(language, first line number, [lines])] of the fenced blocks of markdown `text`."
    blocks, lang, start, lines = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r'^\s*```\s*(\S*)\s*$', line)
        if m and lang is None: lang, start, lines = m.group(1), n + 1, []
        elif m and not m.group(1): blocks.append((lang, start, lines)); lang = None
        elif lang is not None: lines.append(line)
    return blocks


def split_comment(line):
    "(command, comment) of a shell line: the comment starts at a `#` that begins a word outside quotes."
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote: quote = None
        elif ch in '\'"': quote = ch
        elif ch == '#' and (i == 0 or line[i - 1].isspace()): return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ''


def readme_commands(text, page='README.md'):
    "[(line number, command, comment)] of the ```bash blocks of `page`'s `text`: continuations joined, blank and comment lines skipped."
    out = []
    for lang, start, lines in fenced_blocks(text):
        if lang != 'bash': continue
        pending, first = '', None
        for n, line in enumerate(lines, start):
            if not pending and (not line.strip() or line.lstrip().startswith('#')): continue
            first = first if pending else n
            if line.rstrip().endswith('\\'): pending += line.rstrip()[:-1].rstrip() + ' '; continue
            cmd, comment = split_comment(pending + line.strip())
            out.append((first, cmd.strip(), comment)); pending = ''
        assert not pending, f'{page} line {first}: a backslash continuation runs off the end of its block'
    return out


def ci_lines():
    "The non-comment lines of .ci/run."
    return [l for l in CI_RUN.read_text().splitlines() if l.strip() and not l.lstrip().startswith('#')]


def segments(cmd):
    "The parts of a command joined by `&&` (outside quotes)."
    parts, quote, cur, i = [], None, '', 0
    while i < len(cmd):
        ch = cmd[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in '\'"': quote = ch
        elif cmd.startswith('&&', i): parts.append(cur.strip()); cur, i = '', i + 2; continue
        cur += ch; i += 1
    return parts + [cur.strip()]


def notebook_declares(nb, name):
    "Whether the papermill `parameters` cell of notebook `nb` assigns `name`."
    import nbformat
    cells = [c for c in nbformat.read(nb, as_version=4).cells if 'parameters' in c.metadata.get('tags', [])]
    return any(re.match(rf'^{name}\s*[:=]', l) for c in cells for l in c.source.splitlines())


def classify(cmd, comment, root=ROOT):
    "('marked', reason) | ('ci', .ci/run regex) | ('run', None) | ('unknown', why) for one README command."
    m = MARKER.search(comment)
    if m:
        return ('marked', m.group(1).strip()) if m.group(1).strip() else ('unknown', 'its (not in CI: ) marker gives no reason')
    for pattern, ci in CI_COVERED.items():
        if re.fullmatch(pattern, ' '.join(cmd.split())): return 'ci', ci
    for seg in segments(cmd):
        rule = next((what for pattern, what in SMOKE if re.match(pattern, seg)), None)
        if rule is None:
            return 'unknown', f'no smoke rule runs {seg!r}'
        nb = re.match(r'^papermill (nbs/\w+\.ipynb)', seg)
        if nb and rule.startswith('append `-p smoke') and not notebook_declares(root / nb.group(1), 'smoke'):
            return 'unknown', f'{nb.group(1)} has no `smoke` parameter'
    return 'run', None


def page_name(path):
    "A page's path relative to the checkout, e.g. `README.md`, `docs/data.md`."
    return Path(path).relative_to(ROOT).as_posix()


COMMANDS = [(page_name(p), n, c, comment) for p in PAGES for n, c, comment in readme_commands(p.read_text(), page_name(p))]
"[(page, line number, command, comment)] of every page, README first, then docs/*.md in sorted order."


# ---------------------------------------------------------------- the pages' links

LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')


def slug(heading):
    "GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."
    return re.sub(r' ', '-', re.sub(r'[^\w\- ]', '', heading.strip().lower()))


def anchors(text):
    "The anchors of the headings of markdown `text` (outside fenced blocks; a repeated heading gets -1, -2, ...)."
    seen, out, fence = {}, set(), False
    for line in text.splitlines():
        if re.match(r'^\s*```', line): fence = not fence; continue
        m = None if fence else re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
        if m:
            a = slug(m.group(1)); k = seen.get(a, 0); seen[a] = k + 1
            out.add(a if k == 0 else f'{a}-{k}')
    return out


def relative_links(text):
    "[(line number, target)] of the links of markdown `text` that are neither web addresses nor mail (code left out)."
    out, fence = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(r'^\s*```', line): fence = not fence; continue
        if fence: continue
        for m in LINK.finditer(re.sub(r'`[^`]*`', '``', line)):
            if not re.match(r'^[a-z][a-z0-9+.-]*:', m.group(1), re.I): out.append((n, m.group(1)))
    return out


# ---------------------------------------------------------------- the smoke transformation and the data it needs

def data_specs(seg):
    "The data specs a command segment names (train/eval/probe data; eval entries split)."
    from declip.evaluation import split_named_entry
    toks, vals = shlex.split(seg), []
    for i, t in enumerate(toks):
        if t.startswith('--') and t[2:].split('=')[0] in DATA_FLAGS:
            vals.append(t.split('=', 1)[1] if '=' in t else toks[i + 1] if i + 1 < len(toks) else '')
        if t == '-p' and i + 2 < len(toks) and toks[i + 1] in DATA_FLAGS: vals.append(toks[i + 2])
    return [split_named_entry(e, '@')[1] for v in vals for e in v.split()]


def tiny_png(i):
    "A 32-pixel PNG: a coloured square on a plain background, different for each `i`."
    from PIL import Image, ImageDraw
    colours = ['red', 'green', 'blue', 'orange', 'purple', 'gray']
    im = Image.new('RGB', (32, 32), colours[(i + 3) % len(colours)])
    ImageDraw.Draw(im).rectangle([6 + i % 5, 6, 24, 22 + i % 7], fill=colours[i % len(colours)])
    buf = BytesIO(); im.save(buf, format='PNG'); return buf.getvalue()


CAPTIONS = ['a red square on a gray background', 'a green box', 'blue square, small', 'an orange block on purple',
            'purple square icon', 'a gray tile with a red square']


def write_data(spec, clone):
    "Write tiny data where a csv/tsv/jsonl/imagefolder/wds spec points, unless it exists; return what was written."
    from declip.pipeline import parse_data_spec
    from declip.datasets import CSV_KEY_DEFAULTS, expand_shard_patterns
    s = parse_data_spec(spec)
    if s.kind not in ('csv', 'tsv', 'jsonl', 'imagefolder', 'wds'): return None
    paths = expand_shard_patterns(s.path) if s.kind == 'wds' else [s.path]
    for p in paths:
        if Path(p).is_absolute() and not Path(p).resolve().is_relative_to(clone.resolve()):
            pytest.fail(f'{spec!r}: an absolute path outside the checkout; use a path inside it, or mark the command (not in CI: ...)')
    target = clone / paths[0]
    if all((clone / p).exists() for p in paths): return None
    n = 12
    if s.kind == 'imagefolder':
        for i in range(n):
            d = target / ['squares', 'boxes', 'tiles'][i % 3]; d.mkdir(parents=True, exist_ok=True)
            (d / f'{i:03d}.png').write_bytes(tiny_png(i))
        return f'{paths[0]}/<3 classes>/*.png ({n} images)'
    if s.kind == 'wds':
        for k, p in enumerate(paths):
            (clone / p).parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(clone / p, 'w') as tar:
                for i in range(4):
                    for ext, data in (('png', tiny_png(4 * k + i)), ('txt', CAPTIONS[(4 * k + i) % len(CAPTIONS)].encode())):
                        info = tarfile.TarInfo(f'{k:05d}{i:04d}.{ext}'); info.size = len(data); tar.addfile(info, BytesIO(data))
        sizes = {Path(p).name: 4 for p in paths}
        (clone / paths[0]).parent.joinpath('sizes.json').write_text(json.dumps(sizes))
        return f'{len(paths)} shards of 4 samples + sizes.json'
    root = clone / s.root if s.root else target.parent
    (root / 'images').mkdir(parents=True, exist_ok=True)
    for i in range(n): (root / 'images' / f'{i:03d}.png').write_bytes(tiny_png(i))
    target.parent.mkdir(parents=True, exist_ok=True)
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    if s.kind == 'jsonl':
        target.write_text(''.join(json.dumps(dict(filename=f'images/{i:03d}.png', caption=c)) + '\n' for i, c in enumerate(caps)))
        return f'{paths[0]} + {n} images'
    keys = dict(CSV_KEY_DEFAULTS, **{k: v for k, v in s.options.items() if k in CSV_KEY_DEFAULTS})
    with open(target, 'w', newline='') as f:
        w = csv.writer(f, delimiter='\t' if s.kind == 'tsv' else ','); w.writerow([keys['image_key'], keys['caption_key']])
        w.writerows([f'images/{i:03d}.png', c] for i, c in enumerate(caps))
    return f'{paths[0]} ({keys["image_key"]},{keys["caption_key"]}) + {n} images'


def point_openclipart_at_fake(seg, fake):
    "Each openclipart spec without a root (or with Debian's) in `seg`, rooted at the fake tree."
    from declip.pipeline import parse_data_spec
    from declip.openclipart import OPENCLIPART_ROOT
    for spec in data_specs(seg):
        s = parse_data_spec(spec)
        if s.kind == 'openclipart' and s.path in (None, OPENCLIPART_ROOT):
            new = ':'.join(['openclipart', str(fake)] + ([','.join(f'{k}={v}' for k, v in s.options.items())] if s.options else []))
            seg = re.sub(rf'(?<![^\s=\'"]){re.escape(spec)}(?![^\s\'"@])', new, seg)
    return seg


def make_checkpoint(path, clone, env):
    "A tiny CLIP checkpoint at `path` (a run folder's checkpoints/last.pt or best.pt, or any file)."
    path = clone / path
    run = path.parent.parent if path.parent.name == 'checkpoints' else Path(tempfile.mkdtemp(dir=clone)) / 'run'
    subprocess.run([str(BIN / 'declip-train'), '--method', 'clip', '--train_data', 'synthetic:size=32',
                    '--eval_data', 'synthetic:n_per_class=2,n_retrieval=8', '--image_size', '32', '--output_dir', str(run),
                    *TRAIN_CAPS.split()], cwd=clone, env=env, check=True, capture_output=True, timeout=TIMEOUT)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True); shutil.copy(run / 'checkpoints' / 'last.pt', path)


def smoke_form(cmd, clone, env, fake, out):
    "The command CI runs for README command `cmd`, after writing the data and checkpoints it needs; and notes."
    done, notes = [], []
    for seg in segments(cmd):
        seg = point_openclipart_at_fake(seg, fake)
        for spec in data_specs(seg):
            wrote = write_data(spec, clone)
            if wrote: notes.append(f'wrote {wrote}')
        if re.match(r'^(declip-train|declip-reports|declip-export|papermill)( .*)? (--help|-h|--help-notebook)\b', seg) or seg.startswith('mkdir'):
            pass
        elif seg.startswith('papermill nbs/evaluate.ipynb'):
            toks = shlex.split(seg)
            ck = toks[toks.index('checkpoint') + 1] if 'checkpoint' in toks else 'runs/train/checkpoints/last.pt'
            if not (clone / ck).exists(): make_checkpoint(ck, clone, env); notes.append(f'made {ck}')
        elif seg.startswith('papermill '): seg += ' -p smoke True'
        elif seg.startswith('declip-train'): seg += ' ' + TRAIN_CAPS
        elif seg.startswith('declip-reports') and '--smoke' not in seg: seg += f' --smoke --out {shlex.quote(str(out))}'
        elif seg.startswith('declip-export'):
            toks = shlex.split(seg)
            ck = next((t for t in toks[1:] if not t.startswith('-')), None)
            if ck and ck.endswith('.pt') and not (clone / ck).exists(): make_checkpoint(ck, clone, env); notes.append(f'made {ck}')
            if not (BIN / 'declip-export').exists() and not shutil.which('declip-export', path=env['PATH']):
                seg = seg.replace('declip-export', shlex.quote(sys.executable) + ' -c "import sys; from declip.runs import export_cli; '
                                                   'sys.exit(export_cli())"', 1)
                notes.append('declip-export is not installed in this venv (it predates the script): ran its entry point')
        done.append(seg)
    return ' && '.join(done), notes


def expected_outputs(cmd):
    "Files a successful command must have written (relative to the clone): papermill's output notebook, a run's summary."
    out = []
    for seg in segments(cmd):
        toks = shlex.split(seg)
        if toks[:1] == ['papermill'] and len(toks) > 2 and not {'--help', '-h', '--help-notebook'} & set(toks): out.append(toks[2])
        if toks[:1] == ['declip-train'] and '--output_dir' in toks: out.append(toks[toks.index('--output_dir') + 1] + '/summary.json')
    return out


# ---------------------------------------------------------------- the tests

@pytest.fixture(scope='module')
def clone():
    "A fresh copy of the checkout (what git tracks or would track; nothing ignored), removed afterwards."
    d = Path(tempfile.mkdtemp(prefix='declip-readme-'))
    files = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split('\0')
    for f in filter(None, files):
        if (ROOT / f).is_file() and not (ROOT / f).is_symlink():
            (d / f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(ROOT / f, d / f)
    assert (d / 'nbs').is_dir() and not (d / 'runs').exists(), 'the copy is not a fresh checkout'
    from declip.openclipart import write_fake_openclipart
    fake = write_fake_openclipart(Path(tempfile.mkdtemp(prefix='declip-readme-oca-')) / 'openclipart')
    env = cpu_env(threads=1, PYTHONPATH=d, MPLBACKEND='Agg', PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop('IN_TEST', None)
    yield dict(root=d, fake=fake, env=env, out=d / 'runs' / 'readme-reports')
    shutil.rmtree(d, ignore_errors=True); shutil.rmtree(fake.parent, ignore_errors=True)


def test_readme_parsing_finds_continuations_markers_and_strangers():
    "The extractor and the classifier on a README written for the purpose (so that they can fail)."
    text = '\n'.join(['# t', '```bash', '# a comment', '', 'pip install -e ".[dev]"   # the install',
                      'torchrun --nproc_per_node 8 $(which declip-train) \\', '    --method declip   # 8 GPUs (not in CI: needs GPUs)',
                      "declip-train --method clip --train_data 'csv:my pairs.csv' # a '#' in quotes", 'curl http://x | sh', '```',
                      '```python', 'print(1)', '```'])
    cmds = readme_commands(text)
    assert [c[:2] for c in cmds] == [(5, 'pip install -e ".[dev]"'), (6, 'torchrun --nproc_per_node 8 $(which declip-train) --method declip'),
                                     (8, "declip-train --method clip --train_data 'csv:my pairs.csv'"), (9, 'curl http://x | sh')], cmds
    got = [classify(c, comment) for _, c, comment in cmds]
    assert got[0][0] == 'ci' and got[1] == ('marked', 'needs GPUs') and got[2] == ('run', None), got
    assert got[3][0] == 'unknown' and 'curl' in got[3][1], got
    assert classify('mkdir -p runs && papermill nbs/evaluate.ipynb o.ipynb', '')[0] == 'run'
    assert classify('mkdir -p runs && rm -rf runs', '')[0] == 'unknown'
    assert classify('declip-reports --smoke ablations', '')[0] == classify('declip-reports ablations', '')[0] == 'run'
    assert classify('torchrun x', '# (not in CI: )')[0] == 'unknown'
    assert SHELL_LIKE.match('declip-train --method clip') and SHELL_LIKE.match('$ pip install x') and not SHELL_LIKE.match('loss = 0.4 L_CLIP')


def test_written_data_is_what_the_specs_read(workdir, monkeypatch):
    "The data the test writes for a user's own-data command opens with declip's readers, at the paths the spec names."
    from declip.pipeline import open_train_data, open_eval_data
    monkeypatch.chdir(workdir)
    fake = workdir / 'oca'
    assert point_openclipart_at_fake("declip-train --train_data openclipart -p eval_data 'v=openclipart:split=test@t.txt'", fake) == \
        f"declip-train --train_data openclipart:{fake} -p eval_data 'v=openclipart:{fake}:split=test@t.txt'"
    assert data_specs("papermill a b -p eval_data 'x=csv:p.csv imagefolder:f/val@openai_imagenet' --train_data=wds:s/{0..1}.tar") == \
        ['csv:p.csv', 'imagefolder:f/val', 'wds:s/{0..1}.tar']
    for spec in ('csv:pairs.csv', 'csv:own/pairs.csv:caption_key=caption', 'tsv:p.tsv', 'jsonl:meta/m.jsonl',
                 'jsonl:m2.jsonl:imgs', 'imagefolder:pets/val', 'wds:shards/{00000..00001}.tar'):
        assert write_data(spec, workdir), spec
        assert write_data(spec, workdir) is None, f'{spec}: written twice'
        if spec.startswith('imagefolder'):
            ds = open_eval_data(spec); assert len(ds.classnames) == 3 and len(ds) == 12, spec
        elif spec.startswith('wds'):
            samples = list(open_train_data(spec)); assert len(samples) == 8 and samples[0][2], spec
        else:
            ds = open_train_data(spec); image, caption = ds[0]
            assert len(ds) == 12 and image.size == (32, 32) and caption, spec
    assert 'filepath,caption' in (workdir / 'own/pairs.csv').read_text().splitlines()[0]
    with pytest.raises(pytest.fail.Exception, match='outside the checkout'): write_data('csv:/nonexistent/x.csv', workdir)


SHELL_LIKE = re.compile(r'^\s*(\$ )?(pip|python3?|papermill|declip-\w+|torchrun|nbdev_\w+|mkdir|apt(-get)?|bash|git|cd|export)\b')


def test_readme_has_shell_commands_only_in_bash_blocks():
    "A shell block under another name (```sh, ```shell, ```console; or none, when a line reads like a command) would escape this test, on any page."
    for page in PAGES:
        blocks = fenced_blocks(page.read_text())
        langs = {lang for lang, _, _ in blocks}
        assert not langs & {'sh', 'shell', 'console', 'zsh'}, f'{page_name(page)}: fence languages {langs}: use ```bash for commands'
        for lang, start, lines in blocks:
            assert lang or not any(SHELL_LIKE.match(l) for l in lines), \
                f'{page_name(page)} line {start}: a block without a language holds a command: use ```bash (or ```text for what is no command)'
        assert page != README or 'bash' in langs, 'README.md has no ```bash block'


def test_pages_are_collected_in_order():
    "README first, then every docs/*.md page in sorted order; each command's page and line as the ids show them."
    assert PAGES[0] == README and PAGES[1:] == sorted(PAGES[1:]) and all(p.parent == ROOT / 'docs' for p in PAGES[1:])
    assert {p.name for p in (ROOT / 'docs').glob('*.md')} == {p.name for p in PAGES[1:]}
    pages = [page for page, *_ in COMMANDS]
    assert pages[0] == 'README.md' and pages == sorted(pages, key=lambda p: (p != 'README.md', p)), pages
    for page, n, cmd, _ in COMMANDS:
        line = ' '.join((ROOT / page).read_text().splitlines()[n - 1].split())
        assert line.startswith(' '.join(cmd.split()[:2])), f'{page} line {n} is not where {cmd!r} starts: {line!r}'


def test_links_parse():
    "The link extractor and the anchors on a page written for the purpose (so that they can fail)."
    text = '\n'.join(['# A page', '## Speed (CPU): `python benchmarks/step.py`', "### Do the paper's claims hold here?", '## A page',
                      'See [the data](docs/data.md#x), ![fig](reports/a.png), [`x`](reports/x/README.md "t"), [web](https://x.org),',
                      '`[not a link](nowhere.md)`, [mail](mailto:a@b), [same](#a-page-1) and [[1]](ref.md).',
                      '```bash', 'echo [x](inside-code.md)', '```'])
    assert anchors(text) == {'a-page', 'speed-cpu-python-benchmarkssteppy', 'do-the-papers-claims-hold-here', 'a-page-1'}
    assert [t for _, t in relative_links(text)] == ['docs/data.md#x', 'reports/a.png', 'reports/x/README.md', '#a-page-1', 'ref.md'], relative_links(text)


def test_relative_links_resolve():
    "Every relative link of README.md and docs/*.md names an existing file or folder, relative to its page; an anchor into one of these pages names one of its headings."
    bad = []
    for page in PAGES:
        for n, target in relative_links(page.read_text()):
            path, _, anchor = target.partition('#')
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists(): bad.append(f'{page_name(page)} line {n}: {target} (no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})')
            elif anchor and dest in PAGES and anchor not in anchors(dest.read_text()):
                bad.append(f'{page_name(page)} line {n}: {target} (no heading #{anchor} in {page_name(dest)})')
    assert not bad, 'links that lead nowhere:\n' + '\n'.join(bad)


def test_ci_runs_the_commands_it_covers():
    "Each command of the pages counted as covered by CI is in .ci/run, and .ci/run runs this test file."
    lines = ci_lines()
    assert any(re.match(r'^\s*python -m pytest -q tests\s*$', l) for l in lines), '.ci/run does not run tests/'
    covered = [(page, n, c, ci) for page, n, c, comment in COMMANDS for kind, ci in [classify(c, comment)] if kind == 'ci']
    assert any(page == 'README.md' for page, *_ in covered), \
        'no README command is covered by .ci/run: the install and test commands are gone from README.md?'
    for page, n, c, ci in covered:
        assert any(re.search(ci, l) for l in lines), f'{page} line {n}: {c!r} is counted as run by CI, but .ci/run has no line /{ci}/'
    if any(re.fullmatch(r'python benchmarks/step\.py.*', c) for _, _, c, _ in covered):
        from declip.study import REPORTS
        assert REPORTS['performance']['script'] == 'benchmarks/step.py'


@pytest.mark.parametrize('page,n,cmd,comment', COMMANDS, ids=[f'{page}:L{n}:{c[:60]}' for page, n, c, _ in COMMANDS])
def test_readme_command(page, n, cmd, comment, clone):
    "One command of README.md or a docs page: marked `(not in CI: ...)`, covered by .ci/run, or run in its smoke form and exiting 0."
    kind, detail = classify(cmd, comment, clone['root'])
    if kind == 'unknown':
        pytest.fail(f'{page} line {n}: {cmd!r}: {detail}. Mark it with a trailing `# ... (not in CI: <reason>)`, '
                    f'or teach tests/test_readme.py (SMOKE) to run it')
    if kind == 'marked': pytest.skip(f'not in CI: {detail}')
    if kind == 'ci':
        assert any(re.search(detail, l) for l in ci_lines()), f'{page} line {n}: {cmd!r} is counted as run by CI, but .ci/run has no line /{detail}/'
        return
    run, notes = smoke_form(cmd, clone['root'], clone['env'], clone['fake'], clone['out'])
    p = subprocess.run(['bash', '-c', run], cwd=clone['root'], env=clone['env'], capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, (f'{page} line {n}: {cmd!r}\nran: {run}\n{"; ".join(notes)}\nexit {p.returncode}\n'
                               f'{p.stdout[-2000:]}\n{p.stderr[-4000:]}')
    for f in expected_outputs(cmd):
        assert (clone['root'] / f).exists(), f'{page} line {n}: {cmd!r} exited 0 but wrote no {f}'
