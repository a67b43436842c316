"""Your own image-caption data, as docs/data.md's section "Train and evaluate on your own image-caption data" says (issue 15;
the section moved there from README.md in issue 37).

The commands below are that section's commands, verbatim (`test_readme_section_has_these_commands` keeps the two
the same). They run with `bash -c` in a fresh working folder laid out like the checkout's root, on data this
test writes at the paths the section uses:

- `mydata/pairs.csv` (columns `filepath,caption`; open_clip's default caption column is `title`, hence
  `caption_key=caption`) and its 200 images `mydata/images/NNNN.png`;
- `mydata/val/<class>/*.png`, an ImageFolder of three colour classes;
- `mydata/shards/000000.tar`, `000001.tar`, a webdataset of 2 x 100 samples (`KEY.png` + `KEY.txt`);
- `nbs/evaluate.ipynb`, copied from the checkout.

What each must do: the CSV run trains on 184 pairs and evaluates image<->text retrieval on the 16 it held out
(nothing synthetic), and says so at the start and in config.json; the evaluation notebook scores its checkpoint
zero-shot on the ImageFolder, nothing else; the webdataset run trains and evaluates nothing, with a note.
"""
import io, json, os, re, shutil, subprocess, sys, tarfile, time
from pathlib import Path

import pytest
from PIL import Image

from helpers import cpu_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIMEOUT = 300
PAGE, SECTION = ROOT / 'docs' / 'data.md', 'Train and evaluate on your own image-caption data'
TRAIN_CSV = ('declip-train --method clip --train_data csv:mydata/pairs.csv:caption_key=caption --epochs 1 --batch_size 8 '
             '--image_encoder vit-tiny --text_encoder text-tiny --image_size 32 --workers 0 --output_dir runs/own')
EVALUATE = ('papermill nbs/evaluate.ipynb runs/own/evaluate.ipynb -p checkpoint runs/own/checkpoints/best.pt '
            '-p eval_data val=imagefolder:mydata/val')
TRAIN_WDS = ("declip-train --method clip --train_data 'wds:mydata/shards/{000000..000001}.tar:num_samples=200' --epochs 1 "
             '--batch_size 8 --image_encoder vit-tiny --text_encoder text-tiny --image_size 32 --workers 0 --output_dir runs/own-wds')
COMMANDS = (TRAIN_CSV, EVALUATE, TRAIN_WDS)
COLOURS = dict(red=(220, 30, 30), green=(30, 200, 40), blue=(30, 40, 220), yellow=(230, 220, 30), purple=(140, 30, 160))
SHAPES = ('square', 'stripe', 'dot', 'frame')


def picture(i: int) -> tuple[Image.Image, str]:
    "Picture `i` of the own-data set and its caption: a colour and a shape, e.g. 'a red stripe on white, number 7'."
    name, rgb = list(COLOURS.items())[i % len(COLOURS)]
    shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    im = Image.new('RGB', (32, 32), (255, 255, 255))
    box = {'square': (6, 6, 26, 26), 'stripe': (0, 12, 32, 20), 'dot': (12, 12, 20, 20), 'frame': (2, 2, 30, 30)}[shape]
    im.paste(rgb, box)
    if shape == 'frame': im.paste((255, 255, 255), (6, 6, 26, 26))
    return im, f'a {name} {shape} on white, number {i}'


def write_own_data(work: Path):
    "The section's data, at its paths under `work`."
    data = work / 'mydata'
    (data / 'images').mkdir(parents=True)
    rows = ['filepath,caption']
    for i in range(200):
        im, caption = picture(i)
        im.save(data / 'images' / f'{i:04d}.png'); rows.append(f'images/{i:04d}.png,{caption}')
    (data / 'pairs.csv').write_text('\n'.join(rows) + '\n')
    for name, rgb in list(COLOURS.items())[:3]:
        (data / 'val' / name).mkdir(parents=True)
        for k in range(4): Image.new('RGB', (32, 32), tuple(max(0, c - 12 * k) for c in rgb)).save(data / 'val' / name / f'{k}.png')
    (data / 'shards').mkdir()
    for s in range(2):
        with tarfile.open(data / 'shards' / f'{s:06d}.tar', 'w') as tar:
            for i in range(s * 100, s * 100 + 100):
                im, caption = picture(i); buf = io.BytesIO(); im.save(buf, 'PNG')
                for member, payload in ((f'{i:06d}.png', buf.getvalue()), (f'{i:06d}.txt', caption.encode())):
                    info = tarfile.TarInfo(member); info.size = len(payload); tar.addfile(info, io.BytesIO(payload))
    (work / 'nbs').mkdir()
    shutil.copy(ROOT / 'nbs' / 'evaluate.ipynb', work / 'nbs' / 'evaluate.ipynb')


