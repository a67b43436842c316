"""Benchmark v3 tuning: short CLIP/DeCLIP runs on variants of the v2 synthetic module (patched module attributes)."""
import json, sys, time
import numpy as np, torch
import declip.synthetic as S
V = json.loads(sys.argv[1])
if 'nprob' in V: S.N_OBJECTS_P = tuple(V['nprob'])
if 'pattern_p' in V: S.PATTERN_P = V['pattern_p']
if 'bgs' in V: S.BACKGROUNDS = {k: S.BACKGROUNDS[k] for k in V['bgs']}
if V.get('canonical'):
    S.SHAPES.update({k: (w[0],) for k, w in S.SHAPES.items()})
if 'colours' in V or 'shapes' in V:
    S.COLOURS = {k: S.COLOURS[k] for k in V.get('colours', S.COLOURS)}; S.COLOUR_NAMES = tuple(S.COLOURS)
    S.SHAPES = {k: S.SHAPES[k] for k in V.get('shapes', S.SHAPES)}; S.SHAPE_NAMES = tuple(S.SHAPES)
    S.HELDOUT_PAIRS = S._pairs_at_offsets({0, 5}); S.COMPARISON_PAIRS = S._pairs_at_offsets({1, 6})
    S.TRAIN_PAIRS = tuple((c, s) for c in S.COLOUR_NAMES for s in S.SHAPE_NAMES if (c, s) not in set(S.HELDOUT_PAIRS))
    S.sample_scene.__defaults__ = (None, S.TRAIN_PAIRS, S._SIZE_ORDER, 0.0)
if V.get('no_distract'):
    S.DISTRACTOR_PREFIXES = ('',); S.DISTRACTOR_SUFFIXES = ('',)
if 'size_scale' in V:
    s = V['size_scale']; S.SIZES.update({k: ((lo * s, hi * s), w) for k, ((lo, hi), w) in dict(S.SIZES).items()})

GRAY = {'on': False}
if V.get('p_gray'):
    _np_before = S._noun_phrase
    def _np_gray(o, rng, complete, _f=_np_before):
        if not GRAY['on']: return _f(o, rng, complete)
        shape = S._word(rng, S.SHAPES[o.shape])
        size = S._word(rng, S.SIZES[o.size][1], 0.5) if rng.random() < 0.35 else None
        pattern = S._word(rng, S.PATTERNS[o.pattern], 0.5) if rng.random() < 0.3 else None
        return S._article(' '.join(w for w in (size, pattern, shape) if w), rng)
    S._noun_phrase = _np_gray
    _get = S.SyntheticImageText.__getitem__
    def __getitem__(self, i):
        g = np.random.default_rng((self.seed, 99, int(i))).random() < V['p_gray']
        GRAY['on'] = g
        try: im, cap = _get(self, i)
        finally: GRAY['on'] = False
        return (im.convert('L').convert('RGB'), cap) if g else (im, cap)
    S.SyntheticImageText.__getitem__ = __getitem__

if V.get('plain_caption'):   # "a red circle" / (gray) "a circle": colour + shape only, nothing else
    def caption_scene(scene, rng, complete=False):
        o = scene.objects[0]
        words = ([] if GRAY['on'] else [S._word(rng, S.COLOURS[o.colour].words)]) + [S._word(rng, S.SHAPES[o.shape])]
        return S._article(' '.join(words), rng)
    S.caption_scene = caption_scene
torch.set_num_threads(V.get('threads', 1))
from declip.train import train
t = time.time()
s = train(method=V.get('method', 'clip'), train_data=f"synthetic:size={V.get('size', 4000)}", eval_data='synthetic:n_per_class=25,n_retrieval=100',
          batch_size=V.get('batch', 64), max_steps=V['steps'], eval_every=V.get('eval_every', 200), workers=V.get('workers', 1), output_dir=V['out'],
          log_every=50, image_encoder=V.get('enc', 'resnet-tiny'), text_encoder='text-tiny', context_length=32, **V.get('kw', {}))
print(json.dumps({k: {m: round(x, 3) for m, x in v.items() if 'top1' in m or 'R@1' in m} for k, v in s['eval'].items()}), f'{time.time()-t:.0f}s')
