"Can the image tower learn shape from labels at all? Supervised 12-way shape, single objects (diagnostic, not in the project)."
import sys, json, math, time, numpy as np, torch, torch.nn.functional as F
import declip.synthetic as S
from declip.encoders import ImageEncoder
from declip.transforms import eval_transform
torch.set_num_threads(1); torch.manual_seed(0)
V = json.loads(sys.argv[1]); rot = V.get('rot'); scale = V.get('size_scale', 1.0); n_obj = V.get('n_obj', 1)
S.SIZES.update({k: ((lo * scale, hi * scale), w) for k, ((lo, hi), w) in dict(S.SIZES).items()})
if 'patterns' in V: S.PATTERNS = {k: S.PATTERNS[k] for k in V['patterns']}
if 'bgs' in V: S.BACKGROUNDS = {k: S.BACKGROUNDS[k] for k in V['bgs']}
def make(n, stream):
    xs, ys = [], []
    tf = eval_transform(V.get('image_size', 64))
    for i in range(n):
        rng = np.random.default_rng((stream, i)); shape = S.SHAPE_NAMES[i % 12]
        pairs = [(c, s) for c, s in S.TRAIN_PAIRS if s == shape]
        sc = S.sample_scene(rng, n_objects=1, pairs=pairs, sizes=tuple(V.get('sizes', ('small', 'medium', 'large'))), margin=1/16)
        if rot is not None:
            sc = S.Scene(tuple(o.__class__(**{**o.__dict__, 'angle': (o.angle / math.pi - 1) * math.radians(rot)}) for o in sc.objects),
                         sc.background, sc.bg_rgb, sc.bg_rgb2, sc.bg_angle, sc.bg_noise, sc.noise_seed)
        im = S.render_scene(sc, V.get('image_size', 64))
        if V.get('gray'): im = im.convert('L').convert('RGB')
        xs.append(tf(im)); ys.append(i % 12)
    return torch.stack(xs), torch.tensor(ys)
xtr, ytr = make(V.get('n', 4000), 1); xte, yte = make(600, 2)
enc = ImageEncoder(V.get('enc', 'vit-tiny'), image_size=V.get('image_size', 64), freeze_patch_embed=V.get('freeze', True))
head = torch.nn.Linear(enc.embed_dim, 12)
opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=V.get('lr', 1e-3), weight_decay=0.1)
t = time.time()
for step in range(V.get('steps', 400)):
    idx = torch.randint(len(xtr), (64,))
    loss = F.cross_entropy(head(enc(xtr[idx])), ytr[idx]); opt.zero_grad(); loss.backward(); opt.step()
    if (step + 1) % 100 == 0:
        enc.eval()
        with torch.no_grad(): acc = (head(enc(xte)).argmax(1) == yte).float().mean().item()
        enc.train(); print(step + 1, round(loss.item(), 3), 'test acc', round(acc, 3), f'{time.time()-t:.0f}s', flush=True)