def sh(command: str, work: Path) -> subprocess.CompletedProcess:
    "A command of the section, verbatim, in `work`: it must exit 0."
    env = cpu_env(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop('IN_TEST', None)                                   # evaluate.ipynb trains its own checkpoint under nbdev_test
    t = time.time()
    p = subprocess.run(['bash', '-c', command], cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f'{command}\nexit {p.returncode}\n{p.stderr[-4000:]}'
    print(f'{time.time() - t:.1f} s: {command}')
    return p


@pytest.fixture(scope='module')
def own(tmp_path_factory):
    "The working folder after the section's commands: {command: its completed process}."
    work = tmp_path_factory.mktemp('own-data')
    write_own_data(work)
    done = {c: sh(c, work) for c in COMMANDS}
    yield work, done
    shutil.rmtree(work, ignore_errors=True)                   # checkpoints are large


def test_csv_run_evaluates_on_its_held_out_slice(own):
    work, done = own
    run = work / 'runs' / 'own'
    summary, cfg = json.loads((run / 'summary.json').read_text()), json.loads((run / 'config.json').read_text())
    assert list(summary['eval']) == ['holdout']                                  # retrieval on the slice, nothing synthetic
    assert {'image_to_text_R@1', 'text_to_image_R@1', 'mean_recall'} <= set(summary['eval']['holdout'])
    spec = 'csv:mydata/pairs.csv:caption_key=caption'
    assert (cfg['train_data'], cfg['eval_data']) == (f'{spec},holdout=16,split=train', f'holdout={spec},holdout=16,split=holdout')
    assert cfg['resolved']['data_plan']['given'] == dict(train_data=spec, eval_data=None)
    assert (cfg['resolved']['train_samples'], summary['steps'], summary['epochs_done']) == (184, 23, 1)
    assert cfg['resolved']['chance'] == {'holdout/image_to_text_R@1': 1 / 16, 'holdout/text_to_image_R@1': 1 / 16}
    notes = [l for l in done[TRAIN_CSV].stderr.splitlines() if l.startswith('declip-train: ')]
    assert len(notes) == 1 and notes[0].startswith('declip-train: holding out 16 of 200 images'), notes
    said = done[TRAIN_CSV].stdout
    assert 'final evaluation' in said and re.search(r'^\s+holdout\s+retrieval\s', said, re.M), said
    evals = [json.loads(l) for l in open(run / 'metrics.jsonl') if json.loads(l)['type'] == 'eval']
    assert [e['step'] for e in evals] == [23] and not any(k.startswith(('shape', 'retrieval/')) for e in evals for k in e)


def test_held_out_images_are_not_in_the_training_side(own):
    "The slice the run evaluated on, re-derived from config.json here, in another process: disjoint from the training side."
    from declip.pipeline import open_eval_data, open_train_data
    work, _ = own
    cfg = json.loads((work / 'runs' / 'own' / 'config.json').read_text())
    cwd = os.getcwd()
    try:
        os.chdir(work)
        train, held = open_train_data(cfg['train_data']), open_eval_data(cfg['eval_data'].split('=', 1)[1])
        train_paths = {train.reader.paths[i] for i in train.indices}
    finally: os.chdir(cwd)
    assert (len(train), len(held)) == (184, 16) and not train_paths & set(held.items)


def test_checkpoint_evaluates_on_an_image_folder(own):
    work, _ = own
    results = json.loads((work / 'runs' / 'own' / 'eval' / 'results.json').read_text())
    sets = results['results']
    assert list(sets) == ['val'], sorted(sets)                                   # the user's set only: no synthetic probe
    assert 0 <= sets['val']['top1'] <= 1 and 'skipped_images' not in sets['val']
    assert (work / 'runs' / 'own' / 'eval' / 'confusion_val.png').is_file()


def test_webdataset_run_trains_without_holdout(own):
    work, done = own
    summary = json.loads((work / 'runs' / 'own-wds' / 'summary.json').read_text())
    assert (summary['steps'], summary['eval'], summary['skipped']) == (25, {}, {})
    assert 'a webdataset stream gets no held-out slice' in done[TRAIN_WDS].stderr


def test_readme_section_has_these_commands():
    "docs/data.md's own-data section holds exactly these commands (its bash lines, continuations joined), so what it says is what runs here."
    text = PAGE.read_text()
    start = text.find(f'## {SECTION}')
    assert start >= 0, f"{PAGE.relative_to(ROOT)} has no section '## {SECTION}'"
    end = text.find('\n## ', start + 1)
    blocks = re.findall(r'```bash\n(.*?)```', text[start:end if end > 0 else None], re.S)
    lines = [re.sub(r'\s+', ' ', l.split(' #')[0]).strip() for l in '\n'.join(blocks).replace('\\\n', ' ').splitlines()]
    for c in COMMANDS: assert c in lines, f'{PAGE.relative_to(ROOT)} section {SECTION!r} lacks: {c}'
