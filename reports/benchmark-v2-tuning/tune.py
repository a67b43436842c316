"""Benchmark tuning experiments (not part of the project): CLIP/DeCLIP short runs on variants of the synthetic scenes."""
import json, math, os, sys, time
import numpy as np
import torch
import declip.synthetic as S

V = json.loads(sys.argv[1])            # variant: rot (deg or null), size_scale, nprob [p1,p2,p3], method, steps, size, out
rot = V.get('rot'); scale = V.get('size_scale', 1.0); nprob = V.get('nprob')   # runs e1-e3, r1-r9 (module v1, commit 03c4aa3)
# Runs r16 and r17 ran on the v2 module (commit dd47986 has the same scenes), whose scenes already carry the v2 sizes,
# rotation and counts; for them the line above read:
#   rot = None; scale = 1.0; nprob = None
#   if 'nprob' in V: S.N_OBJECTS_P = tuple(V['nprob'])
#   if 'pattern_p' in V: S.PATTERN_P = V['pattern_p']
orig_sizes = dict(S.SIZES)
S.SIZES.update({k: ((lo * scale, hi * scale), w) for k, ((lo, hi), w) in orig_sizes.items()})
if 'patterns' in V: S.PATTERNS = {k: S.PATTERNS[k] for k in V['patterns']}
if 'bgs' in V: S.BACKGROUNDS = {k: S.BACKGROUNDS[k] for k in V['bgs']}
orig_sample = S.sample_scene
def sample_scene(rng, n_objects=None, pairs=S.TRAIN_PAIRS, sizes=S._SIZE_ORDER, margin=0.0):
    if n_objects is None and nprob is not None:
        n_objects = int(np.searchsorted(np.cumsum(nprob), rng.random() * sum(nprob))) + 1
    sc = orig_sample(rng, n_objects, pairs, sizes, margin)
    if V.get('p_solid'):
        objs = tuple(o.__class__(**{**o.__dict__, 'pattern': 'solid' if rng.random() < V['p_solid'] else o.pattern}) for o in sc.objects)
        sc = S.Scene(objs, *[getattr(sc, f) for f in ('background', 'bg_rgb', 'bg_rgb2', 'bg_angle', 'bg_noise', 'noise_seed')])
    if rot is not None:
        objs = tuple(o.__class__(**{**o.__dict__, 'angle': (o.angle / (2 * math.pi) * 2 - 1) * math.radians(rot)}) for o in sc.objects)
        sc = S.Scene(objs, *[getattr(sc, f) for f in ('background', 'bg_rgb', 'bg_rgb2', 'bg_angle', 'bg_noise', 'noise_seed')])
    return sc
S.sample_scene = sample_scene
pc = V.get('p_colour')
if pc is not None:
    def _noun_phrase(o, rng, complete):
        shape = S._word(rng, S.SHAPES[o.shape]) + (' shape' if rng.random() < 0.1 else '')
        colour = S._word(rng, S.COLOURS[o.colour].words) if complete or rng.random() < pc else None
        size = S._word(rng, S.SIZES[o.size][1], 0.5) if complete or rng.random() < 0.35 else None
        pattern = S._word(rng, S.PATTERNS[o.pattern], 0.5) if complete or rng.random() < 0.3 else None
        form = rng.random()
        if colour and form < 0.15:
            return S._article(' '.join(w for w in (size, pattern, shape) if w), rng) + f' in {colour}'
        if pattern and form < 0.3:
            return S._article(' '.join(w for w in (size, colour, shape) if w), rng) + f', {pattern}'
        return S._article(' '.join(w for w in (size, pattern, colour, shape) if w), rng)
    S._noun_phrase = _noun_phrase
if V.get('no_layout'):
    S._position = lambda o, rng: S._pick(rng, ('in the picture', 'in the image'))
    S._relation = lambda a, b, rng: 'and'
if 'p_size' in V:
    _orig_np = S._noun_phrase
    def _np2(o, rng, complete, _f=_orig_np):
        if not complete and rng.random() > V['p_size'] / 0.35: o = o.__class__(**{**o.__dict__, 'size': '_none'})
        return _f(o, rng, complete)
    S.SIZES['_none'] = ((0, 0), ('',))
    S._noun_phrase = _np2
GRAY = {'on': False}
if V.get('p_gray'):
    _np_before = S._noun_phrase
    def _np_gray(o, rng, complete, _f=_np_before):
        if GRAY['on']:
            saved = S.COLOURS; S.COLOURS = {k: S.Colour(c.rgb, ('',)) for k, c in saved.items()}
            try: return _f(o, rng, complete).replace('  ', ' ').replace(' in ', ' ' ) if False else _f(o, rng, complete).replace('  ', ' ')
            finally: S.COLOURS = saved
        return _f(o, rng, complete)
    S._noun_phrase = _np_gray
    _get = S.SyntheticImageText.__getitem__
    def __getitem__(self, i):
        gray = np.random.default_rng((self.seed, 99, int(i))).random() < V['p_gray']
        GRAY['on'] = gray
        try: im, cap = _get(self, i)
        finally: GRAY['on'] = False
        return (im.convert('L').convert('RGB'), cap) if gray else (im, cap)
    S.SyntheticImageText.__getitem__ = __getitem__
torch.set_num_threads(V.get('threads', 1))
from declip.train import train
t = time.time()
s = train(method=V.get('method', 'clip'), train_data=f"synthetic:size={V.get('size', 2000)}", eval_data='synthetic:n_per_class=25,n_retrieval=100',
          batch_size=64, max_steps=V['steps'], eval_every=V.get('eval_every', 200), workers=V.get('workers', 1), output_dir=V['out'],
          log_every=50, image_size=V.get('image_size'), **V.get('kw', {}))
print(json.dumps({k: {m: round(x, 3) for m, x in v.items() if 'top1' in m or 'R@1' in m} for k, v in s['eval'].items()}), f'{time.time()-t:.0f}s')
