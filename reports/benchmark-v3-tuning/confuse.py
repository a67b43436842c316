import sys, json, torch, numpy as np
exec(open('/work/tune/tune3.py').read().split('torch.set_num_threads')[0].replace("V = json.loads(sys.argv[1])", "V = json.loads(sys.argv[2])"))
from declip.inference import load_checkpoint
torch.set_num_threads(1)
model, tok, pre = load_checkpoint(sys.argv[1]); model.eval()
ev = S.synthetic_eval_sets(seed=0, n_per_class=25, n_retrieval=1)
ds = ev['shape']
x = torch.stack([pre(ds[i][0]) for i in range(len(ds))])
with torch.no_grad():
    f = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    cls = []
    for name in ds.classnames:
        t = torch.nn.functional.normalize(model.encode_text(tok([p.format(name) for p in S.PROMPT_TEMPLATES['shape']])), dim=-1).mean(0)
        cls.append(torch.nn.functional.normalize(t, dim=0))
    pred = (f @ torch.stack(cls).T).argmax(1)
y = torch.tensor(ds.labels); n = len(ds.classnames)
cm = np.zeros((n, n), int)
for a, b in zip(y.tolist(), pred.tolist()): cm[a, b] += 1
print('acc', (pred == y).float().mean().item())
for i, c in enumerate(ds.classnames): print(f'{c:10s}', ' '.join(f'{v:2d}' for v in cm[i]))
